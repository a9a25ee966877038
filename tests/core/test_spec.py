"""Spec validation (core/spec.py and the cross-stage checks of core/pipeline.py).

What a user sees: every problem of a spec at once, one ``<yaml path>: <message>`` line each, with a
did-you-mean where a name is close, before any model loads. YAML is data: tags are refused.
"""

from __future__ import annotations

import copy
import types

import pytest
import yaml

from potstill.errors import SpecError
from potstill.hookspecs import hookimpl
from potstill.pipeline import check
from potstill.plugin_manager import build_plugin_manager
from potstill.spec import format_path, load, parse_path, read_yaml, validate
from potstill.techniques import Pruner


def problems(spec, overrides=None, **kwargs) -> list[str]:
    """The lines of the SpecError that ``check`` raises (it must raise)."""
    with pytest.raises(SpecError) as raised:
        check(spec, overrides, **kwargs) if not kwargs else validate(spec, overrides=overrides, **kwargs)
    return raised.value.lines()


def edited(spec: dict, edit) -> dict:
    spec = copy.deepcopy(spec)
    edit(spec)
    return spec


@pytest.fixture
def spec(tiny_spec) -> dict:
    return tiny_spec()


def test_a_good_spec_validates(spec):
    loaded = check(spec)
    assert [stage.label for stage in loaded.stages] == [
        "student:layer_drop", "distill:embedding_cosine+minilm_relations", "prune:magnitude",
        "quantize:ort_int8_dynamic", "export:onnx"]
    assert loaded.stages[1].distill.steps == 6
    assert loaded.stages[2].technique.options.sparsity == 0.3


def test_validation_does_not_change_the_callers_dict(spec):
    before = copy.deepcopy(spec)
    check(spec, ["stages[1].distill.steps=50"])
    assert spec == before


# ------------------------------------------------------------------ one problem each


def test_unknown_stage_kind_suggests_the_closest(spec):
    bad = edited(spec, lambda s: s["stages"].__setitem__(2, {"prun": {"name": "magnitude", "sparsity": 0.3}}))
    assert problems(bad) == ["stages[2].prun: unknown stage kind 'prun'; did you mean 'prune'?"]


def test_unknown_loss_suggests_the_closest(spec):
    bad = edited(spec, lambda s: s["stages"][1]["distill"]["losses"][0].__setitem__("name", "kd2"))
    assert problems(bad) == [
        "stages[1].distill.losses[0].name: unknown loss 'kd2'; did you mean 'kd'? (plugin may not be installed)"]


@pytest.mark.parametrize("where, name, expected", [
    (("task",), "sentence_embeddings", "task.name: unknown task 'sentence_embeddings'; did you mean 'sentence_embedding'?"),
    (("stages", 2, "prune"), "magnitud", "stages[2].prune.name: unknown pruner 'magnitud'; did you mean 'magnitude'?"),
    (("stages", 4, "export"), "onxx", "stages[4].export.name: unknown exporter 'onxx'; did you mean 'onnx'?"),
])
def test_unknown_technique_names_the_kind_and_suggests(spec, where, name, expected):
    def edit(s):
        node = s
        for part in where:
            node = node[part]
        node["name"] = name

    [line] = problems(edited(spec, edit))
    assert line == expected + " (plugin may not be installed)"


def test_missing_technique_name_lists_the_choices(spec):
    [line] = problems(edited(spec, lambda s: s["stages"][2]["prune"].pop("name")))
    assert line.startswith("stages[2].prune.name: required: which pruner (available: ")
    assert "magnitude" in line


@pytest.mark.parametrize("edit, path, words", [
    (lambda s: s["stages"][1]["distill"].__setitem__("steps", "many"), "stages[1].distill.steps", ["integer", "'many'"]),
    (lambda s: s["stages"][2]["prune"].__setitem__("sparsity", "high"), "stages[2].prune.sparsity", ["number", "'high'"]),
    (lambda s: s["stages"][2]["prune"].__setitem__("sparsity", 1.5), "stages[2].prune.sparsity", ["less than 1", "1.5"]),
    (lambda s: s["stages"][1]["distill"].__setitem__("losses", "kd"), "stages[1].distill.losses", ["list"]),
    (lambda s: s.__setitem__("seed", "zero"), "seed", ["integer", "'zero'"]),
    (lambda s: s["measure"].__setitem__("threads", 0), "measure.threads", ["greater than 0"]),
    (lambda s: s.__setitem__("teacher", "hf"), "teacher", ["dictionary", "'hf'"]),
])
def test_wrong_type_or_value_names_its_path(spec, edit, path, words):
    [line] = problems(edited(spec, edit))
    assert line.startswith(f"{path}: ")
    for word in words:
        assert word in line


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s["stages"][2]["prune"].__setitem__("sparsty", 0.5),
     "stages[2].prune.sparsty: unknown key 'sparsty'; did you mean 'sparsity'?"),
    (lambda s: s["stages"][1]["distill"].__setitem__("stepz", 5),
     "stages[1].distill.stepz: unknown key 'stepz'; did you mean 'steps'?"),
    (lambda s: s["stages"][1]["distill"].__setitem__("optimizer", {"lrr": 0.1}),
     "stages[1].distill.optimizer.lrr: unknown key 'lrr'; did you mean 'lr'?"),
    (lambda s: s["stages"][1]["distill"]["losses"][1].__setitem__("wieght", 2),
     "stages[1].distill.losses[1].wieght: unknown key 'wieght'; did you mean 'weight'?"),
    (lambda s: s["measure"].__setitem__("repeat", 3), "measure.repeat: unknown key 'repeat'; did you mean 'repeats'?"),
    (lambda s: s.__setitem__("stagez", []), "stagez: unknown key 'stagez'; did you mean 'stages'?"),
])
def test_unknown_key_suggests_the_closest(spec, edit, expected):
    assert expected in problems(edited(spec, edit))


def test_unknown_key_without_a_close_match_lists_the_known_keys(spec):
    [line] = problems(edited(spec, lambda s: s["stages"][2]["prune"].__setitem__("zzz", 1)))
    assert line.startswith("stages[2].prune.zzz: unknown key 'zzz'; known keys: ")
    assert "sparsity" in line and "scope" in line


def test_missing_file_is_reported_relative_to_the_spec_folder(spec, tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(edited(spec, lambda s: s["data"].__setitem__("path", "corpus.txt"))))
    with pytest.raises(SpecError) as raised:
        check(spec_path)
    assert raised.value.lines() == [
        f"{spec_path}: data.path: file not found: {tmp_path / 'corpus.txt'} (paths are relative to the spec's folder)"]

    (tmp_path / "corpus.txt").write_text("one line\n")
    assert check(spec_path).data.options.path == str((tmp_path / "corpus.txt").resolve())


def test_missing_optional_dependency_gives_the_pip_line(spec):
    class NeedsExtra(Pruner):
        name = "needs_extra"
        requires = {"no_such_module_xyz": "potstill-no-such[extra]"}

    plugin = types.ModuleType("potstill_needs_extra")
    plugin.register_pruners = hookimpl(lambda register: register(NeedsExtra))
    plugins = build_plugin_manager(extra_plugins=(plugin,), autoload=False)

    bad = edited(spec, lambda s: s["stages"].__setitem__(2, {"prune": {"name": "needs_extra"}}))
    assert problems(bad, plugins=plugins) == [
        "stages[2].prune.name: pruner 'needs_extra' needs no_such_module_xyz: pip install 'potstill-no-such[extra]'"]


@pytest.mark.parametrize("version", [2, 0, "1.0", None])
def test_wrong_spec_version(spec, version):
    [line] = problems(edited(spec, lambda s: s.__setitem__("potstill", version)))
    assert line.startswith("potstill: ")
    assert line.endswith("this potstill reads spec format `potstill: 1`")


def test_missing_spec_version(spec):
    [line] = problems(edited(spec, lambda s: s.pop("potstill")))
    assert line == "potstill: required key is missing; this potstill reads spec format `potstill: 1`"


def test_onnx_quantizer_without_export_stage(spec):
    no_export = edited(spec, lambda s: s["stages"].pop(4))
    assert problems(no_export) == [
        "stages[3].quantize: ort_int8_dynamic quantizes an exported ONNX model; add a stage `- export: {name: onnx}`"]
    # the export may come before the quantize stage
    export_first = edited(spec, lambda s: s["stages"].insert(3, s["stages"].pop(4)))
    assert [stage.key for stage in check(export_first).stages][-2:] == ["export", "quantize"]


def test_stage_with_two_keys_names_them(spec):
    [line] = problems(edited(spec, lambda s: s["stages"][2].__setitem__("prune2", {})))
    assert line.startswith("stages[2]: a stage is a mapping with one key")
    assert line.endswith("; got keys: prune, prune2")


# ------------------------------------------------------------------ all at once


def test_every_problem_is_reported_in_one_run(spec):
    def break_everything(s):
        s["potstill"] = 3
        s["data"]["path"] = "/no/such/corpus.txt"
        s["stages"][0]["student"]["kep"] = [0]
        s["stages"][1]["distill"]["steps"] = -1
        s["stages"][1]["distill"]["losses"][0]["name"] = "kd2"
        s["stages"][2] = {"prun": {"name": "magnitude"}}
        s["measure"]["repeat"] = 1

    lines = problems(edited(spec, break_everything))
    expected_paths = ["potstill", "data.path", "stages[0].student.kep", "stages[1].distill.steps",
                      "stages[1].distill.losses[0].name", "stages[2].prun", "measure.repeat"]
    assert sorted(line.split(": ", 1)[0] for line in lines) == sorted(expected_paths), lines
    assert len(lines) == len(expected_paths)


def test_spec_error_lines_carry_the_file_name(spec, tmp_path):
    spec_path = tmp_path / "bad.yaml"
    spec_path.write_text(yaml.safe_dump(edited(spec, lambda s: s.__setitem__("potstill", 2))))
    with pytest.raises(SpecError) as raised:
        load(spec_path)
    assert raised.value.lines()[0].startswith(f"{spec_path}: potstill: ")
    assert str(raised.value) == "\n".join(raised.value.lines())


# ------------------------------------------------------------------ YAML is data


@pytest.mark.parametrize("tagged", [
    "potstill: !!python/object/apply:os.system ['touch {marker}']",
    "potstill: !!python/object/new:os.system ['touch {marker}']",
    "potstill: !!python/name:os.system",
    "potstill: !!python/module:os",
    "potstill: !include {marker}",
])
def test_yaml_tags_are_refused(tmp_path, tagged):
    marker = tmp_path / "pwned"
    spec_path = tmp_path / "evil.yaml"
    spec_path.write_text(tagged.format(marker=marker) + "\nname: x\n")
    with pytest.raises(SpecError) as raised:
        load(spec_path)
    [line] = raised.value.lines()
    assert line.startswith(f"{spec_path}: line 1, column ")
    assert "is not allowed: a spec is data, not code" in line
    assert not marker.exists()


def test_standard_yaml_types_are_still_read():
    assert read_yaml("a: !!str 1\nb: !!float 2\nc: [1, 2]\nd: 1.0e-4") == {"a": "1", "b": 2.0, "c": [1, 2], "d": 1e-4}


def test_invalid_yaml_names_line_and_column():
    with pytest.raises(SpecError) as raised:
        read_yaml("potstill: 1\nstages: [\n", source="s.yaml")
    [line] = raised.value.lines()
    assert line.startswith("s.yaml: line ") and "not valid YAML" in line


def test_a_spec_that_is_not_a_mapping():
    with pytest.raises(SpecError, match="a spec is a YAML mapping with `potstill: 1` at the top, got list"):
        validate([1, 2])


def test_a_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load(tmp_path / "nope.yaml")


# ------------------------------------------------------------------ --set overrides


def test_overrides_set_values_parsed_as_yaml(spec):
    loaded = check(spec, ["stages[1].distill.steps=50", "stages[1].distill.optimizer.lr=3e-4", "name=other",
                          "stages[2].prune.scope=layer", "stages[0].student.keep=[1, 3]"])
    assert loaded.stages[1].distill.steps == 50
    assert loaded.stages[1].distill.optimizer.lr == 3e-4
    assert loaded.name == "other"
    assert loaded.stages[2].technique.options.scope == "layer"
    assert loaded.stages[0].technique.options.keep == [1, 3]


def test_overrides_apply_to_a_spec_file(spec, tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    assert check(spec_path, ["stages[1].distill.steps=50"]).stages[1].distill.steps == 50


def test_overridden_values_are_validated(spec):
    assert problems(spec, ["stages[1].distill.steps=0"]) == [
        "stages[1].distill.steps: Input should be greater than 0 (got 0)"]


@pytest.mark.parametrize("override, words", [
    ("stages[9].distill.steps=50", ["no such place in the spec", "IndexError"]),
    ("stages[1].distill.steps", ["expected PATH=VALUE"]),
    ("stages[1]].steps=5", ["cannot parse"]),
    ("=5", ["empty path"]),
    ("seed.value=1", ["no such place in the spec"]),
    ("stages[1].distill.steps=[1", ["flow sequence"]),
    ("stages[1].distill.steps=!!python/name:os.system", ["not allowed"]),
])
def test_bad_override_is_a_clear_error(spec, override, words):
    lines = problems(spec, [override])
    assert lines[0].startswith(f"--set {override}: "), lines
    for word in words:
        assert word in lines[0]


def test_override_with_a_misspelled_key_gets_a_did_you_mean(spec):
    assert problems(spec, ["stages[1].distill.stepz=5"]) == [
        "stages[1].distill.stepz: unknown key 'stepz'; did you mean 'steps'?"]


def test_yaml_path_round_trip():
    assert parse_path("stages[1].distill.losses[0].name") == ["stages", 1, "distill", "losses", 0, "name"]
    assert format_path(["stages", 1, "distill", "losses", 0, "name"]) == "stages[1].distill.losses[0].name"
    assert parse_path("stages[-1].prune") == ["stages", -1, "prune"]


# ------------------------------------------------------------------ resolved spec and cache keys


def test_resolved_spec_fills_defaults_and_validates_again(spec):
    loaded = check(spec)
    resolved = loaded.resolved()
    assert resolved["stages"][2]["prune"] == {"name": "magnitude", "sparsity": 0.3, "scope": "global",
                                              "include": ["*"], "exclude": []}
    assert resolved["stages"][1]["distill"]["optimizer"]["lr"] == 1e-4
    again = check(resolved)
    assert again.resolved() == resolved
    assert again.prefix_hash(4) == loaded.prefix_hash(4)


def test_prefix_hash_changes_from_the_changed_stage_on(spec):
    base = check(spec)
    pruned_more = check(edited(spec, lambda s: s["stages"][2]["prune"].__setitem__("sparsity", 0.5)))
    assert [base.prefix_hash(i) == pruned_more.prefix_hash(i) for i in range(5)] == [True, True, False, False, False]
    reseeded = check(edited(spec, lambda s: s.__setitem__("seed", 1)))
    assert all(base.prefix_hash(i) != reseeded.prefix_hash(i) for i in range(5))
    # measurement settings do not change what a stage computes
    measured = check(edited(spec, lambda s: s["measure"].__setitem__("repeats", 9)))
    assert all(base.prefix_hash(i) == measured.prefix_hash(i) for i in range(5))


def test_prefix_hash_follows_the_data_file_content(spec, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a\nb\n")
    with_file = edited(spec, lambda s: s["data"].__setitem__("path", str(corpus)))
    before = check(with_file).prefix_hash(0)
    corpus.write_text("a\nc\n")
    assert check(with_file).prefix_hash(0) != before
