"""Layer drop: the student keeps chosen layers of the teacher, with their weights.

The initialization used by MiniLM-style and ERNIE-Tiny-style task-agnostic distillation of BERT
students (and by DistilBERT, which keeps every other layer): the student is the teacher with some
transformer blocks removed, so it starts close to the teacher. Keeping every layer gives back the
teacher exactly; the tests check that and that a subset computes exactly those layers in order.

YAML:  {name: layer_drop, keep: [1, 3, 5]}
"""

from __future__ import annotations

import copy

from pydantic import Field, field_validator
from torch import nn

from potstill.hookspecs import hookimpl
from potstill.models import find_layers, set_module
from potstill.techniques import Context, Options, Student


class LayerDrop(Student):
    name = "layer_drop"

    class Options(Options):
        keep: list[int] = Field(min_length=1, description="indices of the teacher layers to keep, in order")
        layers_path: str | None = Field(None, description="module path of the layer list; found automatically")

        @field_validator("keep")
        @classmethod
        def _unique(cls, keep: list[int]) -> list[int]:
            if len(set(keep)) != len(keep):
                raise ValueError(f"layer indices must be distinct, got {keep}")
            return keep

    def build(self, teacher: nn.Module, ctx: Context | None = None) -> nn.Module:
        student = copy.deepcopy(teacher)
        path, layers = find_layers(student, self.options.layers_path)
        bad = [i for i in self.options.keep if not -len(layers) <= i < len(layers)]
        if bad:
            raise ValueError(f"layer_drop.keep: {bad} out of range; the teacher has {len(layers)} layers (0..{len(layers) - 1})")
        set_module(student, path, nn.ModuleList([layers[i] for i in self.options.keep]))
        config = getattr(student, "config", None)
        if config is not None and hasattr(config, "num_hidden_layers"):
            config.num_hidden_layers = len(self.options.keep)
        return student


@hookimpl
def register_students(register):
    register(LayerDrop)
