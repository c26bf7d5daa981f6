"""The launcher's world: the one module that reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* / SLURM_* and the
other variables launchers set (torchrun, the deepspeed launcher, srun), and the one that rewrites them.

Why one home: the same facts (this process's rank, the job's size, where rank 0 listens, whether the job
fits on one node) arrive under different names from each launcher, and DeepSpeed reads some of them
again after we decided the roles. Reading them in one place keeps the fallbacks (torchrun's RANK,
srun's SLURM_PROCID, ...) in one order and lets :mod:`distrag.distributed.roles` rewrite exactly what
DeepSpeed will read (:func:`export_trainer_world`, :func:`export_single_process_world`).

:func:`get_dist_info` turns the environment into a :class:`DistInfo`: global rank, world size, local
rank, and the role of this process (trainer, index rank, or a single process that does both), given
the configuration's ``distributed.index_rank``. The launcher's own values survive the rewrite under
``DISTRAG_GLOBAL_*``, so a trainer asked again after :func:`~distrag.distributed.roles.init_roles` still
gets its global rank.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Literal

from distrag.config import DistributedConfig
from distrag.errors import DistError

Role = Literal["trainer", "index", "single"]

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class DistInfo:
    rank: int
    """Global rank given by the launcher (0 in a single process)."""
    world_size: int
    """Processes in the whole job, index rank included."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    role: Role
    """`trainer`, `index`, or `single` (world of one: trains and indexes in-process)."""
    trainer_rank: int
    """Rank among the trainers (DeepSpeed's rank); -1 on the index rank."""
    n_trainers: int
    """Trainers in the job (DeepSpeed's world size)."""
    index_rank: int
    """Global rank of the index process; -1 when there is none."""
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    one_node: bool = False
    """The launcher says every process of the job is on one node (loopback is enough for the stores)."""

    @property
    def is_trainer(self) -> bool:
        return self.role in ("trainer", "single")

    @property
    def is_index(self) -> bool:
        return self.role == "index"

    @property
    def is_rank0(self) -> bool:
        """Trainer 0: the only writer of shared files and MLflow records."""
        return self.is_trainer and self.trainer_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int | None = None) -> int | None:
    for name in names:
        raw = os.environ.get(name)
        if raw not in (None, ""):
            try:
                return int(raw)
            except ValueError:
                raise DistError(f"environment variable {name}={raw!r} is not an integer") from None
    return default


def _slurm_master_addr() -> str | None:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        return out[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def _one_node(world_size: int) -> bool:
    """Whether the launcher says every process of the job runs on one node (srun, deepspeed, torchrun)."""
    nodes = _env_int("SLURM_JOB_NUM_NODES", "SLURM_NNODES", "CROSS_SIZE", default=None)
    if nodes is not None:
        return nodes == 1
    local = _env_int("LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=None)
    return world_size == 1 or (local is not None and local == world_size)


def get_dist_info(cfg: DistributedConfig | None = None, *, with_index_rank: bool = True) -> DistInfo:
    """Roles from the launcher's environment (torchrun/deepspeed: RANK..., srun: SLURM_PROCID...).

    ``with_index_rank=False`` (e.g. ``train.refresh_every == 0``): every process is a trainer.
    """
    cfg = cfg or DistributedConfig()
    # In a trainer whose env was rewritten by init_roles, the launcher's values are kept here.
    rank = _env_int("DISTRAG_GLOBAL_RANK", "RANK", "SLURM_PROCID", default=0)
    world = _env_int("DISTRAG_GLOBAL_WORLD_SIZE", "WORLD_SIZE", "SLURM_NTASKS", default=1)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    addr = os.environ.get("DISTRAG_GLOBAL_MASTER_ADDR") or os.environ.get("MASTER_ADDR")
    if not addr:
        addr = (_slurm_master_addr() if world > 1 else None) or "127.0.0.1"
    port = _env_int("DISTRAG_GLOBAL_MASTER_PORT", "MASTER_PORT", default=None)
    if port is None:
        job = _env_int("SLURM_JOB_ID", default=None)
        port = 20000 + job % 20000 if job is not None else DEFAULT_MASTER_PORT
    if world < 1 or not 0 <= rank < world:
        raise DistError(f"inconsistent launcher environment: rank {rank}, world size {world}")
    where = (addr, port, _one_node(world))
    if world == 1:
        return DistInfo(rank, 1, local, "single", 0, 1, -1, *where)
    if not with_index_rank:
        return DistInfo(rank, world, local, "trainer", rank, world, -1, *where)
    if world < 2:
        raise DistError("an index rank needs a world of at least 2 processes")
    idx = cfg.index_rank if cfg.index_rank >= 0 else world + cfg.index_rank
    if not 0 <= idx < world:
        raise DistError(f"distributed.index_rank={cfg.index_rank} is outside the world of {world} processes")
    if rank == idx:
        return DistInfo(rank, world, local, "index", -1, world - 1, idx, *where)
    trank = rank if rank < idx else rank - 1
    return DistInfo(rank, world, local, "trainer", trank, world - 1, idx, *where)


def slurm_job_id() -> str | None:
    """The SLURM job id (an array task has its own), or None outside SLURM."""
    return os.environ.get("SLURM_JOB_ID") or None


def export_trainer_world(info: DistInfo, group_port: int) -> None:
    """Rewrite RANK / WORLD_SIZE / MASTER_* to the trainers-only world DeepSpeed must see (trainer-local rank,
    number of trainers, the trainers' group on ``group_port``), keeping the launcher's values under
    ``DISTRAG_GLOBAL_*`` for :func:`get_dist_info`."""
    os.environ.update({
        "DISTRAG_GLOBAL_RANK": str(info.rank), "DISTRAG_GLOBAL_WORLD_SIZE": str(info.world_size),
        "DISTRAG_GLOBAL_MASTER_ADDR": info.master_addr, "DISTRAG_GLOBAL_MASTER_PORT": str(info.master_port),
        # what DeepSpeed reads: its world is the trainers
        "RANK": str(info.trainer_rank), "WORLD_SIZE": str(info.n_trainers),
        "MASTER_ADDR": info.master_addr, "MASTER_PORT": str(group_port),
    })


def export_single_process_world() -> None:
    """A world of one for DeepSpeed: without a launcher's RANK / WORLD_SIZE / MASTER_* / LOCAL_RANK,
    ``deepspeed.initialize`` looks for MPI (and fails without mpi4py); with them it starts a one-process
    group on a free local port. Values a launcher set (torchrun with one process) are kept."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, value)
