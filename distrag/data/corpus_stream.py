"""A corpus file read in chunks of passages, never whole, and passages fetched back by row via byte offsets.

For corpora too large to hold as a :class:`~distrag.data.records.Corpus` (a list of every passage):

* :class:`JsonlPassageStream` reads a corpus JSONL (``{"id", "title"?, "text"}`` per line, the format of
  :func:`distrag.data.parsing.load_corpus_jsonl`) ``chunk_passages`` records at a time. Row ``i`` is the
  ``i``-th non-blank line; each chunk carries its first row and the byte offset of every record, so memory
  is bounded by one chunk whatever the file size. Ids are not checked for duplicates here (that would hold
  every id in memory); the in-memory loader does check them.
* :func:`iter_parquet_chunks` does the same for a Parquet file (columns ``id``, ``text``, optional
  ``title``; e.g. a Hugging Face dataset's ``.parquet`` shards), one record batch at a time, and
  :func:`iter_record_chunks` for any iterable of such records (a streamed Hugging Face dataset).
* :func:`write_offsets` / :class:`PassageLookup`: the byte offset of every row, in a side file
  (``int64`` ``.npy``, memory-mapped when read), so a retriever holding only row ids fetches its passages'
  texts from the JSONL with one seek each instead of keeping the corpus in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distrag.data.parsing import check_file, corpus_passage
from distrag.data.records import Passage, PassageChunk  # PassageChunk: re-exported, its old home
from distrag.errors import DataError

__all__ = ["JsonlPassageStream", "PassageChunk", "PassageLookup", "iter_lines", "iter_parquet_chunks",
           "iter_record_chunks", "write_offsets"]


def iter_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """``(line number from 1, byte offset, line)`` of every non-blank line of a JSONL file; row ``i`` of a corpus
    file is the ``i``-th of them. A UTF-8 BOM on the first line is skipped (the offset points past it)."""
    with open(path, "rb") as f:
        pos = 0
        for lineno, raw in enumerate(f, 1):
            start = pos
            pos += len(raw)
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw, start = raw[3:], start + 3
            if raw.strip():
                yield lineno, start, raw


def _passage(raw: bytes, path: str, row: int) -> Passage:
    """One JSONL line -> Passage; errors name the file and the row."""
    label = f"row {row}"
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"not a JSON object in UTF-8 ({e})", file=path, record=label) from None
    if not isinstance(rec, dict):
        raise DataError(f"expected a JSON object, got {type(rec).__name__}", file=path, record=label)
    return _record_passage(rec, path, label)


_record_passage = corpus_passage  # the in-memory loader's reading of a record, so both read a file alike


class JsonlPassageStream:
    """A corpus JSONL read ``chunk_passages`` records at a time (see the module docstring)."""

    def __init__(self, path: str | Path, *, chunk_passages: int = 50_000):
        if chunk_passages < 1:
            raise ValueError(f"chunk_passages must be >= 1, got {chunk_passages}")
        self.path = check_file(path, "corpus file")
        self.chunk_passages = int(chunk_passages)

    def _records(self) -> Iterator[tuple[int, bytes]]:
        """``(byte offset, line)`` of every non-blank line (a UTF-8 BOM on the first line is skipped)."""
        for _, start, raw in iter_lines(self.path):
            yield start, raw

    def chunks(self, rows: tuple[int, int] | None = None) -> Iterator[PassageChunk]:
        """The passages in file order, ``chunk_passages`` per chunk (the last holds the rest); ``rows``: only those
        of rows ``[start, stop)`` (a pool's index rank encodes its part; lines outside it are not parsed)."""
        lo, hi = rows if rows is not None else (0, None)
        row, passages, offsets = lo, [], []
        for i, (offset, raw) in enumerate(self._records()):
            if i < lo:
                continue
            if hi is not None and i >= hi:
                break
            passages.append(_passage(raw, str(self.path), row + len(passages)))
            offsets.append(offset)
            if len(passages) == self.chunk_passages:
                yield PassageChunk(row, passages, np.asarray(offsets, dtype=np.int64))
                row, passages, offsets = row + len(passages), [], []
        if passages:
            yield PassageChunk(row, passages, np.asarray(offsets, dtype=np.int64))

    def offsets(self) -> np.ndarray:
        """Byte offset of every row (one pass over the file, no parsing): ``int64 [N]``."""
        return np.fromiter((offset for offset, _ in self._records()), dtype=np.int64)

    def __iter__(self) -> Iterator[PassageChunk]:
        return self.chunks()


def iter_record_chunks(records: Iterable[dict[str, Any]], *, source: str = "records",
                       chunk_passages: int = 50_000) -> Iterator[PassageChunk]:
    """Passages of any iterable of ``{"id", "title"?, "text"}`` dicts (e.g. a Hugging Face
    ``load_dataset(..., streaming=True)`` split), ``chunk_passages`` per chunk; ``source`` names them in errors."""
    row, passages = 0, []
    for rec in records:
        passages.append(_record_passage(rec, source, f"row {row + len(passages)}"))
        if len(passages) == chunk_passages:
            yield PassageChunk(row, passages)
            row, passages = row + len(passages), []
    if passages:
        yield PassageChunk(row, passages)


def iter_parquet_chunks(path: str | Path, *, chunk_passages: int = 50_000) -> Iterator[PassageChunk]:
    """Passages of a Parquet file (``id``, ``text``, optional ``title`` columns; e.g. a Hugging Face dataset's
    ``.parquet`` shards), ``chunk_passages`` per chunk, read one record batch at a time (needs ``pyarrow``)."""
    import pyarrow.parquet as pq

    p = check_file(path, "corpus file")
    pf = pq.ParquetFile(p)
    columns = [c for c in ("id", "title", "text") if c in pf.schema_arrow.names]
    missing = {"id", "text"} - set(columns)
    if missing:
        raise DataError(f"Parquet corpus lacks column(s) {sorted(missing)}; has {pf.schema_arrow.names}", file=str(p))
    batches = pf.iter_batches(batch_size=min(chunk_passages, 65_536), columns=columns)
    records = (rec for batch in batches for rec in batch.to_pylist())
    yield from iter_record_chunks(records, source=str(p), chunk_passages=chunk_passages)


def write_offsets(stream: JsonlPassageStream, path: str | Path) -> Path:
    """Save ``stream``'s row byte offsets as an ``int64`` ``.npy`` side file; returns its path."""
    path = Path(path)
    np.save(path, stream.offsets())
    return path


class PassageLookup:
    """Passages of a corpus JSONL fetched by row through its offsets side file (memory-mapped)."""

    def __init__(self, corpus_path: str | Path, offsets_path: str | Path):
        self.path = check_file(corpus_path, "corpus file")
        self.offsets = np.load(offsets_path, mmap_mode="r")
        self._file = open(self.path, "rb")  # noqa: SIM115 (closed by close() / the context manager)

    def __len__(self) -> int:
        return len(self.offsets)

    def get(self, rows: Sequence[int] | np.ndarray) -> list[Passage]:
        """The passages at ``rows`` (global row ids, any order; ``IndexError`` outside ``[0, N)``)."""
        out = []
        for r in np.asarray(rows, dtype=np.int64).reshape(-1).tolist():
            if not 0 <= r < len(self.offsets):
                raise IndexError(f"row {r} outside the corpus [0, {len(self.offsets)})")
            self._file.seek(int(self.offsets[r]))
            out.append(_passage(self._file.readline(), str(self.path), r))
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> PassageLookup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
