"""Mean squared error between a student and a teacher hidden state (FitNets-style hints; Romero et al.,
"FitNets: Hints for Thin Deep Nets", ICLR 2015; the hidden-state term of TinyBERT).

Layers are indexed as in ``output_hidden_states`` (0 is the embedding output, -1 the last layer). When
the hidden sizes differ, a learned linear map from the student's size to the teacher's is trained with
the student (the FitNets regressor). Padding positions are ignored. With ``normalize: true`` each
hidden state is layer-normalized (no affine) first, so the loss compares directions and relative scales.

YAML:  - {name: hidden_mse, student_layer: -1, teacher_layer: -1, weight: 1.0}
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from potstill.hookspecs import hookimpl
from potstill.techniques import Loss, LossOptions, Outputs


def _hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "hidden_size", None)


class HiddenMSE(Loss):
    name = "hidden_mse"
    needs = ("hidden_states",)

    class Options(LossOptions):
        student_layer: int = -1
        teacher_layer: int = -1
        normalize: bool = Field(False, description="layer-normalize both before comparing")

    def setup(self, student: nn.Module, teacher: nn.Module) -> None:
        student_size, teacher_size = _hidden_size(student), _hidden_size(teacher)
        self.projection = None
        if student_size and teacher_size and student_size != teacher_size:
            self.projection = nn.Linear(student_size, teacher_size)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict[str, Tensor]) -> Tensor:
        student_hidden = student.require("hidden_states", self.name)[self.options.student_layer].float()
        teacher_hidden = teacher.require("hidden_states", self.name)[self.options.teacher_layer].float()
        if getattr(self, "projection", None) is not None:
            student_hidden = self.projection(student_hidden)
        if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
            raise ValueError(f"hidden_mse: student hidden size {student_hidden.shape[-1]} != teacher's {teacher_hidden.shape[-1]}")
        if self.options.normalize:
            student_hidden = F.layer_norm(student_hidden, student_hidden.shape[-1:])
            teacher_hidden = F.layer_norm(teacher_hidden, teacher_hidden.shape[-1:])
        squared = (student_hidden - teacher_hidden).pow(2).mean(-1)
        mask = student.attention_mask
        if mask is None:
            return squared.mean()
        mask = mask.to(squared.dtype)
        return (squared * mask).sum() / mask.sum().clamp(min=1)


@hookimpl
def register_losses(register):
    register(HiddenMSE)
