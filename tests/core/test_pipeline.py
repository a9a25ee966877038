"""Running a spec end to end (core/pipeline.py, core/report.py): the bundle, its report, and stage reuse.

One run of the fast tiny spec is shared by the module; tests that rerun it work on a copy of its bundle.
"""

from __future__ import annotations

import shutil
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml

from potstill import io
from potstill.pipeline import check, run

STAGE_KINDS = ["student", "loss", "pruner", "quantizer", "exporter"]
NO_SPEEDUP = "does not make ONNX Runtime on CPU faster"


@pytest.fixture(scope="module")
def first(tiny_spec, tmp_path_factory):
    """The tiny spec run once: (bundle folder, report, wall seconds)."""
    out = tmp_path_factory.mktemp("bundle")
    started = time.perf_counter()
    report = run(tiny_spec(), out=out, progress=False)
    return out, report, time.perf_counter() - started


@pytest.fixture
def bundle_copy(first, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(first[0], copy)
    return copy


def mtimes(folder: Path, *names: str) -> list[int]:
    return [(folder / name).stat().st_mtime_ns for name in names]


def distill_weights(out: Path) -> dict[str, torch.Tensor]:
    return io.load_tensors(out / "stages" / "1-distill" / "state.safetensors")


# ------------------------------------------------------------------ the bundle


def test_bundle_holds_every_file(first):
    out, report, _ = first
    for name in ["spec.yaml", "manifest.json", "report.json", "report.md", "report/quality_latency.png",
                 "model.onnx", "model.int8.onnx"]:
        assert (out / name).is_file(), f"{name} missing from the bundle"
    assert [p.name for p in sorted((out / "stages").iterdir()) if p.is_dir()] == [
        "0-student", "1-distill", "2-prune", "3-quantize", "4-export"]
    assert report.out == out


def test_spec_yaml_is_the_resolved_spec(first, tiny_spec):
    out, _, _ = first
    written = yaml.safe_load((out / "spec.yaml").read_text())
    assert written == check(tiny_spec()).resolved()
    assert written["stages"][2]["prune"]["scope"] == "global"  # a default, filled in
    assert check(written).prefix_hash(4) == check(tiny_spec()).prefix_hash(4)  # it runs as the same spec


def test_manifest_hashes_every_file_it_lists(first):
    out, _, _ = first
    manifest = io.read_json(out / "manifest.json")
    listed = set(manifest["files"])
    assert {"spec.yaml", "report.json", "report.md", "report/quality_latency.png", "model.onnx",
            "model.int8.onnx"} <= listed
    for name, entry in manifest["files"].items():
        assert io.sha256(out / name) == entry["sha256"], f"{name}: wrong sha256 in the manifest"
        assert (out / name).stat().st_size == entry["bytes"]
    # every file of the bundle outside the stage cache is listed
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*")
               if p.is_file() and "stages" not in p.relative_to(out).parts and not p.name.startswith(".")}
    assert on_disk - {"manifest.json"} == listed


def test_manifest_records_versions_seed_and_stage_timings(first):
    out, report, _ = first
    manifest = io.read_json(out / "manifest.json")
    for dist in ("onnx", "onnxruntime"):
        assert manifest["versions"][dist] == metadata.version(dist)
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["seed"] == 0 and manifest["name"] == "tiny"
    assert [stage["kind"] for stage in manifest["stages"]] == STAGE_KINDS
    assert [stage["seconds"] for stage in manifest["stages"]] == [stage["seconds"] for stage in report.stages]
    assert all(stage["seconds"] >= 0 for stage in manifest["stages"])


def test_report_json_has_stages_teacher_artifacts_and_measurement(first):
    out, report, _ = first
    data = io.read_json(out / "report.json")
    assert data == report.to_dict()

    assert [stage["kind"] for stage in data["stages"]] == STAGE_KINDS
    assert [stage["name"] for stage in data["stages"]] == [
        "layer_drop", "embedding_cosine+minilm_relations", "magnitude", "ort_int8_dynamic", "onnx"]
    assert all(isinstance(stage["seconds"], float) for stage in data["stages"])

    entries = [data["teacher"]] + data["artifacts"]
    assert [entry["path"] for entry in data["artifacts"]] == ["model.onnx", "model.int8.onnx"]
    for entry in entries:
        assert {"path", "parameters", "bytes", "latency_ms", "quality"} <= set(entry)
        assert (out / entry["path"]).stat().st_size == entry["bytes"]
        assert entry["latency_ms"] > 0
        assert set(entry["quality"]) >= {"mean_cosine", "spearman"}
    teacher, fp32, int8 = entries
    assert teacher["quality"]["mean_cosine"] == pytest.approx(1.0)
    assert fp32["parameters"] < teacher["parameters"]  # two of four layers dropped
    assert int8["bytes"] < fp32["bytes"] / 2.5
    assert fp32["size_ratio"] == round(teacher["bytes"] / fp32["bytes"], 3)

    measurement = data["measurement"]
    assert measurement["runtime"].startswith("onnxruntime ")
    assert measurement["threads"] == 1
    assert measurement["batch_shape"] == [4, 16]  # measure.batch_size x measure.seq_len of the spec
    assert measurement["repeats"] == 3 and measurement["warmup"] == 1


def test_every_artifact_was_checked_against_pytorch(first):
    _, report, _ = first
    fp32, int8 = report.artifacts
    assert fp32["parity"]["passed"] is True and fp32["parity"]["max_abs_diff"] <= fp32["parity"]["atol"]
    assert int8["parity"]["min_cosine"] > 0.99


def test_report_notes_that_unstructured_sparsity_is_not_faster_on_ort_cpu(first):
    out, report, _ = first
    assert any(NO_SPEEDUP in note for note in report["notes"])
    assert NO_SPEEDUP in (out / "report.md").read_text()
    assert report.stages[2]["record"]["sparsity"] == pytest.approx(0.3, abs=1e-3)


def test_report_md_has_the_table_plot_and_stages(first):
    out, report, _ = first
    text = (out / "report.md").read_text()
    assert text.startswith("# potstill report: tiny")
    assert "| model | artifact | params | size | latency | speed-up | mean_cosine |" in text
    assert "| teacher | teacher.onnx |" in text and "| student | model.int8.onnx |" in text
    assert "![quality against latency](report/quality_latency.png)" in text
    assert "batch shape [4, 16]" in text
    for index, stage in enumerate(report.stages):
        assert f"| {index} | {stage['stage']} | {stage['name']} |" in text


def test_plot_is_a_real_png(first):
    import matplotlib.image

    out, _, _ = first
    path = out / "report" / "quality_latency.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(path).shape
    assert height > 100 and width > 100


# ------------------------------------------------------------------ reuse


def test_rerun_reuses_every_stage_and_is_faster(first, bundle_copy, tiny_spec):
    _, first_report, first_seconds = first
    artifacts = ["model.onnx", "model.int8.onnx", "teacher.onnx", "stages/1-distill/state.safetensors"]
    before = mtimes(bundle_copy, *artifacts)

    started = time.perf_counter()
    report = run(tiny_spec(), out=bundle_copy, progress=False)
    seconds = time.perf_counter() - started

    assert [stage["cached"] for stage in report.stages] == [True] * 5
    assert [stage["seconds"] for stage in report.stages] == [stage["seconds"] for stage in first_report.stages]
    assert mtimes(bundle_copy, *artifacts) == before, "a reused stage rewrote its output"
    assert seconds < first_seconds
    assert [stage["cached"] for stage in io.read_json(bundle_copy / "manifest.json")["stages"]] == [True] * 5
    assert report.artifacts[1]["quality"] == first_report.artifacts[1]["quality"]


def test_changing_a_later_stage_recomputes_from_that_stage(first, bundle_copy, tiny_spec):
    spec = tiny_spec()
    spec["stages"][2]["prune"]["sparsity"] = 0.5
    distilled = mtimes(bundle_copy, "stages/0-student/state.safetensors", "stages/1-distill/state.safetensors")

    report = run(spec, out=bundle_copy, progress=False)

    assert [stage["cached"] for stage in report.stages] == [True, True, False, False, False]
    assert mtimes(bundle_copy, "stages/0-student/state.safetensors", "stages/1-distill/state.safetensors") == distilled
    assert report.stages[2]["record"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert io.sha256(bundle_copy / "model.onnx") != io.sha256(first[0] / "model.onnx")
    manifest = io.read_json(bundle_copy / "manifest.json")
    assert manifest["files"]["model.onnx"]["sha256"] == io.sha256(bundle_copy / "model.onnx")


def test_fresh_recomputes_every_stage_to_the_same_weights(first, bundle_copy, tiny_spec):
    report = run(tiny_spec(), out=bundle_copy, progress=False, fresh=True)
    assert [stage["cached"] for stage in report.stages] == [False] * 5
    # the run is deterministic: recomputing gives the weights the first run gave
    fresh, original = distill_weights(bundle_copy), distill_weights(first[0])
    assert all(torch.equal(fresh[name], original[name]) for name in original)


def test_a_removed_artifact_is_rebuilt(first, bundle_copy, tiny_spec):
    (bundle_copy / "model.int8.onnx").unlink()

    report = run(tiny_spec(), out=bundle_copy, progress=False)

    assert (bundle_copy / "model.int8.onnx").is_file()
    assert [stage["cached"] for stage in report.stages] == [True, True, True, True, False]
    recorded = io.read_json(bundle_copy / "stages" / "4-export" / "stage.json")["artifacts"]
    assert {item["path"]: item["sha256"] for item in recorded} == {
        name: io.sha256(bundle_copy / name) for name in ("model.onnx", "model.int8.onnx")}
    # and the next run reuses the rebuilt stage
    again = run(tiny_spec(), out=bundle_copy, progress=False)
    assert [stage["cached"] for stage in again.stages] == [True] * 5


def test_quantize_after_export_is_reused_too(tiny_spec, tmp_path):
    spec = tiny_spec(stages=[
        {"student": {"name": "layer_drop", "keep": [0, 2]}},
        {"export": {"name": "onnx"}},
        {"quantize": {"name": "ort_int8_dynamic"}},
    ], measure={"latency": False, "heldout_batches": 1, "batch_size": 4, "seq_len": 16})
    report = run(spec, out=tmp_path, progress=False)
    assert [a["path"] for a in report.artifacts] == ["model.onnx", "model.int8.onnx"]
    assert all(a["latency_ms"] is None for a in report.artifacts)  # measure.latency: false
    before = mtimes(tmp_path, "model.onnx", "model.int8.onnx")

    again = run(spec, out=tmp_path, progress=False)

    assert [stage["cached"] for stage in again.stages] == [True] * 3
    assert mtimes(tmp_path, "model.onnx", "model.int8.onnx") == before
    assert [a["path"] for a in again.artifacts] == ["model.onnx", "model.int8.onnx"]


def test_threads_apply_during_the_run_and_are_restored(tiny_spec, tmp_path, monkeypatch):
    import torch

    import potstill.train as train

    seen = []
    original = train.Distiller.run

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(train.Distiller, "run", spy)
    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1
    spec = tiny_spec(stages=[{"student": {"name": "layer_drop", "keep": [0]}},
                             {"distill": {"steps": 1, "batch_size": 4, "losses": [{"name": "embedding_cosine"}]}}],
                     threads=wanted, measure={"latency": False, "heldout_batches": 1, "batch_size": 4, "seq_len": 16})
    run(spec, out=tmp_path / "b", progress=False)
    assert seen == [wanted]
    assert torch.get_num_threads() == before
