"""MiniLM self-attention distribution and value-relation transfer: the identities the relations imply, masking,
mismatched sizes, and the direction of the paper's claim (training on it makes the student's last-layer
attention match the teacher's)."""

from __future__ import annotations

import copy

import pytest
import torch

from potstill.capture import capture
from potstill.plugins.losses.minilm_relations import MiniLMRelations
from potstill.plugins.students.layer_drop import LayerDrop
from potstill.plugins.tasks.sentence_embedding import SentenceEmbedding

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A short one.",
    "Relations between queries and keys are what the student learns from its teacher here.",
    "Padding fills the rest.",
]


@pytest.fixture
def bert(tiny_bert):
    """Tiny random BERTs whose attention is far from uniform (the default 0.02 init makes every relation
    nearly uniform, so every loss would be nearly zero and no test could fail)."""

    def make(**kwargs):
        model = tiny_bert(**kwargs)
        model.config.initializer_range = 0.3
        torch.manual_seed(kwargs.get("seed", 0))
        model.apply(model._init_weights)
        return model.eval()

    return make


@pytest.fixture
def batch(tokenizer):
    batch = SentenceEmbedding(max_length=32).collate(SENTENCES, tokenizer)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    return batch


def relation_loss(loss: MiniLMRelations, student, teacher, batch, setup: bool = True) -> torch.Tensor:
    """The loss as the trainer computes it: setup, capture by module path, task forward."""
    task = SentenceEmbedding(max_length=32)
    if setup:
        loss.setup(student, teacher)
    outputs = {}
    for role, model in (("student", student), ("teacher", teacher)):
        with capture(model, loss.capture(model, role)) as captured, torch.set_grad_enabled(role == "student"):
            out = task.forward(model, batch)
        out.features = dict(captured)
        outputs[role] = out
    return loss(outputs["student"], outputs["teacher"], batch)


def test_zero_for_identical_models(bert, batch):
    teacher = bert(seed=1)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        assert float(relation_loss(MiniLMRelations(), student, teacher, batch)) == pytest.approx(0.0, abs=1e-7)


def test_positive_for_different_models(bert, batch):
    with torch.no_grad():
        assert float(relation_loss(MiniLMRelations(), bert(seed=2), bert(seed=1), batch)) > 1e-4


def test_sum_of_attention_and_value_terms(bert, batch):
    teacher, student = bert(seed=1), bert(seed=2)
    with torch.no_grad():
        both = relation_loss(MiniLMRelations(), student, teacher, batch)
        attention = relation_loss(MiniLMRelations(values=False), student, teacher, batch)
        values = relation_loss(MiniLMRelations(attention=False), student, teacher, batch)
    assert float(attention) > 0 and float(values) > 0
    torch.testing.assert_close(both, attention + values)


def _rotate_outputs(linear: torch.nn.Linear, rotation: torch.Tensor) -> None:
    """Make ``linear``'s output ``y`` become ``y @ rotation`` by changing its weight and bias."""
    with torch.no_grad():
        linear.weight.copy_(rotation.T @ linear.weight)
        linear.bias.copy_(linear.bias @ rotation)


def _orthogonal(size: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator))
    return q * torch.sign(torch.diagonal(r))


def _per_head_rotation(hidden: int, heads: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.block_diag(*[_orthogonal(hidden // heads, generator) for _ in range(heads)])


def test_invariant_to_rotating_queries_and_keys_within_each_head(bert, batch):
    teacher, student = bert(seed=1), bert(seed=2)
    attention = student.encoder.layer[-1].attention.self
    rotation = _per_head_rotation(32, 4, seed=0)
    with torch.no_grad():
        before = relation_loss(MiniLMRelations(), student, teacher, batch)
        rotated = copy.deepcopy(student)
        _rotate_outputs(rotated.encoder.layer[-1].attention.self.query, rotation)
        _rotate_outputs(rotated.encoder.layer[-1].attention.self.key, rotation)
        torch.testing.assert_close(relation_loss(MiniLMRelations(), rotated, teacher, batch), before, rtol=1e-5, atol=1e-6)
        # a rotated copy of the teacher still matches the teacher exactly
        twin = copy.deepcopy(teacher)
        _rotate_outputs(twin.encoder.layer[-1].attention.self.query, rotation)
        _rotate_outputs(twin.encoder.layer[-1].attention.self.key, rotation)
        assert float(relation_loss(MiniLMRelations(), twin, teacher, batch)) == pytest.approx(0.0, abs=1e-6)

        # the test can fail: rotating only the queries, or mixing heads, changes the relations
        queries_only = copy.deepcopy(student)
        _rotate_outputs(queries_only.encoder.layer[-1].attention.self.query, rotation)
        assert abs(float(relation_loss(MiniLMRelations(), queries_only, teacher, batch) - before)) > 1e-4
        mixed = copy.deepcopy(student)
        across_heads = _orthogonal(32, torch.Generator().manual_seed(5))
        _rotate_outputs(mixed.encoder.layer[-1].attention.self.query, across_heads)
        _rotate_outputs(mixed.encoder.layer[-1].attention.self.key, across_heads)
        assert abs(float(relation_loss(MiniLMRelations(), mixed, teacher, batch) - before)) > 1e-4
    assert attention is student.encoder.layer[-1].attention.self  # the student itself was not touched


def test_runs_with_different_hidden_sizes(bert, batch):
    teacher, student = bert(hidden=32, heads=4, seed=1), bert(hidden=16, heads=4, seed=2)
    value = relation_loss(MiniLMRelations(), student, teacher, batch)
    assert torch.isfinite(value) and float(value.detach()) > 0
    value.backward()
    query_grad = student.encoder.layer[-1].attention.self.query.weight.grad
    value_grad = student.encoder.layer[-1].attention.self.value.weight.grad
    assert query_grad is not None and torch.isfinite(query_grad).all() and query_grad.abs().sum() > 0
    assert value_grad is not None and torch.isfinite(value_grad).all() and value_grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_head_count_mismatch_needs_relation_heads(bert, batch):
    teacher, student = bert(hidden=32, heads=4, seed=1), bert(hidden=16, heads=2, seed=2)
    with pytest.raises(ValueError, match=r"2 heads.*4.*relation_heads"):
        MiniLMRelations().setup(student, teacher)
    value = relation_loss(MiniLMRelations(relation_heads=2), student, teacher, batch)
    assert torch.isfinite(value) and float(value.detach()) > 0
    with pytest.raises(ValueError, match="not divisible"):
        relation_loss(MiniLMRelations(relation_heads=3), student, teacher, batch)


def test_forward_without_setup_is_a_clear_error(bert, batch):
    with pytest.raises(RuntimeError, match="setup"):
        relation_loss(MiniLMRelations(), bert(seed=2), bert(seed=1), batch, setup=False)


def test_padding_keys_are_masked(bert, batch):
    teacher, student = bert(seed=1), bert(seed=2)
    padded = (batch["attention_mask"] == 0).nonzero()[0].tolist()
    real = (batch["attention_mask"] == 1).nonzero()[3].tolist()
    with torch.no_grad():
        before = relation_loss(MiniLMRelations(), student, teacher, batch)
        changed = {k: v.clone() for k, v in batch.items()}
        changed["input_ids"][padded[0], padded[1]] = 2023  # a real word where the padding was
        torch.testing.assert_close(relation_loss(MiniLMRelations(), student, teacher, changed), before, rtol=0, atol=1e-6)
        # the same change at a real position does change it
        changed = {k: v.clone() for k, v in batch.items()}
        changed["input_ids"][real[0], real[1]] = 2023
        assert abs(float(relation_loss(MiniLMRelations(), student, teacher, changed) - before)) > 1e-5


def test_student_layer_is_separate_from_teacher_layer(bert, batch):
    teacher = bert(seed=1)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        assert float(relation_loss(MiniLMRelations(layer=-1, student_layer=-1), student, teacher, batch)) == pytest.approx(0, abs=1e-7)
        # teacher layer 3 against the student's (identical) layer 1: not the same relations
        assert float(relation_loss(MiniLMRelations(layer=3, student_layer=1), student, teacher, batch)) > 1e-4
        # ... but student layer 1 does match teacher layer 1
        assert float(relation_loss(MiniLMRelations(layer=1, student_layer=1), student, teacher, batch)) == pytest.approx(0, abs=1e-7)


# --------------------------------------------------------------------------------------------------
# the paper's claim, at small scale
# --------------------------------------------------------------------------------------------------


def _last_layer_attention_kl(student, teacher, batch) -> float:
    """KL(teacher ‖ student) of the models' own last-layer attention probabilities, over heads and real queries."""
    with torch.no_grad():
        teacher_attention = teacher(**batch, output_attentions=True).attentions[-1]
        student_attention = student(**batch, output_attentions=True).attentions[-1]
    kl = (teacher_attention * (teacher_attention.clamp_min(1e-30).log() - student_attention.clamp_min(1e-30).log())).sum(-1)
    return float(kl.mean(1)[batch["attention_mask"].bool()].mean())


def test_training_on_relations_aligns_last_layer_attention(minilm_path, tokenizer, sentences):
    """MiniLM §3: distilling the last layer's attention distributions (and value relations) into a shallower
    student makes its last-layer self-attention behave like the teacher's."""
    from transformers import AutoModel

    teacher = AutoModel.from_pretrained(minilm_path, attn_implementation="eager").eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    student = LayerDrop(keep=[0, 5]).build(teacher)  # layer 5 now sits on top of layer 0: its attention is off
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    task = SentenceEmbedding(max_length=24)
    heldout = task.collate(sentences[:32], tokenizer)
    loss = MiniLMRelations()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    curve = [_last_layer_attention_kl(student, teacher, heldout)]
    for step in range(20):
        batch = task.collate(sentences[32 + 8 * step: 40 + 8 * step], tokenizer)
        value = relation_loss(loss, student, teacher, batch)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        if step % 5 == 4:
            curve.append(_last_layer_attention_kl(student, teacher, heldout))
    assert curve[-1] < 0.7 * curve[0], curve
    assert all(later < curve[0] for later in curve[1:]), curve
