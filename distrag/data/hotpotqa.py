"""HotPotQA: the official JSON layout and the Hugging Face layout, from a file or the hub.

Official record::

    {"_id", "question", "answer", "supporting_facts": [[title, sent_id], ...],
     "context": [[title, [sentence, ...]], ...], "type", "level"}

Hugging Face record::

    {"id", "question", "answer", "context": {"title": [...], "sentences": [[...], ...]},
     "supporting_facts": {"title": [...], "sent_id": [...]}, "type", "level"}

The corpus is the de-duplicated set of context paragraphs (title + joined sentences), in order of
first appearance. A passage's id is its title; when one title carries different texts, every
variant gets ``"<title> [<8 hex digits of the text's sha1>]"`` (independent of record order). The
gold passages of a question are its supporting-fact titles, mapped to the passages of its own
context. With a user corpus (``corpus_path``), a supporting-fact title maps to the passages whose
title (or, failing that, id) equals it.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distrag.data.parsing import (
    Fields,
    Record,
    assemble,
    check_file,
    load_corpus_jsonl,
    load_hub_rows,
    read_json_records,
)
from distrag.data.records import BaseCorpus, Corpus, Passage, Question, RAGData
from distrag.errors import DataError

_SUFFIXES = (".json", ".jsonl", ".ndjson")


def join_sentences(sentences: list[str]) -> str:
    """Concatenate HotPotQA sentences (which usually carry their own leading space)."""
    out = ""
    for s in sentences:
        if out and s and not out[-1].isspace() and not s[0].isspace():
            out += " "
        out += s
    return " ".join(out.split())


@dataclass
class _Parsed:
    label: str
    qid: str
    question: str
    answers: tuple[str, ...]
    context: list[tuple[str, str]] | None  # (title, text) paragraphs
    sf_titles: list[str]
    meta: dict


def _parse_context(f: Fields) -> list[tuple[str, str]]:
    ctx = f.get("context")
    pairs: list[tuple[Any, Any]]
    if isinstance(ctx, dict):  # Hugging Face layout
        if "title" not in ctx or "sentences" not in ctx:
            raise f.fail("context", "a context mapping needs 'title' and 'sentences' lists")
        titles, sents = ctx["title"], ctx["sentences"]
        if not isinstance(titles, list) or not isinstance(sents, list) or len(titles) != len(sents):
            raise f.fail("context", "'title' and 'sentences' must be lists of the same length")
        pairs = list(zip(titles, sents))
    elif isinstance(ctx, list):  # official layout
        pairs = []
        for j, item in enumerate(ctx):
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise f.fail("context", f"paragraph {j} must be [title, [sentences]], got {str(item)[:80]}")
            pairs.append((item[0], item[1]))
    else:
        raise f.fail("context", f"expected a list of [title, sentences] or a mapping, got {type(ctx).__name__}")
    out = []
    for j, (title, sentences) in enumerate(pairs):
        if not isinstance(title, str) or not title.strip():
            raise f.fail("context", f"paragraph {j}: title must be a non-empty string, got {title!r}")
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise f.fail("context", f"paragraph {j} ({title!r}): sentences must be a list of strings")
        out.append((title.strip(), join_sentences(sentences)))
    return out


def _parse_supporting_titles(f: Fields) -> list[str]:
    sf = f.get("supporting_facts")
    if isinstance(sf, dict):
        titles = sf.get("title")
        if not isinstance(titles, list):
            raise f.fail("supporting_facts", "a supporting_facts mapping needs a 'title' list")
    elif isinstance(sf, list):
        titles = []
        for j, item in enumerate(sf):
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise f.fail("supporting_facts", f"fact {j} must be [title, sent_id], got {str(item)[:80]}")
            titles.append(item[0])
    else:
        raise f.fail("supporting_facts", f"expected a list or a mapping, got {type(sf).__name__}")
    out: list[str] = []
    for j, t in enumerate(titles):
        if not isinstance(t, str) or not t.strip():
            raise f.fail("supporting_facts", f"fact {j}: title must be a non-empty string, got {t!r}")
        if t.strip() not in out:
            out.append(t.strip())
    return out


def parse_record(rec: Record, file: str, label: str, need_context: bool = True) -> _Parsed:
    """Validate one HotPotQA record (either layout)."""
    f = Fields(rec, file, label)
    id_key = "_id" if "_id" in rec else "id"
    qid = f.id(id_key)
    f.label = f"{label} ({id_key} {qid!r})"
    question = f.string("question")
    answer = f.get("answer")
    if isinstance(answer, list):  # tolerate a list of answers
        answers = tuple(f.answers("answer"))
    else:
        answers = (f.string("answer"),)
    context = _parse_context(f) if (need_context or f.has("context")) else None
    sf_titles = _parse_supporting_titles(f) if f.has("supporting_facts") else []
    meta = {k: rec[k] for k in ("type", "level") if isinstance(rec.get(k), str)}
    return _Parsed(f.label, qid, question.strip(), tuple(a.strip() for a in answers), context, sf_titles, meta)


def _text_key(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def build_corpus(records: list[_Parsed], source: str) -> tuple[Corpus, list[dict[str, list[str]]]]:
    """De-duplicated context paragraphs, and for each record its title -> passage id map."""
    variants: dict[str, list[str]] = {}  # title -> distinct texts, in order of first appearance
    for r in records:
        for title, text in r.context or ():
            texts = variants.setdefault(title, [])
            if text not in texts:
                texts.append(text)

    def pid(title: str, text: str) -> str:
        return title if len(variants[title]) == 1 else f"{title} [{_text_key(text)}]"

    passages: list[Passage] = []
    seen: set[str] = set()
    maps: list[dict[str, list[str]]] = []
    for r in records:
        m: dict[str, list[str]] = {}
        for title, text in r.context or ():
            i = pid(title, text)
            m.setdefault(title, [i])
            if i not in seen:
                seen.add(i)
                passages.append(Passage(i, title, text))
        maps.append(m)
    if not passages:
        raise DataError("corpus is empty: no record has context paragraphs", file=source, field="context")
    return Corpus(passages, source=source), maps


def _read_records(path: str, hub_split: str, limit: int | None) -> tuple[str, list[tuple[str, Record]]]:
    p = Path(path)
    if p.is_file() or p.suffix.lower() in _SUFFIXES:
        p = check_file(p, "questions file")
        return str(p), read_json_records(p, limit)
    return load_hub_rows(path, hub_split, limit, default_config="distractor")


def load_hotpotqa(path: str, *, corpus_path: str | None = None, max_questions: int | None = None,
                  hub_split: str = "validation", open_corpus: Callable[[str], BaseCorpus] = load_corpus_jsonl
                  ) -> RAGData:
    """Load HotPotQA questions (and, unless ``corpus_path`` is given, the corpus of their contexts)."""
    source, rows = _read_records(path, hub_split, max_questions)
    records = [parse_record(rec, source, label, need_context=corpus_path is None) for label, rec in rows]
    if not records:
        raise DataError("no questions were loaded (the file holds no records)", file=source)

    if corpus_path is None:
        corpus, maps = build_corpus(records, source)
    else:
        corpus = open_corpus(corpus_path)
        wanted = {t for r in records for t in r.sf_titles}  # only these titles: no map of every title
        by_title: dict[str, list[str]] = {}
        for psg in corpus:
            if psg.title in wanted:
                by_title.setdefault(psg.title, []).append(psg.id)
        maps = [{t: by_title.get(t) or ([t] if t in corpus else []) for t in r.sf_titles} for r in records]

    questions, labels, unlabelled = [], [], []
    for r, m in zip(records, maps):
        gold: list[str] = []
        for t in r.sf_titles:
            ids = m.get(t) or []
            if not ids:
                gold = []
                unlabelled.append(r.label)
                break
            gold.extend(i for i in ids if i not in gold)
        questions.append(Question(r.qid, r.question, r.answers, tuple(gold) or None, meta=r.meta))
        labels.append(r.label)
    if unlabelled:
        where = f"the corpus {corpus_path}" if corpus_path else "their own context"
        warnings.warn(f"{source}: {len(unlabelled)} of {len(records)} questions have supporting-fact titles "
                      f"missing from {where} and are left without context labels (first: "
                      f"{unlabelled[0]})", stacklevel=2)
    return assemble(f"hotpotqa:{Path(source).stem if Path(source).suffix else source}", source, corpus,
                    questions, labels, max_questions)
