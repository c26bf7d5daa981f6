"""`distrag advise`: the paper's decision rule applied to measured runs recorded in a temporary MLflow store."""

from __future__ import annotations

import re

import pytest

from distrag import cli
from distrag.config import TrackingConfig, build_config
from distrag.errors import ConfigError
from distrag.reporting.advise import advise, em_noise, training_compute
from distrag.reporting.columns import fmt_flops
from distrag.reporting.groups import GroupSelection
from distrag.reporting.tracking import Tracker

pytestmark = pytest.mark.timeout(120)

LABELS = {"none": "No-FT", "embed_ft": "Ft-Embed", "gen_ft": "Ft-Gen", "independent": "Independent",
          "two_phase": "Two-phase", "joint_sequence": "RAG-Seq", "joint_token": "RAG-Tok"}

# fake but well-formed measurements: (em, f1, train FLOPs, wall-clock s, phase FLOPs)
RUNS = {
    "none": (0.300, 0.400, 0.0, 10.0, {}),
    "embed_ft": (0.410, 0.502, 2.0e12, 30.0, {"embed_ft": 2.0e12}),
    "gen_ft": (0.420, 0.515, 5.0e13, 120.0, {"gen_ft": 5.0e13}),
    "independent": (0.430, 0.520, 5.2e13, 150.0, {"gen_ft": 5.0e13, "embed_ft": 2.0e12}),
    "two_phase": (0.425, 0.518, 1.2e14, 300.0, {"two_phase_generator": 1.0e14, "two_phase_retriever": 3.0e13}),
    "joint_sequence": (0.428, 0.519, 1.5e14, 360.0, {"joint_sequence": 1.5e14}),
    "joint_token": (0.433, 0.525, 1.6e14, 380.0, {"joint_token": 1.6e14}),
}


@pytest.fixture()
def store(store_uri):
    return TrackingConfig(uri=store_uri, experiment="advise-test")


def record(tcfg, keys, *, n=200, dataset="synthetic:seed0", recall=True, runs=RUNS, params=None,
           search: dict | None = None):
    for key in keys:
        em, f1, train, wall, phases = runs[key]
        tags = {"distrag.kind": "strategy", "distrag.strategy": key, "distrag.label": LABELS[key],
                "distrag.eval_split": "test", "distrag.dataset": dataset}
        with Tracker.open(tcfg, run_name=LABELS[key], tags=tags) as tr:
            tr.log_params(params or {"sweep.lr_embedder": "[1e-05, 3e-05]", "sweep.lr_generator": "[0.0001, 0.0003]",
                                     "train.strategy": key})
            m = {"test/em": em, "test/f1": f1, "test/n_questions": float(n), "cost/train_flops": train,
                 "cost/total_flops": train + 1e12, "cost/wall_s": wall,
                 "cost/phase.index_build.flops": 5e11, "cost/phase.eval_test.flops": 5e11,
                 **{f"cost/phase.{p}.flops": v for p, v in phases.items()}}
            if recall:
                m["test/recall_at_5"] = 0.6
            tr.log_metrics(m)
    for key, flops in (search or {}).items():
        tags = {"distrag.kind": "sweep", "distrag.strategy": key, "distrag.dataset": dataset}
        with Tracker.open(tcfg, run_name=f"sweep {key}", tags=tags) as tr:
            tr.log_metrics({"sweep/search_flops": flops})


# ----------------------------------------------------------------------------------------------
# helpers


def test_training_compute_sums_training_phases_only():
    costs = {"cost/train_flops": 7.0, "cost/phase.index_build.flops": 100.0, "cost/phase.eval_test.flops": 50.0,
             "cost/phase.two_phase_generator.flops": 3.0, "cost/phase.two_phase_retriever.flops": 4.0}
    assert training_compute(costs) == 7.0
    assert training_compute({"cost/train_flops": 9.0}) == 9.0
    assert training_compute({}) == 0.0


def test_em_noise_is_the_two_proportion_interval():
    assert em_noise(0.5, 0.5, 100) == pytest.approx(1.96 * (2 * 0.25 / 100) ** 0.5)
    assert em_noise(0.4, 0.4, 10_000) < em_noise(0.4, 0.4, 100)
    assert em_noise(0.0, 0.0, 50) == 0.0
    assert em_noise(0.3, 0.4, 0) == float("inf")


# ----------------------------------------------------------------------------------------------
# the three branches of the rule


def test_labels_available_recommends_independent_with_m_plus_n(store):
    record(store, list(RUNS))
    text = advise(store, labels_available=True, lrs_known=False, grid=(2, 3))
    assert "Recommendation: Independent fine-tuning (Ft-Embed + Ft-Gen)." in text
    assert "m + n = 5 runs" in text and "m x n = 6" in text
    # every recorded strategy with its measured quality and cost
    for key, (em, f1, train, wall, _) in RUNS.items():
        line = next(x for x in text.splitlines() if x.strip().startswith(LABELS[key] + " "))
        assert f"EM {100 * em:.1f}" in line and f"F1 {100 * f1:.1f}" in line, line
        assert f"train {fmt_flops(train)} FLOPs" in line
        assert f"wall-clock {wall:.0f} s" in line and "on 200 questions" in line
    # projected independent search: m x Ft-Embed + n x Ft-Gen from the measured runs
    assert f"Independent projected search {fmt_flops(2 * 2e12 + 3 * 5e13)} FLOPs" in " ".join(text.split())
    assert "Context labels: yes (as given)" in text


def test_no_labels_known_rates_recommends_joint_one_run(store):
    record(store, ["none", "two_phase", "joint_sequence", "joint_token"], recall=False)
    text = advise(store, labels_available=False, lrs_known=True, grid=(2, 2))
    assert "Recommendation: joint training (RAG-Sequence or RAG-Token), one run." in text
    # the cheaper joint variant and two-phase, with their measured numbers
    assert f"Measured: RAG-Seq {fmt_flops(1.5e14)} FLOPs, 360 s; Two-phase {fmt_flops(1.3e14)} FLOPs, 300 s." in text
    assert "Context labels: no (as given)" in text
    assert "Learning rates: known" in text


def test_no_labels_search_recommends_two_phase_with_projected_costs(store):
    record(store, ["none", "two_phase", "joint_sequence", "joint_token"], recall=False)
    text = advise(store, labels_available=False, lrs_known=False, grid=(3, 3))
    assert "Recommendation: two-phase training" in text
    assert "m + n = 6 runs instead of joint's m x n = 9" in text
    tp = 3 * 1.0e14 + 3 * 3.0e13  # n x generator phase + m x retriever phase
    js = 9 * 1.5e14
    flat = " ".join(text.split())
    assert f"Two-phase projected search {fmt_flops(tp)} FLOPs" in flat
    assert f"RAG-Seq projected search {fmt_flops(js)} FLOPs" in flat
    assert f"RAG-Tok projected search {fmt_flops(9 * 1.6e14)} FLOPs" in flat
    expected = f"Projected search: Two-phase {fmt_flops(tp)} FLOPs vs RAG-Seq {fmt_flops(js)} FLOPs ({js / tp:.2f}x)"
    assert expected in flat
    assert "NOT cheaper" not in text


def test_two_phase_not_cheaper_is_said(store):
    runs = dict(RUNS)
    runs["two_phase"] = (0.42, 0.51, 9e14, 900.0, {"two_phase_generator": 6e14, "two_phase_retriever": 3e14})
    record(store, ["two_phase", "joint_token"], runs=runs, recall=False)
    text = advise(store, labels_available=False, lrs_known=False, grid=(2, 2))
    assert "Recommendation: two-phase training" in text
    assert "m x n = 4 is not larger than m + n = 4" in text
    assert "two-phase search is NOT cheaper than joint's" in text


# ----------------------------------------------------------------------------------------------
# labels read from the runs


def test_labels_read_from_an_embed_ft_run(store):
    record(store, ["none", "embed_ft", "gen_ft"], recall=False)
    text = advise(store, labels_available=None, lrs_known=False, grid=(2, 2))
    assert "Context labels: yes (read from the runs: Ft-Embed trained" in text
    assert "Recommendation: Independent" in text


def test_labels_read_from_measured_recall(store):
    record(store, ["none", "joint_token"], recall=True)
    text = advise(store, labels_available=None, lrs_known=False, grid=(2, 2))
    assert "Context labels: yes (read from the runs: retrieval recall was measured" in text


def test_no_labels_read_from_a_popqa_dataset_tag(store):
    record(store, ["none", "two_phase", "joint_token"], recall=False, dataset="popqa:popqa_longtail")
    text = advise(store, labels_available=None, lrs_known=False, grid=(2, 2))
    assert "Context labels: no (read from the runs: dataset popqa:popqa_longtail" in text
    assert "Recommendation: two-phase training" in text


def test_could_not_tell_gives_both_branches(store):
    record(store, ["none", "joint_token"], recall=False, dataset="jsonl:mine")
    text = advise(store, labels_available=None, lrs_known=False, grid=(2, 2))
    assert "Context labels: unknown (could not tell from the runs" in text
    assert "If they are:" in text and "If they are not:" in text
    assert "Independent fine-tuning" in text and "two-phase training" in text


def test_empty_store_still_gives_the_rule(store):
    text = advise(store, labels_available=None, lrs_known=True, grid=(2, 2))
    assert "No measurements" in text and "advise-test" in text
    assert "Context labels: unknown (could not tell: no runs are recorded)" in text
    assert "one run" in text


# ----------------------------------------------------------------------------------------------
# noise and grid sizes


def test_em_differences_within_noise(store):
    record(store, list(RUNS), n=50)
    text = advise(store, labels_available=True, lrs_known=False, grid=(2, 2))
    # trained EMs span 41.0 .. 43.3 on 50 questions: far inside the binomial noise
    assert "span 2.3 EM points (Ft-Embed 41.0 to RAG-Tok 43.3)" in text
    half = 100 * em_noise(0.41, 0.433, 50)
    assert f"within the +/-{half:.1f}-point noise expected on 50 questions" in text


def test_em_differences_beyond_noise(store):
    runs = dict(RUNS)
    runs["embed_ft"] = (0.20, 0.30, 2e12, 30.0, {"embed_ft": 2e12})
    record(store, ["embed_ft", "gen_ft", "joint_token"], runs=runs, n=2000)
    text = advise(store, labels_available=True, lrs_known=False, grid=(2, 2))
    half = 100 * em_noise(0.20, 0.433, 2000)
    assert f"RAG-Tok (43.3) vs Ft-Embed (20.0) differ by 23.3 points, MORE than the +/-{half:.1f}-point noise" in text
    assert "below RAG-Tok beyond noise: Ft-Embed" in text
    assert "Ft-Gen" not in text.split("below RAG-Tok beyond noise:")[1].splitlines()[0]


def test_grid_sizes_from_config_recorded_params_or_default(store):
    record(store, ["two_phase", "joint_token"], recall=False,
           params={"sweep.lr_embedder": "[1e-05, 2e-05, 3e-05]",
                   "sweep.lr_generator": "[0.0001, 0.0002, 0.0003, 0.0004]"})
    text = advise(store, labels_available=False, lrs_known=False)
    assert "from the sweep grid recorded with the runs: m = 3 embedder rates, n = 4 generator rates" in text
    assert "m + n = 7 runs instead of joint's m x n = 12" in text
    cfg = build_config(overrides=["sweep.lr_embedder=[1e-5]", "sweep.lr_generator=[1e-4, 2e-4]"])
    text = advise(store, labels_available=False, lrs_known=False, grid=cfg)
    assert "from the configuration's sweep grid: m = 1 embedder rates, n = 2 generator rates" in text
    text = advise(store, labels_available=False, lrs_known=False, grid=cfg.sweep)
    assert "m = 1" in text


def test_measured_search_cost_is_shown(store):
    record(store, ["independent", "two_phase"], search={"independent": 3.3e15, "two_phase": 4.4e15})
    text = advise(store, labels_available=True, lrs_known=False, grid=(2, 2))
    assert f"LR search {fmt_flops(3.3e15)} FLOPs (measured)" in text
    assert f"LR search {fmt_flops(4.4e15)} FLOPs (measured)" in text


def test_cli_advise(store, capsys):
    record(store, ["none", "two_phase", "joint_token"], recall=False)
    rc = cli.main(["advise", f"tracking.uri={store.uri}", f"tracking.experiment={store.experiment}", "--no-labels",
                   "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Recommendation: two-phase training" in out and "Context labels: no (as given)" in out
    rc = cli.main(["advise", f"tracking.uri={store.uri}", f"tracking.experiment={store.experiment}", "--labels",
                   "--lrs-known", "--quiet"])
    assert rc == 0
    assert "one Ft-Embed run plus one Ft-Gen run" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# one comparison group at a time


def test_advise_reads_one_comparison_group_never_a_mix(store):
    record(store, list(RUNS))  # complete, older
    odd = {"joint_token": (0.9, 0.9, 9e18, 9999.0, {"joint_token": 9e18})}
    record(store, ["joint_token"], runs=odd, dataset="hotpotqa:real")  # newer, another dataset
    text = advise(store, labels_available=True, lrs_known=False, grid=(2, 2))
    assert "the newest complete group" in text and "synthetic:seed0" in text
    assert "EM 90.0" not in text and "EM 43.3" in text
    assert "1 other comparison group recorded in this experiment" in text
    text = advise(store, labels_available=True, lrs_known=False, grid=(2, 2),
                  selection=GroupSelection(dataset="hotpotqa"))
    assert "EM 90.0" in text and "EM 43.3" not in text and "(1 strategies)" in text
    with pytest.raises(ConfigError, match="no recorded group matches --group 'nope'"):
        advise(store, labels_available=True, lrs_known=False, selection=GroupSelection(group="nope"))
    listed = advise(store, labels_available=None, lrs_known=False, selection=GroupSelection(list_groups=True))
    assert "hotpotqa:real" in listed and "synthetic:seed0" in listed and "Recommendation" not in listed


def test_advise_without_a_store_gives_the_rule_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = advise(TrackingConfig(), labels_available=None, lrs_known=True, grid=(2, 2))
    assert "No measurements: no MLflow store in this folder" in text and "one run" in text
    assert list(tmp_path.iterdir()) == []


def _record_outcomes(tcfg, per_key: dict[str, list[int]], costs: dict[str, float]) -> None:
    """Strategy runs with per-question EM outcomes (predictions_test.jsonl), as evaluation records them."""
    import json

    for key, ems in per_key.items():
        tags = {"distrag.kind": "strategy", "distrag.strategy": key, "distrag.label": LABELS[key],
                "distrag.eval_split": "test", "distrag.dataset": "synthetic:seed0"}
        with Tracker.open(tcfg, run_name=LABELS[key], tags=tags) as tr:
            tr.log_metrics({"test/em": sum(ems) / len(ems), "test/f1": sum(ems) / len(ems),
                            "test/n_questions": float(len(ems)), "cost/train_flops": costs[key],
                            "test/recall_at_5": 0.5})
            tr.log_text("\n".join(json.dumps({"id": f"q{i}", "prediction": "x", "answers": ["x"], "em": float(e),
                                              "f1": float(e), "recall": 0.5}) for i, e in enumerate(ems)) + "\n",
                        "predictions_test.jsonl")


def test_advise_calls_strategies_equal_when_the_paired_interval_covers_zero_and_picks_the_cheaper(store):
    """Two-phase answers exactly what RAG-Tok answers (equal, cheaper); RAG-Seq misses 30 questions the best gets
    (below, beyond noise); No-FT is the baseline and not a candidate."""
    n = 120
    best = [1] * 60 + [0] * 60
    runs = {"none": [0] * n, "joint_token": best, "two_phase": list(best), "joint_sequence": [0] * 30 + best[30:]}
    _record_outcomes(store, runs, {"none": 0.0, "joint_token": 3e14, "two_phase": 1e14, "joint_sequence": 2e14})
    text = advise(store, labels_available=False, lrs_known=True, grid=(2, 2))
    assert "the best by EM, RAG-Tok (50.0 EM)" in text or "the best by EM, Two-phase (50.0 EM)" in text
    assert re.search(r"RAG-Seq +dEM -25\.0 \[-\d+\.\d, -\d+\.\d\] points on 120 questions, McNemar p [0-9.e-]+: "
                     r"below the best", text)
    assert "Equal in quality to the best: " in text
    line = next(x for x in text.splitlines() if x.startswith("Equal in quality"))
    assert "Two-phase" in line and "RAG-Tok" in line and "RAG-Seq" not in line
    assert "the cheapest of them to train is Two-phase" in line
