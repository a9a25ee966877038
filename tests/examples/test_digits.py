"""examples/digits end to end: train the teacher with its script, run the spec, and check the claim the
example makes: the 2-block student, distilled, keeps (almost all of) the 4-block teacher's accuracy, and
distillation is what brings it there (the layer-dropped student alone agrees with the teacher less)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import potstill
from potstill.errors import SpecError
from potstill.spec import load
from potstill.techniques import Context

pytest.importorskip("sklearn", reason="install potstill[sklearn]")
pytest.importorskip("onnxruntime", reason="install potstill[onnx]")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits"


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    """A copy of the example folder with a freshly trained teacher.safetensors."""
    folder = tmp_path_factory.mktemp("digits") / "digits"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("teacher.safetensors", "__pycache__"))
    result = subprocess.run([sys.executable, str(folder / "train_teacher.py")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "held-out accuracy" in result.stdout
    assert (folder / "teacher.safetensors").is_file()
    assert not list(folder.glob(".teacher.safetensors.*"))  # the atomic write left no temporary file
    return folder


def git(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(["git", *args], cwd=EXAMPLE, capture_output=True, text=True)
    if result.returncode == 128:
        pytest.skip(f"not a git checkout: {result.stderr.strip()}")
    return result


def test_the_trained_teacher_is_git_ignored_and_not_committed():
    # weights are built by train_teacher.py, never shipped: the spec must not silently use a stale file
    assert git("check-ignore", "-q", "--no-index", "teacher.safetensors").returncode == 0, \
        "add examples/digits/teacher.safetensors to .gitignore"
    assert git("ls-files", "teacher.safetensors").stdout == "", \
        "teacher.safetensors is committed: git rm --cached examples/digits/teacher.safetensors"


def test_without_a_teacher_the_spec_says_how_to_make_one(tmp_path):
    shutil.copy(EXAMPLE / "digits.yaml", tmp_path / "digits.yaml")
    with pytest.raises(SpecError, match=r"teacher\.weights: file not found"):
        load(tmp_path / "digits.yaml")


def heldout_agreement_and_accuracy(model: torch.nn.Module, teacher: torch.nn.Module, spec) -> tuple[float, float]:
    data = spec.data.load(None)
    features = torch.stack([torch.as_tensor(x) for x, _ in data.heldout])
    labels = torch.tensor([y for _, y in data.heldout])
    with torch.no_grad():
        predicted, reference = model.eval()(features).argmax(-1), teacher(features).argmax(-1)
    return float((predicted == reference).double().mean()), float((predicted == labels).double().mean())


def test_the_distilled_student_keeps_the_teachers_accuracy(example):
    report = potstill.run(example / "digits.yaml", out=example / "run", progress=False,
                          overrides=["stages[1].distill.steps=150", "measure.repeats=5"])
    assert (example / "run" / "model.onnx").is_file() and (example / "run" / "model.int8.onnx").is_file()
    assert [a["kind"] for a in report.artifacts] == ["onnx-fp32", "onnx-int8-dynamic"]
    assert [s["name"] for s in report.stages] == ["layer_drop", "kd", "magnitude", "ort_int8_dynamic", "onnx"]

    teacher_accuracy = report.teacher["quality"]["accuracy"]
    assert teacher_accuracy > 0.95
    # the same student before distillation: the spec's own layer_drop on the teacher, nothing trained
    spec = load(example / "digits.yaml")
    ctx = Context(seed=spec.seed, base_dir=spec.base_dir, out=example / "run", task=spec.task)
    teacher = spec.teacher.load(ctx).model
    undistilled = spec.stages[0].technique.build(teacher, ctx)
    undistilled_agreement, undistilled_accuracy = heldout_agreement_and_accuracy(undistilled, teacher, spec)

    for artifact in report.artifacts:  # measured on the ONNX files, int8 included, on all 360 held-out digits
        quality = artifact["quality"]
        assert quality["accuracy"] >= teacher_accuracy - 0.03, artifact
        assert quality["agreement"] > undistilled_agreement, (artifact, undistilled_agreement)
        assert quality["accuracy"] >= undistilled_accuracy, (artifact, undistilled_accuracy)
