"""Shared by the exporter tests: an independent parity check, not the exporter's own."""

from __future__ import annotations

import pytest
import torch

from potstill.runtime import ort_callable, session


def _assert_matches_pytorch(path, model, task, sentences, tokenizer, shapes, hidden=32, atol=1e-4):
    """Run ``path`` in ONNX Runtime and the task's PyTorch module on held-out sentences at ``shapes``."""
    run = ort_callable(session(path))
    module = task.export_module(model)
    for batch_size, seq_len in shapes:
        batch = task.collate(sentences[200:200 + batch_size], tokenizer, pad_to=seq_len)
        with torch.no_grad():
            reference = module(batch["input_ids"], batch["attention_mask"])
        candidate = run(batch)
        assert candidate.shape == reference.shape == (batch_size, hidden)
        assert float((candidate - reference).abs().max()) <= atol


@pytest.fixture
def assert_matches_pytorch():
    return _assert_matches_pytorch
