"""Every hook potstill calls, documented: how it is called and what it returns.

A plugin is a module (or object) with ``@hookimpl`` functions named like these specs. Each technique kind
has one registration hook, ``register_<kind>s(register)``: the plugin calls ``register(TechniqueClass)``
once per technique instead of returning values. An implementation may take fewer arguments than its
spec, so specs can grow without breaking plugins. There are no lifecycle hooks yet: the pipeline has not
needed one; add one here, documented and tested, when it does.

Hooks are called when the plugin manager is built (:func:`potstill.plugin_manager.get_plugin_manager`),
once per plugin and in registration order, so that a duplicate technique name can name both plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from potstill.techniques import Data, Decoder, Exporter, Loss, Pruner, Quantizer, Student, Task, Teacher

hookspec = pluggy.HookspecMarker("potstill")
hookimpl = pluggy.HookimplMarker("potstill")


# ------------------------------------------------------------------------------------------------
# registration: one hook per kind of technique
# ------------------------------------------------------------------------------------------------


@hookspec
def register_tasks(register: Callable[[type["Task"]], type["Task"]]) -> None:
    """Register tasks, selectable as ``task: {name: <Task.name>}``.

    A task says how batches are fed to a model, what is exported, and how quality is measured.
    Called once when the plugin manager is built; every implementation is called.

    :param register: call ``register(TaskClass)`` once per task.
    """


@hookspec
def register_data(register: Callable[[type["Data"]], type["Data"]]) -> None:
    """Register data sources, selectable as ``data: {name: <Data.name>, ...}``.

    Called once when the plugin manager is built; every implementation is called.

    :param register: call ``register(DataClass)`` once per data source.
    """


@hookspec
def register_teachers(register: Callable[[type["Teacher"]], type["Teacher"]]) -> None:
    """Register teachers, selectable as ``teacher: {name: <Teacher.name>, ...}``.

    Called once when the plugin manager is built; every implementation is called.

    :param register: call ``register(TeacherClass)`` once per teacher.
    """


@hookspec
def register_students(register: Callable[[type["Student"]], type["Student"]]) -> None:
    """Register student builders and searches, selectable as ``- student: {name: ..., ...}`` stages.

    Called once when the plugin manager is built; every implementation is called.

    :param register: call ``register(StudentClass)`` once per technique.
    """


@hookspec
def register_losses(register: Callable[[type["Loss"]], type["Loss"]]) -> None:
    """Register distillation losses, selectable as ``- {name: <Loss.name>, ...}`` in a distill stage.

    Called once when the plugin manager is built; every implementation is called.

    :param register: call ``register(LossClass)`` once per technique.
    """


@hookspec
def register_pruners(register: Callable[[type["Pruner"]], type["Pruner"]]) -> None:
    """Register pruners, selectable as ``- prune: {name: ..., ...}`` stages.

    Called once when the plugin manager is built; every implementation is called.

    :param register: call ``register(PrunerClass)`` once per technique.
    """


@hookspec
def register_quantizers(register: Callable[[type["Quantizer"]], type["Quantizer"]]) -> None:
    """Register quantizers, selectable as ``- quantize: {name: ..., ...}`` stages.

    Called once when the plugin manager is built; every implementation is called.

    :param register: call ``register(QuantizerClass)`` once per technique.
    """


@hookspec
def register_decoders(register: Callable[[type["Decoder"]], type["Decoder"]]) -> None:
    """Register decoders for generative models, selectable as ``- decode: {name: ..., ...}`` stages.

    Called once when the plugin manager is built; every implementation is called.

    :param register: call ``register(DecoderClass)`` once per technique.
    """


@hookspec
def register_exporters(register: Callable[[type["Exporter"]], type["Exporter"]]) -> None:
    """Register exporters, selectable as ``- export: {name: ..., ...}`` stages.

    Called once when the plugin manager is built; every implementation is called.

    :param register: call ``register(ExporterClass)`` once per technique.
    """
