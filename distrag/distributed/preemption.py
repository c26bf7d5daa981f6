"""Preemption: SIGUSR1 / SIGTERM -> checkpoint at an agreed step -> ``scontrol requeue``.

SLURM (``#SBATCH --signal=USR1@120``) signals the job's tasks some time before the end. The handler
only sets a flag (no I/O, no collectives inside a signal handler). The training loop asks every
step::

    preemption.install()                                   # once, on every process
    for step in ...:
        ...train step...
        if preemption.agreed(ctx):                         # collective: every trainer, every step
            ckpt.save(step, payload, engine=engine)     # the same step on every trainer
            index_client.done()
            preemption.requeue(ctx)                        # trainer 0 runs `scontrol requeue $SLURM_JOB_ID`
            roles.finish(preemption.EXIT_REQUEUED)

The flag of any single trainer is enough (all-reduce MAX), because SLURM may signal the tasks at
slightly different moments. The requeued job resumes with ``distributed.resume=auto``. The index
rank may ignore the signal: it exits when the trainers call ``IndexClient.done()``.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence

from distrag.distributed.world import slurm_job_id

_requested = False
_signum: int | None = None

#: Exit code after a requeue (SLURM requeues the job; the launcher should not treat it as a crash).
EXIT_REQUEUED = 0


def _handler(signum, frame) -> None:
    global _requested, _signum
    _requested = True
    _signum = signum


def install(signals: Sequence[int] = (signal.SIGUSR1, signal.SIGTERM)) -> dict[int, object]:
    """Install the flag-setting handler (main thread only). Returns the previous handlers."""
    return {s: signal.signal(s, _handler) for s in signals}


def preemption_requested() -> bool:
    """This process received a preemption signal (local; use :func:`agreed` to decide)."""
    return _requested


def received_signal() -> int | None:
    return _signum


def reset() -> None:
    global _requested, _signum
    _requested = False
    _signum = None


def agreed(ctx=None) -> bool:
    """Collective over the trainers: True on every trainer when any trainer was signalled."""
    from distrag.distributed import roles

    ctx = ctx or roles.current()
    return ctx.all_reduce_flag(_requested)


def requeue_command(job_id: str | None = None) -> list[str] | None:
    """``scontrol requeue <job>`` or the command in ``DISTRAG_REQUEUE_CMD`` (tests, other schedulers;
    ``{job_id}`` is substituted). None outside SLURM."""
    # an array task has its own SLURM_JOB_ID, so this requeues just that task
    job_id = job_id or slurm_job_id()
    if not job_id:
        return None
    custom = os.environ.get("DISTRAG_REQUEUE_CMD")
    if custom:
        return [part.replace("{job_id}", job_id) for part in shlex.split(custom)]
    return ["scontrol", "requeue", job_id]


def requeue(ctx=None, command: Sequence[str] | None = None, *, timeout_s: float = 60.0) -> bool:
    """Trainer 0 asks the scheduler to requeue this job (other ranks: no-op). True on success."""
    from distrag.distributed import roles

    ctx = ctx or roles.current()
    if not ctx.info.is_rank0:
        return False
    cmd = list(command) if command is not None else requeue_command()
    if not cmd:
        print("[preempt] not running under SLURM: no requeue; resume with distributed.resume=auto",
              file=sys.stderr, flush=True)
        return False
    try:
        res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"[preempt] requeue failed: {' '.join(cmd)}: {e}", file=sys.stderr, flush=True)
        return False
    if res.returncode != 0:
        print(f"[preempt] requeue failed ({res.returncode}): {' '.join(cmd)}: {res.stderr.strip()}",
              file=sys.stderr, flush=True)
        return False
    print(f"[preempt] requeued: {' '.join(cmd)}", file=sys.stderr, flush=True)
    return True
