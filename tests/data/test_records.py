"""The canonical records: Corpus positions and fingerprint, RAGData's id checks, and its seeded split."""

from __future__ import annotations

import pytest

from distrag.data.records import Corpus, Passage, Question, RAGData, Splits
from distrag.errors import DataError


def _corpus(n: int = 5) -> Corpus:
    return Corpus([Passage(f"p{i}", f"T{i}" if i % 2 else "", f"text {i}") for i in range(n)], source="c.jsonl")


def _questions(n: int) -> list[Question]:
    return [Question(f"q{i}", f"question {i}?", (f"a{i}",), (f"p{i % 5}",)) for i in range(n)]


def test_passage_text_joins_title_and_body():
    assert Passage("x", "Alpha", "is a town.").as_text() == "Alpha. is a town."
    assert Passage("x", "", "untitled").as_text() == "untitled"


def test_corpus_positions_are_stable_ids():
    corpus = _corpus()
    assert len(corpus) == 5 and [p.id for p in corpus] == ["p0", "p1", "p2", "p3", "p4"]
    for i, p in enumerate(corpus):
        assert corpus.position(p.id) == i and corpus[i] is p
    assert "p3" in corpus and "nope" not in corpus
    assert corpus.texts() == [p.as_text() for p in corpus]
    with pytest.raises(KeyError):
        corpus.position("nope")


def test_corpus_rejects_duplicates_and_emptiness():
    with pytest.raises(DataError, match="duplicate passage id 'a'") as e:
        Corpus([Passage("a", "", "x"), Passage("b", "", "y"), Passage("a", "", "z")], source="c.jsonl")
    assert (e.value.file, e.value.record, e.value.field) == ("c.jsonl", 2, "id")
    with pytest.raises(DataError, match="corpus is empty"):
        Corpus([])


def test_fingerprint_follows_the_content():
    a = _corpus()
    assert a.fingerprint() == _corpus().fingerprint()  # same content, same fingerprint
    changed_text = Corpus([*a.passages[:-1], Passage("p4", "", "another text")])
    changed_id = Corpus([*a.passages[:-1], Passage("p9", "", a.passages[-1].text)])
    changed_title = Corpus([*a.passages[:-1], Passage("p4", "New", a.passages[-1].text)])
    reordered = Corpus(list(reversed(a.passages)))  # positions are ids: order matters
    prints = {c.fingerprint() for c in (a, changed_text, changed_id, changed_title, reordered)}
    assert len(prints) == 5


def test_ragdata_checks_question_ids_and_gold_passages():
    corpus = _corpus()
    data = RAGData("d", corpus, _questions(4))
    assert data.has_context_labels
    assert not RAGData("d", corpus, [*_questions(3), Question("u", "unlabelled?", ("x",))]).has_context_labels
    with pytest.raises(DataError, match="duplicate question id 'q0'"):
        RAGData("d", corpus, _questions(2) + _questions(1))
    with pytest.raises(DataError, match="gold passage id 'zz' is not in the corpus") as e:
        RAGData("d", corpus, [Question("q", "?", ("a",), ("p0", "zz"))])
    assert e.value.field == "gold_passage_ids"
    with pytest.raises(DataError, match="no questions"):
        RAGData("d", corpus, [])


def test_split_is_seeded_disjoint_and_complete():
    data = RAGData("d", _corpus(), _questions(50))
    s = data.split(0.2, 0.3, seed=1)
    assert isinstance(s, Splits) and s.corpus is data.corpus and s.name == "d"
    assert (len(s.train), len(s.dev), len(s.test)) == (25, 10, 15)
    ids = [[q.id for q in part] for part in (s.train, s.dev, s.test)]
    assert sorted(sum(ids, [])) == sorted(q.id for q in data.questions)  # every question once
    assert not (set(ids[0]) & set(ids[1]) or set(ids[0]) & set(ids[2]) or set(ids[1]) & set(ids[2]))
    # each part keeps the file's order
    order = {q.id: i for i, q in enumerate(data.questions)}
    assert all([order[i] for i in part] == sorted(order[i] for i in part) for part in ids)
    again = data.split(0.2, 0.3, seed=1)
    assert [q.id for q in again.test] == ids[2] and [q.id for q in again.dev] == ids[1]
    other = data.split(0.2, 0.3, seed=2)
    assert [q.id for q in other.test] != ids[2]
    assert s.get("dev") == s.dev
    with pytest.raises(ValueError, match="unknown split 'val'"):
        s.get("val")
    assert s.has_context_labels


def test_split_refuses_to_leave_no_training_questions():
    data = RAGData("d", _corpus(), _questions(2))
    with pytest.raises(DataError, match="too few"):
        data.split(0.4, 0.4, seed=0)
