"""Teachers without local weights (ONNX, HTTP, caches, ensembles): the spec must build the student on its own,
the pipeline never copies or exports the teacher, and the report says what it could not time."""

from __future__ import annotations

import types

import pytest
from pydantic import Field

import potstill
from potstill.hookspecs import hookimpl
from potstill.plugin_manager import build_plugin_manager
from potstill.plugins.teachers.hf import HFTeacher
from potstill.spec import SpecError, nested_technique, validate
from potstill.techniques import Context, ExternalOutput, ExternalTeacher, LoadedModel, Options, Teacher


class _Remote(ExternalTeacher):
    """A local model behind the external-teacher interface (what an API or an ONNX session looks like)."""

    def __init__(self, model):
        super().__init__()
        self._model = [model]  # not a submodule: an external teacher has no parameters of its own
        self.parameter_count = sum(p.numel() for p in model.parameters())

    def forward(self, input_ids, attention_mask, output_hidden_states=False, **_):
        out = self._model[0](input_ids=input_ids, attention_mask=attention_mask)
        return ExternalOutput(last_hidden_state=out.last_hidden_state)

    def __deepcopy__(self, memo):
        raise AssertionError("the pipeline must not copy an external teacher")


class RemoteTeacher(Teacher):
    name = "remote_for_tests"
    local_weights = False

    class Options(Options):
        inner: dict = Field(description="the teacher it wraps")

    def load(self, ctx: Context) -> LoadedModel:
        inner = nested_technique("teacher", self.options.inner).load(ctx)
        return LoadedModel(model=_Remote(inner.model), tokenizer=inner.tokenizer, description="remote for tests",
                           details={"queries": {"asked": 7}})


@pytest.fixture
def plugins(isolated_env):
    module = types.ModuleType("potstill_remote_for_tests")
    module.register_teachers = hookimpl(lambda register: register(RemoteTeacher))
    return build_plugin_manager(extra_plugins=(module,), autoload=False)


@pytest.fixture
def isolated_env(monkeypatch):
    monkeypatch.setenv("POTSTILL_DISABLE_PLUGIN_AUTOLOAD", "1")


def _spec(tiny_spec, tiny_teacher_dir, stages):
    return tiny_spec(teacher={"name": "remote_for_tests", "inner": {"name": "hf", "path": str(tiny_teacher_dir)}},
                     stages=stages)


def test_an_external_teacher_needs_a_student_that_builds_itself(plugins, tiny_spec, tiny_teacher_dir):
    with pytest.raises(SpecError, match=r"stages\[0\]: teacher 'remote_for_tests' has no local weights.*name: hf"):
        validate(_spec(tiny_spec, tiny_teacher_dir, [{"student": {"name": "layer_drop", "keep": [0]}}]), plugins=plugins)
    with pytest.raises(SpecError, match=r"stages: teacher 'remote_for_tests' has no local weights"):
        validate(_spec(tiny_spec, tiny_teacher_dir, []), plugins=plugins)


def test_a_bad_nested_teacher_names_its_inner_path(plugins, tiny_spec, tiny_teacher_dir):
    spec = tiny_spec(teacher={"name": "remote_for_tests", "inner": {"name": "hff"}},
                     stages=[{"student": {"name": "hf", "path": str(tiny_teacher_dir)}}])
    spec_obj = validate(spec, plugins=plugins)  # options hold the raw mapping: the inner entry is checked at load
    with pytest.raises(ValueError, match=r"name: unknown teacher 'hff'"):
        nested_technique("teacher", spec_obj.teacher.options.inner, plugins=plugins)


def test_distilling_from_an_external_teacher_into_an_hf_student(plugins, tiny_spec, tiny_teacher_dir, tmp_path):
    spec = validate(_spec(tiny_spec, tiny_teacher_dir, [
        {"student": {"name": "hf", "path": str(tiny_teacher_dir), "reinitialize": True}},
        {"distill": {"steps": 4, "batch_size": 8, "losses": [{"name": "embedding_cosine"}]}},
        {"export": {"name": "onnx"}},
    ]), plugins=plugins)
    report = potstill.run(spec, out=tmp_path / "run", progress=False)
    assert report.teacher["kind"] == "external" and report.teacher["latency_ms"] is None
    assert report.teacher["parameters"] > 0
    assert report.artifacts[0]["quality"]  # the student is measured against the external teacher's outputs
    assert not (tmp_path / "run" / "teacher.onnx").exists()
    assert report["teacher_details"] == {"queries": {"asked": 7}}  # what the teacher measured reaches the report
    assert '## Teacher' in (tmp_path / "run" / "report.md").read_text() and '{"asked": 7}' in (tmp_path / "run" / "report.md").read_text()


def test_the_hf_student_reinitializes_reproducibly(tiny_teacher_dir):
    from potstill.plugins.students.hf import HFStudent

    ctx = types.SimpleNamespace(seed=3, task=None)
    same = [HFStudent(path=str(tiny_teacher_dir), reinitialize=True).build(None, ctx) for _ in range(2)]
    loaded = HFStudent(path=str(tiny_teacher_dir)).build(None, ctx)
    teacher = HFTeacher(path=str(tiny_teacher_dir)).load(ctx).model
    first = lambda m: next(iter(m.state_dict().values()))  # noqa: E731
    assert (first(same[0]) == first(same[1])).all()
    assert (first(loaded) == first(teacher)).all() and not (first(same[0]) == first(teacher)).all()
    assert all(p.requires_grad for p in loaded.parameters())
