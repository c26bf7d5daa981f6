"""Asynchronous index refresh between the trainers and the index rank.

Everything goes through the coordination store of :mod:`distrag.distributed.roles` and a shared folder; the index
rank never joins a trainer collective, and the trainers never wait for the index rank::

    trainer 0                          store (keys under "distrag/index/")      index rank
    submit_weights(step, sd)  -- writes weights/w_<n>.pt, add(weights, 1) -->  sees n > consumed,
                                                                               skips to the newest,
                                                                               re-embeds in shards,
    poll(step) every step     <-- add(published, 0), meta/<c> -------------   builds, publishes v
      decision broadcast to all trainers: every trainer adopts v at the same step
    done()                    -- add(done, 1) --------------------------------> exits its loop

Health: the index rank bumps ``heartbeat`` while idle and between shards, records its host:pid,
and records ``error`` if its loop raises. Trainer 0 declares a failure when the heartbeat counter
has not moved for ``index_timeout_s`` (local clock: no cross-node clock skew), when the process is
gone (same host), when an error was recorded, or when the store is unreachable. Then every trainer
follows ``on_index_failure`` at the same step: ``continue`` on the last version (one warning) or
``stop`` (:class:`IndexRankFailed` raised on every trainer).

Publishing is injectable: ``publish_fn(index, root, version, meta) -> Path``. :func:`make_dir_publisher`
turns a ``save_fn(index, folder)`` into one (atomic version directory with ``manifest.json``, then
an atomically replaced ``LATEST`` pointer); ``distrag.retrieval.sharded_index.publish`` can be wrapped the same way::

    publish_fn = lambda index, root, v, meta: distrag.index.publish(index, root, v)

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

Index rank: ``IndexServer(ctx.store, encode_corpus_fn, build_index_fn, publish_root, weights_dir,
publish_fn=...).run()``.
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distrag.atomic_io import atomic_directory, atomic_write_bytes, atomic_write_json, atomic_write_text
from distrag.errors import IndexRankFailed

PREFIX = "distrag/index/"
K_WEIGHTS = PREFIX + "weights"  # submissions by trainer 0 (counter)
K_CONSUMED = PREFIX + "consumed"  # newest submission the index rank has started on (counter)
K_PUBLISHED = PREFIX + "published"  # publications (counter); meta/<count> holds the details
K_HEARTBEAT = PREFIX + "heartbeat"  # bumped by the index rank (counter)
K_PID = PREFIX + "pid"  # "host:pid" of the index rank
K_ERROR = PREFIX + "error"  # set when the index loop raised
K_DONE = PREFIX + "done"  # set by trainer 0 when training ends
K_BYE = PREFIX + "bye"  # set by the index rank when it leaves (trainer 0 hosts the store: it waits)


def _meta_key(count: int) -> str:
    return f"{PREFIX}meta/{count}"


@dataclass
class AdoptDecision:
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
# publishing


def make_dir_publisher(save_fn: Callable[[Any, Path], None]) -> Callable[[Any, Path, int, dict], Path]:
    """``publish_fn`` writing ``root/v<version>`` atomically (``save_fn`` + ``manifest.json``), then
    replacing ``root/LATEST`` atomically. Readers see a complete version or none."""

    def publish(index: Any, root: Path, version: int, meta: dict) -> Path:
        root = Path(root)
        final = root / f"v{version:06d}"
        with atomic_directory(final, overwrite=True) as tmp:
            save_fn(index, tmp)
            atomic_write_json(tmp / "manifest.json", {**meta, "version": version})
        atomic_write_text(root / "LATEST", final.name + "\n")
        return final

    return publish


def read_latest(root: str | Path) -> tuple[int, Path] | None:
    """(version, folder) that ``root/LATEST`` points at, or None."""
    root = Path(root)
    try:
        name = (root / "LATEST").read_text().strip()
    except FileNotFoundError:
        return None
    m = re.fullmatch(r"v(\d+)", name)
    if not m or not (root / name / "manifest.json").is_file():
        return None
    return int(m.group(1)), root / name


# ----------------------------------------------------------------------------------------------
# trainer side


class IndexClient:
    """Trainer side of the refresh protocol. Construct and call on EVERY trainer."""

    def __init__(self, ctx, weights_dir: str | Path, *, index_timeout_s: float = 600.0,
                 on_index_failure: str = "continue", log_fn: Callable[[dict, int], None] | None = None,
                 current: AdoptDecision | None = None):
        if on_index_failure not in ("continue", "stop"):
            raise ValueError(f"on_index_failure must be 'continue' or 'stop', not {on_index_failure!r}")
        if ctx.info.is_index:
            raise ValueError("IndexClient runs on trainers; the index rank runs IndexServer")
        self.ctx = ctx
        self.store = ctx.store
        self.weights_dir = Path(weights_dir)
        self.timeout_s = float(index_timeout_s)
        self.on_failure = on_index_failure
        self.log_fn = log_fn or _print_metrics
        self.current = current
        """The version in use (restore it from a checkpoint on resume)."""
        self.history: list[AdoptDecision] = []
        self.failed: str | None = None
        """Why the index rank was declared failed (same on every trainer), else None."""
        self._rank0 = ctx.info.is_rank0
        self._seen_pub = 0
        self._hb = -1
        self._hb_t = time.monotonic()
        self._n_submitted = 0
        self._writer: threading.Thread | None = None
        if self._rank0 and self.store is not None:
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
    def _health(self) -> str | None:
        s = self.store
        if s.check([K_ERROR]):
            return f"the index rank raised: {s.get(K_ERROR).decode(errors='replace')}"
        if s.check([K_PID]):
            host, _, pid = s.get(K_PID).decode().rpartition(":")
            if host == _hostname() and not _pid_alive(int(pid)):
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
            if pub > self._seen_pub and self.store.check([_meta_key(pub)]):
                meta = json.loads(self.store.get(_meta_key(pub)))
                self._seen_pub = pub
                if self.current is None or meta["version"] > self.current.version:
                    out = ("adopt", meta)
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
        Raises :class:`IndexRankFailed` on every trainer at the same step under ``stop``."""
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
        if self._rank0:
            self.log_fn({"index/version": d.version, "index/staleness_steps": d.staleness,
                         "index/swap_s": d.swap_s, "index/build_s": float(meta.get("build_s", 0.0))}, step)
        return d

    def wait_for_version(self, version: int, step: int, load_fn: Callable[[str], Any] | None = None, *,
                         timeout_s: float | None = None, interval_s: float = 0.2) -> AdoptDecision:
        """Block (every trainer) until a version >= ``version`` is adopted, e.g. the first index.
        Bounded by ``timeout_s`` (default ``index_timeout_s``); a failure raises under both policies."""
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
            if self.failed is not None:
                return False
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if self.store.add(K_BYE, 0) > 0 or self._health() is not None:
                    break
                time.sleep(0.05)
            return self.store.add(K_BYE, 0) > 0
        except (RuntimeError, OSError) as e:  # the index rank (and its store) may already be gone
            print(f"[index] could not signal done to the index rank: {e!r}", flush=True)
            return False

    def state_dict(self) -> dict:
        """What a checkpoint needs to know about the index in use."""
        return {"current": asdict(self.current) if self.current else None}

    def load_state_dict(self, state: dict) -> None:
        cur = state.get("current")
        self.current = AdoptDecision(**cur) if cur else None


def _print_metrics(metrics: dict, step: int) -> None:
    print(f"[index] step {step}: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in metrics.items()), flush=True)


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (killed, not yet reaped by its launcher) is gone too
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# ----------------------------------------------------------------------------------------------
# index side


class IndexServer:
    """Index-rank loop. ``encode_corpus_fn(state_dict)`` yields the corpus embeddings shard by shard
    (float32 arrays); ``build_index_fn(embeddings)`` returns an index; ``publish_fn(index, root,
    version, meta) -> Path`` writes it atomically (default: numpy ``vectors.npy`` via
    :func:`make_dir_publisher`). Runs in the launcher-started index process (never a fork: faiss)."""

    def __init__(self, store, encode_corpus_fn: Callable[[dict], Iterable[np.ndarray]],
                 build_index_fn: Callable[[np.ndarray], Any], publish_root: str | Path,
                 weights_dir: str | Path, *, publish_fn: Callable[[Any, Path, int, dict], Path] | None = None,
                 poll_interval_s: float = 0.2, log: Callable[[str], None] | None = None,
                 start_version: int | None = None):
        self.store = store
        self.encode_corpus_fn = encode_corpus_fn
        self.build_index_fn = build_index_fn
        self.root = Path(publish_root)
        self.weights_dir = Path(weights_dir)
        self.publish_fn = publish_fn or make_dir_publisher(
            lambda vecs, d: np.save(d / "vectors.npy", np.asarray(vecs, dtype=np.float32)))
        self.poll_s = poll_interval_s
        self.log = log or (lambda msg: print(f"[index rank] {msg}", flush=True))
        if start_version is None:  # on resume, versions continue after the ones on disk
            latest = read_latest(self.root)
            start_version = latest[0] if latest else 0
        self.version = start_version
        self.consumed = 0
        self.published = 0

    def heartbeat(self) -> None:
        self.store.add(K_HEARTBEAT, 1)

    def _done(self) -> bool:
        return self.store.add(K_DONE, 0) > 0

    def run(self) -> int:
        """Serve until trainer 0 calls ``done()``. Returns the number of versions published."""
        self.store.set(K_PID, f"{_hostname()}:{os.getpid()}")
        self.consumed = self.store.add(K_CONSUMED, 0)
        try:
            while True:
                self.heartbeat()
                if self._done():
                    self.log(f"trainers are done; {self.published} version(s) published, exiting")
                    self.store.add(K_BYE, 1)
                    return self.published
                newest = self.store.add(K_WEIGHTS, 0)
                if newest > self.consumed:
                    if newest > self.consumed + 1:
                        self.log(f"skipping weights {self.consumed + 1}..{newest - 1}: newer ones arrived")
                    self.store.add(K_CONSUMED, newest - self.consumed)
                    self.consumed = newest
                    self._refresh(newest)
                else:
                    time.sleep(self.poll_s)
        except BaseException as e:
            try:
                self.store.set(K_ERROR, f"{type(e).__name__}: {e}")
            except (RuntimeError, OSError) as e2:
                self.log(f"could not record the error in the store: {e2!r}")
            raise

    def _refresh(self, n: int) -> None:
        t0 = time.perf_counter()
        blob = torch.load(self.weights_dir / f"w_{n:06d}.pt", map_location="cpu", weights_only=True)
        shards = []
        n_rows = 0
        for i, emb in enumerate(self.encode_corpus_fn(blob["state_dict"])):
            emb = np.asarray(emb, dtype=np.float32)
            shards.append(emb)
            n_rows += len(emb)
            self.heartbeat()
            self.log(f"weights {n} (step {blob['step']}): shard {i + 1} embedded, {n_rows} passages")
            if self._done():
                self.log("trainers finished during re-embedding; abandoning this version")
                return
        vectors = np.concatenate(shards) if shards else np.zeros((0, 0), np.float32)
        index = self.build_index_fn(vectors)
        self.heartbeat()
        version = self.version + 1
        build_s = time.perf_counter() - t0
        meta = {"weights_step": int(blob["step"]), "weights_n": n, "n_vectors": len(vectors),
                "build_s": build_s, "created": time.time()}
        path = Path(self.publish_fn(index, self.root, version, meta))
        self.version = version
        self.published += 1
        # details first, then the counter: a reader that sees the count finds the details
        self.store.set(_meta_key(self.published), json.dumps({**meta, "version": version, "path": str(path)}))
        self.store.add(K_PUBLISHED, 1)
        self.log(f"published version {version} from step {blob['step']} in {build_s:.2f}s -> {path}")
