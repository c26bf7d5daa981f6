"""Shared reading and validation helpers for the loaders.

Every helper raises :class:`~distrag.data.records.DataError` naming the file, the record and the field.
Records are labelled ``"line N"`` in line-oriented files (JSONL, TSV/CSV) and ``"index N"`` in JSON
arrays; a label may carry the record's id, e.g. ``"index 7 (_id '5a8b...')"``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distrag.data.records import BaseCorpus, Corpus, Passage, Question, RAGData
from distrag.errors import DataError

Record = dict[str, Any]


def check_file(path: str | Path, what: str = "file") -> Path:
    """Return ``path`` as a Path if it is a readable regular file, else raise DataError."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} not found", file=str(path))
    if not p.is_file():
        raise DataError(f"{what} is not a regular file", file=str(path))
    if not os.access(p, os.R_OK):
        raise DataError(f"{what} is not readable (permission denied)", file=str(path))
    return p


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (byte {e.start}): {e.reason}", file=str(path)) from None
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", file=str(path)) from None


def parse_json_line(raw: bytes, path: Path | str, label: str) -> Record:
    """One JSONL line -> its object; not UTF-8, not JSON or not an object is a DataError naming file and record."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (byte {e.start}): {e.reason}", file=str(path), record=label) from None
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON at column {e.colno}: {e.msg}", file=str(path), record=label) from None
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", file=str(path), record=label)
    return obj


def iter_jsonl(path: Path, limit: int | None = None) -> Iterator[tuple[str, Record]]:
    """Yield ``("line N", object)`` for each non-blank line; at most ``limit`` records."""
    n = 0
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")
                if not raw.strip():
                    continue
                if limit is not None and n >= limit:
                    break
                label = f"line {lineno}"
                obj = parse_json_line(raw, path, label)
                n += 1
                yield label, obj
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", file=str(path)) from None


def read_json_records(path: Path, limit: int | None = None) -> list[tuple[str, Record]]:
    """Records of a ``.json`` file holding an array of objects, or of a JSON-lines file.

    A file whose first non-blank character is ``[`` is read as one JSON array (records labelled
    ``index N``); anything else is read as JSON lines (``line N``). Hugging Face ``to_json`` writes
    JSON lines even under a ``.json`` name, so the content, not the extension, decides.
    """
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"["):
        return list(iter_jsonl(path, limit))
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}",
                        file=str(path)) from None
    out = []
    for i, obj in enumerate(data[:limit] if limit is not None else data):
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {type(obj).__name__}", file=str(path),
                            record=f"index {i}")
        out.append((f"index {i}", obj))
    return out


# ----------------------------------------------------------------------------------------------
# field access


class Fields:
    """Typed access to one record's fields; every failure names file, record and field."""

    def __init__(self, rec: Record, file: str, label: str):
        self.rec, self.file, self.label = rec, file, label

    def fail(self, field: str, message: str) -> DataError:
        return DataError(message, file=self.file, record=self.label, field=field)

    def has(self, key: str) -> bool:
        return self.rec.get(key) is not None

    def get(self, key: str, required: bool = True) -> Any:
        if key not in self.rec or self.rec[key] is None:
            if required:
                raise self.fail(key, "missing required field")
            return None
        return self.rec[key]

    def id(self, key: str = "id") -> str:
        """An id: a non-empty string, or an integer (converted to its decimal string)."""
        v = self.get(key)
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise self.fail(key, f"expected a string or integer id, got {type(v).__name__}")
        v = str(v).strip()
        if not v:
            raise self.fail(key, "id is empty")
        return v

    def string(self, key: str, required: bool = True, allow_empty: bool = False) -> str | None:
        v = self.get(key, required)
        if v is None:
            return None
        if not isinstance(v, str):
            raise self.fail(key, f"expected a string, got {type(v).__name__}")
        if not allow_empty and not v.strip():
            raise self.fail(key, "must not be empty")
        return v

    def answers(self, key: str) -> tuple[str, ...]:
        """A non-empty list of non-empty answer strings (finite numbers are accepted and converted; NaN and
        infinities are errors)."""
        return as_answers(self.get(key), self, key)


def as_id_list(v: Any, fields: Fields, key: str) -> tuple[str, ...] | None:
    """A list of passage ids (strings or integers), de-duplicated in order; empty -> None."""
    if not isinstance(v, list):
        raise fields.fail(key, f"expected a list of passage ids, got {type(v).__name__}")
    out: list[str] = []
    for j, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, (str, int)) or not str(x).strip():
            raise fields.fail(key, f"item {j} must be a non-empty string or integer id, got {x!r}")
        if str(x).strip() not in out:
            out.append(str(x).strip())
    return tuple(out) or None


def as_answers(v: Any, fields: Fields, key: str) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise fields.fail(key, f"expected a list of answers, got {type(v).__name__}")
    if not v:
        raise fields.fail(key, "answer list is empty: every question needs at least one answer")
    out: list[str] = []
    for j, a in enumerate(v):
        if isinstance(a, bool) or not isinstance(a, (str, int, float)):
            raise fields.fail(key, f"answer {j} must be a string, got {type(a).__name__}")
        if isinstance(a, float) and not math.isfinite(a):
            raise fields.fail(key, f"answer {j} is {a!r}, not an answer (a missing value?); give the answer "
                                   "as a string")
        a = str(a).strip()
        if not a:
            raise fields.fail(key, f"answer {j} is empty")
        if a not in out:
            out.append(a)
    return tuple(out)


def parse_json_list(raw: Any, fields: Fields, key: str) -> list:
    """A list given either as a JSON list or as a string holding one (PopQA's TSV columns)."""
    if isinstance(raw, list):
        return raw
    if not isinstance(raw, str):
        raise fields.fail(key, f"expected a JSON list in a string, got {type(raw).__name__}")
    try:
        v = json.loads(raw)
    except json.JSONDecodeError as e:
        raise fields.fail(key, f"not a JSON list ({e.msg} at column {e.colno}): {raw[:80]!r}") from None
    if not isinstance(v, list):
        raise fields.fail(key, f"expected a JSON list, got {type(v).__name__}: {raw[:80]!r}")
    return v


def optional_gold_ids(f: Fields, key: str = "gold_passage_ids") -> tuple[str, ...] | None:
    """A record's gold passage ids when it has them: a list, or a JSON list in a string (a CSV / TSV cell); None
    when the field is missing or blank."""
    raw = f.get(key, required=False)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if isinstance(raw, str):
        raw = parse_json_list(raw, f, key)
    return as_id_list(raw, f, key)


def load_hub_rows(path: str, split: str, limit: int | None, default_config: str | None = None
                  ) -> tuple[str, list[tuple[str, Record]]]:
    """Rows of a Hugging Face hub dataset ``"owner/name"`` or ``"owner/name:config"``."""
    repo, _, config = path.partition(":")
    config = config or default_config
    try:
        import datasets

        try:
            ds = datasets.load_dataset(repo, config, split=split)
        except ValueError as e:  # a dataset without configs rejects a config name
            if config and config == default_config and "config" in str(e).lower():
                ds = datasets.load_dataset(repo, split=split)
            else:
                raise
    except Exception as e:  # noqa: BLE001 - offline, unknown id, bad split: all one answer to the user
        raise DataError(f"neither a local file nor a reachable hub dataset "
                        f"(load_dataset({repo!r}, {config!r}, split={split!r}) failed: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
                        file=path, field="path") from None
    n = len(ds) if limit is None else min(limit, len(ds))
    source = f"{repo}{':' + config if config else ''}[{split}]"
    return source, [(f"row {i}", dict(ds[i])) for i in range(n)]



# ----------------------------------------------------------------------------------------------
# corpus JSONL and assembly


def corpus_passage(rec: Record, file: str, label: str) -> Passage:
    """One corpus record ``{"id", "title" (optional), "text"}`` -> Passage (both corpus kinds read it so)."""
    f = Fields(rec, file, label)
    pid = f.id("id")
    title = f.string("title", required=False, allow_empty=True) or ""
    text = f.string("text")
    return Passage(pid, title.strip(), text.strip())


def load_corpus_jsonl(path: str | Path) -> Corpus:
    """Read a corpus JSONL into memory: one ``{"id", "title" (optional), "text"}`` object per line."""
    p = check_file(path, "corpus file")
    passages: list[Passage] = []
    first_line: dict[str, str] = {}
    for label, rec in iter_jsonl(p):
        passage = corpus_passage(rec, str(path), label)
        if passage.id in first_line:
            raise DataError(f"duplicate passage id {passage.id!r} (first at {first_line[passage.id]})",
                            file=str(path), record=label, field="id")
        first_line[passage.id] = label
        passages.append(passage)
    if not passages:
        raise DataError("corpus is empty: at least one passage is needed", file=str(path))
    return Corpus(passages, source=str(path))


def assemble(name: str, file: str, corpus: BaseCorpus, questions: list[Question], labels: list[str],
             max_questions: int | None = None) -> RAGData:
    """Check ids (naming the offending record) and build the RAGData.

    ``labels[i]`` is the record label of ``questions[i]`` in ``file``.
    """
    if not questions:
        raise DataError("no questions were loaded", file=file)
    seen: dict[str, str] = {}
    for q, label in zip(questions, labels):
        if q.id in seen:
            raise DataError(f"duplicate question id {q.id!r} (first at {seen[q.id]})", file=file,
                            record=label, field="id")
        seen[q.id] = label
        for pid in q.gold_passage_ids or ():
            if pid not in corpus:
                raise DataError(f"gold passage id {pid!r} is not in the corpus"
                                f" ({corpus.source or 'built from the questions file'})",
                                file=file, record=label, field="gold_passage_ids")
    if max_questions is not None:
        questions = questions[:max_questions]
    return RAGData(name=name, corpus=corpus, questions=questions)
