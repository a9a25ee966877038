"""Cosine distance of sentence embeddings: zero at identity, blind to scale, padding-free through the task."""

from __future__ import annotations

import math

import pytest
import torch

from potstill.plugins.losses.embedding_cosine import EmbeddingCosine
from potstill.plugins.tasks.sentence_embedding import SentenceEmbedding
from potstill.techniques import Outputs


def cosine_loss(student_emb, teacher_emb):
    return EmbeddingCosine()(Outputs(embeddings=student_emb), Outputs(embeddings=teacher_emb), {})


def test_zero_at_identity():
    embeddings = torch.randn(6, 16)
    assert float(cosine_loss(embeddings, embeddings.clone())) == pytest.approx(0.0, abs=1e-6)


def test_equals_one_minus_cosine_by_hand():
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    teacher = torch.tensor([[0.0, 3.0], [0.0, -1.0], [1.0, 0.0]])
    # orthogonal: 1, opposite: 2, 45 degrees: 1 - 1/sqrt(2)
    expected = (1 + 2 + (1 - 1 / math.sqrt(2))) / 3
    assert float(cosine_loss(student, teacher)) == pytest.approx(expected, abs=1e-6)


def test_scale_invariance():
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 16), torch.randn(8, 16)
    scales_student = torch.rand(8, 1) * 10 + 0.1
    scales_teacher = torch.rand(8, 1) * 10 + 0.1
    torch.testing.assert_close(cosine_loss(student * scales_student, teacher * scales_teacher), cosine_loss(student, teacher))
    # a positive multiple of the teacher's embedding is a perfect student
    assert float(cosine_loss(teacher * scales_student, teacher)) == pytest.approx(0.0, abs=1e-6)
    # but a sign flip is not a scale
    assert float(cosine_loss(-teacher, teacher)) == pytest.approx(2.0, abs=1e-6)


def test_gradient_is_orthogonal_to_the_student_embedding():
    """Scale invariance means moving along e_s changes nothing, so the gradient has no component along it."""
    torch.manual_seed(1)
    student = torch.randn(4, 16, requires_grad=True)
    cosine_loss(student, torch.randn(4, 16)).backward()
    assert student.grad.abs().sum() > 0
    torch.testing.assert_close((student.grad * student.detach()).sum(-1), torch.zeros(4), atol=1e-6, rtol=0)


def test_different_sizes_are_a_clear_error():
    """No hidden projection: the embeddings are the task's output, compared directly with the teacher's."""
    with pytest.raises(ValueError, match=r"16 dimensions.*32"):
        cosine_loss(torch.randn(2, 16), torch.randn(2, 32))


def test_needs_embeddings():
    with pytest.raises(ValueError, match="embeddings"):
        EmbeddingCosine()(Outputs(logits=torch.randn(2, 3)), Outputs(logits=torch.randn(2, 3)), {})


def test_padding_is_ignored_through_the_task(tiny_bert, tokenizer):
    task = SentenceEmbedding(max_length=48)
    teacher, student = tiny_bert(seed=1), tiny_bert(layers=2, seed=2)
    sentences = ["A fairly long sentence about distillation of sentence embeddings.", "Short."]

    def loss_for(batch):
        with torch.no_grad():
            return cosine_loss(task.forward(student, batch).embeddings, task.forward(teacher, batch).embeddings)

    tight = task.collate(sentences, tokenizer)
    padded = task.collate(sentences, tokenizer, pad_to=40)
    assert padded["input_ids"].shape[1] > tight["input_ids"].shape[1]
    base = loss_for(tight)
    assert float(base) > 1e-3
    torch.testing.assert_close(loss_for(padded), base, rtol=1e-5, atol=1e-6)
    scribbled = {k: v.clone() for k, v in padded.items()}
    scribbled["input_ids"][scribbled["attention_mask"] == 0] = 1996  # words where the padding was
    torch.testing.assert_close(loss_for(scribbled), base, rtol=1e-5, atol=1e-6)
