"""What an index's staleness costs in retrieval, measured on a fixed probe set while the encoder trains.

With asynchronous refresh the trainers search passage vectors encoded by an older encoder than the one that
encodes their questions. ``index/staleness_steps`` says how old the vectors are; this says what that age costs.
For each probe question (a fixed set: the first questions of the dev split) and each index given:

* **stale**: its top-k from the index, as published (what the trainers retrieve);
* **fresh**: its *candidates* -- the index's top ``candidates`` (50) plus its gold passages -- re-encoded with the
  current encoder and ranked by the current question vector; the top-k of those.

Both are scored with the same measure: Recall@k of the gold passages when every probe question has context labels,
else answer recall@k (a gold answer in one of the k passages), as :func:`~distrag.retrieval.qa_metrics.retrieval_scores`
defines them. The **gap** is fresh minus stale (positive: staleness costs recall). Re-encoding only the candidates
keeps the probe cheap (at most ``questions x (candidates + gold)`` passages, fewer once shared ones are encoded
once) where re-encoding the corpus is what the index rank is for; the price is that a passage outside every
candidate set, which the fresh encoder would rank in the top-k, is not seen (so the gap is a lower bound). When the
index was built from the current weights the fresh vectors are the index's own, every top-k passage is a candidate
and the gap is 0.

Several indices (the adopted version and the one it replaces) share one encoding: the question vectors and the
union of their candidates are encoded once. What the encodings cost is charged to an accountant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from distrag.retrieval.qa_metrics import retrieval_scores

if TYPE_CHECKING:
    from distrag.costs.accountant import Accountant
    from distrag.data.records import Corpus, Question
    from distrag.models.embedder import Embedder
    from distrag.retrieval.sharded_index import ShardedIndex

__all__ = ["CANDIDATES", "ProbeScore", "StalenessProbe"]

CANDIDATES = 50
"""Passages per probe question taken from the index to be re-encoded (plus its gold passages)."""


@dataclass(frozen=True)
class ProbeScore:
    """One index's probe result: the measure against it as published (``stale``) and against the re-encoded
    candidates (``fresh``), as fractions."""

    stale: float
    fresh: float
    metric: str
    """``recall`` (gold passages) or ``answer_recall`` (probe questions without context labels)."""
    passages_encoded: int
    """Candidate passages re-encoded for the probe (shared by every index scored in the same call)."""

    @property
    def gap(self) -> float:
        """``fresh - stale``: what the index's staleness costs (positive: recall lost)."""
        return self.fresh - self.stale


class StalenessProbe:
    """The probe set ``questions`` over ``corpus``, scored at ``k`` (see the module docstring)."""

    def __init__(self, questions: Sequence[Question], corpus: Corpus, k: int, *, candidates: int = CANDIDATES):
        if not questions:
            raise ValueError("a staleness probe needs at least one question")
        if k < 1 or candidates < 1:
            raise ValueError(f"k and candidates must be >= 1, got {k} and {candidates}")
        self.questions, self.corpus, self.k = list(questions), corpus, int(k)
        self.depth = max(int(candidates), self.k)
        self.metric = "recall" if all(q.has_labels for q in self.questions) else "answer_recall"
        self._gold_rows = [[corpus.position(p) for p in (q.gold_passage_ids or ())] for q in self.questions]

    def score(self, embedder: Embedder, indexes: Sequence[ShardedIndex],
              accountant: Accountant | None = None) -> list[ProbeScore]:
        """Each index of ``indexes`` scored against ``embedder`` as it is now (eval mode, no gradients; its
        training flag is kept). The encodings are charged to ``accountant`` (questions and candidate passages)."""
        texts = [q.text for q in self.questions]
        queries = embedder.encode(texts)
        tops = [index.search(queries, min(self.depth, len(index))).ids for index in indexes]
        rows = sorted({int(r) for top in tops for r in top.ravel() if r >= 0}
                      | {r for gold in self._gold_rows for r in gold})
        passage_texts = [self.corpus[r].as_text() for r in rows]
        fresh = embedder.encode(passage_texts) if rows else np.zeros((0, queries.shape[1]), np.float32)
        if accountant is not None:
            accountant.encode_texts(embedder, texts, category="encode_questions")
            accountant.encode_texts(embedder, passage_texts, category="encode_passages")
        where = {r: i for i, r in enumerate(rows)}
        out = []
        for top in tops:
            stale, fresh_scores = [], []
            for qi, q in enumerate(self.questions):
                ranked = [int(r) for r in top[qi] if r >= 0]
                stale.append(self._measure(q, ranked[:self.k]))
                cand = np.asarray(sorted(set(ranked) | set(self._gold_rows[qi])), dtype=np.int64)
                sims = fresh[[where[int(r)] for r in cand]] @ queries[qi]
                order = np.lexsort((cand, -sims))  # descending score, ties to the lower row (as the index)
                fresh_scores.append(self._measure(q, cand[order[:self.k]].tolist()))
            out.append(ProbeScore(float(np.mean(stale)), float(np.mean(fresh_scores)), self.metric, len(rows)))
        return out

    def _measure(self, question: Question, rows: list[int]) -> float:
        passages = [self.corpus[r] for r in rows]
        scores = retrieval_scores([p.id for p in passages], [p.as_text() for p in passages],
                                  question.gold_passage_ids, question.answers, self.k)
        return float(scores[self.metric])
