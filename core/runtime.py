"""Running and timing artifacts in ONNX Runtime (one thread, warm-up, median), and checking parity."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def session(path: Path | str, threads: int = 1, providers: list[str] | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def measurable(path: Path | str, runtime: str) -> bool:
    """Whether potstill can run an artifact here: an ONNX file for ONNX Runtime (not, say, a TensorRT plan)."""
    return runtime.startswith("onnxruntime") and Path(path).suffix == ".onnx"


def ort_callable(sess: Any) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    names = [i.name for i in sess.get_inputs()]

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        feed = {name: batch[name].numpy() for name in names}
        return torch.from_numpy(np.asarray(sess.run(None, feed)[0]))

    return run


def median_ms(fn: Callable[[], Any], warmup: int = 5, repeats: int = 30) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def ort_latency_ms(path: Path | str, inputs: dict[str, torch.Tensor], threads: int = 1, warmup: int = 5,
                   repeats: int = 30, providers: list[str] | None = None) -> float:
    sess = session(path, threads, providers)
    feed = {i.name: inputs[i.name].numpy() for i in sess.get_inputs()}
    return median_ms(lambda: sess.run(None, feed), warmup, repeats)


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    reference, candidate = reference.double(), candidate.double()
    cosine = torch.nn.functional.cosine_similarity(reference.flatten(1), candidate.flatten(1), dim=-1)
    return {"max_abs_diff": float((reference - candidate).abs().max()), "min_cosine": float(cosine.min())}


def onnx_bytes(path: Path | str) -> int:
    """Size of an ONNX model including an external-data sidecar, if any."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".data")
    return path.stat().st_size + (sidecar.stat().st_size if sidecar.exists() else 0)


def onnx_parameters(path: Path | str) -> int:
    """Number of weight elements stored in an ONNX model's initializers."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return int(sum(np.prod(init.dims) if len(init.dims) else 1 for init in model.graph.initializer))
