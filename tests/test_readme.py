"""The README's two commands are the project's contract: CI must run exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```bash\n(python3\.11 -m venv[^\n]*)\n```", text)


def test_readme_starts_with_demo_and_test_commands():
    demo, tests = _commands()[:2]
    assert "potstill run examples/minilm_l3.yaml" in demo
    assert (ROOT / "examples" / "minilm_l3.yaml").is_file()
    assert "-c constraints.txt" in demo and "-c constraints.txt" in tests
    assert "pytest" in tests and "dev" in tests


def test_ci_runs_the_readme_test_command():
    tests = _commands()[1]
    assert tests in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_constraints_pin_cpu_torch():
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text(encoding="utf-8")
