"""DistributedTrainer's hooks in one process (the multi-process runs are in test_runner.py): each trainer's
slice of the global batch, data-parallel encoder training with checkpoints, and the charge for each index
version adopted."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from distrag.config import build_config
from distrag.costs.accountant import Accountant
from distrag.costs.ledger import CostLedger
from distrag.data.synthetic import make_synthetic
from distrag.distributed import roles
from distrag.distributed.checkpoint import CheckpointManager, list_complete
from distrag.distributed.deepspeed_trainer import DistributedTrainer
from distrag.models.embedder import Embedder
from distrag.models.generator import Generator
from distrag.retrieval import index_store
from distrag.retrieval.corpus_encoding import CorpusEncoder, encode_corpus
from distrag.retrieval.sharded_index import ShardedIndex
from distrag.training.trainer import batch_indices

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("n_trainers", [1, 2, 3])
def test_trainers_take_disjoint_slices_of_one_global_batch(n_trainers):
    cfg = build_config(overrides=["train.batch_size=4", "train.micro_batch_size=2", "train.seed=3"])
    questions = list(range(50))
    for step in (0, 7):
        slices = [DistributedTrainer.step_questions(
            SimpleNamespace(cfg=cfg, questions=questions, stream=lambda i: i, ctx=SimpleNamespace(
                info=SimpleNamespace(trainer_rank=r, n_trainers=n_trainers))), 1, step) for r in range(n_trainers)]
        assert all(len(s) == 4 for s in slices)
        assert sum(slices, []) == batch_indices(50, 4 * n_trainers, 3 + 1, step)


def test_one_trainer_trains_the_encoder_checkpoints_and_charges_adopted_versions(tmp_path, clean_env,
                                                                                 tiny_encoder_dir, tiny_lm_dir):
    cfg = build_config({
        "data": {"synthetic": {"n_entities": 8, "n_single_hop": 12, "n_two_hop": 4}},
        "embedder": {"model": str(tiny_encoder_dir), "max_length": 64},
        "generator": {"model": str(tiny_lm_dir)}, "index": {"device": "cpu"},
        "train": {"strategy": "embed_ft", "max_steps": 2, "batch_size": 2, "micro_batch_size": 2},
        "distributed": {"checkpoint_every": 1}, "tracking": {"enabled": False}, "output_dir": str(tmp_path),
    })
    data = make_synthetic(cfg.data.synthetic)
    embedder, generator = Embedder.from_config(cfg.embedder), Generator.from_config(cfg.generator)
    vectors = encode_corpus(embedder, data.corpus)
    index = ShardedIndex.from_config(vectors.shape[1], cfg.index).build(vectors)
    ctx = roles.init_roles(cfg.distributed)
    ledger = CostLedger()
    trainer = DistributedTrainer(cfg, data.corpus, data.questions, embedder, generator, index, Accountant(ledger),
                                 show_progress=False, ctx=ctx, ckpt=CheckpointManager(tmp_path / "ckpt", keep=2,
                                                                                      ctx=ctx))
    before = {k: v.clone() for k, v in embedder.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in embedder.state_dict().items())
    assert [p.name for p in list_complete(tmp_path / "ckpt")] == ["step_00000001", "step_00000002"]
    assert ledger.flops("train") > 0 and trainer.engine is None  # no DeepSpeed engine: the generator is frozen

    # adopting a published version loads it and charges the index rank's corpus encoding once per version
    path = index_store.publish(index, tmp_path / "versions", 1)
    one_pass = CorpusEncoder(embedder, data.corpus.texts()).cost
    f0, p0 = ledger.flops("encode_passages"), ledger.passages
    trainer._load_index(str(path))
    trainer._load_index(str(path))
    assert ledger.flops("encode_passages") - f0 == pytest.approx(2 * one_pass.flops)
    assert ledger.passages - p0 == 2 * len(data.corpus)
    assert trainer.index_path == str(path) and len(trainer.index) == len(data.corpus)


def test_a_corpus_pass_of_an_on_disk_corpus_is_counted_chunk_by_chunk_or_taken_from_the_index(
        tmp_path, clean_env, tiny_encoder_dir, tiny_lm_dir):
    # the index rank streams an on-disk corpus in chunks of index.chunk_passages: trainer 0 charges that pass,
    # read from the frozen index's record when it was made the same way (no tokenizing of 21M passages)
    from distrag.data.disk_corpus import DiskCorpus
    from distrag.retrieval.corpus_encoding import build_index

    cfg = build_config({
        "data": {"synthetic": {"n_entities": 8, "n_single_hop": 12, "n_two_hop": 4}},
        "embedder": {"model": str(tiny_encoder_dir), "max_length": 64},
        "generator": {"model": str(tiny_lm_dir)}, "index": {"device": "cpu", "chunk_passages": 9},
        "train": {"strategy": "embed_ft", "max_steps": 1, "batch_size": 2, "micro_batch_size": 2},
        "tracking": {"enabled": False}, "output_dir": str(tmp_path),
    })
    data = make_synthetic(cfg.data.synthetic)
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n" for p in data.corpus))
    disk = DiskCorpus.open(path, tmp_path / "corpus")
    embedder, generator = Embedder.from_config(cfg.embedder), Generator.from_config(cfg.generator)
    chunked = sum(CorpusEncoder(embedder, data.corpus.texts()[lo:lo + 9]).cost.flops
                  for lo in range(0, len(disk), 9))
    ctx = roles.init_roles(cfg.distributed)
    ckpt = CheckpointManager(tmp_path / "ckpt", keep=1, ctx=ctx)

    def trainer(index):
        return DistributedTrainer(cfg, disk, data.questions, embedder, generator, index, Accountant(CostLedger()),
                                  show_progress=False, ctx=ctx, ckpt=ckpt)

    built = build_index(embedder, disk, cfg.index)
    plain = ShardedIndex.from_config(embedder.dim, cfg.index).build(encode_corpus(embedder, data.corpus))
    assert trainer(plain).corpus_pass_flops() == pytest.approx(chunked)  # counted, chunk by chunk
    clean_env.setattr(embedder, "tokenize_unpadded", lambda *a: pytest.fail("tokenized the corpus to count it"))
    assert trainer(built).corpus_pass_flops() == pytest.approx(chunked)  # the frozen index's record


# ----------------------------------------------------------------------------------------------
# MNRL's negatives across trainers (issue 17): 2 trainers x 4 questions equal one process with the 8


def _single_process_reference(args):
    """Loss, encoder gradients, question ids and ledger of the first step of one process over the same 8 questions."""
    from _dist_workers import mnrl_first_step, mnrl_gather_cfg, mnrl_gather_trainer

    from distrag.training.trainer import Trainer

    tr = mnrl_gather_trainer(mnrl_gather_cfg(args, trainers=1), Trainer)
    loss, ids = mnrl_first_step(tr)
    grads = {n: p.grad for n, p in tr.embedder.named_parameters() if p.grad is not None}
    return loss, grads, ids, tr.acc.ledger.flops("train")


@pytest.mark.timeout(420)  # two 2-process jobs and a reference, on shared CPUs
@pytest.mark.parametrize("sides", ["both", "question"])
def test_mnrl_with_gathered_negatives_on_two_trainers_equals_one_process(tmp_path, clean_env, tiny_encoder_dir,
                                                                        tiny_lm_dir, sides):
    from _dist_workers import Job

    runs = {}
    for gather in ("auto", False):
        args = {"out": str(tmp_path / str(gather)), "encoder": str(tiny_encoder_dir), "lm": str(tiny_lm_dir),
                "hard_negatives": 1, "gather": gather, "sides": sides}
        job = Job("mnrl_gather", args, 2, tmp_path / str(gather))
        assert job.wait(170) == [0, 0], job.output()
        res = [job.result(r) for r in range(2)]
        grads = [torch.load(tmp_path / str(gather) / f"grads_{r}.pt") for r in range(2)]
        runs[gather] = (res, grads)
    loss, ref_grads, ids, flops = _single_process_reference({**args, "out": str(tmp_path / "ref")})

    res, grads = runs["auto"]
    assert [r["gathers"] for r in res] == [True, True]
    assert res[0]["ids"] + res[1]["ids"] == ids  # the trainers' slices are the single process's batch
    # the global batch's mean loss, and after the trainers' all-reduce (mean) the same encoder gradients
    assert (res[0]["loss"] + res[1]["loss"]) / 2 == pytest.approx(loss, abs=1e-5)
    for r in range(2):
        assert grads[r].keys() == ref_grads.keys()
        for name, g in grads[r].items():
            torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-5, msg=f"trainer {r}: {name}")
    # each trainer charges its own questions and candidates: together what the one process charged, up to padding
    assert sum(r["train_flops"] for r in res) == pytest.approx(flops, rel=0.15)
    # the loop with gathering runs to its end and keeps the trainers' encoders identical
    assert all(r["moved"] > 0 and len(r["history"]) == 2 for r in res)
    assert res[0]["checksum"] == res[1]["checksum"]

    # switched off, each trainer's questions see only their own trainer's candidates: a different (easier) loss
    res_off, grads_off = runs[False]
    assert [r["gathers"] for r in res_off] == [False, False]
    assert (res_off[0]["loss"] + res_off[1]["loss"]) / 2 < loss - 1e-3
    assert max((grads_off[0][n] - ref_grads[n]).abs().max() for n in ref_grads) > 1e-4


class _OneVersion:
    """An index client that adopts the version at ``path`` (built from the weights of step 0) at the first poll."""

    def __init__(self, path: str):
        from distrag.distributed.refresh_client import RefreshStats

        self.path, self.current, self.stats = path, None, RefreshStats()

    def poll(self, step, load_fn=None):
        from distrag.distributed.refresh_client import AdoptDecision

        if self.current is not None:
            return None
        load_fn(self.path)
        self.current = AdoptDecision(1, self.path, weights_step=0, step=step, staleness=step)
        return self.current


def test_trainer_0_logs_what_staleness_costs_at_an_adoption(tmp_path, clean_env, tiny_encoder_dir, tiny_lm_dir):
    """At the adoption of a version built from the base encoder while the trainer's encoder has moved, trainer 0
    scores the probe against the adopted version and the one it replaces and logs the gaps at that step, with
    the probe's seconds; its encodings are charged in the staleness_probe phase."""
    from distrag import metric_names as mn
    from distrag.retrieval.staleness_probe import StalenessProbe
    from distrag.strategies import strategy_of

    cfg = build_config({
        "data": {"synthetic": {"n_entities": 30, "n_single_hop": 40, "n_two_hop": 10}},
        "embedder": {"model": str(tiny_encoder_dir), "max_length": 48}, "generator": {"model": str(tiny_lm_dir)},
        "index": {"device": "cpu"}, "retrieval": {"top_k": 3},
        "train": {"strategy": "embed_ft", "max_steps": 2, "batch_size": 2, "micro_batch_size": 2},
        "tracking": {"enabled": False}, "output_dir": str(tmp_path)})
    data = make_synthetic(cfg.data.synthetic)
    embedder, generator = Embedder.from_config(cfg.embedder), Generator.from_config(cfg.generator)
    vectors = encode_corpus(embedder, data.corpus)
    base_index = ShardedIndex.from_config(vectors.shape[1], cfg.index).build(vectors)
    path = index_store.publish(base_index, tmp_path / "versions", 1)
    with torch.no_grad():  # the trainer's encoder has moved away from the weights the versions were built from
        for p in embedder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ctx = roles.init_roles(cfg.distributed)
    ledger, logged = CostLedger(), []
    probe = StalenessProbe(data.questions[:16], data.corpus, 3)
    trainer = DistributedTrainer(cfg, data.corpus, data.questions, embedder, generator, base_index,
                                 Accountant(ledger), show_progress=False, ctx=ctx,
                                 ckpt=CheckpointManager(tmp_path / "ckpt", ctx=ctx), client=_OneVersion(str(path)),
                                 probe=probe, on_metrics=lambda m, s: logged.append((s, m)))
    trainer.state.global_step = 5
    with ledger.phase("train"):
        trainer.on_step_start(strategy_of(cfg).phases()[0])
        trainer.on_step_start(strategy_of(cfg).phases()[0])  # no adoption: no probe
    probes = [(s, m) for s, m in logged if mn.INDEX_STALENESS_RECALL_GAP in m]
    assert len(probes) == 1 and probes[0][0] == 5
    m = probes[0][1]
    assert m[mn.INDEX_STALENESS_RECALL_GAP] == pytest.approx(m[mn.INDEX_STALENESS_RECALL_FRESH]
                                                             - m[mn.INDEX_STALENESS_RECALL_STALE])
    assert m[mn.INDEX_STALENESS_RECALL_GAP] != 0.0  # the encoder moved: fresh and stale recall differ
    assert m[mn.INDEX_RETIRING_STALENESS] == 5 and m[mn.INDEX_STALENESS_PROBE_S] > 0
    (gap, retiring, seconds), = trainer.client.stats.probes
    assert gap == m[mn.INDEX_STALENESS_RECALL_GAP] and seconds == m[mn.INDEX_STALENESS_PROBE_S]
    assert retiring == gap  # both versions are the base encoder's index
    assert ledger.phase_totals(mn.PHASE_STALENESS_PROBE)["flops"] > 0
    summary = trainer.client.stats.summary(10.0)
    assert summary["gap_mean"] == gap and summary["probe_s"] == seconds
