"""HotPotQA loader: official JSON and Hugging Face layouts, corpus built from the context paragraphs,
a user corpus mapped by title, and errors that name the record and field."""

import json

import pytest
from _loader_files import load, raises_at, write_jsonl

from distrag.data.hotpotqa import join_sentences
from distrag.errors import DataError


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
