"""Atomic writes: files and directories appear complete or not at all, and leave no temporary behind."""

from __future__ import annotations

import json

import pytest

from distrag import atomic_io
from distrag.atomic_io import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


def test_writes_create_parents_replace_content_and_leave_no_temp(tmp_path):
    target = tmp_path / "a" / "b" / "f.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    atomic_write_bytes(target, b"\x00\x01", fsync=False)
    assert target.read_bytes() == b"\x00\x01"
    j = tmp_path / "a" / "b" / "x.json"
    atomic_write_json(j, {"b": 1, "a": [1, 2]})
    assert json.loads(j.read_text()) == {"a": [1, 2], "b": 1}
    assert j.read_text().endswith("\n") and j.read_text().index('"a"') < j.read_text().index('"b"')  # sorted
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.txt", "x.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic_io.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    with pytest.raises(TypeError):  # a failure while writing the bytes is cleaned up too
        atomic_write_bytes(tmp_path / "g.bin", "not bytes")  # type: ignore[arg-type]
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_directory_appears_only_when_complete(tmp_path):
    final = tmp_path / "out" / "index"
    with atomic_directory(final) as tmp:
        assert tmp.parent == final.parent and tmp != final and tmp.is_dir()
        (tmp / "part").write_text("1")
        assert not final.exists()  # readers see nothing while it is being written
    assert (final / "part").read_text() == "1"
    assert [p.name for p in final.parent.iterdir()] == ["index"]


def test_an_exception_inside_leaves_neither_final_nor_temp(tmp_path):
    final = tmp_path / "index"
    with pytest.raises(RuntimeError, match="crash"), atomic_directory(final) as tmp:
        (tmp / "part").write_text("1")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_needs_overwrite(tmp_path):
    final = tmp_path / "index"
    with atomic_directory(final) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(FileExistsError), atomic_directory(final) as tmp:
        (tmp / "v").write_text("2")
    assert (final / "v").read_text() == "1"  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["index"]  # the refused temp is removed
    with atomic_directory(final, overwrite=True) as tmp:
        (tmp / "w").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["w"]  # replaced as a whole, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["index"]  # the old copy is gone
