import pytest

from distrag.retrieval.qa_metrics import (
    answer_in_text,
    exact_match,
    f1,
    normalize_answer,
    recall_all_at_k,
    recall_at_k,
    score_predictions,
)


@pytest.mark.parametrize("raw, norm", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  an   apple, a day! ", "apple day"),
    ("Theatre", "theatre"),            # 'the' only removed as a whole word
    ("U.S.A.", "usa"),
    ("rock-and-roll", "rockandroll"),  # SQuAD drops punctuation without inserting spaces
    ("A", ""),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_ignores_case_articles_punctuation():
    assert exact_match("the Beatles.", "Beatles") == 1.0
    assert exact_match("Beatles band", "Beatles") == 0.0


def test_f1_hand_computed():
    # pred tokens: [barack, obama, jr]; gold: [barack, obama] -> P=2/3, R=1, F1=0.8
    assert f1("Barack Obama Jr.", "Barack Obama") == pytest.approx(0.8)
    # repeated tokens count with multiplicity: pred [new, new, york], gold [new, york]
    # common = {new:1, york:1} = 2 -> P=2/3, R=1 -> 0.8
    assert f1("new new york", "New York") == pytest.approx(0.8)
    assert f1("Paris", "London") == 0.0
    assert f1("", "London") == 0.0


def test_yes_no_rule_of_hotpotqa_script_on_hotpotqa_only():
    assert f1("yes", "yes", hotpotqa=True) == 1.0
    assert f1("yes it is", "yes", hotpotqa=True) == 0.0     # a yes/no gold only matches exactly
    assert f1("no", "no way", hotpotqa=True) == 0.0         # a yes/no prediction only matches exactly
    assert exact_match("Yes.", "yes") == 1.0
    # SQuAD v1.1's script (every other dataset) has no such rule: plain token overlap
    assert f1("yes it is", "yes") == pytest.approx(0.5)
    assert f1("no", "no way") == pytest.approx(2 / 3)
    preds, golds = ["yes it is", "no"], [["yes"], ["no way"]]
    assert score_predictions(preds, golds)["f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert score_predictions(preds, golds, hotpotqa=True)["f1"] == 0.0


def test_score_takes_max_over_golds_and_averages():
    scores = score_predictions(["Ralph Rainger", "politician", "x"],
                               [["Ralph Reichenthal", "Ralph Rainger"], ["political leader", "politician"], ["y"]])
    assert scores["em"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        score_predictions(["a"], [[]])


def test_recall_all_at_k_needs_all_gold_passages():
    retrieved = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]]
    gold = [["a", "c"], ["d", "z"], None]
    assert recall_all_at_k(retrieved, gold, 3) == pytest.approx(0.5)  # unlabelled question not counted
    assert recall_all_at_k(retrieved, gold, 1) == 0.0
    assert recall_all_at_k(retrieved, [None, None, None], 3) is None


def test_recall_at_k_is_the_mean_share_of_gold_passages_found():
    retrieved = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]]
    gold = [["a", "c"], ["d", "z"], None]
    assert recall_at_k(retrieved, gold, 3) == pytest.approx((2 / 2 + 1 / 2) / 2)
    assert recall_at_k(retrieved, gold, 1) == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert recall_at_k([["a", "a"]], [["a", "a", "b"]], 2) == pytest.approx(0.5)  # gold ids counted once
    assert recall_at_k(retrieved, [None, None, None], 3) is None


def test_answer_in_text_is_token_aligned():
    assert answer_in_text(["Tarsa"], "Velan was born in Tarsa, a city.")
    assert not answer_in_text(["Tars"], "Velan was born in Tarsa.")
    assert answer_in_text(["the Quillon Group"], "He works for Quillon Group.")


def test_retrieval_scores_with_gold_passages_hand_computed():
    from math import log2

    from distrag.retrieval.qa_metrics import retrieval_scores

    s = retrieval_scores(["x", "a", "y", "b"], ["", "", "", ""], ("a", "b"), ("nope",), 4)
    assert s["recall"] == 1.0 and s["recall_all"] == 1.0 and s["mrr"] == 0.5 and s["answer_recall"] == 0.0
    assert s["ndcg"] == pytest.approx((1 / log2(3) + 1 / log2(5)) / (1 + 1 / log2(3)))
    s2 = retrieval_scores(["x", "a", "y", "b"], ["", "", "", ""], ("a", "b"), ("nope",), 2)  # only the top 2
    assert (s2["recall"], s2["recall_all"], s2["mrr"]) == (0.5, 0.0, 0.5)
    assert s2["ndcg"] == pytest.approx((1 / log2(3)) / (1 + 1 / log2(3)))
    miss = retrieval_scores(["x", "y"], ["", ""], ("a",), ("z",), 2)
    assert (miss["recall"], miss["mrr"], miss["ndcg"]) == (0.0, 0.0, 0.0)


def test_retrieval_scores_without_labels_use_answer_bearing_passages():
    from math import log2

    from distrag.retrieval.qa_metrics import mean_retrieval, retrieval_scores

    s = retrieval_scores(["p1", "p2", "p3"], ["foo", "born in Paris, France", "Paris"], None, ("paris",), 3)
    assert s["recall"] is None and s["recall_all"] is None
    assert s["answer_recall"] == 1.0 and s["mrr"] == 0.5
    assert s["ndcg"] == pytest.approx((1 / log2(3) + 1 / log2(4)) / (1 + 1 / log2(3)))
    m = mean_retrieval([s, {**s, "mrr": 1.0, "recall": 1.0}], 3)
    assert m["mrr_at_3"] == 0.75 and m["recall_at_3"] == 1.0  # recall: over the questions that have it
    assert "recall_all_at_3" not in m
