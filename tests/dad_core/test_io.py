"""Atomic file and directory writes: a failed writer leaves the old content, and no temporary files stay behind."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest

from dad_core.io import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_writes_create_parents_and_leave_no_temp_files(tmp_path):
    target = tmp_path / "a" / "b" / "file.txt"
    assert atomic_write_text(target, "hello") == target
    assert target.read_text() == "hello"
    atomic_write_bytes(tmp_path / "a" / "raw.bin", b"\x00\x01")
    atomic_write_json(tmp_path / "a" / "obj.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "a" / "obj.json").read_text()) == {"a": [1, 2], "b": 1}
    assert _names(tmp_path / "a") == ["b", "obj.json", "raw.bin"]
    assert _names(tmp_path / "a" / "b") == ["file.txt"]


def test_overwrite_replaces_content(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert _names(tmp_path) == ["f.txt"]


def test_failing_writer_keeps_the_old_file_and_cleans_up(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def writer(tmp):
        tmp.write_text("half-written")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_path(target, writer)
    assert target.read_text() == "old"
    assert _names(tmp_path) == ["f.txt"]


def test_failing_writer_on_a_new_path_leaves_nothing(tmp_path):
    def writer(tmp):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_path(tmp_path / "new.txt", writer)
    assert _names(tmp_path) == []


def test_atomic_dir_creates_and_replaces_a_directory(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        assert tmp != out
        assert tmp.parent == out.parent
        (tmp / "a.txt").write_text("1")
    assert _names(out) == ["a.txt"]
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("2")
        assert _names(out) == ["a.txt"]  # the old directory is untouched until the block succeeds
    assert _names(out) == ["b.txt"]  # replaced, not merged
    assert _names(tmp_path) == ["out"]  # no temporary or .old directory left


def _fill_then_fail(out, text):
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text(text)
        raise RuntimeError("killed")


def test_failing_atomic_dir_block_keeps_the_old_directory(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="killed"):
        _fill_then_fail(out, "new")
    assert (out / "a.txt").read_text() == "old"
    assert _names(tmp_path) == ["out"]


def test_failing_atomic_dir_block_on_a_new_path_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="killed"):
        _fill_then_fail(tmp_path / "out", "x")
    assert _names(tmp_path) == []


def test_sha256_file_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 1000
    path = atomic_write_bytes(tmp_path / "d.bin", data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path, chunk=7) == hashlib.sha256(data).hexdigest()


def test_outputs_get_the_permissions_of_a_plain_write(tmp_path):
    # mkstemp/mkdtemp make 0600/0700 entries; renamed into place as-is they would be unreadable to a later
    # pipeline step running as another user.
    umask = os.umask(0o022)
    try:
        (tmp_path / "plain.txt").write_text("x")
        (tmp_path / "plain_dir").mkdir()
        atomic_write_text(tmp_path / "atomic.txt", "x")
        with atomic_dir(tmp_path / "atomic_dir"):
            pass
    finally:
        os.umask(umask)

    def mode(name):
        return stat.S_IMODE((tmp_path / name).stat().st_mode)

    assert mode("atomic.txt") == mode("plain.txt") == 0o644
    assert mode("atomic_dir") == mode("plain_dir") == 0o755
