"""potstill: plugin-based model compression (distill, prune, quantize, export) with a measured report."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from potstill.report import Report


def run(spec_or_path: Any, out: Any = None, overrides: list[str] | None = None, fresh: bool = False,
        progress: bool = True) -> "Report":
    """Run a pipeline spec (a path to YAML, a YAML string's parsed dict, or a :class:`potstill.spec.Spec`).

    Returns the report (also written to ``<out>/report.json``). See :func:`potstill.pipeline.run`.
    """
    from potstill.pipeline import run as _run

    return _run(spec_or_path, out=out, overrides=overrides, fresh=fresh, progress=progress)


__all__ = ["run", "__version__"]
