"""examples/plugin_package really installs, is found through the ``potstill`` entry-point group, and its loss
runs by name in a spec, all through the CLI in a fresh process (the test process's plugins are untouched)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

PACKAGE = Path(__file__).resolve().parents[2] / "examples" / "plugin_package"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package installed with pip into a folder of its own (offline: no index, no build isolation)."""
    pytest.importorskip("setuptools", reason="building without isolation needs setuptools in this environment")
    source = tmp_path_factory.mktemp("plugin_source") / "plugin_package"
    # build from a copy: an in-tree build would leave build/ and *.egg-info in the repository
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("plugin_target")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return target


def potstill(target: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": "1"}  # single-threaded like the rest of the suite (see tests/conftest.py)
    env.pop("POTSTILL_DISABLE_PLUGIN_AUTOLOAD", None)
    env.pop("POTSTILL_BLOCK_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", "potstill.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=240)


def test_installed_metadata_names_the_entry_point(installed):
    (dist_info,) = installed.glob("potstill_example_plugin-0.1.0.dist-info")
    entry_points = (dist_info / "entry_points.txt").read_text()
    assert "[potstill]" in entry_points and "example = potstill_example_plugin" in entry_points


def test_potstill_plugins_lists_the_plugin(installed):
    result = potstill(installed, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["example"] == {"name": "example", "version": "0.1.0", "techniques": {"loss": ["cosine_hidden"]}}


def test_without_the_install_the_loss_is_unknown(tiny_spec, tmp_path):
    try:
        metadata.distribution("potstill-example-plugin")
        pytest.skip("potstill-example-plugin is installed in this environment")
    except metadata.PackageNotFoundError:
        pass
    spec = tiny_spec(stages=[{"distill": {"steps": 1, "losses": [{"name": "cosine_hidden"}]}}])
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = potstill(Path(tmp_path / "nothing-installed-here"), "validate", str(path))
    assert result.returncode == 2
    assert "unknown loss 'cosine_hidden'" in result.stderr and "plugin may not be installed" in result.stderr


def test_a_spec_uses_the_plugin_loss_by_name(installed, tiny_spec, tmp_path):
    spec = tiny_spec(stages=[
        {"student": {"name": "layer_drop", "keep": [0, 2]}},
        {"distill": {"steps": 3, "batch_size": 8, "losses": [{"name": "cosine_hidden", "weight": 1.0}]}},
        {"export": {"name": "onnx"}},
    ])
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "bundle"
    result = potstill(installed, "run", str(path), "--out", str(out), "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    (distill,) = [stage for stage in report["stages"] if stage["stage"] == "distill"]
    assert distill["name"] == "cosine_hidden"
    assert distill["record"]["steps"] == 3 and "cosine_hidden" in distill["record"]["final_losses"]
    assert (out / "model.onnx").is_file()
