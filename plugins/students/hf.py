"""A local Hugging Face model folder as the student, built without the teacher's weights.

For teachers whose weights are not at hand (an ONNX file, an HTTP endpoint, a cache of outputs, an ensemble),
and for any student that is not derived from the teacher: the folder's model is loaded with the class the task
asks for (``AutoModelForCausalLM`` for ``causal_lm``), in float32, trainable. ``bundled:`` names the same
models as the ``hf`` teacher (``bundled:minilm``, ``bundled:cpython-byte-lm``). ``reinitialize: true`` keeps
the architecture and draws fresh weights (seeded by the spec's seed), for a student trained from scratch.

YAML:  {name: hf, path: "bundled:cpython-byte-lm", reinitialize: false}
"""

from __future__ import annotations

import os

import torch
from pydantic import Field
from torch import nn

from potstill.hookspecs import hookimpl
from potstill.plugins.teachers.hf import HFTeacher
from potstill.techniques import Context, Student


class HFStudent(Student):
    name = "hf"
    requires = {"transformers": "potstill[hf]"}
    uses_teacher_weights = False
    conformance_world = "causal_lm"  # its docstring example is the byte-level GPT-2

    class Options(HFTeacher.Options):
        reinitialize: bool = Field(False, description="keep the architecture, draw new weights (seeded)")

    def build(self, teacher: nn.Module | None, ctx: Context | None = None) -> nn.Module:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers

        path = HFTeacher(HFTeacher.Options.model_construct(path=self.options.path, dtype="float32")).resolved_path()
        auto_class = getattr(transformers, getattr(getattr(ctx, "task", None), "hf_auto_class", "AutoModel"))
        if self.options.reinitialize:
            config = transformers.AutoConfig.from_pretrained(path)
            torch.manual_seed(ctx.seed if ctx is not None else 0)
            model = auto_class.from_config(config)
        else:
            model = auto_class.from_pretrained(path, dtype=getattr(torch, self.options.dtype))
        model.train()
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model


@hookimpl
def register_students(register):
    register(HFStudent)
