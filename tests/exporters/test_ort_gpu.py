"""ONNX Runtime GPU exporter: the providers recorded are the ones the session really used, with a warning when
a requested GPU provider silently fell back to the CPU (always the case on CI, which has no GPU)."""

from __future__ import annotations

import pytest
import torch

from potstill.exporters.ort_gpu import GPU_PROVIDERS, OrtGpuExporter
from potstill.runtime import ort_callable, session
from potstill.techniques import Context, Dataset, LoadedModel


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    from potstill.plugins.data.text_lines import bundled_sentences

    return list(bundled_sentences())


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=128)).eval()


def context(folder, model, tokenizer, sentences) -> Context:
    from potstill.plugins.tasks.sentence_embedding import SentenceEmbedding

    return Context(seed=0, base_dir=folder, out=folder / "out", task=SentenceEmbedding(max_length=64),
                   data=Dataset(train=sentences[64:128], heldout=sentences[:64]), teacher=LoadedModel(model, tokenizer),
                   progress=False)


def test_records_the_providers_the_session_used_and_warns_on_fallback(tmp_path, model, tokenizer, sentences):
    import onnxruntime as ort

    ctx = context(tmp_path, model, tokenizer, sentences)
    gpu_here = any(p in ort.get_available_providers() for p in GPU_PROVIDERS) and torch.cuda.is_available()
    exporter = OrtGpuExporter()
    if gpu_here:
        (artifact,) = exporter.export(model, ctx)
        assert artifact.providers[0] in GPU_PROVIDERS
        assert not any(note.startswith("warning:") for note in artifact.notes)
    else:  # CI: the CPU onnxruntime lists no GPU provider; onnxruntime-gpu without CUDA falls back the same way
        with pytest.warns(RuntimeWarning, match="falls back to the CPU"):
            (artifact,) = exporter.export(model, ctx)
        assert artifact.providers == ["CPUExecutionProvider"]
        warnings = [note for note in artifact.notes if note.startswith("warning:")]
        assert len(warnings) == 1 and "TensorrtExecutionProvider, CUDAExecutionProvider" in warnings[0]
        assert warnings[0] in ctx.notes  # the report shows it too
    assert artifact.runtime == "onnxruntime-gpu" and artifact.measurable
    assert artifact.path == ctx.out / "model.gpu.onnx"
    assert artifact.parity["passed"] and artifact.parity["providers"] == artifact.providers
    assert artifact.parity["shapes"] == [[3, 7], [5, 37]]
    # the recorded providers are what a session given them really uses (what the report times with)
    assert session(artifact.path, providers=artifact.providers).get_providers() == artifact.providers
    batch = ctx.task.collate(sentences[200:204], tokenizer, pad_to=29)
    with torch.no_grad():
        reference = ctx.task.export_module(model)(batch["input_ids"], batch["attention_mask"])
    assert float((ort_callable(session(artifact.path))(batch) - reference).abs().max()) <= 1e-3


def test_cpu_only_request_does_not_warn(tmp_path, model, tokenizer, sentences, recwarn):
    ctx = context(tmp_path, model, tokenizer, sentences)
    (artifact,) = OrtGpuExporter(providers=["CPUExecutionProvider"], filename="cpu.onnx").export(model, ctx)
    assert artifact.providers == ["CPUExecutionProvider"] and not ctx.notes
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_options():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        OrtGpuExporter(providers=["ROCMExecutionProvider"])
    with pytest.raises(ValidationError):
        OrtGpuExporter(providers=[])
    with pytest.raises(ValidationError):
        OrtGpuExporter(providers=["CPUExecutionProvider", "CPUExecutionProvider"])
