"""MOHAWK: GPT-2's softmax attention replaced by a selective state-space (Mamba-2 SSD-style) matrix mixer.

After Bick, Li, Xing, Kolter & Gu, "Transformers to SSMs: Distilling Quadratic Knowledge to Subquadratic
Models" (NeurIPS 2024). Both softmax attention and Mamba-2's SSD layer are *matrix mixers*, ``y = M x`` with
``M`` a T × T matrix per head; MOHAWK distils the first into the second in three stages: (1) **matrix
orientation**, ``‖M_attn(u) − M_ssm(u)‖_F`` per layer on the teacher's layer input ``u``; (2) **hidden-state
alignment**, each student block's output against the teacher block's on the same input; (3) end-to-end
distillation of the logits. This module builds the student (stage 0: the architecture and the weight transfer);
stages 1 and 2 are the loss ``mohawk_align`` (``stage: matrix`` / ``stage: hidden``), stage 3 is ``kd``.

The mixer, per head h (``H`` heads of size ``d``, as the teacher's), on the block's normalised input ``u``:

    C_t, B_t, x_t = (u W_q)_t, (u W_k)_t, (u W_v)_t           (the teacher's c_attn, carried over)
    log a_t = −softplus(u_t · w_h + b_h)                       (input-dependent scalar decay, a_t ∈ (0, 1))
    y_t = Σ_{s≤t} (Π_{r=s+1..t} a_r) · (C_t · B_s) / √d · x_s   (SSD: a 1-semiseparable matrix ∘ C Bᵀ)

so ``M = L ∘ (C Bᵀ/√d)`` with ``L_ts = exp(A_t − A_s)`` for ``s ≤ t`` (0 above the diagonal), ``A`` the
cumulative log-decay; the output projection (c_proj) is the teacher's. Equivalently, as a recurrence with a
``d × d`` state per head, ``S_t = a_t S_{t−1} + B_t x_tᵀ``, ``y_t = S_tᵀ C_t / √d``. With ``normalize: true``
(default) each row is divided by its decay mass ``z_t = Σ_{s≤t} L_ts`` (recurrently ``z_t = a_t z_{t−1} + 1``),
so the output is a decayed *average* and its scale does not grow with t (a choice made here, for stable
training from the teacher's q/k; Mamba-2 itself has no such normaliser). ``decay: false`` fixes ``a ≡ 1``; with
it and ``normalize: false`` the mixer is exactly causal unnormalised linear attention with the teacher's q, k
(the tests check it). ``w`` starts at 0 and ``b`` so that ``a = decay_init`` at the start.

Choices (documented departures from the paper's Phi-Mamba): no short convolution, no D skip and no gate /
output norm in the mixer; multi-head with the teacher's head count, C/B/x per head from W_q/W_k/W_v.

Forms: :meth:`MohawkMixer.mixing_matrix` materialises ``M`` (``[B, H, T, T]``, lower triangular); the forward
(training, export) is the quadratic SSD "attention" form ``y = M x``; ``mode = "recurrent"`` runs the
recurrence token by token with an O(1) state (:func:`recurrent_logits`), for decoding. ``attention_mask`` is
not used: the mixer is causal, so the ``causal_lm`` task's right padding cannot reach real tokens.
``trainable: mixer`` leaves only the attention replacements (q/k/v/o projections and decay) trainable, as in
stages 1–2; ``all`` (default) everything, for stage 3.

YAML:  {name: mohawk, decay: true, normalize: true, decay_init: 0.97, trainable: all}
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from potstill.hookspecs import hookimpl
from potstill.techniques import Context, Options, Student


class MohawkMixer(nn.Module):
    """Drop-in replacement of a Hugging Face ``GPT2Attention`` (self-attention only): a multi-head SSD mixer."""

    def __init__(self, source: nn.Module, decay: bool, normalize: bool, decay_init: float):
        super().__init__()
        hidden, heads = source.embed_dim, source.num_heads
        self.hidden, self.heads, self.head_dim = hidden, heads, hidden // heads
        self.c_attn, self.c_proj, self.resid_dropout = source.c_attn, source.c_proj, source.resid_dropout
        self.scale = 1 / math.sqrt(self.head_dim) if getattr(source, "scale_attn_weights", True) else 1.0
        self.normalize = normalize
        weight = source.c_attn.weight
        self.decay = nn.Linear(hidden, heads, dtype=weight.dtype, device=weight.device) if decay else None
        if self.decay is not None:
            with torch.no_grad():
                self.decay.weight.zero_()
                # softplus(b) = −log a  ⇒  b = log(exp(−log a) − 1)
                self.decay.bias.fill_(math.log(math.expm1(-math.log(decay_init))))
        self.mode: Literal["parallel", "recurrent"] = "parallel"
        self._state: dict[str, Tensor] | None = None

    # -- pieces ----------------------------------------------------------------------------------------

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def projections(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``C, B, x`` per head, ``[B, H, T, d]`` each."""
        c, b, x = self.c_attn(u).split(self.hidden, dim=2)
        return self._heads(c), self._heads(b), self._heads(x)

    def log_decay(self, u: Tensor) -> Tensor:
        """``log a_t`` per head, ``[B, H, T]`` (0 without decay)."""
        if self.decay is None:
            return u.new_zeros(u.shape[0], self.heads, u.shape[1])
        return -F.softplus(self.decay(u)).transpose(1, 2)

    def mixing_matrix(self, u: Tensor) -> Tensor:
        """The materialised sequence-mixing matrix ``M [B, H, T, T]`` for input ``u [B, T, hidden]``."""
        c, b, _ = self.projections(u)
        return self._matrix(c, b, self.log_decay(u))

    def _matrix(self, c: Tensor, b: Tensor, log_a: Tensor) -> Tensor:
        t = c.shape[2]
        causal = torch.ones(t, t, dtype=torch.bool, device=c.device).tril()
        cumulative = torch.cumsum(log_a, dim=-1)  # A_t
        # L_ts = exp(A_t − A_s) for s ≤ t; the difference is masked before exp so nothing overflows
        segment = (cumulative[..., :, None] - cumulative[..., None, :]).masked_fill(~causal, float("-inf"))
        decay = torch.exp(segment)
        matrix = decay * (c @ b.transpose(-1, -2)) * self.scale
        if self.normalize:
            matrix = matrix / decay.sum(-1, keepdim=True)
        return matrix

    def _merge(self, y: Tensor) -> Tensor:
        b, _, t, _ = y.shape
        return y.transpose(1, 2).reshape(b, t, self.hidden)

    # -- the two forms ---------------------------------------------------------------------------------

    def parallel(self, u: Tensor) -> Tensor:
        c, b, x = self.projections(u)
        return self._merge(self._matrix(c, b, self.log_decay(u)) @ x)

    def reset_state(self) -> None:
        self._state = None

    def recurrent(self, u: Tensor) -> Tensor:
        """Token by token from the stored state (``[B, T, hidden]``, any T; the state is kept for the next call)."""
        c, b, x = self.projections(u)
        a = torch.exp(self.log_decay(u))  # [B, H, T]
        if self._state is None:
            self._state = {"S": u.new_zeros(u.shape[0], self.heads, self.head_dim, self.head_dim),
                           "z": u.new_zeros(u.shape[0], self.heads, 1)}
        st = self._state
        outs = []
        for t in range(u.shape[1]):
            at = a[:, :, t, None]
            st["S"] = at[..., None] * st["S"] + b[:, :, t, :, None] * x[:, :, t, None, :]  # B_t x_tᵀ
            st["z"] = at * st["z"] + 1
            y = torch.einsum("bhd,bhde->bhe", c[:, :, t], st["S"]) * self.scale
            if self.normalize:
                y = y / st["z"]
            outs.append(y[:, :, None])
        return self._merge(torch.cat(outs, dim=2))

    def state_floats(self) -> int:
        """Numbers of recurrent state per sequence and layer (constant in the sequence length)."""
        return self.heads * (self.head_dim * self.head_dim + 1)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        if kwargs.get("encoder_hidden_states") is not None:
            raise ValueError("mohawk: cross-attention is not converted")
        position = kwargs.get("cache_position")
        if (self.mode == "parallel" and position is not None and not torch.compiler.is_compiling()
                and position.numel() and int(position[0]) > 0):
            raise ValueError("mohawk: decoding with a key/value cache (generate) is not supported; the state is "
                             "recurrent: use potstill.plugins.students.mohawk.recurrent_logits")
        hidden_states = hidden_states.contiguous()
        y = self.recurrent(hidden_states) if self.mode == "recurrent" else self.parallel(hidden_states)
        return self.resid_dropout(self.c_proj(y)), None


# -------------------------------------------------------------------------------------------------------
# helpers shared with the mohawk_align loss: any GPT-2 block's mixer as a matrix, and a block on a given input
# -------------------------------------------------------------------------------------------------------


def gpt2_blocks(model: nn.Module, who: str) -> list[nn.Module]:
    """``transformer.h`` of a GPT-2 style decoder (attention original or converted)."""
    base = getattr(model, "transformer", model)
    blocks = getattr(base, "h", None)
    ok = isinstance(blocks, nn.ModuleList) and all(
        hasattr(b, "attn") and hasattr(b.attn, "c_attn") and hasattr(b, "ln_1") and hasattr(b, "mlp") for b in blocks)
    if not ok:
        raise ValueError(f"{who}: {type(model).__name__} is not a GPT-2 style decoder "
                         "(transformer.h[*].ln_1/attn.c_attn/mlp), which this supports")
    return list(blocks)


def softmax_attention_matrix(attn: nn.Module, u: Tensor) -> Tensor:
    """Causal ``softmax(Q Kᵀ · scale)`` ``[B, H, T, T]`` of a Hugging Face ``GPT2Attention`` on input ``u``."""
    hidden, heads = attn.embed_dim, attn.num_heads
    q, k, _ = attn.c_attn(u).split(hidden, dim=2)
    b, t, _ = u.shape
    q, k = (z.view(b, t, heads, hidden // heads).transpose(1, 2) for z in (q, k))
    scores = q @ k.transpose(-1, -2)
    if getattr(attn, "scale_attn_weights", True):
        scores = scores / math.sqrt(hidden // heads)
    if getattr(attn, "scale_attn_by_inverse_layer_idx", False):
        scores = scores / float(attn.layer_idx + 1)
    causal = torch.ones(t, t, dtype=torch.bool, device=u.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


def mixing_matrix(attn: nn.Module, u: Tensor) -> Tensor:
    """The sequence-mixing matrix of a block's attention (converted or softmax) on its normalised input ``u``."""
    if isinstance(attn, MohawkMixer):
        return attn.mixing_matrix(u)
    return softmax_attention_matrix(attn, u)


def mixer_output(attn: nn.Module, u: Tensor) -> Tensor:
    """The attention's output (before the residual) on ``u``: ``c_proj(M x)``, causal, no cache."""
    if isinstance(attn, MohawkMixer):
        return attn(u)[0]
    hidden, heads = attn.embed_dim, attn.num_heads
    _, _, v = attn.c_attn(u).split(hidden, dim=2)
    b, t, _ = u.shape
    v = v.view(b, t, heads, hidden // heads).transpose(1, 2)
    y = (softmax_attention_matrix(attn, u) @ v).transpose(1, 2).reshape(b, t, hidden)
    return attn.resid_dropout(attn.c_proj(y))


def block_output(block: nn.Module, h: Tensor) -> Tensor:
    """A GPT-2 block on its input ``h`` (pre-norm: ``h + attn(ln_1 h)``, then ``+ mlp(ln_2 ·)``)."""
    h = h + mixer_output(block.attn, block.ln_1(h))
    return h + block.mlp(block.ln_2(h))


# -------------------------------------------------------------------------------------------------------


class Mohawk(Student):
    name = "mohawk"
    #: the conformance runner builds it from this kind of teacher (a decoder, not the default tiny BERT)
    conformance_world = "causal_lm"

    class Options(Options):
        decay: bool = Field(True, description="input-dependent decay a_t (selective SSM); false: a ≡ 1")
        normalize: bool = Field(True, description="divide each row by its decay mass Σ_s L_ts (decayed average)")
        decay_init: float = Field(0.97, gt=0, lt=1, description="the decay a every token starts with (decay: true)")
        trainable: Literal["all", "mixer"] = Field(
            "all", description="train everything, or only the mixers (q/k/v/o projections and decay; stages 1–2)")

    def build(self, teacher: nn.Module, ctx: Context | None = None) -> nn.Module:
        o = self.options
        gpt2_blocks(teacher, self.name)
        student = copy.deepcopy(teacher).eval()
        blocks = gpt2_blocks(student, self.name)
        for block in blocks:
            if getattr(block.attn, "is_cross_attention", False):
                raise ValueError("mohawk: cross-attention is not converted")
            block.attn = MohawkMixer(block.attn, o.decay, o.normalize, o.decay_init)
        if o.trainable == "mixer":
            for name, p in student.named_parameters():
                p.requires_grad_(".attn." in name)
        if ctx is not None:
            first = blocks[0].attn
            ctx.record.update({"mohawk_state_floats_per_layer": first.state_floats(),
                               "mohawk_teacher_kv_floats_per_token_layer": 2 * first.hidden})
        return student


def set_mode(model: nn.Module, mode: Literal["parallel", "recurrent"]) -> None:
    for module in model.modules():
        if isinstance(module, MohawkMixer):
            module.mode = mode
            module.reset_state()


@torch.no_grad()
def recurrent_logits(model: nn.Module, input_ids: Tensor, chunk: int = 1) -> Tensor:
    """The logits of a converted GPT-2 computed in the recurrent form, ``chunk`` tokens per call (1: token by
    token, as in decoding). Returns ``[B, T, vocab]``; the model is left in the parallel form."""
    set_mode(model, "recurrent")
    try:
        outs = []
        for start in range(0, input_ids.shape[1], chunk):
            ids = input_ids[:, start:start + chunk]
            positions = torch.arange(start, start + ids.shape[1])[None].expand_as(ids)
            outs.append(model(input_ids=ids, position_ids=positions, use_cache=False).logits)
        return torch.cat(outs, dim=1)
    finally:
        set_mode(model, "parallel")


@hookimpl
def register_students(register):
    register(Mohawk)
