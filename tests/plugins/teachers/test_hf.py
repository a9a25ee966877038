"""The Hugging Face teacher: a local folder or the bundled MiniLM, loaded offline; a bad path fails at
validation, naming config.json."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from potstill.plugins.teachers.hf import HFTeacher


def test_loads_a_local_folder(tiny_teacher_dir, text_context):
    loaded = HFTeacher(path=str(tiny_teacher_dir)).load(text_context())
    assert not loaded.model.training
    assert loaded.model.config.hidden_size == 32 and loaded.model.config.num_hidden_layers == 4
    assert loaded.tokenizer("hello")["input_ids"][0] == loaded.tokenizer.cls_token_id
    # the weights are the ones saved (seed 1 in the fixture), not a fresh initialization
    from transformers import BertModel

    saved = BertModel.from_pretrained(tiny_teacher_dir)
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), loaded.model.state_dict().values()))


def test_relative_path_is_relative_to_the_spec(tiny_teacher_dir):
    options = HFTeacher.Options.model_validate({"path": tiny_teacher_dir.name}, context={"base_dir": tiny_teacher_dir.parent})
    assert options.path == str(tiny_teacher_dir.resolve())


def test_bundled_minilm(text_context):
    loaded = HFTeacher(path="bundled:minilm").load(text_context())
    assert loaded.model.config.num_hidden_layers == 6 and len(loaded.model.encoder.layer) == 6
    ctx = text_context(loaded.model)
    batch = ctx.task.collate(["A sentence to embed.", "Another, somewhat longer sentence to embed."], loaded.tokenizer)
    with torch.no_grad():
        embeddings = ctx.task.forward(loaded.model, batch).embeddings
    assert embeddings.shape == (2, 384) and torch.isfinite(embeddings).all()
    assert "bundled:minilm" in loaded.description


def test_bad_path_names_config_json(tmp_path):
    with pytest.raises(ValidationError, match=r"no config\.json"):
        HFTeacher.Options.model_validate({"path": "no_such_model"}, context={"base_dir": tmp_path})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValidationError, match=r"config\.json"):
        HFTeacher(path=str(tmp_path / "empty"))


def test_unknown_bundled_model():
    with pytest.raises(ValidationError, match="unknown bundled model 'bert'; bundled: minilm"):
        HFTeacher(path="bundled:bert")


def test_dtype_option(tiny_teacher_dir, text_context):
    assert next(HFTeacher(path=str(tiny_teacher_dir), dtype="bfloat16").load(text_context()).model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValidationError):
        HFTeacher(path=str(tiny_teacher_dir), dtype="int8")


def test_fingerprint_changes_when_the_model_folder_changes(tmp_path, tiny_teacher_dir):
    import shutil

    from potstill.plugins.teachers.hf import HFTeacher

    folder = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, folder)
    teacher = HFTeacher(path=str(folder))
    before = teacher.fingerprint()
    assert before == HFTeacher(path=str(folder)).fingerprint()
    with open(folder / "config.json", "a") as handle:
        handle.write("\n")
    assert teacher.fingerprint() != before
