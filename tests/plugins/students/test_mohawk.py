"""mohawk: the materialised mixing matrix is the mixer (y = M x, and M equals a plain-loop evaluation of the SSD
sum); the recurrent and parallel forms agree; M is causal; with a ≡ 1 and no normaliser the mixer is causal
unnormalised linear attention with the teacher's q, k, v; a few steps of matrix orientation (stage 1) reduce
the Frobenius distance to the teacher's attention; the student exports to ONNX and matches PyTorch."""

from __future__ import annotations

import math

import pytest
import torch

from potstill.plugins.losses.mohawk_align import MohawkAlign
from potstill.plugins.students.mohawk import (Mohawk, MohawkMixer, mixing_matrix, recurrent_logits,
                                              softmax_attention_matrix)
from potstill.plugins.tasks.causal_lm import CausalLM
from potstill.techniques import Context, Dataset, LoadedModel, Outputs


def mixers(model):
    return [m for m in model.modules() if isinstance(m, MohawkMixer)]


def randomise_decay(model, seed=0):
    """Move the decay away from its constant start, so that a_t really depends on the input."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in mixers(model):
            m.decay.weight.normal_(0, 2.0)
            m.decay.bias.normal_(0, 1.0)


def loop_matrix(mixer, u):
    """M[b, h, t, s] = Π_{r=s+1..t} a_r · (C_t · B_s)/√d (/ Σ_s Π a_r when normalised), by plain loops."""
    c, bk, _ = mixer.projections(u)
    a = torch.exp(mixer.log_decay(u))
    batch, heads, length, d = c.shape
    out = torch.zeros(batch, heads, length, length, dtype=u.dtype)
    for b in range(batch):
        for h in range(heads):
            for t in range(length):
                weights = []
                for s in range(t + 1):
                    product = 1.0
                    for r in range(s + 1, t + 1):
                        product = product * a[b, h, r]
                    weights.append(product)
                mass = sum(weights)
                for s in range(t + 1):
                    value = weights[s] * (c[b, h, t] @ bk[b, h, s]) / math.sqrt(d)
                    out[b, h, t, s] = value / mass if mixer.normalize else value
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_materialised_matrix_is_the_mixer(tiny_gpt2, normalize):
    student = Mohawk(normalize=normalize).build(tiny_gpt2(seed=1)).double()
    randomise_decay(student)
    mixer = mixers(student)[0]
    u = torch.randn(2, 7, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        matrix = mixer.mixing_matrix(u)
        torch.testing.assert_close(matrix, loop_matrix(mixer, u), rtol=1e-10, atol=1e-12)
        _, _, x = mixer.projections(u)
        y = (matrix @ x).transpose(1, 2).reshape(2, 7, 32)
        assert torch.equal(mixer(u)[0], mixer.c_proj(y))  # y = M x, exactly
        # M is lower triangular (causal), with a nonzero diagonal
        assert torch.equal(torch.triu(matrix, diagonal=1), torch.zeros_like(matrix))
        assert (matrix.diagonal(dim1=-2, dim2=-1).abs() > 0).all()


def test_recurrent_form_equals_parallel_form(tiny_gpt2):
    student = Mohawk().build(tiny_gpt2(seed=1))
    randomise_decay(student)
    ids = torch.randint(1, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parallel = student(input_ids=ids).logits
        mixer = mixers(student)[0]
        u = torch.randn(2, 24, 32)
        mixer.mode = "recurrent"
        first, second = mixer(u[:, :9])[0], mixer(u[:, 9:])[0]  # the state carries over between calls
        assert mixer._state["S"].shape == (2, 2, 16, 16)  # O(1) in the sequence length
        mixer.mode = "parallel"
        mixer.reset_state()
        torch.testing.assert_close(torch.cat([first, second], 1), mixer(u)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recurrent_logits(student, ids), parallel, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recurrent_logits(student, ids, chunk=5), parallel, rtol=1e-5, atol=1e-5)


def test_causal_future_tokens_do_not_change_the_past(tiny_gpt2):
    student = Mohawk().build(tiny_gpt2(seed=1))
    randomise_decay(student)
    ids = torch.randint(1, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, 10:] = torch.randint(1, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = student(input_ids=ids).logits, student(input_ids=changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_no_decay_no_normaliser_is_linear_attention_with_the_teachers_qkv(tiny_gpt2):
    teacher = tiny_gpt2(seed=1)
    student = Mohawk(decay=False, normalize=False).build(teacher)
    attn, mixer = teacher.transformer.h[1].attn, mixers(student)[1]
    u = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        q, k, v = (z.view(2, 9, 2, 16).transpose(1, 2) for z in attn.c_attn(u).split(32, dim=2))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(16)).tril()  # no softmax, no normaliser
        expected = attn.c_proj((scores @ v).transpose(1, 2).reshape(2, 9, 32))
        torch.testing.assert_close(mixer(u)[0], expected)
        torch.testing.assert_close(mixer.mixing_matrix(u), scores)
    # and the softmax of the same scores is what the teacher's attention is (the helper is checked against HF)
    ids = torch.randint(1, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    teacher.config._attn_implementation = "eager"  # the implementation that returns its attention weights
    with torch.no_grad():
        out = teacher(input_ids=ids, output_attentions=True, output_hidden_states=True)
        for layer, block in enumerate(teacher.transformer.h):
            mine = softmax_attention_matrix(block.attn, block.ln_1(out.hidden_states[layer]))
            torch.testing.assert_close(mine, out.attentions[layer], rtol=1e-5, atol=1e-6)


def test_build_keeps_the_teacher_and_carries_its_projections(tiny_gpt2):
    teacher = tiny_gpt2(seed=1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = Mohawk(trainable="mixer").build(teacher)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    for block, mixer in zip(teacher.transformer.h, mixers(student)):
        assert torch.equal(block.attn.c_attn.weight, mixer.c_attn.weight) and mixer.c_attn is not block.attn.c_attn
        assert torch.equal(block.attn.c_proj.weight, mixer.c_proj.weight)
        assert torch.allclose(torch.exp(mixer.log_decay(torch.randn(1, 3, 32))), torch.tensor(0.97))
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(".attn." in n for n in trainable)
    with pytest.raises(ValueError, match="mohawk: .* not a GPT-2 style decoder"):
        Mohawk().build(torch.nn.Linear(2, 2))


def test_matrix_orientation_reduces_the_distance_to_the_teachers_attention(trained_lm_pair):
    teacher = trained_lm_pair[0]  # trained: its attention is far from uniform
    student = Mohawk().build(teacher).train()
    loss = MohawkAlign(stage="matrix")
    loss.setup(student, teacher)
    paths = loss.capture(teacher, "teacher")
    text = (b"def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 2)[:64]
    ids = torch.tensor([list(text)] * 2)
    ids[1] = ids[1].roll(7)
    from potstill.capture import capture

    with capture(teacher, paths) as captured, torch.no_grad():
        teacher(input_ids=ids)
    teacher_out = Outputs(features=dict(captured))
    mask = torch.ones(2, 64)

    def distance():
        with torch.no_grad():
            return float(loss(Outputs(attention_mask=mask), teacher_out, {}))

    # the loss is the mean over layers, sequences and heads of the Frobenius distance of the materialised matrices
    with torch.no_grad():
        direct = []
        for layer, (block, mixer) in enumerate(zip(teacher.transformer.h, mixers(student))):
            u = captured[f"t{layer}_u"]
            diff = mixing_matrix(mixer, u) - softmax_attention_matrix(block.attn, u)
            direct.append(diff.pow(2).sum((-1, -2)).sqrt().mean())
    start = distance()
    optimizer = torch.optim.Adam([p for m in mixers(student) for p in m.parameters()], lr=3e-3)
    for _ in range(15):
        value = loss(Outputs(attention_mask=mask), teacher_out, {})
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    end = distance()
    assert start == pytest.approx(float(torch.stack(direct).mean()), rel=1e-5)
    assert end < 0.7 * start, (start, end)


def test_onnx_export_matches_pytorch(tiny_gpt2, tmp_path, sentences):
    from potstill.exporters.onnx import export_onnx, parity

    teacher = tiny_gpt2(seed=1)
    task = CausalLM(max_length=32)
    ctx = Context(seed=0, base_dir=tmp_path, out=tmp_path / "out", task=task,
                  data=Dataset(train=sentences[64:128], heldout=sentences[:64]), teacher=LoadedModel(model=teacher),
                  progress=False)
    student = Mohawk().build(teacher, ctx)
    randomise_decay(student)
    assert ctx.record["mohawk_state_floats_per_layer"] == 2 * (16 * 16 + 1)
    path = export_onnx(student, task, task.collate(sentences[:2], pad_to=12), tmp_path / "mohawk.onnx")
    batches = [task.collate(sentences[i:i + n], pad_to=t) for i, n, t in ((0, 3, 7), (5, 2, 29))]
    assert parity(path, student, task, batches)["max_abs_diff"] < 1e-4
