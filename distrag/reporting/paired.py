"""Paired comparisons of two strategies that answered the same questions.

Every row of a comparison group is scored on the same questions, so two rows are compared question by question,
not by overlapping per-row intervals: the per-question differences carry the comparison, and the variation that
both rows share (hard questions stay hard) cancels. On the demo's 60 questions a Wilson interval per row is about
+/-10 EM points wide; the paired interval of a difference is typically several times tighter.

* :func:`paired_bootstrap`: the mean of the per-question differences ``b - a`` and its percentile bootstrap
  interval (questions resampled with replacement, the same resample for both rows; seeded, so a report is
  reproducible; :data:`N_RESAMPLES` resamples by default).
* :func:`mcnemar`: McNemar's exact test for a 0/1 outcome (EM): only the discordant questions (one row right, the
  other wrong) carry information; under "no difference" each is equally likely to go either way, so the two-sided
  p-value is a binomial tail over them.
* :func:`compare`: both for one pair of rows, from their per-question outcomes keyed by question id (only the
  questions both rows answered are compared; how many that was is part of the result).

The outcomes come from each run's per-question records (``predictions_<split>.jsonl``: ``em``, ``f1`` and the
retrieval outcomes, see :func:`distrag.retrieval.pipeline.EvalResult.rows`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from distrag.strategies import BASELINE

if TYPE_CHECKING:
    from distrag.reporting.results import StrategyResult

__all__ = ["N_RESAMPLES", "PAIRED_METRICS", "PairedComparison", "PairedInterval", "annotate", "compare", "mcnemar",
           "outcomes", "paired_bootstrap"]

N_RESAMPLES = 10_000
"""Bootstrap resamples per interval (the issue's standard; the interval's end points move by well under a
tenth of a point between seeds at this count on a few hundred questions)."""


@dataclass(frozen=True)
class PairedInterval:
    """Mean per-question difference ``b - a`` and its bootstrap interval (same units as the outcomes)."""

    mean: float
    low: float
    high: float
    n: int
    """Questions compared."""

    @property
    def covers_zero(self) -> bool:
        """True when the interval does not exclude "no difference"."""
        return self.low <= 0.0 <= self.high


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, n_resamples: int = N_RESAMPLES, seed: int = 0,
                     level: float = 0.95) -> PairedInterval:
    """Percentile bootstrap interval of ``mean(b - a)`` over paired outcomes ``a[i]``, ``b[i]`` (one question each).

    The questions are resampled with replacement ``n_resamples`` times (``seed``: reproducible); the interval is
    the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled means. With no question the
    interval is NaN; with one, it is that one difference.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired outcomes must be two 1-d arrays of one length; got {a.shape} and {b.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    n = len(a)
    if n == 0:
        return PairedInterval(math.nan, math.nan, math.nan, 0)
    diff = b - a
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples, dtype=np.float64)
    block = max(1, 2_000_000 // n)  # resamples per block: bounded memory on large eval sets
    for start in range(0, n_resamples, block):
        stop = min(n_resamples, start + block)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diff[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return PairedInterval(float(diff.mean()), float(lo), float(hi), n)


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test of two 0/1 outcomes on the same questions."""

    only_a: int
    """Questions ``a`` got right and ``b`` wrong."""
    only_b: int
    """Questions ``b`` got right and ``a`` wrong."""
    p_value: float
    """Two-sided exact p-value (1.0 when there is no discordant question)."""


def _binom_cdf_half(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), summed in log space (exact for any n a report meets)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    log_half_n = -n * math.log(2.0)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half_n for i in range(k + 1)]
    top = max(terms)
    return math.exp(top) * sum(math.exp(t - top) for t in terms)


def mcnemar(a: np.ndarray, b: np.ndarray) -> McNemar:
    """McNemar's exact test for paired 0/1 outcomes (e.g. EM per question): the discordant pairs are
    Binomial(n_discordant, 1/2) under "no difference"; the p-value is twice the smaller tail, capped at 1."""
    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired outcomes must be two 1-d arrays of one length; got {a.shape} and {b.shape}")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    n = only_a + only_b
    p = 1.0 if n == 0 else min(1.0, 2.0 * _binom_cdf_half(min(only_a, only_b), n))
    return McNemar(only_a, only_b, p)


@dataclass(frozen=True)
class PairedComparison:
    """Row ``b`` against row ``a`` on the questions both answered: per metric the mean difference and its paired
    bootstrap interval, and McNemar's test for each 0/1 metric."""

    intervals: dict[str, PairedInterval]
    mcnemar: dict[str, McNemar]
    n: int
    """Questions both rows answered."""


def compare(a: Mapping[str, Mapping[str, float]], b: Mapping[str, Mapping[str, float]], metrics: tuple[str, ...], *,
            binary: tuple[str, ...] = ("em",), n_resamples: int = N_RESAMPLES, seed: int = 0) -> PairedComparison:
    """Compare ``b`` with ``a`` given each row's per-question outcomes ``{question id: {metric: value}}``.

    Only questions present in both (and, per metric, with that metric in both: a question without context labels
    has no recall) are compared, in a fixed order (sorted ids), so the result does not depend on the order the
    rows were recorded in. ``binary`` metrics also get McNemar's test.
    """
    common = sorted(set(a) & set(b))
    intervals, tests = {}, {}
    for name in metrics:
        ids = [q for q in common if name in a[q] and name in b[q]
               and a[q][name] is not None and b[q][name] is not None]
        if not ids:
            continue
        xa = np.array([float(a[q][name]) for q in ids])
        xb = np.array([float(b[q][name]) for q in ids])
        intervals[name] = paired_bootstrap(xa, xb, n_resamples=n_resamples, seed=seed)
        if name in binary:
            tests[name] = mcnemar(xa >= 0.5, xb >= 0.5)
    return PairedComparison(intervals, tests, len(common))


# ----------------------------------------------------------------------------------------------
# rows of a table

PAIRED_METRICS = ("em", "f1", "recall")
"""What a row is compared with another on: EM (with McNemar's test), F1 and Recall@k (of every question of the
split: the retrieval pass is not capped)."""
OUTCOMES = ("em", "f1", "recall", "recall_all", "answer_recall", "mrr", "ndcg")


def outcomes(generated: Iterable[Mapping], retrieved: Iterable[Mapping] = ()) -> dict[str, dict[str, float | None]]:
    """A run's per-question outcomes by question id, from its records (``predictions_<split>.jsonl`` rows: EM / F1
    and retrieval of the generated questions; ``retrieval_<split>.jsonl`` rows: retrieval of every question,
    which wins where both have it)."""
    out: dict[str, dict[str, float | None]] = {}
    for rows in (generated, retrieved):
        for row in rows:
            qid = str(row["id"])
            out.setdefault(qid, {}).update({k: row[k] for k in OUTCOMES if k in row})
    return out


def annotate(results: Sequence[StrategyResult], *, n_resamples: int = N_RESAMPLES, seed: int = 0) -> None:
    """Set each row's :attr:`~distrag.reporting.results.StrategyResult.vs_baseline` (against the No-FT row) and
    ``vs_best`` (against the row with the highest EM) from the rows' per-question outcomes; rows without them
    (runs recorded before they were kept) get None."""
    have = [r for r in results if r.per_question]
    base = next((r for r in have if r.key == BASELINE.key), None)
    scored = [r for r in have if any("em" in o for o in r.per_question.values())]
    best = max(scored, key=lambda r: (r.metric("em"), r.metric("f1")), default=None)
    for r in results:
        r.vs_baseline = r.vs_best = None
        if not r.per_question:
            continue
        if base is not None and r is not base:
            r.vs_baseline = compare(base.per_question, r.per_question, PAIRED_METRICS, n_resamples=n_resamples,
                                    seed=seed)
        if best is not None and r is not best:
            r.vs_best = compare(best.per_question, r.per_question, PAIRED_METRICS, n_resamples=n_resamples,
                                seed=seed)
