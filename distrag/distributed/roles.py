"""Distributed roles: which process trains and which serves the index, their process groups and stores.

The launcher's environment is read (and rewritten for DeepSpeed) by :mod:`distrag.distributed.world`
only; this module decides what the processes share. A multi-process run has two kinds of processes::

    trainers    every global rank but one: a DeepSpeed engine over the generator, data-parallel
    index rank  DistributedConfig.index_rank (-1 = last): re-embeds the corpus, rebuilds the index

DeepSpeed must only ever see the trainers. It calls world-wide barriers and broadcasts during ZeRO-3
set-up, checkpoint-tag validation and ``zero.Init``; a world that contains the index rank (even with
an ``mpu``) therefore hangs. So ``init_roles`` builds two separate things:

* the **default process group over the trainers only** (trainer-local ranks 0..N-2, on
  ``MASTER_PORT + 1``). In trainer processes RANK / WORLD_SIZE / MASTER_PORT are rewritten to those
  trainer-local values (:func:`~distrag.distributed.world.export_trainer_world`), so DeepSpeed (which reads
  them too) agrees with the group it is handed. The launcher's values stay in
  :class:`~distrag.distributed.world.DistInfo` and in ``DISTRAG_GLOBAL_RANK`` / ``DISTRAG_GLOBAL_WORLD_SIZE``.
* a **coordination TCPStore** (``MASTER_PORT + 2``, long timeouts) shared by the trainers and the
  index rank. The refresh protocol (:mod:`distrag.distributed.refresh_protocol`) talks only through it, with
  non-blocking calls on the trainer side; the index rank never joins a collective.

Both store servers live in global rank 0 (the process on MASTER_ADDR). With the default
``index_rank=-1`` that is trainer 0; an index rank placed at 0 works too, but its death then also
takes the stores down (trainers see that as an index failure).

The stores listen only where the job needs them (loopback on one node, else MASTER_ADDR's address:
:mod:`distrag.distributed.stores`); what the index rank publishes through them is signed with the run's
secret and checked by trainer 0 (:mod:`distrag.distributed.refresh_protocol`).

The trainers' collectives are methods of :class:`DistContext` (no-ops in a single process, refused on
the index rank); :meth:`DistContext.shutdown` / :func:`finish` give deterministic exits (see ``finish``).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist

from distrag.config import DistributedConfig
from distrag.distributed.stores import open_store
from distrag.distributed.world import DistInfo, export_single_process_world, export_trainer_world, get_dist_info
from distrag.errors import DistError

PG_PORT_OFFSET = 1
STORE_PORT_OFFSET = 2
#: Seconds a store client waits for a key or a connection. Trainers never block on the store (they
#: only ``add(key, 0)`` / ``check``); this bounds the initial rendezvous and the index rank's reads.
STORE_TIMEOUT_S = 3600.0


# ----------------------------------------------------------------------------------------------
# the context


@dataclass
class DistContext:
    info: DistInfo
    store: Any = None
    """World-wide coordination TCPStore (trainers + index rank); None in a single process."""
    backend: str | None = None
    """Backend of the trainers' default process group (None: no group)."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _pg_store: Any = None
    _closed: bool = False

    @property
    def has_group(self) -> bool:
        return self.backend is not None and tdist.is_available() and tdist.is_initialized()

    # collectives over the trainers (no-ops in a single process; never called on the index rank)
    def _check_trainer(self, what: str) -> None:
        if self.info.is_index:
            raise DistError(f"{what} is a trainer collective; the index rank never joins one")

    def barrier_trainers(self) -> None:
        self._check_trainer("barrier_trainers")
        if self.has_group and self.info.n_trainers > 1:
            tdist.barrier()

    def broadcast_object_trainers(self, obj: Any, src: int = 0) -> Any:
        """Trainer ``src``'s ``obj`` on every trainer (pickled; keep it small)."""
        self._check_trainer("broadcast_object_trainers")
        if not self.has_group or self.info.n_trainers == 1:
            return obj
        box = [obj if self.info.trainer_rank == src else None]
        tdist.broadcast_object_list(box, src=src, device=self._obj_device())
        return box[0]

    def broadcast_int(self, value: int, src: int = 0) -> int:
        """Trainer ``src``'s integer on every trainer: one small tensor, no pickling (per-step polls)."""
        self._check_trainer("broadcast_int")
        if not self.has_group or self.info.n_trainers == 1:
            return int(value)
        t = torch.tensor([int(value) if self.info.trainer_rank == src else 0], dtype=torch.int64,
                         device=self._obj_device())
        tdist.broadcast(t, src=src)
        return int(t.item())

    def all_reduce_flag(self, flag: bool) -> bool:
        """True on every trainer if it is true on any trainer."""
        self._check_trainer("all_reduce_flag")
        if not self.has_group or self.info.n_trainers == 1:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._obj_device())
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())

    def _obj_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def shutdown(self) -> None:
        """Destroy the trainers' group and drop the stores, deterministically (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.has_group:
            try:
                tdist.destroy_process_group()
            except (RuntimeError, OSError) as e:  # a peer already gone: nothing left to tear down cleanly
                print(f"[distrag.dist] destroy_process_group: {e!r}", file=sys.stderr)
        self.store = None
        self._pg_store = None
        gc.collect()


_CTX: DistContext | None = None


def _choose_backend(cfg: DistributedConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_roles(cfg: DistributedConfig | None = None, *, with_index_rank: bool = True,
               timeout_s: float = STORE_TIMEOUT_S) -> DistContext:
    """Set up roles, the trainers-only default process group and the coordination store.

    Every process of the job calls it once, first thing. World of one: no groups, no store.
    """
    global _CTX
    cfg = cfg or DistributedConfig()
    info = get_dist_info(cfg, with_index_rank=with_index_rank)
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", info.local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    if info.world_size == 1:
        export_single_process_world()
        _CTX = DistContext(info, device=device)
        return _CTX

    timeout = timedelta(seconds=timeout_s)
    # Coordination store, world-wide: trainers and the index rank.
    store = open_store(info, info.master_port + STORE_PORT_OFFSET, timeout)
    ctx = DistContext(info, store=store, device=device)
    # The trainers' group store is also hosted by global rank 0, even when that is the index rank
    # (it serves the rendezvous only; it never joins the group).
    pg_store = open_store(info, info.master_port + PG_PORT_OFFSET, timeout)
    ctx._pg_store = pg_store
    if info.is_trainer:
        backend = _choose_backend(cfg)
        export_trainer_world(info, info.master_port + PG_PORT_OFFSET)
        tdist.init_process_group(backend, store=tdist.PrefixStore("trainers", pg_store),
                                 rank=info.trainer_rank, world_size=info.n_trainers, timeout=timeout)
        ctx.backend = backend
    _CTX = ctx
    return ctx


def current() -> DistContext:
    """The context of this process (a single-process one if ``init_roles`` was never called)."""
    global _CTX
    if _CTX is None:
        _CTX = DistContext(get_dist_info(), device=torch.device("cpu"))
    return _CTX


def reset_context() -> None:
    """Forget the context (tests that run several set-ups in one process)."""
    global _CTX
    _CTX = None


def finish(exit_code: int = 0, *, ctx: DistContext | None = None, join_timeout_s: float = 10.0) -> None:
    """Tear down and leave the process with ``exit_code``, deterministically. Does not return.

    Why: after a *successful* ZeRO-3 run, interpreter teardown can destroy c10d / DeepSpeed objects
    (gloo contexts, background threads, the shared-memory comm extension) in an arbitrary order and
    abort with "terminate called without an active exception" -> exit code 134, so the launcher
    reports a failure for a run that worked. We destroy the process groups ourselves, join our
    non-daemon threads, flush every stream and logging handler, and then ``os._exit`` so no C++
    destructor runs during interpreter shutdown. Everything worth keeping must already be written
    (checkpoints and index versions are atomic, MLflow is closed by its owner before this call).
    """
    ctx = ctx or _CTX
    try:
        if ctx is not None:
            ctx.shutdown()
        me = threading.current_thread()
        for t in threading.enumerate():
            if t is not me and not t.daemon and t is not threading.main_thread():
                t.join(timeout=join_timeout_s)
        logging.shutdown()
        from distrag.run_lock import release_all

        release_all()  # os._exit skips atexit: give the output folder's lock back (distrag.run_lock)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError) as e:  # closed or broken pipe: nothing more to say
                os.write(2, f"[distrag.dist] flush failed: {e!r}\n".encode())
        os._exit(exit_code)
