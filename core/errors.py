"""Errors a user sees as one line each (the CLI prints them without a traceback)."""

from __future__ import annotations


class PotstillError(Exception):
    """A user-facing problem: the message names the place and the fix."""

    exit_code = 1


class PluginError(PotstillError):
    """A plugin is broken: bad hook, duplicate name, bad technique class."""

    exit_code = 2  # a setup mistake the user fixes, like a bad spec (see potstill.cli)


class SpecError(PotstillError):
    """A spec has problems; ``problems`` holds ``(yaml_path, message)`` pairs, all of them at once."""

    exit_code = 2

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        prefix = f"{self.source}: " if self.source else ""
        return [f"{prefix}{path}: {message}" if path else f"{prefix}{message}" for path, message in self.problems]


class MissingDependency(PotstillError):
    """An optional dependency is not installed; the message carries the ``pip install`` line."""

    exit_code = 2
