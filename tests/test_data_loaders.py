"""Loaders for every supported format, on small fixture files written here, and their error messages."""

import json
import os

import pytest

from distrag.config import DataConfig
from distrag.data import load_data
from distrag.data.hotpotqa import join_sentences
from distrag.errors import DataError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def hotpot_official(i, ctx_extra=None):
    ctx = [["Alpha", ["Alpha was founded in 1900.", " It is a town."]],
           [f"Beta{i}", [f"Beta{i} is in Alpha."]],
           ["Gamma", ["Gamma is a river."]]]
    return {"_id": f"h{i}", "question": f"Where is Beta{i}?", "answer": "Alpha",
            "supporting_facts": [[f"Beta{i}", 0], ["Alpha", 1]], "context": ctx + (ctx_extra or []),
            "type": "bridge", "level": "easy"}


def hotpot_hf(i):
    rec = hotpot_official(i)
    return {"id": rec["_id"], "question": rec["question"], "answer": rec["answer"],
            "context": {"title": [c[0] for c in rec["context"]], "sentences": [c[1] for c in rec["context"]]},
            "supporting_facts": {"title": [t for t, _ in rec["supporting_facts"]],
                                 "sent_id": [s for _, s in rec["supporting_facts"]]},
            "type": "bridge", "level": "easy"}


CORPUS = [{"id": "p1", "title": "Alpha", "text": "Alpha was founded in 1900."},
          {"id": "p2", "title": "Beta0", "text": "Beta0 is in Alpha."},
          {"id": 3, "text": "An untitled passage."}]


@pytest.fixture
def corpus_file(tmp_path):
    return write_jsonl(tmp_path / "corpus.jsonl", CORPUS)


def load(fmt, path, **kw):
    return load_data(DataConfig(format=fmt, path=str(path), **kw))


def raises_at(file, record, field, match=None):
    """pytest.raises for a DataError naming this file, record and field (in attributes and message)."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(DataError, match=match)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            err = self.info.value
            msg = str(err)
            assert str(file) in msg and err.file == str(file), msg
            if record is not None:
                assert err.record is not None and str(record) in str(err.record) and str(record) in msg, msg
            if field is not None:
                assert err.field == field and f"'{field}'" in msg, msg
            return handled

    return _Check()


# ---------------------------------------------------------------------------------------------- HotPotQA


def test_hotpotqa_official_json(tmp_path):
    p = tmp_path / "hotpot.json"
    p.write_text(json.dumps([hotpot_official(0), hotpot_official(1)]))
    data = load("hotpotqa", p)
    assert [q.id for q in data.questions] == ["h0", "h1"]
    assert data.questions[0].answers == ("Alpha",)
    assert data.questions[0].gold_passage_ids == ("Beta0", "Alpha")
    assert data.questions[0].meta == {"type": "bridge", "level": "easy"}
    # Alpha and Gamma are shared by both questions and de-duplicated
    assert [x.id for x in data.corpus] == ["Alpha", "Beta0", "Gamma", "Beta1"]
    assert data.corpus[0].text == "Alpha was founded in 1900. It is a town."
    assert data.has_context_labels


def test_hotpotqa_hf_layout_jsonl_and_max_questions(tmp_path):
    p = write_jsonl(tmp_path / "hotpot.jsonl", [hotpot_hf(i) for i in range(3)])
    data = load("hotpotqa", p, max_questions=2)
    assert [q.id for q in data.questions] == ["h0", "h1"]
    assert "Beta2" not in data.corpus  # the corpus is built from the kept questions
    assert data.questions[1].gold_passage_ids == ("Beta1", "Alpha")
    # HF's to_json writes JSON lines under a .json name: the content decides, not the extension
    q = write_jsonl(tmp_path / "hf_lines.json", [hotpot_hf(0)])
    assert load("hotpotqa", q).questions[0].id == "h0"


def test_hotpotqa_same_title_different_texts_get_distinct_ids(tmp_path):
    a = hotpot_official(0)
    b = hotpot_official(1)
    b["context"][2] = ["Gamma", ["Gamma is a city."]]
    p = tmp_path / "h.json"
    p.write_text(json.dumps([a, b]))
    ids = [x.id for x in load("hotpotqa", p).corpus if x.title == "Gamma"]
    assert len(ids) == 2 and all(i.startswith("Gamma [") for i in ids)
    p.write_text(json.dumps([b, a]))  # independent of record order
    assert sorted(x.id for x in load("hotpotqa", p).corpus if x.title == "Gamma") == sorted(ids)


def test_hotpotqa_with_user_corpus_maps_titles(tmp_path, corpus_file):
    p = tmp_path / "h.json"
    p.write_text(json.dumps([hotpot_official(0), hotpot_official(1)]))
    with pytest.warns(UserWarning, match="1 of 2 questions"):
        data = load("hotpotqa", p, corpus_path=str(corpus_file))
    assert len(data.corpus) == 3
    assert data.questions[0].gold_passage_ids == ("p2", "p1")
    assert data.questions[1].gold_passage_ids is None  # Beta1 is not in the user corpus


def test_hotpotqa_hub_id_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="neither a local file nor a reachable hub dataset") as e:
        load("hotpotqa", "no-such-owner/no_such_hotpot_dataset")
    assert e.value.field == "path"


@pytest.mark.parametrize("mutate, record, field", [
    (lambda r: r.pop("answer"), "index 1", "answer"),
    (lambda r: r.update(question=7), "index 1", "question"),
    (lambda r: r.update(context="text"), "index 1", "context"),
    (lambda r: r.update(context=[["T", "not a list"]]), "index 1", "context"),
    (lambda r: r.update(supporting_facts=[["Beta1"]]), "index 1", "supporting_facts"),
    (lambda r: r.update(answer=""), "index 1", "answer"),
    (lambda r: r.update(_id="h0"), "index 1", "id"),
])
def test_hotpotqa_bad_records(tmp_path, mutate, record, field):
    bad = hotpot_official(1)
    mutate(bad)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([hotpot_official(0), bad]))
    with raises_at(p, record, field):
        load("hotpotqa", p)


def test_hotpotqa_bad_json_names_the_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n{"_id": "a",\n "question" "x"}\n]')
    with raises_at(p, None, None, match="line 3"):
        load("hotpotqa", p)
    q = tmp_path / "bad.jsonl"
    q.write_text(json.dumps(hotpot_hf(0)) + "\n{oops\n")
    with raises_at(q, "line 2", None, match="invalid JSON"):
        load("hotpotqa", q)


def test_join_sentences():
    assert join_sentences(["A b.", " C d.", "E f."]) == "A b. C d. E f."
    assert join_sentences([]) == ""


# ---------------------------------------------------------------------------------------------- PopQA

POPQA_COLUMNS = ["id", "subj", "prop", "obj", "subj_id", "prop_id", "obj_id", "s_aliases", "o_aliases",
                 "s_uri", "o_uri", "s_wiki_title", "o_wiki_title", "s_pop", "o_pop", "question",
                 "possible_answers"]


def popqa_row(i, answers='["Ralph Rainger", "Ralph Reichenthal"]'):
    vals = {c: f"{c}{i}" for c in POPQA_COLUMNS}
    vals.update(id=str(100 + i), s_pop="1381", question=f"Who was the composer of Song {i}?",
                possible_answers=answers)
    return vals


def write_table(path, rows, sep):
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=POPQA_COLUMNS, delimiter=sep)
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.mark.parametrize("suffix, sep", [(".tsv", "\t"), (".csv", ",")])
def test_popqa_original_table_needs_and_uses_a_corpus(tmp_path, corpus_file, suffix, sep):
    p = write_table(tmp_path / f"popqa{suffix}", [popqa_row(0), popqa_row(1)], sep)
    with raises_at(p, None, "corpus_path", match="carry no passages"):
        load("popqa", p)
    data = load("popqa", p, corpus_path=str(corpus_file))
    q = data.questions[0]
    assert q.id == "100" and q.answers == ("Ralph Rainger", "Ralph Reichenthal")
    assert q.gold_passage_ids is None and not data.has_context_labels
    assert q.meta["s_pop"] == 1381 and q.meta["prop"] == "prop0"
    assert [x.id for x in data.corpus] == ["p1", "p2", "3"]
    assert data.corpus[2].title == ""


def test_popqa_table_bad_answers_name_line_and_field(tmp_path, corpus_file):
    p = write_table(tmp_path / "popqa.tsv", [popqa_row(0), popqa_row(1, answers="[not json")], "\t")
    with raises_at(p, "line 3", "possible_answers", match="not a JSON list"):
        load("popqa", p, corpus_path=str(corpus_file))
    p = write_table(tmp_path / "popqa.tsv", [popqa_row(0), popqa_row(1, answers="[]")], "\t")
    with raises_at(p, "line 3", "possible_answers", match="empty"):
        load("popqa", p, corpus_path=str(corpus_file))


def test_popqa_table_missing_column(tmp_path, corpus_file):
    p = tmp_path / "popqa.tsv"
    p.write_text("id\tquestion\n1\tWho?\n")
    with raises_at(p, "line 1", "possible_answers", match="missing column"):
        load("popqa", p, corpus_path=str(corpus_file))


def test_popqa_flashrag_jsonl(tmp_path, corpus_file):
    p = write_jsonl(tmp_path / "flash.jsonl", [
        {"id": "test_1", "question": "Who?", "golden_answers": ["A", "B"], "metadata": {"s_pop": 5, "prop": "x"}},
        {"id": "test_2", "question": "What?", "golden_answers": ["C"], "metadata": {}},
    ])
    with raises_at(p, None, "corpus_path"):
        load("popqa", p)
    data = load("popqa", p, corpus_path=str(corpus_file))
    assert data.questions[0].answers == ("A", "B") and data.questions[0].meta == {"s_pop": 5, "prop": "x"}
    assert not data.has_context_labels


def selfrag_record(i, ctxs=None):
    return {"question": f"What is X{i}'s occupation?", "answers": ["politician", "pol"], "id": 4000 + i,
            "pop": 58, "prop": "occupation",
            "ctxs": ctxs if ctxs is not None else [
                {"id": "11", "title": f"X{i}", "text": f"X{i} is a politician.", "score": "1.6"},
                {"id": "12", "title": "Shared", "text": "A shared passage.", "score": "1.5"},
                {"title": "Gold", "text": "Gold\n\nGold is a passage without an id."},
                {"title": "Portal:Empty", "text": ""}]}


def test_popqa_selfrag_builds_corpus_from_ctxs(tmp_path):
    recs = [selfrag_record(0), selfrag_record(1)]
    recs[1]["ctxs"][0]["id"] = "13"
    p = write_jsonl(tmp_path / "selfrag.jsonl", recs)
    with pytest.warns(UserWarning, match="skipped 2 retrieved contexts with empty text"):
        data = load("popqa", p)
    ids = [x.id for x in data.corpus]
    assert ids[:2] == ["11", "12"] and len(ids) == 4  # 11, 12, ctx-<hash>, 13
    gold = data.corpus[2]
    assert gold.id.startswith("ctx-") and gold.text == "Gold is a passage without an id."
    q = data.questions[0]
    assert q.id == "4000" and q.answers == ("politician", "pol") and q.gold_passage_ids is None
    assert q.meta["pop"] == 58 and "ctxs" not in q.meta


def test_popqa_selfrag_conflicting_ctx_id(tmp_path):
    recs = [selfrag_record(0), selfrag_record(1)]
    recs[1]["ctxs"][0]["id"] = "13"
    recs[1]["ctxs"][1]["text"] = "A different text under the same id."
    p = write_jsonl(tmp_path / "selfrag.jsonl", recs)
    with raises_at(p, "line 2", "ctxs", match="'12'"):
        load("popqa", p)


def test_popqa_gold_ids_from_the_file_are_used_and_checked(tmp_path):
    rec = selfrag_record(0)
    rec["gold_passage_ids"] = ["11"]
    rec["ctxs"].pop()  # no empty ctx: no warning
    p = write_jsonl(tmp_path / "selfrag.jsonl", [rec])
    data = load("popqa", p)
    assert data.questions[0].gold_passage_ids == ("11",) and data.has_context_labels
    rec["gold_passage_ids"] = ["nope"]
    write_jsonl(p, [rec])
    with raises_at(p, "line 1", "gold_passage_ids", match="not in the corpus"):
        load("popqa", p)


def test_popqa_unknown_layout(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [{"id": 1, "question": "Q?", "answer": "A"}])
    with raises_at(p, "line 1", "answers", match="PopQA layout"):
        load("popqa", p)


# ---------------------------------------------------------------------------------------------- generic JSONL


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


GOOD_Q = {"id": "q1", "question": "Q?", "answers": ["A"]}


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
