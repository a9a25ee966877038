"""MOHAWK stages 1 and 2: matrix orientation and hidden-state alignment of a converted (SSM) student.

Bick, Li, Xing, Kolter & Gu, "Transformers to SSMs: Distilling Quadratic Knowledge to Subquadratic Models"
(NeurIPS 2024). Each student block i is paired with a teacher block j (uniform map, the last with the last;
equal depths pair i with i) and, as in the paper, fed the **teacher's** input to that block, so every layer
is trained independently of the others:

- ``stage: matrix`` (stage 1, matrix orientation): with ``u`` the teacher's normalised input to the mixer
  (``ln_1`` output), ``M_T(u) = softmax(Q Kᵀ/√d)`` causal (the teacher's attention) and ``M_S(u)`` the student
  mixer's materialised matrix (``MohawkMixer.mixing_matrix``; for a softmax student, its own attention):

      L = mean_{pairs, sequences, heads} ‖(M_S(u) − M_T(u)) ∘ m mᵀ‖_F

  ``m`` the attention mask (entries involving padding are dropped); head counts must match.
- ``stage: hidden`` (stage 2, hidden-state alignment): with ``h`` the teacher's input to block j,

      L = mean_{pairs} mean_{real tokens} ‖StudentBlock_i(h) − TeacherBlock_j(h)‖_2

  (pre-norm GPT-2 block: ``h + mixer(ln_1 h)``, then ``+ mlp(ln_2 ·)``).

The paper's norms are used as they are (Frobenius / L2 norms, not squared; each clamped at 1e-20 under the
root so the gradient at 0 is finite). ``inputs: student`` feeds each student block its own input instead (the
student's forward, captured); the default feeds the teacher's when the hidden sizes match and the student's
otherwise (teacher forcing needs equal sizes), with, for ``stage: hidden``, a trainable linear map from the
student's hidden size to the teacher's (FitNets-style; an addition for unequal sizes, not in the paper).
The teacher's matrices and states are computed without gradient. Stage 3 is end-to-end ``kd`` on logits.
Supports GPT-2 style decoders (``transformer.h[*]``), softmax or converted by the ``mohawk`` student.

YAML:  - {name: mohawk_align, stage: matrix, weight: 1.0}
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from potstill.hookspecs import hookimpl
from potstill.plugins.losses._c_common import layer_map
from potstill.plugins.students.mohawk import MohawkMixer, block_output, gpt2_blocks, mixing_matrix
from potstill.techniques import Loss, LossOptions, Outputs

_TINY = 1e-20


def _at_least_float(x: Tensor) -> Tensor:
    """float32, or the input's precision when higher (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _prefix(model: nn.Module) -> str:
    return "transformer." if hasattr(model, "transformer") else ""


def _hidden(blocks: list[nn.Module]) -> int:
    return int(blocks[0].ln_1.normalized_shape[0])


def _heads(attn: nn.Module) -> int:
    return attn.heads if isinstance(attn, MohawkMixer) else attn.num_heads


class MohawkAlign(Loss):
    name = "mohawk_align"
    tasks = ("causal_lm",)

    class Options(LossOptions):
        stage: Literal["matrix", "hidden"] = Field(
            "matrix", description="matrix: stage 1, mixing matrices (Frobenius); hidden: stage 2, block outputs (L2)")
        inputs: Literal["teacher", "student"] | None = Field(
            None, description="whose block inputs the student's blocks see (default: the teacher's when the hidden "
                              "sizes match, else the student's)")

    def setup(self, student: nn.Module, teacher: nn.Module) -> None:
        s_blocks, t_blocks = gpt2_blocks(student, self.name), gpt2_blocks(teacher, self.name)
        # plain lists: the models' modules are used, not registered (their parameters are not the loss's)
        self._student_blocks, self._teacher_blocks = s_blocks, t_blocks
        self._pairs = [(i, j - 1) for i, j in enumerate(layer_map(len(s_blocks), len(t_blocks)))]
        s_size, t_size = _hidden(s_blocks), _hidden(t_blocks)
        if self.options.inputs == "teacher" and s_size != t_size:
            raise ValueError(f"mohawk_align.inputs: teacher forcing needs equal hidden sizes (student {s_size}, "
                             f"teacher {t_size}); use inputs: student")
        self.teacher_forced = self.options.inputs == "teacher" or (self.options.inputs is None and s_size == t_size)
        if self.options.stage == "matrix":
            for i, j in self._pairs:
                hs, ht = _heads(s_blocks[i].attn), _heads(t_blocks[j].attn)
                if hs != ht:
                    raise ValueError(f"mohawk_align.stage: matrix compares per-head matrices, but student block {i} "
                                     f"has {hs} heads and teacher block {j} {ht}; use stage: hidden")
        self.projection = None
        if self.options.stage == "hidden" and s_size != t_size:
            self.projection = nn.Linear(s_size, t_size)

    def _block_io(self, prefix: str, index: int, key: str) -> dict[str, str]:
        before = f"{prefix}drop" if index == 0 else f"{prefix}h.{index - 1}"
        return {f"{key}_in": before, f"{key}_out": f"{prefix}h.{index}"}

    def capture(self, model: nn.Module, role: Literal["student", "teacher"]) -> dict[str, str]:
        prefix, paths = _prefix(model), {}
        if role == "student" and self.teacher_forced:
            return paths
        for i, j in self._pairs:
            index = j if role == "teacher" else i
            key = f"{role[0]}{index}"
            if self.options.stage == "matrix":
                paths[f"{key}_u"] = f"{prefix}h.{index}.ln_1"
            else:
                paths.update(self._block_io(prefix, index, key))
        return paths

    def forward(self, student: Outputs, teacher: Outputs, batch: dict[str, Tensor]) -> Tensor:
        mask = student.attention_mask if student.attention_mask is not None else batch.get("attention_mask")
        values = []
        for i, j in self._pairs:
            if self.options.stage == "matrix":
                u_t = teacher.features[f"t{j}_u"].detach()
                u_s = u_t if self.teacher_forced else student.features[f"s{i}_u"]
                with torch.no_grad():
                    target = _at_least_float(mixing_matrix(self._teacher_blocks[j].attn, u_t))
                matrix = _at_least_float(mixing_matrix(self._student_blocks[i].attn, u_s))
                diff = matrix - target
                if mask is not None:
                    m = mask.to(diff.dtype)
                    diff = diff * (m[:, None, :, None] * m[:, None, None, :])
                values.append(diff.pow(2).sum((-1, -2)).clamp_min(_TINY).sqrt().mean())
            else:
                h_in = teacher.features[f"t{j}_in"].detach()
                with torch.no_grad():
                    target = _at_least_float(teacher.features[f"t{j}_out"].detach())
                if self.teacher_forced:
                    out = block_output(self._student_blocks[i], h_in)
                else:
                    out = student.features[f"s{i}_out"]
                out = _at_least_float(out)
                if self.projection is not None:
                    out = self.projection(out)
                norms = (out - target).pow(2).sum(-1).clamp_min(_TINY).sqrt()  # [B, T]
                if mask is None:
                    values.append(norms.mean())
                else:
                    m = mask.to(norms.dtype)
                    values.append((norms * m).sum() / m.sum().clamp(min=1))
        return torch.stack(values).mean()


@hookimpl
def register_losses(register):
    register(MohawkAlign)
