"""Asynchronous index refresh, trainer side: the protocol's store keys and :class:`IndexClient`.

The index rank's side is :mod:`distrag.distributed.refresh_server`. Everything goes through the
coordination store of :mod:`distrag.distributed.roles` and a shared folder; the index rank never joins a
trainer collective, and the trainers never wait for the index rank::

    trainer 0                          store (keys under "distrag/index/")      index rank
    submit_weights(step, sd)  -- writes weights/w_<n>.pt, add(weights, 1) -->  sees n > consumed,
                                                                               skips to the newest,
                                                                               re-embeds in shards,
    poll(step) every step     <-- add(published, 0), meta/<c> -------------   builds, publishes v
      decision broadcast to all trainers: every trainer adopts v at the same step
    done()                    -- add(done, 1) --------------------------------> exits its loop

Health: the index rank bumps ``heartbeat`` while idle and between shards, records its host:pid
(under a launcher, the worker's pid and its supervisor's: :mod:`distrag.distributed.index_supervisor`),
and records ``error`` if its loop raises or its worker dies. Trainer 0 declares a failure when the heartbeat counter
has not moved for ``index_timeout_s`` (local clock: no cross-node clock skew), when the process is
gone (same host), when an error was recorded, or when the store is unreachable. Then every trainer
follows ``on_index_failure`` at the same step: ``continue`` on the last version (one warning) or
``stop`` (:class:`IndexRankFailed` raised on every trainer).

Pruning: trainer 0 sets ``adopted`` to the version it adopts *before* any trainer loads it; the index
rank never deletes that version, the newest ``keep_index_versions`` ones, or one a checkpoint names.

Versions are :class:`~distrag.retrieval.sharded_index.ShardedIndex` directories published with
:func:`distrag.retrieval.index_store.publish` (``root/v000001`` ..., atomically, then ``root/LATEST``);
the store's ``meta/<c>`` names the folder, and ``load_fn(path)`` (e.g. ``index_store.load``) reads it.

Trust: the store has no authentication, so every record the index rank *sets* (``meta/<c>``, ``pid``,
``error``) is signed (:func:`signed_record`: HMAC-SHA256 under the run's secret, bound to its key; see
:mod:`distrag.distributed.run_secret`), and trainer 0 acts only on records that verify and, for
``meta/<c>``, name a folder inside the run folder (symlinks resolved). Anything else is ignored with a
warning, so a foreign client can never make the trainers open a path. Counters (``add``) cannot be
signed: a client that reaches the store can still disturb a run (stall adoption, fake a heartbeat,
signal ``done``); the stores' binding (:mod:`distrag.distributed.stores`) keeps strangers away from them.

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

Index rank: :mod:`distrag.distributed.refresh_server` (``IndexServer(...).run()``).
"""

from __future__ import annotations

import io
import re
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from distrag import metric_names as mn
from distrag.atomic_io import atomic_write_bytes
from distrag.distributed import run_secret
from distrag.distributed.refresh_stats import RefreshStats
from distrag.errors import IndexRankFailed
from distrag.process_watch import end_lingering, hostname, pid_alive

PREFIX = "distrag/index/"
K_WEIGHTS = PREFIX + "weights"  # submissions by trainer 0 (counter)
K_CONSUMED = PREFIX + "consumed"  # newest submission the index rank has started on (counter)
K_PUBLISHED = PREFIX + "published"  # publications (counter); meta/<count> holds the details
K_HEARTBEAT = PREFIX + "heartbeat"  # bumped by the index rank (counter)
K_PID = PREFIX + "pid"  # "host:pid" of the index rank
K_ERROR = PREFIX + "error"  # set when the index loop raised
K_DONE = PREFIX + "done"  # set by trainer 0 when training ends
K_BYE = PREFIX + "bye"  # set by the index rank when it leaves (trainer 0 hosts the store: it waits)
K_ADOPTED = PREFIX + "adopted"  # version trainer 0 adopts, set before any trainer loads it (counter)


def meta_key(count: int) -> str:
    """Store key of the details (version, folder, weights step, ...) of publication number ``count``."""
    return f"{PREFIX}meta/{count}"


def inside(path: str, folder: Path) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside ``folder``."""
    try:
        return Path(path).resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError, ValueError):
        return False


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
        self._seen_pub = 0
        self._hb = -1
        self._hb_t = time.monotonic()
        self._n_submitted = 0
        self._writer: threading.Thread | None = None
        self._ignored: set[tuple[str, bytes]] = set()  # foreign records already warned about
        self._key = b""
        if self._rank0 and self.store is not None:
            self._key = run_secret.run_secret(self.run_root)
            self._n_submitted = self.store.add(K_WEIGHTS, 0)
            self._seen_pub = self.store.add(K_PUBLISHED, 0)

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
                # the rename keeps it all-or-nothing; a hand-off file is useless after a crash, so no fsync
                atomic_write_bytes(path, buf.getvalue(), fsync=False)

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
        self._n_submitted = self.store.add(K_WEIGHTS, 1)
        self._prune_weights()

    def _prune_weights(self) -> None:
        consumed = self.store.add(K_CONSUMED, 0)
        for p in self.weights_dir.glob("w_*.pt"):
            m = re.fullmatch(r"w_(\d+)\.pt", p.name)
            if m and int(m.group(1)) < consumed:
                p.unlink(missing_ok=True)

    # -- adoption --------------------------------------------------------------------------------
    def _trusted(self, store_key: str) -> dict | None:
        """The record under ``store_key`` if the index rank of this run signed it (trainer 0); a foreign
        record is ignored, with one warning."""
        raw = self.store.get(store_key)
        record, why = run_secret.read_record(self._key, store_key, raw)
        if record is None and (store_key, raw) not in self._ignored:
            self._ignored.add((store_key, raw))
            warnings.warn(f"ignoring {store_key!r} in the coordination store: {why} (not written by this "
                          "run's index rank)", RuntimeWarning, stacklevel=3)
        return record

    def _trusted_meta(self, store_key: str) -> dict | None:
        """A publication record that is signed, well formed and names a folder inside the run folder."""
        meta = self._trusted(store_key)
        if meta is None:
            return None
        if not (isinstance(meta.get("version"), int) and isinstance(meta.get("weights_step"), int)
                and isinstance(meta.get("path"), str)):
            warnings.warn(f"ignoring {store_key!r}: malformed publication record", RuntimeWarning, stacklevel=2)
            return None
        if not inside(meta["path"], self.run_root):
            warnings.warn(f"ignoring {store_key!r}: index path {meta['path']} is outside the run folder "
                          f"{self.run_root}", RuntimeWarning, stacklevel=2)
            return None
        return meta

    def _health(self) -> str | None:
        s = self.store
        if s.check([K_ERROR]) and (err := self._trusted(K_ERROR)) is not None:
            return f"the index rank raised: {err.get('error')}"
        if s.check([K_PID]) and (who := self._trusted(K_PID)) is not None:
            pid = who.get("pid")
            if who.get("host") == hostname() and isinstance(pid, int) and not pid_alive(pid):
                return f"the index rank process (pid {pid}) is gone"
        hb = s.add(K_HEARTBEAT, 0)
        now = time.monotonic()
        if hb != self._hb:
            self._hb, self._hb_t = hb, now
        elif now - self._hb_t > self.timeout_s:
            return f"no heartbeat from the index rank for {now - self._hb_t:.0f}s (index_timeout_s)"
        return None

    def _decide(self, step: int) -> tuple[str, Any] | None:
        """Trainer 0 only: look at the store without blocking."""
        try:
            out = None
            pub = self.store.add(K_PUBLISHED, 0)
            if pub > self._seen_pub and self.store.check([meta_key(pub)]):
                meta = self._trusted_meta(meta_key(pub))
                self._seen_pub = pub
                if meta is not None and (self.current is None or meta["version"] > self.current.version):
                    out = ("adopt", meta)
                    # announced before any trainer loads it: the index rank never prunes it from now on
                    self.store.add(K_ADOPTED, meta["version"] - self.store.add(K_ADOPTED, 0))
            why = self._health()
        except (RuntimeError, OSError) as e:  # the store itself is gone (it lived in the index process)
            return ("fail", f"coordination store unreachable: {e!r}")
        if why is not None:
            # a version published before the failure is still adopted first
            return out or ("fail", why)
        return out

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

    def _adopt(self, step: int, meta: dict, load_fn: Callable[[str], Any] | None) -> AdoptDecision:
        t0 = time.perf_counter()
        if load_fn is not None:
            load_fn(meta["path"])
        d = AdoptDecision(version=int(meta["version"]), path=str(meta["path"]),
                          weights_step=int(meta["weights_step"]), step=int(step),
                          staleness=int(step) - int(meta["weights_step"]), swap_s=time.perf_counter() - t0)
        self.current = d
        self.history.append(d)
        self.stats.n_adopted += 1
        if self._rank0:
            self.log_fn({mn.INDEX_VERSION: d.version, mn.INDEX_STALENESS_STEPS: d.staleness,
                         mn.INDEX_SWAP_S: d.swap_s, mn.INDEX_BUILD_S: float(meta.get("build_s", 0.0))}, step)
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
            self.store.add(K_DONE, 1)
            bye = False
            if self.failed is None:
                deadline = time.monotonic() + wait_s
                while time.monotonic() < deadline:
                    if self.store.add(K_BYE, 0) > 0 or self._health() is not None:
                        break
                    time.sleep(0.05)
                bye = self.store.add(K_BYE, 0) > 0
            self._end_supervisor(wait_s)
            return bye
        except (RuntimeError, OSError) as e:  # the index rank (and its store) may already be gone
            print(f"[index] could not signal done to the index rank: {e!r}", flush=True)
            return False

    def _end_supervisor(self, wait_s: float) -> None:
        """Wait up to ``wait_s`` for the index rank's launcher-started process (its supervisor) to leave;
        on this host, kill one that does not (stopped, hung), so the launcher can end the job."""
        who = self._trusted(K_PID) if self.store.check([K_PID]) else None
        pid = who.get("supervisor") if who else None
        if not isinstance(pid, int) or who.get("host") != hostname():
            return  # no supervisor, or on another node: its launcher ends it
        if end_lingering(pid, wait_s):
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
