"""What the index refresh cost a trainer: blocked time (nested calls counted once) and index staleness."""

from __future__ import annotations

import time

import pytest

from distrag.distributed.refresh_stats import RefreshStats


def test_blocked_time_counts_nested_calls_once():
    stats = RefreshStats()
    with stats.blocking():
        time.sleep(0.05)
        with stats.blocking():  # a poll inside wait_for_version
            time.sleep(0.05)
    outer = stats.blocked_s
    assert 0.09 <= outer < 0.5
    time.sleep(0.05)  # training: not blocked
    with stats.blocking():
        pass
    assert stats.blocked_s == pytest.approx(outer, abs=0.01)


def test_staleness_per_step_and_the_summary():
    stats = RefreshStats()
    for step, weights_step in ((0, None), (1, None), (1, None), (2, 0), (3, 2), (4, 2)):
        stats.note_step(step, weights_step)  # step 1 polled twice: counted once
    assert stats.steps == 5
    assert stats.staleness_mean == pytest.approx((0 + 1 + 2 + 1 + 2) / 5) and stats.staleness_max == 2
    stats.blocked_s, stats.n_adopted = 3.0, 2
    s = stats.summary(train_s=60.0)
    assert s == {"blocked_s": 3.0, "blocked_share": 0.05, "staleness_mean": 1.2, "staleness_max": 2.0,
                 "n_adopted": 2.0}
    assert RefreshStats().summary(0.0)["blocked_share"] == 0.0


def test_staleness_and_adoptions_survive_a_resume_blocked_time_does_not():
    stats = RefreshStats(blocked_s=9.0)
    stats.note_step(5, 1)
    stats.n_adopted = 3
    resumed = RefreshStats()
    resumed.load_state_dict(stats.state_dict())
    assert (resumed.steps, resumed.staleness_sum, resumed.staleness_max, resumed.n_adopted) == (1, 4.0, 4, 3)
    assert resumed.blocked_s == 0.0
    resumed.load_state_dict({})  # a checkpoint written before these stats existed
    assert resumed.steps == 0 and resumed.n_adopted == 0
