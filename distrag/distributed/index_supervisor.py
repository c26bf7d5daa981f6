"""The index rank under a launcher: a small supervisor process that runs the index server in a child.

torchrun and the deepspeed launcher end the whole job (SIGTERM to every process) as soon as one process
exits with an error. If the index rank did the work itself, its death (``kill -9``, the OOM killer, a
crash in faiss) would stop the trainers too, whatever ``distributed.on_index_failure`` says. So the
process the launcher started for the index rank only supervises:

* it starts the **index worker**, a spawned child (never a fork: faiss, CUDA) that connects to the
  coordination store as a client and runs :func:`~distrag.distributed.refresh_server.serve_index`; the
  worker leaves by itself if the supervisor disappears;
* it announces ``host``, the worker's ``pid`` and its own (``supervisor``), each with its start time, in the
  signed ``pid`` record, so trainer 0 notices a dead worker at its next poll (records are bound to the job
  trainer 0 started: the supervisor follows the run folder's job file and signs the record again when
  trainer 0 starts its job after the supervisor announced itself);
* when the worker exits with an error or is killed, it records the reason (signed ``error`` record,
  unless the worker recorded its own exception) and keeps the launcher's process alive: the trainers
  follow ``on_index_failure`` (``continue``: train on the last version; ``stop``: checkpoint and stop);
* when the trainers are done (``done`` in the store, or the store is gone with trainer 0), it gives the
  worker ``grace_s`` to leave and then kills it (SIGKILL also ends a stopped process), and exits:
  0 unless the worker failed under ``on_index_failure=stop``.

Trainer 0 ends a supervisor that does not leave after training (a SIGSTOPped one) on the same host, if its
pid still names the process that started at the announced time
(:meth:`~distrag.distributed.refresh_client.IndexClient.done`).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distrag.distributed.refresh_protocol import RefreshChannel
from distrag.process_watch import exit_reason

if TYPE_CHECKING:
    from distrag.config import ExperimentConfig
    from distrag.distributed.world import DistInfo


def _trainers_done(channel: RefreshChannel) -> bool:
    """Whether trainer 0 said training ended (following its job first: when trainer 0 starts one after this
    process announced itself, the pid and any error are signed again for it)."""
    try:
        channel.sync_job()
        return channel.trainers_done()
    except (RuntimeError, OSError):  # trainer 0 (the store's host) is gone: nobody is left to serve
        return True


def supervise(store, worker: multiprocessing.process.BaseProcess, run_root: str | Path, *,
              on_failure: str = "continue", grace_s: float = 20.0, poll_s: float = 0.5,
              log: Callable[[str], None] | None = None) -> int:
    """Start ``worker`` and watch it until the trainers are done (see the module's docstring). Returns
    the exit code of the index rank's process: 0, or 1 when the worker failed under ``stop``."""
    log = log or (lambda msg: print(f"[index rank] {msg}", flush=True))
    channel = RefreshChannel(store, run_root)
    worker.start()
    channel.announce_process(worker.pid, supervisor=os.getpid())
    failed: str | None = None
    while True:
        done = _trainers_done(channel)
        if worker.exitcode is not None:
            if worker.exitcode == 0:
                return 0
            if failed is None:
                failed = f"the index worker (pid {worker.pid}) ended: {exit_reason(worker.exitcode)}"
                log(f"{failed}; the trainers follow distributed.on_index_failure={on_failure}")
                try:  # keep the worker's own exception when it recorded one in this job
                    channel.record_error(channel.index_error() or failed)
                except (RuntimeError, OSError):
                    pass
            if done:
                break
        elif done:
            worker.join(grace_s)
            if worker.exitcode is None:
                log(f"the index worker (pid {worker.pid}) did not leave {grace_s:.0f}s after training ended; "
                    "killing it")
                worker.kill()
                worker.join()
            break
        time.sleep(poll_s)
    return 1 if failed is not None and on_failure == "stop" else 0


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """Leave this process when its parent (the supervisor) is gone (a daemon thread)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(3)

    threading.Thread(target=watch, name="distrag-exit-with-supervisor", daemon=True).start()


def index_worker_main(cfg: ExperimentConfig, info: DistInfo, run_root: str, store_port: int,
                      timeout_s: float) -> None:
    """The index worker's process: a client of the coordination store that serves index versions."""
    import torch

    from distrag.distributed.refresh_server import serve_index
    from distrag.distributed.stores import open_store
    from distrag.logging_setup import setup_logging

    _exit_with_parent()
    setup_logging(verbose=True)
    if torch.cuda.is_available():
        torch.cuda.set_device(torch.device("cuda", info.local_rank % max(torch.cuda.device_count(), 1)))
    store = open_store(info, store_port, timedelta(seconds=timeout_s), client=True)
    serve_index(cfg, store, Path(run_root), announce_pid=False)


def run_supervised_index_rank(cfg: ExperimentConfig, info: DistInfo, store: Any, run_root: Path,
                              store_port: int, timeout_s: float) -> int:
    """The launcher-started index rank: :func:`supervise` an :func:`index_worker_main` child."""
    worker = multiprocessing.get_context("spawn").Process(
        target=index_worker_main, args=(cfg, info, str(run_root), store_port, timeout_s),
        name="distrag-index-worker")
    return supervise(store, worker, run_root, on_failure=cfg.distributed.on_index_failure)
