"""What a checkpoint's own state files hold: tensors and plain data only, and this process's generators as such.

``torch.load(weights_only=True)`` reads back tensors, dicts, lists, tuples, str, int, float, bool and None, and
refuses anything that would need unpickling (which could run code). :func:`check_plain` refuses such a payload
before it is saved; :func:`rng_state` / :func:`set_rng_state` put Python's, numpy's, torch's and CUDA's
generators in that form; :func:`read_state` parses a state file from the very bytes it checked against the
signed manifest's sha256 (:mod:`distrag.distributed.checkpoint`), so a file swapped after the check is not read.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import random
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distrag.errors import CheckpointError


def rng_state() -> dict:
    """This process's generators as tensors and plain data (what ``weights_only`` loading accepts)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn("CUDA RNG states saved for a different GPU count; not restored", RuntimeWarning,
                          stacklevel=2)


_LEAVES = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


def check_plain(obj: Any, where: str = "payload") -> None:
    """Raise TypeError unless ``obj`` is tensors and plain data (dict, list, tuple, str, int, float, bool,
    None): what ``torch.load(weights_only=True)`` reads back. Exact types: a numpy scalar or a dataclass
    would need pickle."""
    if type(obj) in _LEAVES or isinstance(obj, torch.Tensor):
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            check_plain(k, f"{where} key")
            check_plain(v, f"{where}[{k!r}]")
    elif type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
    else:
        raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot go into a checkpoint "
                        "(tensors, dict, list, tuple, str, int, float, bool and None only)")


def torch_bytes(obj: Any) -> bytes:
    """``obj`` as ``torch.save`` writes it (in memory: a payload that cannot be saved fails before any write)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def read_state(path: Path, keys: tuple[str, ...], sha256: str) -> dict:
    """A state file as a dict holding ``keys``; tensors and plain data only (no pickled objects), parsed from
    the bytes checked against ``sha256`` (the signed manifest's: no swap after the check is read)."""
    try:
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise CheckpointError(f"{path} does not match its checksum in the manifest (sha256): changed after "
                                  "it was verified")
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise CheckpointError(f"cannot read {path}: it holds objects other than tensors and plain data "
                              f"({found.group(1) if found else 'refused by weights_only'}); they are not "
                              "loaded, because unpickling them could run code") from None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to parse (bad zip, EOF, ...) is a bad file
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {str(e).strip()[:300]}") from None
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        raise CheckpointError(f"{path} does not hold a distrag checkpoint state (expected keys {list(keys)})")
    return obj
