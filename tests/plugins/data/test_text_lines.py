"""Text lines: the bundled corpus is hundreds of prose sentences; held-out lines are disjoint from training
and fixed whatever the run's seed; a user file works; too few lines is a clear error."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from potstill.plugins.data.text_lines import TextLines


def test_bundled_sentences_are_prose(sentences):
    assert len(sentences) >= 1000
    assert len(set(sentences)) == len(sentences)
    for sentence in sentences:
        assert 40 <= len(sentence) <= 300 and sentence[-1] in ".!?", sentence
        assert sum(c.isalpha() for c in sentence) / len(sentence) > 0.7, sentence
        assert "\n" not in sentence and "  " not in sentence and ">>>" not in sentence
    # sentences, not fragments (docstrings such as "self and other are ..." may start in lower case)
    assert sum(s[0].isupper() for s in sentences) > 0.9 * len(sentences)
    assert sum(" the " in s for s in sentences) > len(sentences) // 3  # English, not identifiers


def test_heldout_disjoint_and_independent_of_seed(text_context):
    first = TextLines(heldout=100).load(text_context())
    ctx = text_context()
    ctx.seed = 12345
    second = TextLines(heldout=100).load(ctx)
    assert len(first.heldout) == 100 and len(first.train) >= 400
    assert not set(first.heldout) & set(first.train)
    assert first.heldout == second.heldout and first.train == second.train
    # the held-out set is a shuffle, not the first sentences of the documentation
    from potstill.plugins.data.text_lines import bundled_sentences

    assert first.heldout != list(bundled_sentences()[:100])
    assert isinstance(first.heldout, list)
    # max_examples keeps the same held-out lines
    assert TextLines(heldout=100, max_examples=300).load(ctx).heldout == first.heldout


def test_a_path_file_works_relative_to_the_spec(tmp_path, text_context):
    lines = [f"Sentence number {i} of a user's own corpus." for i in range(30)] + ["", "  ", "tiny"]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    options = TextLines.Options.model_validate({"path": "corpus.txt", "heldout": 5, "min_chars": 5}, context={"base_dir": tmp_path})
    assert options.path == str((tmp_path / "corpus.txt").resolve())
    data = TextLines(options).load(text_context())
    assert len(data.heldout) == 5 and len(data.train) == 25  # blank and too-short lines dropped
    assert set(data.heldout) | set(data.train) == set(lines[:30])
    assert "corpus.txt" in data.description
    assert TextLines(options).fingerprint() != TextLines().fingerprint()


def test_missing_file_is_a_validation_error(tmp_path):
    with pytest.raises(ValidationError, match="file not found"):
        TextLines.Options.model_validate({"path": "nope.txt"}, context={"base_dir": tmp_path})


def test_too_few_lines_is_a_clear_error(tmp_path, text_context):
    (tmp_path / "small.txt").write_text("one line only\nand another\n", encoding="utf-8")
    data = TextLines(TextLines.Options.model_validate({"path": "small.txt", "heldout": 2}, context={"base_dir": tmp_path}))
    with pytest.raises(ValueError, match=r"has 2 usable lines; need more than heldout=2"):
        data.load(text_context())
