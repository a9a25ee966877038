"""TensorRT exporter: without tensorrt (CI) a complete build plan whose ONNX really runs; with tensorrt and a
GPU an engine that matches PyTorch (skipped here: "tensorrt not importable")."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import potstill.exporters.tensorrt as trt_exporter
from potstill.exporters.tensorrt import (TensorRTExporter, build_engine, count_ops, foldable_nodes, make_trt_ready,
                                         trtexec_command)
from potstill.techniques import Artifact, Context, Dataset, LoadedModel

OPTIONS = {"precision": "fp16", "min_shape": (1, 4), "opt_shape": (4, 24), "max_shape": (8, 48)}


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    from potstill.plugins.data.text_lines import bundled_sentences

    return list(bundled_sentences())


def text_context(folder: Path, tokenizer, sentences, model) -> Context:
    from potstill.plugins.tasks.sentence_embedding import SentenceEmbedding

    return Context(seed=0, base_dir=folder, out=folder / "out", task=SentenceEmbedding(max_length=64),
                   data=Dataset(train=sentences[64:128], heldout=sentences[:64]), teacher=LoadedModel(model, tokenizer),
                   progress=False, spec_hash="abc123")


@pytest.fixture(scope="module")
def planned(tmp_path_factory, tokenizer, sentences):
    """The exporter run on a tiny BERT where tensorrt cannot build (forced, so this holds on a GPU machine too)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=128)).eval()
    ctx = text_context(tmp_path_factory.mktemp("trt"), tokenizer, sentences, model)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trt_exporter, "why_no_engine", lambda: "tensorrt not importable")
        artifacts = TensorRTExporter(**OPTIONS).export(model, ctx)
    return model, ctx, artifacts


def test_plan_is_written_with_every_file(planned):
    _, ctx, artifacts = planned
    onnx_artifact, plan_artifact = artifacts
    plan_dir = ctx.out / "tensorrt"
    assert sorted(os.listdir(plan_dir)) == ["build_engine.sh", "model.trt.onnx", "plan.json", "profiles.json"]
    assert [p for p in os.listdir(ctx.out) if p != "tensorrt"] == []  # no scratch folders left behind
    assert onnx_artifact.path == plan_dir / "model.trt.onnx" and onnx_artifact.kind == "onnx-trt-ready"
    assert onnx_artifact.runtime == "onnxruntime" and onnx_artifact.measurable and onnx_artifact.parity["passed"]
    assert plan_artifact.path == plan_dir and plan_artifact.kind == "tensorrt-plan" and plan_artifact.runtime == "tensorrt"
    assert not plan_artifact.measurable
    assert any("tensorrt not importable" in note for note in plan_artifact.notes)
    plan = json.loads((plan_dir / "plan.json").read_text())
    assert plan["engine_built"] is False and plan["reason"] == "tensorrt not importable"
    assert plan["precision"] == "fp16" and plan["builder_flags"] == ["FP16"] and plan["spec_hash"] == "abc123"
    assert plan["onnx"] == "model.trt.onnx" and plan["inputs"] == ["input_ids", "attention_mask"]


def test_profiles_follow_the_options_and_the_task_axes(planned):
    _, ctx, _ = planned
    profiles = json.loads((ctx.out / "tensorrt" / "profiles.json").read_text())
    assert set(profiles) == set(ctx.task.dynamic_axes()) == {"input_ids", "attention_mask"}
    for shapes in profiles.values():
        assert shapes == {"min": [1, 4], "opt": [4, 24], "max": [8, 48]}
        assert all(low <= opt <= high for low, opt, high in zip(shapes["min"], shapes["opt"], shapes["max"]))


def test_profiles_of_a_task_without_a_sequence_axis_keep_static_dims(tmp_path):
    from potstill.exporters.onnx import export_onnx
    from potstill.plugins.tasks.classification import Classification

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    task = Classification()
    path = export_onnx(model, task, {"x": torch.randn(2, 64)}, tmp_path / "mlp.onnx")
    profiles = trt_exporter.input_profiles(path, task, (1, 4), (8, 64), (32, 128))
    assert profiles == {"x": {"min": [1, 64], "opt": [8, 64], "max": [32, 64]}}


def test_trtexec_line_has_the_shapes_and_the_precision_flag(planned):
    _, ctx, _ = planned
    plan_dir = ctx.out / "tensorrt"
    plan = json.loads((plan_dir / "plan.json").read_text())
    command = shlex.split(plan["trtexec"])
    assert command[0] == "trtexec" and "--onnx=model.trt.onnx" in command
    assert "--minShapes=input_ids:1x4,attention_mask:1x4" in command
    assert "--optShapes=input_ids:4x24,attention_mask:4x24" in command
    assert "--maxShapes=input_ids:8x48,attention_mask:8x48" in command
    assert "--fp16" in command and "--int8" not in command
    assert "--saveEngine=model.engine" in command and "--timingCacheFile=timing.cache" in command
    script = (plan_dir / "build_engine.sh").read_text()
    assert script.startswith("#!/bin/sh") and plan["trtexec"] in script.splitlines()
    assert os.access(plan_dir / "build_engine.sh", os.X_OK)


@pytest.mark.parametrize("precision,flags", [("fp32", []), ("fp16", ["--fp16"]), ("int8", ["--int8", "--fp16"]),
                                             ("fp8", ["--fp8", "--fp16"])])
def test_precision_flags(precision, flags):
    plan = {"onnx": "m.onnx", "engine": "m.engine", "precision": precision, "workspace_gb": 2, "timing_cache": "t.cache"}
    command = trtexec_command(plan, {"x": {"min": [1, 64], "opt": [2, 64], "max": [4, 64]}})
    assert [c for c in command if c in ("--fp16", "--int8", "--fp8")] == flags
    assert "--memPoolSize=workspace:2048" in command and "--optShapes=x:2x64" in command


def test_trt_ready_onnx_is_folded_and_matches_pytorch_at_other_shapes(planned, sentences, tokenizer, assert_matches_pytorch):
    import onnx

    model, ctx, (onnx_artifact, _) = planned
    folding = json.loads((ctx.out / "tensorrt" / "plan.json").read_text())["folding"]
    assert folding["foldable_after"] <= folding["foldable_before"] and folding["foldable_after"] == 0
    assert folding["nodes_after"] <= folding["nodes_before"]
    assert foldable_nodes(onnx.load(str(onnx_artifact.path))) == 0
    # checked independently of the exporter, at shapes unlike the export example (2, 16) and the profile corners
    assert_matches_pytorch(onnx_artifact.path, model, ctx.task, sentences, tokenizer, [(1, 5), (3, 23), (7, 41)])


def test_folding_removes_constant_subgraphs(tmp_path):
    """A graph with a foldable chain (Constant -> Add -> Mul feeding a MatMul) loses it and computes the same."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "weight")
    nodes = [
        helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.ones((4, 3), np.float32))),
        helper.make_node("Add", ["weight", "one"], ["shifted"]),
        helper.make_node("Mul", ["shifted", "shifted"], ["squared"]),
        helper.make_node("MatMul", ["x", "squared"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [weight])
    source = tmp_path / "chain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(source))
    counts = make_trt_ready(source, tmp_path / "chain.trt.onnx")
    assert counts["foldable_before"] == 3 and counts["foldable_after"] == 0 and counts["nodes_after"] == 1
    x = rng.standard_normal((5, 4)).astype(np.float32)
    before = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    after = ort.InferenceSession(str(tmp_path / "chain.trt.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-6)


@pytest.fixture(scope="module")
def qdq_mlp(tmp_path_factory):
    """A tiny MLP on digits, its fp32 ONNX, and a static Q/DQ int8 version (onnxruntime.quantization)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from potstill.exporters.onnx import export_onnx
    from potstill.plugins.data.sklearn_digits import SklearnDigits
    from potstill.plugins.tasks.classification import Classification

    folder = tmp_path_factory.mktemp("qdq")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    task = Classification()
    data = SklearnDigits().load(None)
    fp32 = export_onnx(model, task, task.collate(data.heldout[:2]), folder / "mlp.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": task.collate(data.train[i:i + 8])["x"].numpy()} for i in range(0, 64, 8)])

        def get_next(self):
            return next(self.batches, None)

    qdq = folder / "mlp.qdq.onnx"
    quantize_static(str(fp32), str(qdq), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8)
    return model, task, data, folder, fp32, qdq


def test_qdq_graph_keeps_its_quantize_dequantize_nodes(qdq_mlp):
    import onnx

    _, _, _, folder, _, qdq = qdq_mlp
    source = onnx.load(str(qdq))
    assert count_ops(source, ("QuantizeLinear",)) and count_ops(source, ("DequantizeLinear",))
    counts = make_trt_ready(qdq, folder / "mlp.qdq.trt.onnx")
    ready = onnx.load(str(folder / "mlp.qdq.trt.onnx"))
    for op in ("QuantizeLinear", "DequantizeLinear"):
        assert count_ops(ready, (op,)) == count_ops(source, (op,)), op
    assert counts["qdq_after"] == counts["qdq_before"] > 0


def test_int8_plan_is_built_from_the_runs_qdq_artifact(qdq_mlp, tmp_path, monkeypatch):
    model, task, data, _, _, qdq = qdq_mlp
    monkeypatch.setattr(trt_exporter, "why_no_engine", lambda: "no CUDA GPU")
    ctx = Context(seed=0, base_dir=tmp_path, out=tmp_path / "out", task=task, data=data, teacher=LoadedModel(model),
                  progress=False, artifacts=[Artifact(path=qdq, kind="onnx-int8-qdq")])
    onnx_artifact, plan_artifact = TensorRTExporter(precision="int8").export(model, ctx)
    plan = json.loads((plan_artifact.path / "plan.json").read_text())
    assert plan["reason"] == "no CUDA GPU" and plan["source"].endswith("(Q/DQ)")
    assert plan["folding"]["qdq_after"] == plan["folding"]["qdq_before"] > 0
    assert "--int8" in shlex.split(plan["trtexec"])
    assert plan["onnx_parity"]["passed"] and plan["onnx_parity"]["min_cosine"] >= 0.99
    assert "quantization error" in onnx_artifact.parity["reference"]


def test_options_are_checked():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="min_shape <= opt_shape <= max_shape"):
        TensorRTExporter(min_shape=(8, 4), opt_shape=(4, 64))
    with pytest.raises(ValidationError):
        TensorRTExporter(precision="int4")
    with pytest.raises(ValidationError):
        TensorRTExporter(workspace_gb=0)


def test_build_engine_without_tensorrt_prints_one_line_and_returns_2(planned, monkeypatch, capsys):
    _, ctx, _ = planned
    monkeypatch.setattr(trt_exporter, "tensorrt_importable", lambda: False)
    assert build_engine(ctx.out) == 2
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).strip().splitlines()
    assert len(lines) == 1 and "tensorrt not importable" in lines[0]
    plan = json.loads((ctx.out / "tensorrt" / "plan.json").read_text())
    assert plan["trtexec"] in lines[0]
    assert not (ctx.out / "tensorrt" / "model.engine").exists()


def test_build_engine_without_a_plan_says_so(tmp_path, capsys):
    assert build_engine(tmp_path) == 2
    captured = capsys.readouterr()
    assert len((captured.out + captured.err).strip().splitlines()) == 1 and "no TensorRT plan" in captured.err


def test_pipeline_lists_the_plan_unmeasured_and_the_onnx_measured(tiny_spec, tmp_path, monkeypatch):
    import potstill

    monkeypatch.setattr(trt_exporter, "why_no_engine", lambda: "tensorrt not importable")
    spec = tiny_spec(stages=[{"student": {"name": "layer_drop", "keep": [0, 2]}},
                             {"export": {"name": "tensorrt", "opt_shape": [4, 16], "max_shape": [8, 32]}}])
    report = potstill.run(spec, out=tmp_path / "bundle", progress=False)
    saved = json.loads((tmp_path / "bundle" / "report.json").read_text())
    by_kind = {a["kind"]: a for a in saved["artifacts"]}
    assert set(by_kind) == {"onnx-trt-ready", "tensorrt-plan"} and len(report.artifacts) == 2
    assert by_kind["tensorrt-plan"]["path"] == "tensorrt" and by_kind["tensorrt-plan"]["latency_ms"] is None
    assert by_kind["tensorrt-plan"]["runtime"] == "tensorrt"
    assert by_kind["onnx-trt-ready"]["path"] == "tensorrt/model.trt.onnx"
    assert by_kind["onnx-trt-ready"]["latency_ms"] > 0 and by_kind["onnx-trt-ready"]["quality"]["mean_cosine"] > 0.99
    assert any("tensorrt not importable" in note for note in saved["notes"])
    assert build_engine(tmp_path / "bundle") == 2


def test_engine_is_built_and_matches_pytorch(tmp_path, tokenizer, sentences):
    """Where tensorrt imports: on a GPU an engine that matches PyTorch, without one a plan saying so."""
    pytest.importorskip("tensorrt", reason="tensorrt not importable")
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=128)).eval()
    ctx = text_context(tmp_path, tokenizer, sentences, model)
    onnx_artifact, second = TensorRTExporter(**OPTIONS).export(model, ctx)
    plan = json.loads((ctx.out / "tensorrt" / "plan.json").read_text())
    if not torch.cuda.is_available():
        assert second.kind == "tensorrt-plan" and plan["reason"] == "no CUDA GPU"
        return
    assert second.kind == "tensorrt-engine-fp16" and Path(second.path).is_file() and second.parity["passed"]
    assert plan["engine_built"] and (ctx.out / "tensorrt" / "timing.cache").is_file()
    metadata = json.loads((ctx.out / "tensorrt" / "model.engine.json").read_text())
    assert metadata["precision"] == "fp16" and metadata["spec_hash"] == "abc123"
    assert build_engine(ctx.out) == 0  # rebuilds from the plan, reusing the timing cache
