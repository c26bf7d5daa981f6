"""Experiment: train on copies, evaluate into the result (never into the models), combine separately
trained parts, and record models trained earlier."""

from __future__ import annotations

import time

import pytest
import torch

from distrag import metric_names as mn
from distrag.config import build_config
from distrag.reporting.tracking import NullTracker
from distrag.strategies import BY_KEY
from distrag.training.experiment import Experiment, combine

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def exp(tmp_path_factory, tiny_encoder_dir, tiny_lm_dir):
    tmp = tmp_path_factory.mktemp("experiment")
    cfg = build_config({
        "data": {"synthetic": {"n_entities": 8, "n_single_hop": 12, "n_two_hop": 4}, "test_fraction": 0.3},
        "embedder": {"model": str(tiny_encoder_dir), "max_length": 64},
        "generator": {"model": str(tiny_lm_dir), "max_new_tokens": 3, "max_passage_chars": 80},
        "retrieval": {"top_k": 3}, "index": {"device": "cpu"},
        "train": {"max_steps": 2, "batch_size": 2, "micro_batch_size": 2, "train_k": 2},
        "tracking": {"enabled": False}, "output_dir": str(tmp / "runs"),
    })
    return Experiment(cfg, show_progress=False).setup()


def _cfg(exp, key):
    return BY_KEY[key].apply(exp.cfg)


def _params(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_train_works_on_copies_and_adds_its_own_cost(exp):
    base = exp.base_models()
    before = _params(base.embedder)
    m = exp.train(_cfg(exp, "embed_ft"))
    after = _params(base.embedder)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base models are untouched
    trained = _params(m.embedder)
    assert any(not torch.equal(before[k], trained[k]) for k in before)
    assert m.own.flops("train") > 0  # and the only passage encoding is the re-embedding after training
    assert m.own.flops("encode_passages") == m.own.phase_totals(mn.PHASE_INDEX_REBUILD)["flops"]
    assert m.ledger.total_flops == pytest.approx(exp.index_ledger.total_flops + m.own.total_flops)
    assert [h["phase"] for h in m.history] == ["embed_ft", "embed_ft"]
    untrained = exp.train(_cfg(exp, "none"))
    assert untrained.own.total_flops == 0 and untrained.history == []


def test_evaluation_is_charged_to_the_result_not_to_the_models(exp):
    m = exp.train(_cfg(exp, "gen_ft"))
    before = m.ledger.total_flops
    res = exp.evaluate(_cfg(exp, "gen_ft"), m, NullTracker(), split="test", t0=time.perf_counter(),
                       own_flops=m.own.total_flops)
    assert m.ledger.total_flops == before  # the models' ledger is what producing them cost
    eval_flops = res.costs[mn.phase_metric("eval_test")]
    assert eval_flops > 0
    assert res.costs[mn.COST_TOTAL_FLOPS] == pytest.approx(before + eval_flops)
    assert res.own_flops == pytest.approx(m.own.total_flops + eval_flops)
    assert (res.key, res.label, res.dataset) == ("gen_ft", "Ft-Gen", exp.splits.name)
    assert res.metrics["n_questions"] == len(exp.splits.test)
    assert res.costs[mn.COST_TRAINABLE_PARAMS] > 0


def test_combine_and_run_trained_pay_both_trainings_once(exp):
    e = exp.train(_cfg(exp, "embed_ft"))
    g = exp.train(_cfg(exp, "gen_ft"))
    c = combine(e, g)
    assert c.embedder is e.embedder and c.index is e.index and c.generator is g.generator
    assert c.ledger.total_flops == pytest.approx(exp.index_ledger.total_flops + e.own.total_flops
                                                 + g.own.total_flops)
    assert c.own.total_flops == pytest.approx(e.own.total_flops + g.own.total_flops)
    assert [h["phase"] for h in c.history] == ["gen_ft", "gen_ft", "embed_ft", "embed_ft"]
    res = exp.run_trained(_cfg(exp, "independent"), c)
    assert res.key == "independent"
    assert res.costs[mn.COST_TRAIN_FLOPS] == pytest.approx(e.own.flops("train") + g.own.flops("train"))
    assert res.costs[mn.COST_OWN_FLOPS] == pytest.approx(res.costs[mn.phase_metric("eval_test")])  # evaluation only
    assert res.history == c.history


def test_run_is_train_then_evaluate_on_the_split(exp):
    res, models = exp.run(_cfg(exp, "joint_token"), split="dev")
    assert res.key == "joint_token" and res.metrics["n_questions"] == len(exp.splits.dev)
    assert res.costs[mn.COST_TRAIN_FLOPS] == pytest.approx(models.own.flops("train"))
    assert mn.phase_metric("eval_dev") in res.costs and mn.phase_metric("joint_token") in res.costs


def test_encoder_strategies_are_evaluated_against_the_re_embedded_corpus(exp):
    import numpy as np

    from distrag.retrieval.corpus_encoding import CorpusEncoder, encode_corpus

    corpus = exp.splits.corpus
    m = exp.train(_cfg(exp, "embed_ft"))
    assert m.passage_vectors == "re-embedded" and m.index is not exp.index
    np.testing.assert_allclose(m.index.reconstruct(np.arange(len(corpus))), encode_corpus(m.embedder, corpus),
                               atol=1e-5)
    # the re-embedding is charged to the run, as its own phase (not training compute)
    rebuild = m.own.phase_totals(mn.PHASE_INDEX_REBUILD)
    assert rebuild["flops"] == pytest.approx(CorpusEncoder(m.embedder, corpus.texts()).cost.flops)
    assert rebuild["passages"] == len(corpus) and rebuild["wall_s"] > 0
    res = exp.evaluate(_cfg(exp, "embed_ft"), m, NullTracker(), split="test", t0=time.perf_counter())
    assert res.passage_vectors == "re-embedded"
    # RAG's frozen-document variant on request; generator-only strategies never re-embed
    frozen_cfg = _cfg(exp, "embed_ft")
    frozen_cfg.index.reembed_after_training = False
    frozen = exp.train(frozen_cfg)
    assert frozen.passage_vectors == "base" and frozen.index is exp.index
    assert mn.PHASE_INDEX_REBUILD not in frozen.own.phases
    gen = exp.train(_cfg(exp, "gen_ft"))
    assert gen.passage_vectors == "base" and gen.index is exp.index


def test_independent_in_one_job_equals_the_ft_embed_and_ft_gen_rows(exp):
    ind = exp.train(_cfg(exp, "independent"))
    e, g = exp.train(_cfg(exp, "embed_ft")), exp.train(_cfg(exp, "gen_ft"))
    for k, v in e.embedder.state_dict().items():
        assert torch.equal(v, ind.embedder.state_dict()[k]), k
    lora = {k: v for k, v in g.generator.model.state_dict().items() if "lora_" in k}
    assert lora and all(torch.equal(v, ind.generator.model.state_dict()[k]) for k, v in lora.items())
    assert [h["loss"] for h in ind.history] == [h["loss"] for h in g.history + e.history]


def test_every_row_is_evaluated_with_the_configured_decoder_and_k(exp):
    m = exp.train(_cfg(exp, "joint_token"))
    cfg = _cfg(exp, "joint_token")
    res = exp.evaluate(cfg, m, NullTracker(), split="test", t0=time.perf_counter())
    assert (res.decoding, res.k) == ("concat", cfg.retrieval.top_k)  # not chosen by the strategy
    cfg.generator.decoding = "rag"
    assert exp.evaluate(cfg, m, NullTracker(), split="test", t0=time.perf_counter()).decoding == "rag"


class _Recorder(NullTracker):
    """Keeps what an evaluation logs (metrics and text artifacts)."""

    def __init__(self):
        self.metrics, self.texts = {}, {}

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_text(self, text, name):
        self.texts[name] = text


def test_generation_is_capped_and_retrieval_is_scored_on_every_question(exp):
    """max_eval_questions caps the generated answers (EM, F1, n_questions); the retrieval metrics come from a pass
    over the whole split, recorded per question in retrieval_<split>.jsonl."""
    import json

    from distrag.retrieval.pipeline import RAGPipeline

    every = exp.splits.test
    assert len(every) > 2
    cfg = _cfg(exp, "none")
    cfg.max_eval_questions = 2
    tr = _Recorder()
    res = exp.evaluate(cfg, exp.base_models(), tr, split="test", t0=time.perf_counter())
    assert res.metrics["n_questions"] == 2 and res.metrics[mn.N_RETRIEVAL_QUESTIONS] == len(every)
    full = RAGPipeline(cfg, exp.splits.corpus, exp.embedder, exp.generator, exp.index).evaluate_retrieval(
        every, show_progress=False)
    for name in ("recall_at_3", "answer_recall_at_3", "mrr_at_3", "ndcg_at_3"):
        assert res.metrics[name] == pytest.approx(full.metrics[name])
        assert tr.metrics[f"test/{name}"] == pytest.approx(full.metrics[name])
    assert tr.metrics["test/mrr"] == pytest.approx(full.metrics["mrr_at_3"])  # the k-free name too
    generated = [json.loads(x) for x in tr.texts["predictions_test.jsonl"].splitlines()]
    retrieved = [json.loads(x) for x in tr.texts["retrieval_test.jsonl"].splitlines()]
    assert len(generated) == 2 and {"em", "f1", "recall", "mrr"} <= set(generated[0])
    assert [r["id"] for r in retrieved] == [q.id for q in every] and "ndcg" in retrieved[0]
    assert res.metrics["em"] == pytest.approx(sum(r["em"] for r in generated) / 2)
