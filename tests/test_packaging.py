"""A regular (non-editable) install carries every module: pyproject lists the packages by hand, so a new
sub-package left out of that list would work in the editable checkout and vanish from a wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_regular_install_has_every_module_and_technique(tmp_path):
    pytest.importorskip("setuptools", reason="building without isolation needs setuptools")
    # build from a copy: an in-tree build/ folder left by an earlier build would hide a missing package
    source = tmp_path / "src"
    source.mkdir()
    for name in ("core", "plugins", "exporters", "kernels"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    source_modules = {
        str(Path(prefix, p.relative_to(ROOT / folder)).with_suffix(""))
        for folder, prefix in (("core", "potstill"), ("plugins", "potstill/plugins"),
                               ("exporters", "potstill/exporters"), ("kernels", "potstill/kernels"))
        for p in (ROOT / folder).rglob("*.py")
    }
    installed = {str(p.relative_to(target).with_suffix("")) for p in (target / "potstill").rglob("*.py")}
    assert source_modules <= installed, f"missing from a regular install: {sorted(source_modules - installed)}"
    # -S: no site-packages processing, so the editable checkout's import hook cannot answer instead
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])}
    code = ("import potstill; from potstill.plugin_manager import build_plugin_manager; "
            "p = build_plugin_manager(autoload=False); print(potstill.__file__); "
            "print(sum(len(r) for r in p.registries.values()))")
    run = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    location, count = run.stdout.split()
    assert Path(location).is_relative_to(target)
    from potstill.plugin_manager import build_plugin_manager

    assert int(count) == sum(len(r) for r in build_plugin_manager(autoload=False).registries.values())
