"""Typed registries of techniques, one per kind, filled by the ``register_<kind>s`` hooks.

A technique is a class with a ``name`` (lower snake_case, unique within its kind), an ``Options``
pydantic model (``extra="forbid"``) and the methods of its kind (see :mod:`potstill.techniques`).
Plugins call ``register(TechniqueClass)``; the registry remembers which plugin registered what so that a
duplicate name is an error naming both plugins.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Callable, Generic, Iterator, TypeVar

from potstill.errors import PluginError

T = TypeVar("T")

#: The kinds of technique, in pipeline order, with the YAML key that selects each in a spec.
KINDS: tuple[str, ...] = (
    "task",
    "data",
    "teacher",
    "student",
    "loss",
    "pruner",
    "quantizer",
    "decoder",
    "exporter",
)

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    cls: type[T]
    plugin: str


class Registry(Generic[T]):
    """The techniques of one kind, by name."""

    def __init__(self, kind: str, base: type[T]):
        self.kind = kind
        self.base = base
        self._entries: dict[str, Entry[T]] = {}

    def registrar(self, plugin: str) -> Callable[[type[T]], type[T]]:
        """The ``register`` callback handed to one plugin's hook implementation."""

        def register(cls: type[T]) -> type[T]:
            self.add(cls, plugin)
            return cls

        return register

    def add(self, cls: type[T], plugin: str) -> None:
        name = getattr(cls, "name", None)
        what = f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else repr(cls)
        where = f"plugin {plugin!r} registered {self.kind} {what}"
        if not isinstance(cls, type) or not issubclass(cls, self.base):
            raise PluginError(f"{where}: it must subclass potstill.techniques.{self.base.__name__}")
        if not isinstance(name, str) or not _NAME.match(name):
            raise PluginError(f"{where}: its `name` must be lower snake_case, got {name!r}")
        if name in self._entries:
            other = self._entries[name]
            raise PluginError(
                f"duplicate {self.kind} name {name!r}: registered by plugin {other.plugin!r} "
                f"({other.cls.__module__}.{other.cls.__qualname__}) and by plugin {plugin!r} "
                f"({cls.__module__}.{cls.__qualname__}); block one with POTSTILL_BLOCK_PLUGINS"
            )
        self._entries[name] = Entry(name, cls, plugin)

    def get(self, name: str) -> type[T]:
        return self._entries[name].cls

    def entry(self, name: str) -> Entry[T]:
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self._entries)

    def unknown(self, name: object) -> str:
        """The message for a name this registry does not have, with a did-you-mean."""
        close = difflib.get_close_matches(str(name), self.names(), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else f"; available: {', '.join(self.names()) or 'none'}"
        return f"unknown {self.kind} {name!r}{hint} (plugin may not be installed)"
