"""ONNX Runtime dynamic int8: int8 weights make a Linear-dominated model ~4x smaller, the graph really runs
integer kernels, outputs stay close to fp32 at shapes unlike the export example, and per-channel weights
are at least as accurate as per-tensor ones on a real model."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from potstill.exporters.onnx import export_onnx
from potstill.plugins.quantizers.ort_int8_dynamic import OrtInt8Dynamic
from potstill.plugins.tasks.classification import Classification
from potstill.plugins.tasks.sentence_embedding import SentenceEmbedding
from potstill.runtime import onnx_bytes, ort_callable, session

INT8_OPS = {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm"}


def op_types(path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory):
    """A model whose size is all Linear weights (256·512 + 512·512 + 512·10 floats)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
    folder = tmp_path_factory.mktemp("mlp")
    task = Classification()
    example = {"x": torch.randn(2, 256), "labels": torch.zeros(2, dtype=torch.long)}
    return model, export_onnx(model, task, example, folder / "mlp.onnx")


def test_linear_dominated_model_is_at_least_three_times_smaller(mlp_onnx, tmp_path):
    _, source = mlp_onnx
    artifact = OrtInt8Dynamic().quantize_onnx(source, tmp_path / "mlp.int8.onnx")
    assert artifact.path == tmp_path / "mlp.int8.onnx" and artifact.kind == "onnx-int8-dynamic"
    assert onnx_bytes(source) >= 3 * onnx_bytes(artifact.path), (onnx_bytes(source), onnx_bytes(artifact.path))
    assert "MatMul" in op_types(source) or "Gemm" in op_types(source)
    assert op_types(artifact.path) & INT8_OPS, op_types(artifact.path)
    # written atomically: nothing but the artifact is left in the folder
    assert sorted(os.listdir(tmp_path)) == ["mlp.int8.onnx"]


def test_mlp_outputs_close_to_fp32_at_other_batch_sizes(mlp_onnx, tmp_path):
    model, source = mlp_onnx
    artifact = OrtInt8Dynamic().quantize_onnx(source, tmp_path / "mlp.int8.onnx")
    run = ort_callable(session(artifact.path))
    for batch_size in (1, 7, 33):
        x = torch.randn(batch_size, 256)
        with torch.no_grad():
            reference = model(x)
        candidate = run({"x": x})
        assert candidate.shape == reference.shape
        assert torch.nn.functional.cosine_similarity(reference, candidate, dim=-1).min() > 0.98


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory, tokenizer):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    # a small vocabulary so that the Linear layers, not the embedding table, hold most of the weights
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=256, max_position_embeddings=128)).eval()
    task = SentenceEmbedding(max_length=64)
    example = task.collate(["an export example of two by sixteen", "tokens"], tokenizer, pad_to=16)
    folder = tmp_path_factory.mktemp("bert")
    source = export_onnx(model, task, example, folder / "bert.onnx")
    artifact = OrtInt8Dynamic(per_channel=True).quantize_onnx(source, folder / "bert.int8.onnx")
    return model, task, artifact


@pytest.mark.parametrize("shape", [(3, 7), (5, 37), (1, 60)])
def test_bert_outputs_close_to_fp32_at_shapes_unlike_the_export(bert_onnx, tokenizer, sentences, shape):
    model, task, artifact = bert_onnx
    assert op_types(artifact.path) & INT8_OPS
    batch_size, seq_len = shape
    batch = task.collate(sentences[:batch_size], tokenizer, pad_to=seq_len)
    with torch.no_grad():
        reference = task.export_module(model)(batch["input_ids"], batch["attention_mask"])
    candidate = ort_callable(session(artifact.path))(batch)
    assert candidate.shape == reference.shape == (batch_size, 64)
    assert torch.nn.functional.cosine_similarity(reference, candidate, dim=-1).min() > 0.98


def test_per_channel_at_least_as_accurate_as_per_tensor_on_minilm(minilm_path, tokenizer, sentences, tmp_path):
    """Real MiniLM weights (one layer of it, to keep the test quick) have per-channel scale differences
    that one per-tensor scale cannot follow."""
    from transformers import AutoModel

    from potstill.plugins.students.layer_drop import LayerDrop

    model = LayerDrop(keep=[0]).build(AutoModel.from_pretrained(minilm_path).eval())
    task = SentenceEmbedding(max_length=64)
    source = export_onnx(model, task, task.collate(sentences[:2], tokenizer, pad_to=16), tmp_path / "minilm1.onnx")
    batch = task.collate(sentences[100:116], tokenizer)
    with torch.no_grad():
        reference = task.export_module(model)(batch["input_ids"], batch["attention_mask"])
    errors = {}
    for per_channel in (True, False):
        artifact = OrtInt8Dynamic(per_channel=per_channel).quantize_onnx(source, tmp_path / f"minilm1.{per_channel}.onnx")
        candidate = ort_callable(session(artifact.path))(batch)
        errors[per_channel] = float((candidate - reference).pow(2).mean() / reference.pow(2).mean())
    assert errors[True] <= errors[False], errors
    assert errors[True] < 0.05, errors


def test_failure_leaves_no_partial_file(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(Exception):
        OrtInt8Dynamic().quantize_onnx(broken, out / "broken.int8.onnx")
    assert os.listdir(out) == []


def test_uint8_weights(mlp_onnx, tmp_path):
    model, source = mlp_onnx
    artifact = OrtInt8Dynamic(weight_type="uint8", per_channel=False).quantize_onnx(source, tmp_path / "u8.onnx")
    x = torch.randn(4, 256)
    with torch.no_grad():
        reference = model(x)
    assert torch.nn.functional.cosine_similarity(reference, ort_callable(session(artifact.path))({"x": x}), dim=-1).min() > 0.95
    assert onnx_bytes(source) >= 3 * onnx_bytes(artifact.path)
