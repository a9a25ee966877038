"""Export to ONNX with the torch dynamo exporter, then check the file against PyTorch.

Batch and sequence axes are dynamic. The check runs ONNX Runtime at shapes *other* than the export
example (the legacy exporter was seen to bake the example's sequence length into the graph), and fails
the stage when the largest absolute difference exceeds ``atol``. Weights are stored inside the file
(``external_data=False``) unless the model is over 2 GB, where ONNX requires a ``.onnx.data`` sidecar,
which then travels with the file and is counted in its size.

YAML:  {name: onnx, opset: 18, atol: 1.0e-4}
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import warnings
from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from potstill.hookspecs import hookimpl
from potstill.io import atomic_path
from potstill.runtime import compare, ort_callable, session
from potstill.techniques import Artifact, Context, Exporter, Options, Task

_TWO_GB = 2 * 1024**3
#: (batch, sequence) shapes compared with PyTorch, deliberately unlike the export example
DEFAULT_CHECK_SHAPES: list[tuple[int, int]] = [(3, 7), (5, 37)]


def export_onnx(model: nn.Module, task: Task, example: dict[str, torch.Tensor], path: Path, opset: int = 18) -> Path:
    """Write ``task.export_module(model)`` to ``path`` (atomically) with dynamic axes; return the path."""
    module = task.export_module(model).eval()
    inputs = task.export_inputs(example)
    dims: dict[str, torch.export.Dim] = {}
    dynamic_shapes = {}
    for input_name, axes in task.dynamic_axes().items():
        dynamic_shapes[input_name] = {axis: dims.setdefault(label, torch.export.Dim(label)) for axis, label in axes.items()}
    large = sum(p.numel() * p.element_size() for p in module.parameters()) > _TWO_GB
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.ExitStack() as cleanup:
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        # exported under its final name in a scratch folder: the file refers to its sidecar by name, and a
        # failed export leaves nothing (no half-written file or sidecar) next to the bundle
        scratch = tmp.with_name(tmp.name + ".d")
        scratch.mkdir()
        cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
        onnx_path = scratch / path.name
        torch.onnx.export(
            module,
            tuple(inputs.values()),
            str(onnx_path),
            input_names=list(inputs),
            output_names=[task.output_name()],
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            external_data=large,
            verbose=False,
        )
        onnx_path.replace(tmp)
        if large:
            sidecar = onnx_path.with_name(onnx_path.name + ".data")
            sidecar.replace(path.with_name(path.name + ".data"))
    return path


def check_batches(task: Task, ctx: Context, shapes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    """Held-out batches at the given (batch, sequence) shapes, for parity checks."""
    assert ctx.data is not None
    tokenizer = ctx.tokenizer
    batches = []
    for batch_size, seq_len in shapes:
        examples = [ctx.data.heldout[i % len(ctx.data.heldout)] for i in range(batch_size)]
        batches.append(task.collate(examples, tokenizer, pad_to=seq_len))
    return batches


@torch.no_grad()
def parity(path: Path, model: nn.Module, task: Task, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Worst-case difference between ONNX Runtime and PyTorch over ``batches``."""
    run = ort_callable(session(path))
    module = task.export_module(model).eval()
    worst = {"max_abs_diff": 0.0, "min_cosine": 1.0}
    for batch in batches:
        reference = module(*task.export_inputs(batch).values())
        result = compare(reference, run(batch))
        worst["max_abs_diff"] = max(worst["max_abs_diff"], result["max_abs_diff"])
        worst["min_cosine"] = min(worst["min_cosine"], result["min_cosine"])
    return worst


class OnnxExporter(Exporter):
    name = "onnx"
    requires = {"onnx": "potstill[onnx]", "onnxscript": "potstill[onnx]", "onnxruntime": "potstill[onnx]"}

    class Options(Options):
        opset: int = Field(18, ge=17, le=23)
        atol: float = Field(1e-4, gt=0, description="largest allowed |onnx - torch| at the check shapes (fp32)")
        filename: str = Field("model.onnx", pattern=r"^[\w.-]+\.onnx$")
        export_shape: tuple[int, int] = Field((2, 16), description="(batch, sequence) of the export example")
        check_shapes: list[tuple[int, int]] = Field(default_factory=lambda: list(DEFAULT_CHECK_SHAPES),
                                                    description="(batch, sequence) shapes compared with PyTorch")

    def export(self, model: nn.Module, ctx: Context, filename: str | None = None) -> list[Artifact]:
        task = ctx.task
        example = check_batches(task, ctx, [tuple(self.options.export_shape)])[0]
        path = export_onnx(model, task, example, ctx.out / (filename or self.options.filename), self.options.opset)
        result = parity(path, model, task, check_batches(task, ctx, [tuple(s) for s in self.options.check_shapes]))
        result["shapes"] = [list(s) for s in self.options.check_shapes]
        result["atol"] = self.options.atol
        result["passed"] = result["max_abs_diff"] <= self.options.atol
        if not result["passed"]:
            raise RuntimeError(
                f"export.onnx: {path.name} differs from PyTorch by {result['max_abs_diff']:.3g} "
                f"(> atol {self.options.atol}) at shapes {result['shapes']}"
            )
        return [Artifact(path=path, kind="onnx-fp32", parity=result)]


@hookimpl
def register_exporters(register):
    register(OnnxExporter)
