"""Deployment bundles (core/bundle.py, the manifest of core/report.py, `potstill verify | bench`).

A bundle must survive being handed over: every byte hash-checked, every artifact re-run against stored
PyTorch outputs and on fresh inputs, and a tampered artifact caught even when its hash was updated. One
tiny bundle is built per module; each test that changes it works on a copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from potstill import io
from potstill.bundle import INPUTS, OUTPUTS, bench, fp32_sibling, op_precision, random_inputs, verify
from potstill.cli import main
from potstill.pipeline import run

FILES = ["model.onnx", "model.int8.onnx", "teacher.onnx", INPUTS, OUTPUTS]


@pytest.fixture(scope="module")
def built(tiny_spec, tmp_path_factory):
    """A tiny bundle (student, int8 quantization, ONNX export), built once: (folder, report)."""
    out = tmp_path_factory.mktemp("bundle")
    spec = tiny_spec(stages=[
        {"student": {"name": "layer_drop", "keep": [0, 2]}},
        {"quantize": {"name": "ort_int8_dynamic"}},
        {"export": {"name": "onnx"}},
    ])
    return out, run(spec, out=out, progress=False)


@pytest.fixture
def bundle(built, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(built[0], copy, ignore=shutil.ignore_patterns("stages"))  # what ships: no stage cache
    return copy


def rehash(bundle: Path, name: str) -> None:
    """Make the manifest agree with a changed file, as a careful tamperer would."""
    manifest = io.read_json(bundle / "manifest.json")
    manifest["files"][name] = {"sha256": io.sha256(bundle / name), "bytes": (bundle / name).stat().st_size}
    io.write_json(bundle / "manifest.json", manifest)


def verify_cli(bundle: Path, capsys) -> tuple[int, list[str]]:
    code = main(["verify", str(bundle), "--seed", "0"])
    captured = capsys.readouterr()
    return code, (captured.out + captured.err).strip().splitlines()


# ------------------------------------------------------------------ the manifest


def test_manifest_lists_versions_opsets_checks_and_reference_data(built):
    out, report = built
    manifest = io.read_json(out / "manifest.json")
    assert {"potstill", "torch", "onnx", "onnxruntime"} <= set(manifest["versions"])
    for name in FILES:
        assert manifest["files"][name]["sha256"] == io.sha256(out / name)
    assert all(not Path(name).is_absolute() for name in manifest["files"])
    artifacts = {item["path"]: item for item in manifest["artifacts"]}
    assert set(artifacts) == {"teacher.onnx", "model.onnx", "model.int8.onnx"}
    import onnx

    for name, item in artifacts.items():
        declared = {o.domain: o.version for o in onnx.load(str(out / name), load_external_data=False).opset_import}
        assert item["opset"] == declared[""] and item["measurable"] is True and item["latency_ms"] > 0
        assert item["providers"] == ["CPUExecutionProvider"]
    fp32, int8 = artifacts["model.onnx"]["check"], artifacts["model.int8.onnx"]["check"]
    assert fp32["metric"] == "max_abs_diff" and fp32["atol"] == report.artifacts[0]["parity"]["atol"]
    assert fp32["measured"] <= fp32["atol"]
    assert int8["metric"] == "min_cosine" and int8["sibling"] == "model.onnx"
    assert 0.9 < int8["floor"] < int8["measured"] <= report.artifacts[1]["parity"]["min_cosine"] + 1e-9
    assert artifacts["teacher.onnx"]["check"]["reference"] == "teacher"
    # the stored inputs are at shapes unlike the export example (2, 16)
    shapes = {tuple(t.shape) for k, t in io.load_tensors(out / INPUTS).items() if k.endswith("input_ids")}
    assert len(shapes) == 3 and (2, 16) not in shapes


def test_report_counts_ops_by_precision(built):
    out, report = built
    fp32, int8 = report.artifacts
    assert int8["ops"]["int8"] > 0 and fp32["ops"]["int8"] == 0 and report.teacher["ops"]["int8"] == 0
    assert fp32["ops"]["fp32"] > 0 and fp32["ops"]["fp16"] == 0
    assert op_precision(out / "model.int8.onnx") == int8["ops"]
    assert "## Precision by op" in (out / "report.md").read_text()


def test_a_quantized_artifact_slower_than_fp32_gets_a_warning():
    from potstill.report import _note_slower_than_fp32
    from potstill.techniques import Context

    ctx = Context(seed=0, base_dir=Path("."), out=Path("."), task=None)  # type: ignore[arg-type]
    artifacts = [{"path": "model.onnx", "kind": "onnx-fp32", "runtime": "onnxruntime", "latency_ms": 1.0},
                 {"path": "model.int8.onnx", "kind": "onnx-int8-dynamic", "runtime": "onnxruntime", "latency_ms": 1.5},
                 {"path": "other.int8.onnx", "kind": "onnx-int8-dynamic", "runtime": "onnxruntime", "latency_ms": 0.5}]
    _note_slower_than_fp32(artifacts, ctx)
    assert len(ctx.notes) == 1
    assert ctx.notes[0].startswith("warning: model.int8.onnx is slower than its fp32 counterpart model.onnx")
    assert fp32_sibling("other.int8.onnx", "onnx-int8-dynamic", [(a["path"], a["kind"]) for a in artifacts]) == "model.onnx"


# ------------------------------------------------------------------ verify


def test_a_fresh_bundle_verifies(bundle, capsys):
    code, lines = verify_cli(bundle, capsys)
    assert code == 0, "\n".join(lines)
    for name in FILES:
        assert any(line.startswith("ok") and f"hash    {name}:" in line for line in lines), name
    for name in ("teacher.onnx", "model.onnx", "model.int8.onnx"):
        kinds = [line.split()[1] for line in lines if f" {name}:" in line and line.startswith("ok")]
        assert kinds.count("parity") == 1 and kinds.count("fresh") == 2, (name, lines)
    assert lines[-1].startswith("verify: ok")


def test_a_moved_bundle_still_verifies(bundle, tmp_path):
    moved = tmp_path / "elsewhere" / "deep" / "bundle"
    moved.parent.mkdir(parents=True)
    shutil.move(str(bundle), str(moved))
    result = verify(moved, seed=1)
    assert result.ok, [c.line() for c in result.failed]


@pytest.mark.parametrize("name", ["model.int8.onnx", INPUTS, "report.json"])
def test_one_flipped_byte_fails_and_names_the_file(bundle, capsys, name):
    data = bytearray((bundle / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / name).write_bytes(bytes(data))
    code, lines = verify_cli(bundle, capsys)
    assert code == 1
    failed = [line for line in lines if line.startswith("FAIL")]
    assert failed and all(f" {name}: " in line for line in failed), failed
    assert "sha256 differs" in failed[0]
    assert name in lines[-1]


def test_a_truncated_file_fails_and_names_the_file(bundle, capsys):
    path = bundle / "model.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    code, lines = verify_cli(bundle, capsys)
    assert code == 1
    failed = [line for line in lines if line.startswith("FAIL")]
    assert failed[0].startswith("FAIL  hash    model.onnx: ") and "truncated" in failed[0]


def test_a_swapped_model_with_a_good_hash_fails_parity(bundle, capsys):
    """The int8 model replaced by an fp32 student of another seed: hashes agree, only parity can tell."""
    from transformers import BertConfig, BertModel

    from potstill.exporters.onnx import export_onnx
    from potstill.plugins.tasks.sentence_embedding import SentenceEmbedding

    torch.manual_seed(7)
    other = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=128)).eval()
    example = {name: t for name, t in io.load_tensors(bundle / INPUTS).items() if name.startswith("0/")}
    example = {name.split("/", 1)[1]: t for name, t in example.items()}
    export_onnx(other, SentenceEmbedding(max_length=32), example, bundle / "model.int8.onnx")
    rehash(bundle, "model.int8.onnx")

    code, lines = verify_cli(bundle, capsys)
    assert code == 1
    failed = [line for line in lines if line.startswith("FAIL")]
    assert failed and all(" model.int8.onnx: " in line for line in failed), failed
    assert {line.split()[1] for line in failed} == {"parity", "fresh"}
    assert not any(line.startswith("FAIL  hash") for line in lines)


def test_an_unmeasurable_artifact_is_hash_checked_and_not_run(bundle, capsys):
    plan = bundle / "engine"
    plan.mkdir()
    (plan / "build.sh").write_text("trtexec --onnx=../model.onnx\n")
    manifest = io.read_json(bundle / "manifest.json")
    manifest["artifacts"].append({"path": "engine", "kind": "tensorrt-plan", "runtime": "tensorrt", "measurable": False})
    io.write_json(bundle / "manifest.json", manifest)
    rehash(bundle, "engine/build.sh")
    code, lines = verify_cli(bundle, capsys)
    assert code == 0
    assert "skip  run     engine: not run here: tensorrt (hash-checked only)" in lines
    assert any(line.startswith("ok    hash    engine/build.sh:") for line in lines)


def test_random_inputs_take_new_shapes_and_valid_values(built):
    import random

    stored = [{"input_ids": torch.randint(0, 100, (3, 11)), "attention_mask": torch.ones(3, 11, dtype=torch.long)},
              {"input_ids": torch.randint(0, 100, (5, 29)), "attention_mask": torch.ones(5, 29, dtype=torch.long)}]
    axes = {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    for seed in range(5):
        batch = random_inputs(stored, axes, random.Random(seed), vocab_size=50)
        shape = tuple(batch["input_ids"].shape)
        assert shape == tuple(batch["attention_mask"].shape) and shape not in {(3, 11), (5, 29)}
        assert shape[0] not in {3, 5} and shape[1] not in {11, 29} and shape[1] <= 29
        assert int(batch["input_ids"].max()) < 50 and bool((batch["attention_mask"][:, 0] == 1).all())


# ------------------------------------------------------------------ bench and errors


def test_bench_prints_a_table_and_a_json_line_with_every_artifact(bundle, capsys):
    code = main(["bench", str(bundle), "--batch", "2", "--seq", "8", "--warmup", "1", "--repeats", "5"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])["bench"]
    assert result["batch_shape"] == [2, 8] and result["repeats"] == 5
    assert set(result["artifacts"]) == {"teacher.onnx", "model.onnx", "model.int8.onnx"}
    for item in result["artifacts"].values():
        assert 0 < item["p10_ms"] <= item["median_ms"] <= item["p90_ms"]
    assert result["artifacts"]["teacher.onnx"]["speedup_vs_teacher"] == 1.0
    assert any(line.startswith("model.int8.onnx") for line in lines[:-1])


def test_bench_api_defaults_to_the_runs_measurement(bundle):
    result = bench(bundle, repeats=3, warmup=0)
    assert result["batch_shape"] == [4, 16] and result["threads"] == 1


@pytest.mark.parametrize("command", ["verify", "bench"])
def test_a_missing_bundle_or_manifest_is_one_line_and_exit_2(tmp_path, capsys, command):
    assert main([command, str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "nowhere: no such folder" in err
    assert main([command, str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'manifest.json'}: not found" in err


def test_a_corrupt_manifest_is_one_line_and_exit_2(bundle, capsys):
    (bundle / "manifest.json").write_text("{not json")
    assert main(["verify", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "manifest.json: not valid JSON" in err


def test_op_precision_counts_fp16_ops(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT), helper.make_node("Neg", ["y"], ["z"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "half.onnx"))
    assert op_precision(tmp_path / "half.onnx") == {"int8": 0, "fp16": 3, "fp32": 1}
