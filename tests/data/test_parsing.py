"""Shared readers and checks of every loader: corpus JSONL records, missing, unreadable and non-UTF-8
files, an empty questions file, and input files left untouched."""

import os

import pytest
from _loader_files import GOOD_Q, load, raises_at, write_jsonl

from distrag.errors import DataError


@pytest.mark.parametrize("lines, record, field, match", [
    (['{"id": "p1", "text": "x"}', '{"id": "p1", "text": "y"}'], "line 2", "id", "duplicate passage id"),
    (['{"id": "p1", "text": "x"}', '{"id": "p2"}'], "line 2", "text", "missing required field"),
    (['{"id": "p1", "text": "x"}', '{"id": "p2", "text": 5}'], "line 2", "text", "expected a string"),
    (['{"id": "p1", "text": "x"}', '{"id": "p2", "text": "  "}'], "line 2", "text", "must not be empty"),
    (['{"id": "p1", "text": "x", "title": 3}'], "line 1", "title", "expected a string"),
    ([], None, None, "corpus is empty"),
])
def test_corpus_bad_input(tmp_path, lines, record, field, match):
    c = tmp_path / "corpus.jsonl"
    c.write_text("".join(line + "\n" for line in lines))
    q = write_jsonl(tmp_path / "q.jsonl", [GOOD_Q])
    with raises_at(c, record, field, match=match):
        load("jsonl", q, corpus_path=str(c))


def test_missing_and_unreadable_files(tmp_path, corpus_file):
    missing = tmp_path / "missing.jsonl"
    with raises_at(missing, None, None, match="not found"):
        load("jsonl", missing, corpus_path=str(corpus_file))
    with raises_at(missing, None, None, match="not found"):
        load("hotpotqa", missing)
    with raises_at(missing, None, None, match="not found"):
        load("popqa", tmp_path / "missing.jsonl")
    q = write_jsonl(tmp_path / "q.jsonl", [GOOD_Q])
    with raises_at(missing, None, None, match="corpus file not found"):
        load("jsonl", q, corpus_path=str(missing))
    if os.geteuid() != 0:  # root reads anything
        locked = write_jsonl(tmp_path / "locked.jsonl", [GOOD_Q])
        locked.chmod(0)
        try:
            with raises_at(locked, None, None, match="not readable"):
                load("jsonl", locked, corpus_path=str(corpus_file))
        finally:
            locked.chmod(0o644)
    bad_utf8 = tmp_path / "latin1.jsonl"
    bad_utf8.write_bytes(b'{"id": "q1", "question": "Caf\xe9?", "answers": ["A"]}\n')
    with raises_at(bad_utf8, "line 1", None, match="not UTF-8"):
        load("jsonl", bad_utf8, corpus_path=str(corpus_file))


def test_empty_questions_file(tmp_path, corpus_file):
    q = tmp_path / "q.jsonl"
    q.write_text("\n\n")
    with raises_at(q, None, None, match="no questions"):
        load("jsonl", q, corpus_path=str(corpus_file))


def test_loading_does_not_touch_the_input_files(tmp_path, corpus_file):
    q = write_jsonl(tmp_path / "q.jsonl", [GOOD_Q, {"id": "q2", "question": "Q?", "answers": []}])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(DataError):
        load("jsonl", q, corpus_path=str(corpus_file))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("raw, match", [
    ("NaN", "answer 0 is nan, not an answer"),
    ("Infinity", "answer 0 is inf, not an answer"),
    ('{"a": 1}', "answer 0 must be a string, got dict"),
])
def test_a_nan_or_non_string_answer_is_a_data_error_not_a_string(tmp_path, corpus_file, raw, match):
    """JSON allows NaN; it must not become the answer "nan"."""
    q = tmp_path / "q.jsonl"
    q.write_text('{"id": "q1", "question": "Q?", "answers": ["A"]}\n'
                 f'{{"id": "q2", "question": "Q?", "answers": [{raw}]}}\n')
    with raises_at(q, "line 2 (id 'q2')", "answers", match=match):
        load("jsonl", q, corpus_path=str(corpus_file))


def test_finite_numeric_answers_are_read_as_strings(tmp_path, corpus_file):
    q = write_jsonl(tmp_path / "q.jsonl", [{"id": "q1", "question": "When?", "answers": [1990, 2.5]}])
    assert load("jsonl", q, corpus_path=str(corpus_file)).questions[0].answers == ("1990", "2.5")
