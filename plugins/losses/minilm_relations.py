"""MiniLM self-attention distribution and value-relation transfer. Wang et al., "MiniLM: Deep
Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained Transformers", NeurIPS 2020.

For one teacher layer and one student layer (the last by default, as in the paper), per attention head
``a`` and query position ``t``:

    L_AT = 1/(A·|x|) Σ_a Σ_t KL(softmax(Q_T K_Tᵀ / √d_T)[a, t] ‖ softmax(Q_S K_Sᵀ / √d_S)[a, t])
    L_VR = 1/(A·|x|) Σ_a Σ_t KL(softmax(V_T V_Tᵀ / √d_T)[a, t] ‖ softmax(V_S V_Sᵀ / √d_S)[a, t])

Both relations are seq × seq per head, so the hidden sizes of teacher and student may differ; the head
counts must match (the paper's requirement). ``relation_heads`` instead splits Q, K and V of both
models into that many relation heads (the generalisation of MiniLMv2), lifting the head-count
constraint. Queries, keys and values are captured from the attention's projection modules with forward
hooks, so the models are not modified. Padding keys are masked out and padding queries not counted.

Identities the tests check: the loss is zero for identical models; it is unchanged when a student's
queries and keys are rotated by the same orthogonal matrix within each head (only relations matter);
it runs when hidden sizes differ.

YAML:  - {name: minilm_relations, weight: 1.0, layer: -1}
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from potstill.hookspecs import hookimpl
from potstill.models import num_attention_heads, qkv_paths
from potstill.techniques import Loss, LossOptions, Outputs


def split_heads(x: Tensor, heads: int) -> Tensor:
    batch, seq, hidden = x.shape
    if hidden % heads:
        raise ValueError(f"minilm_relations: hidden size {hidden} is not divisible by {heads} heads")
    return x.view(batch, seq, heads, hidden // heads).transpose(1, 2)  # B, A, S, d


def relation_logprobs(left: Tensor, right: Tensor, heads: int, key_mask: Tensor | None) -> Tensor:
    """log softmax(left rightᵀ / √d) per head: [B, A, S, S]."""
    left_h, right_h = split_heads(left.float(), heads), split_heads(right.float(), heads)
    scores = left_h @ right_h.transpose(-1, -2) / math.sqrt(left_h.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def relation_kl(teacher_logp: Tensor, student_logp: Tensor, query_mask: Tensor | None) -> Tensor:
    """KL(teacher ‖ student) over keys, averaged over heads and (unmasked) query positions."""
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)  # B, A, S
    kl = kl.mean(1)  # over heads
    if query_mask is None:
        return kl.mean()
    mask = query_mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


class MiniLMRelations(Loss):
    name = "minilm_relations"
    needs = ()

    class Options(LossOptions):
        layer: int = Field(-1, description="teacher layer (and student layer unless student_layer is set)")
        student_layer: int | None = None
        relation_heads: int | None = Field(None, gt=0, description="split into this many heads instead of the models' own")
        attention: bool = Field(True, description="include the attention-distribution (Q-K) term")
        values: bool = Field(True, description="include the value-relation (V-V) term")
        layers_path: str | None = None

    def _layer(self, role: str) -> int:
        if role == "student" and self.options.student_layer is not None:
            return self.options.student_layer
        return self.options.layer

    def capture(self, model: nn.Module, role: str) -> dict[str, str]:
        q, k, v = qkv_paths(model, self._layer(role), self.options.layers_path)
        return {"query": q, "key": k, "value": v}

    def setup(self, student: nn.Module, teacher: nn.Module) -> None:
        if self.options.relation_heads:
            self.heads = (self.options.relation_heads, self.options.relation_heads)
            return
        student_heads, teacher_heads = num_attention_heads(student), num_attention_heads(teacher)
        if not student_heads or not teacher_heads:
            raise ValueError("minilm_relations: cannot read the head counts from the models' config; set relation_heads")
        if student_heads != teacher_heads:
            raise ValueError(f"minilm_relations: student has {student_heads} heads, teacher {teacher_heads}; "
                             f"set relation_heads to a number dividing both hidden sizes")
        self.heads = (student_heads, teacher_heads)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict[str, Tensor]) -> Tensor:
        student_heads, teacher_heads = getattr(self, "heads", (None, None))
        if student_heads is None:
            raise RuntimeError("minilm_relations: setup(student, teacher) was not called")
        mask = student.attention_mask
        total = torch.zeros((), device=student.features["query"].device)
        pairs = []
        if self.options.attention:
            pairs.append(("query", "key"))
        if self.options.values:
            pairs.append(("value", "value"))
        for left, right in pairs:
            teacher_logp = relation_logprobs(teacher.features[left], teacher.features[right], teacher_heads, mask)
            student_logp = relation_logprobs(student.features[left], student.features[right], student_heads, mask)
            total = total + relation_kl(teacher_logp, student_logp, mask)
        return total


@hookimpl
def register_losses(register):
    register(MiniLMRelations)
