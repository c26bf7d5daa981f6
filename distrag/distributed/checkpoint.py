"""Checkpoints that resume exactly, written atomically by several trainers and verified before they are read.

Layout of ``root`` (its parent is the run folder, which holds the run's secret: :mod:`run_secret`)::

    step_00000120/
        trainer_state.pt    payload of trainer 0 (embedder + optimizer + scheduler state, data
                            position, index version/path, ledger totals, MLflow run id, ...)
        rank_00000.pt ...   per-trainer RNG states (python, numpy, torch, cuda) + rank_payload
        ds/                 DeepSpeed's engine.save_checkpoint (tag "ds"), when an engine is passed
        COMPLETE            manifest, written last: step, trainers, time, ``index_version`` (the published
                            index version in use, kept by the index rank's pruning), ``files`` (size and sha256 of
                            every other file) and ``signature`` (HMAC of the manifest under the run's
                            secret); its presence marks a complete checkpoint
    latest                  name of the newest complete checkpoint (replaced atomically, LAST)

Save protocol (every trainer calls ``save``; it contains collectives): trainer 0 clears and creates
``.step_XXXXXXXX.tmp``; barrier; trainer 0 writes the shared payload, every trainer its RNG file,
all of them DeepSpeed's checkpoint; barrier; trainer 0 hashes every file, writes COMPLETE, renames
the folder into place, replaces ``latest``, prunes; barrier. A crash anywhere before the rename leaves
only a ``.tmp`` folder and ``latest`` still names the previous complete checkpoint. The folder must be
on a file system shared by all trainers (multi-node: the cluster's shared storage).

Trust: the manifest's signature (under this run's secret) is checked FIRST, for every checkpoint, before any
file is hashed or read: sizes and checksums alone prove nothing, whoever rewrites a file can recompute them
(issue 19: a zeroed encoder with a recomputed manifest was resumed). The signed manifest holds every file's
sha256; ``trainer_state.pt`` and ``rank_*.pt`` (tensors and plain data only, checked when saved) are parsed
with ``torch.load(weights_only=True)`` from the very bytes checked against it, and DeepSpeed's loader (which
unpickles) runs only on a verified checkpoint. Every path the payload names (keys ``path`` / ``*_path``) must
lie inside the run folder. Resume (:meth:`CheckpointManager.resolve`): ``auto`` takes the newest complete and
valid checkpoint, saying on trainer 0 which newer ones it skipped and why (one copied in from another run:
its signature does not verify); an explicit one that is not valid is a :class:`CheckpointError` naming the
bad file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distrag.atomic_io import atomic_write_bytes, atomic_write_json, atomic_write_text
from distrag.distributed import roles, run_secret
from distrag.errors import CheckpointError

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"step_(\d{8,})")
MANIFEST = "COMPLETE"
TRAINER_STATE = "trainer_state.pt"
DS_SUBDIR = "ds"
DS_TAG = "ds"
_CHUNK = 1 << 20



# ----------------------------------------------------------------------------------------------
# what a checkpoint's own state files hold: tensors and plain data only (torch.load(weights_only=True)
# reads them back and refuses anything that would need unpickling), parsed from the very bytes checked
# against the signed manifest's sha256, so a file swapped after the check is not read


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


@dataclass
class Restored:
    step: int
    payload: dict
    """What trainer 0 saved (the same on every trainer)."""
    rank_payload: dict | None
    """What this trainer saved for itself."""
    path: Path
    client_state: dict | None = None
    """DeepSpeed's client state, when an engine was loaded."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    """Every entry below ``folder`` except the manifest and folders, as sorted relative POSIX paths."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath)
        for name in filenames + [d for d in dirnames if (base / d).is_symlink()]:
            rel = (base / name).relative_to(folder).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _stats(folder: Path) -> tuple:
    """Size, modification time and inode of every file below ``folder``: changes when a file is rewritten."""
    out = []
    for rel in _files(folder):
        st = (folder / rel).lstat()
        out.append((rel, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def _signed_text(manifest: dict) -> str:
    return json.dumps({k: v for k, v in manifest.items() if k != "signature"}, sort_keys=True)


def _named_paths(obj: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """``(where, value)`` of every value under a key ``path`` or ``*_path`` in a payload's dicts and lists."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        at = f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else str(k)
        if isinstance(k, str) and (k == "path" or k.endswith("_path")):
            yield at, v
        else:
            yield from _named_paths(v, at)


def _inside(value: Any, folder: Path) -> bool:
    try:
        return value is None or (isinstance(value, str) and Path(value).resolve().is_relative_to(folder))
    except (OSError, RuntimeError, ValueError):
        return False


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def referenced_index_versions(root: str | Path) -> set[int]:
    """The published index versions the complete checkpoints under ``root`` name (their manifests'
    ``index_version``): the index rank keeps them, so each checkpoint can resume."""
    found = set()
    for path in list_complete(root):
        try:
            version = json.loads((path / MANIFEST).read_text()).get("index_version")
        except (OSError, ValueError, AttributeError):
            continue  # pruned meanwhile, or not ours: resolve() reports it
        if isinstance(version, int):
            found.add(version)
    return found


def list_complete(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    return [p for p in reversed(_step_dirs(root)) if is_complete(p)]


def _step_dirs(root: str | Path) -> list[Path]:
    """Checkpoint folders under ``root`` (complete or not), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


class CheckpointManager:
    """Save / validate / load / prune checkpoints under ``root``. Construct on every trainer (not the index rank)."""

    def __init__(self, root: str | Path, keep: int = 2, ctx: roles.DistContext | None = None):
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.root = Path(root)
        self.keep = keep
        self.ctx = ctx or roles.current()
        if self.ctx.info.is_index:
            raise ValueError("checkpoints are written by the trainers; the index rank holds no state to save")
        self._valid: dict[Path, tuple] = {}  # checkpoint -> (manifest, files' stats) when its files last matched

    @property
    def _rank(self) -> int:
        return self.ctx.info.trainer_rank

    def _secret(self) -> bytes:
        return run_secret.run_secret(self.root.parent)

    # -- saving --------------------------------------------------------------------------------------
    def save(self, step: int, payload: dict, *, engine=None, rank_payload: dict | None = None,
             index_version: int | None = None) -> Path:
        """Collective: every trainer calls it with the same ``step``. Only trainer 0's ``payload`` is
        written; each trainer's RNG state and ``rank_payload`` go to its own file. Payloads must be tensors
        and plain data (TypeError otherwise, before anything is written). ``index_version``: the published
        index version the payload uses, named in the manifest so the index rank never prunes it."""
        name = f"step_{step:08d}"
        final = self.root / name
        tmp = self.root / f".{name}.tmp"
        try:  # serialised first: a payload that cannot be saved stops every trainer before anything is written
            check_plain(rank_payload, "rank_payload")
            if self.ctx.info.is_rank0:
                check_plain(payload, "payload")
            shared = torch_bytes({"step": step, "payload": payload}) if self.ctx.info.is_rank0 else b""
            mine, error = torch_bytes({"rng": rng_state(), "rank_payload": rank_payload}), None
        except TypeError as e:
            error = e
        if self.ctx.all_reduce_flag(error is not None):
            raise error or RuntimeError("another trainer's checkpoint state cannot be saved (see its log)")
        if self.ctx.info.is_rank0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save
            tmp.mkdir()
        self.ctx.barrier_trainers()
        if self.ctx.info.is_rank0:
            atomic_write_bytes(tmp / TRAINER_STATE, shared)
        atomic_write_bytes(tmp / f"rank_{self._rank:05d}.pt", mine)
        if engine is not None:
            # a collective (every trainer); ZeRO shards are written by their owners
            engine.save_checkpoint(str(tmp / DS_SUBDIR), tag=DS_TAG)
        self.ctx.barrier_trainers()
        if self.ctx.info.is_rank0:
            manifest = {"step": step, "n_trainers": self.ctx.info.n_trainers, "engine": engine is not None,
                        "time": time.time(), "index_version": index_version,
                        "files": {rel: {"size": (tmp / rel).stat().st_size, "sha256": _sha256(tmp / rel)}
                                  for rel in _files(tmp)}}
            manifest["signature"] = run_secret.sign(self._secret(), _signed_text(manifest))
            atomic_write_json(tmp / MANIFEST, manifest)
            if final.exists():  # the same step saved twice (e.g. preemption right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(self.root / "latest", name + "\n")
            self._prune()
        self.ctx.barrier_trainers()
        return final

    def _prune(self) -> None:
        done = list_complete(self.root)
        for old in done[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for p in self.root.glob(".step_*.tmp"):  # crashed saves
            shutil.rmtree(p, ignore_errors=True)

    # -- validating ----------------------------------------------------------------------------------
    def validate(self, path: str | Path) -> dict:
        """The manifest of checkpoint ``path`` once its signature verifies under this run's secret (checked
        first: nothing of an unsigned or foreign checkpoint is hashed or read) and every file matches it:
        present, same size, same sha256, and no file it does not list. Raises :class:`CheckpointError`
        naming the bad file."""
        path = Path(path)
        mpath = path / MANIFEST
        try:
            text = mpath.read_text()
            manifest = json.loads(text)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} is incomplete or corrupt (no readable {MANIFEST}): {e}") from None
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or not isinstance(manifest.get("step"), int):
            raise CheckpointError(f"{mpath} lists no file checksums (written by an older distrag, or edited): "
                                  "it cannot be verified")
        if not run_secret.verify(self._secret(), manifest.get("signature"), _signed_text(manifest)):
            raise CheckpointError(
                f"{mpath}: signature does not verify under this run's secret "
                f"({run_secret.secret_path(self.root.parent)}): written by another run (another configuration, "
                "or copied in) or edited after it was saved, so nothing in it is read; resume a checkpoint of "
                f"this configuration's run ({self.root}) or start fresh with distributed.resume=none")
        seen = (text, _stats(path))  # a resume validates, then loads (twice): hash the files once
        if self._valid.get(path.resolve()) == seen:
            return manifest
        self._check_files(path, files)
        self._valid[path.resolve()] = seen
        return manifest

    @staticmethod
    def _check_files(path: Path, files: dict) -> None:
        present = _files(path)
        for rel in present:
            if rel not in files:
                raise CheckpointError(f"{path / rel} is not in the checkpoint's manifest ({MANIFEST}): "
                                      "the folder was changed after it was saved")
        for rel, want in files.items():  # sizes first: cheap, and they name truncated files
            f = path / rel
            if not f.is_file() or f.is_symlink():
                raise CheckpointError(f"{f} is missing or not a regular file (listed in the checkpoint's manifest)")
            size = f.stat().st_size
            if size != want["size"]:
                what = "empty" if size == 0 else "truncated" if size < want["size"] else "longer than saved"
                raise CheckpointError(f"{f} is {what}: {size} bytes, the manifest says {want['size']}")
        for rel, want in files.items():
            if _sha256(path / rel) != want["sha256"]:
                raise CheckpointError(f"{path / rel} does not match its checksum in the manifest (sha256): "
                                      "corrupted or replaced")

    # -- loading -------------------------------------------------------------------------------------
    def load(self, path: str | Path, engine=None, *, load_optimizer_states: bool = True) -> Restored:
        """Every trainer: validate, read the payload, restore this trainer's RNG, and (collective) load
        the DeepSpeed engine state. An engine checkpoint that DeepSpeed cannot find is an error."""
        path = Path(path)
        manifest = self.validate(path)
        shared = read_state(path / TRAINER_STATE, ("step", "payload"), manifest["files"][TRAINER_STATE]["sha256"])
        run = self.root.parent.resolve()
        for where, value in _named_paths(shared["payload"]):
            if not _inside(value, run):
                raise CheckpointError(f"checkpoint {path} names {where}={value!r}, outside the run folder {run}: "
                                      "it is not opened; resume from a checkpoint of this run")
        rank_file = path / f"rank_{self._rank:05d}.pt"
        rank_payload = None
        if rank_file.name in manifest["files"]:
            mine = read_state(rank_file, ("rng", "rank_payload"), manifest["files"][rank_file.name]["sha256"])
            try:
                set_rng_state(mine["rng"])
            except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
                raise CheckpointError(f"{rank_file}: RNG state unusable ({type(e).__name__}: {e})") from None
            rank_payload = mine["rank_payload"]
        else:
            warnings.warn(f"{rank_file.name} missing (saved with {manifest.get('n_trainers')} trainers, now "
                          f"{self.ctx.info.n_trainers}); RNG state of this trainer not restored",
                          RuntimeWarning, stacklevel=2)
        client_state = None
        if engine is not None:
            if not manifest.get("engine"):
                raise CheckpointError(f"checkpoint {path} holds no DeepSpeed engine state")
            load_path, client_state = engine.load_checkpoint(
                str(path / DS_SUBDIR), tag=DS_TAG, load_optimizer_states=load_optimizer_states,
                load_lr_scheduler_states=load_optimizer_states)
            if load_path is None:
                raise CheckpointError(f"DeepSpeed found no checkpoint in {path / DS_SUBDIR} "
                                      "(load_checkpoint returned None)")
        return Restored(step=int(shared["step"]), payload=shared["payload"], rank_payload=rank_payload,
                        path=path, client_state=client_state)

    # -- choosing ------------------------------------------------------------------------------------
    def resolve(self, spec: str | None) -> Path | None:
        """Which checkpoint to resume from.

        * None / "" / "none": fresh start -> None.
        * "auto": the newest complete and valid checkpoint under ``root`` (trainer 0 logs a warning for
          each newer one skipped, with the reason); None when there is none (a first run).
        * a path: a checkpoint folder, which must be complete and valid, or a checkpoint root (its newest
          valid one). Missing, incomplete or invalid -> :class:`CheckpointError` naming the bad file: an
          explicit resume never silently starts fresh.
        """
        if spec is None or spec in ("", "none"):
            return None
        if spec == "auto":
            return self._newest_valid(self.root)[0]
        path = Path(spec)
        if not path.exists():
            raise CheckpointError(f"resume checkpoint {path} does not exist")
        if is_complete(path):
            self.validate(path)
            return path
        if (path / "latest").is_file() or _step_dirs(path):
            found, skipped = self._newest_valid(path)
            if found is not None:
                return found
            if skipped:
                raise CheckpointError(f"no valid checkpoint under {path}: " + "; ".join(skipped))
        raise CheckpointError(f"resume checkpoint {path} is incomplete (no {MANIFEST} marker): the save was "
                              "interrupted; pick a complete one or resume=auto")

    def _newest_valid(self, root: Path) -> tuple[Path | None, list[str]]:
        """The newest valid checkpoint under ``root`` and why each newer one was skipped."""
        skipped: list[str] = []
        for cand in _step_dirs(root):
            try:
                self.validate(cand)
            except CheckpointError as e:
                skipped.append(str(e))
                if self.ctx.info.is_rank0:
                    log.warning("resume: skipping checkpoint %s: %s", cand, e)
                continue
            if skipped and self.ctx.info.is_rank0:
                log.warning("resume: using %s, the newest valid checkpoint", cand)
            return cand, skipped
        return None, skipped
