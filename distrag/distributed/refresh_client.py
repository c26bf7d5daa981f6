"""Asynchronous index refresh, trainer side: :class:`IndexClient` and what the refresh cost (:class:`RefreshStats`).

Trainer 0 hands the embedder weights to the index rank and adopts the versions it publishes, through the
protocol of :mod:`distrag.distributed.refresh_protocol` (store keys, signed records, the channel); the
index rank's side is :mod:`distrag.distributed.refresh_server`. The trainers never wait for the index
rank: trainer 0 looks at the store without blocking and broadcasts what it decided, so every trainer
adopts a version at the same step.

Health: trainer 0 declares a failure when the index rank's heartbeat has not moved for ``index_timeout_s``
(local clock: no cross-node clock skew), when its process is gone (same host), when it recorded an
error, or when the store is unreachable. Then every trainer follows ``on_index_failure`` at the same
step: ``continue`` on the last version (one warning) or ``stop`` (:class:`IndexRankFailed` raised on
every trainer).

Versions are :class:`~distrag.retrieval.sharded_index.ShardedIndex` directories published with
:func:`distrag.retrieval.index_store.publish` (``root/v000001`` ..., atomically, then ``root/LATEST``); the
adopted :class:`~distrag.distributed.refresh_protocol.Publication` names the folder, and ``load_fn(path)``
(e.g. ``index_store.load``) reads it.

Training-loop use (every trainer)::

    client = IndexClient(ctx, weights_dir, index_timeout_s=cfg.index_timeout_s,
                         on_index_failure=cfg.on_index_failure, log_fn=tracker.log_metrics)
    client.submit_weights(0, embedder_trainable_state())
    client.wait_for_version(1, step=0, load_fn=load_index)           # first index
    for step in ...:
        client.poll(step, load_fn=load_index)                        # may swap at this step
        ...train...
        if step % refresh_every == 0: client.submit_weights(step, embedder_trainable_state())
    client.done()

:class:`RefreshStats` (kept here because only the client fills it in; the runner reads its summary):

* **blocked time**: seconds the training loop spent inside the protocol's calls instead of training:
  the per-step poll (trainer 0's look at the store and the decision's broadcast, which the other trainers
  wait for), the swap to an adopted version (``load_fn``), and trainer 0's weights hand-off (the CPU copy,
  and waiting for the previous background write). Nested calls (``wait_for_version`` polling) count once.
* **staleness**: at every step, how many optimizer steps the index in use lags behind the encoder that
  trains (``step - weights_step`` of the adopted version; before the first version the frozen index of
  the base encoder, weights step 0), as a mean and a maximum over steps, and the number of versions
  adopted.

The runner (:mod:`distrag.distributed.runner`) gathers every trainer's :meth:`RefreshStats.summary`
and logs ``index/blocked_s`` and ``index/blocked_share`` (per trainer and their mean),
``index/staleness_mean``, ``index/staleness_max`` and ``index/versions_adopted``, with
``index/versions_published`` from the run folder (metric names in :mod:`distrag.metric_names`), in the
run's one MLflow run. Staleness and adoptions are the same on every trainer (adoption is agreed) and
survive a resume (:meth:`RefreshStats.state_dict`); blocked time is this process's, from its start.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from distrag import metric_names as mn
from distrag.atomic_io import atomic_write_bytes
from distrag.distributed.refresh_protocol import Publication, RefreshChannel, WeightsHandoff
from distrag.errors import IndexRankFailed
from distrag.process_watch import end_lingering, hostname, pid_alive


@dataclass
class AdoptDecision:
    """An index version every trainer adopted at the same step."""
    version: int
    """Index version adopted."""
    path: str
    """Published folder of that version."""
    weights_step: int
    """Training step of the embedder weights the version was built from."""
    step: int
    """Step at which every trainer adopted it."""
    staleness: int
    """``step - weights_step``: optimizer steps the index lags behind the embedder."""
    swap_s: float = 0.0
    """Seconds spent in ``load_fn`` on this trainer."""



class RefreshStats:
    """One trainer's refresh costs; :meth:`blocking` and :meth:`note_step` fill it in."""

    def __init__(self, *, blocked_s: float = 0.0, n_adopted: int = 0):
        self.blocked_s = blocked_s
        """Seconds blocked on the protocol in this process."""
        self.n_adopted = n_adopted
        """Index versions adopted (trainer 0 was charged one corpus pass for each)."""
        self.steps, self.staleness_sum, self.staleness_max = 0, 0.0, 0
        """Steps whose staleness was recorded, the sum of the index's lag over them, the largest lag."""
        self._depth, self._t0 = 0, 0.0  # protocol calls open (nested ones count once), when the outermost began
        self._last_step: int | None = None  # the step noted last (a second poll at that step is not a step)

    @contextmanager
    def blocking(self) -> Iterator[None]:
        """Time a protocol call as blocked (an inner call inside an outer one is not counted again)."""
        if self._depth == 0:
            self._t0 = time.perf_counter()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.blocked_s += time.perf_counter() - self._t0

    def note_step(self, step: int, weights_step: int | None) -> None:
        """The index used at ``step`` was built from the weights of ``weights_step`` (None: the base encoder's)."""
        if step == self._last_step:  # polled again at the same step (waiting for a version)
            return
        self._last_step = int(step)
        lag = max(0, int(step) - int(weights_step or 0))
        self.steps += 1
        self.staleness_sum += lag
        self.staleness_max = max(self.staleness_max, lag)

    @property
    def staleness_mean(self) -> float:
        return self.staleness_sum / self.steps if self.steps else 0.0

    def summary(self, train_s: float) -> dict[str, float]:
        """Totals for the run, with the blocked share of ``train_s`` (this trainer's training wall-clock)."""
        return {"blocked_s": self.blocked_s, "blocked_share": self.blocked_s / train_s if train_s > 0 else 0.0,
                "staleness_mean": self.staleness_mean, "staleness_max": float(self.staleness_max),
                "n_adopted": float(self.n_adopted)}

    def state_dict(self) -> dict:
        """What a checkpoint carries: staleness and adoptions (agreed on every trainer)."""
        return {"steps": self.steps, "staleness_sum": self.staleness_sum, "staleness_max": self.staleness_max,
                "n_adopted": self.n_adopted}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state.get("steps", 0))
        self.staleness_sum = float(state.get("staleness_sum", 0.0))
        self.staleness_max = int(state.get("staleness_max", 0))
        self.n_adopted = int(state.get("n_adopted", 0))


# ----------------------------------------------------------------------------------------------
# trainer side


class IndexClient:
    """Trainer side of the refresh protocol. Construct and call on EVERY trainer.

    ``run_root`` (default: the parent of ``weights_dir``) is the run folder: it holds the run's secret,
    and only index versions inside it are adopted."""

    def __init__(self, ctx, weights_dir: str | Path, *, index_timeout_s: float = 600.0,
                 on_index_failure: str = "continue", log_fn: Callable[[dict, int], None] | None = None,
                 current: AdoptDecision | None = None, run_root: str | Path | None = None):
        if on_index_failure not in ("continue", "stop"):
            raise ValueError(f"on_index_failure must be 'continue' or 'stop', not {on_index_failure!r}")
        if ctx.info.is_index:
            raise ValueError("IndexClient runs on trainers; the index rank runs IndexServer")
        self.ctx = ctx
        self.store = ctx.store
        self.weights_dir = Path(weights_dir)
        self.run_root = Path(run_root) if run_root is not None else self.weights_dir.parent
        self.timeout_s = float(index_timeout_s)
        self.on_failure = on_index_failure
        self.log_fn = log_fn or _print_metrics
        self.current = current
        """The version in use (restore it from a checkpoint on resume)."""
        self.history: list[AdoptDecision] = []
        self.failed: str | None = None
        """Why the index rank was declared failed (same on every trainer), else None."""
        self.stats = RefreshStats()
        """Time blocked on the protocol, staleness of the index in use, versions adopted."""
        self._rank0 = ctx.info.is_rank0
        self._hb = 0
        self._hb_t = time.monotonic()
        self._n_submitted = 0
        self._submitted: dict[int, int] = {}  # hand-offs announced in this job: number -> training step
        self._writer: threading.Thread | None = None
        self._written: WeightsHandoff | None = None  # what the background writer wrote (announced when it ends)
        self._refused: set[int] = set()  # publications (versions) already reported as not built by this job
        self.channel: RefreshChannel | None = None
        """Trainer 0's end of the protocol (None on the other trainers: they never touch the store). Creating it
        starts a new job: only records of this job are read (:mod:`~distrag.distributed.refresh_protocol`)."""
        if self._rank0 and self.store is not None:
            self.channel = RefreshChannel.for_trainer(self.store, self.run_root)

    # -- weights ---------------------------------------------------------------------------------
    def submit_weights(self, step: int, state_dict: dict[str, torch.Tensor]) -> int | None:
        """Hand new embedder weights to the index rank (trainer 0 writes; never waits). Returns
        the submission number on trainer 0, None elsewhere. Not a collective.

        Only the CPU copy of the weights happens in the training step; serialising and writing the
        file run on a background thread (one in flight), and the submission is announced in the
        store from the training thread once the file is complete (next ``poll`` or submission)."""
        if not self._rank0 or self.store is None:
            return None
        with self.stats.blocking():
            self._finish_write(block=True)
            n = self._n_submitted + self._pending_count() + 1
            blob = {"step": int(step), "n": n,
                    "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}}
            path = self.weights_dir / f"w_{n:06d}.pt"

            def write() -> None:
                buf = io.BytesIO()
                torch.save(blob, buf)
                data = buf.getvalue()
                # the rename keeps it all-or-nothing; a hand-off file is useless after a crash, so no fsync
                atomic_write_bytes(path, data, fsync=False)
                self._written = WeightsHandoff(n, int(step), hashlib.sha256(data).hexdigest())

            self._writer = threading.Thread(target=write, name=f"distrag-weights-{n}", daemon=True)
            self._writer.start()
        return n

    def _pending_count(self) -> int:
        return 1 if self._writer is not None else 0

    def flush(self) -> None:
        """Wait for the weights being written (if any) and announce them (trainer 0; not a collective)."""
        if self._rank0 and self.store is not None:
            with self.stats.blocking():
                self._finish_write(block=True)

    def _finish_write(self, *, block: bool) -> None:
        """Announce a finished background write (trainer 0, training thread only)."""
        w = self._writer
        if w is None or (not block and w.is_alive()):
            return
        w.join()
        self._writer = None
        handoff, self._written = self._written, None
        if handoff is None:  # the write failed (its thread printed why): nothing to announce
            return
        self._n_submitted = handoff.n
        self._submitted[handoff.n] = handoff.step
        self.channel.announce_weights(handoff)
        self._prune_weights()

    def _prune_weights(self) -> None:
        consumed = self.channel.consumed()
        for p in self.weights_dir.glob("w_*.pt"):
            m = re.fullmatch(r"w_(\d+)\.pt", p.name)
            if m and int(m.group(1)) < consumed:
                p.unlink(missing_ok=True)

    # -- adoption --------------------------------------------------------------------------------
    def _health(self) -> str | None:
        ch = self.channel
        if (err := ch.index_error()) is not None:
            return f"the index rank raised: {err}"
        if (who := ch.index_process()) is not None and who.host == hostname() and not pid_alive(who.pid, who.start):
            return f"the index rank process (pid {who.pid}) is gone"
        hb = ch.heartbeat_seq()  # the largest seen: an older heartbeat replayed does not count
        now = time.monotonic()
        if hb > self._hb:
            self._hb, self._hb_t = hb, now
        elif now - self._hb_t > self.timeout_s:
            return f"no heartbeat from the index rank for {now - self._hb_t:.0f}s (index_timeout_s)"
        return None

    def _decide(self, step: int) -> tuple[str, Any] | None:
        """Trainer 0 only: look at the store without blocking."""
        try:
            out = None
            pub = self.channel.latest_publication()
            if pub is not None and self._adoptable(pub, step):
                out = ("adopt", pub)
                # announced before any trainer loads it: the index rank never prunes it from now on
                self.channel.mark_adopted(pub.version)
            why = self._health()
        except (RuntimeError, OSError) as e:  # the store itself is gone (it lived in the index process)
            return ("fail", f"coordination store unreachable: {e!r}")
        if why is not None:
            # a version published before the failure is still adopted first
            return out or ("fail", why)
        return out

    def _adoptable(self, pub: Publication, step: int) -> bool:
        """Whether trainers adopt ``pub`` (signed by this job's index rank) at ``step``: newer than the version in
        use, built from a hand-off this trainer 0 made in this job (number and step match: the index rank can
        only have read what was announced), and not from weights newer than ``step`` (staleness is never
        negative). A version that breaks the hand-off rule is reported once."""
        if self.current is not None and pub.version <= self.current.version:
            return False
        if self._submitted.get(pub.weights_n) != pub.weights_step:
            if pub.version not in self._refused:
                self._refused.add(pub.version)
                warnings.warn(f"ignoring index version {pub.version}: not built from a weights hand-off of this job "
                              f"(hand-off {pub.weights_n}, step {pub.weights_step})", RuntimeWarning, stacklevel=3)
            return False
        return pub.weights_step <= step

    def poll(self, step: int, load_fn: Callable[[str], Any] | None = None) -> AdoptDecision | None:
        """Call on EVERY trainer at EVERY step (a small broadcast). Returns the decision when a newer
        version is adopted at this step (after ``load_fn(path)`` ran on this trainer), else None.
        Raises :class:`IndexRankFailed` on every trainer at the same step under ``stop``. Its time counts
        as blocked, and the staleness of the index in use at ``step`` is recorded (``stats``)."""
        with self.stats.blocking():
            decision = self._poll(step, load_fn)
        self.stats.note_step(step, self.current.weights_step if self.current is not None else None)
        return decision

    def _poll(self, step: int, load_fn: Callable[[str], Any] | None) -> AdoptDecision | None:
        if self.failed is not None or self.store is None:
            return None  # every trainer knows the same thing: no collective needed any more
        if self._rank0:
            try:
                self._finish_write(block=False)
            except (RuntimeError, OSError):  # store gone: _decide reports the failure below
                pass
        decision = self._decide(step) if self._rank0 else None
        # The common case (nothing new) costs one int broadcast; the details travel only on a change.
        if not self.ctx.broadcast_int(0 if decision is None else 1):
            return None
        decision = self.ctx.broadcast_object_trainers(decision)
        kind, body = decision
        if kind == "fail":
            self.failed = body
            if self.on_failure == "stop":
                raise IndexRankFailed(f"index rank failed at step {step}: {body}; stopping "
                                      "(distributed.on_index_failure=stop)")
            if self._rank0:
                last = f"version {self.current.version}" if self.current else "no index version"
                warnings.warn(f"index rank failed at step {step}: {body}; training continues on {last} "
                              "(distributed.on_index_failure=continue)", RuntimeWarning, stacklevel=2)
            return None
        return self._adopt(step, body, load_fn)

    def _adopt(self, step: int, pub: Publication, load_fn: Callable[[str], Any] | None) -> AdoptDecision:
        t0 = time.perf_counter()
        if load_fn is not None:
            load_fn(pub.path)
        d = AdoptDecision(version=pub.version, path=pub.path, weights_step=pub.weights_step, step=int(step),
                          staleness=int(step) - pub.weights_step, swap_s=time.perf_counter() - t0)
        self.current = d
        self.history.append(d)
        self.stats.n_adopted += 1
        if self._rank0:
            self.log_fn({mn.INDEX_VERSION: d.version, mn.INDEX_STALENESS_STEPS: d.staleness,
                         mn.INDEX_SWAP_S: d.swap_s, mn.INDEX_BUILD_S: float(pub.build_s)}, step)
        return d

    def wait_for_version(self, version: int, step: int, load_fn: Callable[[str], Any] | None = None, *,
                         timeout_s: float | None = None, interval_s: float = 0.2) -> AdoptDecision:
        """Block (every trainer) until a version >= ``version`` is adopted, e.g. the first index.
        Bounded by ``timeout_s`` (default ``index_timeout_s``); a failure raises under both policies."""
        with self.stats.blocking():
            return self._wait_for_version(version, step, load_fn, timeout_s, interval_s)

    def _wait_for_version(self, version: int, step: int, load_fn: Callable[[str], Any] | None,
                          timeout_s: float | None, interval_s: float) -> AdoptDecision:
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.timeout_s)
        while True:
            if self.current is not None and self.current.version >= version:
                return self.current
            timed_out = time.monotonic() > deadline if self._rank0 else False
            if self.ctx.broadcast_object_trainers(timed_out):
                raise IndexRankFailed(f"no index version >= {version} within the timeout")
            self.poll(step, load_fn)
            if self.failed is not None and (self.current is None or self.current.version < version):
                raise IndexRankFailed(f"index rank failed before version {version}: {self.failed}")
            time.sleep(interval_s)

    def done(self, wait_s: float = 60.0) -> bool:
        """Tell the index rank to exit (trainer 0 acts; safe to call on every trainer; not a
        collective). Trainer 0 then waits up to ``wait_s`` for the index rank to leave, because the
        store lives in trainer 0's process (global rank 0) and must outlive the index rank's last
        call. Returns True when the index rank acknowledged."""
        if not self._rank0 or self.store is None:
            return False
        if self._writer is not None:  # nothing waits for these weights any more
            self._writer.join()
            self._writer = None
        try:
            self.channel.send_done()
            bye = False
            if self.failed is None:
                deadline = time.monotonic() + wait_s
                while time.monotonic() < deadline:
                    if self.channel.bye_received() or self._health() is not None:
                        break
                    time.sleep(0.05)
                bye = self.channel.bye_received()
            self._end_supervisor(wait_s)
            return bye
        except (RuntimeError, OSError) as e:  # the index rank (and its store) may already be gone
            print(f"[index] could not signal done to the index rank: {e!r}", flush=True)
            return False

    def _end_supervisor(self, wait_s: float) -> None:
        """Wait up to ``wait_s`` for the index rank's launcher-started process (its supervisor) to leave;
        on this host, kill one that does not (stopped, hung), so the launcher can end the job."""
        who = self.channel.index_process()
        pid = who.supervisor if who is not None else None
        if pid is None or who.host != hostname() or who.supervisor_start is None:
            return  # no supervisor, on another node (its launcher ends it), or nothing to tell that pid's process by
        if end_lingering(pid, wait_s, start=who.supervisor_start):
            warnings.warn(f"the index rank (pid {pid}) did not leave within {wait_s:.0f}s of the end of "
                          "training (stopped or hung): killed it", RuntimeWarning, stacklevel=3)

    def state_dict(self) -> dict:
        """What a checkpoint needs to know about the index in use."""
        return {"current": asdict(self.current) if self.current else None, "stats": self.stats.state_dict(),
                "history": [asdict(d) for d in self.history]}

    def load_state_dict(self, state: dict) -> None:
        cur = state.get("current")
        self.current = AdoptDecision(**cur) if cur else None
        self.history = [AdoptDecision(**d) for d in state.get("history") or []]
        self.stats.load_state_dict(state.get("stats") or {})


def _print_metrics(metrics: dict, step: int) -> None:
    print(f"[index] step {step}: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in metrics.items()), flush=True)
