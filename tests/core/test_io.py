"""Atomic writes and hashing (core/io.py): a failed write never leaves a truncated file that looks complete."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from potstill import io


def test_atomic_path_replaces_the_file_on_success(tmp_path):
    target = tmp_path / "sub" / "file.txt"  # the folder is created
    with io.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("new")
        assert not target.exists()  # nothing visible until the block ends
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


def test_an_exception_inside_atomic_path_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("disk on fire")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_an_exception_before_the_first_write_creates_nothing(tmp_path):
    target = tmp_path / "file.txt"
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_path(target):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_failing_writer_keeps_the_old_json(tmp_path):
    target = tmp_path / "meta.json"
    io.write_json(target, {"step": 2})
    with pytest.raises(TypeError):
        io.write_text(target, 42)  # type: ignore[arg-type]
    assert io.read_json(target) == {"step": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_json_round_trip(tmp_path):
    value = {"a": [1, 2.5, None], "b": {"c": "d"}}
    io.write_json(tmp_path / "x.json", value)
    assert io.read_json(tmp_path / "x.json") == value
    assert (tmp_path / "x.json").read_text().endswith("\n")


def test_save_tensors_stores_views_and_shared_storage(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"base": base, "transposed": base.T, "same": base, "row": base[1]}
    io.save_tensors(tmp_path / "t.safetensors", tensors, metadata={"step": "3"})
    loaded = io.load_tensors(tmp_path / "t.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)


def test_state_round_trip_with_tied_weights(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied, as in language models
    io.save_state(tmp_path / "s.safetensors", model)

    other = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    other[1].weight = other[0].weight
    io.load_state(tmp_path / "s.safetensors", other)
    assert torch.equal(other[0].weight, model[0].weight)


def test_load_state_is_strict(tmp_path):
    io.save_state(tmp_path / "s.safetensors", nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="Missing key"):
        io.load_state(tmp_path / "s.safetensors", nn.Sequential(nn.Linear(2, 2)))


def test_sha256_matches_hashlib_across_chunks(tmp_path):
    data = bytes(range(256)) * 1000
    (tmp_path / "blob").write_bytes(data)
    assert io.sha256(tmp_path / "blob", chunk=1000) == hashlib.sha256(data).hexdigest()
    assert io.sha256(tmp_path / "blob") == hashlib.sha256(data).hexdigest()


def test_atomic_files_get_the_usual_mode_not_mkstemps_0600(tmp_path):
    import os
    import stat

    from potstill import io

    old = os.umask(0o022)
    try:
        io.write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644
