"""Registries of techniques (core/registry.py): names, base classes, duplicates, did-you-mean."""

from __future__ import annotations

import pytest

from potstill.errors import PluginError
from potstill.registry import Registry
from potstill.techniques import Loss, Pruner


def make_loss(loss_name):
    return type("SomeLoss", (Loss,), {"name": loss_name})


@pytest.fixture
def losses() -> Registry:
    registry = Registry("loss", Loss)
    for loss_name in ("kd", "hidden_mse", "minilm_relations"):
        registry.add(make_loss(loss_name), plugin=f"plugin_{loss_name}")
    return registry


def test_registered_techniques_are_found_by_name_with_their_plugin(losses):
    assert losses.names() == ["hidden_mse", "kd", "minilm_relations"]
    assert "kd" in losses and "kd2" not in losses
    assert len(losses) == 3
    assert losses.get("kd").name == "kd"
    assert losses.entry("kd").plugin == "plugin_kd"
    assert [entry.name for entry in losses] == losses.names()


def test_registrar_is_the_register_callback_a_plugin_receives():
    registry = Registry("loss", Loss)
    register = registry.registrar("my_plugin")
    cls = make_loss("my_loss")
    assert register(cls) is cls  # usable as a decorator
    assert registry.entry("my_loss").plugin == "my_plugin"


@pytest.mark.parametrize("bad_name", ["KD", "1kd", "my-loss", "my loss", "", "_kd", None, 3])
def test_name_must_be_lower_snake_case(bad_name):
    registry = Registry("loss", Loss)
    with pytest.raises(PluginError, match="lower snake_case") as raised:
        registry.add(make_loss(bad_name), plugin="bad_plugin")
    assert "bad_plugin" in str(raised.value)
    assert len(registry) == 0


def test_a_class_without_a_name_is_rejected():
    class Nameless(Loss):
        pass

    with pytest.raises(PluginError, match="lower snake_case, got None"):
        Registry("loss", Loss).add(Nameless, plugin="p")


@pytest.mark.parametrize("not_a_loss", [
    type("APruner", (Pruner,), {"name": "a_pruner"}),
    type("Plain", (), {"name": "plain"}),
    lambda: None,
    "kd",
    make_loss("an_instance")(),  # a plugin that registers an instance instead of the class
])
def test_only_subclasses_of_the_kind_base_are_accepted(not_a_loss):
    registry = Registry("loss", Loss)
    with pytest.raises(PluginError, match=r"must subclass potstill\.techniques\.Loss") as raised:
        registry.add(not_a_loss, plugin="confused_plugin")
    assert "confused_plugin" in str(raised.value)
    assert len(registry) == 0


def test_duplicate_name_names_both_plugins_and_classes(losses):
    with pytest.raises(PluginError) as raised:
        losses.add(make_loss("kd"), plugin="late_plugin")
    message = str(raised.value)
    assert "duplicate loss name 'kd'" in message
    assert "'plugin_kd'" in message and "'late_plugin'" in message
    assert message.index("plugin_kd") < message.index("late_plugin")  # first registration named first
    assert "POTSTILL_BLOCK_PLUGINS" in message
    assert losses.entry("kd").plugin == "plugin_kd"  # the first registration stays


def test_unknown_name_suggests_the_closest(losses):
    assert losses.unknown("kd2") == "unknown loss 'kd2'; did you mean 'kd'? (plugin may not be installed)"
    assert "did you mean 'minilm_relations'?" in losses.unknown("minilm_relation")


def test_unknown_name_without_a_close_match_lists_what_is_available(losses):
    message = losses.unknown("zzzzzz")
    assert "did you mean" not in message
    assert "available: hidden_mse, kd, minilm_relations" in message
    assert message.endswith("(plugin may not be installed)")
    assert "available: none" in Registry("pruner", Pruner).unknown("magnitude")
