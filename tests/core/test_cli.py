"""The command line (core/cli.py): what a user sees for good specs and for mistakes.

A few tests run ``python -m potstill.cli`` in a subprocess, as a user would; the rest call ``main``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types

import pytest
import yaml

from potstill import __version__, io, plugin_manager
from potstill.cli import main
from potstill.errors import PluginError
from potstill.hookspecs import hookimpl
from potstill.plugin_manager import build_plugin_manager
from potstill.techniques import Pruner

YAML_PATH = re.compile(r"^(potstill|name|seed|task|data|teacher|measure|stages\[\d+\])([.\[][\w\[\].]*)?: ")


def potstill(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("POTSTILL_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "potstill.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)


def write_spec(path, spec) -> str:
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return str(path)


def small_run_spec(tiny_spec, steps: int = 4) -> dict:
    """A spec that runs in seconds: student, a short distillation, no export, no latency measurement."""
    return tiny_spec(stages=[
        {"student": {"name": "layer_drop", "keep": [0, 2]}},
        {"distill": {"steps": steps, "batch_size": 4, "losses": [{"name": "embedding_cosine"}]}},
    ], measure={"latency": False, "heldout_batches": 1, "batch_size": 4, "seq_len": 16})


# ------------------------------------------------------------------ validate, as a subprocess


def test_validate_reports_every_problem_one_line_each_without_traceback(tiny_spec, tmp_path):
    spec = tiny_spec()
    spec["potstill"] = 2
    spec["data"]["path"] = "missing.txt"
    spec["stages"][1]["distill"]["losses"][0]["name"] = "kd2"
    spec["stages"][2] = {"prun": {"name": "magnitude", "sparsity": 0.3}}
    spec["stages"][3]["quantize"]["per_chanel"] = True
    spec_path = write_spec(tmp_path / "bad.yaml", spec)

    result = potstill("validate", spec_path)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 5, lines
    for line in lines:  # `<spec file>: <yaml path>: <message>`, like a compiler's `file: line: message`
        assert line.startswith(f"{spec_path}: ")
        assert YAML_PATH.match(line[len(spec_path) + 2:]), line
    body = "\n".join(line[len(spec_path) + 2:] for line in lines)
    assert "potstill: Input should be 1 (got 2); this potstill reads spec format `potstill: 1`" in body
    assert f"data.path: file not found: {tmp_path / 'missing.txt'}" in body
    assert "stages[1].distill.losses[0].name: unknown loss 'kd2'; did you mean 'kd'? (plugin may not be installed)" in body
    assert "stages[2].prun: unknown stage kind 'prun'; did you mean 'prune'?" in body
    assert "stages[3].quantize.per_chanel: unknown key 'per_chanel'; did you mean 'per_channel'?" in body


def test_validate_refuses_yaml_tags_without_running_them(tmp_path):
    marker = tmp_path / "pwned"
    spec_path = tmp_path / "evil.yaml"
    spec_path.write_text(f"potstill: 1\nname: !!python/object/apply:os.system ['touch {marker}']\n")

    result = potstill("validate", str(spec_path))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "is not allowed: a spec is data, not code" in result.stderr
    assert not marker.exists()


# ------------------------------------------------------------------ validate, in process


def test_validate_ok(tiny_spec, tmp_path, capsys):
    spec_path = write_spec(tmp_path / "good.yaml", tiny_spec())
    assert main(["validate", spec_path]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{spec_path}: ok (5 stages: student:layer_drop, ")


def test_validate_with_overrides(tiny_spec, tmp_path, capsys):
    spec_path = write_spec(tmp_path / "good.yaml", tiny_spec())
    assert main(["validate", spec_path, "--set", "stages[1].distill.steps=50"]) == 0
    assert main(["validate", spec_path, "--set", "stages[1].distill.steps=0"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"{spec_path}: stages[1].distill.steps: Input should be greater than 0 (got 0)")


def test_validate_with_a_bad_override_path(tiny_spec, tmp_path, capsys):
    spec_path = write_spec(tmp_path / "good.yaml", tiny_spec())
    assert main(["validate", spec_path, "--set", "stages[7].distill.steps=50", "--set", "nothing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"{spec_path}: --set stages[7].distill.steps=50: no such place in the spec (IndexError: list index out of range)",
        f"{spec_path}: --set nothing: expected PATH=VALUE, for example stages[1].distill.steps=50",
    ]


def test_validate_missing_optional_dependency_prints_the_pip_line(tiny_spec, tmp_path, capsys, monkeypatch):
    class NeedsExtra(Pruner):
        name = "needs_extra"
        requires = {"no_such_module_xyz": "potstill-no-such[extra]"}

    plugin = types.ModuleType("potstill_needs_extra")
    plugin.register_pruners = hookimpl(lambda register: register(NeedsExtra))
    # the CLI uses the process-wide manager: swap in one with the throwaway plugin; monkeypatch restores it
    monkeypatch.setattr(plugin_manager, "_default", build_plugin_manager(extra_plugins=(plugin,), autoload=False))
    spec = tiny_spec()
    spec["stages"][2] = {"prune": {"name": "needs_extra"}}
    spec_path = write_spec(tmp_path / "spec.yaml", spec)

    assert main(["validate", spec_path]) == 2
    assert capsys.readouterr().err.strip() == (
        f"{spec_path}: stages[2].prune.name: pruner 'needs_extra' needs no_such_module_xyz: "
        "pip install 'potstill-no-such[extra]'")


def test_a_broken_plugin_is_one_line_and_exit_2(tiny_spec, tmp_path, capsys, monkeypatch):
    def broken():
        raise PluginError("duplicate loss name 'kd': registered by plugin 'a' and by plugin 'b'")

    monkeypatch.setattr(plugin_manager, "get_plugins", broken)
    monkeypatch.setattr("potstill.spec.get_plugins", broken)
    assert main(["validate", write_spec(tmp_path / "spec.yaml", tiny_spec())]) == 2
    assert capsys.readouterr().err == "potstill: duplicate loss name 'kd': registered by plugin 'a' and by plugin 'b'\n"


# ------------------------------------------------------------------ run


def test_run_with_override_writes_the_bundle(tiny_spec, tmp_path, capsys):
    spec_path = write_spec(tmp_path / "spec.yaml", small_run_spec(tiny_spec, steps=4))
    out = tmp_path / "bundle"

    code = main(["run", spec_path, "--out", str(out), "--set", "stages[1].distill.steps=2", "--no-progress", "--json"])

    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stages"][1]["record"]["steps"] == 2
    assert yaml.safe_load((out / "spec.yaml").read_text())["stages"][1]["distill"]["steps"] == 2
    assert io.read_json(out / "report.json") == report


def test_run_prints_the_summary_and_the_bundle(tiny_spec, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich shortens cells to fit the terminal
    spec_path = write_spec(tmp_path / "spec.yaml", small_run_spec(tiny_spec, steps=1))
    out = tmp_path / "bundle"
    assert main(["run", spec_path, "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "potstill: tiny" in printed and "(pytorch teacher)" in printed and "(pytorch student)" in printed
    assert "note: No export stage" in printed
    assert printed.rstrip().endswith(f"bundle: {out}")


def test_run_with_a_bad_override_exits_2_before_running(tiny_spec, tmp_path, capsys):
    spec_path = write_spec(tmp_path / "spec.yaml", small_run_spec(tiny_spec))
    out = tmp_path / "bundle"
    assert main(["run", spec_path, "--out", str(out), "--set", "stages[1].distil.steps=2"]) == 2
    assert "stages[1]: a stage is a mapping with one key" in capsys.readouterr().err
    assert not out.exists()


def test_a_runtime_mistake_is_one_line_without_traceback(tiny_spec, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("POTSTILL_DEBUG", raising=False)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("only\nthree\nlines\n")
    spec = small_run_spec(tiny_spec)
    spec["data"] = {"name": "text_lines", "path": "corpus.txt", "heldout": 32}
    spec_path = write_spec(tmp_path / "spec.yaml", spec)

    assert main(["run", spec_path, "--out", str(tmp_path / "bundle"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("potstill: data.path: ") and "has 3 usable lines; need more than heldout=32" in err
    assert err.rstrip().endswith("(POTSTILL_DEBUG=1 shows the traceback)") and err.count("\n") == 1

    monkeypatch.setenv("POTSTILL_DEBUG", "1")
    with pytest.raises(ValueError, match="3 usable lines"):
        main(["run", spec_path, "--out", str(tmp_path / "bundle"), "--no-progress"])


def test_interrupt_says_how_to_resume(tiny_spec, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("potstill.pipeline.run", interrupted)
    assert main(["run", write_spec(tmp_path / "spec.yaml", small_run_spec(tiny_spec))]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err


# ------------------------------------------------------------------ misc


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"potstill {__version__}"
    assert main([]) == 2
    assert "validate" in capsys.readouterr().out


def test_console_script_is_installed():
    """``potstill`` on PATH is the same entry point (pyproject's [project.scripts])."""
    script = os.path.join(os.path.dirname(sys.executable), "potstill")
    if not os.path.exists(script):
        pytest.fail(f"console script not installed next to {sys.executable}")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"potstill {__version__}"


# ------------------------------------------------------------------ bundle commands (verify, bench: tests/core/test_bundle.py)


def test_build_engine_calls_the_tensorrt_exporter(tmp_path, monkeypatch):
    called = []
    module = types.ModuleType("potstill.exporters.tensorrt")
    module.build_engine = lambda bundle: called.append(bundle) or 0
    monkeypatch.setitem(sys.modules, "potstill.exporters.tensorrt", module)
    assert main(["build-engine", str(tmp_path)]) == 0
    assert called == [tmp_path]


def test_build_engine_without_the_exporter_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "potstill.exporters.tensorrt", None)  # import raises ImportError
    assert main(["build-engine", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("potstill: build-engine needs potstill.exporters.tensorrt")


def test_bench_rejects_a_zero_repeat_count(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", str(tmp_path), "--repeats", "0"])
    assert exit_info.value.code == 2
    assert "--repeats: must be at least 1 (got 0)" in capsys.readouterr().err


def test_verify_subprocess_on_a_missing_bundle_has_no_traceback(tmp_path):
    result = potstill("verify", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"potstill: {tmp_path / 'nowhere'}: no such folder; pass a bundle folder (the --out of `potstill run`)"
