"""Classification: collate, export module, and accuracy/agreement on a hand-checked example."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from potstill.plugins.tasks.classification import Classification


def test_accuracy_and_agreement_by_hand():
    task = Classification()
    labels = torch.tensor([0, 1, 2, 1])
    batches = [{"x": torch.zeros(2, 3), "labels": labels[:2]}, {"x": torch.ones(2, 3), "labels": labels[2:]}]
    # reference predicts [0, 1, 2, 0]; candidate predicts [0, 2, 2, 0]
    reference_logits = [torch.tensor([[3.0, 0, 0], [0, 3, 0]]), torch.tensor([[0, 0, 3.0], [3, 0, 0]])]
    candidate_logits = [torch.tensor([[1.0, 0, 0], [0, 0, 1]]), torch.tensor([[0, 0, 1.0], [1, 0, 0]])]
    reference = lambda b: reference_logits[int(b["x"][0, 0])]  # noqa: E731
    candidate = lambda b: candidate_logits[int(b["x"][0, 0])]  # noqa: E731
    metrics = task.evaluate(reference, candidate, batches)
    assert metrics["accuracy"] == pytest.approx(2 / 4)  # right on examples 0 and 2
    assert metrics["agreement"] == pytest.approx(3 / 4)  # differs from the reference on example 1 only
    assert task.evaluate(reference, reference, batches) == pytest.approx({"accuracy": 3 / 4, "agreement": 1.0})


def test_collate_and_forward(digits):
    task = Classification()
    batch = task.collate(digits.heldout[:5])
    assert batch["x"].shape == (5, 64) and batch["x"].dtype == torch.float32
    assert batch["labels"].tolist() == [y for _, y in digits.heldout[:5]]
    model = nn.Linear(64, 10)
    with torch.no_grad():
        torch.testing.assert_close(task.forward(model, batch).logits, model(batch["x"]))
        torch.testing.assert_close(task.export_module(model)(*task.export_inputs(batch).values()), model(batch["x"]))
    assert list(task.dynamic_axes()) == list(task.export_inputs(batch)) == ["x"]


def test_benchmark_batch_has_the_requested_size(digits):
    batch = Classification().benchmark_batch(digits, None, batch_size=7, seq_len=999)
    assert batch["x"].shape == (7, 64)
    assert np.allclose(batch["x"][0].numpy(), digits.heldout[0][0])
