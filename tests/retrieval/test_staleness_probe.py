"""What staleness costs: the probe's gap is 0 for an index built from the current encoder, and grows when the
encoder has moved away from the one that built the index (a trained encoder against the base index); without
context labels it scores answer recall; its encodings are charged."""

from __future__ import annotations

import copy

import pytest
import torch

from distrag.config import SyntheticConfig, build_config
from distrag.costs.accountant import Accountant
from distrag.costs.ledger import CostLedger
from distrag.data.records import Corpus, Passage, Question
from distrag.data.synthetic import make_synthetic
from distrag.models.embedder import Embedder
from distrag.retrieval.corpus_encoding import build_index
from distrag.retrieval.staleness_probe import StalenessProbe

K = 3


@pytest.fixture(scope="module")
def world(tiny_encoder_dir):
    cfg = build_config({"embedder": {"model": str(tiny_encoder_dir), "max_length": 48, "batch_size": 32},
                        "index": {"device": "cpu"}, "tracking": {"enabled": False}})
    data = make_synthetic(SyntheticConfig(n_entities=40, n_single_hop=80, n_two_hop=40))
    base = Embedder.from_config(cfg.embedder, device="cpu")
    return cfg, data, base


def _trained(base: Embedder, questions: list[Question], corpus, steps: int = 40) -> Embedder:
    """``base`` trained (both sides, in-batch negatives) to retrieve the gold passages of ``questions``."""
    emb = copy.deepcopy(base)
    emb.train()
    opt = torch.optim.Adam(emb.parameters(), lr=3e-3)
    gold = [corpus[corpus.position(q.gold_passage_ids[0])].as_text() for q in questions]
    torch.manual_seed(0)
    for _ in range(steps):
        q = torch.nn.functional.normalize(emb.embed_questions([x.text for x in questions], grad=True), dim=-1)
        p = torch.nn.functional.normalize(emb.embed_questions(gold, grad=True), dim=-1)
        loss = torch.nn.functional.cross_entropy(20.0 * q @ p.T, torch.arange(len(questions)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    emb.eval()
    return emb


def test_the_gap_is_zero_for_an_index_of_the_current_encoder_and_grows_when_the_encoder_moved(world):
    cfg, data, base = world
    probe_qs = [q for q in data.questions if q.has_labels][:24]
    probe = StalenessProbe(probe_qs, data.corpus, K)
    assert probe.metric == "recall"
    base_index = build_index(base, data.corpus, cfg.index)
    (same,) = probe.score(base, [base_index])
    assert same.gap == 0.0 and same.stale == same.fresh
    trained = _trained(base, probe_qs, data.corpus)
    trained_index = build_index(trained, data.corpus, cfg.index)
    ledger = CostLedger()
    stale, current = probe.score(trained, [base_index, trained_index], Accountant(ledger))
    assert current.gap == 0.0  # rebuilt from the current weights: nothing lost
    assert stale.gap > 0.2 and stale.fresh > stale.stale  # the base index lags the trained encoder
    assert stale.fresh == pytest.approx(current.stale)  # its candidates, re-encoded, rank as the fresh index
    # the questions and the union of both indices' candidates (top-50 + gold), encoded once, are charged
    assert ledger.flops("encode_questions") > 0 and ledger.passages == stale.passages_encoded
    assert stale.passages_encoded <= min(len(data.corpus), 2 * len(probe_qs) * 50)


def test_without_context_labels_the_probe_scores_answer_recall(world):
    cfg, data, base = world
    unlabelled = [Question(q.id, q.text, q.answers) for q in data.questions[:12]]
    probe = StalenessProbe(unlabelled, data.corpus, K, candidates=10)
    assert probe.metric == "answer_recall"
    (score,) = probe.score(base, [build_index(base, data.corpus, cfg.index)])
    assert score.metric == "answer_recall" and 0.0 <= score.stale <= 1.0 and score.gap == 0.0
    assert score.passages_encoded <= 12 * 10


def test_a_probe_needs_questions_and_a_positive_k(world):
    _, data, _ = world
    with pytest.raises(ValueError, match="at least one question"):
        StalenessProbe([], data.corpus, K)
    with pytest.raises(ValueError, match=">= 1"):
        StalenessProbe(data.questions[:2], data.corpus, 0)


def test_ties_in_the_fresh_ranking_go_to_the_lower_row(world):
    """Passages with the same text score the same; the index ranks them by row, and so must the fresh ranking, or
    an index built from the current weights would show a gap (here: the gold passage is the first copy)."""
    cfg, data, base = world
    copies = [Passage(f"dup{i}", "Zorblat", "the zorblat river flows north") for i in range(4)]
    corpus = Corpus([*copies, *data.corpus.passages[:30]])
    probe = StalenessProbe([Question("q", "where does the zorblat river flow", ("north",), ("dup0",))], corpus, 1)
    index = build_index(base, corpus, cfg.index)
    (score,) = probe.score(base, [index])
    assert score.stale == 1.0 and score.gap == 0.0
