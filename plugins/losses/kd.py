"""Knowledge distillation with softened targets. Hinton, Vinyals & Dean, "Distilling the Knowledge in a
Neural Network", 2015.

``T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))``, averaged over examples (and over unmasked positions for
sequence logits). The T² keeps gradient magnitudes comparable across temperatures; for large T and
zero-mean logits the loss tends to ``mean((z_s - z_t)²) / 2`` per example over classes (the paper's
logit-matching limit), which the tests check.

YAML:  - {name: kd, temperature: 4.0, weight: 1.0}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from potstill.hookspecs import hookimpl
from potstill.techniques import Loss, LossOptions, Outputs


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask: Tensor | None = None) -> Tensor:
    # at least float32, but keep float64: at high T the KL is a small difference of large terms
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    student_logp = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    per_position = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    if mask is not None:
        mask = mask.to(per_position.dtype)
        return (per_position * mask).sum() / mask.sum().clamp(min=1) * temperature**2
    return per_position.mean() * temperature**2


class KD(Loss):
    name = "kd"
    needs = ("logits",)

    class Options(LossOptions):
        temperature: float = Field(4.0, gt=0)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict[str, Tensor]) -> Tensor:
        student_logits = student.require("logits", self.name)
        teacher_logits = teacher.require("logits", self.name)
        mask = student.attention_mask if student_logits.dim() == 3 else None
        return kd_loss(student_logits, teacher_logits, self.options.temperature, mask)


@hookimpl
def register_losses(register):
    register(KD)
