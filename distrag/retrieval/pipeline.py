"""The RAG pipeline over a built index: question -> embed -> index top-k -> prompt -> generate -> score.

The index comes from :func:`distrag.retrieval.corpus_encoding.load_or_build_index` (or a trainer's
refresh, or a version the index rank published); the pipeline only retrieves, answers and evaluates. Passages
are fetched by row from the corpus (:meth:`~distrag.data.records.BaseCorpus.take`): only the retrieved ones, so a
corpus read from disk is never held.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from distrag.config import ExperimentConfig
from distrag.data.records import BaseCorpus, Question
from distrag.models.embedder import Embedder
from distrag.models.generator import Generator
from distrag.retrieval.qa_metrics import (
    mean_retrieval,
    normalize_answer,
    question_scores,
    retrieval_scores,
    score_predictions,
)
from distrag.retrieval.sharded_index import SearchResult, ShardedIndex

if TYPE_CHECKING:
    from distrag.costs.accountant import Accountant


@dataclass
class EvalResult:
    """Scores (fractions in [0, 1]), predictions and retrieved passage ids of an evaluation, and each question's
    own outcomes (``em``, ``f1`` and :data:`~distrag.retrieval.qa_metrics.RETRIEVAL_METRICS` at k), which paired
    comparisons between strategies are made of (:mod:`distrag.reporting.paired`)."""

    metrics: dict[str, float]
    predictions: list[str]
    retrieved: list[list[str]]
    seconds: dict[str, float] = field(default_factory=dict)
    per_question: list[dict[str, float | None]] = field(default_factory=list)

    def rows(self, questions: list[Question]) -> list[dict]:
        """Per-question records (for the predictions artifact), with each question's outcomes."""
        outcomes = self.per_question or [{} for _ in questions]
        return [{"id": q.id, "question": q.text, "answers": list(q.answers), "prediction": p,
                 "retrieved": r, "gold_passage_ids": list(q.gold_passage_ids or []), **o}
                for q, p, r, o in zip(questions, self.predictions, self.retrieved, outcomes)]


@dataclass
class RetrievalEval:
    """The retrieval-only pass: metrics (``<name>_at_<k>`` means and ``n_questions``), each question's outcomes
    and retrieved passage ids, in question order."""

    metrics: dict[str, float]
    per_question: list[dict[str, float | None]]
    retrieved: list[list[str]]
    seconds: float = 0.0

    def rows(self, questions: list[Question]) -> list[dict]:
        """Per-question records (the ``retrieval_<split>.jsonl`` artifact)."""
        return [{"id": q.id, "retrieved": r, "gold_passage_ids": list(q.gold_passage_ids or []), **o}
                for q, r, o in zip(questions, self.retrieved, self.per_question)]


class RAGPipeline:
    """Retrieval from ``index`` with ``embedder``, answers from ``generator``; costs go to ``accountant``."""

    def __init__(self, cfg: ExperimentConfig, corpus: BaseCorpus, embedder: Embedder, generator: Generator,
                 index: ShardedIndex, accountant: Accountant | None = None):
        self.cfg, self.corpus, self.embedder, self.generator = cfg, corpus, embedder, generator
        self.index = index
        self.acc = accountant

    # -- retrieval + generation ----------------------------------------------------------------
    def retrieve(self, questions: list[Question], k: int | None = None, *,
                 return_vectors: bool = False) -> SearchResult:
        """The top ``k`` passages (default ``retrieval.top_k``) of each question; questions are encoded
        with the embedder and charged as ``encode_questions``."""
        k = k or self.cfg.retrieval.top_k
        texts = [q.text for q in questions]
        qv = self.embedder.encode(texts, show_progress=False)
        if self.acc is not None:
            self.acc.encode_texts(self.embedder, texts, category="encode_questions")
        return self.index.search(qv, k, return_vectors=return_vectors)

    def retrieval_outcomes(self, questions: list[Question], ids: np.ndarray, k: int) -> tuple[list[list[str]], list]:
        """The retrieved passage ids of each question and its retrieval outcomes at ``k``."""
        retrieved, outcomes = [], []
        for q, row in zip(questions, ids):
            passages = self.corpus.take(row[row >= 0])
            retrieved.append([p.id for p in passages])
            outcomes.append(retrieval_scores(retrieved[-1], [p.as_text() for p in passages], q.gold_passage_ids,
                                             q.answers, k))
        return retrieved, outcomes

    def evaluate_retrieval(self, questions: list[Question], *, k: int | None = None, batch_size: int = 256,
                           show_progress: bool = True) -> RetrievalEval:
        """Retrieval metrics on every question, without the generator: questions encoded and searched
        ``batch_size`` at a time (a progress bar over them), each scored at ``k`` (default ``retrieval.top_k``)."""
        from tqdm.auto import tqdm

        k = k or self.cfg.retrieval.top_k
        t0 = time.perf_counter()
        retrieved, outcomes = [], []
        with tqdm(total=len(questions), desc="retrieve", unit="q", disable=not show_progress, leave=False) as bar:
            for start in range(0, len(questions), batch_size):
                chunk = questions[start:start + batch_size]
                ids, per_q = self.retrieval_outcomes(chunk, self.retrieve(chunk, k).ids, k)
                retrieved += ids
                outcomes += per_q
                bar.update(len(chunk))
        metrics = {**mean_retrieval(outcomes, k), "n_questions": float(len(questions))}
        return RetrievalEval(metrics, outcomes, retrieved, time.perf_counter() - t0)

    def passages_for(self, ids: np.ndarray) -> list[list]:
        """The passages of each row of retrieved ``ids`` (padding ``-1`` dropped)."""
        return [self.corpus.take(row[row >= 0]) for row in np.asarray(ids)]

    def answer(self, questions: list[Question], result: SearchResult, *, show_progress: bool = True) -> list[str]:
        """One greedy answer per question from a prompt holding all its retrieved passages ("concat")."""
        prompts = [self.generator.build_prompt(q.text, ps)
                   for q, ps in zip(questions, self.passages_for(result.ids))]
        preds = self.generator.generate(prompts, show_progress=show_progress)
        if self.acc is not None:
            self.acc.generation(self.generator, prompts, preds)
        return preds

    def answer_rag(self, questions: list[Question], result: SearchResult, *, k: int | None = None,
                   show_progress: bool = True) -> list[str]:
        """RAG-Sequence "fast decoding": a greedy answer per retrieved passage; the answer string with
        the largest marginal sum_z p(z|q) p(y|q,z) (over the passages that produced it) wins. The
        marginal runs over the top ``k`` passages (default: all retrieved), with p(z|q) as in training:
        a softmax of ``retrieval.score_scale`` x the cosine scores."""
        import torch

        k = min(k or result.ids.shape[1], result.ids.shape[1])
        scores = torch.from_numpy(result.scores[:, :k]).float() * self.cfg.retrieval.score_scale
        valid = torch.from_numpy(result.ids[:, :k] >= 0)
        doc_p = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
        prompts = [self.generator.build_prompt(q.text, [self.corpus[int(i)]] if i >= 0 else [])
                   for q, row in zip(questions, result.ids[:, :k]) for i in row]
        cands = self.generator.generate(prompts, show_progress=show_progress)
        with torch.no_grad():
            lp, mask = self.generator.answer_logprobs(prompts, cands)
        seq_p = (lp.float() * mask).sum(-1).exp().view(len(questions), k)
        if self.acc is not None:
            self.acc.generation(self.generator, prompts, cands)
            self.acc.generator(self.generator, lp_mask=mask, prompts=prompts, answers=cands, train=False)
        preds = []
        for b in range(len(questions)):
            totals: dict[str, float] = {}
            first: dict[str, str] = {}
            for j in range(k):
                if not valid[b, j]:
                    continue
                y = cands[b * k + j]
                key = normalize_answer(y)
                first.setdefault(key, y)
                totals[key] = totals.get(key, 0.0) + float(doc_p[b, j] * seq_p[b, j])
            preds.append(first[max(totals, key=totals.get)] if totals else "")
        return preds

    def decode(self, questions: list[Question], result: SearchResult, *, decoding: str = "concat",
               show_progress: bool = True) -> list[str]:
        """The answers of ``decoding`` (``concat``: :meth:`answer`, ``rag``: :meth:`answer_rag`): one place that
        chooses, so a saved pipeline answers (distrag ask / predict) exactly as it was evaluated."""
        if decoding == "rag":
            return self.answer_rag(questions, result, show_progress=show_progress)
        if decoding == "concat":
            return self.answer(questions, result, show_progress=show_progress)
        raise ValueError(f"unknown decoding {decoding!r}; expected 'concat' or 'rag'")

    def evaluate(self, questions: list[Question], *, k: int | None = None, show_progress: bool = True,
                 decoding: str = "concat") -> EvalResult:
        """Retrieve, generate and score; metrics are fractions in [0, 1]."""
        k = k or self.cfg.retrieval.top_k
        t0 = time.perf_counter()
        res = self.retrieve(questions, k)
        t1 = time.perf_counter()
        preds = self.decode(questions, res, decoding=decoding, show_progress=show_progress)
        t2 = time.perf_counter()
        hotpotqa = self.cfg.data.format == "hotpotqa"
        retrieved, outcomes = self.retrieval_outcomes(questions, res.ids, k)
        for o, q, p in zip(outcomes, questions, preds):
            o.update(question_scores(p, q.answers, hotpotqa=hotpotqa))
        metrics = score_predictions(preds, [q.answers for q in questions], hotpotqa=hotpotqa)
        metrics.update(mean_retrieval(outcomes, k))
        metrics.setdefault(f"answer_recall_at_{k}", 0.0)
        metrics["n_questions"] = float(len(questions))
        return EvalResult(metrics, preds, retrieved, seconds={"retrieve": t1 - t0, "generate": t2 - t1,
                                                             "total": t2 - t0}, per_question=outcomes)
