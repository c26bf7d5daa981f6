import re
import warnings
from collections import Counter

import pytest

from distrag.config import DataConfig, SyntheticConfig
from distrag.data import load_data
from distrag.data.synthetic import make_synthetic
from distrag.errors import DataError


def _snapshot(data):
    return ([(p.id, p.title, p.text) for p in data.corpus],
            [(q.id, q.text, q.answers, q.gold_passage_ids, q.meta) for q in data.questions])


@pytest.fixture(scope="module")
def world():
    return make_synthetic(SyntheticConfig(n_entities=60, n_single_hop=100, n_two_hop=50, seed=3))


def test_same_seed_same_task_and_different_seed_differs():
    cfg = SyntheticConfig(n_entities=40, n_single_hop=50, n_two_hop=20, seed=7)
    a, b = make_synthetic(cfg), make_synthetic(cfg.model_copy())
    assert _snapshot(a) == _snapshot(b)
    assert a.corpus.fingerprint() == b.corpus.fingerprint()
    c = make_synthetic(cfg.model_copy(update={"seed": 8}))
    assert c.corpus.fingerprint() != a.corpus.fingerprint()
    assert [q.text for q in c.questions] != [q.text for q in a.questions]


def test_sizes_and_id_formats(world):
    people = [p for p in world.corpus if p.id.startswith("person-")]
    assert len(people) == 60
    assert any(p.id.startswith("city-") for p in world.corpus)
    assert any(p.id.startswith("company-") for p in world.corpus)
    assert all(re.fullmatch(r"(person|city|company|event)-\d{4}", p.id) for p in world.corpus)
    single = [q for q in world.questions if q.id.startswith("s-")]
    double = [q for q in world.questions if q.id.startswith("b-")]
    assert len(single) == 100 and len(double) == 50
    assert all(re.fullmatch(r"[sb]-\d{6}", q.id) for q in world.questions)
    # single- and two-hop questions are interleaved, so max_questions keeps both kinds
    assert {q.id[0] for q in world.questions[:20]} == {"s", "b"}


def test_gold_ids_exist_and_answers_occur_in_gold_passages(world):
    assert world.has_context_labels
    for q in world.questions:
        assert len(q.answers) == 1 and q.answers[0]
        for pid in q.gold_passage_ids:
            assert pid in world.corpus
        gold_texts = [world.corpus[world.corpus.position(pid)].text for pid in q.gold_passage_ids]
        if q.meta["hops"] == 1:
            assert len(q.gold_passage_ids) == 1
            assert q.answers[0] in gold_texts[0], q
        else:
            assert len(q.gold_passage_ids) == 2 and len(set(q.gold_passage_ids)) == 2
            # the bridge entity is named in the first passage and the answer is in the second
            assert q.meta["bridge"] in gold_texts[0], q
            assert q.answers[0] in gold_texts[1], q
            assert q.answers[0] not in q.text


def test_questions_are_distinct_and_not_copied_from_passages(world):
    keys = [(q.meta["relation"], q.gold_passage_ids) for q in world.questions]
    assert len(keys) == len(set(keys)), "a fact was asked twice"
    corpus_text = " ".join(p.text for p in world.corpus)
    for q in world.questions:
        assert q.text not in corpus_text
        assert len(q.answers[0].split()) <= 3  # a name, a city, a year, an occupation


def test_world_has_confusable_names(world):
    people = [p.title for p in world.corpus if p.id.startswith("person-")]
    assert len(set(people)) == len(people)
    firsts = Counter(n.split()[0] for n in people)
    assert max(firsts.values()) >= 3  # shared first names
    stems = Counter(n.split()[1][:4] for n in people)
    assert max(stems.values()) >= 3  # surname families (same stem, different endings)
    companies = [p.title for p in world.corpus if p.id.startswith("company-")]
    assert any(Counter(c.split()[0] for c in companies)[c.split()[0]] >= 2 for c in companies)
    # people are named in passages other than their own (distractors)
    person = people[0]
    assert sum(person in p.text for p in world.corpus) >= 2


def test_request_beyond_the_world_is_capped_with_a_warning():
    cfg = SyntheticConfig(n_entities=4, n_single_hop=10_000, n_two_hop=10_000, seed=0)
    with pytest.warns(UserWarning, match="allows only"):
        data = make_synthetic(cfg)
    n_single = sum(q.id.startswith("s-") for q in data.questions)
    n_double = sum(q.id.startswith("b-") for q in data.questions)
    assert 0 < n_single < 10_000 and 0 < n_double < 10_000
    keys = [(q.meta["relation"], q.gold_passage_ids) for q in data.questions]
    assert len(keys) == len(set(keys))


def test_no_warning_when_the_world_is_big_enough():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_synthetic(SyntheticConfig(n_entities=20, n_single_hop=30, n_two_hop=10))


def test_load_data_synthetic_applies_max_questions_and_refuses_a_corpus(tmp_path):
    cfg = DataConfig(format="synthetic", max_questions=25,
                     synthetic=SyntheticConfig(n_entities=30, n_single_hop=40, n_two_hop=20))
    data = load_data(cfg)
    assert len(data.questions) == 25
    splits = data.split(0.2, 0.2, seed=0)
    assert len(splits.train) + len(splits.dev) + len(splits.test) == 25
    with pytest.raises(DataError, match="corpus_path"):
        load_data(cfg.model_copy(update={"corpus_path": str(tmp_path / "c.jsonl")}))


def test_bridge_passages_of_person_questions_name_the_person(world):
    """Like HotPotQA's bridge paragraphs, a person's employer and birthplace passages name the person
    (staff and natives lists), so a trained question encoder can reach them; other bridges stay unnamed."""
    named = unnamed = 0
    for q in world.questions:
        if q.meta["hops"] != 2:
            continue
        first, second = (world.corpus[world.corpus.position(pid)] for pid in q.gold_passage_ids)
        if q.meta["relation"].startswith(("employer_", "birthplace_")):
            assert first.title in second.text, q
            named += 1
        elif first.title not in second.text:
            unnamed += 1
    assert named and unnamed
