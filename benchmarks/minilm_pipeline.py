"""Benchmark of the README demo: MiniLM-L6 teacher (fp32 ONNX) against the distilled, pruned, int8 student.

Runs ``examples/minilm_l3.yaml`` (reusing the bundle's cached stages if it ran before, unless --fresh),
then times both ONNX models side by side in this one process, interleaved, in ONNX Runtime with one
thread at batch 8 x seq 64, and prints the ratio and the quality kept. The last line is JSON.

    python benchmarks/minilm_pipeline.py [--out runs/bench-minilm] [--fresh] [--set PATH=VALUE ...]

Targets (issue 2): student >= 3x faster than the teacher, mean cosine >= 0.93 to the teacher's
embeddings on held-out sentences, the whole demo in about 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGET_SPEEDUP = 3.0
TARGET_COSINE = 0.93
TARGET_MINUTES = 15.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "examples" / "minilm_l3.yaml"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-minilm"))
    parser.add_argument("--fresh", action="store_true", help="recompute every stage")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds per model")
    args = parser.parse_args()

    import potstill
    from potstill import runtime
    from potstill.spec import load

    torch.set_num_threads(1)
    started = time.perf_counter()
    report = potstill.run(args.spec, out=args.out, overrides=args.overrides, fresh=args.fresh, progress=sys.stderr.isatty())
    pipeline_seconds = time.perf_counter() - started
    stage_seconds = sum(s["seconds"] for s in report.stages)

    # time both models again here, interleaved, so machine noise hits both alike
    out = Path(args.out)
    spec = load(args.spec, args.overrides)
    teacher_path = out / report.teacher["path"]
    student = next(a for a in report.artifacts if a["kind"].startswith("onnx-int8"))
    student_path = out / student["path"]
    from transformers import AutoTokenizer

    data = spec.data.load(None)  # the demo's held-out sentences (text_lines needs no context)
    tokenizer = AutoTokenizer.from_pretrained(spec.teacher.resolved_path())
    inputs = spec.task.benchmark_batch(data, tokenizer, 8, 64)
    sessions = {name: runtime.session(path, threads=1) for name, path in (("teacher", teacher_path), ("student", student_path))}
    feeds = {name: {i.name: inputs[i.name].numpy() for i in s.get_inputs()} for name, s in sessions.items()}
    times: dict[str, list[float]] = {"teacher": [], "student": []}
    for name, s in sessions.items():  # warm-up
        for _ in range(5):
            s.run(None, feeds[name])
    for _ in range(args.rounds):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[name])
            times[name].append((time.perf_counter() - t0) * 1000)
    teacher_ms = statistics.median(times["teacher"])
    student_ms = statistics.median(times["student"])
    speedup = teacher_ms / student_ms
    cosine = student["quality"]["mean_cosine"]
    print(f"teacher fp32 ONNX : {teacher_ms:8.2f} ms  ({teacher_path.name}, {report.teacher['bytes'] / 1e6:.1f} MB)")
    print(f"student int8 ONNX : {student_ms:8.2f} ms  ({student_path.name}, {student['bytes'] / 1e6:.1f} MB)")
    print(f"speedup           : {speedup:8.2f}x   (target >= {TARGET_SPEEDUP}x)")
    print(f"mean cosine       : {cosine:8.4f}   (target >= {TARGET_COSINE}); spearman {student['quality']['spearman']:.4f}")
    print(f"pipeline          : {stage_seconds / 60:8.1f} min of stages, {pipeline_seconds / 60:.1f} min this call")
    result = {
        "benchmark": "minilm_pipeline",
        "batch_shape": [8, 64],
        "threads": 1,
        "teacher_fp32_ms": round(teacher_ms, 3),
        "student_int8_ms": round(student_ms, 3),
        "speedup": round(speedup, 3),
        "mean_cosine": round(cosine, 4),
        "spearman": round(student["quality"]["spearman"], 4),
        "size_ratio": round(report.teacher["bytes"] / student["bytes"], 3),
        "stage_minutes": round(stage_seconds / 60, 2),
        "targets": {"speedup": TARGET_SPEEDUP, "mean_cosine": TARGET_COSINE, "stage_minutes": TARGET_MINUTES},
        "met": {"speedup": speedup >= TARGET_SPEEDUP, "mean_cosine": cosine >= TARGET_COSINE,
                "stage_minutes": stage_seconds / 60 <= TARGET_MINUTES},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
