"""mohawk_align: zero for a student equal to the teacher (both stages); the hidden stage is the L2 distance of the
student's block (Hugging Face's own forward) and the teacher's on the teacher's block input; padding is ignored;
the matrix stage's gradient reaches only the student's mixers; unequal sizes use the student's own inputs and a
trained projection; stage 2 through the real distill loop lowers the loss; clear errors; and a reference value
from a plain-loop transcription (tests/fixtures/losses/mohawk_align.json).

    python tests/plugins/losses/test_mohawk_align.py --regenerate     # rewrite the fixture
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from potstill.capture import capture
from potstill.plugins.losses.mohawk_align import MohawkAlign
from potstill.plugins.students.mohawk import Mohawk, MohawkMixer
from potstill.plugins.tasks.causal_lm import CausalLM
from potstill.techniques import Context, Dataset, LoadedModel, Outputs

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "losses" / "mohawk_align.json"
TEXTS = ["def f(x): return x + 1", "class A: pass", "import os, sys  # the third one is longer"]


def run(loss, student, teacher, batch, no_grad_student=False):
    """One evaluation as the distill loop does it: capture, teacher without gradient, then the loss."""
    task = CausalLM(max_length=48)
    paths = {role: loss.capture(model, role) for role, model in (("student", student), ("teacher", teacher))}
    with torch.no_grad(), capture(teacher, paths["teacher"]) as captured:
        teacher_out = task.forward(teacher, batch)
    teacher_out.features = dict(captured)
    with capture(student, paths["student"]) as captured:
        student_out = task.forward(student, batch)
    student_out.features = dict(captured)
    return loss(student_out, teacher_out, batch), student_out, teacher_out


def texts_batch(pad_to=None):
    return CausalLM(max_length=48).collate(TEXTS, pad_to=pad_to)


@pytest.mark.parametrize("stage", ["matrix", "hidden"])
def test_zero_for_a_student_equal_to_the_teacher(tiny_gpt2, stage):
    teacher = tiny_gpt2(seed=1)
    loss = MohawkAlign(stage=stage)
    loss.setup(copy.deepcopy(teacher), teacher)
    value, _, _ = run(loss, copy.deepcopy(teacher), teacher, texts_batch())
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-4)


def test_hidden_stage_is_the_block_distance_on_the_teachers_input(tiny_gpt2):
    teacher = tiny_gpt2(seed=1, layers=2)
    student = Mohawk().build(teacher)
    loss = MohawkAlign(stage="hidden")
    loss.setup(student, teacher)
    batch = texts_batch()
    value, _, _ = run(loss, student, teacher, batch)
    with torch.no_grad():
        states = teacher(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
        mask = batch["attention_mask"].float()
        per_layer = []
        for layer in range(2):
            h = states[layer]  # the teacher's input to block `layer`
            target = teacher.transformer.h[layer](h)
            out = student.transformer.h[layer](h)  # Hugging Face's own block forward around the mixer
            target, out = (z[0] if isinstance(z, tuple) else z for z in (target, out))
            norms = (out - target).norm(dim=-1)
            per_layer.append(float((norms * mask).sum() / mask.sum()))
    assert float(value.detach()) == pytest.approx(sum(per_layer) / 2, rel=1e-5)
    assert float(value.detach()) > 0


@pytest.mark.parametrize("stage", ["matrix", "hidden"])
def test_padding_is_ignored(tiny_gpt2, stage):
    teacher = tiny_gpt2(seed=1)
    student = Mohawk().build(teacher)
    loss = MohawkAlign(stage=stage)
    loss.setup(student, teacher)
    batch = texts_batch(pad_to=48)
    value, student_out, teacher_out = run(loss, student, teacher, batch)
    padded = ~batch["attention_mask"].bool()
    assert padded.any()
    scribbled = Outputs(attention_mask=student_out.attention_mask,
                        features={k: v.masked_fill(padded[..., None], 1000.0) for k, v in teacher_out.features.items()})
    assert float(loss(student_out, scribbled, batch).detach()) == pytest.approx(float(value.detach()), rel=1e-5)


def test_matrix_stage_trains_only_the_mixers(tiny_gpt2):
    teacher = tiny_gpt2(seed=1)
    student = Mohawk().build(teacher).train()
    loss = MohawkAlign(stage="matrix")
    loss.setup(student, teacher)
    value, _, _ = run(loss, student, teacher, texts_batch())
    value.backward()
    with_grad = {n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(".attn.c_attn." in n or ".attn.decay." in n for n in with_grad), with_grad
    assert not any(p.grad is not None for p in teacher.parameters())


def test_unequal_sizes_use_the_students_own_inputs_and_a_projection(tiny_gpt2):
    teacher, student = tiny_gpt2(hidden=32, layers=2, seed=1), Mohawk().build(tiny_gpt2(hidden=16, layers=1, seed=2))
    loss = MohawkAlign(stage="hidden")
    loss.setup(student, teacher)
    assert not loss.teacher_forced and isinstance(loss.projection, nn.Linear)
    assert loss.capture(student, "student") == {"s0_in": "transformer.drop", "s0_out": "transformer.h.0"}
    assert loss.capture(teacher, "teacher") == {"t1_in": "transformer.h.0", "t1_out": "transformer.h.1"}
    value, _, _ = run(loss, student, teacher, texts_batch())
    value.backward()
    assert loss.projection.weight.grad.abs().sum() > 0
    assert student.transformer.h[0].mlp.c_fc.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mohawk_align.inputs: teacher forcing needs equal hidden sizes"):
        MohawkAlign(inputs="teacher").setup(student, teacher)


def test_head_count_mismatch_is_a_clear_error(tiny_gpt2):
    with pytest.raises(ValueError, match="mohawk_align.stage: matrix .* 4 heads .* 2"):
        MohawkAlign(stage="matrix").setup(tiny_gpt2(heads=4, seed=2), tiny_gpt2(heads=2, seed=1))
    with pytest.raises(ValueError, match="not a GPT-2 style decoder"):
        MohawkAlign().setup(nn.Linear(2, 2), tiny_gpt2())


def test_hidden_alignment_in_the_distill_loop_lowers_the_loss(trained_lm_pair, tmp_path, sentences):
    from potstill.spec import DistillOptions
    from potstill.train import Distiller

    teacher = trained_lm_pair[0]
    task = CausalLM(max_length=32)
    ctx = Context(seed=0, base_dir=tmp_path, out=tmp_path, task=task, progress=False,
                  data=Dataset(train=sentences[16:80], heldout=sentences[:16]), teacher=LoadedModel(teacher))
    student = Mohawk().build(teacher, ctx)
    held = task.collate(sentences[:8])

    def value():
        loss = MohawkAlign(stage="hidden")
        loss.setup(student, teacher)
        with torch.no_grad():
            return float(run(loss, student, teacher, held)[0])

    before = value()
    options = DistillOptions.model_validate({"steps": 12, "batch_size": 8, "optimizer": {"lr": 3e-3},
                                             "losses": [{"name": "mohawk_align", "stage": "hidden"}]})
    result = Distiller(student, teacher, [MohawkAlign(stage="hidden")], options, ctx, 0, tmp_path / "s", "f").run()
    assert result["finished"]
    after = value()
    assert after < 0.8 * before, (before, after)


# ------------------------------------------------------------------------------------------- reference value


def make_inputs() -> dict:
    g = torch.Generator().manual_seed(76)
    r = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).tolist()  # noqa: E731
    return {"u": r(2, 4, 4), "heads": 2, "mask": [[1, 1, 1, 1], [1, 1, 1, 0]],
            "teacher_w": r(4, 12), "teacher_b": r(12, scale=0.1), "student_w": r(4, 12), "student_b": r(12, scale=0.1),
            "decay_w": r(2, 4), "decay_b": r(2), "normalize": True}


def reference_value(x: dict) -> float:
    """mean over (sequence, head) of ‖(M_S − M_T) ∘ m mᵀ‖_F, M_T the causal softmax of q·k/√d (teacher weights),
    M_S[t, s] = Π_{r=s+1..t} a_r (C_t·B_s)/√d / Σ_{s'≤t} Π a_r, a_r = exp(−softplus(u_r·w_h + b_h)); u·W + b the
    q|k|v projection (q, k only are used), head h the slice [h·d, (h+1)·d) of q and of k."""
    heads, hidden = x["heads"], len(x["u"][0][0])
    d = hidden // heads

    def project(u, w, b, part, h):
        return [sum(u[i] * w[i][part * hidden + h * d + c] for i in range(hidden)) + b[part * hidden + h * d + c]
                for c in range(d)]

    def dot(p, q):
        return sum(a * c for a, c in zip(p, q))

    total, count = 0.0, 0
    for b, seq in enumerate(x["u"]):
        length = len(seq)
        for h in range(heads):
            tq = [project(u, x["teacher_w"], x["teacher_b"], 0, h) for u in seq]
            tk = [project(u, x["teacher_w"], x["teacher_b"], 1, h) for u in seq]
            sq = [project(u, x["student_w"], x["student_b"], 0, h) for u in seq]
            sk = [project(u, x["student_w"], x["student_b"], 1, h) for u in seq]
            a = []
            for u in seq:
                z = dot(u, x["decay_w"][h]) + x["decay_b"][h]
                a.append(math.exp(-math.log1p(math.exp(z))))
            squared = 0.0
            for t in range(length):
                scores = [dot(tq[t], tk[s]) / math.sqrt(d) for s in range(t + 1)]
                top = max(scores)
                exps = [math.exp(v - top) for v in scores]
                teacher_row = [e / sum(exps) for e in exps]
                weights = [math.prod(a[s + 1:t + 1]) for s in range(t + 1)]
                mass = sum(weights) if x["normalize"] else 1.0
                for s in range(t + 1):
                    student = weights[s] * dot(sq[t], sk[s]) / math.sqrt(d) / mass
                    if x["mask"][b][t] and x["mask"][b][s]:
                        squared += (student - teacher_row[s]) ** 2
            total += math.sqrt(squared)
            count += 1
    return total / count


def plugin_value(x: dict) -> float:
    from transformers import GPT2Config, GPT2LMHeadModel

    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    config = GPT2Config(vocab_size=256, n_positions=16, n_embd=len(x["u"][0][0]), n_layer=1, n_head=x["heads"])
    teacher = GPT2LMHeadModel(config).double().eval()
    student = Mohawk(normalize=x["normalize"]).build(teacher)
    mixer = next(m for m in student.modules() if isinstance(m, MohawkMixer))
    with torch.no_grad():
        teacher.transformer.h[0].attn.c_attn.weight.copy_(t(x["teacher_w"]))  # Conv1D: [in, out]
        teacher.transformer.h[0].attn.c_attn.bias.copy_(t(x["teacher_b"]))
        mixer.c_attn.weight.copy_(t(x["student_w"]))
        mixer.c_attn.bias.copy_(t(x["student_b"]))
        mixer.decay.weight.copy_(t(x["decay_w"]))
        mixer.decay.bias.copy_(t(x["decay_b"]))
    loss = MohawkAlign(stage="matrix")
    loss.setup(student, teacher)
    assert loss.capture(teacher, "teacher") == {"t0_u": "transformer.h.0.ln_1"}
    return float(loss(Outputs(attention_mask=t(x["mask"])), Outputs(features={"t0_u": t(x["u"])}), {}).detach())


def regenerate() -> None:
    inputs = make_inputs()
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps({"inputs": inputs, "value": reference_value(inputs)}, indent=1) + "\n")


def test_reference_value():
    stored = json.loads(FIXTURE.read_text())
    assert stored["inputs"] == make_inputs()
    assert stored["value"] == pytest.approx(reference_value(stored["inputs"]), rel=1e-12)
    assert plugin_value(stored["inputs"]) == pytest.approx(stored["value"], rel=1e-9)


if __name__ == "__main__" and "--regenerate" in sys.argv:
    regenerate()
