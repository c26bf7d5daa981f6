"""Peak memory per phase: the high-water mark is read into every open watch before it is reset, so nested
and overlapping watches each get the peak of their own lifetime; watches survive deepcopy and pickling."""

from __future__ import annotations

import copy
import pickle
import time

import pytest

from distrag.costs import memory
from distrag.costs.ledger import CostLedger
from distrag.costs.memory import PROCESS_MEMORY, PeakMemory, rss_bytes

MB = 1_000_000


def _touch(n_bytes: int) -> bytearray:
    buf = bytearray(n_bytes)
    buf[::4096] = b"\1" * len(buf[::4096])  # make every page resident
    return buf


def test_nested_watches_each_see_their_own_peak():
    tracker = PeakMemory()
    outer = tracker.start()
    big = _touch(300 * MB)
    del big
    inner = tracker.start()
    small = _touch(60 * MB)
    del small
    tracker.stop(inner)
    tracker.stop(outer)
    base = rss_bytes()
    assert outer.rss >= base + 250 * MB  # the 300 MB before the inner watch opened still counts for the outer
    assert base + 40 * MB <= inner.rss < outer.rss - 150 * MB  # the inner never saw the 300 MB
    assert outer.device is None and inner.device is None  # no GPU in use: host only


def test_two_ledgers_open_at_once_do_not_erase_each_others_peak():
    a, b = CostLedger(), CostLedger()
    with a.phase("train"):
        buf = _touch(200 * MB)
        del buf
        with b.phase("eval"):  # resets the process's mark: a's peak must have been read first
            pass
    assert a.to_metrics()["cost/phase.train.peak_rss_gb"] * 1e9 >= rss_bytes() + 150 * MB
    assert b.to_metrics()["cost/phase.eval.peak_rss_gb"] < a.to_metrics()["cost/phase.train.peak_rss_gb"]


def test_the_process_tracker_is_shared_by_copies_and_pickles():
    led = CostLedger()
    assert copy.deepcopy(led)._memory is PROCESS_MEMORY
    assert pickle.loads(pickle.dumps(led))._memory is PROCESS_MEMORY


def test_without_a_resettable_mark_a_sampler_thread_catches_the_peak(monkeypatch):
    tracker = PeakMemory()
    monkeypatch.setattr(tracker, "_can_reset", lambda: False)
    monkeypatch.setattr(memory, "_SAMPLE_S", 0.005)
    watch = tracker.start()
    buf = _touch(200 * MB)
    time.sleep(0.1)
    del buf
    tracker.stop(watch)
    assert watch.rss >= rss_bytes() + 150 * MB


def test_a_ledger_without_memory_records_no_peaks():
    led = CostLedger(memory=None)
    with led.phase("x"):
        _touch(50 * MB)
    assert not any("peak" in k for k in led.to_metrics())
    with CostLedger().phase("y") as measured:
        pass
    assert measured.to_metrics()["cost/peak_rss_gb"] > 0


def test_freed_small_blocks_are_given_back_to_the_os():
    from distrag.costs.memory import release_free_memory, rss_bytes

    if not release_free_memory():
        pytest.skip("no glibc malloc_trim here")
    blocks = [bytes(1_000 + i % 7) for i in range(300_000)]  # ~300 MB of malloc'd (not pymalloc) blocks
    keep = blocks[::64]  # survivors spread over the heap: it cannot shrink from its top
    before = rss_bytes()
    del blocks
    kept = rss_bytes()
    release_free_memory()
    after = rss_bytes()
    assert kept - after > 100 * 2**20, (before, kept, after)  # glibc kept it resident; now most of it is not
    assert len(keep) == 4_688
