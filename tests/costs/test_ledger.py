"""CostLedger's bookkeeping: totals per category and phase, wall-clock, MLflow-safe metric names,
resume snapshots and merging across ranks."""

import json
import math

import pytest

from distrag import metric_names as mn
from distrag.costs.ledger import STANDARD_CATEGORIES, CostLedger, validate_metric_name
from distrag.costs.memory import PeakMemory, Watch


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def tick(self, dt):
        self.t += dt


def _mlflow_check(name):
    from mlflow.utils.validation import _validate_metric_name

    _validate_metric_name(name)


def test_ledger_totals_and_phases():
    clock = FakeClock()
    led = CostLedger(n_devices=2, clock=clock)
    led.add("encode_passages", 1e9, tokens=5000, passages=100)
    with led.phase("train/generator"):
        clock.tick(10)
        led.add("train", 3e9, tokens=800)
        with led.phase("eval"):  # nested: counted in both phases (inclusive), once in the totals
            clock.tick(5)
            led.add("generate", 2e9, tokens=64)
            assert led.open_phases == ["train/generator", "eval"]
            assert led.wall_s == 15  # open phases count up to now
        with pytest.raises(ValueError, match="already open"), led.phase("train/generator"):
            pass
    with led.phase("eval"):
        clock.tick(1)
        led.add("encode_questions", 1e6, tokens=10)
    assert led.total_flops == 1e9 + 3e9 + 2e9 + 1e6
    assert led.flops("train") == 3e9 and led.flops("nope") == 0
    assert led.tokens == 5000 + 800 + 64 + 10 and led.passages == 100
    assert led.wall_s == 16
    assert led.device_hours() == pytest.approx(32 / 3600)
    assert led.device_hours(n_devices=4) == pytest.approx(64 / 3600)
    gen = led.phase_totals("train/generator")
    assert (gen["flops"], gen["wall_s"], gen["tokens"], gen["entries"]) == (5e9, 15, 864, 1)
    assert gen["by_category"] == {"train": 3e9, "generate": 2e9}
    ev = led.phase_totals("eval")
    assert (ev["flops"], ev["wall_s"], ev["entries"]) == (2e9 + 1e6, 6, 2)


def test_ledger_phase_time_recorded_on_exception():
    clock = FakeClock()
    led = CostLedger(clock=clock)
    with pytest.raises(RuntimeError), led.phase("train/retriever"):
        clock.tick(3)
        raise RuntimeError("boom")
    assert led.wall_s == 3 and led.open_phases == []


def test_ledger_uses_perf_counter_by_default():
    import time

    led = CostLedger()
    with led.phase("sleep"):
        time.sleep(0.02)
    assert 0.015 < led.wall_s < 1.0


def test_to_metrics_names_are_valid_for_mlflow():
    clock = FakeClock()
    led = CostLedger(clock=clock)
    led.set_params(trainable=1000, total=100000)
    with led.phase("train/generator"):
        clock.tick(2)
        led.add("train", 6e9, tokens=100)
    with led.phase("phase 2 retriever-ft"):
        led.add("index_build", 5.0)
    m = led.to_metrics()
    for name in m:
        _mlflow_check(name)
        validate_metric_name(name)
    for cat in STANDARD_CATEGORIES:  # always present, so runs compare column by column
        assert f"cost/{cat}_flops" in m
    assert m["cost/train_flops"] == 6e9 and m["cost/encode_passages_flops"] == 0.0
    assert m["cost/index_build_flops"] == 5.0
    assert m["cost/total_flops"] == 6e9 + 5 and m["cost/tokens"] == 100.0
    assert m["cost/wall_s"] == 2.0 and m["cost/device_hours"] == pytest.approx(2 / 3600)
    assert m["cost/phase.train/generator.flops"] == 6e9 and m["cost/phase.train/generator.wall_s"] == 2.0
    assert m["cost/trainable_params"] == 1000 and m["cost/trainable_fraction"] == pytest.approx(0.01)
    assert all(isinstance(v, float) for v in m.values())
    assert set(led.to_metrics(prefix="cost/phase1")) == {k.replace("cost/", "cost/phase1/", 1) for k in m}


@pytest.mark.parametrize("bad", ["train:gen", "a//b", "/abs", "../up", "trail/", "ü", "x" * 251, ""])
def test_invalid_names_rejected(bad):
    led = CostLedger()
    with pytest.raises(ValueError):
        led.add(bad, 1.0)
    with pytest.raises(ValueError), led.phase(bad):
        pass


def test_invalid_values_rejected():
    led = CostLedger()
    for flops in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            led.add("train", flops)
    with pytest.raises(ValueError):
        led.add("train", 1.0, tokens=-1)


def test_state_round_trip_continues_totals():
    clock = FakeClock()
    led = CostLedger(n_devices=2, clock=clock, memory=None)  # peaks: test_memory_peaks_*
    led.set_params(trainable=10, total=100)
    with led.phase("train/generator"):
        clock.tick(4)
        led.add("train", 1e9, tokens=50)
        state = json.loads(json.dumps(led.state_dict()))  # checkpoint taken mid-phase, via JSON
        clock.tick(6)
    # a resumed run starts from the snapshot (4 s of the open phase included) and continues
    resumed = CostLedger.from_state_dict(state, clock=clock)
    assert resumed.to_metrics() == {**led.to_metrics(), "cost/wall_s": 4.0, "cost/device_hours": 8 / 3600,
                                    "cost/phase.train/generator.wall_s": 4.0,
                                    "cost/phase.train/generator.device_hours": 8 / 3600}
    with resumed.phase("train/generator"):
        clock.tick(1)
        resumed.add("train", 2e9, tokens=20)
    assert resumed.flops("train") == 3e9 and resumed.tokens == 70 and resumed.wall_s == 5
    assert resumed.phase_totals("train/generator")["entries"] == 2
    assert resumed.n_devices == 2 and resumed.trainable_params == 10
    # load into an existing ledger replaces, never adds
    other = CostLedger()
    other.add("generate", 7.0)
    other.load_state_dict(state)
    assert other.flops("generate") == 0 and other.flops("train") == 1e9
    with pytest.raises(ValueError, match="version"):
        other.load_state_dict({**state, "version": 99})


def test_merge_ranks_and_phases():
    def rank_ledger(wall, flops):
        clock = FakeClock()
        led = CostLedger(clock=clock)
        led.set_params(trainable=5, total=50)
        with led.phase("train/generator"):
            clock.tick(wall)
            led.add("train", flops, tokens=10)
        return led

    a, b = rank_ledger(10, 1e9), rank_ledger(12, 2e9)
    par = CostLedger.from_state_dict(a.state_dict()).merge(b, parallel=True)
    assert par.flops("train") == 3e9 and par.tokens == 20
    assert par.wall_s == 12  # ranks ran at the same time
    assert par.device_hours() == pytest.approx(22 / 3600)  # but both devices were busy
    assert par.phase_totals("train/generator")["wall_s"] == 12
    assert par.trainable_params == 5 and par.total_params == 50  # not summed
    seq = CostLedger.from_state_dict(a.state_dict()).merge(b.state_dict())  # a state dict works too
    assert seq.wall_s == 22 and seq.flops() == 3e9
    assert math.isclose(seq.device_hours(), par.device_hours())


class ScriptedMemory(PeakMemory):
    """Each watch sees the next scripted (rss, device) peak when it stops."""

    def __init__(self, peaks):
        super().__init__()
        self.peaks = list(peaks)

    def start(self) -> Watch:
        return Watch()

    def stop(self, watch: Watch) -> Watch:
        watch.rss, watch.device = self.peaks.pop(0)
        return watch


def test_memory_peaks_per_phase_run_maximum_resume_and_merge():
    led = CostLedger(memory=ScriptedMemory([(3_000_000_000, None), (5_000_000_000, None), (4_000_000_000, None)]))
    with led.phase("index_build"):
        pass
    with led.phase("gen_ft"):
        pass
    with led.phase("gen_ft"):  # a phase entered twice keeps its larger peak
        pass
    m = led.to_metrics()
    assert m["cost/phase.index_build.peak_rss_gb"] == 3.0 and m["cost/phase.gen_ft.peak_rss_gb"] == 5.0
    assert m["cost/peak_rss_gb"] == 5.0
    assert not any("peak_device" in k for k in m)  # no device in use: no device metric at all
    resumed = CostLedger.from_state_dict(json.loads(json.dumps(led.state_dict())), memory=None)
    assert {k: v for k, v in resumed.to_metrics().items() if "peak" in k} == {k: v for k, v in m.items() if "peak" in k}
    gpu = CostLedger(memory=ScriptedMemory([(1_000_000_000, 7_000_000_000)]))
    with gpu.phase("gen_ft"):
        pass
    merged = gpu.merge(led, parallel=True).to_metrics()
    assert merged["cost/phase.gen_ft.peak_rss_gb"] == 5.0 and merged["cost/phase.gen_ft.peak_device_gb"] == 7.0
    assert merged["cost/peak_rss_gb"] == 5.0 and merged["cost/peak_device_gb"] == 7.0
    # states written before peaks were recorded load with none
    old = led.state_dict()
    for p in old["phases"].values():
        del p["peak_rss"], p["peak_device"]
    del old["peak_rss"], old["peak_device"]
    assert not any("peak" in k for k in CostLedger.from_state_dict(old, memory=None).to_metrics())


def test_generator_weight_bytes_are_recorded_resumed_and_not_summed_over_ranks():
    """The generator's measured weight bytes (what ``generator.quantization`` changes) become
    ``cost/generator_weights_gb`` once set, survive a resume, and merge as the same model on every rank."""
    led = CostLedger(memory=None)
    assert mn.COST_GENERATOR_WEIGHTS_GB not in led.to_metrics()  # never measured: no metric, not a 0
    led.set_params(trainable=5, total=50, generator_weight_bytes=111_691_896)
    assert led.to_metrics()[mn.COST_GENERATOR_WEIGHTS_GB] == pytest.approx(0.111691896)
    led.set_params(trainable=6)  # setting the counts alone keeps the bytes
    assert led.generator_weight_bytes == 111_691_896
    resumed = CostLedger.from_state_dict(json.loads(json.dumps(led.state_dict())), memory=None)
    assert resumed.generator_weight_bytes == 111_691_896
    merged = resumed.merge(led, parallel=True)
    assert merged.to_metrics()[mn.COST_GENERATOR_WEIGHTS_GB] == pytest.approx(0.111691896)
    old = led.state_dict()
    del old["generator_weight_bytes"]  # a checkpoint written before the bytes were recorded
    assert CostLedger.from_state_dict(old, memory=None).generator_weight_bytes is None
