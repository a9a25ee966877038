"""TensorRT: a serialized engine where TensorRT and a CUDA GPU are present, else a build plan for one.

Both paths start from the same TensorRT-ready ONNX: the model exported with the dynamo exporter (or, for
``int8``/``fp8``, the latest Q/DQ ONNX artifact of the run), constant-folded and cleaned with
onnx-graphsurgeon (``fold_constants().cleanup().toposort()``), with every ``QuantizeLinear`` and
``DequantizeLinear`` kept: TensorRT fuses Q/DQ pairs into int8 kernels only when it sees them, so
folding them into plain weights would silently turn an int8 model into a float one. That ONNX is
checked against PyTorch in ONNX Runtime at the optimization profile's shapes (not the export example).

- With ``tensorrt`` importable and ``torch.cuda.is_available()``: the engine is built with the TensorRT
  Python API (one optimization profile, a timing cache reused across builds, fp16/int8/fp8 builder
  flags), run on the GPU at the check shapes, and compared with PyTorch.
- Otherwise (``pip install tensorrt`` needs NVIDIA's package index; CI has no GPU): ``<out>/tensorrt/``
  holds the TensorRT-ready ONNX, ``profiles.json``, ``build_engine.sh`` (the equivalent ``trtexec``
  line) and ``plan.json`` (flags, and why no engine was built). ``potstill build-engine BUNDLE`` or the
  script builds the engine later, on the GPU it will run on (engines are specific to the GPU model and
  the TensorRT version).

Profiles: every input axis the task marks ``batch`` takes the batch of ``min_shape``/``opt_shape``/
``max_shape``, every ``sequence`` axis their sequence length; other axes keep the exported size.

YAML:  {name: tensorrt, precision: fp16, opt_shape: [8, 64], max_shape: [32, 128]}
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from potstill import __version__, io
from potstill.hookspecs import hookimpl
from potstill.techniques import Artifact, Context, Exporter, Options, Task

PLAN_DIR = "tensorrt"
ONNX_NAME = "model.trt.onnx"
ENGINE_NAME = "model.engine"
TIMING_CACHE = "timing.cache"
PLAN_JSON = "plan.json"
PROFILES_JSON = "profiles.json"
SCRIPT = "build_engine.sh"

Q_DQ = ("QuantizeLinear", "DequantizeLinear")
#: quantized-operator (QOperator) formats ONNX Runtime writes; TensorRT parses Q/DQ graphs only
Q_OPERATORS = ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "QGemm",
               "QAttention", "DynamicQuantizeMatMul")
#: trtexec precision flags. Q/DQ graphs are explicitly quantized; layers without Q/DQ run in fp16
#: rather than fp32 (what ``--best`` would also allow), the usual choice for int8/fp8 deployment.
TRTEXEC_FLAGS: dict[str, list[str]] = {"fp32": [], "fp16": ["--fp16"], "int8": ["--int8", "--fp16"],
                                       "fp8": ["--fp8", "--fp16"]}
BUILDER_FLAGS: dict[str, list[str]] = {"fp32": [], "fp16": ["FP16"], "int8": ["INT8", "FP16"], "fp8": ["FP8", "FP16"]}


def tensorrt_importable() -> bool:
    try:
        return importlib.util.find_spec("tensorrt") is not None
    except (ImportError, ValueError):
        return False


def why_no_engine() -> str | None:
    """Why this machine cannot build and run an engine here, or None when it can."""
    if not tensorrt_importable():
        return "tensorrt not importable"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


# --------------------------------------------------------------------------------------------------
# the TensorRT-ready ONNX
# --------------------------------------------------------------------------------------------------


def foldable_nodes(model: Any) -> int:
    """Nodes whose value is known before any input arrives (Constant nodes and everything computed only from
    initializers and other such nodes), Q/DQ excepted: what constant folding would remove."""
    constant = {init.name for init in model.graph.initializer} | {""}
    count = 0
    for node in model.graph.node:
        if node.op_type == "Constant" or (node.input and all(name in constant for name in node.input)):
            constant.update(node.output)
            count += node.op_type not in Q_DQ
    return count


def count_ops(model: Any, ops: tuple[str, ...]) -> int:
    return sum(node.op_type in ops for node in model.graph.node)


def make_trt_ready(source: Path, destination: Path, passes: int = 4) -> dict[str, int]:
    """Constant-fold and clean ``source`` into ``destination``, keeping Q/DQ nodes; return node counts.

    Folding runs until the graph stops shrinking (shape inference between passes lets folded shapes
    fold further). A model with an external-data sidecar is written with one (``<name>.data``).
    """
    import onnx
    import onnx_graphsurgeon as gs

    model = onnx.load(str(source))
    before = {"nodes": len(model.graph.node), "foldable": foldable_nodes(model), "qdq": count_ops(model, Q_DQ)}
    large = source.with_name(source.name + ".data").exists()
    for _ in range(passes):
        graph = gs.import_onnx(model)
        # a Q/DQ pair on a weight is constant, and folding it would hand TensorRT plain float weights
        graph.fold_constants(should_exclude_node=lambda node: node.op in Q_DQ, error_ok=True).cleanup().toposort()
        folded = gs.export_onnx(graph)
        if not large:
            try:
                folded = onnx.shape_inference.infer_shapes(folded)
            except Exception:  # noqa: BLE001 - shape inference only helps the next pass; the graph is valid without it
                pass
        shrunk = len(folded.graph.node) < len(model.graph.node)
        model = folded
        if not shrunk:
            break
    destination.parent.mkdir(parents=True, exist_ok=True)
    if large:
        onnx.save(model, str(destination), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=destination.name + ".data")
    else:
        onnx.save(model, str(destination))
    onnx.checker.check_model(str(destination))
    return {"nodes_before": before["nodes"], "nodes_after": len(model.graph.node),
            "foldable_before": before["foldable"], "foldable_after": foldable_nodes(model),
            "qdq_before": before["qdq"], "qdq_after": count_ops(model, Q_DQ)}


def qdq_source(ctx: Context) -> Artifact | None:
    """The latest ONNX artifact of this run in Q/DQ format (what TensorRT can run in int8), if any."""
    import onnx

    for artifact in reversed(ctx.artifacts):
        if not artifact.measurable:
            continue
        model = onnx.load(str(artifact.path), load_external_data=False)
        if count_ops(model, Q_DQ) and not count_ops(model, Q_OPERATORS):
            return artifact
    return None


# --------------------------------------------------------------------------------------------------
# profiles and the trtexec line
# --------------------------------------------------------------------------------------------------


def input_profiles(onnx_path: Path, task: Task, min_shape: tuple[int, int], opt_shape: tuple[int, int],
                   max_shape: tuple[int, int]) -> dict[str, dict[str, list[int]]]:
    """``{input: {"min": shape, "opt": shape, "max": shape}}`` from the graph's inputs and the task's axes."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    axes = task.dynamic_axes()
    profiles: dict[str, dict[str, list[int]]] = {}
    for graph_input in graph.input:
        if graph_input.name in initializers:
            continue
        labels = axes.get(graph_input.name, {})
        shapes: dict[str, list[int]] = {"min": [], "opt": [], "max": []}
        for axis, dim in enumerate(graph_input.type.tensor_type.shape.dim):
            label = labels.get(axis)
            if label in ("batch", "sequence"):
                index = 0 if label == "batch" else 1
                for key, shape in (("min", min_shape), ("opt", opt_shape), ("max", max_shape)):
                    shapes[key].append(int(shape[index]))
            elif dim.dim_value > 0:
                for key in shapes:
                    shapes[key].append(int(dim.dim_value))
            else:
                raise ValueError(f"tensorrt: input {graph_input.name!r} axis {axis} is dynamic "
                                 f"({label or dim.dim_param!r}); only 'batch' and 'sequence' axes get profile shapes")
        profiles[graph_input.name] = shapes
    return profiles


def trtexec_command(plan: dict[str, Any], profiles: dict[str, dict[str, list[int]]]) -> list[str]:
    """The trtexec invocation equivalent to the Python API build (paths relative to the plan folder)."""

    def shapes(key: str) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in shape[key])}" for name, shape in profiles.items())

    command = ["trtexec", f"--onnx={plan['onnx']}"]
    if profiles:
        command += [f"--minShapes={shapes('min')}", f"--optShapes={shapes('opt')}", f"--maxShapes={shapes('max')}"]
    command += [f"--saveEngine={plan['engine']}", *TRTEXEC_FLAGS[plan["precision"]],
                f"--memPoolSize=workspace:{int(plan['workspace_gb'] * 1024)}",  # MiB, TensorRT 8.4 and later
                f"--timingCacheFile={plan['timing_cache']}"]
    return command


def _script(command: list[str]) -> str:
    return ("#!/bin/sh\n"
            "# Builds the TensorRT engine of this plan (written by potstill). Run it on the GPU the engine will run\n"
            "# on, with TensorRT's trtexec on PATH: an engine is specific to the GPU model and the TensorRT version.\n"
            "set -e\n"
            'cd "$(dirname "$0")"\n'
            f"{shlex.join(command)}\n")


# --------------------------------------------------------------------------------------------------
# the engine (TensorRT Python API; needs tensorrt and a CUDA GPU)
# --------------------------------------------------------------------------------------------------


def build_serialized_engine(plan_dir: Path, plan: dict[str, Any], profiles: dict[str, dict[str, list[int]]]) -> Path:
    """Build ``plan['engine']`` in ``plan_dir`` with the TensorRT Python API (8.6 or later); return its path.

    The timing cache is read from and written back to ``plan['timing_cache']``, so a rebuild (another
    precision, another profile) reuses the kernel timings already measured on this GPU.
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # explicit batch is the only mode (and the flag deprecated) in 10
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    onnx_path = plan_dir / plan["onnx"]
    if not parser.parse_from_file(str(onnx_path)):  # parse_from_file finds an external-data sidecar
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"tensorrt: the ONNX parser rejected {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(plan["workspace_gb"] * (1 << 30)))
    for flag in plan["builder_flags"]:
        if not hasattr(trt.BuilderFlag, flag):
            raise RuntimeError(f"tensorrt {trt.__version__} has no BuilderFlag.{flag} (precision {plan['precision']})")
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    for name, shapes in profiles.items():
        profile.set_shape(name, tuple(shapes["min"]), tuple(shapes["opt"]), tuple(shapes["max"]))
    config.add_optimization_profile(profile)
    cache_path = plan_dir / plan["timing_cache"]
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"tensorrt: building the engine from {onnx_path.name} failed (see TensorRT's log above)")
    engine_path = plan_dir / plan["engine"]
    with io.atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(memoryview(serialized)))
    with io.atomic_path(cache_path) as tmp:
        tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    device = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    # engines carry no user metadata: it goes next to the engine
    io.write_json(engine_path.with_name(engine_path.name + ".json"), {
        "potstill": __version__,
        "tensorrt": trt.__version__,
        "gpu": device.name if device is not None else None,
        "compute_capability": f"{device.major}.{device.minor}" if device is not None else None,
        "precision": plan["precision"],
        "builder_flags": plan["builder_flags"],
        "profiles": profiles,
        "onnx": plan["onnx"],
        "onnx_sha256": io.sha256(onnx_path),
        "spec_hash": plan.get("spec_hash", ""),
        "engine_sha256": io.sha256(engine_path),
    })
    return engine_path


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool}
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]


def engine_callable(engine_path: Path, output_name: str) -> Any:
    """``run(named CPU inputs) -> CPU output`` for a serialized engine (torch CUDA tensors as buffers)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise RuntimeError(f"tensorrt: could not deserialize {engine_path.name} (built for another GPU or TensorRT?)")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def run(feed: dict[str, torch.Tensor]) -> torch.Tensor:
        keep = []  # buffers must outlive the launch
        for name in inputs:
            tensor = feed[name].to("cuda", _torch_dtype(trt, engine.get_tensor_dtype(name))).contiguous()
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
            keep.append(tensor)
        results = {}
        for name in outputs:
            shape = tuple(context.get_tensor_shape(name))
            results[name] = torch.empty(shape, dtype=_torch_dtype(trt, engine.get_tensor_dtype(name)), device="cuda")
            context.set_tensor_address(name, results[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"tensorrt: executing {engine_path.name} failed")
        stream.synchronize()
        return results.get(output_name, results[outputs[0]]).float().cpu()

    return run


# --------------------------------------------------------------------------------------------------
# the exporter
# --------------------------------------------------------------------------------------------------


Shape = tuple[int, int]


class TensorRTExporter(Exporter):
    name = "tensorrt"
    # what the plan needs; tensorrt itself is imported only where it is installed (NVIDIA's index)
    requires = {"onnx": "potstill[onnx,tensorrt]", "onnxscript": "potstill[onnx,tensorrt]",
                "onnxruntime": "potstill[onnx,tensorrt]", "onnx_graphsurgeon": "potstill[onnx,tensorrt]"}

    class Options(Options):
        precision: Literal["fp32", "fp16", "int8", "fp8"] = Field(
            "fp16", description="fp16: builder flag; int8/fp8: explicit quantization from a Q/DQ graph (+fp16 elsewhere)")
        min_shape: tuple[int, int] = Field((1, 4), description="(batch, sequence) smallest the engine accepts")
        opt_shape: tuple[int, int] = Field((8, 64), description="(batch, sequence) the kernels are tuned for")
        max_shape: tuple[int, int] = Field((32, 128), description="(batch, sequence) largest the engine accepts")
        workspace_gb: float = Field(4.0, gt=0, description="TensorRT builder workspace limit (GiB)")
        atol: float = Field(1e-4, gt=0, description="largest allowed |onnx - torch| of the fp32 TensorRT-ready ONNX")
        min_cosine: float = Field(0.99, gt=0, le=1, description="smallest allowed cosine to PyTorch of a reduced-"
                                                                "precision engine or a Q/DQ graph (atol does not apply)")
        opset: int = Field(18, ge=17, le=23)
        export_shape: tuple[int, int] = Field((2, 16), description="(batch, sequence) of the export example")

        @model_validator(mode="after")
        def _ordered(self) -> "TensorRTExporter.Options":
            for axis, label in enumerate(("batch", "sequence")):
                low, opt, high = self.min_shape[axis], self.opt_shape[axis], self.max_shape[axis]
                if low < 1 or not low <= opt <= high:
                    raise ValueError(f"{label}: need 1 <= min_shape <= opt_shape <= max_shape, got {low}, {opt}, {high}")
            return self

    def check_shapes(self) -> list[Shape]:
        """The profile's corners and the default check shapes inside it, never the export example."""
        from potstill.exporters.onnx import DEFAULT_CHECK_SHAPES

        o = self.options
        shapes: list[Shape] = [tuple(o.min_shape), tuple(o.opt_shape), tuple(o.max_shape)]  # type: ignore[list-item]
        shapes += [s for s in DEFAULT_CHECK_SHAPES if all(o.min_shape[i] <= s[i] <= o.max_shape[i] for i in (0, 1))]
        unique: list[Shape] = []
        for shape in shapes:
            if shape not in unique and shape != tuple(o.export_shape):
                unique.append(shape)
        return unique

    def export(self, model: nn.Module, ctx: Context) -> list[Artifact]:
        from potstill.exporters.onnx import check_batches, export_onnx, parity

        options = self.options
        task = ctx.task
        reason = why_no_engine()
        final = ctx.out / PLAN_DIR
        ctx.out.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{PLAN_DIR}.", suffix=".tmp", dir=ctx.out))
        try:
            if (final / TIMING_CACHE).is_file():  # kernel timings measured on this machine stay valid
                shutil.copy2(final / TIMING_CACHE, work / TIMING_CACHE)
            qdq = qdq_source(ctx) if options.precision in ("int8", "fp8") else None
            notes: list[str] = []
            if qdq is not None:
                source, source_name = Path(qdq.path), f"{_relative(Path(qdq.path), ctx.out)} (Q/DQ)"
            else:
                example = check_batches(task, ctx, [tuple(options.export_shape)])[0]
                source = export_onnx(model, task, example, work / "exported.onnx", options.opset)
                source_name = "the PyTorch model (dynamo export)"
                if options.precision in ("int8", "fp8"):
                    notes.append(f"{options.precision}: no Q/DQ ONNX in this run, so the plan holds the float graph; "
                                 f"TensorRT then quantizes with placeholder scales (good for timing only). Put a Q/DQ "
                                 f"quantizer's export before this stage for real {options.precision} accuracy.")
            folding = make_trt_ready(source, work / ONNX_NAME)
            for leftover in (work / "exported.onnx", work / "exported.onnx.data"):
                leftover.unlink(missing_ok=True)

            shapes = self.check_shapes()
            try:
                batches = check_batches(task, ctx, shapes)
                onnx_parity = parity(work / ONNX_NAME, model, task, batches)
            except Exception as exc:  # noqa: BLE001 - most often a max_shape beyond the model's positions
                raise RuntimeError(f"export.tensorrt: the model does not run at the profile shapes {shapes}: {exc}") from exc
            onnx_parity.update(shapes=[list(s) for s in shapes], atol=options.atol, min_cosine_allowed=options.min_cosine)
            if qdq is not None:
                onnx_parity["reference"] = "the fp32 PyTorch model (quantization error included)"
                onnx_parity["passed"] = onnx_parity["min_cosine"] >= options.min_cosine
            else:
                onnx_parity["passed"] = onnx_parity["max_abs_diff"] <= options.atol
            if not onnx_parity["passed"]:
                raise RuntimeError(
                    f"export.tensorrt: {ONNX_NAME} differs from PyTorch (max |diff| {onnx_parity['max_abs_diff']:.3g}, "
                    f"min cosine {onnx_parity['min_cosine']:.6f}; atol {options.atol}, min_cosine {options.min_cosine}) "
                    f"at shapes {onnx_parity['shapes']}")

            profiles = input_profiles(work / ONNX_NAME, task, options.min_shape, options.opt_shape, options.max_shape)
            plan = {
                "potstill": __version__,
                "engine_built": False,
                "reason": reason,
                "precision": options.precision,
                "builder_flags": BUILDER_FLAGS[options.precision],
                "trtexec_flags": TRTEXEC_FLAGS[options.precision],
                "workspace_gb": options.workspace_gb,
                "onnx": ONNX_NAME,
                "source": source_name,
                "engine": ENGINE_NAME,
                "timing_cache": TIMING_CACHE,
                "profiles": PROFILES_JSON,
                "inputs": list(profiles),
                "output": task.output_name(),
                "task": task.name,
                "spec_hash": ctx.spec_hash,
                "folding": folding,
                "onnx_parity": onnx_parity,
            }
            command = trtexec_command(plan, profiles)
            plan["trtexec"] = shlex.join(command)
            io.write_json(work / PROFILES_JSON, profiles)
            io.write_text(work / SCRIPT, _script(command))
            os.chmod(work / SCRIPT, 0o755)

            engine_parity: dict[str, Any] | None = None
            if reason is None:
                build_serialized_engine(work, plan, profiles)
                engine_parity = _engine_parity(work / ENGINE_NAME, model, task, batches)
                engine_parity.update(shapes=[list(s) for s in shapes], atol=options.atol,
                                     min_cosine_allowed=options.min_cosine)
                engine_parity["passed"] = (engine_parity["max_abs_diff"] <= options.atol
                                           if options.precision == "fp32" and qdq is None
                                           else engine_parity["min_cosine"] >= options.min_cosine)
                plan.update(engine_built=True, engine_parity=engine_parity)
                if not engine_parity["passed"]:
                    raise RuntimeError(
                        f"export.tensorrt: {ENGINE_NAME} ({options.precision}) differs from PyTorch (max |diff| "
                        f"{engine_parity['max_abs_diff']:.3g}, min cosine {engine_parity['min_cosine']:.6f}) at shapes "
                        f"{engine_parity['shapes']}")
            io.write_json(work / PLAN_JSON, plan)
            _replace_folder(work, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)

        onnx_path = final / ONNX_NAME
        onnx_notes = [f"TensorRT-ready ONNX from {source_name}: constant-folded ({folding['nodes_before']} -> "
                      f"{folding['nodes_after']} nodes), {folding['qdq_after']} Q/DQ nodes kept; measured here in "
                      f"ONNX Runtime."]
        onnx_artifact = Artifact(path=onnx_path, kind="onnx-trt-ready", runtime="onnxruntime", parity=onnx_parity,
                                 notes=onnx_notes + notes)
        if reason is None:
            assert engine_parity is not None
            engine_notes = [f"TensorRT engine built with the Python API ({options.precision}); runs only on this GPU "
                            f"model with this TensorRT version. Not timed by the report (ONNX Runtime only)."]
            return [onnx_artifact, Artifact(path=final / ENGINE_NAME, kind=f"tensorrt-engine-{options.precision}",
                                            runtime="tensorrt", parity=engine_parity, notes=engine_notes + notes)]
        plan_notes = [f"TensorRT build plan, no engine: {reason}. Build it on the target GPU with "
                      f"`potstill build-engine <bundle>` or `sh {PLAN_DIR}/{SCRIPT}` ({plan['trtexec']})."]
        ctx.note(f"tensorrt: {reason}; wrote a build plan to {PLAN_DIR}/ instead of an engine.")
        return [onnx_artifact, Artifact(path=final, kind="tensorrt-plan", runtime="tensorrt", parity={},
                                        notes=plan_notes + notes)]


def _relative(path: Path, folder: Path) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def _replace_folder(new: Path, final: Path) -> None:
    """Put ``new`` at ``final`` (replacing an older plan) with renames, so no half-written plan is ever seen."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old.{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    new.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _engine_parity(engine_path: Path, model: nn.Module, task: Task, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    from potstill.exporters.onnx import worst_difference

    run = engine_callable(engine_path, task.output_name())
    return worst_difference(lambda batch: run(task.export_inputs(batch)), model, task, batches)


# --------------------------------------------------------------------------------------------------
# `potstill build-engine BUNDLE`
# --------------------------------------------------------------------------------------------------


def find_plan(bundle: Path) -> Path | None:
    """The plan folder of a bundle (or the plan folder itself, or its plan.json)."""
    bundle = Path(bundle)
    for candidate in (bundle / PLAN_DIR, bundle, bundle.parent if bundle.name == PLAN_JSON else None):
        if candidate is not None and (candidate / PLAN_JSON).is_file():
            return candidate
    return None


def build_engine(bundle: Path) -> int:
    """Build the TensorRT engine of a bundle's plan next to the plan; return an exit code.

    Prints one line: the engine written (0); or why it cannot be built here and the ``trtexec`` command to
    run instead (2: tensorrt not importable, no CUDA GPU, or no plan in the bundle); or why the build
    failed (1). Messages other than success go to stderr.
    """
    plan_dir = find_plan(Path(bundle))
    if plan_dir is None:
        print(f"potstill build-engine: no TensorRT plan in {bundle} (expected {PLAN_DIR}/{PLAN_JSON}; "
              f"run a spec whose stages end with '- export: {{name: tensorrt}}')", file=sys.stderr)
        return 2
    plan = io.read_json(plan_dir / PLAN_JSON)
    profiles = io.read_json(plan_dir / plan.get("profiles", PROFILES_JSON))
    command = f"cd {shlex.quote(str(plan_dir))} && {plan.get('trtexec') or shlex.join(trtexec_command(plan, profiles))}"
    if not tensorrt_importable():
        print(f"potstill build-engine: tensorrt not importable; run instead: {command}", file=sys.stderr)
        return 2
    try:
        engine = build_serialized_engine(plan_dir, plan, profiles)
    except Exception as exc:  # noqa: BLE001 - one line for the user; POTSTILL_DEBUG shows the traceback in the CLI
        if os.environ.get("POTSTILL_DEBUG"):
            raise
        if not torch.cuda.is_available():  # the builder needs a GPU; torch may just be a CPU build, so try first
            print(f"potstill build-engine: no CUDA GPU ({exc}); run on the target GPU instead: {command}", file=sys.stderr)
            return 2
        print(f"potstill build-engine: building the engine failed ({exc}); or run: {command}", file=sys.stderr)
        return 1
    print(f"potstill build-engine: wrote {engine}")
    return 0


@hookimpl
def register_exporters(register):
    register(TensorRTExporter)
