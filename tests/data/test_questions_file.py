"""Questions files for a saved pipeline: every training format read without a corpus, told apart by content,
answers optional, HotPotQA's supporting facts mapped to the gold ids training gave them, and one clear error
for a file of an unknown format."""

import json

import pytest
from _loader_files import load, raises_at, write_jsonl
from test_hotpotqa import hotpot_hf, hotpot_official
from test_popqa import popqa_row, selfrag_record, write_table

from distrag.data.questions_file import gold_from_titles, read_questions
from distrag.errors import DataError


def test_questions_jsonl_answers_and_ids_optional(tmp_path):
    p = write_jsonl(tmp_path / "q.jsonl", [
        {"id": "q1", "question": " Who founded Acme? ", "answers": ["Jane Roe"], "gold_passage_ids": ["p7"]},
        {"question": "Where is Acme?"},
    ])
    qf = read_questions(p)
    assert qf.format == "jsonl" and qf.has_answers
    q1, q2 = qf.questions
    assert (q1.id, q1.text, q1.answers, q1.gold_passage_ids) == ("q1", "Who founded Acme?", ("Jane Roe",), ("p7",))
    assert (q2.id, q2.answers, q2.gold_passage_ids) == ("2", (), None)  # unanswered: answered, not scored
    assert not read_questions(write_jsonl(tmp_path / "u.jsonl", [{"question": "x?"}])).has_answers


def test_bad_records_name_file_record_and_field(tmp_path):
    p = write_jsonl(tmp_path / "q.jsonl", [{"id": "q1", "question": "Q?", "answers": []}])
    with raises_at(p, "line 1", "answers", match="answer list is empty"):
        read_questions(p)
    p = write_jsonl(tmp_path / "dup.jsonl", [{"id": "a", "question": "Q?"}, {"id": "a", "question": "R?"}])
    with raises_at(p, "line 2", "id", match="duplicate question id"):
        read_questions(p)
    p = write_jsonl(tmp_path / "noq.jsonl", [{"id": "a", "question": ""}])
    with raises_at(p, "line 1", "question"):
        read_questions(p)


def test_unknown_formats_are_one_clear_error(tmp_path):
    p = tmp_path / "q.parquet"
    p.write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"q\.parquet: unknown questions format \(extension '\.parquet'\)"):
        read_questions(p)
    p = write_jsonl(tmp_path / "odd.jsonl", [{"query": "what?", "label": 1}])
    with raises_at(p, "line 1", None, match="unknown questions format: the first record has keys"):
        read_questions(p)
    with pytest.raises(DataError, match="unknown questions format 'xml'"):
        read_questions(p, "xml")
    with pytest.raises(DataError, match="not found"):
        read_questions(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no questions"):
        read_questions(empty)


@pytest.mark.parametrize("layout", [hotpot_official, hotpot_hf])
def test_hotpotqa_gold_ids_are_those_training_gave(tmp_path, layout):
    a, b = layout(0), layout(1)
    if layout is hotpot_official:  # one title with two texts: training names each variant by its text
        b["context"][2] = ["Gamma", ["Gamma is a city."]]
        b["supporting_facts"].append(["Gamma", 0])
    p = tmp_path / "h.json"
    p.write_text(json.dumps([a, b]))
    data = load("hotpotqa", p)
    qf = read_questions(p)
    assert qf.format == "hotpotqa" and [q.answers for q in qf.questions] == [("Alpha",), ("Alpha",)]
    assert [q.gold_passage_ids for q in gold_from_titles(qf, data.corpus)] == \
        [q.gold_passage_ids for q in data.questions]
    # the test file of HotPotQA has no answers: read all the same
    c = layout(2)
    del c["answer"], c["supporting_facts"], c["context"]
    p2 = write_jsonl(tmp_path / "test.jsonl", [c])
    qf2 = read_questions(p2, "hotpotqa")
    assert qf2.questions[0].answers == () and gold_from_titles(qf2, data.corpus)[0].gold_passage_ids is None


def test_hotpotqa_title_missing_from_the_corpus_leaves_the_question_unlabelled(tmp_path):
    p = tmp_path / "h.json"
    p.write_text(json.dumps([hotpot_official(0)]))
    other = tmp_path / "h2.json"
    other.write_text(json.dumps([hotpot_official(5)]))
    corpus = load("hotpotqa", other).corpus  # has Alpha, not Beta0
    assert gold_from_titles(read_questions(p), corpus)[0].gold_passage_ids is None


@pytest.mark.parametrize("suffix, sep", [(".tsv", "\t"), (".csv", ",")])
def test_popqa_table(tmp_path, suffix, sep):
    p = write_table(tmp_path / f"popqa{suffix}", [popqa_row(0), popqa_row(1)], sep)
    qf = read_questions(p)
    assert qf.format == "popqa" and qf.questions[0].answers == ("Ralph Rainger", "Ralph Reichenthal")
    p = write_table(tmp_path / f"bad{suffix}", [popqa_row(0, answers="[not json")], sep)
    with raises_at(p, "line 2", "possible_answers"):
        read_questions(p)


def test_popqa_jsonl_variants(tmp_path):
    flash = write_jsonl(tmp_path / "flash.jsonl", [{"id": "t1", "question": "Who?", "golden_answers": ["A", "B"]}])
    assert read_questions(flash).questions[0].answers == ("A", "B")
    selfrag = write_jsonl(tmp_path / "selfrag.jsonl", [selfrag_record(0), selfrag_record(1)])
    qf = read_questions(selfrag)
    assert qf.format == "popqa" and qf.questions[1].id == "4001" and qf.questions[1].answers == ("politician", "pol")
    assert gold_from_titles(qf, None) == qf.questions  # only HotPotQA maps titles
