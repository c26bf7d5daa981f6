"""PopQA loader: the original TSV/CSV table, FlashRAG and Self-RAG JSONL, and their error messages."""

import pytest
from _loader_files import load, raises_at, write_jsonl

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
