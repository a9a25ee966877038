"""FitNets-style hidden-state MSE: zero at identity, layer selection, padding ignored, a trained projection
between hidden sizes, and the normalized variant's invariance to per-token affine changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from potstill.plugins.losses.hidden_mse import HiddenMSE
from potstill.techniques import Outputs


def states(batch=2, seq=5, hidden=8, layers=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, seq, hidden, generator=generator) for _ in range(layers))


def mse(loss, student_states, teacher_states, mask=None):
    return loss(Outputs(hidden_states=student_states, attention_mask=mask), Outputs(hidden_states=teacher_states), {})


def test_zero_at_identity():
    hidden = states()
    assert float(mse(HiddenMSE(), hidden, tuple(h.clone() for h in hidden))) == 0.0
    assert float(mse(HiddenMSE(), hidden, hidden, torch.ones(2, 5))) == 0.0


def test_selects_the_layers_it_is_told():
    student, teacher = states(seed=1), states(seed=2)
    value = mse(HiddenMSE(student_layer=1, teacher_layer=0), student, teacher)
    torch.testing.assert_close(value, (student[1] - teacher[0]).pow(2).mean())
    # -1 is the last layer
    torch.testing.assert_close(mse(HiddenMSE(), student, teacher), (student[2] - teacher[2]).pow(2).mean())


def test_padding_is_ignored():
    student, teacher = states(seed=1), states(seed=2)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    value = mse(HiddenMSE(), student, teacher, mask)
    real = mask.bool()
    torch.testing.assert_close(value, (student[-1][real] - teacher[-1][real]).pow(2).mean())
    scribbled = tuple(h.clone() for h in student)
    scribbled[-1][~real] += 1000
    torch.testing.assert_close(mse(HiddenMSE(), scribbled, teacher, mask), value)


def test_normalized_variant_ignores_per_token_scale_and_shift():
    student = states(seed=1)
    scale = torch.rand(2, 5, 1) * 5 + 0.5
    shift = torch.randn(2, 5, 1) * 3
    teacher = tuple(h * scale + shift for h in student)
    assert float(mse(HiddenMSE(normalize=True), student, teacher)) == pytest.approx(0.0, abs=1e-5)
    assert float(mse(HiddenMSE(normalize=False), student, teacher)) > 1.0


def test_projection_created_when_sizes_differ_and_trained(tiny_bert):
    loss = HiddenMSE()
    student, teacher = tiny_bert(hidden=16, seed=2), tiny_bert(hidden=32, seed=1)
    loss.setup(student, teacher)
    assert isinstance(loss.projection, nn.Linear)
    assert (loss.projection.in_features, loss.projection.out_features) == (16, 32)
    # the trainer optimizes the losses' parameters with the student's: the projection must be among them
    parameters = list(nn.ModuleList([loss]).parameters())
    assert any(p is loss.projection.weight for p in parameters) and any(p is loss.projection.bias for p in parameters)
    assert "projection.weight" in loss.state_dict()  # and it is checkpointed

    student_states, teacher_states = states(hidden=16, seed=3), states(hidden=32, seed=4)
    optimizer = torch.optim.Adam(loss.parameters(), lr=0.05)
    values = []
    for _ in range(30):
        value = mse(loss, student_states, teacher_states)
        optimizer.zero_grad()
        value.backward()
        values.append(float(value.detach()))
        optimizer.step()
    assert loss.projection.weight.grad.abs().sum() > 0
    assert values[-1] < 0.8 * values[0], values


def test_no_projection_when_sizes_match(tiny_bert):
    loss = HiddenMSE()
    loss.setup(tiny_bert(seed=2), tiny_bert(seed=1))
    assert loss.projection is None and list(loss.parameters()) == []


def test_size_mismatch_without_projection_is_a_clear_error():
    with pytest.raises(ValueError, match="16 != teacher's 32"):
        mse(HiddenMSE(), states(hidden=16), states(hidden=32))


def test_needs_hidden_states():
    with pytest.raises(ValueError, match="hidden_states"):
        HiddenMSE()(Outputs(embeddings=torch.randn(2, 3)), Outputs(embeddings=torch.randn(2, 3)), {})
