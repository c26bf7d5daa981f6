"""Turns what the models just did into ledger entries (FLOPs from model dimensions, see distrag.costs.flops),
at the shapes the kernels really ran, padding included.

Conventions:
- encoder batches are charged at their padded shape;
- corpus / question encoding through ``Embedder.encode`` is charged at the batches ``encode`` runs (texts
  sorted longest first, ``batch_size`` at a time, each batch padded to its longest text);
- generator calls are charged from the shapes the generator records (``Generator.tokens``): scoring
  (``answer_logprobs``) at its padded shape with the LM head on the positions whose logits were computed
  (the answer's); generation per batch at its padded prompt length and the number of steps the batch ran
  (until its longest answer ended);
- training: the question encoder trains in full (3x forward); the LoRA generator is
  ``2 F + F_attn + 6 P_lora n``; a frozen generator in a RAG loss is a forward (no gradient flows
  through it to the retriever: the retriever's gradient comes through p(z|q) only), charged to ``train``;
- a generator carrying LoRA adapters pays their forward (``2 P_lora`` per token) in every call, frozen or not.
- executed FLOPs: the forwards that gradient checkpointing (``generator.gradient_checkpointing``: one more
  forward of the blocks) and checkpointed pair chunks (``train.pair_micro_batch``: one more forward of the
  chunk) recompute in the backward pass are charged too (:func:`~distrag.costs.flops.recompute_flops`), as
  ``FlopCounterMode`` counts them; memory saved is paid in FLOPs, and the ledger shows it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch

from distrag.costs.flops import (
    forward_flops_breakdown,
    generate_flops,
    recompute_flops,
    texts_forward_flops,
    train_flops,
    transformer_forward_flops,
    transformer_train_flops,
)
from distrag.costs.ledger import CostLedger

if TYPE_CHECKING:
    from distrag.models.embedder import Embedder
    from distrag.models.generator import Generator


def _lora_params(generator: Generator) -> int:
    return sum(p.numel() for n, p in generator.model.named_parameters() if "lora_" in n)


class Accountant:
    """Charges model work to a :class:`CostLedger`."""

    def __init__(self, ledger: CostLedger):
        self.ledger = ledger

    def phase(self, name: str) -> AbstractContextManager[CostLedger]:
        """Time a phase of the ledger (``with acc.phase("eval"): ...``)."""
        return self.ledger.phase(name)

    # -- embedder --------------------------------------------------------------------------------
    def encoder(self, embedder: Embedder, attention_mask: torch.Tensor, *, train: bool, category: str) -> None:
        """A padded encoder batch; ``train``: full fine-tuning (3x forward), charged to ``train``."""
        B, S = attention_mask.shape
        cfg = embedder.model.config
        flops = (transformer_train_flops(cfg, B * S, S, "full") if train
                 else transformer_forward_flops(cfg, B * S, S))
        self.ledger.add("train" if train else category, flops, tokens=int(attention_mask.sum()),
                        passages=B if category == "encode_passages" else 0)

    def encode_texts(self, embedder: Embedder, texts: list[str], *, category: str,
                     batch_size: int | None = None) -> None:
        """``Embedder.encode(texts, batch_size=batch_size)``: forward only, at the padded batches it runs."""
        if not texts:
            return
        lengths = embedder.token_lengths(texts)
        flops = texts_forward_flops(embedder.model.config, lengths, batch_size or embedder.batch_size)
        self.ledger.add(category, flops, tokens=sum(lengths),
                        passages=len(texts) if category == "encode_passages" else 0)

    # -- generator -------------------------------------------------------------------------------
    # The generator counts the tokens of its calls (Generator.tokens); each call site charges the
    # call it just made, and charging consumes those counters.
    def generator(self, generator: Generator, *, lp_mask: torch.Tensor, prompts: list[str], answers: list[str],
                  train: bool, category: str | None = None, chunked: bool = False) -> None:
        """The ``answer_logprobs`` calls that just ran, at their padded shapes (``lp_mask``, ``prompts`` and
        ``answers`` name the call; the shapes come from ``generator.tokens``). ``train``: the LoRA adapters
        get gradients. A frozen forward is charged to ``category`` (default ``score``; training passes it
        ``train``: the frozen generator's forwards are part of a retriever phase's cost). ``chunked``: the call
        ran its pairs in checkpointed chunks (``answer_logprobs(chunk=...)``); with ``train``, its recomputed
        forwards are charged, and so are those of block checkpointing when the generator has it on."""
        t = generator.tokens
        batches, padded = t.scored_batches, t.scored_padded
        t.scored_batches, t.scored_padded, t.scored = [], 0, 0
        if not batches:
            return
        cfg, lora_params, flops = generator.config, _lora_params(generator), 0.0
        base = generator.model.get_base_model() if generator.is_peft else generator.model
        # transformers checkpoints blocks only in training mode
        checkpointed = train and base.training and bool(getattr(base, "is_gradient_checkpointing", False))
        for b in batches:
            parts = forward_flops_breakdown(cfg, b.rows * b.width, b.width, lm_head_tokens=b.rows * b.logit_positions)
            flops += train_flops(sum(parts.values()), "lora" if train else "inference", lora_params=lora_params,
                                 tokens=b.rows * b.width, attention_flops=parts["attention"])
            if train:
                flops += recompute_flops(parts, lora_params=lora_params, tokens=b.rows * b.width,
                                         blocks_checkpointed=checkpointed, chunked=chunked)
        self.ledger.add("train" if train else (category or "score"), flops, tokens=padded)

    def generation(self, generator: Generator, prompts: list[str], outputs: list[str]) -> None:
        """The ``generate`` batches that just ran: KV-cached decoding at each batch's padded prompt length,
        for as many steps as the batch ran (``prompts`` and ``outputs`` name the call)."""
        t = generator.tokens
        batches, tokens = t.generated_batches, t.prompt + t.generated
        t.generated_batches, t.prompt, t.generated = [], 0, 0
        if not batches:
            return
        lora_params = _lora_params(generator)
        flops = sum(generate_flops(generator.config, b.prompt_width, b.new_tokens, batch=b.rows,
                                   lora_params=lora_params) for b in batches)
        self.ledger.add("generate", flops, tokens=tokens)
