"""Canonical records every loader produces and every stage consumes.

A ``Question`` carries its gold answers and, where the dataset has them, the ids of the passages
that support it (context labels). A ``Corpus`` is an ordered set of ``Passage`` s; the position of a
passage is its stable integer id, the id the vector index stores.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

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


class Corpus(Sequence[Passage]):
    """Passages with stable integer ids (their position). Duplicate string ids are an error."""

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

    def __getitem__(self, i):  # type: ignore[override]
        return self.passages[i]

    def __iter__(self) -> Iterator[Passage]:
        return iter(self.passages)

    def position(self, passage_id: str) -> int:
        return self._pos[passage_id]

    def __contains__(self, passage_id: object) -> bool:  # type: ignore[override]
        return passage_id in self._pos

    def texts(self) -> list[str]:
        return [p.as_text() for p in self.passages]

    def fingerprint(self) -> str:
        """Content hash: an index built for one corpus is never silently reused for another."""
        h = hashlib.sha256()
        for p in self.passages:
            h.update(p.id.encode())
            h.update(b"\0")
            h.update(p.as_text().encode())
            h.update(b"\1")
        return h.hexdigest()[:16]


@dataclass
class RAGData:
    """What a loader returns: a corpus and questions over it."""

    name: str
    corpus: Corpus
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
    corpus: Corpus
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
