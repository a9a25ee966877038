"""Knowledge distillation from the teacher's top-k log-probabilities plus the remaining mass, the form in which
APIs and offline logit caches serve a teacher (a KD loss in the sense of Hinton, Vinyals & Dean, "Distilling
the Knowledge in a Neural Network", 2015, over a coarsened distribution).

The teacher's distribution is represented by k ``(index, log-probability)`` pairs and a (k+1)-th bucket,
"everything else", holding the mass ``1 − Σ_top-k p_t``. The student's distribution (at the same temperature)
is collapsed onto the same k+1 buckets: its probabilities of the k indices, and the sum of all its other
probabilities. The loss is

    T² · Σ_{b = 1..k+1} p_t(b) · (log p_t(b) − log p_s(b))

averaged over examples (and over unmasked positions, ``attention_mask``, for sequence logits ``[B, T, V]``).
With k ≥ V (k is capped at V) the last bucket is empty and the loss is exactly :mod:`kd`; it is zero whenever
the student puts the teacher's mass on each of the k+1 buckets, whatever it does inside the last one.

The teacher comes either as full logits (the top k are taken here, after dividing by T) or precomputed, as
``batch["teacher_topk_indices"]`` (long, ``[B, k]`` or ``[B, T, k]``) and ``batch["teacher_topk_logprobs"]``
(same shape, natural-log probabilities normalized over the full vocabulary), which a teacher helper or cache
fills; when those keys are present the teacher's logits are not read. Precomputed log-probabilities are the
distribution as served (at the API's temperature), so they need ``temperature: 1``. The remaining mass is
computed in log space (``log(1 − exp(logsumexp top-k))``) and the student's as a log-sum-exp over the
indices outside the top k, so neither underflows when the top k hold almost all the mass.

YAML:  - {name: sparse_topk_kd, k: 20, temperature: 1.0, weight: 1.0}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from potstill.hookspecs import hookimpl
from potstill.techniques import ExternalTeacher, Loss, LossOptions, Outputs

INDICES, LOGPROBS = "teacher_topk_indices", "teacher_topk_logprobs"


def _log1mexp(log_mass: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for x ≤ 0, accurate at both ends; exactly -inf at x = 0."""
    x = log_mass.clamp(max=0.0)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def bucket_logprobs(logp: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probabilities of the k ``indices`` and of the rest: ``[..., V]`` log-probs → ``[..., k+1]``, and
    whether the rest bucket holds any index at all (it does not when the k indices cover the vocabulary)."""
    top = logp.gather(-1, indices)
    outside = torch.ones_like(logp, dtype=torch.bool).scatter(-1, indices, False)
    # the lowest finite value, not -inf: with k = V every entry is masked, and log-sum-exp's backward of an
    # all -inf row is NaN even where no gradient flows
    rest = logp.masked_fill(~outside, torch.finfo(logp.dtype).min).logsumexp(-1, keepdim=True)
    return torch.cat([top, rest], -1), outside.any(-1, keepdim=True)


def teacher_buckets(indices: Tensor, logprobs: Tensor) -> Tensor:
    """The teacher's k+1 bucket log-probabilities from its top-k log-probabilities."""
    rest = _log1mexp(logprobs.logsumexp(-1, keepdim=True))
    return torch.cat([logprobs, rest], -1)


def sparse_topk_kd_loss(student_logits: Tensor, indices: Tensor, teacher_logprobs: Tensor, temperature: float = 1.0,
                        mask: Tensor | None = None) -> Tensor:
    """The loss from student logits ``[..., V]`` and the teacher's top-k ``indices``/``teacher_logprobs``."""
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logprobs.dtype), torch.float32)
    student_logp = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    student_b, has_rest = bucket_logprobs(student_logp, indices)
    teacher_b = teacher_buckets(indices, teacher_logprobs.to(dtype))
    teacher_p = teacher_b.exp()
    # 0 · log 0 = 0: an empty bucket contributes nothing; when the k indices are the whole vocabulary the rest
    # bucket does not exist (the teacher's is then rounding error, 1 − Σ p ≈ 1e-16)
    exists = torch.cat([torch.ones_like(indices, dtype=torch.bool), has_rest], -1) & (teacher_p > 0)
    terms = torch.where(exists, teacher_p * (teacher_b - student_b), torch.zeros_like(teacher_p))
    per_position = terms.sum(-1)
    if mask is not None:
        mask = mask.to(per_position.dtype)
        return (per_position * mask).sum() / mask.sum().clamp(min=1) * temperature**2
    return per_position.mean() * temperature**2


class SparseTopKKD(Loss):
    name = "sparse_topk_kd"
    needs = ("logits",)

    class Options(LossOptions):
        k: int = Field(20, ge=1, description="how many of the teacher's most probable classes/tokens are kept (at most V)")
        temperature: float = Field(1.0, gt=0, description="softening temperature (must be 1 with precomputed log-probs)")

    def prepare(self, batch: dict[str, Tensor], student: torch.nn.Module, teacher: torch.nn.Module) -> dict[str, Tensor]:
        """A teacher that serves only its top k (an API, a cache) fills the batch's top-k keys itself."""
        if INDICES not in batch and isinstance(teacher, ExternalTeacher) and type(teacher).topk is not ExternalTeacher.topk:
            with torch.no_grad():
                indices, logprobs = teacher.topk(batch, self.options.k)
            batch = {**batch, INDICES: indices, LOGPROBS: logprobs}
        return batch

    def forward(self, student: Outputs, teacher: Outputs, batch: dict[str, Tensor]) -> Tensor:
        student_logits = student.require("logits", self.name)
        vocab = student_logits.shape[-1]
        if INDICES in batch or LOGPROBS in batch:
            if INDICES not in batch or LOGPROBS not in batch:
                raise ValueError(f"{self.name}: the batch has only one of {INDICES!r} and {LOGPROBS!r}; give both")
            indices, logprobs = batch[INDICES].long(), batch[LOGPROBS]
            if indices.shape != logprobs.shape or indices.shape[:-1] != student_logits.shape[:-1]:
                raise ValueError(f"{self.name}: {INDICES} {tuple(indices.shape)} and {LOGPROBS} {tuple(logprobs.shape)} "
                                 f"must both be the student's logits shape {tuple(student_logits.shape[:-1])} + (k,)")
            if self.options.temperature != 1.0:
                raise ValueError(f"{self.name}: precomputed top-k log-probabilities are the served distribution; "
                                 f"set temperature: 1 (got {self.options.temperature})")
            if int(indices.min()) < 0 or int(indices.max()) >= vocab:
                raise ValueError(f"{self.name}: {INDICES} must lie in [0, {vocab}) (the student's vocabulary)")
        else:
            teacher_logits = teacher.require("logits", self.name)
            if teacher_logits.shape != student_logits.shape:
                raise ValueError(f"{self.name}: student logits {tuple(student_logits.shape)} and teacher logits "
                                 f"{tuple(teacher_logits.shape)} differ; the two models need the same vocabulary")
            dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
            teacher_logp = F.log_softmax(teacher_logits.to(dtype) / self.options.temperature, dim=-1)
            logprobs, indices = teacher_logp.topk(min(self.options.k, vocab), dim=-1)
        mask = student.attention_mask if student_logits.dim() == 3 else None
        return sparse_topk_kd_loss(student_logits, indices, logprobs, self.options.temperature, mask)


@hookimpl
def register_losses(register):
    register(SparseTopKKD)
