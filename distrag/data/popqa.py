"""PopQA in its three common layouts; the variant is detected from the extension and first record.

* ``original`` - the TSV/CSV release (``.tsv`` tab-separated, ``.csv`` comma-separated) with columns
  ``id, subj, prop, obj, ..., s_pop, o_pop, question, possible_answers``; ``possible_answers`` is a
  JSON list inside a string. The same columns as JSON lines (or hub rows) are read too.
* ``flashrag`` - JSON lines ``{"id", "question", "golden_answers": [...], "metadata": {...}}``.
* ``selfrag`` - JSON lines ``{"id", "question", "answers": [...], "ctxs": [{id, title, text, score}]}``.

Only ``selfrag`` files carry passages: the corpus is the retrieved contexts, de-duplicated by ctx id
(a ctx without an id gets ``"ctx-<sha1 of title and text>"``; ctxs with empty text are skipped with a
warning; a text that starts with its own title line has that line removed). The other variants
need ``corpus_path``. PopQA has no context labels: ``gold_passage_ids`` is None unless a record has
a ``gold_passage_ids`` field (a list, or a JSON list in a string for TSV/CSV).
"""

from __future__ import annotations

import csv
import hashlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distrag.data.parsing import (
    Fields,
    Record,
    as_answers,
    assemble,
    check_file,
    load_corpus_jsonl,
    load_hub_rows,
    optional_gold_ids,
    parse_json_list,
    read_json_records,
)
from distrag.data.records import BaseCorpus, Corpus, Passage, Question, RAGData
from distrag.errors import DataError

ORIGINAL_REQUIRED = ("id", "question", "possible_answers")
_ANSWER_KEY = {"original": "possible_answers", "flashrag": "golden_answers", "selfrag": "answers"}


def detect_variant(first: Record, source: str, label: str) -> str:
    """Which PopQA layout a (JSON) record follows."""
    if "ctxs" in first:
        return "selfrag"
    if "golden_answers" in first:
        return "flashrag"
    if "possible_answers" in first:
        return "original"
    if "answers" in first:
        return "selfrag"
    raise DataError("cannot tell the PopQA layout: expected one of the answer fields "
                    "'possible_answers' (original), 'golden_answers' (FlashRAG) or 'answers' (Self-RAG)",
                    file=source, record=label, field="answers")


def _read_table(p: Path, limit: int | None) -> list[tuple[str, Record]]:
    delimiter = "\t" if p.suffix.lower() in (".tsv", ".txt") else ","
    rows: list[tuple[str, Record]] = []
    try:
        with open(p, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            header = reader.fieldnames or []
            for col in ORIGINAL_REQUIRED:
                if col not in header:
                    raise DataError(f"missing column (header has: {', '.join(header) or 'nothing'})",
                                    file=str(p), record="line 1 (header)", field=col)
            start = reader.line_num + 1
            for rec in reader:
                if limit is not None and len(rows) >= limit:
                    break
                label = f"line {start}"
                start = reader.line_num + 1
                if None in rec:
                    raise DataError(f"{len(header) + len(rec[None])} columns, the header has {len(header)}",
                                    file=str(p), record=label)
                if not any(v for v in rec.values()):
                    continue
                rows.append((label, dict(rec)))
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text: {e.reason}", file=str(p)) from None
    except csv.Error as e:
        raise DataError(f"malformed {'TSV' if delimiter == chr(9) else 'CSV'}: {e}", file=str(p)) from None
    return rows


def _meta(rec: Record, skip: tuple[str, ...]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for k, v in rec.items():
        if k in skip:
            continue
        if k in ("s_pop", "o_pop", "pop") and isinstance(v, str) and v.strip().lstrip("-").isdigit():
            v = int(v)
        meta[k] = v
    return meta


def _clean_ctx_text(title: str, text: str) -> str:
    text = text.strip()
    if title and text.startswith(title) and text[len(title):len(title) + 1] == "\n":
        text = text[len(title):]
    return " ".join(text.split())


def _ctx_passages(f: Fields, seen: dict[str, tuple[Passage, str]]) -> tuple[list[Passage], int]:
    """New passages from one record's ``ctxs`` (checked against those seen before) and the count of
    empty ctxs skipped."""
    ctxs = f.get("ctxs")
    if not isinstance(ctxs, list):
        raise f.fail("ctxs", f"expected a list of {{id, title, text}} objects, got {type(ctxs).__name__}")
    new, empty = [], 0
    for j, c in enumerate(ctxs):
        if not isinstance(c, dict):
            raise f.fail("ctxs", f"ctx {j}: expected an object, got {type(c).__name__}")
        title, text = c.get("title", ""), c.get("text")
        if title is None:
            title = ""
        if not isinstance(title, str) or not isinstance(text, str):
            raise f.fail("ctxs", f"ctx {j}: 'title' and 'text' must be strings")
        title = title.strip()
        text = _clean_ctx_text(title, text)
        if not text:
            empty += 1
            continue
        cid = c.get("id")
        if cid is None or (isinstance(cid, str) and not cid.strip()):
            cid = "ctx-" + hashlib.sha1(f"{title}\n{text}".encode()).hexdigest()[:12]
        elif isinstance(cid, bool) or not isinstance(cid, (str, int)):
            raise f.fail("ctxs", f"ctx {j}: 'id' must be a string or integer, got {type(cid).__name__}")
        cid = str(cid).strip()
        psg = Passage(cid, title, text)
        if cid in seen:
            if seen[cid][0] != psg:
                raise f.fail("ctxs", f"ctx {j}: id {cid!r} was given a different title/text at {seen[cid][1]}")
            continue
        seen[cid] = (psg, f"{f.label}, ctx {j}")
        new.append(psg)
    return new, empty


def load_popqa(path: str, *, corpus_path: str | None = None, max_questions: int | None = None,
               hub_split: str = "test", open_corpus: Callable[[str], BaseCorpus] = load_corpus_jsonl) -> RAGData:
    """Load PopQA questions from a TSV/CSV/JSONL file or a hub dataset id (e.g. ``akariasai/PopQA``)."""
    p = Path(path)
    if p.is_file() or p.suffix.lower() in (".tsv", ".csv", ".txt", ".json", ".jsonl", ".ndjson"):
        p = check_file(p, "questions file")
        source = str(p)
        if p.suffix.lower() in (".tsv", ".csv", ".txt"):
            rows, variant = _read_table(p, max_questions), "original"
        else:
            rows = read_json_records(p, max_questions)
            variant = detect_variant(rows[0][1], source, rows[0][0]) if rows else "original"
    else:
        source, rows = load_hub_rows(path, hub_split, max_questions)
        variant = detect_variant(rows[0][1], source, rows[0][0]) if rows else "original"
    if not rows:
        raise DataError("no questions were loaded (the file holds no records)", file=source)
    if corpus_path is None and variant != "selfrag":
        raise DataError(f"PopQA {variant} files carry no passages: set data.corpus_path to a corpus JSONL "
                        "({id, title, text} per line)", file=source, field="corpus_path")

    answer_key = _ANSWER_KEY[variant]
    questions, labels = [], []
    seen: dict[str, tuple[Passage, str]] = {}
    passages: list[Passage] = []
    n_empty = 0
    for label, rec in rows:
        f = Fields(rec, source, label)
        qid = f.id("id")
        f.label = f"{label} (id {qid!r})"
        text = f.string("question").strip()
        raw_answers = f.get(answer_key)
        if variant == "original":
            raw_answers = parse_json_list(raw_answers, f, answer_key)
        answers = as_answers(raw_answers, f, answer_key)
        gold = optional_gold_ids(f)
        if variant == "flashrag":
            meta = f.get("metadata", required=False) or {}
            if not isinstance(meta, dict):
                raise f.fail("metadata", f"expected an object, got {type(meta).__name__}")
            meta = _meta(meta, ())
        else:
            meta = _meta(rec, ("id", "question", answer_key, "ctxs", "gold_passage_ids"))
        if variant == "selfrag" and corpus_path is None:
            new, empty = _ctx_passages(f, seen)
            passages.extend(new)
            n_empty += empty
        questions.append(Question(qid, text, answers, gold, meta=meta))
        labels.append(f.label)

    if corpus_path is not None:
        corpus = open_corpus(corpus_path)
    else:
        if n_empty:
            warnings.warn(f"{source}: skipped {n_empty} retrieved contexts with empty text", stacklevel=2)
        if not passages:
            raise DataError("corpus is empty: no record has a ctx with text", file=source, field="ctxs")
        corpus = Corpus(passages, source=source)
    stem = p.stem if p.suffix else source
    return assemble(f"popqa:{stem}", source, corpus, questions, labels, max_questions)
