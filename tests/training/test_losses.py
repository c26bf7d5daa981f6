import math

import pytest
import torch

from distrag.training.losses import mnrl_loss, nll_loss, rag_sequence_loss, rag_token_loss, retrieval_log_probs

LN = math.log


def _lp(x):
    return torch.log(torch.tensor(x, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# hand-computed RAG values
#
# Question 0: k=2 passages, p(z|q) = (0.75, 0.25), answer of T=2 tokens
#     p(y_1|z_1) = 0.5, p(y_2|z_1) = 0.4        p(y_1|z_2) = 0.2, p(y_2|z_2) = 0.5
#   RAG-Sequence: 0.75 * 0.5 * 0.4 + 0.25 * 0.2 * 0.5 = 0.15 + 0.025 = 0.175     -> -ln 0.175 = 1.742969...
#   RAG-Token:    t1: 0.75 * 0.5 + 0.25 * 0.2 = 0.425 ; t2: 0.75 * 0.4 + 0.25 * 0.5 = 0.425
#                                                                              -> -2 ln 0.425 = 1.711332...
# Question 1: p(z|q) = (0.5, 0.5), a single answer token (t2 is padding holding garbage)
#     p(y_1|z_1) = 0.8, p(y_1|z_2) = 0.4
#   both: 0.5 * 0.8 + 0.5 * 0.4 = 0.6                                           -> -ln 0.6 = 0.510826...


def _toy():
    doc = _lp([[0.75, 0.25], [0.5, 0.5]])
    tok = torch.stack([
        _lp([[0.5, 0.4], [0.2, 0.5]]),
        torch.tensor([[LN(0.8), float("nan")], [LN(0.4), float("-inf")]], dtype=torch.float64),
    ])
    mask = torch.tensor([[True, True], [True, False]])
    return doc, tok, mask


def test_rag_sequence_hand_computed():
    doc, tok, mask = _toy()
    assert -LN(0.175) == pytest.approx(1.7429693, abs=1e-6)
    expected = (-LN(0.175) - LN(0.6)) / 2
    assert rag_sequence_loss(doc, tok, mask).item() == pytest.approx(expected, abs=1e-12)
    # the [B, k, T] mask form gives the same value
    assert rag_sequence_loss(doc, tok, mask[:, None, :].expand(2, 2, 2)).item() == pytest.approx(expected, abs=1e-12)


def test_rag_token_hand_computed():
    doc, tok, mask = _toy()
    assert -2 * LN(0.425) == pytest.approx(1.7113316, abs=1e-6)
    expected = (-2 * LN(0.425) - LN(0.6)) / 2
    assert rag_token_loss(doc, tok, mask).item() == pytest.approx(expected, abs=1e-12)


def test_nll_hand_computed_and_sum_over_tokens():
    tok = _lp([[0.5, 0.4], [0.8, 0.1]])
    mask = torch.tensor([[True, True], [True, False]])
    expected = (-(LN(0.5) + LN(0.4)) - LN(0.8)) / 2  # summed over tokens, averaged over questions
    assert nll_loss(tok, mask).item() == pytest.approx(expected, abs=1e-12)


def test_rag_losses_reduce_to_nll_at_k1():
    g = torch.Generator().manual_seed(0)
    B, T, d = 4, 5, 8
    tok = torch.log_softmax(torch.randn(B, 1, T, 11, generator=g), -1)[..., 0]
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    doc = retrieval_log_probs(torch.randn(B, d, generator=g), torch.randn(B, 1, d, generator=g))
    assert torch.equal(doc, torch.zeros(B, 1))
    ref = nll_loss(tok[:, 0], mask)
    assert rag_sequence_loss(doc, tok, mask).item() == pytest.approx(ref.item(), abs=1e-6)
    assert rag_token_loss(doc, tok, mask).item() == pytest.approx(ref.item(), abs=1e-6)


def _random_case(seed, B=3, k=4, T=6):
    g = torch.Generator().manual_seed(seed)
    doc = torch.log_softmax(3 * torch.randn(B, k, generator=g, dtype=torch.float64), -1)
    tok = torch.log(torch.rand(B, k, T, generator=g, dtype=torch.float64).clamp_min(1e-3))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -2:] = False
    return doc, tok, mask


@pytest.mark.parametrize("seed", range(5))
def test_rag_losses_bounded_by_jensen(seed):
    # True for any inputs: each loss is >= 0 (probabilities <= 1) and, by Jensen (-log is convex),
    # <= the expected per-passage NLL sum_z p(z|q) NLL(y|z). RAG-Sequence is also >= min_z NLL(y|z).
    doc, tok, mask = _random_case(seed)
    nll_z = -(tok * mask[:, None, :]).sum(-1)  # [B, k]
    expected_nll = (doc.exp() * nll_z).sum(-1).mean()
    seq, tokl = rag_sequence_loss(doc, tok, mask), rag_token_loss(doc, tok, mask)
    assert 0 <= seq <= expected_nll + 1e-12
    assert 0 <= tokl <= expected_nll + 1e-12
    assert seq >= nll_z.min(-1).values.mean() - 1e-12


def test_rag_sequence_equals_token_for_single_token_answers_and_differs_otherwise():
    doc, tok, _ = _random_case(1, T=1)
    m = torch.ones(3, 1, dtype=torch.bool)
    assert rag_sequence_loss(doc, tok, m).item() == pytest.approx(rag_token_loss(doc, tok, m).item(), abs=1e-12)
    doc, tok, mask = _random_case(1)
    assert abs(rag_sequence_loss(doc, tok, mask) - rag_token_loss(doc, tok, mask)) > 1e-3


def test_rag_token_requires_masks_to_agree_across_passages():
    doc, tok, mask = _random_case(2)
    m3 = mask[:, None, :].expand(3, 4, 6).clone()
    rag_token_loss(doc, tok, m3)  # agreeing [B, k, T] mask is fine
    m3[1, 2, 0] = False
    with pytest.raises(ValueError, match="agree"):
        rag_token_loss(doc, tok, m3)
    rag_sequence_loss(doc, tok, m3)  # RAG-Sequence allows per-passage masks


def test_stable_for_long_answers():
    # prod_t p(y_t|z) underflows in probability space (400 tokens of p=0.01 -> 1e-800); log space must not
    B, k, T = 2, 3, 400
    doc = torch.log_softmax(torch.randn(B, k), -1)
    tok = torch.full((B, k, T), LN(0.01))
    mask = torch.ones(B, T, dtype=torch.bool)
    expected = -T * LN(0.01)
    assert rag_sequence_loss(doc, tok, mask).item() == pytest.approx(expected, rel=1e-5)
    assert rag_token_loss(doc, tok, mask).item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# gradient through retrieval


@pytest.mark.parametrize("loss_fn", [rag_sequence_loss, rag_token_loss])
def test_gradient_reaches_question_not_frozen_passages(loss_fn):
    g = torch.Generator().manual_seed(0)
    B, k, T, d = 3, 4, 5, 8
    q = torch.randn(B, d, generator=g, requires_grad=True)
    passages = torch.randn(B, k, d, generator=g, requires_grad=True)
    tok = torch.log(torch.rand(B, k, T, generator=g).clamp_min(1e-3))
    loss = loss_fn(retrieval_log_probs(q, passages.detach()), tok, torch.ones(B, T, dtype=torch.bool))
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert passages.grad is None


def test_rag_sequence_gradient_matches_posterior_formula():
    # d L / d s_z = (p(z|q) - p(z|q, y)) / B with s_z = q . z, so dL/dq_b = sum_z (p(z|q) - p(z|q,y)) z / B.
    g = torch.Generator().manual_seed(3)
    B, k, T, d = 2, 3, 4, 5
    q = torch.randn(B, d, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(B, k, d, generator=g, dtype=torch.float64)
    tok = torch.log(torch.rand(B, k, T, generator=g, dtype=torch.float64))
    mask = torch.ones(B, T, dtype=torch.bool)
    doc = retrieval_log_probs(q, z)
    rag_sequence_loss(doc, tok, mask).backward()
    prior = doc.detach().exp()
    posterior = torch.softmax(doc.detach() + tok.sum(-1), -1)
    expected = torch.einsum("bk,bkd->bd", prior - posterior, z) / B
    torch.testing.assert_close(q.grad, expected)
    # descending the gradient moves q towards the passage that explains the answer best
    best = posterior.argmax(-1)
    assert all(((-q.grad[b]) @ (z[b, best[b]] - (prior[b] @ z[b]))) > 0 for b in range(B))


def test_retrieval_log_probs_temperature_and_normalisation():
    q = torch.tensor([[1.0, 0.0]])
    z = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    lp = retrieval_log_probs(q, z, temperature=0.5)  # scores 4, 0
    torch.testing.assert_close(lp, torch.log_softmax(torch.tensor([[4.0, 0.0]]), -1))
    assert lp.exp().sum().item() == pytest.approx(1.0)


def test_masked_passages_drop_out_exactly():
    g = torch.Generator().manual_seed(0)
    B, k, T, d = 2, 3, 4, 6
    q = torch.randn(B, d, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(B, k, d, generator=g, dtype=torch.float64)
    tok = torch.log(torch.rand(B, k, T, generator=g, dtype=torch.float64))
    tok[1, 2] = float("nan")  # garbage in the padded passage's slot
    mask = torch.ones(B, T, dtype=torch.bool)
    pmask = torch.tensor([[True, True, True], [True, True, False]])
    doc = retrieval_log_probs(q, z, pmask)
    assert torch.isneginf(doc[1, 2]) and doc[1, :2].exp().sum().item() == pytest.approx(1.0)
    for fn in (rag_sequence_loss, rag_token_loss):
        doc = retrieval_log_probs(q, z, pmask)
        full = fn(doc, tok, mask)
        # question 1 alone with only its 2 real passages
        ref1 = fn(retrieval_log_probs(q[1:], z[1:, :2]), tok[1:, :2], mask[1:])
        ref0 = fn(doc[:1], tok[:1], mask[:1])
        assert full.item() == pytest.approx((ref0.item() + ref1.item()) / 2, abs=1e-12)
        (grad,) = torch.autograd.grad(full, q)
        assert torch.isfinite(grad).all()


def test_question_without_passages_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        retrieval_log_probs(torch.randn(2, 3), torch.randn(2, 2, 3), torch.tensor([[True, False], [False, False]]))


# ----------------------------------------------------------------------------------------------
# MNRL vs sentence-transformers


def _st_loss(scale=20.0):
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    # compute_loss_from_embeddings never touches the model; the real-model path is tested below
    return MultipleNegativesRankingLoss(model=None, scale=scale)


@pytest.mark.parametrize("h", [0, 1, 3])
@pytest.mark.parametrize("scale", [20.0, 7.5])
def test_mnrl_equals_sentence_transformers_on_embeddings(h, scale):
    g = torch.Generator().manual_seed(h)
    B, d = 6, 16
    q, pos = torch.randn(B, d, generator=g), torch.randn(B, d, generator=g)
    neg = torch.randn(B, h, d, generator=g) if h else None
    cols = [q, pos] + ([neg[:, j] for j in range(h)] if h else [])
    ref = _st_loss(scale).compute_loss_from_embeddings(cols, labels=None)
    ours = mnrl_loss(q, pos, neg, scale=scale)
    assert abs(ours.item() - ref.item()) < 1e-5
    # and the hard negatives change the loss (they are really used)
    if h:
        assert ours.item() > mnrl_loss(q, pos, None, scale=scale).item()


def test_mnrl_neg_mask_drops_padding_candidates():
    g = torch.Generator().manual_seed(1)
    B, d = 4, 8
    q, pos, neg = torch.randn(B, d, generator=g), torch.randn(B, d, generator=g), torch.randn(B, 2, d, generator=g)
    # mask out column 1 entirely -> same as passing only column 0
    m = torch.tensor([[True, False]] * B)
    assert mnrl_loss(q, pos, neg, neg_mask=m).item() == pytest.approx(mnrl_loss(q, pos, neg[:, :1]).item(),
                                                                       abs=1e-6)
    assert mnrl_loss(q, pos, neg, neg_mask=torch.ones(B, 2, dtype=torch.bool)).item() == pytest.approx(
        mnrl_loss(q, pos, neg).item(), abs=1e-7)


def test_mnrl_equals_sentence_transformers_on_a_real_model(tiny_encoder_dir):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    torch.manual_seed(0)
    model = SentenceTransformer(str(tiny_encoder_dir), device="cpu")
    questions = ["Who founded the company?", "Which city was she born in?", "What is the capital?"]
    gold = ["The company was founded in 1999.", "She was born in the city.", "The capital city is 12."]
    hard = ["The river is in the city.", "He works at the company.", "The lazy dog was born in 2001."]
    feats = [model.tokenize(t) for t in (questions, gold, hard)]
    ref = MultipleNegativesRankingLoss(model)(feats, labels=None)
    q, p, n = (model(f)["sentence_embedding"] for f in feats)
    ours = mnrl_loss(q, p, n[:, None, :])
    assert abs(ours.item() - ref.item()) < 1e-5
    # gradients flow to the encoder through our loss too
    ours.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_every_loss_of_the_table_has_its_training_step():
    from distrag.strategies import LOSSES
    from distrag.training.losses import LOSS_STEPS, loss_step

    assert set(LOSS_STEPS) == set(LOSSES)
    with pytest.raises(KeyError, match="no training step is registered for loss 'bogus'"):
        loss_step("bogus")


# ----------------------------------------------------------------------------------------------
# the Ft-Embed step (mnrl_step) against sentence-transformers, on the same texts and the same encoder

PASSAGES = [
    ("Quick Fox", "The quick brown fox jumps over the lazy dog."),
    ("The Company", "The company was founded in 1999 by a person of the city."),
    ("The City", "She was born in the city in 2001 and lives at the river."),
    ("The Capital", "The capital city of the country is 12."),
    ("The River", "The river is in the city and the lazy dog lives there."),
    ("Works", "He works at the company in the capital."),
    ("Founder", "The founder of the company was born in 2020."),
    ("Answer", "yes no answer question passage context title."),
    ("Numbers", "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15."),
    ("Country", "The country is the capital of the river city."),
]
QUESTIONS = [("Who founded the company?", 1), ("Which city was she born in?", 2),
             ("What is the capital of the country?", 3), ("Where does the lazy dog live?", 4),
             ("Who is the founder of the company?", 6)]


@pytest.fixture(scope="module")
def mnrl_world(tiny_encoder_dir, tiny_lm_dir):
    """A corpus of ten passages, five single-gold questions, the tiny encoder and its index."""
    from distrag.data.records import Corpus, Passage, Question
    from distrag.models.embedder import Embedder
    from distrag.models.generator import Generator
    from distrag.retrieval.sharded_index import ShardedIndex

    corpus = Corpus([Passage(f"p{i}", t, x) for i, (t, x) in enumerate(PASSAGES)])
    questions = [Question(f"q{i}", text, ("x",), (f"p{g}",)) for i, (text, g) in enumerate(QUESTIONS)]
    cfg = _mnrl_cfg(tiny_encoder_dir, tiny_lm_dir)
    embedder = Embedder.from_config(cfg.embedder, device="cpu").eval()
    vecs = embedder.encode(corpus.texts())
    index = ShardedIndex.from_config(vecs.shape[1], cfg.index).build(vecs)
    return {"corpus": corpus, "questions": questions, "embedder": embedder, "index": index, "vecs": vecs,
            "generator": Generator.from_config(cfg.generator, device="cpu"), "dirs": (tiny_encoder_dir, tiny_lm_dir)}


def _mnrl_cfg(enc_dir, lm_dir, **train):
    from distrag.config import build_config

    return build_config({"embedder": {"model": str(enc_dir), "max_length": 128},  # ST's max_seq_length
                         "generator": {"model": str(lm_dir)}, "index": {"device": "cpu"},
                         "tracking": {"enabled": False},
                         "train": {"strategy": "embed_ft", "batch_size": 5, "micro_batch_size": 5, **train}})


def _mnrl_step(w, **train):
    """One Ft-Embed micro-batch on a copy of the encoder, dropout off (as the reference): the trainer, its loss
    and the encoder's gradients by parameter name."""
    import copy
    import random

    from distrag.costs.accountant import Accountant
    from distrag.costs.ledger import CostLedger
    from distrag.training.trainer import Trainer

    cfg = _mnrl_cfg(*w["dirs"], **train)
    tr = Trainer(cfg, w["corpus"], w["questions"], copy.deepcopy(w["embedder"]), w["generator"], w["index"],
                 Accountant(CostLedger(memory=None)), show_progress=False)
    phase = tr.phases[0]
    tr.make_optimizers(phase, 1)
    tr.embedder.eval()
    loss, stats = tr.compute_loss(phase, w["questions"], random.Random(0))
    loss.backward()
    grads = {n: p.grad for n, p in tr.embedder.named_parameters() if p.grad is not None}
    return tr, loss, stats, grads


def _brute_force_negatives(w, h):
    """The h best non-gold passages of each question under the base encoder (what the step mines)."""
    q = w["embedder"].encode([q.text for q in w["questions"]])
    order = (-(q @ w["vecs"].T)).argsort(axis=1, kind="stable")
    return [[int(j) for j in row if j != gold][:h] for row, (_, gold) in zip(order, QUESTIONS)]


@pytest.mark.parametrize("h", [0, 1, 2])
def test_ft_embed_step_equals_sentence_transformers_mnrl(mnrl_world, h):
    """Both sides (the default): distrag's step and sentence-transformers' MultipleNegativesRankingLoss on the
    same (anchor, positive, negatives...) texts, with a SentenceTransformer loaded from the same folder, give the
    same loss and the same gradient in every encoder parameter."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    w = mnrl_world
    tr, loss, _, grads = _mnrl_step(w, hard_negatives=h)
    assert tr.cfg.train.embed_sides == "both"
    texts = w["corpus"].texts()
    negs = _brute_force_negatives(w, h)
    cols = [[q.text for q in w["questions"]], [texts[g] for _, g in QUESTIONS]]
    cols += [[texts[n[j]] for n in negs] for j in range(h)]
    st = SentenceTransformer(str(w["dirs"][0]), device="cpu").eval()
    ref = MultipleNegativesRankingLoss(st, scale=20.0)([st.tokenize(c) for c in cols], labels=None)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    ref_grads = {n.removeprefix("0."): p.grad for n, p in st.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and "model.embeddings.word_embeddings.weight" in grads
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    # the passage side really trains: the positives' gradient is not the question side's alone
    q_only = _mnrl_step(w, hard_negatives=h, embed_sides="question")[3]
    assert any((grads[n] - q_only[n]).abs().max() > 1e-6 for n in grads)


def test_ft_embed_question_side_scores_against_the_frozen_index_vectors(mnrl_world):
    """``train.embed_sides=question`` keeps the earlier recipe: the stored vectors of the index in use as
    candidates (no gradient to them), only the questions charged."""
    w = mnrl_world
    tr, loss, _, _ = _mnrl_step(w, hard_negatives=1, embed_sides="question")
    qv = tr.embedder(**tr.embedder.tokenize([q.text for q in w["questions"]]))
    pos = torch.from_numpy(w["vecs"][[g for _, g in QUESTIONS]])
    neg = torch.from_numpy(w["vecs"][[n[0] for n in _brute_force_negatives(w, 1)]])
    assert loss.item() == pytest.approx(mnrl_loss(qv, pos, neg).item(), abs=1e-6)
    assert tr.acc.ledger.flops("train") == pytest.approx(_charged(tr, [q.text for q in w["questions"]]))


def test_ft_embed_both_sides_charges_the_passage_forward_and_backward(mnrl_world):
    w = mnrl_world
    tr, _, _, _ = _mnrl_step(w, hard_negatives=2)
    texts = w["corpus"].texts()
    cands = [texts[i] for (_, g), n in zip(QUESTIONS, _brute_force_negatives(w, 2)) for i in (g, *n)]
    want = _charged(tr, [q.text for q in w["questions"]]) + _charged(tr, cands)
    assert tr.acc.ledger.flops("train") == pytest.approx(want, rel=1e-12)
    assert want > 2 * _charged(tr, [q.text for q in w["questions"]])  # passages are the larger part


def _charged(tr, texts):
    """What the accountant charges for one trained encoder batch of ``texts`` (full fine-tuning, padded)."""
    from distrag.costs.flops import transformer_train_flops

    mask = tr.embedder.tokenize(texts)["attention_mask"]
    B, S = mask.shape
    return transformer_train_flops(tr.embedder.model.config, B * S, S, "full")


def test_mnrl_offset_splits_a_batch_exactly():
    """A trainer's questions against the whole batch's candidates (``offset``: where its own rows start): the
    mean over the parts is the loss of the whole batch, gradients included."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    pos, neg = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 2, 6, generator=g,
                                                                               dtype=torch.float64)
    whole = mnrl_loss(q, pos, neg)
    (g_whole,) = torch.autograd.grad(whole, q)
    parts = (mnrl_loss(q[:3], pos, neg, offset=0) * 3 + mnrl_loss(q[3:], pos, neg, offset=3) * 5) / 8
    (g_parts,) = torch.autograd.grad(parts, q)
    assert parts.item() == pytest.approx(whole.item(), abs=1e-12)
    torch.testing.assert_close(g_parts, g_whole)
    with pytest.raises(ValueError, match="exceed"):
        mnrl_loss(q[3:], pos, neg, offset=4)
