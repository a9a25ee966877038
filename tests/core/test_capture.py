"""Capturing intermediate outputs by module path (core/capture.py) without changing the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from potstill.capture import capture


def all_hooks(model: nn.Module) -> list:
    return [hook for module in model.modules() for hook in module._forward_hooks.values()]


@pytest.fixture
def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 2))


def test_captured_outputs_equal_what_each_module_returns(mlp):
    x = torch.randn(3, 4)
    with capture(mlp, {"first": "0", "relu": "1", "inner": "2.0", "block": "2"}) as captured:
        y = mlp(x)
    first = mlp[0](x)
    relu = torch.relu(first)
    inner = mlp[2][0](relu)
    assert torch.equal(captured["first"], first)
    assert torch.equal(captured["relu"], relu)
    assert torch.equal(captured["inner"], inner)
    assert torch.equal(captured["block"], torch.tanh(inner))
    assert torch.equal(y, mlp(x))  # the model's own output is unchanged


def test_two_names_for_one_module_share_one_hook(mlp):
    with capture(mlp, {"a": "1", "b": "1"}) as captured:
        assert len(all_hooks(mlp)) == 1
        mlp(torch.randn(2, 4))
    assert captured["a"] is captured["b"]


def test_captured_outputs_keep_their_gradient(mlp):
    with capture(mlp, {"hidden": "0"}) as captured:
        mlp(torch.randn(2, 4))
    captured["hidden"].sum().backward()
    assert mlp[0].weight.grad is not None


def test_hooks_are_removed_afterwards(mlp):
    assert all_hooks(mlp) == []
    with capture(mlp, {"a": "0", "b": "2.0", "c": "3"}):
        assert len(all_hooks(mlp)) == 3
        mlp(torch.randn(1, 4))
    assert all_hooks(mlp) == []
    # and the model runs without capturing anything more
    with capture(mlp, {"a": "0"}) as captured:
        pass
    mlp(torch.randn(1, 4))
    assert captured == {}


def test_hooks_are_removed_when_the_block_raises(mlp):
    with pytest.raises(RuntimeError, match="boom"):
        with capture(mlp, {"a": "0", "b": "3"}):
            raise RuntimeError("boom")
    assert all_hooks(mlp) == []


def test_a_bad_path_names_it_and_leaves_no_hook(mlp):
    with pytest.raises(KeyError, match="module path '2.7' not found in Sequential"):
        with capture(mlp, {"fine": "0", "bad": "2.7"}):
            pass
    assert all_hooks(mlp) == []


def test_tuple_outputs_give_their_first_tensor(tiny_bert):
    bert = tiny_bert(layers=2)
    input_ids = torch.randint(0, 100, (2, 5))
    with capture(bert, {"layer": "encoder.layer.0", "query": "encoder.layer.1.attention.self.query"}) as captured:
        out = bert(input_ids=input_ids, output_hidden_states=True)
    assert torch.equal(captured["layer"], out.hidden_states[1])
    assert torch.equal(captured["query"], bert.encoder.layer[1].attention.self.query(out.hidden_states[1]))
    assert all_hooks(bert) == []


def test_an_output_without_a_tensor_is_a_clear_error():
    class Dicty(nn.Module):
        def forward(self, x):
            return {"x": x}

    model = nn.Sequential(Dicty())
    with pytest.raises(TypeError, match="cannot capture a module output of type dict"):
        with capture(model, {"d": "0"}):
            model(torch.ones(1))
    assert all_hooks(model) == []
