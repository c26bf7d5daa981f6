"""Checkpoints that resume exactly, written atomically by several trainers.

Layout of ``root``::

    step_00000120/
        trainer_state.pt    payload of trainer 0 (embedder + optimizer + scheduler state, data
                            position, index version/path, ledger totals, MLflow run id, ...)
        rank_00000.pt ...   per-trainer RNG states (python, numpy, torch, cuda) + rank_payload
        ds/                 DeepSpeed's engine.save_checkpoint (tag "ds"), when an engine is passed
        COMPLETE            manifest (step, trainers, time); its presence marks a complete checkpoint
    latest                  name of the newest complete checkpoint (replaced atomically, LAST)

Save protocol (every trainer calls ``save``; it contains collectives): trainer 0 clears and creates
``.step_XXXXXXXX.tmp``; barrier; trainer 0 writes the shared payload, every trainer its RNG file,
all of them DeepSpeed's checkpoint; barrier; trainer 0 writes COMPLETE, renames the folder into
place, replaces ``latest``, prunes; barrier. A crash anywhere before the rename leaves only a
``.tmp`` folder and ``latest`` still names the previous complete checkpoint. The folder must be on
a file system shared by all trainers (multi-node: the cluster's shared storage).
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distrag.atomic_io import atomic_write_bytes, atomic_write_json, atomic_write_text
from distrag.distributed import roles
from distrag.errors import CheckpointError

_STEP_RE = re.compile(r"step_(\d{8,})")
MANIFEST = "COMPLETE"
DS_SUBDIR = "ds"
DS_TAG = "ds"


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


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn("CUDA RNG states saved for a different GPU count; not restored", RuntimeWarning,
                          stacklevel=2)


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _torch_load(path: Path) -> Any:
    # Our own files hold arbitrary picklable payloads (RNG tuples, numpy states, dicts).
    return torch.load(path, map_location="cpu", weights_only=False)


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt (no readable {MANIFEST}): {e}") from None


def list_complete(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP_RE.fullmatch(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def resolve_resume(spec: str | None, root: str | Path | None = None) -> Path | None:
    """Which checkpoint to resume from.

    * None / "" / "none": fresh start -> None.
    * "auto": the checkpoint ``root/latest`` names if complete, else the newest complete one under
      ``root``; None when there is none (a first run).
    * a path: a complete checkpoint folder, or a checkpoint root (its newest complete one). Missing
      or incomplete -> :class:`CheckpointError`: an explicit resume never silently starts fresh.
    """
    if spec is None or spec in ("", "none"):
        return None
    if spec == "auto":
        if root is None:
            raise CheckpointError("resume=auto needs the checkpoint root")
        root = Path(root)
        try:
            name = (root / "latest").read_text().strip()
            if name and is_complete(root / name):
                return root / name
        except OSError:
            pass
        done = list_complete(root)
        return done[-1] if done else None
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"resume checkpoint {path} does not exist")
    if is_complete(path):
        return path
    if (path / "latest").is_file() or list_complete(path):
        found = resolve_resume("auto", path)
        if found is not None:
            return found
    raise CheckpointError(f"resume checkpoint {path} is incomplete (no {MANIFEST} marker): the save was "
                          "interrupted; pick a complete one or resume=auto")


class CheckpointManager:
    """Save / load / prune checkpoints under ``root``. Construct on every trainer (not the index rank)."""

    def __init__(self, root: str | Path, keep: int = 2, ctx: roles.DistContext | None = None):
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.root = Path(root)
        self.keep = keep
        self.ctx = ctx or roles.current()
        if self.ctx.info.is_index:
            raise ValueError("checkpoints are written by the trainers; the index rank holds no state to save")

    @property
    def _rank(self) -> int:
        return self.ctx.info.trainer_rank

    def save(self, step: int, payload: dict, *, engine=None, rank_payload: dict | None = None) -> Path:
        """Collective: every trainer calls it with the same ``step``. Only trainer 0's ``payload`` is
        written; each trainer's RNG state and ``rank_payload`` go to its own file."""
        name = f"step_{step:08d}"
        final = self.root / name
        tmp = self.root / f".{name}.tmp"
        if self.ctx.info.is_rank0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save
            tmp.mkdir()
        self.ctx.barrier_trainers()
        if self.ctx.info.is_rank0:
            atomic_write_bytes(tmp / "trainer_state.pt", _torch_bytes({"step": step, "payload": payload}))
        atomic_write_bytes(tmp / f"rank_{self._rank:05d}.pt",
                           _torch_bytes({"rng": rng_state(), "rank_payload": rank_payload}))
        if engine is not None:
            # a collective (every trainer); ZeRO shards are written by their owners
            engine.save_checkpoint(str(tmp / DS_SUBDIR), tag=DS_TAG)
        self.ctx.barrier_trainers()
        if self.ctx.info.is_rank0:
            atomic_write_json(tmp / MANIFEST, {"step": step, "n_trainers": self.ctx.info.n_trainers,
                                               "engine": engine is not None, "time": time.time()})
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

    def load(self, path: str | Path, engine=None, *, load_optimizer_states: bool = True) -> Restored:
        """Every trainer: read the payload, restore this trainer's RNG, and (collective) load the
        DeepSpeed engine state. An engine checkpoint that DeepSpeed cannot find is an error."""
        path = Path(path)
        manifest = _read_manifest(path)
        try:
            shared = _torch_load(path / "trainer_state.pt")
        except (OSError, RuntimeError, EOFError) as e:
            raise CheckpointError(f"cannot read {path / 'trainer_state.pt'}: {e}") from None
        rank_file = path / f"rank_{self._rank:05d}.pt"
        rank_payload = None
        if rank_file.is_file():
            mine = _torch_load(rank_file)
            set_rng_state(mine["rng"])
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

    def resolve(self, spec: str | None) -> Path | None:
        return resolve_resume(spec, self.root)
