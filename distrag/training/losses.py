"""Training losses of the fine-tuning strategies (pure torch, batched, stable in log space).

Notation: ``B`` questions, ``k`` retrieved passages per question, ``T`` answer tokens, ``d`` vector size.

Ft-Embed -- :func:`mnrl_loss`, the multiple-negatives ranking loss (InfoNCE) with cosine similarity::

    s(q, c) = scale * cos(q, c)
    L = mean_i [ -s(q_i, p_i) + logsumexp_{c in C} s(q_i, c) ],   C = {p_1..p_B} U {all hard negatives}

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["mnrl_loss", "nll_loss", "rag_sequence_loss", "rag_token_loss", "retrieval_log_probs"]


def _as_float(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def mnrl_loss(q: Tensor, pos: Tensor, neg: Tensor | None = None, scale: float = 20.0,
              neg_mask: Tensor | None = None) -> Tensor:
    """Multiple-negatives ranking loss with in-batch and hard negatives (cosine similarity).

    Args:
        q: ``[B, d]`` question embeddings (need not be normalised; normalised here).
        pos: ``[B, d]`` gold-passage embeddings; ``pos[i]`` is the positive of ``q[i]`` and a negative of
            every other question (in-batch negatives).
        neg: optional ``[B, h, d]`` hard negatives (``[B, d]`` is read as ``h = 1``). As in
            sentence-transformers with extra columns, *all* ``B*h`` hard negatives of the batch are
            candidates for *every* question.
        scale: inverse temperature applied to the cosine similarities (sentence-transformers' default 20).
        neg_mask: optional ``[B, h]`` bool, False for padding slots of questions with fewer than ``h``
            hard negatives; those candidates are excluded for every question.

    Returns the scalar ``mean_i [logsumexp_c s(q_i, c) - s(q_i, p_i)]`` with ``s = scale * cos``.
    The candidate order (positives first, then hard-negative column 0 of every question, then column 1, ...)
    and arithmetic follow ``sentence_transformers.losses.MultipleNegativesRankingLoss`` (default
    ``directions=("query_to_doc",)``, ``partition_mode="joint"``), which this equals to float rounding.
    """
    if q.dim() != 2 or pos.shape != q.shape:
        raise ValueError(f"q and pos must both be [B, d]; got {tuple(q.shape)} and {tuple(pos.shape)}")
    if scale <= 0:
        raise ValueError("scale must be positive")
    B, d = q.shape
    docs = pos
    col_mask = None
    if neg is not None:
        if neg.dim() == 2:
            neg = neg.unsqueeze(1)
        if neg.dim() != 3 or neg.shape[0] != B or neg.shape[2] != d:
            raise ValueError(f"neg must be [B, h, d] = [{B}, h, {d}]; got {tuple(neg.shape)}")
        h = neg.shape[1]
        # column-major, like sentence-transformers' torch.cat([pos, neg_col_0, neg_col_1, ...])
        docs = torch.cat([pos, neg.transpose(0, 1).reshape(h * B, d)], dim=0)
        if neg_mask is not None:
            if neg_mask.shape != (B, h):
                raise ValueError(f"neg_mask must be [B, h] = [{B}, {h}]; got {tuple(neg_mask.shape)}")
            col_mask = torch.cat([torch.ones(B, dtype=torch.bool, device=q.device),
                                  neg_mask.to(torch.bool).transpose(0, 1).reshape(h * B)])
    elif neg_mask is not None:
        raise ValueError("neg_mask given without neg")
    qn = F.normalize(_as_float(q), p=2, dim=-1)
    dn = F.normalize(_as_float(docs), p=2, dim=-1)
    scores = (qn @ dn.transpose(0, 1)) * scale  # [B, B*(1+h)]
    if col_mask is not None:
        scores = scores.masked_fill(~col_mask.unsqueeze(0), float("-inf"))
    rows = torch.arange(B, device=q.device)
    positive = scores[rows, rows]
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
