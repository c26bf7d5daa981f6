"""Answer and retrieval metrics.

EM and F1 follow the official SQuAD v1.1 evaluation script exactly: answers are normalised (lower case,
punctuation removed, articles a/an/the removed, whitespace collapsed) and the score of a prediction is
the maximum over the gold answers. On HotPotQA (``hotpotqa=True``) F1 follows the HotPotQA script
instead, which differs in one rule: F1 is 0 when either side is yes/no/noanswer and the two differ.

Retrieval is reported under three names (the first two only where questions carry context labels):
- ``recall@k`` (``recall_at_<k>``): the mean, over questions, of the share of their gold passages found
  in the top k (a two-hop question with one of its two passages retrieved counts 0.5);
- ``recall_all@k`` (``recall_all_at_<k>``): the share of questions whose gold passages are ALL in the
  top k (HotPotQA-style "all supporting passages found");
- ``answer_recall@k``: share of questions with a gold answer string (normalised) in one of the top-k
  passages; defined for every dataset, used where there are no labels (PopQA).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import partial

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_SPECIAL = ("yes", "no", "noanswer")


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower, drop punctuation, drop articles, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str, *, hotpotqa: bool = False) -> float:
    """Token F1 of SQuAD v1.1; ``hotpotqa``: with the HotPotQA script's yes/no/noanswer rule."""
    pred_n, gold_n = normalize_answer(prediction), normalize_answer(gold)
    if hotpotqa and (pred_n in _SPECIAL or gold_n in _SPECIAL) and pred_n != gold_n:
        return 0.0
    pred_t, gold_t = pred_n.split(), gold_n.split()
    common = Counter(pred_t) & Counter(gold_t)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_t), same / len(gold_t)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(metric, prediction: str, golds: Sequence[str]) -> float:
    if not golds:
        raise ValueError("a question needs at least one gold answer")
    return max(metric(prediction, g) for g in golds)


def answer_in_text(golds: Sequence[str], text: str) -> bool:
    """A normalised gold answer occurs as a whole-token span of the normalised text."""
    hay = f" {normalize_answer(text)} "
    return any(n and f" {n} " in hay for n in (normalize_answer(g) for g in golds))


def _gold_found(retrieved: Sequence[Sequence[str]], gold: Sequence[Sequence[str] | None],
                k: int) -> list[tuple[int, int]]:
    """(gold passages found in the top k, gold passages) of each labelled question."""
    out = []
    for ids, g in zip(retrieved, gold, strict=True):
        if g:
            top = set(ids[:k])
            out.append((sum(x in top for x in set(g)), len(set(g))))
    return out


def recall_at_k(retrieved: Sequence[Sequence[str]], gold: Sequence[Sequence[str] | None], k: int) -> float | None:
    """Mean share of each labelled question's gold passages within the top k (None: no labels)."""
    found = _gold_found(retrieved, gold, k)
    return sum(f / n for f, n in found) / len(found) if found else None


def recall_all_at_k(retrieved: Sequence[Sequence[str]], gold: Sequence[Sequence[str] | None],
                    k: int) -> float | None:
    """Share of labelled questions whose gold passage ids are ALL within the top k (None: no labels)."""
    found = _gold_found(retrieved, gold, k)
    return sum(f == n for f, n in found) / len(found) if found else None


def score_predictions(predictions: Sequence[str], answers: Sequence[Sequence[str]], *,
                      hotpotqa: bool = False) -> dict[str, float]:
    """Mean EM and F1 (in [0, 1]) over questions, each the max over that question's gold answers
    (``hotpotqa``: F1 with the HotPotQA script's yes/no rule)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    if not predictions:
        return {"em": 0.0, "f1": 0.0}
    em = sum(best_over_golds(exact_match, p, a) for p, a in zip(predictions, answers)) / len(predictions)
    f1_rule = partial(f1, hotpotqa=hotpotqa)
    f = sum(best_over_golds(f1_rule, p, a) for p, a in zip(predictions, answers)) / len(predictions)
    return {"em": em, "f1": f}
