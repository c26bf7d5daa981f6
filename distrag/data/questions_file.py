"""Questions without a corpus: what ``distrag predict`` answers with a saved pipeline.

A trained pipeline brings its own corpus (the bundle's), so a questions file here is read for its questions
alone, in any of the formats training reads (docs/data_formats.md):

* ``jsonl``: ``{"id", "question", "answers"?, "gold_passage_ids"?}`` per line (``id`` optional here: ``line N``);
* ``hotpotqa``: the official JSON or the Hugging Face layout (``context`` and ``supporting_facts`` optional);
* ``popqa``: the original TSV/CSV, FlashRAG JSONL or Self-RAG JSONL (``ctxs`` ignored).

``format="auto"`` tells them apart by the extension (``.tsv``/``.csv``: PopQA) and the first record's keys.
Answers are optional (a file without them is answered, not scored); where a record has them they are checked
as training checks them. HotPotQA's supporting-fact titles become gold passage ids once a corpus is known
(:func:`gold_from_titles`): a title maps to the corpus passage of that title, or, where one title carries
several texts, to the variant whose text the record's own context holds, as :mod:`distrag.data.hotpotqa`
named them when it built the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from distrag.data.hotpotqa import _parse_context, _parse_supporting_titles, _text_key
from distrag.data.parsing import (
    Fields,
    Record,
    as_answers,
    check_file,
    optional_gold_ids,
    parse_json_list,
    read_json_records,
)
from distrag.data.popqa import _ANSWER_KEY, _read_table, detect_variant
from distrag.data.records import Corpus, Question
from distrag.errors import DataError

QUESTION_FORMATS = ("auto", "jsonl", "hotpotqa", "popqa")
_TABLE_SUFFIXES = (".tsv", ".csv")
_JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
_HOTPOTQA_KEYS = ("_id", "supporting_facts", "context", "answer")
_POPQA_KEYS = ("possible_answers", "golden_answers", "ctxs", "s_pop", "prop")


@dataclass
class QuestionsFile:
    """The questions of one file, the format they were read as, and (HotPotQA) each question's
    supporting-fact titles with its own context paragraphs, for :func:`gold_from_titles`."""

    path: str
    format: str
    questions: list[Question]
    titles: list[list[str]] = field(default_factory=list)
    contexts: list[dict[str, str]] = field(default_factory=list)

    @property
    def has_answers(self) -> bool:
        return any(q.answers for q in self.questions)


def detect_format(path: Path, rows: list[tuple[str, Record]] | None) -> str:
    """The format of a questions file from its extension and first record (see the module docstring)."""
    if path.suffix.lower() in _TABLE_SUFFIXES:
        return "popqa"
    if not rows:
        raise DataError("no questions in the file", file=str(path))
    label, first = rows[0]
    if any(k in first for k in _POPQA_KEYS):
        return "popqa"
    if any(k in first for k in _HOTPOTQA_KEYS):
        return "hotpotqa"
    if "question" in first:
        return "jsonl"
    raise DataError(f"unknown questions format: the first record has keys {sorted(first)[:8]}; expected a "
                    "questions JSONL ({id, question, answers}), HotPotQA or PopQA (see docs/data_formats.md), or "
                    "name it with --format", file=str(path), record=label)


def _optional_answers(f: Fields, key: str) -> tuple[str, ...]:
    raw = f.get(key, required=False)
    if raw is None:
        return ()
    if isinstance(raw, str) and key == "possible_answers":
        raw = parse_json_list(raw, f, key)
    elif isinstance(raw, str):
        raw = [raw]
    return as_answers(raw, f, key)


def _question(f: Fields, qid: str, answers: tuple[str, ...], gold: tuple[str, ...] | None) -> Question:
    f.label = f"{f.label} (id {qid!r})"
    return Question(qid, f.string("question").strip(), answers, gold)


def read_questions(path: str | Path, fmt: str = "auto", *, limit: int | None = None) -> QuestionsFile:
    """The questions of ``path`` read as ``fmt`` (``auto``: detected). Bad records raise :class:`DataError`
    naming the file, the record and the field; an unknown format names the file."""
    if fmt not in QUESTION_FORMATS:
        raise DataError(f"unknown questions format {fmt!r}; expected one of {', '.join(QUESTION_FORMATS)}",
                        field="--format")
    p = check_file(path, "questions file")
    suffix = p.suffix.lower()
    if suffix not in _TABLE_SUFFIXES + _JSON_SUFFIXES:
        raise DataError(f"unknown questions format (extension {suffix or 'none'!r}); expected a JSON / JSONL "
                        "file (questions JSONL, HotPotQA, PopQA) or a PopQA .tsv / .csv", file=str(p))
    if suffix in _TABLE_SUFFIXES:
        rows = _read_table(p, limit)
    else:
        rows = read_json_records(p, limit)
    fmt = detect_format(p, rows) if fmt == "auto" else fmt
    if not rows:
        raise DataError("no questions in the file", file=str(p))
    out = QuestionsFile(str(p), fmt, [])
    seen: dict[str, str] = {}
    for n, (label, rec) in enumerate(rows, 1):
        f = Fields(rec, str(p), label)
        if fmt == "hotpotqa":
            qid = f.id("_id" if "_id" in rec else "id")
            q = _question(f, qid, _optional_answers(f, "answer"), None)
            out.titles.append(_parse_supporting_titles(f) if f.has("supporting_facts") else [])
            out.contexts.append(dict(_parse_context(f)) if f.has("context") else {})
        elif fmt == "popqa":
            key = _ANSWER_KEY["original"] if suffix in _TABLE_SUFFIXES else _ANSWER_KEY[
                detect_variant(rec, str(p), label) if any(k in rec for k in _ANSWER_KEY.values()) else "selfrag"]
            q = _question(f, f.id("id"), _optional_answers(f, key), optional_gold_ids(f))
        else:
            qid = f.id("id") if f.has("id") else str(n)
            q = _question(f, qid, _optional_answers(f, "answers"), optional_gold_ids(f))
        if q.id in seen:
            raise DataError(f"duplicate question id {q.id!r} (first at {seen[q.id]})", file=str(p), record=label,
                            field="id")
        seen[q.id] = label
        out.questions.append(q)
    return out


def gold_from_titles(qf: QuestionsFile, corpus: Corpus) -> list[Question]:
    """The questions with gold passage ids of ``corpus`` (HotPotQA: from their supporting-fact titles; a question
    with a title the corpus lacks stays unlabelled, as training leaves it); other formats as they are."""
    if qf.format != "hotpotqa":
        return list(qf.questions)
    by_title: dict[str, list[str]] = {}
    for p in corpus:
        by_title.setdefault(p.title, []).append(p.id)
    out = []
    for q, titles, context in zip(qf.questions, qf.titles, qf.contexts):
        gold: list[str] = []
        for t in titles:
            if t in context:  # this record's own paragraph: the variant of that text
                ids = [i for i in (t, f"{t} [{_text_key(context[t])}]") if i in corpus]
            else:
                ids = by_title.get(t) or ([t] if t in corpus else [])
            if not ids:
                gold = []
                break
            gold.extend(i for i in ids if i not in gold)
        out.append(Question(q.id, q.text, q.answers, tuple(gold) or None, meta=q.meta))
    return out
