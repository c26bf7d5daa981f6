"""The generic JSONL pair: a questions file over a corpus file, and bad question records."""

import json

import pytest
from _loader_files import GOOD_Q, load, raises_at, write_jsonl


def test_generic_jsonl_pair(tmp_path, corpus_file):
    q = write_jsonl(tmp_path / "q.jsonl", [
        {"id": "q1", "question": "When was Alpha founded?", "answers": ["1900"], "gold_passage_ids": ["p1"],
         "difficulty": "easy"},
        {"id": 2, "question": "Untitled?", "answers": ["yes"], "gold_passage_ids": [3]},
        {"id": "q3", "question": "No labels?", "answers": ["no"]},
    ])
    data = load("jsonl", q, corpus_path=str(corpus_file))
    assert [x.id for x in data.questions] == ["q1", "2", "q3"]
    assert data.questions[0].gold_passage_ids == ("p1",) and data.questions[0].meta == {"difficulty": "easy"}
    assert data.questions[1].gold_passage_ids == ("3",)
    assert data.questions[2].gold_passage_ids is None and not data.has_context_labels
    assert data.corpus[0].as_text() == "Alpha. Alpha was founded in 1900."
    assert len(load("jsonl", q, corpus_path=str(corpus_file), max_questions=1).questions) == 1


@pytest.mark.parametrize("line2, field, match", [
    ('{"id": "q2", "answers": ["A"]}', "question", "missing required field"),
    ('{"id": "q2", "question": "Q?", "answers": "A"}', "answers", "expected a list"),
    ('{"id": "q2", "question": "Q?", "answers": []}', "answers", "answer list is empty"),
    ('{"id": "q2", "question": "Q?", "answers": [""]}', "answers", "empty"),
    ('{"id": ["q2"], "question": "Q?", "answers": ["A"]}', "id", "string or integer"),
    ('{"id": "q1", "question": "Q?", "answers": ["A"]}', "id", "duplicate question id"),
    ('{"id": "q2", "question": "Q?", "answers": ["A"], "gold_passage_ids": ["zz"]}', "gold_passage_ids",
     "not in the corpus"),
    ('{"id": "q2", "question": "Q?", "answers": ["A"], "gold_passage_ids": "p1"}', "gold_passage_ids",
     "expected a list"),
    ('{"id": "q2", "question": "Q?", "answers": ["A"]', None, "invalid JSON"),
    ('["not", "an", "object"]', None, "expected a JSON object"),
])
def test_generic_questions_bad_input(tmp_path, corpus_file, line2, field, match):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps(GOOD_Q) + "\n\n" + line2 + "\n")  # a blank line: the bad record is on line 3
    with raises_at(q, "line 3", field, match=match):
        load("jsonl", q, corpus_path=str(corpus_file))
