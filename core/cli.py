"""``potstill run | validate | plugins``.

User mistakes (bad spec, missing file, missing optional dependency, broken plugin) print one line per
problem and exit 2 (1 for other failures), without a traceback; ``POTSTILL_DEBUG=1`` shows it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from potstill.errors import PotstillError, SpecError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="potstill", description="Distill, prune, quantize and export models from a YAML spec.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run a spec and write its bundle")
    run.add_argument("spec", help="path to the YAML spec")
    run.add_argument("--out", "-o", help="bundle folder (default: runs/<spec name>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                     help="override a spec value, e.g. --set stages[1].distill.steps=50 (repeatable)")
    run.add_argument("--fresh", action="store_true", help="recompute every stage instead of reusing cached outputs")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--json", action="store_true", help="print report.json instead of the table")

    validate = sub.add_parser("validate", help="check a spec without loading any model")
    validate.add_argument("spec")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")

    plugins = sub.add_parser("plugins", help="list plugins and the techniques they register")
    plugins.add_argument("--json", action="store_true")
    return parser


def _plugins(as_json: bool) -> int:
    from potstill.plugin_manager import get_plugins

    rows = get_plugins().describe()
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="potstill plugins")
    for column in ("plugin", "version", "techniques"):
        table.add_column(column)
    for row in rows:
        techniques = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in row["techniques"].items())
        table.add_row(row["name"], row["version"], techniques or "-")
    Console().print(table)
    return 0


def _main(args: argparse.Namespace) -> int:
    if args.command == "plugins":
        return _plugins(args.json)
    if args.command == "validate":
        from potstill.pipeline import check

        spec = check(args.spec, args.overrides)
        print(f"{args.spec}: ok ({len(spec.stages)} stages: {', '.join(s.label for s in spec.stages)})")
        return 0
    if args.command == "run":
        from potstill.pipeline import run
        from potstill.report import print_summary

        report = run(args.spec, out=args.out, overrides=args.overrides, fresh=args.fresh, progress=not args.no_progress)
        if args.json:
            print(json.dumps(report.to_dict(), indent=2))
        else:
            print_summary(report)
            print(f"bundle: {report.out}")
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        from potstill import __version__

        print(f"potstill {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 2
    try:
        return _main(args)
    except SpecError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return exc.exit_code
    except PotstillError as exc:
        print(f"potstill: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("potstill: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError, IndexError, ImportError) as exc:
        if os.environ.get("POTSTILL_DEBUG"):
            raise
        message = exc.args[0] if exc.args else str(exc)
        print(f"potstill: {message} (POTSTILL_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
