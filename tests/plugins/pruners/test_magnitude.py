"""Magnitude pruning: exact sparsity, the survivors are the largest weights, masks survive training and are
rebuilt from the zeros when a pruned model is reloaded."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from potstill.plugins.pruners.magnitude import NO_SPEEDUP_NOTE, Magnitude
from potstill.sparsity import apply_masks, masks


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": module.weight.detach().clone() for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def test_exact_global_sparsity_and_largest_survive(tiny_bert):
    model = tiny_bert()
    original = linear_weights(model)
    Magnitude(sparsity=0.3, scope="global").prune(model)
    pruned = linear_weights(model)
    total = sum(w.numel() for w in original.values())
    zeros = sum(int((w == 0).sum()) for w in pruned.values())
    assert zeros == round(0.3 * total)
    magnitudes = torch.cat([w.abs().flatten() for w in original.values()])
    kept = torch.cat([(p != 0).flatten() for p in pruned.values()])
    assert magnitudes[kept].min() >= magnitudes[~kept].max()
    # the survivors are unchanged, not rescaled
    for name, weight in pruned.items():
        assert torch.equal(weight[weight != 0], original[name][weight != 0])


def test_exact_per_layer_sparsity_and_largest_survive(tiny_bert):
    model = tiny_bert()
    original = linear_weights(model)
    Magnitude(sparsity=0.5, scope="layer").prune(model)
    for name, weight in linear_weights(model).items():
        assert int((weight == 0).sum()) == round(0.5 * weight.numel()), name
        magnitude = original[name].abs()
        assert magnitude[weight != 0].min() >= magnitude[weight == 0].max(), name


def test_global_and_layer_scopes_differ_when_scales_differ(tiny_bert):
    """One global threshold spares a layer of large weights; per-layer pruning does not."""
    model = tiny_bert()
    with torch.no_grad():
        model.encoder.layer[0].intermediate.dense.weight.mul_(100)
    global_model = Magnitude(sparsity=0.4, scope="global").prune(model)
    loud = global_model.encoder.layer[0].intermediate.dense.weight
    assert (loud == 0).double().mean() < 0.02
    model = tiny_bert()
    with torch.no_grad():
        model.encoder.layer[0].intermediate.dense.weight.mul_(100)
    layer_model = Magnitude(sparsity=0.4, scope="layer").prune(model)
    assert (layer_model.encoder.layer[0].intermediate.dense.weight == 0).double().mean() == pytest.approx(0.4, abs=1e-3)


def test_ties_still_give_exact_counts():
    model = nn.Sequential(nn.Linear(10, 10, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(0.5)
    Magnitude(sparsity=0.25).prune(model)
    assert int((model[0].weight == 0).sum()) == 25


def test_only_selected_linear_weights_are_pruned(tiny_bert):
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Magnitude(sparsity=0.5, include=["encoder.layer.*"], exclude=["*.attention.self.query"]).prune(model)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing was pruned"
    assert all(k.startswith("encoder.layer.") and k.endswith(".weight") for k in changed), changed
    assert not any(".attention.self.query." in k for k in changed)
    assert torch.equal(before["embeddings.word_embeddings.weight"], after["embeddings.word_embeddings.weight"])
    assert torch.equal(before["pooler.dense.weight"], after["pooler.dense.weight"])
    with pytest.raises(ValueError, match="no Linear layer matches"):
        Magnitude(sparsity=0.5, include=["nothing.*"]).prune(model)


def test_masks_survive_an_optimizer_step(tiny_bert, tokenizer):
    model = tiny_bert()
    Magnitude(sparsity=0.5).prune(model)
    zero_before = {name: weight == 0 for name, weight in linear_weights(model).items()}
    assert set(masks(model)) == set(zero_before)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = tokenizer(["masks survive training"], return_tensors="pt")
    model(**batch).last_hidden_state.pow(2).sum().backward()
    optimizer.step()
    # the step moved pruned weights (their gradient is not zero) ...
    moved = linear_weights(model)
    assert any(int((moved[name][zero] != 0).sum()) > 0 for name, zero in zero_before.items())
    apply_masks(model)  # ... and the trainer's re-application zeroes them again, leaving the others trained
    for name, weight in linear_weights(model).items():
        assert int((weight[zero_before[name]] != 0).sum()) == 0, name
    assert any(not torch.equal(moved[name], weight) for name, weight in linear_weights(model).items())


def test_restore_recomputes_masks_from_the_zeros(tiny_bert):
    pruner = Magnitude(sparsity=0.3)
    model = pruner.prune(tiny_bert())
    original_masks = {k: v.clone() for k, v in masks(model).items()}
    reloaded = tiny_bert(seed=5)
    reloaded.load_state_dict(model.state_dict())  # what the pipeline does with a cached stage
    assert masks(reloaded) == {}
    pruner.restore(reloaded)
    assert set(masks(reloaded)) == set(original_masks)
    assert all(torch.equal(masks(reloaded)[k], original_masks[k]) for k in original_masks)
    with torch.no_grad():
        for weight in linear_weights(reloaded):
            reloaded.get_parameter(weight).add_(1.0)
    apply_masks(reloaded)
    assert all(int((reloaded.get_parameter(k)[~m] != 0).sum()) == 0 for k, m in original_masks.items())


def test_records_sparsity_and_notes_no_speedup(tiny_bert, text_context):
    model = tiny_bert()
    ctx = text_context(model)
    Magnitude(sparsity=0.3).prune(model, ctx)
    assert ctx.record["sparsity"] == pytest.approx(0.3, abs=1e-4)
    assert ctx.record["pruned_tensors"] == len(linear_weights(model))
    assert NO_SPEEDUP_NOTE in ctx.notes


@pytest.mark.parametrize("sparsity", [0, 1, -0.1, 1.5])
def test_sparsity_bounds(sparsity):
    with pytest.raises(ValidationError):
        Magnitude(sparsity=sparsity)
