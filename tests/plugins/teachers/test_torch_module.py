"""The torch teacher: the user's own factory next to the spec, strict safetensors weights, clear errors."""

from __future__ import annotations

import sys

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import nn

from potstill.plugins.teachers.torch_module import TorchTeacher

FACTORY = """
import torch.nn as nn


def build(hidden=16):
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
"""


@pytest.fixture
def spec_dir(tmp_path, request):
    """A spec folder with a factory module (uniquely named: imported modules stay in sys.modules) and weights."""
    module = f"factory_{request.node.name.replace('[', '_').replace(']', '_').replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(FACTORY)
    torch.manual_seed(3)
    reference = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "teacher.safetensors"))
    yield tmp_path, module, reference
    sys.modules.pop(module, None)


def options(folder, **values):
    return TorchTeacher.Options.model_validate(values, context={"base_dir": folder})


def test_loads_factory_and_weights(spec_dir, text_context):
    folder, module, reference = spec_dir
    teacher = TorchTeacher(options(folder, factory=f"{module}:build", weights="teacher.safetensors", kwargs={"hidden": 24}))
    path_before = list(sys.path)
    loaded = teacher.load(text_context(base_dir=folder))
    assert sys.path == path_before  # the spec's folder is on the import path only while importing
    assert not loaded.model.training and loaded.tokenizer is None
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), reference(x), rtol=0, atol=0)
    assert teacher.fingerprint()  # the weights' hash keys the cache


def test_weights_are_loaded_strictly(spec_dir, text_context):
    folder, module, _ = spec_dir
    wrong_size = TorchTeacher(options(folder, factory=f"{module}:build", weights="teacher.safetensors", kwargs={"hidden": 16}))
    with pytest.raises(RuntimeError, match="size mismatch"):
        wrong_size.load(text_context(base_dir=folder))


def test_missing_module_is_a_clear_error(spec_dir, text_context):
    folder, _, _ = spec_dir
    with pytest.raises(ValueError, match=r"teacher\.factory: cannot import 'no_such_module_xyz'.*next to the spec"):
        TorchTeacher(options(folder, factory="no_such_module_xyz:build")).load(text_context(base_dir=folder))


def test_missing_function_is_a_clear_error(spec_dir, text_context):
    folder, module, _ = spec_dir
    with pytest.raises(ValueError, match=rf"teacher\.factory: '{module}' has no function 'nope'"):
        TorchTeacher(options(folder, factory=f"{module}:nope")).load(text_context(base_dir=folder))


@pytest.mark.parametrize("factory", ["no_colon", "a:b:c", "1module:build", "module:build()", "os.system('x'):y"])
def test_factory_must_be_module_colon_function(factory, tmp_path):
    with pytest.raises(ValidationError):
        options(tmp_path, factory=factory)


def test_missing_weights_file_is_a_validation_error(tmp_path):
    with pytest.raises(ValidationError, match="file not found"):
        options(tmp_path, factory="m:build", weights="absent.safetensors")
