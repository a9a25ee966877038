"""What the compression bought: quality kept, size, latency and speed-up, for the teacher and each artifact.

Latency is measured in ONNX Runtime on the CPU with one thread (``measure.threads``), after warm-up, as
the median of repeated runs at the task's batch shape (``measure.batch_size`` x ``measure.seq_len``).
Quality is measured on held-out data against the teacher (PyTorch), on the artifact itself, so the
numbers include export and quantization error.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import platform
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from potstill import __version__, io
from potstill.techniques import Context, count_parameters, nonzero_parameters

REPORT_DIR = "report"


@dataclass
class Report:
    """The report of a run; ``to_dict()`` is what ``report.json`` holds."""

    data: dict[str, Any]
    out: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return self.data

    @property
    def teacher(self) -> dict[str, Any]:
        return self.data["teacher"]

    @property
    def artifacts(self) -> list[dict[str, Any]]:
        return self.data["artifacts"]

    @property
    def stages(self) -> list[dict[str, Any]]:
        return self.data["stages"]

    def best(self) -> dict[str, Any] | None:
        """The last artifact (usually the most compressed one)."""
        return self.artifacts[-1] if self.artifacts else None

    def __getitem__(self, key: str) -> Any:
        return self.data[key]


def _versions() -> dict[str, str]:
    versions = {"potstill": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for dist in ("numpy", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "pydantic", "pluggy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if importlib.util.find_spec("tensorrt") is not None:  # from NVIDIA's index, under several dist names
        try:
            import tensorrt

            versions["tensorrt"] = tensorrt.__version__
        except Exception:  # installed but unloadable (no CUDA driver): the bundle still records that it is there
            versions["tensorrt"] = "installed, not importable here"
    return versions


def _eval_batches(ctx: Context, batch_size: int, count: int | None) -> list[dict[str, torch.Tensor]]:
    assert ctx.data is not None
    tokenizer = ctx.tokenizer
    held = ctx.data.heldout
    end = len(held) if count is None else min(len(held), batch_size * count)
    return [ctx.task.collate(held[i: i + batch_size], tokenizer) for i in range(0, end, batch_size)]


def _torch_callable(module: nn.Module, ctx: Context) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    wrapped = ctx.task.export_module(module).eval()

    @torch.no_grad()
    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return wrapped(*ctx.task.export_inputs(batch).values())

    return run


def _torch_latency(module: nn.Module, ctx: Context, inputs: dict[str, torch.Tensor], warmup: int, repeats: int) -> float:
    from potstill.runtime import median_ms

    run = _torch_callable(module, ctx)
    return median_ms(lambda: run(inputs), warmup, repeats)


def _teacher_onnx(ctx: Context, teacher: nn.Module, fingerprint: str) -> Path:
    """The teacher exported once per teacher (reused across reruns), for a fair latency baseline."""
    from potstill.exporters.onnx import OnnxExporter

    if getattr(teacher, "onnx_path", None) is not None:  # an ONNX teacher is timed as the file it runs
        return Path(teacher.onnx_path)  # type: ignore[arg-type]
    path = ctx.out / "teacher.onnx"
    meta = ctx.out / "stages" / "teacher.json"
    if path.is_file() and meta.is_file() and io.read_json(meta).get("fingerprint") == fingerprint \
            and io.read_json(meta).get("sha256") == io.sha256(path):
        return path
    OnnxExporter().export(teacher, ctx, filename="teacher.onnx")
    io.write_json(meta, {"fingerprint": fingerprint, "sha256": io.sha256(path)})
    return path


def build_report(spec: Any, ctx: Context, model: nn.Module, teacher: nn.Module, stages: list[dict[str, Any]]) -> Report:
    from potstill import runtime
    from potstill.bundle import op_precision

    measure = spec.top.measure
    task = ctx.task
    tokenizer = ctx.tokenizer
    assert ctx.data is not None
    bench_inputs = task.benchmark_batch(ctx.data, tokenizer, measure.batch_size, measure.seq_len)
    batches = _eval_batches(ctx, measure.batch_size, measure.heldout_batches)
    reference = _torch_callable(teacher, ctx)
    onnx = any(a.measurable for a in ctx.artifacts)

    def entry(path: str, parameters: int, nonzero: int, size: int, latency: float | None,
              quality: dict[str, float], **extra: Any) -> dict[str, Any]:
        return {"path": path, "parameters": parameters, "nonzero_parameters": nonzero, "bytes": size,
                "latency_ms": None if latency is None else round(latency, 3),
                "quality": {k: round(v, 6) for k, v in quality.items()}, **extra}

    external = not getattr(spec.teacher, "local_weights", True)
    if external and getattr(teacher, "onnx_path", None) is None:
        # a teacher behind an API, a cache or an ensemble: its quality is the reference; nothing local to time
        teacher_entry = entry(f"(external teacher: {spec.teacher.name})", int(getattr(teacher, "parameter_count", 0)), 0,
                              0, None, task.evaluate(reference, reference, batches), kind="external", runtime="-")
    elif onnx or external:
        teacher_fingerprint = hashlib.sha256(json.dumps([spec.resolved()["teacher"], spec.teacher.fingerprint(),
                                                         spec.resolved()["task"]], sort_keys=True).encode()).hexdigest()
        teacher_path = _teacher_onnx(ctx, teacher, teacher_fingerprint)
        teacher_latency = runtime.ort_latency_ms(teacher_path, bench_inputs, measure.threads, measure.warmup,
                                                 measure.repeats) if measure.latency else None
        teacher_quality = task.evaluate(reference, runtime.ort_callable(runtime.session(teacher_path)), batches)
        teacher_entry = entry(teacher_path.name, count_parameters(teacher), nonzero_parameters(teacher),
                              runtime.onnx_bytes(teacher_path), teacher_latency, teacher_quality, kind="onnx-fp32",
                              runtime="onnxruntime", ops=op_precision(teacher_path))
    else:
        with _threads(measure.threads):
            teacher_latency = _torch_latency(teacher, ctx, bench_inputs, measure.warmup, measure.repeats) \
                if measure.latency else None
        teacher_entry = entry("(pytorch teacher)", count_parameters(teacher), nonzero_parameters(teacher),
                              _state_bytes(teacher), teacher_latency, task.evaluate(reference, reference, batches),
                              kind="torch", runtime="torch")

    artifacts = []
    for artifact in ctx.artifacts:
        relative = str(Path(artifact.path).relative_to(ctx.out))
        if not artifact.measurable:  # e.g. a TensorRT build plan: listed, not run here
            artifacts.append(entry(relative, count_parameters(model), nonzero_parameters(model), _bytes(artifact.path),
                                   None, {}, kind=artifact.kind, runtime=artifact.runtime, parity=artifact.parity,
                                   notes=artifact.notes))
            continue
        latency = runtime.ort_latency_ms(artifact.path, bench_inputs, measure.threads, measure.warmup,
                                         measure.repeats, artifact.providers) if measure.latency else None
        sess = runtime.session(artifact.path, providers=artifact.providers)
        quality = task.evaluate(reference, runtime.ort_callable(sess), batches)
        artifacts.append(entry(relative, count_parameters(model), nonzero_parameters(model),
                               runtime.onnx_bytes(artifact.path), latency, quality, kind=artifact.kind,
                               runtime=artifact.runtime, parity=artifact.parity, notes=artifact.notes,
                               providers=sess.get_providers(), ops=op_precision(artifact.path)))
    if not ctx.artifacts:
        with _threads(measure.threads):
            latency = _torch_latency(model, ctx, bench_inputs, measure.warmup, measure.repeats) if measure.latency else None
        artifacts.append(entry("(pytorch student)", count_parameters(model), nonzero_parameters(model), _state_bytes(model),
                               latency, task.evaluate(reference, _torch_callable(model, ctx), batches), kind="torch",
                               runtime="torch"))

    for item in artifacts:
        if item["latency_ms"] and teacher_entry["latency_ms"]:
            item["speedup"] = round(teacher_entry["latency_ms"] / item["latency_ms"], 3)
            item["faster"] = item["speedup"] > 1.05
        item["size_ratio"] = round(teacher_entry["bytes"] / max(1, item["bytes"]), 3)
        if item["latency_ms"] and teacher_entry["latency_ms"] and not item["faster"]:
            ctx.note(f"{item['path']} is not faster than the teacher on {item['runtime']} "
                     f"({item['latency_ms']:.2f} ms vs {teacher_entry['latency_ms']:.2f} ms).")

    _note_slower_than_fp32(artifacts, ctx)

    try:
        import onnxruntime

        runtime_name = f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)" if onnx else f"torch {torch.__version__}"
    except ImportError:
        runtime_name = f"torch {torch.__version__}"
    data = {
        "potstill": __version__,
        "name": spec.name,
        "spec_hash": spec.prefix_hash(len(spec.stages) - 1) if spec.stages else "",
        "seed": spec.seed,
        "task": {"name": task.name, "primary_metric": task.primary_metric},
        "data": ctx.data.description,
        "teacher_source": ctx.teacher.description if ctx.teacher is not None else "",
        "teacher_details": ctx.teacher.details if ctx.teacher is not None else {},
        "measurement": {
            "runtime": runtime_name,
            "threads": measure.threads,
            "batch_shape": list(next(iter(bench_inputs.values())).shape),
            "warmup": measure.warmup,
            "repeats": measure.repeats,
            "statistic": "median",
            "quality_on": f"{sum(len(next(iter(b.values()))) for b in batches)} held-out examples vs the PyTorch teacher",
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        },
        "stages": stages,
        "teacher": teacher_entry,
        "artifacts": artifacts,
        "notes": list(ctx.notes),
    }
    return Report(data, ctx.out)


def _note_slower_than_fp32(artifacts: list[dict[str, Any]], ctx: Context) -> None:
    """Warn when lowering precision cost time: a quantized model slower than the fp32 one it came from.

    That happens (int8 on a CPU without VNNI, fp16 on a CPU at all), and a deployment engineer should
    learn it from the report, not from production.
    """
    from potstill.bundle import fp32_sibling

    by_path = {item["path"]: item for item in artifacts}
    pairs = [(item["path"], item["kind"]) for item in artifacts]
    for item in artifacts:
        sibling = fp32_sibling(item["path"], item["kind"], pairs)
        if sibling is None or not item["latency_ms"] or not by_path[sibling]["latency_ms"]:
            continue
        if item["latency_ms"] > by_path[sibling]["latency_ms"]:
            ctx.note(f"warning: {item['path']} is slower than its fp32 counterpart {sibling} on {item['runtime']} "
                     f"({item['latency_ms']:.2f} ms vs {by_path[sibling]['latency_ms']:.2f} ms); ship {sibling} "
                     "for this runtime, or measure on the deployment hardware (`potstill bench`).")


class _threads:
    def __init__(self, n: int):
        self.n = n

    def __enter__(self) -> None:
        self.previous = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.previous)


def _bytes(path: Path) -> int:
    """Size of a file, or of everything in a folder."""
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def rows(report: Report) -> list[dict[str, str]]:
    """The summary table's rows (shared by report.md and the terminal table): one column per metric."""
    metric = report["task"]["primary_metric"]
    out = []
    for label, item in [("teacher", report.teacher)] + [("student", a) for a in report.artifacts]:
        quality = item["quality"]
        row = {
            "model": label,
            "artifact": item["path"],
            "params": f"{item['parameters'] / 1e6:.2f} M",
            "size": _mb(item["bytes"]),
            "latency": "-" if item["latency_ms"] is None else f"{item['latency_ms']:.2f} ms",
            "speed-up": f"{item['speedup']:.2f}x" if "speedup" in item else ("1.00x" if label == "teacher" else "-"),
        }
        row[metric] = f"{quality[metric]:.4f}" if metric in quality else "-"
        row.update({name: f"{value:.4f}" for name, value in quality.items() if name != metric})
        out.append(row)
    # an artifact not run here (a TensorRT plan) has no quality: its cells are "-", every row has every column
    columns = list(dict.fromkeys(key for row in out for key in row))
    return [{key: row.get(key, "-") for key in columns} for row in out]


def _plot(report: Report, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = report["task"]["primary_metric"]
    points = [("teacher", report.teacher)] + [(a["path"], a) for a in report.artifacts]
    points = [(label, item) for label, item in points if item["latency_ms"] is not None and metric in item["quality"]]
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for label, item in points:
        ax.scatter(item["latency_ms"], item["quality"][metric], s=60)
        ax.annotate(label, (item["latency_ms"], item["quality"][metric]), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    shape = "x".join(str(s) for s in report["measurement"]["batch_shape"])
    ax.set_xlabel(f"latency, ms (median, batch {shape}, {report['measurement']['threads']} thread)")
    ax.set_ylabel(f"{metric} vs teacher (held-out)")
    ax.set_title(f"{report['name']}: quality against latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def markdown(report: Report, plot: str | None) -> str:
    table = rows(report)
    headers = list(table[0])
    lines = [f"# potstill report: {report['name']}", ""]
    lines += [f"Task `{report['task']['name']}`; data: {report['data']}; teacher: {report['teacher_source']}.", ""]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row[h] for h in headers) + " |" for row in table]
    m = report["measurement"]
    lines += ["", f"Latency: {m['runtime']}, {m['threads']} thread(s), batch shape {m['batch_shape']}, "
              f"median of {m['repeats']} runs after {m['warmup']} warm-up runs. Quality: {m['quality_on']}.", ""]
    if plot:
        lines += [f"![quality against latency]({plot})", ""]
    ops = [(item["path"], item["ops"]) for item in [report.teacher] + report.artifacts if item.get("ops")]
    if ops:
        lines += ["## Precision by op", "", "| artifact | int8 ops | fp16 ops | fp32 ops |", "|---|---|---|---|"]
        lines += [f"| {path} | {o['int8']} | {o['fp16']} | {o['fp32']} |" for path, o in ops] + [""]
    if report.data.get("teacher_details"):
        lines += ["## Teacher", ""]
        lines += [f"- **{key}**: {json.dumps(value, sort_keys=True)}" for key, value in report["teacher_details"].items()] + [""]
    lines += ["## Stages", "", "| # | stage | technique | seconds | cached |", "|---|---|---|---|---|"]
    lines += [f"| {i} | {s['stage']} | {s['name']} | {s['seconds']:.1f} | {'yes' if s['cached'] else 'no'} |"
              for i, s in enumerate(report.stages)]
    decoding = [(i, s) for i, s in enumerate(report.stages) if s["stage"] == "decode"]
    if decoding:
        lines += ["", "## Decoding", ""]
        for i, s in decoding:
            figures = ", ".join(f"{k} {_figure(v)}" for k, v in s.get("record", {}).items() if isinstance(v, (int, float)))
            lines.append(f"- stage {i}, `{s['name']}`: {figures}")
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def _figure(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_bundle(out: Path, spec: Any, report: Report, reference: dict[str, Any] | None = None) -> None:
    """report.json, report.md with its plot, and manifest.json (written last, over every other file).

    The manifest is what `potstill verify` checks on another machine: relative paths (a moved bundle
    still verifies), every file's sha256, the versions that produced it, and per artifact its opset, op
    precision, measured parity and latency, and the tolerance it is re-checked with.

    :param reference: what :func:`potstill.bundle.write_reference` returned (None: no reference data).
    """
    from potstill.bundle import manifest_artifacts

    (out / REPORT_DIR).mkdir(exist_ok=True)
    plot_name = f"{REPORT_DIR}/quality_latency.png"
    plotted = _plot(report, out / plot_name)
    io.write_json(out / "report.json", report.to_dict())
    io.write_text(out / "report.md", markdown(report, plot_name if plotted else None))
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"
                   and "stages" not in p.relative_to(out).parts and not p.name.startswith("."))
    manifest = {
        "potstill": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "name": spec.name,
        "seed": spec.seed,
        "versions": _versions(),
        "command": " ".join(sys.argv),
        "stages": [{"kind": s["kind"], "name": s["name"], "seconds": s["seconds"], "cached": s["cached"]}
                   for s in report.stages],
        "measurement": report["measurement"],
        "artifacts": manifest_artifacts(out, report, reference),
        "reference": {k: v for k, v in reference.items() if k != "checks"} if reference else None,
        "files": {p.relative_to(out).as_posix(): {"sha256": io.sha256(p), "bytes": p.stat().st_size} for p in files},
    }
    io.write_json(out / "manifest.json", manifest)


def print_summary(report: Report, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    from rich import box

    table = Table(title=f"potstill: {report['name']}", box=box.SIMPLE_HEAD, pad_edge=False)
    # compact for an 80-column terminal: the artifact names the row, worst-case metrics stay in report.md
    data = [{k: v.replace(" ", "") if k in ("params", "size", "latency") else v for k, v in row.items()
             if k != "model" and not k.startswith("min_")} for row in rows(report)]
    for header in data[0]:
        table.add_column(header, no_wrap=True)
    for row in data:
        table.add_row(*row.values())
    console.print(table)
    best = report.best()
    metric = report["task"]["primary_metric"]
    if best is not None and "speedup" in best and metric in best["quality"]:
        console.print(f"[bold]{best['path']}[/]: {best['speedup']:.2f}x faster, {best['size_ratio']:.2f}x smaller, "
                      f"{metric} {best['quality'][metric]:.4f} against the teacher on held-out data.")
    for note in report["notes"]:
        console.print(f"[yellow]note[/]: {note}")
