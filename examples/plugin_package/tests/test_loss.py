"""The properties DistilBERT's cosine loss implies, and the plugin's registration through potstill's hook."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from pydantic import ValidationError
from torch import nn

import potstill_example_plugin as plugin
from potstill.plugin_manager import build_plugin_manager
from potstill.techniques import Outputs


def hidden(seed: int, shape=(3, 5, 8)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def mask() -> torch.Tensor:
    return torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])


def loss_of(student_hidden, teacher_hidden, attention_mask=None, **options) -> torch.Tensor:
    loss = plugin.CosineHidden(**options)
    # a tuple of hidden states, as ``output_hidden_states`` gives; the loss reads the chosen layer
    student = Outputs(hidden_states=(torch.zeros_like(student_hidden), student_hidden), attention_mask=attention_mask)
    teacher = Outputs(hidden_states=(torch.zeros_like(teacher_hidden), teacher_hidden), attention_mask=attention_mask)
    return loss(student, teacher, {})


def test_matches_distilberts_cosine_embedding_loss():
    # DistilBERT's trainer: masked_select the unpadded token vectors, CosineEmbeddingLoss with target 1
    student_hidden, teacher_hidden, attention_mask = hidden(0), hidden(1), mask()
    keep = attention_mask.bool()
    reference = nn.CosineEmbeddingLoss(reduction="mean")(
        student_hidden[keep], teacher_hidden[keep], torch.ones(int(keep.sum())))
    torch.testing.assert_close(loss_of(student_hidden, teacher_hidden, attention_mask), reference)


def test_invariant_to_positive_scaling_of_either_hidden_state():
    student_hidden, teacher_hidden, attention_mask = hidden(0), hidden(1), mask()
    base = loss_of(student_hidden, teacher_hidden, attention_mask)
    per_token_scale = torch.rand(3, 5, 1, generator=torch.Generator().manual_seed(2)) * 10 + 0.1
    torch.testing.assert_close(loss_of(student_hidden * per_token_scale, teacher_hidden, attention_mask), base)
    torch.testing.assert_close(loss_of(student_hidden, teacher_hidden * 7.5, attention_mask), base)
    # a negative scale flips directions: no longer the same loss
    assert not torch.allclose(loss_of(-student_hidden, teacher_hidden, attention_mask), base)


def test_zero_for_same_directions_two_for_opposite():
    teacher_hidden = hidden(1)
    assert float(loss_of(3.0 * teacher_hidden, teacher_hidden)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss_of(-teacher_hidden, teacher_hidden)) == pytest.approx(2.0, abs=1e-6)


def test_padding_positions_are_ignored():
    student_hidden, teacher_hidden, attention_mask = hidden(0), hidden(1), mask()
    changed = student_hidden.clone()
    changed[~attention_mask.bool()] = 1e3 * hidden(3)[~attention_mask.bool()]
    torch.testing.assert_close(loss_of(changed, teacher_hidden, attention_mask),
                               loss_of(student_hidden, teacher_hidden, attention_mask))


def test_layer_options_pick_the_hidden_state():
    student_hidden, teacher_hidden = hidden(0), hidden(1)
    # layer 0 of both is the zero tensor given by loss_of: cosine of zero vectors is 0, the loss 1
    assert float(loss_of(student_hidden, teacher_hidden, student_layer=0, teacher_layer=0)) == pytest.approx(1.0)


def test_a_gradient_step_aligns_the_student():
    student_hidden = hidden(0).requires_grad_(True)
    teacher_hidden = hidden(1)
    before = loss_of(student_hidden, teacher_hidden)
    before.backward()
    with torch.no_grad():
        after = loss_of(student_hidden - 1.0 * student_hidden.grad, teacher_hidden)
    assert float(after) < float(before.detach())


def test_different_widths_are_a_clear_error():
    with pytest.raises(ValueError, match="hidden_mse"):
        loss_of(hidden(0, (2, 3, 8)), hidden(1, (2, 3, 16)))


def test_options_reject_unknown_keys_and_the_docstring_yaml_validates():
    with pytest.raises(ValidationError):
        plugin.CosineHidden.Options(layer=-1)
    (example,) = yaml.safe_load(re.search(r"^YAML:\s+(.*)$", plugin.__doc__, re.M).group(1))
    assert example.pop("name") == plugin.CosineHidden.name
    plugin.CosineHidden.Options(**example)


def test_registered_through_the_hook():
    plugins = build_plugin_manager(extra_plugins=(plugin,), autoload=False)
    entry = plugins.registry("loss").entry("cosine_hidden")
    assert entry.cls is plugin.CosineHidden
    assert entry.plugin == plugins.manager.get_name(plugin)
