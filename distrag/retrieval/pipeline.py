"""The RAG pipeline: question -> embed -> index top-k -> prompt -> generate -> score.

Single-process runs (``distrag eval``, the demo, tests) build the index in-process with the same
code the distributed index rank uses.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distrag.config import ExperimentConfig
from distrag.data.records import Corpus, Question
from distrag.models.embedder import Embedder
from distrag.models.generator import Generator
from distrag.retrieval.qa_metrics import answer_in_text, normalize_answer, recall_at_k, score_predictions
from distrag.retrieval.sharded_index import SearchResult, ShardedIndex

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    predictions: list[str]
    retrieved: list[list[str]]
    seconds: dict[str, float] = field(default_factory=dict)

    def rows(self, questions: list[Question]) -> list[dict]:
        """Per-question records (for the predictions artifact)."""
        return [{"id": q.id, "question": q.text, "answers": list(q.answers), "prediction": p,
                 "retrieved": r, "gold_passage_ids": list(q.gold_passage_ids or [])}
                for q, p, r in zip(questions, self.predictions, self.retrieved)]


class RAGPipeline:
    def __init__(self, cfg: ExperimentConfig, corpus: Corpus, embedder: Embedder, generator: Generator,
                 index: ShardedIndex | None = None, accountant=None):
        self.cfg, self.corpus, self.embedder, self.generator = cfg, corpus, embedder, generator
        self.index = index
        self.acc = accountant

    # -- index ---------------------------------------------------------------------------------
    def build_index(self, *, show_progress: bool = True) -> ShardedIndex:
        """Encode every passage with the current embedder and build the configured index."""
        texts = self.corpus.texts()
        t0 = time.perf_counter()
        vecs = self.embedder.encode(texts, show_progress=show_progress)
        if self.acc is not None:
            self.acc.encode_texts(self.embedder, texts, category="encode_passages")
        self.index = ShardedIndex.from_config(vecs.shape[1], self.cfg.index).build(vecs)
        log.info("indexed %d passages in %.1fs", len(texts), time.perf_counter() - t0)
        return self.index

    def index_signature(self) -> dict:
        return {"corpus": self.corpus.fingerprint(), "embedder": self.embedder.name,
                "index": self.cfg.index.model_dump(mode="json")}

    def load_or_build_index(self, cache_dir: str | Path | None, *, show_progress: bool = True) -> ShardedIndex:
        """Reuse a saved index built for the same corpus, embedder and index settings, else build one.

        A reused index is charged the passage-encoding cost it took to build, so every run's ledger
        is the same whether or not the cache was warm."""
        sig = self.index_signature()
        if cache_dir is not None and (Path(cache_dir) / "manifest.json").exists():
            idx = ShardedIndex.load(cache_dir)
            if idx.manifest.get("extra", {}).get("signature") == sig:
                log.info("reusing index at %s", cache_dir)
                if self.acc is not None:
                    self.acc.encode_texts(self.embedder, self.corpus.texts(), category="encode_passages")
                self.index = idx
                return idx
        self.build_index(show_progress=show_progress)
        if cache_dir is not None:
            self.index.save(cache_dir, extra={"signature": sig}, overwrite=True)
        return self.index

    # -- retrieval + generation ----------------------------------------------------------------
    def retrieve(self, questions: list[Question], k: int | None = None, *,
                 return_vectors: bool = False) -> SearchResult:
        if self.index is None:
            raise RuntimeError("no index: call build_index() or load_or_build_index() first")
        k = k or self.cfg.retrieval.top_k
        texts = [q.text for q in questions]
        qv = self.embedder.encode(texts, show_progress=False)
        if self.acc is not None:
            self.acc.encode_texts(self.embedder, texts, category="encode_questions")
        return self.index.search(qv, k, return_vectors=return_vectors)

    def passages_for(self, ids: np.ndarray) -> list[list]:
        return [[self.corpus[int(i)] for i in row if i >= 0] for row in ids]

    def answer(self, questions: list[Question], result: SearchResult, *, show_progress: bool = True) -> list[str]:
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
        marginal runs over the top ``k`` passages (default: the k the RAG loss was trained on)."""
        import torch

        k = min(k or self.cfg.train.train_k or result.ids.shape[1], result.ids.shape[1])
        scores = torch.from_numpy(result.scores[:, :k]).float()
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

    def evaluate(self, questions: list[Question], *, k: int | None = None, show_progress: bool = True,
                 decoding: str = "concat") -> EvalResult:
        """Retrieve, generate and score; metrics are fractions in [0, 1]."""
        k = k or self.cfg.retrieval.top_k
        t0 = time.perf_counter()
        res = self.retrieve(questions, k)
        t1 = time.perf_counter()
        if decoding == "rag":
            preds = self.answer_rag(questions, res, show_progress=show_progress)
        elif decoding == "concat":
            preds = self.answer(questions, res, show_progress=show_progress)
        else:
            raise ValueError(f"unknown decoding {decoding!r}; expected 'concat' or 'rag'")
        t2 = time.perf_counter()
        retrieved = [[self.corpus[int(i)].id for i in row if i >= 0] for row in res.ids]
        metrics = score_predictions(preds, [q.answers for q in questions])
        rec = recall_at_k(retrieved, [q.gold_passage_ids for q in questions], k)
        if rec is not None:
            metrics[f"recall_at_{k}"] = rec
        hits = [any(answer_in_text(q.answers, self.corpus[int(i)].as_text()) for i in row if i >= 0)
                for q, row in zip(questions, res.ids)]
        metrics[f"answer_recall_at_{k}"] = float(np.mean(hits)) if hits else 0.0
        metrics["n_questions"] = float(len(questions))
        return EvalResult(metrics, preds, retrieved,
                          seconds={"retrieve": t1 - t0, "generate": t2 - t1, "total": t2 - t0})
