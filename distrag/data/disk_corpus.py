"""A corpus read by row from its JSONL file: :class:`DiskCorpus`, its side files, and when it is used.

Why
---
An in-memory :class:`~distrag.data.records.Corpus` holds every passage as a Python object (about 1 KB a passage,
in every trainer, the index rank and evaluation: tens of GB at 21M passages). A ``DiskCorpus`` holds open files:
its side files (three arrays of 8 bytes a passage) and the corpus, read with ``pread`` when a row or an id is asked
for (a retrieved passage going into a prompt, a gold passage's row). Nothing is memory-mapped: a mapped page a
process has touched counts in its resident memory (and the kernel maps 16 pages around each fault), while pages
read with ``pread`` stay in the kernel's page cache, shared and reclaimable. Encoding streams the file in chunks
(:meth:`DiskCorpus.chunks`).

Side files
----------
Built once per corpus file, by one process, under ``<cache root>/<16 hex digits>/`` (the run's
``output_dir/corpus``; the digits hash the file's resolved path, size and modification time, so an edited file
gets new side files and the old ones are removed)::

    offsets.int64     byte offset of each row's record (row i = the i-th non-blank line)
    id_hash.uint64    a 64-bit hash (BLAKE2b) of every passage id, sorted
    id_row.int64      the row of each of those hashes
    corpus.json       rows, the file's identity (path, size, mtime_ns) and the content fingerprint; written last

The row of an id is a binary search in ``id_hash`` and a read of the candidate rows' records to compare the ids
themselves (two ids sharing a hash are told apart by their text; none is a Python dict of every id). The build
reads every record as the in-memory loader does, so bad records (``line N``, field) and duplicate ids (``line N``
and the line of the first) are the same errors, and computes the same fingerprint as ``Corpus.fingerprint``.
It is written in a temporary folder renamed into place (:func:`distrag.atomic_io.atomic_directory`): readers see
all of it or nothing. While building, the process holds the hashes and their sort order (24 bytes a passage);
after, nothing that grows with the corpus.

When
----
``data.corpus_on_disk`` (:class:`CorpusOpener`): ``true``, ``false``, or ``auto`` (default): on for a
``data.corpus_path`` file of at least :data:`AUTO_ON_DISK_BYTES`. Corpora built from a questions file (HotPotQA
contexts, PopQA ``ctxs``) and the synthetic world are small and stay in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from distrag.atomic_io import atomic_directory, atomic_write_json
from distrag.data.corpus_stream import JsonlPassageStream, iter_lines
from distrag.data.parsing import check_file, corpus_passage, load_corpus_jsonl, parse_json_line
from distrag.data.records import BaseCorpus, Passage, PassageChunk, fingerprint_update
from distrag.errors import DataError

if TYPE_CHECKING:
    from distrag.config import DataConfig

__all__ = ["AUTO_ON_DISK_BYTES", "CorpusOpener", "DiskCorpus", "id_hashes", "reads_from_disk", "side_folder"]

log = logging.getLogger(__name__)

AUTO_ON_DISK_BYTES = 100 * 2**20
"""``data.corpus_on_disk: auto`` reads a corpus file of at least this size (100 MiB, about 120,000 passages of
Wikipedia-paragraph length) from disk; a smaller one costs under ~150 MB in memory per process."""
META = "corpus.json"
FORMAT = "distrag.disk_corpus"
FORMAT_VERSION = 1
_BUILD_ROWS = 16_384  # records parsed between two writes of the side files while building


def id_hashes(ids: Iterable[str]) -> np.ndarray:
    """64-bit BLAKE2b hashes of passage ids (``uint64``): the keys of the id -> row index."""
    blob = b"".join(hashlib.blake2b(i.encode(), digest_size=8).digest() for i in ids)
    return np.frombuffer(blob, dtype="<u8").astype(np.uint64)


def side_folder(cache_root: str | Path, path: str | Path) -> Path:
    """``cache_root/<hash of the file's resolved path, size and mtime>``: where ``path``'s side files live."""
    p = Path(path).resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(cache_root) / key


def _line_of(path: Path, offset: int) -> int:
    """The line number (from 1) of the record starting at byte ``offset`` (for error messages only: it counts)."""
    newlines, done = 0, 0
    with open(path, "rb") as f:
        while done < offset:
            block = f.read(min(1 << 22, offset - done))
            if not block:
                break
            newlines += block.count(b"\n")
            done += len(block)
    return newlines + 1


class _Column:
    """One side file: ``n`` little-endian 8-byte integers, read with ``pread`` (module docstring: no memory map)."""

    def __init__(self, path: Path, dtype: str, n: int):
        self.path, self.dtype, self.n = path, np.dtype(dtype), n
        self.fd = os.open(path, os.O_RDONLY)
        if os.fstat(self.fd).st_size != 8 * n:
            os.close(self.fd)
            raise DataError(f"side file {path} is not {8 * n} bytes (damaged: delete its folder to rebuild it)")

    def __len__(self) -> int:
        return self.n

    def read(self, start: int, stop: int) -> np.ndarray:
        """Items ``[start, stop)``."""
        return np.frombuffer(os.pread(self.fd, 8 * (stop - start), 8 * start), dtype=self.dtype)

    def __getitem__(self, i: int) -> int:
        return int(self.read(int(i), int(i) + 1)[0])

    def equal_range(self, value: int) -> tuple[int, int]:
        """``[lo, hi)`` of the items equal to ``value`` in a sorted column (two binary searches, one read a step)."""
        lo, hi = 0, self.n
        while lo < hi:  # first item >= value
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if self[mid] < value else (lo, mid)
        end, hi = lo, self.n
        while end < hi:  # first item > value
            mid = (end + hi) // 2
            end, hi = (mid + 1, hi) if self[mid] <= value else (end, mid)
        return lo, end

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _record_at(fd: int, offsets: np.ndarray | _Column, size: int, row: int) -> bytes:
    """The bytes of row ``row``'s record (its line, without the newline)."""
    start = int(offsets[row])
    end = int(offsets[row + 1]) if row + 1 < len(offsets) else size
    return os.pread(fd, end - start, start).split(b"\n", 1)[0]


def _check_unique(path: Path, sorted_hashes: np.ndarray, rows: np.ndarray, offsets: _Column) -> None:
    """Raise the in-memory loader's duplicate-id error for the first repeated id in file order. Equal hashes are
    compared by the ids themselves (a 64-bit collision of two different ids is allowed)."""
    same = np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1])  # j: hashes j and j + 1 are equal
    if not same.size:
        return
    size = path.stat().st_size
    worst: tuple[int, int, str] | None = None  # (row of the repeat, row of the first, id)
    fd = os.open(path, os.O_RDONLY)
    try:
        for group in np.split(same, np.flatnonzero(np.diff(same) > 1) + 1):  # runs of one hash
            seen: dict[str, int] = {}
            for r in sorted(int(x) for x in rows[group[0]:group[-1] + 2]):
                pid = corpus_passage(parse_json_line(_record_at(fd, offsets, size, r), path, f"row {r}"),
                                     str(path), f"row {r}").id
                if pid in seen:
                    if worst is None or r < worst[0]:
                        worst = (r, seen[pid], pid)
                    break
                seen[pid] = r
    finally:
        os.close(fd)
    if worst is not None:
        r, first, pid = worst
        raise DataError(f"duplicate passage id {pid!r} (first at line {_line_of(path, int(offsets[first]))})",
                        file=str(path), record=f"line {_line_of(path, int(offsets[r]))}", field="id")


def _build(path: Path, tmp: Path) -> dict:
    """Read every record of ``path`` (checked as the in-memory loader checks it) and write the side files into
    ``tmp``; returns the metadata (written by the caller)."""
    t0, fingerprint, n = time.perf_counter(), hashlib.sha256(), 0
    st = path.stat()
    with open(tmp / "offsets.int64", "wb") as f_off, open(tmp / "hashes.tmp", "wb") as f_hash:
        offsets: list[int] = []
        passages: list[Passage] = []

        def flush() -> None:
            f_off.write(np.asarray(offsets, dtype=np.int64).tobytes())
            f_hash.write(id_hashes(p.id for p in passages).tobytes())
            fingerprint_update(fingerprint, passages)
            offsets.clear()
            passages.clear()

        try:
            for lineno, offset, raw in iter_lines(path):
                label = f"line {lineno}"
                passages.append(corpus_passage(parse_json_line(raw, path, label), str(path), label))
                offsets.append(offset)
                n += 1
                if len(passages) == _BUILD_ROWS:
                    flush()
        except OSError as e:
            raise DataError(f"cannot read: {e.strerror or e}", file=str(path)) from None
        flush()
    if n == 0:
        raise DataError("corpus is empty: at least one passage is needed", file=str(path))
    hashes = np.fromfile(tmp / "hashes.tmp", dtype=np.uint64)
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    del hashes
    (tmp / "hashes.tmp").unlink()
    offset_column = _Column(tmp / "offsets.int64", "<i8", n)
    try:
        _check_unique(path, sorted_hashes, order, offset_column)
    finally:
        offset_column.close()
    sorted_hashes.tofile(tmp / "id_hash.uint64")
    order.astype(np.int64, copy=False).tofile(tmp / "id_row.int64")
    log.info("corpus %s: %d passages read, side files written in %.1fs", path, n, time.perf_counter() - t0)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "source": str(path.resolve()), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "rows": n, "fingerprint": fingerprint.hexdigest()[:16]}


def _remove_stale(cache_root: Path, source: str, keep: Path) -> None:
    """Side files of earlier versions of the same corpus file (it was edited since): never read again."""
    for meta in cache_root.glob(f"*/{META}"):
        if meta.parent == keep:
            continue
        try:
            if json.loads(meta.read_text()).get("source") == source:
                shutil.rmtree(meta.parent, ignore_errors=True)
        except (OSError, ValueError):
            continue


class DiskCorpus(BaseCorpus):
    """The passages of a corpus JSONL, read by row through its side files (module docstring). Open with
    :meth:`open`; read-only and safe to share between threads (each read is one ``pread``)."""

    on_disk = True

    def __init__(self, path: str | Path, folder: str | Path):
        self.path = check_file(path, "corpus file")
        self.folder = Path(folder)
        self.source = str(path)
        self.scratch_dir = self.folder.parent
        try:
            self.meta = json.loads((self.folder / META).read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"side files of the corpus are unreadable ({self.folder / META}: {e})",
                            file=str(path)) from None
        st = self.path.stat()
        if self.meta.get("format") != FORMAT or (self.meta["size"], self.meta["mtime_ns"]) != (st.st_size,
                                                                                                 st.st_mtime_ns):
            raise DataError(f"the corpus file changed since its side files in {self.folder} were built; run again "
                            "to rebuild them", file=str(path))
        n = int(self.meta["rows"])
        self._size = st.st_size
        self._offsets = _Column(self.folder / "offsets.int64", "<i8", n)
        self._hash = _Column(self.folder / "id_hash.uint64", "<u8", n)
        self._rows = _Column(self.folder / "id_row.int64", "<i8", n)
        self._fd = os.open(self.path, os.O_RDONLY)

    @classmethod
    def open(cls, path: str | Path, cache_root: str | Path, *, writer: bool = True,
             wait_s: float = 3600.0) -> DiskCorpus:
        """The corpus at ``path`` with its side files under ``cache_root``: built there first when missing by a
        ``writer`` (rank 0 or the single process), waited for (up to ``wait_s``) by the others."""
        p = check_file(path, "corpus file")
        folder = side_folder(cache_root, p)
        if not (folder / META).is_file():
            if writer:
                log.info("corpus %s (%.0f MiB): reading it once to write its side files under %s", p,
                         p.stat().st_size / 2**20, folder)
                try:
                    with atomic_directory(folder) as tmp:
                        atomic_write_json(tmp / META, _build(p, tmp))
                except FileExistsError:  # another writer finished first: its files are complete
                    pass
                _remove_stale(Path(cache_root), str(p.resolve()), folder)
            else:
                deadline = time.monotonic() + wait_s
                while not (folder / META).is_file():
                    if time.monotonic() > deadline:
                        raise DataError(f"the side files of the corpus did not appear in {folder} within "
                                        f"{wait_s:.0f}s (rank 0 writes them)", file=str(p))
                    time.sleep(1.0)
        return cls(p, folder)

    def __len__(self) -> int:
        return len(self._offsets)

    def passage(self, row: int) -> Passage:
        if not 0 <= row < len(self._offsets):
            raise IndexError(f"row {row} outside the corpus [0, {len(self._offsets)})")
        label = f"row {row}"
        raw = _record_at(self._fd, self._offsets, self._size, row)
        return corpus_passage(parse_json_line(raw, self.path, label), self.source, label)

    def position(self, passage_id: str) -> int:
        lo, hi = self._hash.equal_range(int(id_hashes([passage_id])[0]))
        for j in range(lo, hi):
            row = self._rows[j]
            if self.passage(row).id == passage_id:
                return row
        raise KeyError(passage_id)

    def chunks(self, chunk_passages: int = 50_000) -> Iterator[PassageChunk]:
        return JsonlPassageStream(self.path, chunk_passages=chunk_passages).chunks()

    def texts(self, rows: Iterable[int] | np.ndarray | None = None) -> list[str]:
        if rows is None:
            raise ValueError("DiskCorpus.texts() without rows would hold every text in memory: pass rows, or "
                             "stream the corpus with chunks()")
        return super().texts(rows)

    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    def close(self) -> None:
        for column in (self._offsets, self._hash, self._rows):
            column.close()
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        if getattr(self, "_rows", None) is not None:
            self.close()

    def __deepcopy__(self, memo: dict) -> DiskCorpus:
        return self  # read-only: a copy would only duplicate the open file

    def __reduce__(self):
        return (DiskCorpus, (str(self.path), str(self.folder)))

    def __repr__(self) -> str:
        return f"DiskCorpus({str(self.path)!r}, {len(self)} passages, side files {str(self.folder)!r})"


@dataclass(frozen=True)
class CorpusOpener:
    """How a loader opens ``data.corpus_path``: in memory, or as a :class:`DiskCorpus` with side files under
    ``cache_root`` (``output_dir/corpus``), built by a ``writer``, waited for by the other processes."""

    on_disk: bool | str = "auto"
    cache_root: Path | None = None
    writer: bool = True
    wait_s: float = 3600.0

    def uses_disk(self, path: str | Path) -> bool:
        """Whether ``path`` is read from disk: ``on_disk``, or under ``auto`` a file of at least
        :data:`AUTO_ON_DISK_BYTES`."""
        if self.on_disk == "auto":
            p = Path(path)
            return p.is_file() and p.stat().st_size >= AUTO_ON_DISK_BYTES
        return bool(self.on_disk)

    def __call__(self, path: str | Path) -> BaseCorpus:
        if not self.uses_disk(path):
            return load_corpus_jsonl(path)
        if self.cache_root is None:
            raise ValueError("an on-disk corpus needs a folder for its side files: pass CorpusOpener(cache_root=...)")
        return DiskCorpus.open(path, self.cache_root, writer=self.writer, wait_s=self.wait_s)


def reads_from_disk(cfg: DataConfig) -> bool:
    """Whether ``cfg``'s corpus is read from disk (a ``corpus_path`` that ``corpus_on_disk`` puts on disk)."""
    return bool(cfg.corpus_path) and CorpusOpener(cfg.corpus_on_disk).uses_disk(cfg.corpus_path)
