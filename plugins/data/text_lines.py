"""Lines of text from a file, or the bundled default: English sentences from CPython's own
documentation (``pydoc_data.topics``) and standard-library docstrings, shipped with every Python, so
the demo needs no download.

The held-out sentences are taken first from a fixed shuffle, so they never appear in training and do
not change with the run's seed.

YAML:  {name: text_lines, path: corpus.txt, heldout: 256}
"""

from __future__ import annotations

import ast
import functools
import os
import platform
import random
import re
import sys
import sysconfig
from pathlib import Path

from pydantic import Field

from potstill.hookspecs import hookimpl
from potstill.io import sha256, write_text
from potstill.techniques import ExistingPath
from potstill.techniques import Context, Data, Dataset, Options

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _sentences(text: str) -> list[str]:
    """Prose sentences of a text: mostly letters, 40-300 characters, ending like a sentence, no doctest."""
    found = []
    for sentence in _SENTENCE_END.split(re.sub(r"\s+", " ", text)):
        sentence = sentence.strip()
        if 40 <= len(sentence) <= 300 and sentence[-1] in ".!?" and ">>>" not in sentence \
                and sum(c.isalpha() for c in sentence) / len(sentence) > 0.72:
            found.append(sentence)
    return found


def _stdlib_docstrings() -> list[str]:
    """Docstring sentences of the Python standard library's own modules (parsed, never imported)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo"}
    sentences: list[str] = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in skip)
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                tree = ast.parse((Path(folder) / name).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        for paragraph in doc.split("\n\n"):
                            sentences.extend(_sentences(paragraph))
    return sentences


def cache_dir() -> Path:
    """Where potstill keeps rebuildable files: ``$POTSTILL_CACHE``, else ``~/.cache/potstill``."""
    return Path(os.environ.get("POTSTILL_CACHE") or Path.home() / ".cache" / "potstill")


@functools.lru_cache(maxsize=1)
def bundled_sentences() -> tuple[str, ...]:
    """English sentences that ship with CPython: the reference documentation (``pydoc_data.topics``)
    and the standard library's docstrings; about twelve thousand, no download.

    Parsing the standard library takes seconds, so the result is cached on disk per Python version.
    """
    cache = cache_dir() / f"bundled-sentences-{platform.python_version()}-v1.txt"
    if cache.is_file():
        return tuple(cache.read_text(encoding="utf-8").splitlines())
    from pydoc_data.topics import topics

    sentences: list[str] = []
    for key in sorted(topics):
        sentences.extend(_sentences(topics[key]))
    sentences.extend(_stdlib_docstrings())
    unique = tuple(dict.fromkeys(sentences))
    try:
        write_text(cache, "\n".join(unique) + "\n")
    except OSError:  # a read-only home is no reason to fail
        pass
    return unique


class TextLines(Data):
    name = "text_lines"

    class Options(Options):
        path: ExistingPath | None = Field(None, description="UTF-8 text file, one example per line; default: bundled")
        heldout: int = Field(256, gt=0, description="examples kept out of training for evaluation")
        min_chars: int = Field(1, ge=0)
        max_examples: int | None = Field(None, gt=0)

    def fingerprint(self) -> str:
        return sha256(self.options.path) if self.options.path else f"bundled:cpython-{sys.version_info[:3]}"

    def load(self, ctx: Context) -> Dataset:
        if self.options.path:
            with open(self.options.path, encoding="utf-8") as handle:
                lines = [line.strip() for line in handle]
            source = self.options.path
        else:
            lines = list(bundled_sentences())
            source = "CPython's documentation and stdlib docstrings (bundled)"
        lines = [line for line in lines if len(line) >= max(1, self.options.min_chars)]
        random.Random(0).shuffle(lines)
        if self.options.max_examples:
            lines = lines[: self.options.max_examples]
        if len(lines) <= self.options.heldout:
            raise ValueError(f"data.path: {source} has {len(lines)} usable lines; need more than heldout={self.options.heldout}")
        held, train = lines[: self.options.heldout], lines[self.options.heldout:]
        return Dataset(train=train, heldout=held, description=f"{len(train)} train / {len(held)} held-out lines from {source}")


@hookimpl
def register_data(register):
    register(TextLines)
