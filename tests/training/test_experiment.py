"""Experiment: train on copies, evaluate into the result (never into the models), combine separately
trained parts, and record models trained earlier."""

from __future__ import annotations

import time

import pytest
import torch

from distrag import metric_names as mn
from distrag.config import build_config
from distrag.reporting.tracking import NullTracker
from distrag.strategies import BY_KEY, STRATEGIES
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
    """Keeps what an evaluation logs (metrics, tags and text artifacts)."""

    def __init__(self):
        self.metrics, self.texts, self.tags = {}, {}, {}

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_text(self, text, name):
        self.texts[name] = text

    def set_tags(self, tags):
        self.tags.update(tags)


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


@pytest.fixture(scope="module")
def nf4_exp(tmp_path_factory, tiny_encoder_dir, tiny_lm_dir):
    tmp = tmp_path_factory.mktemp("experiment_nf4")
    cfg = build_config({
        "data": {"synthetic": {"n_entities": 8, "n_single_hop": 12, "n_two_hop": 4}, "test_fraction": 0.3},
        "embedder": {"model": str(tiny_encoder_dir), "max_length": 64},
        "generator": {"model": str(tiny_lm_dir), "max_new_tokens": 3, "max_passage_chars": 80, "quantization": "nf4"},
        "retrieval": {"top_k": 3}, "index": {"device": "cpu"}, "max_eval_questions": 4,
        "train": {"max_steps": 2, "batch_size": 2, "micro_batch_size": 2, "train_k": 2},
        "tracking": {"enabled": False}, "output_dir": str(tmp / "runs"),
    })
    return Experiment(cfg, show_progress=False).setup()


@pytest.mark.parametrize("key", [s.key for s in STRATEGIES])
def test_every_strategy_runs_on_a_4bit_generator_and_records_its_weight_bytes(nf4_exp, key):
    """QLoRA for every strategy: the copies it trains keep the 4-bit base as loaded while their adapters move, and
    the run records the generator's quantisation (tag) and its base weights' measured bytes (cost metric)."""
    from distrag.models.quantization import base_tensors, base_weight_bytes, is_quantized

    def base(gen):  # names without peft's wrapping (base_model.model. ... .base_layer)
        return {n.removeprefix("base_model.model.").replace(".base_layer.", "."): t.clone()
                for n, _, t in base_tensors(gen.model)}

    loaded = base(nf4_exp.generator)
    cfg = _cfg(nf4_exp, key)
    models = nf4_exp.train(cfg)
    assert is_quantized(models.generator.model)
    trained = base(models.generator)
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in loaded)
    lora_b = [p for n, p in models.generator.model.named_parameters() if "lora_B" in n]
    assert bool(lora_b) is BY_KEY[key].trains_generator
    assert all((p != 0).any() for p in lora_b), "a LoRA B matrix did not move"
    rec = _Recorder()
    res = nf4_exp.evaluate(cfg, models, rec, split="test", t0=time.perf_counter())
    assert rec.tags[mn.TAG_GENERATOR_QUANTIZATION] == "nf4"
    measured = base_weight_bytes(nf4_exp.generator.model).total
    assert res.costs[mn.COST_GENERATOR_WEIGHTS_GB] * 1e9 == pytest.approx(measured)
    assert rec.metrics[mn.COST_GENERATOR_WEIGHTS_GB] == res.costs[mn.COST_GENERATOR_WEIGHTS_GB]
    assert res.metrics["n_questions"] == 4
    if key in ("gen_ft", "joint_token"):  # its bundle answers as evaluated: the 4-bit base loaded again + adapter
        import json

        from distrag.serving.loader import load_bundle
        from distrag.serving.predict import answer

        bundle = load_bundle(res.bundle, device="cpu")
        assert is_quantized(bundle.generator.model) and bundle.cfg.generator.quantization == "nf4"
        recorded = [json.loads(x)["prediction"] for x in rec.texts["predictions_test.jsonl"].splitlines()]
        assert [p.answer for p in answer(bundle, nf4_exp.splits.test[:4])] == recorded


def test_a_full_precision_run_records_its_weight_bytes_too(exp):
    rec = _Recorder()
    res = exp.evaluate(_cfg(exp, "none"), exp.base_models(), rec, split="test", t0=time.perf_counter())
    assert rec.tags[mn.TAG_GENERATOR_QUANTIZATION] == "none"
    params = exp.generator.num_parameters()  # float32 on the CPU; the tied head shares the embeddings' bytes
    assert res.costs[mn.COST_GENERATOR_WEIGHTS_GB] * 1e9 == pytest.approx(4 * params, rel=0.02)


def test_a_corpus_read_from_disk_gives_the_in_memory_results(tmp_path, tiny_encoder_dir, tiny_lm_dir):
    """The same JSONL data with data.corpus_on_disk false and true: the same retrieval, training losses (Ft-Gen,
    Ft-Embed, RAG-Token: passages by row, gold rows by id) and evaluation (EM, F1, retrieved ids, answers), while
    the on-disk run holds a DiskCorpus whose side files are in its output_dir."""
    import json

    import numpy as np

    from distrag.config import SyntheticConfig
    from distrag.data.disk_corpus import DiskCorpus
    from distrag.data.records import Corpus
    from distrag.data.synthetic import make_synthetic
    from distrag.retrieval.pipeline import RAGPipeline

    world = make_synthetic(SyntheticConfig(n_entities=8, n_single_hop=12, n_two_hop=4))
    corpus_file, questions_file = tmp_path / "corpus.jsonl", tmp_path / "questions.jsonl"
    corpus_file.write_text("".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n"
                                   for p in world.corpus))
    questions_file.write_text("".join(json.dumps({"id": q.id, "question": q.text, "answers": list(q.answers),
                                                  "gold_passage_ids": list(q.gold_passage_ids)}) + "\n"
                                      for q in world.questions))

    def experiment(on_disk: bool) -> Experiment:
        cfg = build_config({
            "data": {"format": "jsonl", "path": str(questions_file), "corpus_path": str(corpus_file),
                     "corpus_on_disk": on_disk, "test_fraction": 0.3},
            "embedder": {"model": str(tiny_encoder_dir), "max_length": 64},
            "generator": {"model": str(tiny_lm_dir), "max_new_tokens": 3, "max_passage_chars": 80},
            "retrieval": {"top_k": 3}, "index": {"device": "cpu", "chunk_passages": 5},  # 4 chunks of the 18 passages
            "train": {"max_steps": 2, "batch_size": 2, "micro_batch_size": 2, "train_k": 2},
            "tracking": {"enabled": False}, "output_dir": str(tmp_path / f"runs_{on_disk}"),
        })
        return Experiment(cfg, show_progress=False).setup()

    mem, disk = experiment(False), experiment(True)
    assert type(mem.splits.corpus) is Corpus and isinstance(disk.splits.corpus, DiskCorpus)
    assert disk.splits.corpus.folder.parent == tmp_path / "runs_True" / "corpus"
    assert [q.id for q in disk.splits.test] == [q.id for q in mem.splits.test]
    ids = np.arange(len(mem.splits.corpus))
    np.testing.assert_allclose(disk.index.reconstruct(ids), mem.index.reconstruct(ids), atol=1e-5)
    for key in ("gen_ft", "embed_ft", "joint_token"):
        a, b = mem.train(_cfg(mem, key)), disk.train(_cfg(disk, key))
        assert [h["loss"] for h in b.history] == pytest.approx([h["loss"] for h in a.history], rel=1e-4), key
        res_a = mem.evaluate(_cfg(mem, key), a, NullTracker(), split="test", t0=time.perf_counter())
        res_b = disk.evaluate(_cfg(disk, key), b, NullTracker(), split="test", t0=time.perf_counter())
        for metric in ("em", "f1", "recall_at_3", "answer_recall_at_3", "n_questions"):
            assert res_b.metrics[metric] == res_a.metrics[metric], (key, metric)
    questions = mem.splits.test
    pipe_a = RAGPipeline(mem.cfg, mem.splits.corpus, mem.embedder, mem.generator, mem.index)
    pipe_b = RAGPipeline(disk.cfg, disk.splits.corpus, disk.embedder, disk.generator, disk.index)
    ra, rb = pipe_a.evaluate(questions, show_progress=False), pipe_b.evaluate(questions, show_progress=False)
    assert rb.retrieved == ra.retrieved and rb.predictions == ra.predictions and rb.metrics == ra.metrics
