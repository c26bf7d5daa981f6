"""Atomic writes: files and directories appear complete or not at all, leave no temporary behind, and get the
modes the user's umask gives (the run's secret aside)."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
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


# ----------------------------------------------------------------------------------------------
# modes: what the user's umask gives, like any file they write (teammates on a shared cluster can read)


@pytest.fixture
def umask():
    """Set the process umask for one test (``umask(0o027)``), restored afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750),
                                                       (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)])
def test_files_and_folders_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    assert atomic_io.current_umask() == mask
    atomic_write_text(tmp_path / "report" / "table.md", "| a |\n")
    atomic_write_json(tmp_path / "manifest.json", {"a": 1})
    atomic_write_bytes(tmp_path / "plot.png", b"\x89PNG", fsync=False)
    with atomic_directory(tmp_path / "index") as tmp:
        (tmp / "part").write_text("1")
    assert _mode(tmp_path / "report" / "table.md") == _mode(tmp_path / "manifest.json") == file_mode
    assert _mode(tmp_path / "plot.png") == file_mode
    assert _mode(tmp_path / "index") == _mode(tmp_path / "report") == dir_mode
    atomic_write_text(tmp_path / "manifest.json", "{}")  # replacing a file gives the new one the same mode
    assert _mode(tmp_path / "manifest.json") == file_mode


def test_an_index_folder_is_readable_as_the_umask_allows_and_the_run_secret_stays_private(tmp_path, umask):
    from distrag.distributed.run_secret import run_secret, secret_path
    from distrag.retrieval import index_store
    from distrag.retrieval.sharded_index import ShardedIndex

    umask(0o022)
    index = ShardedIndex(8, n_shards=2).build(np.random.default_rng(0).standard_normal((20, 8)).astype("float32"))
    out = index_store.save(index, tmp_path / "run" / "index_v1")
    assert _mode(out) == 0o755
    assert {_mode(p) for p in out.rglob("*") if p.is_file()} == {0o644}  # manifest, shards, vectors
    run_secret(tmp_path / "run")
    assert _mode(secret_path(tmp_path / "run")) == 0o600  # a key: never what the umask would give


def test_the_umask_is_read_without_changing_it(monkeypatch, umask):
    umask(0o027)
    if atomic_io._umask_from_proc() is not None:  # Linux: /proc/self/status
        assert atomic_io._umask_from_proc() == 0o027
    monkeypatch.setattr(atomic_io, "_umask_from_proc", lambda: None)  # elsewhere: set and put back, once
    atomic_io._umask_by_setting.cache_clear()
    try:
        assert atomic_io.current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # left as it was
    finally:
        atomic_io._umask_by_setting.cache_clear()


def test_atomic_open_appears_complete_or_not_at_all(tmp_path):
    from distrag.atomic_io import atomic_open

    out = tmp_path / "sub" / "out.jsonl"
    with pytest.raises(RuntimeError):
        with atomic_open(out, "w", encoding="utf-8") as f:
            f.write("first line\n")
            raise RuntimeError("interrupted half way")
    assert not out.exists() and list(out.parent.iterdir()) == []  # no partial file, no temporary left
    with atomic_open(out, "w", encoding="utf-8") as f:
        f.write("a\n")
        assert not out.exists()  # only once the block ends
    assert out.read_text() == "a\n"
    with pytest.raises(ValueError, match="mode 'w' or 'wb'"):
        with atomic_open(out, "a"):
            pass
