"""Encoding the corpus with the embedder, what that costs, and the cached frozen index built from it.

One corpus encoding
-------------------
:class:`CorpusEncoder` tokenizes the corpus once. From those token lengths it sorts the passages longest
first and cuts them into the batches one ``Embedder.encode`` of the whole corpus would run; shards are
runs of whole batches, so encoding shard by shard computes exactly those batches, and one encoding pass
costs what ``Accountant.encode_texts`` charges for the corpus (``encode_passages``: the forward FLOPs of
each padded batch, :func:`distrag.costs.flops.texts_forward_flops`), whatever the shard count.
It encodes shard by shard (a generator: the index rank heartbeats, and can abandon a stale version,
between shards) and puts the vectors back in corpus order. :func:`encode_corpus` is one whole pass,
charged to an accountant. Everything that embeds the corpus goes through it: the single-process index
build below, ``Trainer.refresh_index``, the index rank (``distrag.distributed.refresh_server``), and
the distributed trainers' charge for each index version they adopt.

The frozen index cache
----------------------
:func:`index_signature` names what an index depends on (corpus content, embedder model, the sha256 of its
weights and vocabulary (:func:`weights_digest`), max length, pooling, the index settings a build depends on);
:func:`load_or_build_index` reuses ``<cache root>/<12-hex hash of it>`` when the signature saved there
matches, else encodes, builds and saves. The weights are hashed, not named: new weights saved into the same
model folder (a re-trained encoder) must never reuse the old vectors (issue 19: Recall 25 instead of 50).
Hashing MiniLM-L6 (22.7M float32 parameters, 91 MB, and its tokenizer) took 0.2 s on 2 heavily shared CPU
cores, once per process setup; a reused index is verified by :func:`distrag.retrieval.index_store.load`.
A reused index is charged the encoding it stands for, so a run's ledger is the same whether the cache was
warm or not, and gets today's search-time settings (``nprobe``, ``refine``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from distrag.costs.flops import texts_forward_flops
from distrag.errors import IndexLoadError
from distrag.retrieval import index_store
from distrag.retrieval.sharded_index import ShardedIndex

if TYPE_CHECKING:
    from distrag.config import EmbedderConfig, ExperimentConfig, IndexConfig
    from distrag.costs.accountant import Accountant
    from distrag.data.records import Corpus
    from distrag.models.embedder import Embedder, TokenizedTexts

__all__ = ["CorpusEncoder", "EncodingCost", "build_index", "encode_corpus", "index_cache_dir", "index_signature",
           "load_or_build_index", "weights_digest"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodingCost:
    """One forward pass of the embedder over a corpus: FLOPs, tokens and passages."""

    flops: float
    tokens: int
    passages: int

    def charge(self, accountant: Accountant) -> None:
        """Add this pass to ``accountant``'s ledger under ``encode_passages``."""
        if self.passages:
            accountant.ledger.add("encode_passages", self.flops, tokens=self.tokens, passages=self.passages)


class CorpusEncoder:
    """Length-sorted, shard-by-shard encoding of a fixed list of passages, and its cost.

    The passages are tokenized once here (the corpus never changes): ``order`` sorts them longest first,
    as ``Embedder.encode`` does, and each shard is a run of whole batches of ``batch_size`` along it
    (``shard_size`` passages; the last shard holds the rest), so the shards' batches are exactly those of
    one ``encode`` of the whole corpus, and at most ``n_shards`` of them. ``shards`` yields vectors in
    that sorted order; ``unsort`` puts them back at their corpus positions; ``encode_all`` does both (and
    charges ``cost`` when given an accountant).
    """

    def __init__(self, embedder: Embedder, texts: Sequence[str] | None = None, *, n_shards: int = 1,
                 tokens: TokenizedTexts | None = None):
        """``texts`` are tokenized here; or pass ``tokens``, the same texts tokenized earlier by
        ``embedder.tokenize_unpadded`` (the on-disk index path keeps them between versions)."""
        self.embedder = embedder
        if (texts is None) == (tokens is None):
            raise ValueError("pass exactly one of texts and tokens")
        self._tokens = embedder.tokenize_unpadded(texts) if tokens is None else tokens
        self.lengths: list[int] = self._tokens.lengths.tolist()
        """Token count of each passage, in corpus order."""
        self.order = np.argsort(-self._tokens.lengths, kind="stable")
        self.batch_size = int(embedder.batch_size)
        n_batches = -(-len(self.lengths) // self.batch_size)
        self.shard_size = self.batch_size * max(1, -(-n_batches // max(n_shards, 1)))

    @cached_property
    def sorted_tokens(self) -> TokenizedTexts:
        """The token ids in length-sorted order (what every encoding pass pads and runs: no re-tokenizing);
        made at the first pass, so an encoder built only for its :attr:`cost` never copies them."""
        tokens, self._tokens = self._tokens, None
        return tokens.take(self.order)

    @cached_property
    def cost(self) -> EncodingCost:
        """One pass: the forward FLOPs of each padded batch (as :meth:`shards` runs them)."""
        return EncodingCost(flops=texts_forward_flops(self.embedder.model.config, self.lengths, self.batch_size),
                            tokens=sum(self.lengths), passages=len(self.lengths))

    def shards(self, state_dict: dict | None = None, *, show_progress: bool = False) -> Iterator[np.ndarray]:
        """Vectors of each shard of the length-sorted passages, in order (after loading ``state_dict``, new
        embedder weights, when given)."""
        if state_dict is not None:
            self.embedder.load_state_dict(state_dict)
        for i in range(0, len(self.lengths), self.shard_size):
            yield self.embedder.encode_tokens(self.sorted_tokens.take(slice(i, i + self.shard_size)),
                                              batch_size=self.batch_size, show_progress=show_progress)

    def unsort(self, sorted_vectors: np.ndarray) -> np.ndarray:
        """Rows in length-sorted order -> rows in corpus order."""
        vectors = np.empty_like(sorted_vectors)
        vectors[self.order] = sorted_vectors
        return vectors

    def encode_all(self, state_dict: dict | None = None, *, accountant: Accountant | None = None,
                   show_progress: bool = False) -> np.ndarray:
        """Unit-norm float32 vectors [N, d] in corpus order; ``cost`` is charged to ``accountant``."""
        if not self.lengths:
            return np.zeros((0, self.embedder.dim), dtype=np.float32)
        vectors = self.unsort(np.concatenate(list(self.shards(state_dict, show_progress=show_progress))))
        if accountant is not None:
            self.cost.charge(accountant)
        return vectors


def encode_corpus(embedder: Embedder, corpus: Corpus, accountant: Accountant | None = None, *,
                  show_progress: bool = False) -> np.ndarray:
    """Every passage's vector [N, d] (corpus order) with the current embedder, charged to ``accountant``."""
    return CorpusEncoder(embedder, corpus.texts()).encode_all(accountant=accountant, show_progress=show_progress)


# ----------------------------------------------------------------------------------------------
# the frozen index cache


_BUILD_SETTINGS = {"flat": ("kind", "n_shards"), "ivf": ("kind", "n_shards", "nlist"),
                   "ivfpq": ("kind", "n_shards", "nlist", "pq_m", "pq_nbits")}
"""The index settings that change what an in-memory build produces, per kind. Search-time settings (``nprobe``,
``refine``, ``device``) and the other keys of ``index`` are applied to a reused index, not part of its name:
a new ``nprobe`` or a new config key must not re-encode the corpus."""


def weights_digest(embedder: Embedder) -> str:
    """sha256 of what the embedder's vectors depend on besides the settings: every tensor of its state (name,
    dtype, shape, bytes, in name order) and its tokenizer (a fast tokenizer's whole definition: vocabulary,
    normalizer, pre-tokenizer; else its vocabulary). The same weights give the same digest wherever they were
    loaded from."""
    h = hashlib.sha256()
    for name, tensor in sorted(embedder.model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy
    tok = embedder.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    elif callable(getattr(tok, "get_vocab", None)):
        h.update(json.dumps(tok.get_vocab(), sort_keys=True).encode())
    return h.hexdigest()


def index_signature(corpus: Corpus, embedder_cfg: EmbedderConfig, index_cfg: IndexConfig,
                    weights: str) -> dict[str, Any]:
    """What an index built from ``corpus`` depends on (JSON-serialisable; saved in its manifest); ``weights`` is
    :func:`weights_digest` of the embedder."""
    settings = index_cfg.model_dump(mode="json")
    return {"corpus": corpus.fingerprint(), "embedder": embedder_cfg.model, "weights_sha256": weights,
            "max_length": embedder_cfg.max_length, "pooling": embedder_cfg.pooling,
            "index": {k: settings[k] for k in _BUILD_SETTINGS[index_cfg.kind]}}


def index_cache_dir(cache_root: str | Path, signature: dict[str, Any]) -> Path:
    """``cache_root/<first 12 hex digits of the signature's SHA-256>``."""
    digest = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_root) / digest


def load_or_build_index(cache_root: str | Path | None, corpus: Corpus, embedder: Embedder, cfg: ExperimentConfig,
                        accountant: Accountant | None = None, *, show_progress: bool = True) -> ShardedIndex:
    """The index of ``corpus`` under ``embedder`` and ``cfg.index``: reused from ``cache_root`` (the run's
    ``output_dir/index``) when built there for the same signature, else encoded, built and saved there
    (``cache_root=None``: always built, never saved). Either way one encoding pass is charged."""
    sig = index_signature(corpus, cfg.embedder, cfg.index, weights_digest(embedder))
    folder = index_cache_dir(cache_root, sig) if cache_root is not None else None
    if folder is not None and (folder / index_store.MANIFEST).exists():
        try:
            index = index_store.load(folder, device=cfg.index.device)
        except IndexLoadError as e:  # a damaged cache is rebuilt, never trusted
            log.warning("cached index unusable, rebuilding it: %s", e)
            index = None
        if index is not None and index.extra.get("signature") == sig:
            log.info("reusing index at %s", folder)
            index.nprobe, index.refine = cfg.index.nprobe, cfg.index.refine  # search-time settings: today's
            if accountant is not None:
                CorpusEncoder(embedder, corpus.texts()).cost.charge(accountant)
            return index
    index = build_index(embedder, corpus, cfg.index, accountant, show_progress=show_progress)
    if folder is not None:
        index_store.save(index, folder, extra={"signature": sig}, overwrite=True)
    return index


def build_index(embedder: Embedder, corpus: Corpus, index_cfg: IndexConfig, accountant: Accountant | None = None,
                *, show_progress: bool = False) -> ShardedIndex:
    """Encode ``corpus`` with ``embedder`` as it is now (one pass, charged to ``accountant``) and build
    the configured index of it."""
    t0 = time.perf_counter()
    vectors = encode_corpus(embedder, corpus, accountant, show_progress=show_progress)
    index = ShardedIndex.from_config(vectors.shape[1], index_cfg).build(vectors)
    log.info("indexed %d passages in %.1fs", len(corpus), time.perf_counter() - t0)
    return index
