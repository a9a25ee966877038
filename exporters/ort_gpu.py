"""ONNX for ONNX Runtime on the GPU (TensorRT or CUDA execution provider), with the providers it really got.

The file is the same dynamo export as the ``onnx`` exporter; what differs is the execution providers
the artifact is run, checked and measured with. ``onnxruntime-gpu`` does not fail when CUDA or TensorRT
libraries are missing: it silently runs on the CPU, and ``get_available_providers()`` still lists the
GPU providers. So the exporter opens a session with the requested providers, records what
``session.get_providers()`` says it actually uses, and warns (in the artifact's notes, the report and
a ``RuntimeWarning``) when none of the requested GPU providers is among them. The parity check runs
with those providers at shapes other than the export example.

Install ``potstill[gpu]`` *instead of* ``potstill[onnx]``: onnxruntime-gpu and onnxruntime share one folder.

YAML:  {name: ort_gpu, providers: [CUDAExecutionProvider, CPUExecutionProvider]}
"""

from __future__ import annotations

import warnings
from typing import Literal

from pydantic import Field, field_validator
from torch import nn

from potstill.hookspecs import hookimpl
from potstill.runtime import ort_callable, session
from potstill.techniques import Artifact, Context, Exporter, Options

Provider = Literal["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class OrtGpuExporter(Exporter):
    name = "ort_gpu"
    requires = {"onnx": "potstill[gpu]", "onnxscript": "potstill[gpu]", "onnxruntime": "potstill[gpu]"}

    class Options(Options):
        providers: list[Provider] = Field(
            default_factory=lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
            description="execution providers in order of preference (ONNX Runtime falls back along the list)")
        opset: int = Field(18, ge=17, le=23)
        # GPU kernels (TF32 matmuls on Ampere and later, other reduction orders) differ more from PyTorch's CPU
        # results than ONNX Runtime's CPU kernels do
        atol: float = Field(1e-3, gt=0, description="largest allowed |onnx - torch| at the check shapes")
        filename: str = Field("model.gpu.onnx", pattern=r"^[\w.-]+\.onnx$")
        export_shape: tuple[int, int] = Field((2, 16), description="(batch, sequence) of the export example")
        check_shapes: list[tuple[int, int]] = Field(default_factory=lambda: [(3, 7), (5, 37)],
                                                    description="(batch, sequence) shapes compared with PyTorch")

        @field_validator("providers")
        @classmethod
        def _distinct(cls, providers: list[str]) -> list[str]:
            if not providers or len(set(providers)) != len(providers):
                raise ValueError("list each provider once, at least one")
            return providers

    def export(self, model: nn.Module, ctx: Context) -> list[Artifact]:
        from potstill.exporters.onnx import check_batches, export_onnx, worst_difference

        options = self.options
        task = ctx.task
        example = check_batches(task, ctx, [tuple(options.export_shape)])[0]
        path = export_onnx(model, task, example, ctx.out / options.filename, options.opset)
        requested = list(options.providers)
        with warnings.catch_warnings():
            # onnxruntime warns once per missing provider; the note below says it once, with the fix
            warnings.simplefilter("ignore")
            sess = session(path, providers=requested)
        used = list(sess.get_providers())
        notes = [f"execution providers requested {requested}; the session used {used}."]
        wanted_gpu = [p for p in requested if p in GPU_PROVIDERS]
        if wanted_gpu and not any(p in used for p in wanted_gpu):
            warning = (f"warning: {path.name} asked for {', '.join(wanted_gpu)} but ONNX Runtime runs it on "
                       f"{', '.join(used)}: onnxruntime-gpu falls back to the CPU silently when the CUDA/TensorRT "
                       f"libraries or the GPU are missing, and the CPU-only onnxruntime package has no GPU providers "
                       f"(install potstill[gpu] instead of potstill[onnx]). Latency in the report is CPU latency.")
            notes.append(warning)
            ctx.note(warning)
            warnings.warn(warning, RuntimeWarning, stacklevel=2)

        shapes = [tuple(s) for s in options.check_shapes]
        # with the session's own providers, not parity()'s CPU session
        result = worst_difference(ort_callable(sess), model, task, check_batches(task, ctx, shapes))
        result.update(shapes=[list(s) for s in shapes], atol=options.atol, providers=used)
        result["passed"] = result["max_abs_diff"] <= options.atol
        if not result["passed"]:
            raise RuntimeError(f"export.ort_gpu: {path.name} on {used[0]} differs from PyTorch by "
                               f"{result['max_abs_diff']:.3g} (> atol {options.atol}) at shapes {result['shapes']}")
        return [Artifact(path=path, kind="onnx-fp32", runtime="onnxruntime-gpu", parity=result, notes=notes,
                         providers=used)]


@hookimpl
def register_exporters(register):
    register(OrtGpuExporter)
