"""Fixtures for the tests of built-in techniques: bundled sentences, sklearn digits, and a Context factory."""

from __future__ import annotations

from pathlib import Path

import pytest

from potstill.techniques import Context, Dataset, LoadedModel


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    from potstill.plugins.data.text_lines import bundled_sentences

    return list(bundled_sentences())


@pytest.fixture(scope="session")
def digits() -> Dataset:
    from potstill.plugins.data.sklearn_digits import SklearnDigits

    return SklearnDigits().load(None)


@pytest.fixture
def text_context(tmp_path, tokenizer, sentences):
    """``text_context(model)`` -> a Context for the sentence_embedding task over bundled sentences."""
    from potstill.plugins.tasks.sentence_embedding import SentenceEmbedding

    def make(model=None, max_length: int = 32, base_dir: Path | None = None) -> Context:
        return Context(seed=0, base_dir=base_dir or tmp_path, out=tmp_path / "out", task=SentenceEmbedding(max_length=max_length),
                       data=Dataset(train=sentences[64:256], heldout=sentences[:64]),
                       teacher=LoadedModel(model=model, tokenizer=tokenizer), progress=False)

    return make
