"""Sentence embeddings: mean pooling over real tokens only, Spearman's rank correlation, and the quality
metrics of a candidate that equals the reference."""

from __future__ import annotations

import pytest
import torch

from potstill.plugins.tasks.sentence_embedding import SentenceEmbedding, embedding_quality, mean_pool, spearman


def test_mean_pool_ignores_padding():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    pooled = mean_pool(hidden, mask)
    torch.testing.assert_close(pooled[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))
    scribbled = hidden.clone()
    scribbled[0, 2:] = 1e6
    torch.testing.assert_close(mean_pool(scribbled, mask), pooled)


def test_embedding_of_a_sentence_does_not_depend_on_its_batch(tiny_bert, tokenizer):
    task = SentenceEmbedding(max_length=64)
    model = tiny_bert(seed=1)
    sentence = "Mean pooling counts real tokens only."
    with torch.no_grad():
        alone = task.forward(model, task.collate([sentence], tokenizer)).embeddings
        batch = task.collate([sentence, "A much longer neighbour sentence that forces padding onto the first one here."], tokenizer)
        assert (batch["attention_mask"][0] == 0).any()
        together = task.forward(model, batch).embeddings
        padded = task.forward(model, task.collate([sentence], tokenizer, pad_to=50)).embeddings
    torch.testing.assert_close(together[0], alone[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-6)


def test_collate_shapes_and_truncation(tokenizer):
    task = SentenceEmbedding(max_length=8)
    batch = task.collate(["one two three four five six seven eight nine ten eleven", "short"], tokenizer)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 8)
    assert batch["attention_mask"][1].sum() < 8
    assert task.collate(["short"], tokenizer, pad_to=12)["input_ids"].shape == (1, 12)
    with pytest.raises(ValueError, match="tokenizer"):
        task.collate(["no tokenizer"])


def test_export_module_computes_the_task_output(tiny_bert, tokenizer):
    task = SentenceEmbedding()
    model = tiny_bert()
    batch = task.collate(["an exported module", "takes ids and mask positionally"], tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(task.export_module(model)(*task.export_inputs(batch).values()), task.forward(model, batch).embeddings)
    assert list(task.export_inputs(batch)) == list(task.dynamic_axes()) == ["input_ids", "attention_mask"]


def test_spearman():
    a = torch.tensor([0.1, 0.5, 0.3, 0.9, -0.2])
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, a.exp() * 7 - 3) == pytest.approx(1.0)  # only ranks matter
    assert spearman(a, -a) == pytest.approx(-1.0)
    # by hand: ranks [1,2,3,4,5] vs [2,1,3,4,5] -> 1 - 6·2/(5·24) = 0.9
    assert spearman(torch.tensor([1.0, 2, 3, 4, 5]), torch.tensor([2.0, 1, 3, 4, 5])) == pytest.approx(0.9)


def test_embedding_quality_of_the_reference_itself():
    torch.manual_seed(0)
    reference = torch.randn(10, 8)
    quality = embedding_quality(reference, reference.clone())
    assert quality["mean_cosine"] == pytest.approx(1.0) and quality["min_cosine"] == pytest.approx(1.0)
    assert quality["spearman"] == pytest.approx(1.0)
    # per-sentence rescaling changes nothing either
    assert embedding_quality(reference, reference * torch.rand(10, 1).add(0.1)) == pytest.approx(quality)
    worse = embedding_quality(reference, reference + torch.randn(10, 8))
    assert worse["mean_cosine"] < 0.95 and worse["spearman"] < 0.95


def test_evaluate_concatenates_batches(tiny_bert, tokenizer, sentences):
    task = SentenceEmbedding()
    model = tiny_bert()
    batches = [task.collate(sentences[:3], tokenizer), task.collate(sentences[3:7], tokenizer)]
    fn = lambda b: task.forward(model, b).embeddings  # noqa: E731
    with torch.no_grad():
        quality = task.evaluate(fn, fn, batches)
        other = task.evaluate(fn, lambda b: task.forward(tiny_bert(seed=3), b).embeddings, batches)
    assert quality == pytest.approx({"mean_cosine": 1.0, "min_cosine": 1.0, "spearman": 1.0})
    assert other["mean_cosine"] < 0.99
    assert task.primary_metric in quality


def test_benchmark_batch_is_real_tokens(tokenizer, sentences):
    from potstill.techniques import Dataset

    batch = SentenceEmbedding().benchmark_batch(Dataset(train=[], heldout=sentences[:2]), tokenizer, batch_size=3, seq_len=24)
    assert batch["input_ids"].shape == (3, 24)
    assert bool(batch["attention_mask"].all())
