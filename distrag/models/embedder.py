"""The retriever's encoder: any Hugging Face encoder, pooled and L2-normalised.

``Embedder`` is a ``torch.nn.Module`` so training code can treat it like any model (``parameters()``,
``train()``, DDP wrapping). ``forward`` is differentiable and used by the training strategies; ``encode``
is the fast no-grad path used to embed a corpus.

Pooling follows a sentence-transformers folder when there is one (``modules.json`` ->
``1_Pooling/config.json``: mean or CLS tokens); ``EmbedderConfig.pooling`` overrides it; the default is
mean pooling. ``encode`` matches ``SentenceTransformer(folder).encode(..., normalize_embeddings=True)``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distrag.atomic_io import follow_umask
from distrag.config import EmbedderConfig
from distrag.errors import EmbedderError
from distrag.models.sources import ModelSource, pick_device, resolve_model
from distrag.models.text_limits import char_limit, cut_chars

_META_FILE = "distrag_embedder.json"


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

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Each text's token count as :meth:`encode` sees it (special tokens in, truncated at ``max_length``)."""
        return [len(x) for x in self._token_ids(texts)["input_ids"]] if len(texts) else []

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

    def _pad(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        out = {}
        for key in rows[0]:
            fill = self.tokenizer.pad_token_id if key == "input_ids" else 0
            arr = np.full((len(rows), width), fill, dtype=np.int64)
            for i, r in enumerate(rows):
                seq = r[key]
                if left:
                    arr[i, width - len(seq):] = seq
                else:
                    arr[i, :len(seq)] = seq
            out[key] = torch.from_numpy(arr).to(self.device, non_blocking=True)
        return out

    def encode(self, texts: Sequence[str], *, batch_size: int | None = None,
               show_progress: bool = False) -> np.ndarray:
        """Unit-norm float32 embeddings ``[N, d]`` in input order, without gradients.

        All texts are tokenised in one call, sorted longest first (less padding), encoded in eval mode
        ``batch_size`` at a time, each batch padded to its longest text (the shapes
        ``distrag.costs.flops.texts_forward_flops`` charges), and put back in input order; the module's
        training flag is restored.
        """
        from tqdm.auto import tqdm

        if isinstance(texts, str):
            raise TypeError("expected a list of strings, got a single string")
        n = len(texts)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        bs = int(batch_size or self.batch_size)
        enc = self._token_ids(texts)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        lengths = np.fromiter((len(x) for x in enc["input_ids"]), dtype=np.int64, count=n)
        order = np.argsort(-lengths, kind="stable")
        out = np.empty((n, self.dim), dtype=np.float32)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                for start in tqdm(range(0, n, bs), total=math.ceil(n / bs), desc="encode",
                                  disable=not show_progress, leave=False):
                    idx = order[start:start + bs]
                    batch = self._pad([{k: enc[k][i] for k in keys} for i in idx])
                    out[idx] = self(**batch).float().cpu().numpy()
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
