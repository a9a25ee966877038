"""Optimum export: a Hugging Face model through optimum-onnx's ``main_export``, edited to compute the task's
output (mean-pooled sentence embeddings), checked against PyTorch at shapes unlike any export example;
a clear error for models that are not Hugging Face models and for a missing optimum-onnx."""

from __future__ import annotations

import os

import pytest
from torch import nn

pytest.importorskip("optimum.exporters.onnx", reason="install potstill[optimum]")

from potstill.exporters.optimum import NotAHuggingFaceModel, OptimumExporter  # noqa: E402
from potstill.runtime import session  # noqa: E402


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    from potstill.plugins.data.text_lines import bundled_sentences

    return list(bundled_sentences())


def _context(folder, model, tokenizer, sentences):
    from potstill.plugins.tasks.sentence_embedding import SentenceEmbedding
    from potstill.techniques import Context, Dataset, LoadedModel

    return Context(seed=0, base_dir=folder, out=folder / "out", task=SentenceEmbedding(max_length=64), spec_hash="hash-optimum",
                   data=Dataset(train=sentences[64:128], heldout=sentences[:64]), teacher=LoadedModel(model, tokenizer),
                   progress=False)


@pytest.fixture(scope="module")
def exported(tiny_teacher_dir, tokenizer, sentences, tmp_path_factory):
    """The tiny HF BERT teacher (tests/conftest.py) exported through Optimum."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_teacher_dir).eval()
    ctx = _context(tmp_path_factory.mktemp("optimum"), model, tokenizer, sentences)
    (artifact,) = OptimumExporter().export(model, ctx)
    return model, ctx, artifact


def test_tiny_hf_bert_passes_parity_at_other_shapes(exported, sentences, tokenizer, assert_matches_pytorch):
    model, ctx, artifact = exported
    assert artifact.kind == "onnx-fp32" and artifact.parity["passed"]
    assert artifact.parity["max_abs_diff"] <= 1e-4 and artifact.parity["shapes"] == [[3, 7], [5, 37]]
    assert_matches_pytorch(artifact.path, model, ctx.task, sentences, tokenizer, [(1, 5), (4, 23), (7, 61)])


def test_the_artifact_takes_the_tasks_inputs_and_gives_its_output(exported):
    """Usable in the same report as the onnx exporter's artifact: same inputs (no token_type_ids), same output."""
    _, ctx, artifact = exported
    sess = session(artifact.path)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in sess.get_outputs()] == [ctx.task.output_name()]
    for graph_input in sess.get_inputs():
        assert all(isinstance(d, str) for d in graph_input.shape)  # batch and sequence stay dynamic
    assert sorted(os.listdir(ctx.out)) == ["model.onnx"]  # nothing of Optimum's scratch folder is left


def test_metadata_props(exported):
    import onnx

    import potstill

    props = {p.key: p.value for p in onnx.load(str(exported[2].path)).metadata_props}
    assert props["potstill_version"] == potstill.__version__ and props["spec_hash"] == "hash-optimum"
    assert props["task"] == "sentence_embedding" and props["exporter"] == "optimum" and int(props["opset"]) >= 14


def test_a_model_that_is_not_a_hugging_face_model_names_the_fix(tokenizer, sentences, tmp_path):
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(tokenizer.vocab_size, 8)

        def forward(self, input_ids, attention_mask):
            return self.embed(input_ids)

    model = Plain()
    ctx = _context(tmp_path, model, tokenizer, sentences)
    with pytest.raises(NotAHuggingFaceModel, match=r"not a Hugging Face model .* use `export: \{name: onnx\}`"):
        OptimumExporter().export(model, ctx)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_missing_optimum_is_a_validation_error_with_the_pip_line(monkeypatch, tiny_spec):
    from potstill.errors import SpecError
    from potstill.spec import validate

    monkeypatch.setattr(OptimumExporter, "requires", {"optimum_not_installed_xyz.exporters.onnx": "potstill[optimum]"})
    with pytest.raises(SpecError) as raised:
        validate(tiny_spec(stages=[{"export": {"name": "optimum"}}]))
    assert raised.value.lines() == [
        "stages[0].export.name: exporter 'optimum' needs optimum_not_installed_xyz.exporters.onnx: "
        "pip install 'potstill[optimum]'"]
