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

A corpus read from disk (``corpus.on_disk``: :class:`~distrag.data.disk_corpus.DiskCorpus`) is never held whole:
:func:`encode_chunks` encodes it ``index.chunk_passages`` at a time (one ``CorpusEncoder`` per chunk, each chunk's
cost charged) into a vector store on disk, and :func:`build_index` builds the index from that store
(:func:`~distrag.retrieval.vector_store.build_from_store`), as the index rank's ``index.on_disk`` path does. What
such a pass costs is the sum of its chunks' costs (each chunk is length-sorted on its own, so padding differs a
little from one sort of the whole corpus): :func:`corpus_encoding_cost`.

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
warm or not, and gets today's search-time settings (``nprobe``, ``refine``). The build records that encoding's
cost in the index (``extra["encoding_cost"]``, with the batch size and chunking it was made with), so charging a
reused index never re-tokenizes the corpus.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from distrag.costs.flops import texts_forward_flops
from distrag.costs.memory import release_free_memory
from distrag.errors import IndexLoadError
from distrag.models.embedder import TOKENIZE_ROWS, TokenizedTexts
from distrag.retrieval import index_store
from distrag.retrieval.sharded_index import ShardedIndex
from distrag.retrieval.vector_store import VectorStoreWriter, build_from_store

if TYPE_CHECKING:
    from distrag.config import EmbedderConfig, ExperimentConfig, IndexConfig
    from distrag.costs.accountant import Accountant
    from distrag.data.records import BaseCorpus, PassageChunk
    from distrag.models.embedder import Embedder

__all__ = ["CorpusEncoder", "EncodingCost", "build_index", "corpus_encoding_cost", "encode_chunks", "encode_corpus",
           "index_cache_dir", "index_signature", "load_or_build_index", "weights_digest"]

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

    def __add__(self, other: EncodingCost) -> EncodingCost:
        return EncodingCost(self.flops + other.flops, self.tokens + other.tokens, self.passages + other.passages)


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


def encode_corpus(embedder: Embedder, corpus: BaseCorpus, accountant: Accountant | None = None, *,
                  show_progress: bool = False, chunk_passages: int = 50_000) -> np.ndarray:
    """Every passage's vector [N, d] (corpus order) with the current embedder, charged to ``accountant``; a corpus
    read from disk is encoded ``chunk_passages`` at a time (its texts are never all in memory; the vectors are)."""
    if not corpus.on_disk:
        return CorpusEncoder(embedder, corpus.texts()).encode_all(accountant=accountant, show_progress=show_progress)
    return np.concatenate([CorpusEncoder(embedder, c.texts()).encode_all(accountant=accountant)
                           for c in corpus.chunks(chunk_passages)])


def encode_chunks(embedder: Embedder, chunks: Iterable[PassageChunk], writer: VectorStoreWriter, *,
                  accountant: Accountant | None = None, token_cache: str | Path | None = None,
                  costs: list[EncodingCost] | None = None) -> Iterator[int]:
    """Encode each chunk (charged to ``accountant``; its cost appended to ``costs`` when given) and append its
    vectors to ``writer``; yields the rows written so far after each chunk (the index rank heartbeats there). The
    caller closes ``writer``.

    ``token_cache``: a folder keeping each chunk's token ids (``<chunk>.npz``, about 4 bytes a token): a chunk
    found there is not tokenized again, so a corpus encoded once per index version is tokenized once."""
    for i, chunk in enumerate(chunks):
        tokens = _cached_tokens(embedder, chunk, Path(token_cache) / f"{i:06d}.npz") if token_cache else None
        # encoder shards of about TOKENIZE_ROWS texts (the index rank heartbeats between shards)
        n_shards = -(-len(chunk.passages) // TOKENIZE_ROWS)
        encoder = (CorpusEncoder(embedder, tokens=tokens, n_shards=n_shards) if tokens is not None
                   else CorpusEncoder(embedder, chunk.texts(), n_shards=n_shards))
        writer.append(encoder.encode_all(accountant=accountant))
        if costs is not None:
            costs.append(encoder.cost)
        del encoder, tokens
        release_free_memory()  # the chunk's texts and token encodings: freed, now given back (costs/memory.py)
        yield writer.count


def _cached_tokens(embedder: Embedder, chunk: PassageChunk, path: Path) -> TokenizedTexts:
    """The chunk's token ids from ``path``, or tokenized and written there (temp file, then rename)."""
    if path.exists():
        with np.load(path) as z:
            tokens = TokenizedTexts(z["input_ids"], z["offsets"], z["token_type_ids"] if "token_type_ids" in z
                                    else None)
        if len(tokens) == len(chunk.passages):
            return tokens
    tokens = embedder.tokenize_unpadded(chunk.texts())
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"input_ids": tokens.input_ids, "offsets": tokens.offsets}
    if tokens.token_type_ids is not None:
        arrays["token_type_ids"] = tokens.token_type_ids
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)
    return tokens


def _chunking(corpus: BaseCorpus, index_cfg: IndexConfig) -> int | None:
    """Passages per chunk of an encoding pass over ``corpus``: ``index.chunk_passages`` when it is read from disk,
    None (one pass over the whole corpus) when it is in memory."""
    return index_cfg.chunk_passages if corpus.on_disk else None


def _cost_record(cost: EncodingCost, embedder: Embedder, chunk_passages: int | None) -> dict[str, Any]:
    """What an index records of its encoding (``extra["encoding_cost"]``): the cost and how it was made."""
    return {**asdict(cost), "batch_size": int(embedder.batch_size), "chunk_passages": chunk_passages}


def corpus_encoding_cost(embedder: Embedder, corpus: BaseCorpus, *, chunk_passages: int | None = None,
                         recorded: dict[str, Any] | None = None) -> EncodingCost:
    """What one encoding pass over ``corpus`` costs: in one length-sorted pass (``chunk_passages`` None) or chunk by
    chunk. ``recorded``: an index's ``extra["encoding_cost"]``, used when it was made the same way (same batch
    size and chunking; the index signature vouches for the rest), so the corpus need not be tokenized again."""
    if recorded and recorded.get("batch_size") == embedder.batch_size \
            and recorded.get("chunk_passages") == chunk_passages:
        return EncodingCost(float(recorded["flops"]), int(recorded["tokens"]), int(recorded["passages"]))
    if chunk_passages is None:
        return CorpusEncoder(embedder, corpus.texts()).cost
    total = EncodingCost(0.0, 0, 0)
    for chunk in corpus.chunks(chunk_passages):  # tokenized chunk by chunk: memory follows the chunk
        total += CorpusEncoder(embedder, chunk.texts()).cost
    return total


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


def index_signature(corpus: BaseCorpus, embedder_cfg: EmbedderConfig, index_cfg: IndexConfig,
                    weights: str) -> dict[str, Any]:
    """What an index built from ``corpus`` depends on (JSON-serialisable; saved in its manifest); ``weights`` is
    :func:`weights_digest` of the embedder. A ``flat`` index is the same whether the corpus is in memory or read
    from disk (one cache serves both); IVF cells of a corpus read from disk are trained on ``index.train_size``
    sampled rows (:func:`build_index`), so that is named too."""
    settings = index_cfg.model_dump(mode="json")
    index = {k: settings[k] for k in _BUILD_SETTINGS[index_cfg.kind]}
    if corpus.on_disk and index_cfg.kind != "flat":
        index.update(built_from="chunks", train_size=index_cfg.train_size)
    return {"corpus": corpus.fingerprint(), "embedder": embedder_cfg.model, "weights_sha256": weights,
            "max_length": embedder_cfg.max_length, "pooling": embedder_cfg.pooling, "index": index}


def index_cache_dir(cache_root: str | Path, signature: dict[str, Any]) -> Path:
    """``cache_root/<first 12 hex digits of the signature's SHA-256>``."""
    digest = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_root) / digest


def load_or_build_index(cache_root: str | Path | None, corpus: BaseCorpus, embedder: Embedder, cfg: ExperimentConfig,
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
                corpus_encoding_cost(embedder, corpus, chunk_passages=_chunking(corpus, cfg.index),
                                     recorded=index.extra.get("encoding_cost")).charge(accountant)
            return index
    index = build_index(embedder, corpus, cfg.index, accountant, show_progress=show_progress)
    if folder is not None:
        index_store.save(index, folder, extra={"signature": sig, "encoding_cost": index.extra["encoding_cost"]},
                         overwrite=True)
    return index


def build_index(embedder: Embedder, corpus: BaseCorpus, index_cfg: IndexConfig, accountant: Accountant | None = None,
                *, show_progress: bool = False) -> ShardedIndex:
    """Encode ``corpus`` with ``embedder`` as it is now (one pass, charged to ``accountant``) and build the configured
    index of it; the pass' cost is recorded in ``index.extra["encoding_cost"]``. A corpus in memory is encoded in
    one length-sorted pass; one read from disk chunk by chunk into a vector store (in a temporary folder next to its
    side files), from which the index is built: memory follows the chunk and the index, not the corpus."""
    t0 = time.perf_counter()
    chunk = _chunking(corpus, index_cfg)
    if chunk is None:
        encoder = CorpusEncoder(embedder, corpus.texts())
        vectors = encoder.encode_all(accountant=accountant, show_progress=show_progress)
        index = ShardedIndex.from_config(vectors.shape[1], index_cfg).build(vectors)
        cost = encoder.cost
    else:
        index, cost = _build_from_chunks(embedder, corpus, index_cfg, accountant, show_progress=show_progress)
    index.extra["encoding_cost"] = _cost_record(cost, embedder, chunk)
    log.info("indexed %d passages in %.1fs", len(corpus), time.perf_counter() - t0)
    return index


def _build_from_chunks(embedder: Embedder, corpus: BaseCorpus, index_cfg: IndexConfig, accountant: Accountant | None,
                       *, show_progress: bool = False) -> tuple[ShardedIndex, EncodingCost]:
    """The on-disk corpus' build (:func:`build_index`): chunks -> a vector store in a temporary folder -> the index.
    The folder is removed at the end: a ``flat`` index holds its own copy of the rows, and the stored vectors an
    ``ivf`` / ``ivfpq`` index re-scores from are memory maps, which stay readable after their files are unlinked
    (POSIX) and are written into the index's own folder when it is saved."""
    from tqdm.auto import tqdm

    work = Path(tempfile.mkdtemp(prefix=".encode-", dir=corpus.scratch_dir))
    costs: list[EncodingCost] = []
    try:
        writer = VectorStoreWriter(work / "store", embedder.dim, shard_rows=-(-len(corpus) // index_cfg.n_shards))
        with tqdm(total=len(corpus), unit="passage", desc="encode corpus", disable=not show_progress) as bar:
            for count in encode_chunks(embedder, corpus.chunks(index_cfg.chunk_passages), writer,
                                       accountant=accountant, costs=costs):
                bar.update(count - bar.n)
        index = build_from_store(writer.close(), index_cfg)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return index, sum(costs, EncodingCost(0.0, 0, 0))
