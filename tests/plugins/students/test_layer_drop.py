"""Layer drop: keeping every layer is the teacher; keeping a subset computes exactly those layers in order."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from potstill.plugins.students.layer_drop import LayerDrop


@pytest.fixture
def ids(tokenizer):
    # no padding, so the layers can be run by hand without an attention mask
    return tokenizer(["layer drop keeps chosen layers of the teacher", "with their weights in order"],
                     padding=True, return_tensors="pt")["input_ids"][:, :8]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_keep_all_layers_gives_the_teacher(tiny_bert, ids):
    teacher = tiny_bert(seed=1)
    student = LayerDrop(keep=[0, 1, 2, 3]).build(teacher)
    assert student is not teacher
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids).last_hidden_state, teacher(input_ids=ids).last_hidden_state)


def test_subset_computes_those_teacher_layers_in_order(tiny_bert, ids):
    teacher = tiny_bert(seed=1)
    student = LayerDrop(keep=[0, 2]).build(teacher)
    with torch.no_grad():
        hidden = teacher.embeddings(input_ids=ids)
        for index in (0, 2):
            hidden = teacher.encoder.layer[index](hidden)[0]
        torch.testing.assert_close(student(input_ids=ids).last_hidden_state, hidden, rtol=0, atol=0)
        # the order is the one given: [2, 0] is a different network
        reordered = LayerDrop(keep=[2, 0]).build(teacher)
        assert not torch.allclose(reordered(input_ids=ids).last_hidden_state, hidden, atol=1e-4)


def test_negative_indices_count_from_the_end(tiny_bert, ids):
    teacher = tiny_bert(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(LayerDrop(keep=[0, -1]).build(teacher)(input_ids=ids).last_hidden_state,
                                   LayerDrop(keep=[0, 3]).build(teacher)(input_ids=ids).last_hidden_state, rtol=0, atol=0)


def test_teacher_not_modified_and_weights_not_shared(tiny_bert, ids):
    teacher = tiny_bert(seed=1)
    before = snapshot(teacher)
    student = LayerDrop(keep=[1, 3]).build(teacher)
    assert len(teacher.encoder.layer) == 4 and teacher.config.num_hidden_layers == 4
    after = teacher.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # inherited weights are copies: training the student leaves the teacher alone
    assert torch.equal(student.encoder.layer[0].output.dense.weight, teacher.encoder.layer[1].output.dense.weight)
    with torch.no_grad():
        student.encoder.layer[0].output.dense.weight.add_(1.0)
    assert torch.equal(teacher.encoder.layer[1].output.dense.weight, before["encoder.layer.1.output.dense.weight"])


def test_config_updated(tiny_bert, ids, tmp_path):
    from transformers import BertModel

    student = LayerDrop(keep=[0, 2, 3]).build(tiny_bert())
    assert student.config.num_hidden_layers == 3 and len(student.encoder.layer) == 3
    # the saved student reloads with the right depth and the same function
    student.save_pretrained(tmp_path)
    reloaded = BertModel.from_pretrained(tmp_path).eval()
    assert len(reloaded.encoder.layer) == 3
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).last_hidden_state, student(input_ids=ids).last_hidden_state)


@pytest.mark.parametrize("keep", [[0, 4], [-5]])
def test_out_of_range_is_a_clear_error(tiny_bert, keep):
    with pytest.raises(ValueError, match=r"out of range; the teacher has 4 layers \(0\.\.3\)"):
        LayerDrop(keep=keep).build(tiny_bert())


def test_options_rejected():
    with pytest.raises(ValidationError, match="distinct"):
        LayerDrop(keep=[1, 1])
    with pytest.raises(ValidationError):
        LayerDrop(keep=[])


def test_layers_path_for_other_models():
    """A model whose layer stack is not at a known path is handled through ``layers_path`` (or found alone)."""
    from torch import nn

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

        def forward(self, x):
            for layer in self.stack:
                x = torch.relu(layer(x))
            return x

    torch.manual_seed(0)
    tower = Tower()
    student = LayerDrop(keep=[0, 2], layers_path="stack").build(tower)
    x = torch.randn(2, 4)
    torch.testing.assert_close(student(x), torch.relu(tower.stack[2](torch.relu(tower.stack[0](x)))))
    assert len(LayerDrop(keep=[1]).build(tower).stack) == 1
