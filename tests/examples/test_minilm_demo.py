"""The README's demo spec, on the real bundled MiniLM, shortened to a few steps: every stage runs."""

from __future__ import annotations

import json
from pathlib import Path

import potstill

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "minilm_l3.yaml"


def test_demo_spec_runs_end_to_end_on_the_real_model(tmp_path, minilm_path):
    report = potstill.run(DEMO, out=tmp_path / "demo", progress=False,
                          overrides=["stages[2].distill.steps=3", "measure.repeats=3", "measure.heldout_batches=2"])
    assert [s["stage"] for s in report.stages] == ["student", "prune", "distill", "quantize", "export"]
    kinds = [a["kind"] for a in report.artifacts]
    assert kinds == ["onnx-fp32", "onnx-int8-dynamic"]
    teacher, int8 = report.teacher, report.artifacts[-1]
    assert teacher["parameters"] > int8["parameters"]  # 6 layers -> 3
    assert int8["bytes"] * 3 < teacher["bytes"]  # fewer layers and int8 weights
    assert int8["parity"]["min_cosine"] > 0.9  # the int8 file still computes the student
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["artifacts"][-1]["path"] == "model.int8.onnx"
