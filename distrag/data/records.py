"""Canonical records every loader produces and every stage consumes.

A ``Question`` carries its gold answers and, where the dataset has them, the ids of the passages
that support it (context labels). A corpus is an ordered set of ``Passage`` s; the position (row) of a
passage is its stable integer id, the id the vector index stores.

:class:`BaseCorpus` is what every consumer of a corpus uses (trainer, pipeline, experiment, index rank,
encoders): its length, a passage by row, the row of a passage id, the texts of rows, the passages in
order chunk by chunk (how a large corpus is encoded) and a content fingerprint. :class:`Corpus` holds every
passage in memory (small corpora, the synthetic world, corpora built from a questions file);
:class:`distrag.data.disk_corpus.DiskCorpus` reads them by row from the corpus file, so a process holding a
21M-passage corpus does not hold 21M ``Passage`` objects.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distrag.errors import DataError


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str

    def as_text(self) -> str:
        """The string the embedder sees (title and body, as DPR and Atlas do)."""
        return f"{self.title}. {self.text}" if self.title else self.text


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    answers: tuple[str, ...]
    gold_passage_ids: tuple[str, ...] | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def has_labels(self) -> bool:
        return bool(self.gold_passage_ids)


@dataclass
class PassageChunk:
    """``passages`` of rows ``[start, start + len(passages))`` and, when read from a JSONL file, each one's byte
    ``offsets``."""

    start: int
    passages: list[Passage]
    offsets: np.ndarray | None = None

    def texts(self) -> list[str]:
        """What the embedder sees for each passage (title and body: ``Passage.as_text``)."""
        return [p.as_text() for p in self.passages]


def fingerprint_update(h: Any, passages: Iterable[Passage]) -> None:
    """Feed ``passages`` to the content hash ``h`` (a ``hashlib.sha256()``): one definition, so that both corpus
    kinds agree on the fingerprint of the same passages."""
    for p in passages:
        h.update(p.id.encode())
        h.update(b"\0")
        h.update(p.as_text().encode())
        h.update(b"\1")


class BaseCorpus(Sequence[Passage], ABC):
    """What a corpus offers its consumers (see the module docstring). Rows are ``0 .. len - 1``, in file order.

    ``on_disk`` tells the encoders which way to go: False, encode the whole corpus in one length-sorted pass;
    True, stream :meth:`chunks` (memory follows the chunk, not the corpus)."""

    on_disk: bool = False
    source: str | None = None
    scratch_dir: Path | None = None
    """Where encodings of an on-disk corpus write their temporary vector stores (next to its side files, on the
    run's disk rather than a possibly memory-backed /tmp); None: the system's temporary folder."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def passage(self, row: int) -> Passage:
        """The passage at ``row`` (``IndexError`` outside ``[0, len)``)."""

    @abstractmethod
    def position(self, passage_id: str) -> int:
        """The row of ``passage_id`` (``KeyError`` when the corpus has no such passage)."""

    @abstractmethod
    def chunks(self, chunk_passages: int = 50_000) -> Iterator[PassageChunk]:
        """Every passage in row order, ``chunk_passages`` per chunk (the last holds the rest)."""

    @abstractmethod
    def fingerprint(self) -> str:
        """Content hash of the ids and texts in order: an index built for one corpus is never silently reused
        for another. Equal for a :class:`Corpus` and a ``DiskCorpus`` of the same passages."""

    def __getitem__(self, row):  # type: ignore[override]
        """``corpus[row]`` (negative rows count from the end, as for a list) or a list for a slice."""
        if isinstance(row, slice):
            return [self.passage(r) for r in range(*row.indices(len(self)))]
        row = int(row)
        return self.passage(row + len(self) if row < 0 else row)

    def take(self, rows: Iterable[int] | np.ndarray) -> list[Passage]:
        """The passages at ``rows`` (any order, repeats allowed)."""
        return [self.passage(int(r)) for r in np.asarray(rows, dtype=np.int64).reshape(-1)]

    def texts(self, rows: Iterable[int] | np.ndarray | None = None) -> list[str]:
        """What the embedder sees of the passages at ``rows`` (all of them when None: in memory only)."""
        if rows is None:
            return [t for c in self.chunks() for t in c.texts()]
        return [p.as_text() for p in self.take(rows)]

    def __iter__(self) -> Iterator[Passage]:
        for chunk in self.chunks():
            yield from chunk.passages

    def __contains__(self, passage_id: object) -> bool:  # type: ignore[override]
        if not isinstance(passage_id, str):
            return False
        try:
            self.position(passage_id)
        except KeyError:
            return False
        return True


class Corpus(BaseCorpus):
    """Passages held in memory with stable integer ids (their position). Duplicate string ids are an error."""

    def __init__(self, passages: Iterable[Passage], *, source: str | None = None):
        self.passages: list[Passage] = list(passages)
        self.source = source
        if not self.passages:
            raise DataError("corpus is empty: at least one passage is needed", file=source)
        self._pos: dict[str, int] = {}
        for i, p in enumerate(self.passages):
            if p.id in self._pos:
                raise DataError(f"duplicate passage id {p.id!r} (first at record {self._pos[p.id]})",
                                file=source, record=i, field="id")
            self._pos[p.id] = i

    def __len__(self) -> int:
        return len(self.passages)

    def passage(self, row: int) -> Passage:
        if not 0 <= row < len(self.passages):
            raise IndexError(f"row {row} outside the corpus [0, {len(self.passages)})")
        return self.passages[row]

    def __getitem__(self, i):  # type: ignore[override]
        return self.passages[i]

    def __iter__(self) -> Iterator[Passage]:
        return iter(self.passages)

    def position(self, passage_id: str) -> int:
        return self._pos[passage_id]

    def __contains__(self, passage_id: object) -> bool:  # type: ignore[override]
        return passage_id in self._pos

    def chunks(self, chunk_passages: int = 50_000) -> Iterator[PassageChunk]:
        if chunk_passages < 1:
            raise ValueError(f"chunk_passages must be >= 1, got {chunk_passages}")
        for start in range(0, len(self.passages), chunk_passages):
            yield PassageChunk(start, self.passages[start:start + chunk_passages])

    def texts(self, rows: Iterable[int] | np.ndarray | None = None) -> list[str]:
        if rows is None:
            return [p.as_text() for p in self.passages]
        return super().texts(rows)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        fingerprint_update(h, self.passages)
        return h.hexdigest()[:16]


@dataclass
class RAGData:
    """What a loader returns: a corpus and questions over it."""

    name: str
    corpus: BaseCorpus
    questions: list[Question]

    def __post_init__(self):
        if not self.questions:
            raise DataError("no questions were loaded", file=self.corpus.source)
        seen: dict[str, int] = {}
        for i, q in enumerate(self.questions):
            if q.id in seen:
                raise DataError(f"duplicate question id {q.id!r} (first at record {seen[q.id]})",
                                file=self.name, record=i, field="id")
            seen[q.id] = i
            for pid in q.gold_passage_ids or ():
                if pid not in self.corpus:
                    raise DataError(f"gold passage id {pid!r} is not in the corpus", file=self.name,
                                    record=i, field="gold_passage_ids")

    @property
    def has_context_labels(self) -> bool:
        """True when every question names its gold passages (needed by Ft-Embed)."""
        return all(q.has_labels for q in self.questions)

    def split(self, dev_fraction: float, test_fraction: float, seed: int) -> Splits:
        """Seeded train/dev/test split of the questions over the shared corpus."""
        order = list(range(len(self.questions)))
        random.Random(seed).shuffle(order)
        n = len(order)
        n_test = int(round(n * test_fraction))
        n_dev = int(round(n * dev_fraction))
        if n - n_test - n_dev < 1 and (dev_fraction + test_fraction) < 1:
            raise DataError(f"{n} questions are too few for dev_fraction={dev_fraction} and "
                            f"test_fraction={test_fraction}", file=self.name)
        pick = lambda idx: [self.questions[i] for i in sorted(idx)]
        return Splits(self.corpus, train=pick(order[n_test + n_dev:]), dev=pick(order[n_test:n_test + n_dev]),
                      test=pick(order[:n_test]), name=self.name)


@dataclass
class Splits:
    corpus: BaseCorpus
    train: list[Question]
    dev: list[Question]
    test: list[Question]
    name: str = "data"

    def get(self, split: str) -> list[Question]:
        if split not in ("train", "dev", "test"):
            raise ValueError(f"unknown split {split!r}; expected train, dev or test")
        return getattr(self, split)

    @property
    def has_context_labels(self) -> bool:
        return all(q.has_labels for q in self.train) and bool(self.train)
