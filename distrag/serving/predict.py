"""Answers from a loaded bundle: each question's answer and top-k passages with their scores, scored where the
question carries answers (and gold passages).

Retrieval and decoding are evaluation's own (:meth:`RAGPipeline.retrieve`, :meth:`RAGPipeline.decode`: the
bundle's k, prompt and ``generator.decoding``), and the scores are its per-question outcomes
(:func:`~distrag.retrieval.qa_metrics.question_scores`, :func:`~distrag.retrieval.qa_metrics.retrieval_scores`)
averaged as ``RAGPipeline.evaluate`` averages them. Questions go through in chunks of ``batch_size`` (rounded up
to whole generation batches, so a chunk's generation batches are evaluation's); a run's own eval split answered
in one chunk (the default 256 questions) gives its recorded predictions and EM exactly. Larger files differ
from one all-at-once evaluation only in how the question encoder's batches are padded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from distrag.atomic_io import atomic_open
from distrag.data.records import Question
from distrag.retrieval.qa_metrics import mean_retrieval, question_scores, retrieval_scores
from distrag.serving.loader import LoadedBundle

BATCH_QUESTIONS = 256


@dataclass
class Prediction:
    """One question's answer, its passages (``id``, ``title``, ``text``, ``score``, best first) and, when the
    question has answers, its outcomes (``em``, ``f1``, recall, ...), as evaluation scores them."""

    question: Question
    answer: str
    passages: list[dict]
    outcomes: dict | None = None

    def row(self, *, with_text: bool = False) -> dict:
        """The record written per question: evaluation's ``predictions_<split>.jsonl`` fields plus the passages
        (text only when asked: a file of answers would otherwise hold k passages per line)."""
        q = self.question
        passages = [p if with_text else {k: v for k, v in p.items() if k != "text"} for p in self.passages]
        return {"id": q.id, "question": q.text, "answers": list(q.answers), "prediction": self.answer,
                "retrieved": [p["id"] for p in self.passages], "gold_passage_ids": list(q.gold_passage_ids or []),
                "passages": passages, **(self.outcomes or {})}


def answer(bundle: LoadedBundle, questions: Sequence[Question], *, k: int | None = None,
           batch_size: int = BATCH_QUESTIONS, hotpotqa: bool | None = None, progress=None) -> Iterator[Prediction]:
    """Answer ``questions`` with the bundle's pipeline, ``batch_size`` at a time (``progress.update(n)`` after each
    chunk). ``k``: passages per question (default: the k it was evaluated at; another k changes the prompt).
    ``hotpotqa``: F1 with the HotPotQA script's yes/no rule (default: as the bundle's data was scored)."""
    cfg, pipe = bundle.cfg, bundle.pipeline
    k = k or cfg.retrieval.top_k
    hotpotqa = cfg.data.format == "hotpotqa" if hotpotqa is None else hotpotqa
    gen_bs = cfg.generator.batch_size
    step = max(gen_bs, -(-max(1, batch_size) // gen_bs) * gen_bs)
    for start in range(0, len(questions), step):
        chunk = list(questions[start:start + step])
        res = pipe.retrieve(chunk, k)
        preds = pipe.decode(chunk, res, decoding=cfg.generator.decoding, show_progress=False)
        for q, pred, ids, scores in zip(chunk, preds, res.ids, res.scores):
            found = [(bundle.corpus[int(i)], float(s)) for i, s in zip(ids, scores) if i >= 0]
            passages = [{"id": p.id, "title": p.title, "text": p.text, "score": s} for p, s in found]
            outcomes = None
            if q.answers:
                outcomes = retrieval_scores([p.id for p, _ in found], [p.as_text() for p, _ in found],
                                            q.gold_passage_ids, q.answers, k)
                outcomes.update(question_scores(pred, q.answers, hotpotqa=hotpotqa))
            yield Prediction(q, pred, passages, outcomes)
        if progress is not None:
            progress.update(len(chunk))


def summarize(predictions: Sequence[Prediction], k: int) -> dict[str, float]:
    """Evaluation's metrics over the scored predictions (fractions): ``em``, ``f1``, ``<retrieval>_at_<k>`` and
    ``n_questions`` (those with answers); empty when none had answers."""
    scored = [p.outcomes for p in predictions if p.outcomes is not None]
    if not scored:
        return {}
    out = {"em": sum(o["em"] for o in scored) / len(scored), "f1": sum(o["f1"] for o in scored) / len(scored)}
    out.update(mean_retrieval(scored, k))
    out["n_questions"] = float(len(scored))
    return out


def predict_file(bundle: LoadedBundle, questions: Sequence[Question], out: str | Path, *,
                 batch_size: int = BATCH_QUESTIONS, hotpotqa: bool | None = None,
                 show_progress: bool = True) -> tuple[list[Prediction], dict[str, float]]:
    """Answer ``questions`` into the JSONL file ``out`` (one :meth:`Prediction.row` per line, written to a
    temporary sibling and renamed into place when complete), with a progress bar over the questions.
    Returns the predictions and :func:`summarize`'s metrics."""
    from tqdm.auto import tqdm

    preds: list[Prediction] = []
    with atomic_open(out, "w", encoding="utf-8") as f, \
            tqdm(total=len(questions), desc="predict", unit="q", disable=not show_progress) as bar:
        for p in answer(bundle, questions, batch_size=batch_size, hotpotqa=hotpotqa, progress=bar):
            preds.append(p)
            f.write(json.dumps(p.row(), ensure_ascii=False) + "\n")
    return preds, summarize(preds, bundle.cfg.retrieval.top_k)


def format_prediction(p: Prediction, *, width: int = 100) -> str:
    """``distrag ask``'s text: the answer, then the passages with their scores (text cut to ``width``)."""
    lines = [f"answer: {p.answer}", "", f"top {len(p.passages)} passages (score, id, title: text):"]
    for i, x in enumerate(p.passages, 1):
        text = " ".join(x["text"].split())
        text = text if len(text) <= width else text[:width - 3].rstrip() + "..."
        lines.append(f"  {i}. {x['score']:.3f}  {x['id']}  {x['title']}: {text}" if x["title"]
                     else f"  {i}. {x['score']:.3f}  {x['id']}  {text}")
    if p.outcomes is not None:
        lines += ["", f"EM {p.outcomes['em']:.0f}, F1 {p.outcomes['f1']:.2f} against {list(p.question.answers)}"]
    return "\n".join(lines)
