"""Behaviour of the fine-tuning strategies on tiny random models and a tiny synthetic world.

What each strategy may and may not touch (base generator weights never; LoRA only when the generator
trains; the question encoder only when the retriever trains; the index only on refresh), that the RAG
loss really reaches the retriever, the data-order contract of ``batch_indices``, micro-batch x
accumulation equivalence, and index refresh (versions, correctness, cost).
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from distrag.config import SyntheticConfig, build_config
from distrag.costs.accountant import Accountant
from distrag.costs.ledger import CostLedger
from distrag.data.records import Question
from distrag.data.synthetic import make_synthetic
from distrag.errors import StrategyError
from distrag.models.embedder import Embedder
from distrag.models.generator import Generator
from distrag.retrieval.sharded_index import ShardedIndex
from distrag.strategies import phases_for
from distrag.training.trainer import Trainer, batch_indices, epoch_order

pytestmark = pytest.mark.timeout(180)


# ----------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def world(tiny_encoder_dir, tiny_lm_dir):
    """Data, base models and the frozen index, built once; tests train deep copies."""
    torch.set_num_threads(1)
    data = make_synthetic(SyntheticConfig(n_entities=8, n_single_hop=16, n_two_hop=8))
    cfg = make_cfg(tiny_encoder_dir, tiny_lm_dir)
    embedder = Embedder.from_config(cfg.embedder, device="cpu")
    embedder.eval()
    generator = Generator.from_config(cfg.generator, device="cpu")
    vecs = embedder.encode(data.corpus.texts())
    index = ShardedIndex.from_config(vecs.shape[1], cfg.index).build(vecs)
    return {"data": data, "embedder": embedder, "generator": generator, "index": index,
            "dirs": (tiny_encoder_dir, tiny_lm_dir)}


def make_cfg(enc_dir, lm_dir, **train):
    t = {"max_steps": 2, "batch_size": 4, "micro_batch_size": 2, "train_k": 2, "lr_embedder": 1e-3,
         "lr_generator": 1e-3, **train}
    return build_config({
        "embedder": {"model": str(enc_dir), "max_length": 64},
        "generator": {"model": str(lm_dir), "max_passage_chars": 80, "max_new_tokens": 4,
                      "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "retrieval": {"top_k": 2},
        "index": {"device": "cpu"},
        "tracking": {"enabled": False},
        "train": t,
    })


def cfg_for(world, **train):
    return make_cfg(*world["dirs"], **train)


def trainer_for(world, cfg, *, questions=None, phases=None, embedder=None, generator=None, ledger=None,
                cls=Trainer, add_lora=True):
    """A Trainer on fresh copies of the base models (LoRA added up front so its weights can be snapshot)."""
    embedder = embedder or copy.deepcopy(world["embedder"])
    if generator is None:
        generator = copy.deepcopy(world["generator"])
        if add_lora:
            generator.add_lora(cfg.generator.lora)
    qs = world["data"].questions if questions is None else questions
    return cls(cfg, world["data"].corpus, qs, embedder, generator, world["index"],
               Accountant(ledger if ledger is not None else CostLedger()), show_progress=False, phases=phases)


def snap(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, cloned."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def lora_keys(state: dict) -> set[str]:
    return {k for k in state if "lora_" in k}


def lora_b_keys(state: dict) -> set[str]:
    return {k for k in state if "lora_B" in k}


class Snapshot:
    """Parameters of the embedder, the generator (base and LoRA) and the index's stored vectors."""

    def __init__(self, tr: Trainer):
        self.emb = snap(tr.embedder)
        self.gen = snap(tr.generator.model)
        self.index = tr.index
        self.index_vecs = tr.index.reconstruct(np.arange(len(tr.index)))
        self.version = tr.state.index_version

    def diff(self, later: Snapshot) -> dict[str, set[str]]:
        gen = changed(self.gen, later.gen)
        return {"embedder": changed(self.emb, later.emb), "lora": gen & lora_keys(self.gen),
                "base": gen - lora_keys(self.gen)}


def assert_retriever_untouched(before: Snapshot, after: Snapshot, d: dict) -> None:
    assert d["embedder"] == set(), f"embedder changed: {sorted(d['embedder'])[:5]}"
    assert after.index is before.index and after.version == before.version
    np.testing.assert_array_equal(after.index_vecs, before.index_vecs)


def assert_lora_trained(before: Snapshot, after: Snapshot, d: dict) -> None:
    assert d["lora"], "no LoRA weight changed"
    for k in lora_b_keys(after.gen):
        assert after.gen[k].abs().max() > 0, f"{k} is still zero: LoRA trained nothing"
    # LoRA B starts at zero (so the adapted model equals the base model before training)
    assert all(before.gen[k].abs().max() == 0 for k in lora_b_keys(before.gen))


def trainable_encoder_keys(embedder) -> set[str]:
    return {k for k, _ in embedder.named_parameters() if ".pooler." not in f".{k}"}


# ----------------------------------------------------------------------------------------------
# which parameters change


@pytest.mark.parametrize("strategy", ["gen_ft", "embed_ft", "joint", "independent"])
def test_what_each_strategy_trains(world, strategy):
    cfg = cfg_for(world, strategy=strategy)
    tr = trainer_for(world, cfg)
    before = Snapshot(tr)
    tr.train()
    after = Snapshot(tr)
    d = before.diff(after)
    assert d["base"] == set(), f"base generator weights changed: {sorted(d['base'])[:5]}"
    trains_gen = strategy in ("gen_ft", "joint", "independent")
    trains_emb = strategy in ("embed_ft", "joint", "independent")
    if trains_gen:
        assert_lora_trained(before, after, d)
    else:
        assert d["lora"] == set()
    if trains_emb:
        # the whole question encoder trains (the unused BERT pooler head excepted)
        assert d["embedder"], "the question encoder did not change"
        assert not any(".pooler." in f".{k}" for k in d["embedder"])
        assert {k for k in d["embedder"] if "encoder.layer.1." in k}
    else:
        assert_retriever_untouched(before, after, d)
    # without refresh the index is never rebuilt, whatever trains
    assert tr.index is world["index"] and tr.state.index_version == 0
    # the loop leaves everything frozen and in eval mode
    assert not any(p.requires_grad for p in tr.embedder.parameters())
    assert not any(p.requires_grad for p in tr.generator.model.parameters())
    assert not tr.embedder.training and not tr.generator.model.training
    n_phases = 2 if strategy == "independent" else 1
    assert len(tr.state.history) == n_phases * cfg.train.max_steps
    assert all(np.isfinite(h["loss"]) for h in tr.state.history)


@pytest.mark.parametrize("order", ["generator_first", "retriever_first"])
def test_two_phase_trains_one_component_per_phase(world, order):
    cfg = cfg_for(world, strategy="two_phase", two_phase_order=order, rag_loss="sequence")
    phases = phases_for(cfg)
    assert [p.train_generator for p in phases] == ([True, False] if order == "generator_first" else [False, True])
    assert all(p.uses_rag for p in phases)
    embedder = copy.deepcopy(world["embedder"])
    generator = copy.deepcopy(world["generator"])
    generator.add_lora(cfg.generator.lora)
    for phase in phases:  # one phase at a time, continuing on the same models
        tr_n = trainer_for(world, cfg, phases=[phase], embedder=embedder, generator=generator)
        before = Snapshot(tr_n)
        tr_n.train()
        after = Snapshot(tr_n)
        d = before.diff(after)
        assert d["base"] == set()
        if phase.train_generator:  # two_phase_generator: RAG loss, retriever frozen
            assert phase.name == "two_phase_generator"
            assert_lora_trained(before, after, d)
            assert_retriever_untouched(before, after, d)
        else:  # two_phase_retriever: RAG loss, generator frozen
            assert phase.name == "two_phase_retriever"
            assert d["embedder"] and d["lora"] == set()


def test_trainer_adds_lora_itself_and_never_touches_base_weights(world):
    cfg = cfg_for(world, strategy="gen_ft", max_steps=1)
    gen = copy.deepcopy(world["generator"])
    base = snap(gen.model)
    tr = trainer_for(world, cfg, generator=gen)
    assert gen.is_peft  # the Trainer wrapped it
    tr.train()
    after = {}
    for k, v in gen.model.state_dict().items():
        if "lora_" in k:
            continue
        name = k.removeprefix("base_model.model.").replace(".base_layer.", ".")
        after[name] = v
    assert after.keys() == base.keys()
    assert changed(base, after) == set()
    assert all(gen.model.state_dict()[k].abs().max() > 0 for k in lora_b_keys(gen.model.state_dict()))


def test_no_lora_is_added_when_the_generator_never_trains(world):
    cfg = cfg_for(world, strategy="embed_ft", max_steps=1)
    gen = copy.deepcopy(world["generator"])
    trainer_for(world, cfg, generator=gen)
    assert not gen.is_peft


# ----------------------------------------------------------------------------------------------
# gradients


def _one_backward(world, cfg, phase_index=0):
    tr = trainer_for(world, cfg)
    phase = tr.phases[phase_index]
    tr.make_optimizers(phase, 1)
    loss, stats = tr.compute_loss(phase, world["data"].questions[:3], random.Random(0))
    assert torch.isfinite(loss) and loss.requires_grad
    tr.backward(loss)
    return tr, phase, stats


@pytest.mark.parametrize("rag_loss", ["sequence", "token"])
def test_joint_gradients_reach_the_retriever(world, rag_loss):
    tr, phase, stats = _one_backward(world, cfg_for(world, strategy="joint", rag_loss=rag_loss))
    assert phase.train_embedder and phase.train_generator and phase.loss == f"rag_{rag_loss}"
    assert 0.0 < stats["p_top1"] <= 1.0
    emb_grads = {k: p.grad for k, p in tr.embedder.named_parameters() if p.requires_grad}
    assert emb_grads.keys() == trainable_encoder_keys(tr.embedder)
    nonzero = {k for k, g in emb_grads.items() if g is not None and g.abs().max() > 0}
    assert "model.embeddings.word_embeddings.weight" in nonzero
    assert any("encoder.layer.0." in k for k in nonzero) and any("encoder.layer.1." in k for k in nonzero)
    # LoRA B receives gradient too; base weights get none
    named = dict(tr.generator.model.named_parameters())
    assert any(named[k].grad is not None and named[k].grad.abs().max() > 0 for k in named if "lora_B" in k)
    assert all(p.grad is None for k, p in named.items() if "lora_" not in k)


def test_score_scale_sharpens_p_z_given_q_and_the_retrievers_gradient(world):
    """p(z|q) = softmax(scale x cosine): at scale 1 it is nearly uniform over the top-k and the retriever
    learns almost nothing; the default scale (MNRL's 20) makes both move."""
    stats, grads = {}, {}
    for scale in (1.0, 20.0):
        cfg = cfg_for(world, strategy="two_phase", train_k=2)
        cfg.retrieval.score_scale = scale
        tr, phase, stats[scale] = _one_backward(world, cfg, phase_index=1)  # retriever phase: RAG loss only
        grads[scale] = sum(float(p.grad.norm()) ** 2 for p in tr.embedder.parameters() if p.grad is not None) ** 0.5
    assert build_config().retrieval.score_scale == 20.0
    assert stats[1.0]["p_top1"] < stats[20.0]["p_top1"]
    assert stats[1.0]["p_top1"] == pytest.approx(0.5, abs=0.05)  # k = 2: uniform is 0.5
    assert grads[20.0] > 5 * grads[1.0] > 0


def test_two_phase_phases_send_gradient_to_one_side_only(world):
    cfg = cfg_for(world, strategy="two_phase")
    tr, phase, _ = _one_backward(world, cfg, 0)  # generator phase
    assert phase.name == "two_phase_generator"
    assert all(p.grad is None for p in tr.embedder.parameters())
    tr, phase, _ = _one_backward(world, cfg, 1)  # retriever phase
    assert phase.name == "two_phase_retriever"
    assert all(p.grad is None for p in tr.generator.model.parameters())
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in tr.embedder.parameters())


# ----------------------------------------------------------------------------------------------
# data requirements


def _unlabelled(questions: list[Question]) -> list[Question]:
    return [Question(q.id, q.text, q.answers, None) for q in questions]


@pytest.mark.parametrize("strategy", ["embed_ft", "independent"])
def test_mnrl_without_context_labels_suggests_joint_or_two_phase(world, strategy):
    cfg = cfg_for(world, strategy=strategy)
    qs = world["data"].questions
    partly = [qs[0], *_unlabelled(qs[1:])]
    gen = copy.deepcopy(world["generator"])
    with pytest.raises(StrategyError) as err:
        trainer_for(world, cfg, questions=partly, generator=gen)
    msg = str(err.value)
    assert "train.strategy=joint" in msg and "train.strategy=two_phase" in msg
    assert f"{len(qs) - 1} of {len(qs)}" in msg and strategy in msg
    assert not gen.is_peft  # refused before anything was set up


@pytest.mark.parametrize("strategy", ["gen_ft", "joint", "two_phase"])
def test_strategies_without_mnrl_accept_unlabelled_data(world, strategy):
    cfg = cfg_for(world, strategy=strategy, max_steps=1)
    tr = trainer_for(world, cfg, questions=_unlabelled(world["data"].questions))
    tr.train()
    assert len(tr.state.history) == len(tr.phases)


def test_unknown_strategy_is_a_strategy_error(world):
    cfg = cfg_for(world)
    object.__setattr__(cfg.train, "strategy", "bogus")  # bypass validation on purpose
    with pytest.raises(StrategyError, match="bogus"):
        phases_for(cfg)


# ----------------------------------------------------------------------------------------------
# data order


def test_batch_indices_is_deterministic_and_covers_each_question_once_per_epoch():
    n, batch, seed = 10, 4, 3
    steps = 15  # 60 indices = 6 epochs; batches straddle epoch boundaries (10 is not a multiple of 4)
    flat = [i for s in range(steps) for i in batch_indices(n, batch, seed, s)]
    assert flat == [i for s in range(steps) for i in batch_indices(n, batch, seed, s)]
    assert all(len(batch_indices(n, batch, seed, s)) == batch for s in range(steps))
    for e in range(len(flat) // n):
        epoch = flat[e * n:(e + 1) * n]
        assert sorted(epoch) == list(range(n)), f"epoch {e} is not a permutation"
        assert epoch == epoch_order(n, seed, e)
    # epochs are reshuffled and seeds matter
    assert flat[:n] != flat[n:2 * n]
    assert batch_indices(n, batch, seed, 0) != batch_indices(n, batch, seed + 1, 0) or \
        batch_indices(n, batch, seed, 1) != batch_indices(n, batch, seed + 1, 1)


def test_any_steps_batch_is_computable_without_replaying_the_loop():
    n, batch, seed = 7, 3, 0
    stream = [i for e in range(20) for i in epoch_order(n, seed, e)]
    for step in (0, 1, 2, 5, 17, 40):  # computed directly, out of order, without earlier steps
        assert batch_indices(n, batch, seed, step) == stream[step * batch:(step + 1) * batch]
    # batch larger than the data: wraps over several epochs
    assert batch_indices(3, 7, 1, 0) == [i for e in range(3) for i in epoch_order(3, 1, e)][:7]


def test_training_follows_batch_indices(world):
    """The loop's batches are exactly batch_indices (what makes resume exact)."""
    seen: list[str] = []

    class Recording(Trainer):
        def compute_loss(self, phase, questions, rng):
            seen.extend(q.id for q in questions)
            return super().compute_loss(phase, questions, rng)

    cfg = cfg_for(world, strategy="gen_ft", max_steps=3)
    tr = trainer_for(world, cfg, cls=Recording)
    tr.train()
    qs = world["data"].questions
    want = [qs[i].id for s in range(3) for i in batch_indices(len(qs), 4, cfg.train.seed, s)]
    assert seen == want


# ----------------------------------------------------------------------------------------------
# micro-batch x accumulation equivalence


class GradCapture(Trainer):
    """Records the accumulated gradients just before each optimizer step."""

    def optimizer_step(self):
        self.grads = [p.grad.detach().clone() if p.grad is not None else None for p in self.params]
        return super().optimizer_step()


def test_micro_batching_matches_one_big_batch_for_gen_ft(world):
    results = []
    for micro in (4, 2, 1):
        cfg = cfg_for(world, strategy="gen_ft", max_steps=1, batch_size=4, micro_batch_size=micro)
        torch.manual_seed(0)
        gen = copy.deepcopy(world["generator"])
        gen.add_lora(cfg.generator.lora)  # identical LoRA init in every run
        tr = trainer_for(world, cfg, generator=gen, cls=GradCapture)
        tr.train()
        results.append((tr, lora_keys(snap(gen.model))))
    (ref, keys), *others = results
    ref_state = snap(ref.generator.model)
    for tr, _ in others:
        assert len(tr.grads) == len(ref.grads)
        for g_ref, g in zip(ref.grads, tr.grads):
            assert (g_ref is None) == (g is None)
            if g is not None:
                torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7)
        state = snap(tr.generator.model)
        for k in keys:
            torch.testing.assert_close(state[k], ref_state[k], rtol=1e-4, atol=1e-6)
        assert tr.state.history[0]["loss"] == pytest.approx(ref.state.history[0]["loss"], rel=1e-5)
        assert tr.state.history[0]["grad_norm"] == pytest.approx(ref.state.history[0]["grad_norm"], rel=1e-4)


# ----------------------------------------------------------------------------------------------
# index refresh


class CheckedRefresh(Trainer):
    """After every refresh: the new index must equal a brute-force search with the encoder of that moment."""

    checks = 0

    def refresh_index(self):
        super().refresh_index()
        texts = self.corpus.texts()
        vecs = self.embedder.encode(texts)
        np.testing.assert_allclose(self.index.reconstruct(np.arange(len(texts))), vecs, atol=1e-5)
        q = self.embedder.encode([q.text for q in self.questions])
        res = self.index.search(q, 3)
        brute = np.argsort(-(q @ vecs.T), axis=1, kind="stable")[:, :3]
        np.testing.assert_allclose(res.scores, np.take_along_axis(q @ vecs.T, brute, axis=1), atol=1e-5)
        assert (res.ids == brute).mean() > 0.95  # equal up to exact ties
        assert self.state.index_weights_step == self.state.global_step
        type(self).checks += 1


def test_refresh_rebuilds_the_index_with_the_current_encoder(world):
    base_ledger = CostLedger()
    Accountant(base_ledger).encode_texts(world["embedder"], world["data"].corpus.texts(), category="encode_passages")
    one_pass = base_ledger.flops("encode_passages")
    assert one_pass > 0

    cfg = cfg_for(world, strategy="joint", max_steps=3, refresh_every=1)
    ledger = CostLedger()
    CheckedRefresh.checks = 0
    tr = trainer_for(world, cfg, ledger=ledger, cls=CheckedRefresh)
    tr.train()
    # refreshed after steps 1 and 2 (not after the last step: that index would serve no training step)
    assert tr.state.index_version == 2 == CheckedRefresh.checks
    assert tr.index is not world["index"]
    assert ledger.flops("encode_passages") == pytest.approx(2 * one_pass)
    assert ledger.passages == 2 * len(world["data"].corpus)
    # the frozen base index is untouched
    np.testing.assert_allclose(world["index"].reconstruct(np.arange(len(world["index"]))),
                               world["embedder"].encode(world["data"].corpus.texts()), atol=1e-5)


def test_no_refresh_by_default_and_none_for_frozen_retrievers(world):
    for strategy, refresh in (("joint", 0), ("gen_ft", 1)):
        cfg = cfg_for(world, strategy=strategy, max_steps=2, refresh_every=refresh)
        ledger = CostLedger()
        tr = trainer_for(world, cfg, ledger=ledger)
        tr.train()
        assert tr.state.index_version == 0 and tr.index is world["index"]
        assert ledger.flops("encode_passages") == 0


# ----------------------------------------------------------------------------------------------
# memory levers: checkpointed pair chunks and gradient checkpointing are exact


def _rag_grads(world, cfg, generator):
    """Loss and every gradient (LoRA, question encoder) of one joint micro-batch."""
    generator = copy.deepcopy(generator)
    generator.cfg = cfg.generator  # the generator's own settings decide checkpointing
    tr = trainer_for(world, cfg, embedder=copy.deepcopy(world["embedder"]), generator=generator)
    phase = tr.phases[0]
    tr.make_optimizers(phase, 1)
    torch.manual_seed(0)  # the question encoder trains with dropout
    loss, _ = tr.compute_loss(phase, world["data"].questions[:3], random.Random(0))
    loss.backward()
    grads = {f"gen.{n}": p.grad.clone() for n, p in tr.generator.model.named_parameters() if p.requires_grad}
    grads.update({f"emb.{n}": p.grad.clone() for n, p in tr.embedder.named_parameters() if p.grad is not None})
    return loss.item(), grads, tr


@pytest.fixture(scope="module")
def lora_generator(world):
    """The base generator with LoRA whose B matrices are non-zero (at init they are 0: A gets no gradient)."""
    gen = copy.deepcopy(world["generator"])
    gen.add_lora(make_cfg(*world["dirs"]).generator.lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in gen.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
    return gen


@pytest.mark.parametrize("rag_loss", ["sequence", "token"])
def test_pair_chunks_give_the_unchunked_loss_and_gradients(world, lora_generator, rag_loss):
    # 3 questions x k=3 = 9 pairs: chunks of 4 (uneven last chunk) and of 1, against one forward
    runs = {}
    for chunk in (0, 4, 1):
        cfg = cfg_for(world, strategy="joint", rag_loss=rag_loss, train_k=3, pair_micro_batch=chunk)
        runs[chunk] = _rag_grads(world, cfg, lora_generator)
    loss0, grads0, tr0 = runs[0]
    assert any(n.startswith("emb.") for n in grads0) and any("lora_A" in n for n in grads0)
    for chunk in (4, 1):
        loss, grads, tr = runs[chunk]
        assert loss == pytest.approx(loss0, rel=1e-5, abs=1e-5)
        assert grads.keys() == grads0.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, grads0[name], rtol=1e-5, atol=1e-5, msg=name)
        # the ledger charges the chunks that ran, each padded to its own width, plus the forward each chunk
        # runs again in the backward pass: more FLOPs per token than the unchunked step
        assert len(tr.generator.tokens.scored_batches) == 0  # charged (consumed) by the accountant
        assert 0 < tr.acc.ledger.tokens <= tr0.acc.ledger.tokens
        per_token = tr.acc.ledger.total_flops / tr.acc.ledger.tokens
        assert per_token > tr0.acc.ledger.total_flops / tr0.acc.ledger.tokens


def test_gradient_checkpointing_gives_the_same_gradients_and_trains_lora(world, lora_generator):
    runs = {}
    for on in (False, True):
        cfg = cfg_for(world, strategy="joint", rag_loss="sequence", train_k=2)
        cfg.generator.gradient_checkpointing = on
        runs[on] = _rag_grads(world, cfg, lora_generator)
        base = runs[on][2].generator.model.get_base_model()
        assert base.is_gradient_checkpointing is on
    for name, g in runs[True][1].items():
        torch.testing.assert_close(g, runs[False][1][name], rtol=1e-5, atol=1e-6, msg=name)
    # PEFT + checkpointing must not silently train nothing: a fresh adapter (B = 0) gets B gradients
    cfg = cfg_for(world, strategy="gen_ft", max_steps=1)
    tr = trainer_for(world, cfg)
    tr.train()
    assert any(p.abs().sum() > 0 for n, p in tr.generator.model.named_parameters() if "lora_B" in n)
    assert not tr.generator.model.get_base_model().is_gradient_checkpointing  # off again after training


def test_a_new_loss_is_a_table_entry_and_a_registered_step(world, monkeypatch):
    """A strategy with a loss the trainer has never heard of: one Loss entry in the table and one step in
    LOSS_STEPS; the trainer (and the cost projection) read them, nothing else changes."""
    from distrag import strategies
    from distrag.costs.plan import PlanTarget, _Projector
    from distrag.strategies import Loss, Phase
    from distrag.training import losses

    calls = []

    def alignment_step(t, phase, questions, rng):  # pull each question towards its gold passage's stored vector
        calls.append(len(questions))
        batch = t.embedder.tokenize([q.text for q in questions])
        qv = t.embedder(**batch)
        gold = np.array([t.corpus.position(q.gold_passage_ids[0]) for q in questions])
        pos = torch.from_numpy(t.index.reconstruct(gold))
        loss = (1 - (qv * pos).sum(-1)).mean()
        return loss, {"loss": loss.item()}

    monkeypatch.setitem(strategies.LOSSES, "alignment", Loss("alignment", "cosine to the gold passage", "none",
                                                              needs_labels=True))
    monkeypatch.setitem(losses.LOSS_STEPS, "alignment", alignment_step)
    phase = Phase("align", True, False, "alignment")
    cfg = cfg_for(world, strategy="embed_ft")
    tr = trainer_for(world, cfg, phases=[phase])
    before = {k: v.clone() for k, v in tr.embedder.state_dict().items()}
    tr.train()
    assert calls == [2, 2, 2, 2]  # 2 steps x 2 micro batches
    assert any(not torch.equal(before[k], v) for k, v in tr.embedder.state_dict().items())
    # no generator, no passage side (its Loss says neither): projected as MNRL on the question side alone
    p = _Projector(PlanTarget(generator="135m", embedder="22m", embed_sides="question"))
    assert p.question_flops(phase) == p.question_flops(Phase("e", True, False, "mnrl")) > 0


# ----------------------------------------------------------------------------------------------
# train.rag_passage_grad: the RAG loss back-propagates into the retrieved passages (rag-end2end)


def test_rag_passage_grad_trains_the_passage_side_and_charges_it(world, monkeypatch):
    """With the flag the k retrieved passages of each question are re-encoded with gradient and p(z|q) is computed
    from those vectors: the passage vectors receive a gradient, and their forward + backward is in the ledger.
    Without it (the default) no passage is encoded in the step: p(z|q) uses the index's frozen vectors."""
    from distrag.costs.flops import transformer_train_flops
    from distrag.training import losses

    encoded = []
    real = losses._encode_passages

    def recording(t, rows):
        vecs = real(t, rows)
        vecs.retain_grad()
        encoded.append((list(rows), vecs))
        return vecs

    monkeypatch.setattr(losses, "_encode_passages", recording)
    flops, qs = {}, world["data"].questions[:3]
    for on in (False, True):
        encoded.clear()
        cfg = cfg_for(world, strategy="joint", rag_loss="sequence", train_k=2, rag_passage_grad=on)
        tr = trainer_for(world, cfg)
        tr.make_optimizers(tr.phases[0], 1)
        torch.manual_seed(0)  # the same dropout, so both runs retrieve the same passages
        loss, _ = tr.compute_loss(tr.phases[0], qs, random.Random(0))
        loss.backward()
        flops[on] = tr.acc.ledger.flops("train")
        if not on:
            assert encoded == [] and build_config().train.rag_passage_grad is False
            continue
        ((rows, vecs),) = encoded
        assert len(rows) == 3 * 2 and vecs.grad is not None and vecs.grad.abs().max() > 0
        mask = tr.embedder.tokenize([world["data"].corpus[i].as_text() for i in rows])["attention_mask"]
        B, S = mask.shape
        assert flops[True] - flops[False] == pytest.approx(
            transformer_train_flops(tr.embedder.model.config, B * S, S, "full"), rel=1e-9)
    # a phase that does not train the retriever never re-encodes, flag or not (two-phase's generator phase)
    encoded.clear()
    _one_backward(world, cfg_for(world, strategy="two_phase", rag_passage_grad=True), 0)
    assert encoded == []
    _one_backward(world, cfg_for(world, strategy="two_phase", rag_passage_grad=True), 1)
    assert len(encoded) == 1 and encoded[0][1].grad.abs().max() > 0


def test_a_retriever_only_run_needs_no_generator(world):
    """Ft-Embed never runs the generator: a run without one (no LLM loaded) trains the encoder; a phase that runs
    the generator refuses None up front."""
    cfg = cfg_for(world, strategy="embed_ft", max_steps=1)
    emb = copy.deepcopy(world["embedder"])
    before = snap(emb)
    tr = Trainer(cfg, world["data"].corpus, world["data"].questions, emb, None, world["index"],
                 Accountant(CostLedger()), show_progress=False)
    tr.train()
    assert changed(before, snap(emb)) and tr.acc.ledger.flops("train") > 0
    for strategy in ("gen_ft", "two_phase"):
        with pytest.raises(ValueError, match="runs the generator"):
            Trainer(cfg_for(world, strategy=strategy), world["data"].corpus, world["data"].questions,
                    copy.deepcopy(world["embedder"]), None, world["index"], Accountant(CostLedger()),
                    show_progress=False)
