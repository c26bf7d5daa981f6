"""The asynchronous index refresh's protocol: its store keys, what a published version records, and the one
channel through which trainer 0 and the index rank talk.

Both sides meet in the coordination TCPStore of :mod:`distrag.distributed.roles` and in the run folder
(weights hand-offs, index versions). The trainer side is :mod:`distrag.distributed.refresh_client`, the
index rank's :mod:`distrag.distributed.refresh_server` (supervised by
:mod:`distrag.distributed.index_supervisor`); none of them touches the store but through
:class:`RefreshChannel`, so what crosses the store, how it is signed and how it is checked live here::

    trainer 0                          store (keys under "distrag/index/")      index rank
    submit_weights(step, sd)  -- writes weights/w_<n>.pt, add(weights, 1) -->  sees n > consumed,
                                                                               skips to the newest,
                                                                               re-embeds in shards,
    poll(step) every step     <-- add(published, 0), meta/<c> -------------   builds, publishes v
      decision broadcast to all trainers: every trainer adopts v at the same step
    done()                    -- add(done, 1) --------------------------------> exits its loop

Health: the index rank bumps ``heartbeat`` while idle and between shards, records its host:pid (under a
launcher, the worker's pid and its supervisor's) and records ``error`` if its loop raises or its worker
dies. Pruning: trainer 0 sets ``adopted`` to the version it adopts *before* any trainer loads it; the index
rank never deletes that version.

What a published version records is :class:`Publication`: to record something more about a version, add
a field there and fill it in :meth:`~distrag.distributed.refresh_server.IndexServer.publish_version`.

Trust: the store has no authentication, so every record the index rank *sets* (``meta/<c>``, ``pid``,
``error``) is signed (:func:`signed_record`: HMAC-SHA256 under the run's secret, bound to its key; see
:mod:`distrag.distributed.run_secret`), and trainer 0 acts only on records that verify and, for a
publication, name a folder inside the run folder (symlinks resolved). Anything else is ignored with a
warning, so a foreign client can never make the trainers open a path. Counters (``add``) cannot be
signed: a client that reaches the store can still disturb a run (stall adoption, fake a heartbeat,
signal ``done``); the stores' binding (:mod:`distrag.distributed.stores`) keeps strangers away from them.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distrag.distributed import run_secret
from distrag.process_watch import hostname

PREFIX = "distrag/index/"
K_WEIGHTS = PREFIX + "weights"  # submissions by trainer 0 (counter)
K_CONSUMED = PREFIX + "consumed"  # newest submission the index rank has started on (counter)
K_PUBLISHED = PREFIX + "published"  # publications (counter); meta/<count> holds the details
K_HEARTBEAT = PREFIX + "heartbeat"  # bumped by the index rank (counter)
K_PID = PREFIX + "pid"  # host and pid(s) of the index rank (signed)
K_ERROR = PREFIX + "error"  # set when the index loop raised (signed)
K_DONE = PREFIX + "done"  # set by trainer 0 when training ends
K_BYE = PREFIX + "bye"  # set by the index rank when it leaves (trainer 0 hosts the store: it waits)
K_ADOPTED = PREFIX + "adopted"  # version trainer 0 adopts, set before any trainer loads it (counter)


def meta_key(count: int) -> str:
    """Store key of the :class:`Publication` of publication number ``count``."""
    return f"{PREFIX}meta/{count}"


def inside(path: str, folder: Path) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside ``folder``."""
    try:
        return Path(path).resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError, ValueError):
        return False


def signed_record(key: bytes, store_key: str, record: dict) -> str:
    """The store value of ``record`` for ``store_key``: JSON of the record and its HMAC under ``key``."""
    body = json.dumps(record, sort_keys=True)
    return json.dumps({"record": record, "hmac": run_secret.sign(key, store_key, body)})


def read_record(key: bytes, store_key: str, raw: bytes) -> tuple[dict | None, str]:
    """``(record, "")`` when ``raw`` is a :func:`signed_record` for ``store_key`` under ``key``, else
    ``(None, why not)``."""
    try:
        value = json.loads(raw)
        record, mac = value["record"], value["hmac"]
    except (ValueError, TypeError, KeyError):
        return None, "not a signed record"
    if not isinstance(record, dict) or not run_secret.verify(key, mac, store_key, json.dumps(record, sort_keys=True)):
        return None, "its signature does not verify under the run's secret"
    return record, ""


# ----------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class Publication:
    """What the index rank records about an index version it published, and what trainers adopt."""
    version: int
    """Index version (the folder ``v<version>`` under the publish root)."""
    path: str
    """The published folder (trainers open it only inside the run folder)."""
    weights_step: int
    """Training step of the embedder weights the version was built from."""
    weights_n: int = 0
    """Number of the weights hand-off it was built from."""
    n_vectors: int = 0
    """Passages in the index."""
    build_s: float = 0.0
    """Seconds from loading the weights to the published version."""
    created: float = 0.0
    """When it was published (the index rank's clock, seconds since the epoch)."""

    @classmethod
    def from_record(cls, record: dict) -> Publication | None:
        """The publication a verified record describes, or None when a field is missing or of the wrong type."""
        ints = ("version", "weights_step", "weights_n", "n_vectors")
        if not (isinstance(record.get("path"), str)
                and all(isinstance(record.get(k), int) for k in ("version", "weights_step"))
                and all(isinstance(record.get(k, 0), int) for k in ints)
                and all(isinstance(record.get(k, 0.0), (int, float)) for k in ("build_s", "created"))):
            return None
        return cls(**{k: record[k] for k in cls.__dataclass_fields__ if k in record})

    def to_record(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class IndexProcess:
    """Where the index rank runs: trainer 0 watches ``pid`` and, after training, ends a lingering ``supervisor``."""
    host: str
    pid: int
    """The process doing the work (under a launcher, the index worker)."""
    supervisor: int | None = None
    """The launcher-started process supervising the worker (None: the worker was started by the launcher)."""

    @classmethod
    def from_record(cls, record: dict) -> IndexProcess | None:
        sup = record.get("supervisor")
        if not (isinstance(record.get("host"), str) and isinstance(record.get("pid"), int)
                and (sup is None or isinstance(sup, int))):
            return None
        return cls(record["host"], record["pid"], sup)

    def to_record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


# ----------------------------------------------------------------------------------------------
# the channel


class RefreshChannel:
    """One end of the refresh protocol over the coordination ``store``, for the run in ``run_root`` (its
    secret signs every record set here; what is read is verified under it). Trainer 0 and the index
    rank's processes each hold one; the methods are grouped by the side that calls them."""

    def __init__(self, store: Any, run_root: str | Path):
        self.store = store
        self.run_root = Path(run_root)
        self._key = run_secret.run_secret(self.run_root)
        self._ignored: set[tuple[str, bytes]] = set()  # foreign records already warned about

    def _set(self, key: str, record: dict) -> None:
        self.store.set(key, signed_record(self._key, key, record))

    def _read(self, key: str) -> dict | None:
        """The record under ``key`` if this run signed it, else None; a foreign record is ignored, with one
        warning. Does not wait for the key."""
        if not self.store.check([key]):
            return None
        raw = self.store.get(key)
        record, why = read_record(self._key, key, raw)
        if record is None and (key, raw) not in self._ignored:
            self._ignored.add((key, raw))
            warnings.warn(f"ignoring {key!r} in the coordination store: {why} (not written by this run's "
                          "index rank)", RuntimeWarning, stacklevel=3)
        return record

    # -- trainer 0 ---------------------------------------------------------------------------------
    def weights_announced(self) -> int:
        """Weights hand-offs announced so far."""
        return self.store.add(K_WEIGHTS, 0)

    def announce_weights(self) -> int:
        """Announce the next weights hand-off (its file is complete); returns its number."""
        return self.store.add(K_WEIGHTS, 1)

    def consumed(self) -> int:
        """The newest hand-off the index rank has started on (older files can go)."""
        return self.store.add(K_CONSUMED, 0)

    def publications(self) -> int:
        """Publications so far."""
        return self.store.add(K_PUBLISHED, 0)

    def publication_recorded(self, count: int) -> bool:
        """Whether the record of publication number ``count`` is in the store (the counter moves after it)."""
        return self.store.check([meta_key(count)])

    def publication(self, count: int) -> Publication | None:
        """Publication number ``count`` if the index rank of this run signed it, it is well formed and it
        names a folder inside the run folder; else None (a warning says why)."""
        key = meta_key(count)
        record = self._read(key)
        if record is None:
            return None
        pub = Publication.from_record(record)
        if pub is None:
            warnings.warn(f"ignoring {key!r}: malformed publication record", RuntimeWarning, stacklevel=2)
            return None
        if not inside(pub.path, self.run_root):
            warnings.warn(f"ignoring {key!r}: index path {pub.path} is outside the run folder {self.run_root}",
                          RuntimeWarning, stacklevel=2)
            return None
        return pub

    def mark_adopted(self, version: int) -> None:
        """Tell the index rank which version trainers adopt (before any of them loads it: it is never pruned)."""
        self.store.add(K_ADOPTED, version - self.store.add(K_ADOPTED, 0))

    def index_error(self) -> str | None:
        """What the index rank recorded when it failed, or None."""
        record = self._read(K_ERROR)
        return None if record is None else str(record.get("error"))

    def index_process(self) -> IndexProcess | None:
        """Where the index rank runs, as it announced it (None before it did, or when the record is foreign)."""
        record = self._read(K_PID)
        return None if record is None else IndexProcess.from_record(record)

    def heartbeats(self) -> int:
        """The index rank's heartbeat count (it moves while the index rank works)."""
        return self.store.add(K_HEARTBEAT, 0)

    def send_done(self) -> None:
        """Training has ended: the index rank leaves its loop."""
        self.store.add(K_DONE, 1)

    def bye_received(self) -> bool:
        """The index rank has left its loop."""
        return self.store.add(K_BYE, 0) > 0

    # -- the index rank ----------------------------------------------------------------------------
    def announce_process(self, pid: int, supervisor: int | None = None) -> None:
        """Record this host and the index rank's pid(s), signed (trainer 0 watches them)."""
        self._set(K_PID, IndexProcess(hostname(), pid, supervisor).to_record())

    def record_error(self, message: str) -> None:
        """Record why the index rank failed, signed (trainers follow ``on_index_failure``)."""
        self._set(K_ERROR, {"error": message})

    def error_recorded(self) -> bool:
        """Whether a failure is already recorded (the supervisor keeps the worker's own message)."""
        return self.store.check([K_ERROR])

    def heartbeat(self) -> None:
        self.store.add(K_HEARTBEAT, 1)

    def trainers_done(self) -> bool:
        """Whether trainer 0 said training has ended. Raises when the store is gone."""
        return self.store.add(K_DONE, 0) > 0

    def mark_consumed(self, n: int) -> None:
        """Hand-off ``n`` (and every older one) is taken: trainer 0 may delete their files."""
        self.store.add(K_CONSUMED, n - self.store.add(K_CONSUMED, 0))

    def publish(self, count: int, pub: Publication) -> None:
        """Announce ``pub``, this index rank's publication number ``count``: its signed record first, then the
        counter (a reader that sees the count finds the record)."""
        self._set(meta_key(count), pub.to_record())
        self.store.add(K_PUBLISHED, 1)

    def adopted_version(self) -> int:
        """The version trainer 0 adopted last (0: none yet)."""
        return self.store.add(K_ADOPTED, 0)

    def say_bye(self) -> None:
        """This index rank has left its loop (trainer 0, the store's host, waits for it)."""
        self.store.add(K_BYE, 1)
