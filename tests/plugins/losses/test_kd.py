"""Hinton KD: T²·KL(teacher ‖ student) of softened distributions, its high-temperature limit, masking, and the
paper's claim that soft targets transfer knowledge a small labeled set cannot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from potstill.plugins.losses.kd import KD, kd_loss
from potstill.techniques import Outputs


def kd(student_logits, teacher_logits, temperature=4.0, mask=None):
    return KD(temperature=temperature)(Outputs(logits=student_logits, attention_mask=mask), Outputs(logits=teacher_logits), {})


def test_zero_when_logits_equal():
    logits = torch.randn(5, 7)
    assert float(kd(logits, logits.clone())) == pytest.approx(0.0, abs=1e-7)
    # a constant shift of the logits is the same distribution
    assert float(kd(logits + 3.0, logits)) == pytest.approx(0.0, abs=1e-6)


def test_positive_otherwise():
    torch.manual_seed(0)
    assert float(kd(torch.randn(5, 7), torch.randn(5, 7))) > 0


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
def test_equals_t_squared_kl_by_hand(temperature):
    torch.manual_seed(1)
    student, teacher = torch.randn(6, 10), torch.randn(6, 10) * 3
    by_hand = F.kl_div(F.log_softmax(student / temperature, -1), F.softmax(teacher / temperature, -1),
                       reduction="batchmean") * temperature**2
    torch.testing.assert_close(kd(student, teacher, temperature), by_hand, rtol=1e-5, atol=1e-6)


def test_kl_direction_is_teacher_to_student():
    """KL(p_t ‖ p_s), not KL(p_s ‖ p_t): they differ for asymmetric distributions."""
    student = torch.tensor([[4.0, 0.0, 0.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0]])
    p_t, p_s = F.softmax(teacher, -1), F.softmax(student, -1)
    forward = (p_t * (p_t.log() - p_s.log())).sum()
    reverse = (p_s * (p_s.log() - p_t.log())).sum()
    assert abs(float(forward - reverse)) > 0.1
    torch.testing.assert_close(kd(student, teacher, 1.0), forward)


def test_high_temperature_limit_is_logit_matching():
    """Hinton et al. §2.1: for zero-mean logits and T ≫ |z|, T²·KL → Σ_c (z_s − z_t)² / (2N) per example."""
    torch.manual_seed(2)
    classes = 10
    student = torch.randn(16, classes, dtype=torch.float64) * 2
    teacher = torch.randn(16, classes, dtype=torch.float64) * 2
    student = student - student.mean(-1, keepdim=True)
    teacher = teacher - teacher.mean(-1, keepdim=True)
    limit = ((student - teacher) ** 2).sum(-1).div(2 * classes).mean()
    value = kd_loss(student, teacher, temperature=1000.0)
    assert float(value) == pytest.approx(float(limit), rel=1e-3)
    # ...and it is a limit: at moderate T the two clearly differ
    assert abs(float(kd_loss(student, teacher, 1.0)) - float(limit)) > 0.05 * float(limit)


def test_masked_sequence_logits_ignore_padding():
    torch.manual_seed(3)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    value = kd(student, teacher, 2.0, mask)
    # whatever sits at padded positions does not matter
    student_noisy, teacher_noisy = student.clone(), teacher.clone()
    student_noisy[0, 3:] += 100 * torch.randn(2, 11)
    teacher_noisy[0, 3:] -= 50 * torch.randn(2, 11)
    torch.testing.assert_close(kd(student_noisy, teacher_noisy, 2.0, mask), value)
    # and the loss is the mean over the real positions
    real = mask.bool()
    torch.testing.assert_close(value, kd(student[real], teacher[real], 2.0))


def test_invalid_temperature_rejected():
    with pytest.raises(ValueError):
        KD(temperature=0)


# --------------------------------------------------------------------------------------------------
# the paper's claim, at small scale
# --------------------------------------------------------------------------------------------------


def _mlp(hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _train(model: nn.Module, features, objective, steps: int) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        objective(model(features)).backward()
        optimizer.step()
    return model.eval()


def test_soft_targets_on_a_small_labeled_subset_beat_hard_labels(digits):
    """Hinton et al. §4 (speech, 3% of the data): a student trained on the teacher's soft targets of a few
    examples generalizes far better than one trained on the hard labels of the same examples."""
    train_x = torch.tensor(np.stack([x for x, _ in digits.train]))
    train_y = torch.tensor([y for _, y in digits.train])
    test_x = torch.tensor(np.stack([x for x, _ in digits.heldout]))
    test_y = torch.tensor([y for _, y in digits.heldout])
    teacher = _train(_mlp(128, 0), train_x, lambda out: F.cross_entropy(out, train_y), 300)
    with torch.no_grad():
        teacher_test = teacher(test_x).argmax(-1)
    assert (teacher_test == test_y).double().mean() > 0.95

    results = {"hard": [], "soft": []}
    loss = KD(temperature=4.0)
    for seed in range(5):
        subset = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))[:30]
        x, y = train_x[subset], train_y[subset]
        with torch.no_grad():
            teacher_logits = teacher(x)
        hard = _train(_mlp(32, 100 + seed), x, lambda out: F.cross_entropy(out, y), 200)
        soft = _train(_mlp(32, 100 + seed), x, lambda out: loss(Outputs(logits=out), Outputs(logits=teacher_logits), {}), 200)
        with torch.no_grad():
            for key, model in (("hard", hard), ("soft", soft)):
                predicted = model(test_x).argmax(-1)
                results[key].append(((predicted == test_y).double().mean().item(), (predicted == teacher_test).double().mean().item()))
    hard_acc, hard_agree = np.mean(results["hard"], axis=0)
    soft_acc, soft_agree = np.mean(results["soft"], axis=0)
    assert soft_acc > hard_acc + 0.05, results
    assert soft_agree > hard_agree + 0.05, results
    assert sum(s[0] > h[0] for s, h in zip(results["soft"], results["hard"])) >= 4, results
