"""Lines of text from a file, or the bundled default: English sentences from CPython's own
documentation (``pydoc_data.topics``, shipped with every Python), so the demo needs no download.

The held-out sentences are taken first from a fixed shuffle, so they never appear in training and do
not change with the run's seed.

YAML:  {name: text_lines, path: corpus.txt, heldout: 256}
"""

from __future__ import annotations

import random
import re

from pydantic import Field

from potstill.hookspecs import hookimpl
from potstill.io import sha256
from potstill.techniques import ExistingPath
from potstill.techniques import Context, Data, Dataset, Options

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def bundled_sentences() -> list[str]:
    """English sentences from the Python reference documentation shipped with CPython."""
    from pydoc_data.topics import topics

    sentences: list[str] = []
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for sentence in _SENTENCE_END.split(text):
            sentence = sentence.strip()
            letters = sum(c.isalpha() for c in sentence)
            # prose, not code or tables: mostly letters, ends like a sentence
            if 40 <= len(sentence) <= 300 and letters / len(sentence) > 0.7 and sentence[-1] in ".!?":
                sentences.append(sentence)
    return list(dict.fromkeys(sentences))


class TextLines(Data):
    name = "text_lines"

    class Options(Options):
        path: ExistingPath | None = Field(None, description="UTF-8 text file, one example per line; default: bundled")
        heldout: int = Field(256, gt=0, description="examples kept out of training for evaluation")
        min_chars: int = Field(1, ge=0)
        max_examples: int | None = Field(None, gt=0)

    def fingerprint(self) -> str:
        return sha256(self.options.path) if self.options.path else "bundled:pydoc_data"

    def load(self, ctx: Context) -> Dataset:
        if self.options.path:
            with open(self.options.path, encoding="utf-8") as handle:
                lines = [line.strip() for line in handle]
            source = self.options.path
        else:
            lines = bundled_sentences()
            source = "CPython pydoc_data.topics (bundled)"
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
