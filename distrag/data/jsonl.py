"""The generic JSONL pair: the documented format for users' own data (see docs/data_formats.md).

Questions file, one object per line::

    {"id": "q1", "question": "Who founded Acme?", "answers": ["Jane Roe"], "gold_passage_ids": ["p7"]}

``gold_passage_ids`` is optional (absent, null or [] means the question is unlabelled); other keys are
kept in ``Question.meta``. Corpus file, one object per line::

    {"id": "p7", "title": "Acme", "text": "Acme was founded by Jane Roe in 1990."}

``title`` is optional. Ids may be strings or integers (integers are read as their decimal string).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from distrag.data.parsing import Fields, as_id_list, assemble, check_file, iter_jsonl, load_corpus_jsonl
from distrag.data.records import BaseCorpus, Question, RAGData

QUESTION_KEYS = ("id", "question", "answers", "gold_passage_ids")


def load_questions_jsonl(path: str | Path, limit: int | None = None) -> tuple[list[Question], list[str]]:
    """Questions of a generic questions JSONL and their record labels (``"line N"``)."""
    p = check_file(path, "questions file")
    questions, labels = [], []
    for label, rec in iter_jsonl(p, limit):
        f = Fields(rec, str(path), label)
        qid = f.id("id")
        f.label = f"{label} (id {qid!r})"
        text = f.string("question").strip()
        answers = f.answers("answers")
        raw_gold = f.get("gold_passage_ids", required=False)
        gold = None if raw_gold is None else as_id_list(raw_gold, f, "gold_passage_ids")
        meta = {k: v for k, v in rec.items() if k not in QUESTION_KEYS}
        questions.append(Question(qid, text, answers, gold, meta=meta))
        labels.append(f.label)
    return questions, labels


def load_jsonl(path: str, corpus_path: str, *, max_questions: int | None = None,
               open_corpus: Callable[[str], BaseCorpus] = load_corpus_jsonl) -> RAGData:
    """Load a generic questions JSONL over a corpus JSONL (opened by ``open_corpus``: in memory by default)."""
    corpus = open_corpus(corpus_path)
    questions, labels = load_questions_jsonl(path, max_questions)
    return assemble(f"jsonl:{Path(path).stem}", str(path), corpus, questions, labels, max_questions)
