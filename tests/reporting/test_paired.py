"""Paired statistics on constructed per-question results where the answer is known."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from distrag.reporting.paired import compare, mcnemar, paired_bootstrap


def test_identical_rows_differ_by_exactly_nothing():
    a = np.array([1, 0, 1, 1, 0] * 20, dtype=float)
    iv = paired_bootstrap(a, a.copy())
    assert (iv.mean, iv.low, iv.high, iv.n) == (0.0, 0.0, 0.0, 100)
    assert iv.covers_zero
    t = mcnemar(a, a)
    assert (t.only_a, t.only_b, t.p_value) == (0, 0, 1.0)


def test_mcnemar_exact_p_values():
    # 2 questions only a gets right, 8 only b: P(X <= 2 | n=10, 1/2) = (1 + 10 + 45) / 1024, two-sided x2
    a = np.array([1, 1] + [0] * 8 + [1] * 30 + [0] * 60)
    b = np.array([0, 0] + [1] * 8 + [1] * 30 + [0] * 60)
    t = mcnemar(a, b)
    assert (t.only_a, t.only_b) == (2, 8)
    assert t.p_value == pytest.approx(2 * 56 / 1024, abs=1e-12)
    assert mcnemar(a[:40], a[:40]).p_value == 1.0
    # 10 discordant questions all one way: 2 * 0.5**10
    assert mcnemar(np.zeros(10), np.ones(10)).p_value == pytest.approx(2 / 1024)
    # large n stays finite and symmetric
    big_a, big_b = np.r_[np.ones(600), np.zeros(400)], np.r_[np.zeros(400), np.ones(600)]
    assert 0.0 < mcnemar(big_a, big_b).p_value == mcnemar(big_b, big_a).p_value <= 1.0


def test_bootstrap_interval_matches_the_normal_approximation_on_a_large_sample():
    diff = np.r_[np.ones(200), np.zeros(200)]  # b - a: half the questions +1, half 0 -> mean 0.5, se 0.025
    iv = paired_bootstrap(np.zeros(400), diff, seed=3)
    assert iv.mean == 0.5
    assert iv.low == pytest.approx(0.5 - 1.96 * 0.025, abs=0.006)
    assert iv.high == pytest.approx(0.5 + 1.96 * 0.025, abs=0.006)
    assert not iv.covers_zero
    assert paired_bootstrap(np.zeros(400), diff, seed=3) == iv  # seeded: reproducible


def test_a_consistent_small_gain_is_resolved_paired_where_unpaired_intervals_overlap():
    """Both rows share which questions are hard; b fixes 12 of a's 200 answers and breaks none. The per-row
    Wilson intervals overlap (the report's old reading: no difference); the paired interval excludes 0."""
    from distrag.reporting.columns import em_interval

    rng = random.Random(0)
    a = np.array([1.0 if rng.random() < 0.5 else 0.0 for _ in range(200)])
    b = a.copy()
    b[np.flatnonzero(a == 0)[:12]] = 1.0
    lo_a, hi_a = em_interval(a.mean(), 200)
    lo_b, hi_b = em_interval(b.mean(), 200)
    assert lo_b < hi_a  # unpaired: the intervals overlap
    iv = paired_bootstrap(a, b)
    assert iv.mean == pytest.approx(12 / 200)
    assert iv.low > 0.0  # paired: b is better
    assert (iv.high - iv.low) < 0.5 * ((hi_a - lo_a) + (hi_b - lo_b)) / 2
    assert mcnemar(a, b).p_value == pytest.approx(2 * 0.5 ** 12)


def test_compare_aligns_questions_by_id_whatever_their_order():
    ids = [f"q{i}" for i in range(50)]
    a = {q: {"em": float(i % 2), "f1": 0.5, "recall": 1.0} for i, q in enumerate(ids)}
    b = {q: {"em": 1.0, "f1": 0.75, "recall": 1.0} for q in ids[5:]}  # answered 45 of them
    b["extra"] = {"em": 1.0, "f1": 1.0}
    shuffled = dict(sorted(b.items(), key=lambda kv: random.Random(1).random()))
    r1 = compare(a, b, ("em", "f1", "recall"))
    r2 = compare(a, shuffled, ("em", "f1", "recall"))
    assert r1 == r2 and r1.n == 45
    assert r1.intervals["f1"].mean == pytest.approx(0.25) and r1.intervals["f1"].low == pytest.approx(0.25)
    assert r1.intervals["recall"].mean == 0.0
    em = sum(1 - a[q]["em"] for q in ids[5:]) / 45
    assert r1.intervals["em"].mean == pytest.approx(em)
    assert set(r1.mcnemar) == {"em"} and r1.mcnemar["em"].only_a == 0


def test_metrics_missing_for_some_questions_are_compared_where_both_have_them():
    a = {"q1": {"em": 1.0, "recall": 0.5}, "q2": {"em": 0.0, "recall": None}, "q3": {"em": 0.0}}
    b = {"q1": {"em": 1.0, "recall": 1.0}, "q2": {"em": 1.0, "recall": 1.0}, "q3": {"em": 1.0}}
    r = compare(a, b, ("em", "recall"))
    assert r.intervals["recall"].n == 1 and r.intervals["recall"].mean == 0.5
    assert r.intervals["em"].n == 3
    assert compare({}, b, ("em",)).intervals == {}


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="1-d arrays of one length"):
        paired_bootstrap(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap(np.zeros(3), np.zeros(3), level=1.5)
    assert math.isnan(paired_bootstrap(np.zeros(0), np.zeros(0)).mean)
