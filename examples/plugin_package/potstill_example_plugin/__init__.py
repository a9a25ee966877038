"""Cosine loss on hidden states. Sanh, Debut, Chaumond & Wolf, "DistilBERT, a distilled version of BERT:
smaller, faster, cheaper and lighter", NeurIPS 2019 EMC^2 workshop (arXiv:1910.01108).

DistilBERT adds to its soft-target loss "a cosine embedding loss (L_cos) which will tend to align the
directions of the student and teacher hidden states vectors": ``1 - cos(h_s, h_t)`` for every
non-padding token, averaged. It is what ``torch.nn.CosineEmbeddingLoss`` with target 1 computes on the
unmasked token vectors (the tests check that). Only directions count: scaling either hidden state by a
positive number leaves the loss unchanged, so the student is free to use its own scale. The student and
teacher layers must have the same width (as DistilBERT's do); for different widths use ``hidden_mse``,
which learns a projection.

This module is also the example of a third-party potstill plugin: one technique class with an
``Options`` model, and one ``@hookimpl`` that registers it. ``pyproject.toml`` names this module in the
``potstill`` entry-point group, which is how potstill finds it.

YAML:  - {name: cosine_hidden, student_layer: -1, teacher_layer: -1, weight: 1.0}
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from potstill.hookspecs import hookimpl
from potstill.techniques import Loss, LossOptions, Outputs

__all__ = ["CosineHidden", "cosine_hidden_loss", "register_losses"]


def cosine_hidden_loss(student_hidden: Tensor, teacher_hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Mean of ``1 - cos`` between matching token vectors ``[batch, seq, hidden]``; padding is ignored."""
    distance = 1 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)
    if attention_mask is None:
        return distance.mean()
    mask = attention_mask.to(distance.dtype)
    return (distance * mask).sum() / mask.sum().clamp(min=1)


class CosineHidden(Loss):
    name = "cosine_hidden"
    needs = ("hidden_states",)

    class Options(LossOptions):
        # indexed as in ``output_hidden_states``: 0 is the embedding output, -1 the last layer
        student_layer: int = Field(-1, description="which student hidden state")
        teacher_layer: int = Field(-1, description="which teacher hidden state")

    def forward(self, student: Outputs, teacher: Outputs, batch: dict[str, Tensor]) -> Tensor:
        student_hidden = student.require("hidden_states", self.name)[self.options.student_layer]
        teacher_hidden = teacher.require("hidden_states", self.name)[self.options.teacher_layer]
        if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
            raise ValueError(f"cosine_hidden: student hidden size {student_hidden.shape[-1]} != teacher's "
                             f"{teacher_hidden.shape[-1]}; use hidden_mse, which learns a projection")
        return cosine_hidden_loss(student_hidden, teacher_hidden, student.attention_mask)


@hookimpl
def register_losses(register):
    register(CosineHidden)
