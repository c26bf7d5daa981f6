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
