"""The retriever's encoder: any Hugging Face encoder, pooled and L2-normalised.

``Embedder`` is a ``torch.nn.Module`` so training code can treat it like any model (``parameters()``,
``train()``, DDP wrapping). ``forward`` is differentiable and used by the training strategies; ``encode``
is the fast no-grad path used to embed a corpus.

Pooling follows a sentence-transformers folder when there is one (``modules.json`` ->
``1_Pooling/config.json``: mean or CLS tokens); ``EmbedderConfig.pooling`` overrides it; the default is
mean pooling. ``encode`` matches ``SentenceTransformer(folder).encode(..., normalize_embeddings=True)``.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distrag.atomic_io import follow_umask
from distrag.config import EmbedderConfig
from distrag.errors import EmbedderError
from distrag.models.sources import MODEL_LOADS, ModelSource, pick_device, resolve_model
from distrag.models.text_limits import char_limit, cut_chars

_META_FILE = "distrag_embedder.json"

TOKENIZE_ROWS = 4_096
"""Texts per tokenizer call (a fast tokenizer's encodings of a large list take ~1 KB per token)."""


@dataclass(frozen=True)
class TokenizedTexts:
    """Texts tokenized once (special tokens in, truncated, unpadded), stored flat: row ``i`` is
    ``input_ids[offsets[i]:offsets[i + 1]]`` (int32, 4 bytes a token instead of a Python list's ~36), with
    ``token_type_ids`` (int8) when the tokenizer returns them. What :meth:`Embedder.encode_tokens` pads and
    encodes; a corpus that is encoded again and again (the index rank's versions) is tokenized only once."""

    input_ids: np.ndarray
    offsets: np.ndarray
    token_type_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per text (int64)."""
        return np.diff(self.offsets)

    def row_lengths(self, rows: np.ndarray) -> np.ndarray:
        """Tokens of the texts at ``rows`` (an int index array): work in the rows, not the corpus."""
        return self.offsets[rows + 1] - self.offsets[rows]

    def take(self, rows: np.ndarray | slice) -> TokenizedTexts:
        """The texts at ``rows`` (a slice, an index array with Python's negative indices, or a boolean mask), in
        that order."""
        n = len(self)
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(n), dtype=np.int64)
        else:
            rows = np.asarray(rows)
            rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64, copy=False)
            if rows.size and (rows.min() < -n or rows.max() >= n):
                raise IndexError(f"rows out of range for {n} texts")
            rows = np.where(rows < 0, rows + n, rows)
        starts, lengths = self.offsets[rows], self.row_lengths(rows)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # source position of every kept token: its row's start plus its place in the row
        src = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        tt = None if self.token_type_ids is None else self.token_type_ids[src]
        return TokenizedTexts(self.input_ids[src], offsets, tt)

    @classmethod
    def concat(cls, parts: Sequence[TokenizedTexts]) -> TokenizedTexts:
        """The rows of ``parts``, one after the other."""
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return cls(np.zeros(0, np.int32), np.zeros(1, np.int64))
        lengths = np.concatenate([p.lengths for p in parts])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tt = None if parts[0].token_type_ids is None else np.concatenate([p.token_type_ids for p in parts])
        return cls(np.concatenate([p.input_ids for p in parts]), offsets, tt)


# ----------------------------------------------------------------------------------------------
# sentence-transformers folder reading


def _read_json(source: ModelSource, name: str) -> dict | list | None:
    """A JSON file of a local folder or (cached / reachable) hub repo; None when absent."""
    if source.local:
        p = Path(source.path_or_id) / name
        return json.loads(p.read_text()) if p.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(source.path_or_id, name)).read_text())
    except (OSError, ValueError, EntryNotFoundError):  # absent file, offline, unknown repo
        return None


def read_st_settings(source: ModelSource) -> dict:
    """Pooling, transformer subfolder and lower-casing of a sentence-transformers folder.

    Returns ``{"pooling": "mean"|"cls"|None, "subfolder": str, "do_lower_case": bool}``; pooling is None
    when the folder is not a sentence-transformers folder; ``"unsupported"`` lists pooling modes we do not
    implement (max, weighted mean...).
    """
    out: dict = {"pooling": None, "subfolder": "", "do_lower_case": False}
    modules = _read_json(source, "modules.json")
    if not isinstance(modules, list):
        return out
    for m in modules:
        kind = str(m.get("type", ""))
        sub = str(m.get("path", "") or "")
        if kind.endswith("models.Transformer"):
            out["subfolder"] = sub
            st_cfg = _read_json(source, f"{sub}/sentence_bert_config.json" if sub else
                                "sentence_bert_config.json") or {}
            out["do_lower_case"] = bool(st_cfg.get("do_lower_case", False))
        elif kind.endswith("models.Pooling"):
            pcfg = _read_json(source, f"{sub}/config.json") or {}
            modes = [k for k in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens",
                                 "weightedmean_tokens", "lasttoken") if pcfg.get(f"pooling_mode_{k}")]
            if modes == ["mean_tokens"]:
                out["pooling"] = "mean"
            elif modes == ["cls_token"]:
                out["pooling"] = "cls"
            elif modes:
                out["unsupported"] = modes
    return out


# ----------------------------------------------------------------------------------------------


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token states ``[B, L, d]`` to ``[B, d]`` (not normalised).

    ``mean``: average over attended tokens (sentence-transformers' formula). ``cls``: the first
    attended token (index 0 with right padding).
    """
    if mode == "mean":
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if mode == "cls":
        first = attention_mask.to(torch.long).argmax(dim=1)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), first]
    raise EmbedderError(f"unknown pooling {mode!r}; expected 'mean' or 'cls'")


class Embedder(torch.nn.Module):
    """A Hugging Face encoder + pooling + L2 normalisation.

    Build it with :meth:`from_config` or :meth:`load`; ``model`` is the wrapped ``AutoModel`` (its
    ``config`` carries hidden size, layers and intermediate size for the FLOP ledger).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, pooling: str = "mean", max_length: int = 128,
                 batch_size: int = 64, name: str = "", do_lower_case: bool = False):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise EmbedderError(f"unknown pooling {pooling!r}; expected 'mean' or 'cls'")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        limit = getattr(model.config, "max_position_embeddings", None)
        self.max_length = int(min(max_length, limit)) if isinstance(limit, int) and limit > 0 else max_length
        self.batch_size = batch_size
        self.name = name
        self.do_lower_case = do_lower_case
        if tokenizer.pad_token_id is None:
            raise EmbedderError(f"{name}: the tokenizer has no pad token; batched encoding needs one")
        # BERT-style poolers (dense + tanh on [CLS]) are computed but never used by our pooling: freeze
        # them so training (and DDP's unused-parameter check) only sees parameters that get gradients.
        pooler = getattr(model, "pooler", None)
        if isinstance(pooler, torch.nn.Module):
            pooler.requires_grad_(False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: EmbedderConfig, device: str | torch.device | None = None) -> Embedder:
        """Load ``cfg.model`` (hub id, folder or offline alias) onto ``device`` (default: cuda if any)."""
        from transformers import AutoModel, AutoTokenizer

        source = resolve_model(cfg.model)
        if source.gguf_file:
            raise EmbedderError(f"{cfg.model}: GGUF files are for generators, not encoders")
        st = read_st_settings(source)
        if cfg.pooling == "auto" and st.get("unsupported"):
            raise EmbedderError(
                f"{cfg.model}: sentence-transformers pooling {st['unsupported']} is not supported; set "
                f"embedder.pooling to 'mean' or 'cls' to override it")
        pooling = cfg.pooling if cfg.pooling != "auto" else (st["pooling"] or "mean")
        sub = {"subfolder": st["subfolder"]} if st["subfolder"] else {}
        meta = _read_json(source, _META_FILE) or {}
        with MODEL_LOADS:  # transformers' loading is not thread-safe (sources.MODEL_LOADS)
            tok = AutoTokenizer.from_pretrained(source.path_or_id, trust_remote_code=cfg.trust_remote_code, **sub)
            model = AutoModel.from_pretrained(source.path_or_id, trust_remote_code=cfg.trust_remote_code,
                                              dtype=torch.float32, **sub)
        emb = cls(model, tok, pooling=pooling, max_length=cfg.max_length, batch_size=cfg.batch_size,
                  name=cfg.model, do_lower_case=bool(meta.get("do_lower_case", st["do_lower_case"])))
        return emb.to(pick_device(device))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None, *,
             trust_remote_code: bool = False) -> Embedder:
        """Reload an embedder written by :meth:`save` (pooling and max length included)."""
        path = Path(path)
        meta_file = path / _META_FILE
        if not meta_file.is_file():
            raise EmbedderError(f"{path} is not a saved Embedder (no {_META_FILE}); use from_config for "
                                f"plain model folders")
        meta = json.loads(meta_file.read_text())
        cfg = EmbedderConfig(model=str(path), pooling=meta["pooling"], max_length=meta["max_length"],
                             batch_size=meta.get("batch_size", 64), trust_remote_code=trust_remote_code)
        return cls.from_config(cfg, device)

    def save(self, path: str | Path) -> Path:
        """Write weights, tokenizer, our pooling info and a sentence-transformers layout to ``path``.

        The folder reloads with :meth:`load` and also with ``SentenceTransformer(path)``.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        dim = self.dim
        (path / _META_FILE).write_text(json.dumps({
            "pooling": self.pooling, "max_length": self.max_length, "batch_size": self.batch_size,
            "do_lower_case": self.do_lower_case, "base_model": self.name, "dim": dim}, indent=2))
        (path / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ], indent=2))
        (path / "sentence_bert_config.json").write_text(json.dumps(
            {"max_seq_length": self.max_length, "do_lower_case": self.do_lower_case}))
        (path / "1_Pooling").mkdir(exist_ok=True)
        (path / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": dim, "pooling_mode_cls_token": self.pooling == "cls",
            "pooling_mode_mean_tokens": self.pooling == "mean", "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
        (path / "2_Normalize").mkdir(exist_ok=True)
        return follow_umask(path)

    # ------------------------------------------------------------------ properties
    @property
    def config(self):
        """The wrapped model's config (hidden_size, num_hidden_layers, intermediate_size, ...)."""
        return self.model.config

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------------ tokenisation
    def _prep(self, texts: Sequence[str]) -> list[str]:
        if isinstance(texts, str):
            raise TypeError("expected a list of strings, got a single string")
        limit = char_limit(self.tokenizer, self.max_length)  # a text of megabytes: cut before tokenizing
        texts = [cut_chars(str(t), limit) for t in texts]
        return [t.lower() for t in texts] if self.do_lower_case else texts

    def _token_ids(self, texts: Sequence[str]):
        """Unpadded, truncated (``max_length``) tokenizer output of ``texts`` (what ``encode`` batches)."""
        return self.tokenizer(self._prep(texts), padding=False, truncation=True, max_length=self.max_length)

    def tokenize_unpadded(self, texts: Sequence[str]) -> TokenizedTexts:
        """``texts`` tokenized as :meth:`encode` sees them, :data:`TOKENIZE_ROWS` at a time, stored flat."""
        if isinstance(texts, str):
            raise TypeError("expected a list of strings, got a single string")
        texts = list(texts)
        parts = []
        for i in range(0, len(texts), TOKENIZE_ROWS):
            enc = self._token_ids(texts[i:i + TOKENIZE_ROWS])
            ids = enc["input_ids"]
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            offsets = np.zeros(len(ids) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            n_tok = int(offsets[-1])
            tt = enc.get("token_type_ids")
            parts.append(TokenizedTexts(
                np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=n_tok), offsets,
                None if tt is None else np.fromiter(itertools.chain.from_iterable(tt), dtype=np.int8, count=n_tok)))
        if not parts:
            return TokenizedTexts(np.zeros(0, np.int32), np.zeros(1, np.int64))
        return TokenizedTexts.concat(parts)

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Each text's token count as :meth:`encode` sees it (special tokens in, truncated at ``max_length``)."""
        return self.tokenize_unpadded(texts).lengths.tolist() if len(texts) else []

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Padded, truncated (``max_length``) tensors on the module's device."""
        enc = self.tokenizer(self._prep(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    # ------------------------------------------------------------------ compute
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw) -> torch.Tensor:
        """Differentiable unit-norm embeddings ``[B, d]``; extra tokenizer outputs pass through."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return F.normalize(pool(hidden, attention_mask, self.pooling), p=2, dim=-1)

    def _pad(self, tokens: TokenizedTexts, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The texts at ``rows`` as one batch padded to its longest (the tokenizer's padding side)."""
        lengths = tokens.row_lengths(rows)
        width = int(lengths.max())
        cols = np.arange(width)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        shift = (width - lengths)[:, None] if left else 0
        mask = (cols >= shift) & (cols < shift + lengths[:, None]) if left else cols < lengths[:, None]
        src = (tokens.offsets[rows][:, None] + cols - shift)[mask]
        ids = np.full((len(rows), width), self.tokenizer.pad_token_id, dtype=np.int64)
        ids[mask] = tokens.input_ids[src]
        out = {"input_ids": ids, "attention_mask": mask.astype(np.int64)}
        if tokens.token_type_ids is not None:
            tt = np.zeros((len(rows), width), dtype=np.int64)
            tt[mask] = tokens.token_type_ids[src]
            out["token_type_ids"] = tt
        return {k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in out.items()}

    def encode(self, texts: Sequence[str], *, batch_size: int | None = None,
               show_progress: bool = False) -> np.ndarray:
        """Unit-norm float32 embeddings ``[N, d]`` in input order, without gradients.

        The texts are tokenised once (:meth:`tokenize_unpadded`) and encoded by :meth:`encode_tokens`.
        """
        if isinstance(texts, str):
            raise TypeError("expected a list of strings, got a single string")
        return self.encode_tokens(self.tokenize_unpadded(texts), batch_size=batch_size, show_progress=show_progress)

    def encode_tokens(self, tokens: TokenizedTexts, *, batch_size: int | None = None,
                      show_progress: bool = False) -> np.ndarray:
        """Unit-norm float32 embeddings ``[N, d]`` of tokenized texts, in their order, without gradients.

        Sorted longest first (less padding), encoded in eval mode ``batch_size`` at a time, each batch
        padded to its longest text (the shapes ``distrag.costs.flops.texts_forward_flops`` charges), and
        put back in input order; the module's training flag is restored.
        """
        from tqdm.auto import tqdm

        n = len(tokens)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        bs = int(batch_size or self.batch_size)
        order = np.argsort(-tokens.lengths, kind="stable")
        out = np.empty((n, self.dim), dtype=np.float32)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                for start in tqdm(range(0, n, bs), total=math.ceil(n / bs), desc="encode",
                                  disable=not show_progress, leave=False):
                    idx = order[start:start + bs]
                    out[idx] = self(**self._pad(tokens, idx)).float().cpu().numpy()
        finally:
            self.train(was_training)
        return out

    def embed_questions(self, texts: Sequence[str], grad: bool) -> torch.Tensor:
        """Question vectors ``[B, d]`` on the module's device.

        ``grad=True``: a differentiable forward pass in the current mode (training). ``grad=False``:
        :meth:`encode` (eval mode, no graph), returned as a tensor.
        """
        if grad:
            return self(**self.tokenize(texts))
        return torch.from_numpy(self.encode(texts)).to(self.device)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, pooling={self.pooling}, max_length={self.max_length}, dim={self.dim}"
