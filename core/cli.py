"""``potstill run | validate | plugins | verify | bench | build-engine | serve-teacher``.

User mistakes (bad spec, missing file, missing optional dependency, broken plugin) print one line per
problem and exit 2 (1 for other failures), without a traceback; ``POTSTILL_DEBUG=1`` shows it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

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

    verify = sub.add_parser("verify", help="re-check a bundle: hashes, and every artifact against stored and fresh inputs")
    verify.add_argument("bundle", help="bundle folder (the --out of `potstill run`)")
    verify.add_argument("--seed", type=int, help="seed of the fresh inputs (default: a new one, printed)")

    bench = sub.add_parser("bench", help="time every artifact of a bundle on this machine, side by side")
    bench.add_argument("bundle", help="bundle folder (the --out of `potstill run`)")
    bench.add_argument("--threads", type=_positive, help="intra-op threads (default: the run's measure.threads)")
    bench.add_argument("--batch", type=_positive, help="batch size (default: the run's measure.batch_size)")
    bench.add_argument("--seq", type=_positive, help="sequence length (default: the run's measure.seq_len)")
    bench.add_argument("--warmup", type=_non_negative, help="warm-up runs per artifact (default: the run's)")
    bench.add_argument("--repeats", type=_positive, help="timed runs per artifact (default: the run's, at least 10)")

    engine = sub.add_parser("build-engine", help="build TensorRT engines from a bundle's plan on this GPU")
    engine.add_argument("bundle", help="bundle folder (the --out of `potstill run`)")

    serve = sub.add_parser("serve-teacher", help="serve a local teacher as a top-k log-prob HTTP endpoint (potstill "
                                                 "and OpenAI-compatible schemas), with a token, a budget and a rate limit")
    serve.add_argument("model", help="an HF model folder, bundled:cpython-byte-lm / bundled:minilm, or a YAML file "
                                     "holding a teacher entry ({name: hf, path: ...})")
    serve.add_argument("--port", type=_non_negative, required=True, help="TCP port (0: any free port, printed)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--token-env", default="POTSTILL_TEACHER_TOKEN",
                       help="environment variable holding the bearer token clients must send")
    serve.add_argument("--budget", type=_non_negative, help="answer at most this many requests (then 429 insufficient_quota)")
    serve.add_argument("--rate-limit", type=_rate, help="requests per second, e.g. 20 or 20/s (then 429 with Retry-After)")
    serve.add_argument("--task", default="causal_lm", help="the task whose logits are served (default: causal_lm)")
    serve.add_argument("--fail-every", type=_non_negative, default=0,
                       help="for testing clients: every n-th request fails (500 or a dropped connection)")
    serve.add_argument("--ledger", help="append the hash of every answered request to this file (counts across restarts)")
    return parser


def _rate(text: str) -> float:
    try:
        value = float(text[:-2] if text.endswith("/s") else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a rate in requests per second, like 20 or 20/s (got {text!r})") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive (got {text!r})")
    return value


def _serve_teacher(args: argparse.Namespace) -> int:
    from pathlib import Path

    import yaml

    from potstill.serve import TeacherServer
    from potstill.spec import nested_technique
    from potstill.techniques import Context

    token = os.environ.get(args.token_env)
    if not token:
        print(f"potstill: serve-teacher needs a bearer token: set the environment variable {args.token_env} "
              f"(or name another with --token-env)", file=sys.stderr)
        return 2
    task = nested_technique("task", {"name": args.task})
    source = Path(args.model)
    if source.suffix in (".yaml", ".yml") and source.is_file():
        entry = yaml.safe_load(source.read_text(encoding="utf-8"))
        entry = entry.get("teacher", entry) if isinstance(entry, dict) else entry
        base_dir = source.resolve().parent
    else:
        entry, base_dir = {"name": "hf", "path": args.model}, Path.cwd()
    teacher = nested_technique("teacher", entry, base_dir)
    ctx = Context(seed=0, base_dir=base_dir, out=base_dir, task=task)
    loaded = teacher.load(ctx)
    server = TeacherServer(loaded, task, token=token, port=args.port, host=args.host, budget=args.budget,
                           rate_limit=args.rate_limit, fail_every=args.fail_every, ledger=args.ledger,
                           model_name=str(entry.get("path", entry.get("name", "teacher"))) if isinstance(entry, dict) else "teacher")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"potstill: warning: serving on {args.host}, not loopback only", file=sys.stderr)
    import threading

    def announce() -> None:  # once the socket is bound (serve_forever binds it), so `port 0` prints the real one
        while server._httpd is None:
            threading.Event().wait(0.01)
        print(f"serving {loaded.description or args.model} on {server.url} (POST /v1/topk, POST /v1/completions; "
              f"token from ${args.token_env})", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # the port is taken, or the address is not this machine's
        print(f"potstill: serve-teacher cannot listen on {args.host}:{args.port} ({exc.strerror or exc})", file=sys.stderr)
        return 1
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    return value


def _verify(bundle: str, seed: int | None) -> int:
    from potstill.bundle import verify

    result = verify(bundle, seed=seed, echo=print)
    if result.ok:
        print(f"verify: ok, {len(result.checks)} checks on {bundle} (fresh inputs from --seed {result.seed})")
        return 0
    names = sorted({check.file for check in result.failed})
    print(f"verify: FAILED, {len(result.failed)} of {len(result.checks)} checks, in {', '.join(names)} "
          f"(replay with --seed {result.seed})")
    return 1


def _bench(args: argparse.Namespace) -> int:
    from potstill.bundle import bench, bench_table

    result = bench(args.bundle, threads=args.threads, batch=args.batch, seq=args.seq, warmup=args.warmup,
                   repeats=args.repeats)
    print(bench_table(result))
    print(json.dumps({"bench": result}))
    return 0


def _build_engine(bundle: str) -> int:
    from pathlib import Path

    try:
        from potstill.exporters.tensorrt import build_engine
    except ImportError as exc:
        print(f"potstill: build-engine needs potstill.exporters.tensorrt, which cannot be imported here ({exc}); "
              "install TensorRT from NVIDIA's index and `pip install 'potstill[tensorrt]'`", file=sys.stderr)
        return 2
    return build_engine(Path(bundle))


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
    if args.command == "verify":
        return _verify(args.bundle, args.seed)
    if args.command == "bench":
        return _bench(args)
    if args.command == "build-engine":
        return _build_engine(args.bundle)
    if args.command == "serve-teacher":
        return _serve_teacher(args)
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
