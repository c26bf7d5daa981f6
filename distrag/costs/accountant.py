"""Turns what the models just did into ledger entries (FLOPs from model dimensions, see distrag.costs.flops).

Conventions:
- encoder batches are charged at their padded shape (what the kernels compute);
- corpus / question encoding through ``Embedder.encode`` is charged per text at its own length
  (``encode`` sorts by length, so padding is small);
- generator scoring (``answer_logprobs``) is charged at the padded shape it ran; generation at the
  average real prompt length and average new tokens of the call (padding not counted);
- training: the question encoder trains in full (3x forward); the LoRA generator is
  ``2 F + F_attn + 6 P_lora n``; a frozen generator in a RAG loss is inference (no gradient flows
  through it to the retriever: the retriever's gradient comes through p(z|q) only).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch

from distrag.costs.flops import (
    forward_flops_breakdown,
    generate_flops,
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

    def encode_texts(self, embedder: Embedder, texts: list[str], *, category: str) -> None:
        """``Embedder.encode(texts)``: forward only, each text at its own (truncated) length."""
        if not texts:
            return
        lengths = [len(x) for x in embedder.tokenizer(list(texts), truncation=True,
                                                       max_length=embedder.max_length)["input_ids"]]
        flops = texts_forward_flops(embedder.model.config, lengths)
        self.ledger.add(category, flops, tokens=sum(lengths),
                        passages=len(texts) if category == "encode_passages" else 0)

    # -- generator -------------------------------------------------------------------------------
    # The generator counts the tokens of its calls (Generator.tokens); each call site charges the
    # call it just made, and charging consumes those counters.
    def generator(self, generator: Generator, *, lp_mask: torch.Tensor, prompts: list[str], answers: list[str],
                  train: bool, category: str | None = None) -> None:
        """An ``answer_logprobs`` call that just ran, at its padded shape. ``train``: the LoRA adapters
        get gradients. A frozen forward is charged to ``category`` (default ``score``; training
        passes it ``train``: the frozen generator's forwards are part of a retriever phase's cost)."""
        padded, generator.tokens.scored_padded, generator.tokens.scored = generator.tokens.scored_padded, 0, 0
        B = len(prompts)
        if padded <= 0 or B == 0:
            return
        S = padded // B
        cfg = generator.config
        if train:
            parts = forward_flops_breakdown(cfg, padded, S)
            flops = train_flops(sum(parts.values()), "lora", lora_params=_lora_params(generator), tokens=padded,
                                attention_flops=parts["attention"])
            self.ledger.add("train", flops, tokens=padded)
        else:
            self.ledger.add(category or "score", transformer_forward_flops(cfg, padded, S), tokens=padded)

    def generation(self, generator: Generator, prompts: list[str], outputs: list[str]) -> None:
        """A ``generate`` call that just ran: KV-cached decoding at the call's mean lengths."""
        t = generator.tokens
        d_prompt, d_gen = t.prompt, t.generated
        t.prompt = t.generated = 0
        n = len(prompts)
        if n == 0 or d_prompt <= 0:
            return
        P = max(1, round(d_prompt / n))
        G = max(1, round(d_gen / n))
        self.ledger.add("generate", generate_flops(generator.config, P, G, batch=n), tokens=d_prompt + d_gen)
