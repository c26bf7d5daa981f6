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

Two rank-aware scores complete them (:func:`retrieval_scores`, per question; the mean is the metric):
- ``mrr@k``: 1 / rank of the first relevant passage in the top k (0 when none is);
- ``ndcg@k``: binary-relevance nDCG, ``sum_i rel_i / log2(i + 1)`` over the top k divided by its ideal value.
A passage is relevant when it is one of the question's gold passages; a question without context labels
counts the passages that contain a gold answer string instead (as answer recall does). With gold passages the
ideal ranking puts ``min(#gold, k)`` of them first; without, the corpus' answer-bearing passages are unknown, so
the ideal is the retrieved relevant passages ranked first (nDCG then scores the order of what was found).
"""

from __future__ import annotations

import math
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


def question_scores(prediction: str, golds: Sequence[str], *, hotpotqa: bool = False) -> dict[str, float]:
    """One question's EM and F1 (the max over its gold answers), as :func:`score_predictions` averages them."""
    return {"em": best_over_golds(exact_match, prediction, golds),
            "f1": best_over_golds(partial(f1, hotpotqa=hotpotqa), prediction, golds)}


def retrieval_scores(retrieved: Sequence[str], texts: Sequence[str], gold: Sequence[str] | None,
                     answers: Sequence[str], k: int) -> dict[str, float | None]:
    """One question's retrieval outcomes at ``k`` (module docstring): ``recall`` and ``recall_all`` (None without
    context labels), ``answer_recall``, ``mrr`` and ``ndcg``. ``retrieved``: the ranked passage ids; ``texts``:
    their texts (what the embedder saw), for answer containment."""
    ids, texts = list(retrieved[:k]), list(texts[:k])
    has_answer = [answer_in_text(answers, t) for t in texts]
    golds = set(gold or ())
    if golds:
        rel = [i in golds for i in ids]
        found = sum(rel)
        recall, recall_all, ideal = found / len(golds), float(found == len(golds)), min(len(golds), k)
    else:
        rel = has_answer
        recall = recall_all = None
        ideal = sum(rel)
    first = next((i for i, r in enumerate(rel) if r), None)
    dcg = sum(1.0 / math.log2(i + 2) for i, r in enumerate(rel) if r)
    idcg = sum(1.0 / math.log2(i + 2) for i in range(ideal))
    return {"recall": recall, "recall_all": recall_all, "answer_recall": float(any(has_answer)),
            "mrr": 0.0 if first is None else 1.0 / (first + 1), "ndcg": dcg / idcg if idcg else 0.0}


RETRIEVAL_METRICS = ("recall", "recall_all", "answer_recall", "mrr", "ndcg")
"""What :func:`retrieval_scores` measures per question; each is reported as ``<name>_at_<k>``."""


def mean_retrieval(per_question: Sequence[dict[str, float | None]], k: int) -> dict[str, float]:
    """``<name>_at_<k>``: the mean of each of :data:`RETRIEVAL_METRICS` over the questions that have it (recall
    and recall_all only over labelled questions; absent when none is)."""
    out = {}
    for name in RETRIEVAL_METRICS:
        values = [q[name] for q in per_question if q.get(name) is not None]
        if values:
            out[f"{name}_at_{k}"] = float(sum(values) / len(values))
    return out
