"""Training losses of the fine-tuning strategies (pure torch, batched, stable in log space).

Notation: ``B`` questions, ``k`` retrieved passages per question, ``T`` answer tokens, ``d`` vector size.

Ft-Embed -- :func:`mnrl_loss`, the multiple-negatives ranking loss (InfoNCE) with cosine similarity::

    s(q, c) = scale * cos(q, c)
    L = mean_i [ -s(q_i, p_i) + logsumexp_{c in C} s(q_i, c) ],   C = {p_1..p_B} U {all hard negatives}

(sentence-transformers' ``MultipleNegativesRankingLoss``; the passages ``p`` and hard negatives are encoded by the
same encoder as the questions, with gradient, unless ``train.embed_sides=question``; with several trainers ``C``
is every trainer's candidates, as its ``gather_across_devices``.)

Ft-Gen -- :func:`nll_loss`, the answer negative log-likelihood given the retrieved passages::

    L = mean_b [ -sum_t log p(y_t | q_b, passages, y_<t) ]

Joint / two-phase -- the RAG marginal likelihood over the top-k retrieved passages ``z`` with
:func:`retrieval_log_probs` ``log p(z|q) = log_softmax_z(q . z / temperature)``::

    RAG-Sequence  L = mean_b [ -log sum_z p(z|q) prod_t p(y_t | q, z, y_<t) ]
    RAG-Token     L = mean_b [ -sum_t log sum_z p(z|q) p(y_t | q, z, y_<t) ]

Token convention (shared by all three generator losses): answer-token log-probabilities are **summed**
over the answer (a sequence NLL, not a per-token average) and **averaged** over questions. With that
convention k=1 reduces both RAG losses exactly to :func:`nll_loss` (``log p(z|q) = 0``), and RAG-Sequence
stays a proper marginal likelihood (a per-token average inside the product would not be one). For
reporting a per-token number divide by ``mask.sum() / B`` yourself.

Masks are boolean (True = real). Masked answer tokens are replaced by 0 before any arithmetic, so their
values (even NaN or -inf from padding) never reach the result or the gradient. Padded passages carry
``log p(z|q) = -inf`` (as returned by :func:`retrieval_log_probs` with a ``mask``); they drop out of the
marginals and receive zero gradient. Every question needs at least one real passage.

All losses compute in float32 (or float64 when given float64), whatever the input dtype.

Steps
-----
The bottom of the module holds what each loss of the strategy table (:data:`distrag.strategies.LOSSES`)
computes in one micro-batch of training: retrieval with the index in use, the prompts, the model calls (each
charged to the cost ledger) and the math above. They are registered under the loss's key in
:data:`LOSS_STEPS`, which :meth:`distrag.training.trainer.Trainer.compute_loss` dispatches through, so a new
loss is its :class:`~distrag.strategies.Loss` entry plus its step here.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distrag.strategies import LOSSES

if TYPE_CHECKING:
    from distrag.data.records import Question
    from distrag.strategies import Phase
    from distrag.training.trainer import Trainer

__all__ = ["LOSS_STEPS", "loss_step", "mnrl_loss", "nll_loss", "rag_sequence_loss", "rag_token_loss",
           "retrieval_log_probs"]


def _as_float(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def mnrl_loss(q: Tensor, pos: Tensor, neg: Tensor | None = None, scale: float = 20.0,
              neg_mask: Tensor | None = None, offset: int = 0) -> Tensor:
    """Multiple-negatives ranking loss with in-batch and hard negatives (cosine similarity).

    Args:
        q: ``[B, d]`` question embeddings (need not be normalised; normalised here).
        pos: ``[P, d]`` gold-passage embeddings, ``P >= offset + B``; ``pos[offset + i]`` is the positive of
            ``q[i]`` and every row is a negative of every other question (in-batch negatives). ``P = B``,
            ``offset = 0`` is one process's batch; with several trainers ``pos`` is every trainer's rows (gathered)
            and ``offset`` where this trainer's questions start in them.
        neg: optional ``[P, h, d]`` hard negatives (``[P, d]`` is read as ``h = 1``). As in
            sentence-transformers with extra columns, *all* ``P*h`` hard negatives of the batch are
            candidates for *every* question.
        scale: inverse temperature applied to the cosine similarities (sentence-transformers' default 20).
        neg_mask: optional ``[P, h]`` bool, False for padding slots of questions with fewer than ``h``
            hard negatives; those candidates are excluded for every question.
        offset: the row of ``pos`` that holds ``q[0]``'s positive.

    Returns the scalar ``mean_i [logsumexp_c s(q_i, c) - s(q_i, p_{offset+i})]`` with ``s = scale * cos``.
    The candidate order (positives first, then hard-negative column 0 of every question, then column 1, ...)
    and arithmetic follow ``sentence_transformers.losses.MultipleNegativesRankingLoss`` (default
    ``directions=("query_to_doc",)``, ``partition_mode="joint"``, and its ``gather_across_devices`` when
    ``pos`` is gathered), which this equals to float rounding.
    """
    if q.dim() != 2 or pos.dim() != 2 or pos.shape[1] != q.shape[1]:
        raise ValueError(f"q and pos must be [B, d] and [P, d]; got {tuple(q.shape)} and {tuple(pos.shape)}")
    if not 0 <= offset <= pos.shape[0] - q.shape[0]:
        raise ValueError(f"offset {offset} + {q.shape[0]} questions exceed the {pos.shape[0]} positives")
    if scale <= 0:
        raise ValueError("scale must be positive")
    B, d = q.shape
    P = pos.shape[0]
    docs = pos
    col_mask = None
    if neg is not None:
        if neg.dim() == 2:
            neg = neg.unsqueeze(1)
        if neg.dim() != 3 or neg.shape[0] != P or neg.shape[2] != d:
            raise ValueError(f"neg must be [P, h, d] = [{P}, h, {d}]; got {tuple(neg.shape)}")
        h = neg.shape[1]
        # column-major, like sentence-transformers' torch.cat([pos, neg_col_0, neg_col_1, ...])
        docs = torch.cat([pos, neg.transpose(0, 1).reshape(h * P, d)], dim=0)
        if neg_mask is not None:
            if neg_mask.shape != (P, h):
                raise ValueError(f"neg_mask must be [P, h] = [{P}, {h}]; got {tuple(neg_mask.shape)}")
            col_mask = torch.cat([torch.ones(P, dtype=torch.bool, device=q.device),
                                  neg_mask.to(torch.bool).transpose(0, 1).reshape(h * P)])
    elif neg_mask is not None:
        raise ValueError("neg_mask given without neg")
    qn = F.normalize(_as_float(q), p=2, dim=-1)
    dn = F.normalize(_as_float(docs), p=2, dim=-1)
    scores = (qn @ dn.transpose(0, 1)) * scale  # [B, P*(1+h)]
    if col_mask is not None:
        scores = scores.masked_fill(~col_mask.unsqueeze(0), float("-inf"))
    rows = torch.arange(B, device=q.device)
    positive = scores[rows, rows + offset]
    return -(positive - torch.logsumexp(scores, dim=1)).mean()


def retrieval_log_probs(q: Tensor, passage_vecs: Tensor, mask: Tensor | None = None,
                        temperature: float = 1.0) -> Tensor:
    """``log p(z|q)`` over each question's retrieved passages: ``log_softmax_z(q . z / temperature)``.

    Args:
        q: ``[B, d]`` question vectors (differentiable: this is how the RAG loss reaches the question
            encoder).
        passage_vecs: ``[B, k, d]`` vectors of the retrieved passages, used as given. When passage vectors
            are frozen (the index's stored vectors) the caller passes them detached, and no gradient flows
            to them.
        mask: optional ``[B, k]`` bool, False for padded slots (fewer than k hits); those get ``-inf``.
        temperature: divides the inner products (1.0: the index's own scores).

    Returns ``[B, k]`` log-probabilities (float32 or float64); each row's real slots sum to 1 in
    probability. Raises ``ValueError`` if a question has no real passage.
    """
    if q.dim() != 2 or passage_vecs.dim() != 3 or passage_vecs.shape[0] != q.shape[0] \
            or passage_vecs.shape[2] != q.shape[1]:
        raise ValueError(f"expected q [B, d] and passage_vecs [B, k, d]; got {tuple(q.shape)} and "
                         f"{tuple(passage_vecs.shape)}")
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    scores = torch.einsum("bd,bkd->bk", _as_float(q), _as_float(passage_vecs)) / temperature
    if mask is not None:
        mask = mask.to(torch.bool)
        if mask.shape != scores.shape:
            raise ValueError(f"mask must be [B, k] = {tuple(scores.shape)}; got {tuple(mask.shape)}")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every question needs at least one unmasked passage")
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.log_softmax(scores, dim=-1)


def _check_rag_inputs(doc_logprobs: Tensor, token_logprobs: Tensor, mask: Tensor) -> Tensor:
    if doc_logprobs.dim() != 2 or token_logprobs.dim() != 3 or token_logprobs.shape[:2] != doc_logprobs.shape:
        raise ValueError(f"expected doc_logprobs [B, k] and token_logprobs [B, k, T]; got "
                         f"{tuple(doc_logprobs.shape)} and {tuple(token_logprobs.shape)}")
    mask = mask.to(torch.bool)
    if mask.dim() == 2:  # [B, T]: the same answer tokens for every passage
        mask = mask.unsqueeze(1)
    if mask.dim() != 3 or mask.shape[0] != token_logprobs.shape[0] or mask.shape[2] != token_logprobs.shape[2] \
            or mask.shape[1] not in (1, token_logprobs.shape[1]):
        raise ValueError(f"mask must be [B, k, T] or [B, T] matching token_logprobs "
                         f"{tuple(token_logprobs.shape)}; got {tuple(mask.shape)}")
    return mask.expand_as(token_logprobs)


def rag_sequence_loss(doc_logprobs: Tensor, token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """RAG-Sequence: ``mean_b [-log sum_z p(z|q) prod_t p(y_t|q,z,y_<t)]``.

    Args:
        doc_logprobs: ``[B, k]`` ``log p(z|q)`` (e.g. from :func:`retrieval_log_probs`; ``-inf`` = padding).
        token_logprobs: ``[B, k, T]`` ``log p(y_t | q, z, y_<t)`` of the gold answer tokens, the generator
            conditioned on passage ``z`` alone.
        mask: ``[B, k, T]`` or ``[B, T]`` bool, True on answer tokens. Per passage the masks may differ
            (prompt lengths differ), though usually they agree.

    Computed as ``-logsumexp_z(log p(z|q) + sum_t log p(y_t|z))`` -- stable for long answers.
    """
    mask = _check_rag_inputs(doc_logprobs, token_logprobs, mask)
    tok = _as_float(token_logprobs).masked_fill(~mask, 0.0)
    doc = _as_float(doc_logprobs)
    seq = tok.sum(dim=-1).masked_fill(torch.isneginf(doc), 0.0)  # padded passages: keep -inf + 0
    return -torch.logsumexp(doc + seq, dim=1).mean()


def rag_token_loss(doc_logprobs: Tensor, token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """RAG-Token: ``mean_b [-sum_t log sum_z p(z|q) p(y_t|q,z,y_<t)]``.

    Arguments as in :func:`rag_sequence_loss`, except that the answer tokens must be the same positions for
    every passage: the marginal is taken per answer token ``t`` across passages, so a ``[B, k, T]`` mask must
    agree across ``k`` (checked; ``ValueError`` otherwise) -- align the answers (e.g. right-align the
    answer tokens or gather them into ``[B, k, T]`` by answer position) before calling.

    Note: strictly RAG-Token decodes with the marginal ``p(y_t|y_<t)`` as context; under teacher forcing
    the context is the gold prefix for every passage, so this is the exact RAG-Token likelihood.
    """
    mask = _check_rag_inputs(doc_logprobs, token_logprobs, mask)
    if not bool((mask == mask[:, :1]).all()):
        raise ValueError("rag_token_loss: the answer-token mask must agree across the k passages")
    doc = _as_float(doc_logprobs)
    tok = _as_float(token_logprobs).masked_fill(~mask | torch.isneginf(doc).unsqueeze(-1), 0.0)
    per_token = torch.logsumexp(doc.unsqueeze(-1) + tok, dim=1)  # [B, T]
    per_token = per_token.masked_fill(~mask[:, 0], 0.0)
    return -per_token.sum(dim=-1).mean()


def nll_loss(token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Ft-Gen answer NLL: ``mean_b [-sum_t mask[b,t] log p(y_t | q_b, passages, y_<t)]``.

    Summed over answer tokens, averaged over questions (the convention of the RAG losses, which reduce to
    this exactly at k = 1). ``token_logprobs`` and ``mask`` are ``[B, T]``.
    """
    if token_logprobs.dim() != 2 or mask.shape != token_logprobs.shape:
        raise ValueError(f"expected token_logprobs and mask [B, T]; got {tuple(token_logprobs.shape)} and "
                         f"{tuple(mask.shape)}")
    tok = _as_float(token_logprobs).masked_fill(~mask.to(torch.bool), 0.0)
    return -tok.sum(dim=-1).mean()


# ----------------------------------------------------------------------------------------------
# steps: one micro-batch of each loss of the strategy table

Step = Callable[["Trainer", "Phase", "list[Question]", random.Random], "tuple[Tensor, dict]"]


def mnrl_step(t: Trainer, phase: Phase, questions: list[Question], rng: random.Random) -> tuple[Tensor, dict]:
    """Ft-Embed: each question's gold passage ranked against the batch's other candidates (in-batch and
    ``train.hard_negatives`` retrieved negatives), sentence-transformers' MNRL.

    ``train.embed_sides``: ``both`` encodes the candidates from their text with the trainable encoder (the shared
    encoder learns on the passage side too, as sentence-transformers does; charged as training compute);
    ``question`` scores against the index's frozen vectors. The candidates of all trainers are gathered
    (:meth:`Trainer.gather_candidates`, ``train.gather_negatives``), so a question's negatives are the global
    batch's, not its own trainer's."""
    cfg = t.cfg.train
    batch = t.embedder.tokenize([q.text for q in questions])
    qv = t.embedder(**batch)
    t.acc.encoder(t.embedder, batch["attention_mask"], train=True, category="train")
    # One gold passage per question per step (a question with two gold passages alternates), so
    # a question never meets its own other gold passage as an in-batch negative.
    gold = [t.corpus.position(rng.choice(q.gold_passage_ids)) for q in questions]
    negs = _hard_negatives(t, questions, qv, rng) if cfg.hard_negatives else [[] for _ in questions]
    rows = np.array([[g, *n] for g, n in zip(gold, negs)], dtype=np.int64)  # [B, 1 + h]: gold, then negatives
    if cfg.embed_sides == "both":
        cand = _encode_passages(t, rows.reshape(-1)).view(*rows.shape, -1)
    else:  # frozen vectors of the index in use
        cand = torch.from_numpy(t.index.reconstruct(rows.reshape(-1))).to(qv.device, qv.dtype).view(*rows.shape, -1)
    cand, offset = t.gather_candidates(cand)
    loss = mnrl_loss(qv, cand[:, 0], cand[:, 1:] if cfg.hard_negatives else None, scale=cfg.mnrl_scale,
                     offset=offset)
    return loss, {"loss": loss.item()}


def _hard_negatives(t: Trainer, questions: list[Question], qv: Tensor, rng: random.Random) -> list[list[int]]:
    """``train.hard_negatives`` non-gold passages per question, the index's best first (padded with random non-gold
    passages when a tiny corpus has too few)."""
    h = t.cfg.train.hard_negatives
    res = t.retrieve(qv, h + 4)
    negs = []
    for q, row in zip(questions, res.ids):
        golds = {t.corpus.position(g) for g in q.gold_passage_ids}
        cand = [int(i) for i in row if i >= 0 and int(i) not in golds][:h]
        while len(cand) < h:
            j = rng.randrange(len(t.corpus))
            if j not in golds:
                cand.append(j)
        negs.append(cand)
    return negs


def _encode_passages(t: Trainer, rows: np.ndarray) -> Tensor:
    """The passages at corpus positions ``rows`` encoded from their text (``Passage.as_text()``, the string the
    index embeds, cut at ``embedder.max_length``) with gradient; charged as training compute (full fine-tuning of
    the encoder: forward and backward)."""
    batch = t.embedder.tokenize([t.corpus[int(i)].as_text() for i in rows])
    vecs = t.embedder(**batch)
    t.acc.encoder(t.embedder, batch["attention_mask"], train=True, category="train")
    return vecs


def _question_vectors(t: Trainer, phase: Phase, questions: list[Question]) -> Tensor:
    """The questions' vectors, differentiable when the phase trains the encoder; charged as training compute
    (every forward a training step needs is, frozen parts included)."""
    batch = t.embedder.tokenize([q.text for q in questions])
    with torch.set_grad_enabled(phase.train_embedder):
        qv = t.embedder(**batch)
    t.acc.encoder(t.embedder, batch["attention_mask"], train=phase.train_embedder, category="train")
    return qv


def nll_step(t: Trainer, phase: Phase, questions: list[Question], rng: random.Random) -> tuple[Tensor, dict]:
    """Ft-Gen: the answer's NLL given one prompt holding the frozen retriever's top-k passages."""
    res = t.retrieve(_question_vectors(t, phase, questions), t.k)
    answers = [q.answers[0] for q in questions]
    prompts = [t.generator.build_prompt(q.text, [t.corpus[int(i)] for i in row if i >= 0])
               for q, row in zip(questions, res.ids)]
    lp, mask = t.generator.answer_logprobs(prompts, answers)
    t.acc.generator(t.generator, lp_mask=mask, prompts=prompts, answers=answers, train=phase.train_generator,
                    category="train")
    loss = nll_loss(lp, mask)
    return loss, {"loss": loss.item()}


def _encode_retrieved(t: Trainer, ids: np.ndarray, qv: Tensor) -> Tensor:
    """The retrieved passages ``ids`` (``[B, k]``, -1 where the index had no hit) re-encoded with gradient:
    ``[B, k, d]``, zeros in the empty slots (masked out of p(z|q))."""
    flat = ids.reshape(-1)
    real = torch.from_numpy(np.flatnonzero(flat >= 0)).to(qv.device)
    vecs = _encode_passages(t, flat[flat >= 0]).to(qv.dtype)
    return qv.new_zeros(flat.size, qv.shape[1]).index_copy(0, real, vecs).view(*ids.shape, -1)


def rag_step(marginal: Callable[[Tensor, Tensor, Tensor], Tensor], t: Trainer, phase: Phase,
             questions: list[Question], rng: random.Random) -> tuple[Tensor, dict]:
    """RAG-Sequence / RAG-Token: one prompt per (question, retrieved passage), marginalised over p(z|q) (the
    gradient reaches the question encoder through the passage scores; with ``train.rag_passage_grad`` the k
    retrieved passages are re-encoded with gradient, so it reaches the passage side too)."""
    qv = _question_vectors(t, phase, questions)
    res = t.retrieve(qv, t.k, return_vectors=True)
    valid = torch.from_numpy(res.ids >= 0)
    if phase.train_embedder and t.cfg.train.rag_passage_grad:  # the passage side trains too (rag-end2end)
        pvecs = _encode_retrieved(t, res.ids, qv)
    else:
        pvecs = torch.from_numpy(res.vectors).to(qv.device, qv.dtype)  # frozen index vectors
    doc_lp = retrieval_log_probs(qv, pvecs, valid.to(qv.device), temperature=1.0 / t.cfg.retrieval.score_scale)
    prompts, ans = [], []
    for q, row in zip(questions, res.ids):
        for i in row:
            prompts.append(t.generator.build_prompt(q.text, [t.corpus[int(i)]] if i >= 0 else []))
            ans.append(q.answers[0])
    chunk = t.cfg.train.pair_micro_batch
    with torch.set_grad_enabled(phase.train_generator):  # pairs in checkpointed chunks: train.pair_micro_batch
        lp, mask = t.generator.answer_logprobs(prompts, ans, chunk=chunk)
    t.acc.generator(t.generator, lp_mask=mask, prompts=prompts, answers=ans, train=phase.train_generator,
                    category="train", chunked=bool(chunk))
    B, k = res.ids.shape
    lp, mask = lp.view(B, k, -1).to(doc_lp.device), mask.view(B, k, -1).to(doc_lp.device)
    loss = marginal(doc_lp, lp, mask)
    return loss, {"loss": loss.item(), "p_top1": doc_lp.exp()[:, 0].mean().item()}


LOSS_STEPS: dict[str, Step] = {
    "mnrl": mnrl_step,
    "nll": nll_step,
    "rag_sequence": partial(rag_step, rag_sequence_loss),
    "rag_token": partial(rag_step, rag_token_loss),
}
"""One micro-batch of each loss, by its key in :data:`distrag.strategies.LOSSES` (the same keys: tested)."""


def loss_step(key: str) -> Step:
    """The step of loss ``key`` (a resolved :attr:`Phase.loss`)."""
    if key not in LOSS_STEPS:
        known = ", ".join(LOSSES)
        raise KeyError(f"no training step is registered for loss {key!r} (losses: {known})")
    return LOSS_STEPS[key]
