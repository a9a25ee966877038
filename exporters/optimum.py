"""Export a Hugging Face model through Optimum's ONNX exporter (``optimum-onnx``), then check it against PyTorch.

For Hugging Face teachers and students (models with ``.config`` and ``save_pretrained``): the model and
the teacher's tokenizer are saved to a temporary folder and exported from there by
``optimum.exporters.onnx.main_export``, so the file is what Optimum's own users get (its opset default,
its dynamic axes, its graph). A model that is not a Hugging Face model is a clear error: use
``export: {name: onnx}``, which exports any ``nn.Module``.

What the artifact computes: Optimum exports the backbone (``feature-extraction``: token states,
``last_hidden_state``). So that the artifact computes the task's output and the report can measure it
beside every other artifact, the graph is then edited (with ``onnx.helper``, no new dependency):

- ``sentence_embedding``: mean pooling over the attention mask is appended (the same arithmetic as the
  task's ``mean_pool``), and the graph's only output is the pooled ``sentence_embedding``;
- an input the task does not feed (BERT's ``token_type_ids``) is replaced by zeros of ``input_ids``'s
  shape, which is what the model uses when it is not given.

The same parity check as the ``onnx`` exporter follows: ONNX Runtime against PyTorch at shapes other
than any export example, failing the stage above ``atol``. Optimum's own validation is switched off
(it would run the same comparison a second time, at its own shapes).

YAML:  {name: optimum, atol: 1.0e-4}
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from pydantic import Field
from torch import nn

from potstill.errors import PotstillError
from potstill.exporters.onnx import DEFAULT_CHECK_SHAPES, check_batches, parity, save_model, set_metadata, sidecar
from potstill.hookspecs import hookimpl
from potstill.io import atomic_path
from potstill.techniques import Artifact, Context, Exporter, Options, Task

#: potstill task -> (Optimum task, how its output becomes the task's output)
TASKS: dict[str, str] = {"sentence_embedding": "feature-extraction"}


class NotAHuggingFaceModel(PotstillError):
    """The optimum exporter got a model it cannot save as a Hugging Face folder."""


def is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and callable(getattr(model, "save_pretrained", None))


def add_mean_pooling(model: Any, hidden_name: str, mask_name: str, output_name: str) -> None:
    """Append ``sum(hidden * mask, seq) / max(sum(mask, seq), 1e-9)`` and make it the graph's only output."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    hidden = next(o for o in graph.output if o.name == hidden_name)
    elem_type = hidden.type.tensor_type.elem_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    prefix = "potstill_pool"
    graph.initializer.extend([
        numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{prefix}_axis_last"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), f"{prefix}_axis_seq"),
        numpy_helper.from_array(np.array(1e-9, dtype=dtype), f"{prefix}_eps"),
    ])
    graph.node.extend([
        helper.make_node("Cast", [mask_name], [f"{prefix}_mask"], to=elem_type),
        helper.make_node("Unsqueeze", [f"{prefix}_mask", f"{prefix}_axis_last"], [f"{prefix}_mask3"]),
        helper.make_node("Mul", [hidden_name, f"{prefix}_mask3"], [f"{prefix}_masked"]),
        helper.make_node("ReduceSum", [f"{prefix}_masked", f"{prefix}_axis_seq"], [f"{prefix}_sum"], keepdims=0),
        helper.make_node("ReduceSum", [f"{prefix}_mask3", f"{prefix}_axis_seq"], [f"{prefix}_count"], keepdims=0),
        helper.make_node("Max", [f"{prefix}_count", f"{prefix}_eps"], [f"{prefix}_count_safe"]),
        helper.make_node("Div", [f"{prefix}_sum", f"{prefix}_count_safe"], [output_name]),
    ])
    dims = hidden.type.tensor_type.shape.dim
    shape = [d.dim_param or d.dim_value for d in (dims[0], dims[-1])] if len(dims) == 3 else None
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(output_name, elem_type if elem_type else TensorProto.FLOAT, shape))


def zero_unfed_inputs(model: Any, fed: list[str], like: str) -> list[str]:
    """Replace graph inputs not in ``fed`` by int64 zeros shaped like input ``like``; return their names."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    unfed = [i for i in graph.input if i.name not in fed]
    for graph_input in unfed:
        zero = numpy_helper.from_array(np.array([0], dtype=np.int64))
        graph.node.insert(0, helper.make_node("ConstantOfShape", [f"potstill_{graph_input.name}_shape"], [graph_input.name],
                                              value=zero))
        graph.node.insert(0, helper.make_node("Shape", [like], [f"potstill_{graph_input.name}_shape"]))
        graph.input.remove(graph_input)
    return [i.name for i in unfed]


class OptimumExporter(Exporter):
    name = "optimum"
    requires = {"optimum.exporters.onnx": "potstill[optimum]", "onnx": "potstill[onnx]", "onnxruntime": "potstill[onnx]"}

    class Options(Options):
        opset: int | None = Field(None, ge=14, le=23, description="None: Optimum's default for the architecture")
        atol: float = Field(1e-4, gt=0, description="largest allowed |onnx - torch| at the check shapes (fp32)")
        filename: str = Field("model.onnx", pattern=r"^[\w.-]+\.onnx$")
        check_shapes: list[tuple[int, int]] = Field(default_factory=lambda: list(DEFAULT_CHECK_SHAPES),
                                                    description="(batch, sequence) shapes compared with PyTorch")

    def export(self, model: nn.Module, ctx: Context, filename: str | None = None) -> list[Artifact]:
        task = ctx.task
        if not is_hf_model(model):
            raise NotAHuggingFaceModel(
                f"export.optimum: the model ({type(model).__name__}) is not a Hugging Face model (it has no .config "
                f"and save_pretrained); use `export: {{name: onnx}}`, which exports any torch module")
        if task.name not in TASKS:
            raise PotstillError(f"export.optimum: task {task.name!r} is not supported (supported: {', '.join(TASKS)}); "
                                f"use `export: {{name: onnx}}`")
        final = ctx.out / (filename or self.options.filename)
        final.parent.mkdir(parents=True, exist_ok=True)
        shapes = [list(s) for s in self.options.check_shapes]
        scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".d", dir=final.parent))
        try:
            exported = self.optimum_export(model, ctx.tokenizer, scratch, TASKS[task.name])
            path = self.adapt(exported, task, scratch / "adapted" / final.name)
            result: dict[str, Any] = parity(path, model, task, check_batches(task, ctx, [tuple(s) for s in shapes]))
            result.update(shapes=shapes, atol=self.options.atol, passed=result["max_abs_diff"] <= self.options.atol)
            if not result["passed"]:
                raise RuntimeError(f"export.optimum: {final.name} differs from PyTorch by {result['max_abs_diff']:.3g} "
                                   f"(> atol {self.options.atol}) at shapes {shapes}")
            from potstill import __version__

            set_metadata(path, {"potstill_version": __version__, "spec_hash": ctx.spec_hash, "task": task.name,
                                "opset": str(self._opset(path)), "precision": "fp32", "exporter": "optimum"})
            if sidecar(path).exists():
                sidecar(path).replace(sidecar(final))
            with atomic_path(final) as tmp:
                path.replace(tmp)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        notes = ["exported by Optimum (feature-extraction) with mean pooling appended: outputs the sentence embedding"]
        return [Artifact(path=final, kind="onnx-fp32", parity=result, notes=notes)]

    def optimum_export(self, model: nn.Module, tokenizer: Any, scratch: Path, optimum_task: str) -> Path:
        """Save ``model`` (and ``tokenizer``) to a folder and run Optimum's ``main_export`` on it."""
        from optimum.exporters.onnx import main_export

        source, target = scratch / "hf", scratch / "optimum"
        model.save_pretrained(source)
        if tokenizer is not None:
            tokenizer.save_pretrained(source)
        quiet = [logging.getLogger(name) for name in ("optimum", "transformers", "torch.onnx")]
        levels = [logger.level for logger in quiet]
        try:
            for logger in quiet:
                logger.setLevel(logging.ERROR)
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                main_export(str(source), output=str(target), task=optimum_task, opset=self.options.opset,
                            device="cpu", do_validation=False, local_files_only=True, library_name="transformers")
        finally:
            for logger, level in zip(quiet, levels):
                logger.setLevel(level)
        return target / "model.onnx"

    def adapt(self, exported: Path, task: Task, destination: Path) -> Path:
        """Make the file take the task's inputs and compute its output (see the module docstring)."""
        import onnx

        # Optimum writes weights over 2 GB next to the file (``model.onnx_data``): load them, save ours our way
        external = any(item.name != exported.name and item.name.startswith(exported.name) for item in exported.parent.iterdir())
        model = onnx.load(str(exported))
        fed = list(task.dynamic_axes())
        zero_unfed_inputs(model, fed, like=fed[0])
        add_mean_pooling(model, "last_hidden_state", "attention_mask", task.output_name())
        if not external:
            onnx.checker.check_model(model)
        save_model(model, destination, external)
        return destination

    @staticmethod
    def _opset(path: Path) -> int:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@hookimpl
def register_exporters(register):
    register(OptimumExporter)
