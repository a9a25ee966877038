"""Run a spec: load data and teacher, run the stages in order, export, measure, write the bundle.

Each stage's output is saved under ``<out>/stages/<i>-<key>/`` with the hash of the spec up to and
including that stage; a rerun reuses every stage whose hash is unchanged (``fresh=True`` recomputes).
Structural stages (a student build) are replayed cheaply on reuse, then the saved weights are loaded.
A distill stage also checkpoints inside itself, so a killed run resumes mid-stage.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from potstill import io
from potstill.bundle import write_reference
from potstill.plugin_manager import get_plugins
from potstill.report import Report, build_report, write_bundle
from potstill.spec import Spec, Stage, load
from potstill.techniques import Artifact, Context, Decoder, Exporter, Quantizer
from potstill.train import Distiller

STATE = "state.safetensors"
META = "stage.json"


class _Progress:
    """A rich progress bar for a distill stage (plain when output is not a terminal or disabled)."""

    def __init__(self, enabled: bool, label: str, total: int, start: int):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task(label, total=total, completed=start, loss=float("nan"))

    def __enter__(self) -> "_Progress":
        if self.bar:
            self.bar.start()
        return self

    def update(self, step: int, loss: float) -> None:
        if self.bar:
            self.bar.update(self.task, completed=step, loss=loss)

    def __exit__(self, *exc: Any) -> None:
        if self.bar:
            self.bar.stop()


def check(spec_or_path: Any, overrides: list[str] | None = None) -> Spec:
    """Validate everything that can be checked before a model loads (``potstill validate``)."""
    return load(spec_or_path, overrides)


def run(spec_or_path: Any, out: Any = None, overrides: list[str] | None = None, fresh: bool = False,
        progress: bool = True, stop_after_steps: int | None = None) -> Report:
    """Run a spec and write its bundle; return the report.

    :param stop_after_steps: end the first distill stage that runs after this many steps, as if killed
        (for tests of resumption); the bundle is then incomplete and the report is not written.
    """
    spec = check(spec_or_path, overrides)
    previous_threads = torch.get_num_threads()
    if spec.top.threads:
        torch.set_num_threads(spec.top.threads)
    try:
        return _run(spec, out, fresh, progress, stop_after_steps)
    finally:
        torch.set_num_threads(previous_threads)


def _run(spec: Spec, out: Any, fresh: bool, progress: bool, stop_after_steps: int | None) -> Report:
    get_plugins()
    out = Path(out) if out is not None else Path("runs") / spec.name
    out.mkdir(parents=True, exist_ok=True)
    if fresh and (out / "stages").exists():
        shutil.rmtree(out / "stages")
    io.write_text(out / "spec.yaml", _yaml(spec.resolved()))

    ctx = Context(seed=spec.seed, base_dir=spec.base_dir, out=out, task=spec.task, progress=progress,  # type: ignore[arg-type]
                  measure=spec.top.measure,
                  spec_hash=spec.prefix_hash(len(spec.stages) - 1) if spec.stages else "")
    torch.manual_seed(spec.seed)
    ctx.data = spec.data.load(ctx)  # type: ignore[attr-defined]
    ctx.teacher = spec.teacher.load(ctx)  # type: ignore[attr-defined]
    teacher = ctx.teacher.model
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    # with no student stage, the teacher itself is compressed; an external teacher (no local weights) is not
    # copied: validation made sure the first stage builds the student
    model: nn.Module = copy.deepcopy(teacher) if spec.teacher.local_weights else None  # type: ignore[assignment]
    for parameter in model.parameters() if model is not None else ():
        parameter.requires_grad_(True)

    timings: list[dict[str, Any]] = []
    for stage in spec.stages:
        started = time.perf_counter()
        stage_dir = out / "stages" / stage.dirname
        ctx.stage_dir = stage_dir
        ctx.record = {}
        before = len(ctx.artifacts)
        key = spec.prefix_hash(stage.index)
        meta_path = stage_dir / META
        cached = meta_path.is_file() and io.read_json(meta_path).get("hash") == key
        if cached and _cached_artifacts(meta_path, out) is None:
            cached = False  # an artifact of this stage was removed or changed: rebuild it and record it anew
        model, interrupted = _run_stage(stage, model, teacher, ctx, cached, key, spec, progress, stop_after_steps)
        if interrupted:
            return None  # type: ignore[return-value]
        seconds = time.perf_counter() - started
        if cached:
            meta = io.read_json(meta_path)
            ctx.record = meta.get("record", {})
            entry = {"kind": stage.kind, "stage": stage.key, "name": stage.name, "seconds": meta["seconds"],
                     "cached": True, "record": ctx.record}
        else:
            entry = {"kind": stage.kind, "stage": stage.key, "name": stage.name, "seconds": round(seconds, 3),
                     "cached": False, "record": ctx.record}
            io.write_json(meta_path, {"hash": key, "seconds": round(seconds, 3), "record": ctx.record,
                                      "artifacts": [_artifact_json(a, out) for a in ctx.artifacts[before:]]})
        timings.append(entry)

    if not ctx.artifacts:
        ctx.note("No export stage: the report measures the PyTorch model only.")
    report = build_report(spec, ctx, model, teacher, timings)
    reference = write_reference(out, ctx, model, teacher, report)  # before the manifest, which hashes it
    write_bundle(out, spec, report, reference)
    return report


def _artifact_json(artifact: Artifact, out: Path) -> dict[str, Any]:
    return {"path": str(Path(artifact.path).relative_to(out)), "kind": artifact.kind, "runtime": artifact.runtime,
            "parity": artifact.parity, "notes": artifact.notes, "providers": artifact.providers,
            "sha256": _tree_sha256(artifact.path)}


def _tree_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder artifact (a TensorRT plan) over its files' relative names and hashes."""
    path = Path(path)
    if not path.is_dir():
        return io.sha256(path)
    import hashlib

    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{item.relative_to(path).as_posix()}\0{io.sha256(item)}\n".encode())
    return digest.hexdigest()


def _cached_artifacts(meta_path: Path, out: Path) -> list[Artifact] | None:
    """The stage's artifacts if every file is still there with its recorded hash."""
    artifacts = []
    for item in io.read_json(meta_path).get("artifacts", []):
        path = out / item["path"]
        if not path.exists() or _tree_sha256(path) != item["sha256"]:
            return None
        artifacts.append(Artifact(path=path, kind=item["kind"], runtime=item["runtime"], parity=item["parity"],
                                  notes=item["notes"], providers=item.get("providers", ["CPUExecutionProvider"])))
    return artifacts


def _run_stage(stage: Stage, model: nn.Module, teacher: nn.Module, ctx: Context, cached: bool, key: str, spec: Spec,
               progress: bool, stop_after_steps: int | None) -> tuple[nn.Module, bool]:
    stage_dir = ctx.stage_dir
    assert stage_dir is not None
    state_path = stage_dir / STATE
    technique = stage.technique
    if stage.key == "student":
        model = technique.build(teacher, ctx)  # type: ignore[union-attr]
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        if cached:
            io.load_state(state_path, model)
        else:
            io.save_state(state_path, model)
    elif stage.key == "distill":
        if cached:
            io.load_state(state_path, model)
        else:
            assert stage.distill is not None
            with _stage_inputs(stage, ctx) as stage_teacher:
                distiller = Distiller(model, stage_teacher if stage_teacher is not None else teacher, stage.losses,
                                      stage.distill, ctx, stage.index, stage_dir, key)
                with _Progress(progress, f"distill (stage {stage.index})", stage.distill.steps, 0) as bar:
                    result = distiller.run(on_step=bar.update, stop_after=stop_after_steps)
            ctx.record.update(result)
            if not result["finished"]:
                return model, True
            io.save_state(state_path, model)
    elif stage.key == "prune":
        if cached:
            model = technique.reshape(model, ctx)  # type: ignore[union-attr]  # structural pruners: shapes first
            io.load_state(state_path, model)
            model = technique.restore(model, ctx)  # type: ignore[union-attr]
        else:
            model = technique.prune(model, ctx)  # type: ignore[union-attr]
            io.save_state(state_path, model)
    elif stage.key == "quantize":
        assert isinstance(technique, Quantizer)
        if technique.target == "torch":
            if cached:
                model = technique.quantize_torch(model, ctx)
                io.load_state(state_path, model)
            else:
                model = technique.quantize_torch(model, ctx)
                io.save_state(state_path, model)
        elif ctx.artifacts:  # an export already ran: quantize its fp32 ONNX now
            reused = _cached_artifacts(stage_dir / META, ctx.out) if cached else None
            ctx.artifacts.extend(reused if reused is not None else _quantize_artifacts(technique, ctx, model, cached))
        else:
            ctx.pending_onnx_quantizers.append(technique)
    elif stage.key == "decode":
        assert isinstance(technique, Decoder)
        if not cached:  # a cached stage's measurements come back from its stage.json
            ctx.record.update(technique.run(teacher, model, ctx))
    elif stage.key == "export":
        assert isinstance(technique, Exporter)
        reused = _cached_artifacts(stage_dir / META, ctx.out) if cached else None
        if reused is not None:
            ctx.artifacts.extend(reused)
        else:
            new = technique.export(model, ctx)
            ctx.artifacts.extend(new)
            pending, ctx.pending_onnx_quantizers = ctx.pending_onnx_quantizers, []
            for quantizer in pending:
                ctx.artifacts.extend(_quantize_artifacts(quantizer, ctx, model, False, sources=new))
    return model, False


@contextlib.contextmanager
def _stage_inputs(stage: Stage, ctx: Context) -> Iterator[nn.Module | None]:
    """A distill stage's own teacher and data (multi-stage recipes), in place of the spec's for the stage."""
    saved_data, saved_teacher = ctx.data, ctx.teacher
    try:
        if stage.data is not None:
            ctx.data = stage.data.load(ctx)  # type: ignore[attr-defined]
        own = None
        if stage.teacher is not None:
            ctx.teacher = stage.teacher.load(ctx)  # type: ignore[attr-defined]
            own = ctx.teacher.model
            for parameter in own.parameters():
                parameter.requires_grad_(False)
            ctx.record["teacher"] = ctx.teacher.description or stage.teacher.name
        if stage.data is not None:
            ctx.record["data"] = ctx.data.description or stage.data.name
        yield own
    finally:
        ctx.data, ctx.teacher = saved_data, saved_teacher


def _quantize_artifacts(quantizer: Quantizer, ctx: Context, model: nn.Module, cached: bool,
                        sources: list[Artifact] | None = None) -> list[Artifact]:
    from potstill.exporters.onnx import DEFAULT_CHECK_SHAPES, check_batches, parity

    results = []
    # only plain fp32 ONNX files are quantized: not a TensorRT plan folder, not an already-quantized model
    candidates = [a for a in (sources if sources is not None else ctx.artifacts) if a.kind == "onnx-fp32" and a.measurable]
    if not candidates:
        ctx.note(f"{quantizer.name}: no fp32 ONNX artifact to quantize (it applies to `export: {{name: onnx}}` output).")
    for source in candidates:
        destination = source.path.with_name(f"{source.path.stem}.{quantizer.options.suffix}.onnx")  # type: ignore[attr-defined]
        artifact = quantizer.quantize_onnx(source.path, destination, ctx)
        batches = check_batches(ctx.task, ctx, DEFAULT_CHECK_SHAPES)
        artifact.parity = parity(artifact.path, model, ctx.task, batches)
        artifact.parity["reference"] = "the fp32 PyTorch model (quantization error included)"
        results.append(artifact)
    return results


def _yaml(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, sort_keys=False)
