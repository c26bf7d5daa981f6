"""The asynchronous index refresh's protocol: its store keys, what each side records, and the one channel
through which trainer 0 and the index rank talk.

Both sides meet in the coordination TCPStore of :mod:`distrag.distributed.roles` and in the run folder
(weights hand-offs, index versions). The trainer side is :mod:`distrag.distributed.refresh_client`, the
index rank's :mod:`distrag.distributed.refresh_server` (supervised by
:mod:`distrag.distributed.index_supervisor`); none of them touches the store but through
:class:`RefreshChannel`, so what crosses the store, how it is signed and how it is checked live here::

    trainer 0                               store (keys under "distrag/index/")        index rank
    submit_weights(step, sd) -- weights/w_<n>.pt, then weights = {n, step, sha256} -->  n > consumed:
                             <-- consumed = {n} ------------------------------------   checks the file's
                                                                                       sha256, re-embeds,
    poll(step) every step    <-- publication = {version, path, weights step, ...} --   builds, publishes v
      adopt v (> the version in use, built from one of this job's hand-offs, staleness >= 0):
      adopted = {v} first, then the decision is broadcast: every trainer adopts v at the same step
    done()                   -- done = {} ------------------------------------------>  leaves its loop,
                             <-- bye = {} -------------------------------------------   bye

Health: the index rank sets ``heartbeat`` (a sequence number that only grows) while idle and between
shards, ``pid`` (host, pid and start time of the worker, and of its supervisor under a launcher) and
``error`` when its loop raises or its worker dies. Pruning: the index rank never deletes the version in
``adopted``. What a published version records is :class:`Publication`: to record something more about a
version, add a field there and fill it in :meth:`~distrag.distributed.refresh_server.IndexServer.publish_version`.

Trust (issue 19). The store has no authentication: anything that reaches its port can read, set, add to
or delete any key. So:

* **Every key holds a signed record; there are no counters.** Each record is HMAC-SHA256 under the run's
  secret (:mod:`distrag.distributed.run_secret`), bound to its store key and to the **job** (below). One
  side sets each key, the other only reads it, without blocking (a read never waits for a key an outsider
  may have deleted) and never with ``add`` (``add`` on a value that is not a number makes the store close
  the connection). A value that is not a record, does not verify or is malformed is ignored with one
  warning per key and reason; it can never raise in either side's loop.
* **The job.** A run folder outlives its jobs (a SLURM requeue keeps SLURM_JOB_ID; ``resume=none`` reuses
  the folder), and a record signed by an earlier job verifies under the same secret. So trainer 0 makes a
  fresh random nonce when it starts (:func:`start_job`) and writes it to ``<run folder>/.distrag_job``;
  every record carries the nonce and is signed with it, and a reader accepts only records of its own job.
  The index rank learns the nonce from that file, not from the store: the run folder is trusted (whoever
  can write it can rewrite checkpoints anyway), a store is not, and an old record can always be replayed
  through it. The index rank may start before trainer 0 writes the nonce (it then reads an earlier job's,
  or none): it checks the file at every turn of its loop and between shards, and when the job changes it
  drops that job's hand-offs (an unfinished version is abandoned, never published for the new job),
  re-signs what stays true (its pid, an error) and continues under the new one. Freshness thus comes from
  the file; a replayed record of any other job is ignored.
* **What trainers act on is found and checked without trusting a count.** Trainer 0 reads the one signed
  ``publication`` record and adopts it only if its version is newer than the one in use, it was built from
  a hand-off this trainer 0 made in this job (number and step match), its staleness is not negative, and
  its folder lies inside the run folder (symlinks resolved). The index rank builds only from a signed
  hand-off whose file matches the sha256 in it, so a stale hand-off file of an earlier job is never read.
  Sequence numbers that must grow (hand-offs, versions, heartbeats, the adopted version) are compared with
  the largest seen: a replay of an older record of this job changes nothing.
* **Processes.** The ``pid`` record carries start times (``/proc/<pid>/stat``); trainer 0 judges the index
  rank gone, or ends a lingering supervisor, only on its own host and only while pid and start time still
  name that process (:func:`distrag.process_watch.kill_if_same`): it never signals a process the job did
  not start.

What an outsider can still do is withhold: delete or overwrite records faster than their writer sets them
again. That delays adoption (and, sustained against the heartbeat, looks like a stalled index rank); it
cannot make trainers adopt a version this job did not build, open a path outside the run folder, signal
another process, or crash either side. The stores' binding (:mod:`distrag.distributed.stores`) keeps
strangers away from them in the first place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import stat
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from distrag.atomic_io import atomic_write_text
from distrag.distributed import run_secret
from distrag.process_watch import hostname, start_time

log = logging.getLogger(__name__)

PREFIX = "distrag/index/"
# set by trainer 0
K_WEIGHTS = PREFIX + "weights"  # WeightsHandoff: the newest hand-off (its file is complete)
K_ADOPTED = PREFIX + "adopted"  # {"version"}: what trainers adopt, set before any of them loads it
K_DONE = PREFIX + "done"  # {}: training has ended
# set by the index rank
K_CONSUMED = PREFIX + "consumed"  # {"n"}: the newest hand-off it started on (older files can go)
K_PUBLICATION = PREFIX + "publication"  # Publication: the newest version it published
K_HEARTBEAT = PREFIX + "heartbeat"  # {"seq"}: grows while it works
K_PID = PREFIX + "pid"  # IndexProcess: where it runs
K_ERROR = PREFIX + "error"  # {"error"}: why it failed
K_BYE = PREFIX + "bye"  # {}: it left its loop (trainer 0 hosts the store: it waits for this)

JOB_FILE = ".distrag_job"
_JOB_HEX = 32
MAX_RECORD_BYTES = 1 << 16
"""A record is a few hundred bytes; a larger value is not parsed."""
MAX_REPORTS_PER_KEY = 20
"""Distinct ignored values reported per key; then silence (an outsider cannot flood the log or the memory)."""


# ----------------------------------------------------------------------------------------------
# the job


def start_job(run_root: str | Path) -> str:
    """Trainer 0, when a job starts: a fresh nonce, written (atomically) to the run folder's job file."""
    job = secrets.token_hex(_JOB_HEX // 2)
    path = Path(run_root) / JOB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, job + "\n")
    return job


def _read_job(path: Path) -> str | None:
    """The nonce in the job file, or None when it is missing, a link, not this user's, or not a nonce (a warning
    says which of the last three)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:  # a symlink (ELOOP), unreadable, ...
        warnings.warn(f"ignoring {path}: {e.strerror}", RuntimeWarning, stacklevel=3)
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            warnings.warn(f"ignoring {path}: not a regular file of this user", RuntimeWarning, stacklevel=3)
            return None
        text = os.read(fd, 256).decode(errors="replace").strip()
    finally:
        os.close(fd)
    if len(text) != _JOB_HEX or any(c not in "0123456789abcdef" for c in text):
        warnings.warn(f"ignoring {path}: not a job nonce", RuntimeWarning, stacklevel=3)
        return None
    return text


def _file_identity(path: Path) -> tuple | None:
    """What changes when the file at ``path`` (not followed) is replaced or rewritten; None when there is none."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode


# ----------------------------------------------------------------------------------------------
# signed records


def signed_record(key: bytes, job: str, store_key: str, record: dict) -> str:
    """The store value of ``record`` for ``store_key`` in ``job``: JSON of the record, the job and their HMAC."""
    body = json.dumps(record, sort_keys=True)
    return json.dumps({"job": job, "record": record, "hmac": run_secret.sign(key, job, store_key, body)})


def read_record(key: bytes, job: str | None, store_key: str, raw: bytes) -> tuple[dict | None, str]:
    """``(record, "")`` when ``raw`` is a :func:`signed_record` for ``store_key`` under ``key`` in ``job``, else
    ``(None, why not)``."""
    if len(raw) > MAX_RECORD_BYTES:
        return None, "not a signed record"
    try:
        value = json.loads(raw)
        record, mac, its_job = value["record"], value["hmac"], value["job"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return None, "not a signed record"
    if not (isinstance(record, dict) and isinstance(its_job, str)) or not run_secret.verify(
            key, mac, its_job, store_key, json.dumps(record, sort_keys=True)):
        return None, "its signature does not verify under the run's secret"
    if its_job != job:
        return None, "it was signed for another job of this run"
    return record, ""


# ----------------------------------------------------------------------------------------------
# records


def _typed(cls, record: dict, types: dict[str, tuple[type, ...]]):
    """An instance of dataclass ``cls`` from ``record`` when every field has one of its ``types``, else None."""
    out = {}
    for f in fields(cls):
        value = record.get(f.name)
        if not isinstance(value, types[f.name]) or isinstance(value, bool):
            return None
        out[f.name] = value
    return cls(**out)


@dataclass(frozen=True)
class Publication:
    """What the index rank records about an index version it published, and what trainers adopt."""
    version: int
    """Index version (the folder ``v<version>`` under the publish root)."""
    path: str
    """The published folder (trainers open it only inside the run folder)."""
    weights_step: int
    """Training step of the embedder weights the version was built from."""
    weights_n: int
    """Number of the weights hand-off (of this job) it was built from."""
    n_vectors: int
    """Passages in the index."""
    build_s: float
    """Seconds from loading the weights to the published version."""
    created: float
    """When it was published (the index rank's clock, seconds since the epoch)."""

    @classmethod
    def from_record(cls, record: dict) -> Publication | None:
        num = (int, float)
        return _typed(cls, record, {"version": (int,), "path": (str,), "weights_step": (int,), "weights_n": (int,),
                                    "n_vectors": (int,), "build_s": num, "created": num})


@dataclass(frozen=True)
class WeightsHandoff:
    """Trainer 0's announcement of embedder weights for the index rank: file ``w_<n>.pt`` of the weights folder."""
    n: int
    """Hand-off number in this job (1, 2, ...; the file's name)."""
    step: int
    """Training step of the weights."""
    sha256: str
    """Of the file's bytes: the index rank reads no other file under that name."""

    @classmethod
    def from_record(cls, record: dict) -> WeightsHandoff | None:
        return _typed(cls, record, {"n": (int,), "step": (int,), "sha256": (str,)})

    @property
    def file_name(self) -> str:
        return f"w_{self.n:06d}.pt"


@dataclass(frozen=True)
class IndexProcess:
    """Where the index rank runs: trainer 0 watches ``pid`` and, after training, ends a lingering ``supervisor``.
    A pid counts only with its start time (clock ticks since boot; None where there is no ``/proc``)."""
    host: str
    pid: int
    """The process doing the work (under a launcher, the index worker)."""
    start: int | None = None
    supervisor: int | None = None
    """The launcher-started process supervising the worker (None: the worker was started by the launcher)."""
    supervisor_start: int | None = None

    @classmethod
    def from_record(cls, record: dict) -> IndexProcess | None:
        opt = (int, type(None))
        return _typed(cls, record, {"host": (str,), "pid": (int,), "start": opt, "supervisor": opt,
                                    "supervisor_start": opt})

    @classmethod
    def of(cls, pid: int, supervisor: int | None = None) -> IndexProcess:
        """This host's process ``pid`` (and ``supervisor``), with their start times."""
        return cls(hostname(), pid, start_time(pid), supervisor,
                   start_time(supervisor) if supervisor is not None else None)


# ----------------------------------------------------------------------------------------------
# the channel


class RefreshChannel:
    """One end of the refresh protocol over the coordination ``store``, for the run in ``run_root``: every record
    set here is signed with the run's secret for the job, every record read is verified and must be of the job.

    Trainer 0 makes the job (:meth:`for_trainer`); without ``job`` (the index rank's processes) the channel
    follows the job file (:meth:`sync_job`). Methods are grouped by the side that calls them."""

    def __init__(self, store: Any, run_root: str | Path, job: str | None = None):
        self.store = store
        self.run_root = Path(run_root)
        self._key = run_secret.run_secret(self.run_root)
        self.job = job
        """The job's nonce (None on the index side before trainer 0 wrote one)."""
        self._follow = job is None
        self._job_ident: tuple | None = ()  # the job file as last read (() : never read)
        self._sentinel = "distrag-absent-" + secrets.token_hex(16)  # never stored: a read that finds no key
        self._cache: dict[str, tuple[bytes, dict | None]] = {}  # the last value read per key, and its verdict
        self._told: dict[str, set[tuple[str, bytes]]] = {}  # per key: (why, digest of the value) reported
        self._standing: dict[str, dict] = {}  # records that stay true when the job changes (pid, error)
        self._hb_seq = 0
        self._max: dict[str, int] = {}  # the largest sequence number read per key (this job)
        self.sync_job()

    @classmethod
    def for_trainer(cls, store: Any, run_root: str | Path) -> RefreshChannel:
        """Trainer 0's end: starts a new job (:func:`start_job`)."""
        return cls(store, run_root, start_job(run_root))

    def sync_job(self) -> bool:
        """Index side: take the job from the run folder's job file if it changed; True when the job changed.
        Then that job's sequence numbers start again and what stays true (pid, error) is signed again for it."""
        if not self._follow:
            return False
        path = self.run_root / JOB_FILE
        ident = _file_identity(path)
        if ident == self._job_ident:  # a stat per call; the file is read again only when it changed
            return False
        self._job_ident = ident
        job = _read_job(path) if ident is not None else None
        if job is None or job == self.job:
            return False
        self.job = job
        self._cache.clear()
        self._max.clear()
        for key, record in self._standing.items():
            self._set(key, record)
        return True

    # -- plumbing ----------------------------------------------------------------------------------
    def _set(self, key: str, record: dict) -> None:
        """Set ``record``, signed for the job (nothing is set before there is a job: no reader would accept it).
        Returns once the store has it: a TCPStore ``set`` is not answered, so a ``check`` on the same connection
        follows it (trainer 0 announces the adopted version before any trainer loads it)."""
        if self.job is not None:
            self.store.set(key, signed_record(self._key, self.job, key, record))
            self.store.check([key])

    def _peek(self, key: str) -> bytes | None:
        """The value under ``key``, or None; never waits (``compare_set`` with a value never stored answers
        the current value, or that value when the key is missing, and changes nothing)."""
        raw = self.store.compare_set(key, self._sentinel, self._sentinel)
        return None if raw == self._sentinel.encode() else raw

    def _read(self, key: str) -> dict | None:
        """The record under ``key`` if it is of this run and job, else None (a foreign value is reported once)."""
        raw = self._peek(key)
        if raw is None:
            return None
        cached = self._cache.get(key)
        if cached is not None and cached[0] == raw:
            return cached[1]
        record, why = read_record(self._key, self.job, key, raw)
        self._cache[key] = (raw, record)
        if record is None:
            self._report(key, why)
        return record

    def _report(self, key: str, why: str) -> None:
        """Say once per key, reason and value (the one last read under ``key``) that it is ignored, up to
        :data:`MAX_REPORTS_PER_KEY` values per key. A record of another job of this run is expected for a moment
        when a job starts (the index rank catches up with the job file), so it is only logged; anything else is
        a warning."""
        told = self._told.setdefault(key, set())
        raw = self._cache[key][0] if key in self._cache else b""
        entry = (why, hashlib.sha256(raw).digest())
        if entry in told or len(told) >= MAX_REPORTS_PER_KEY:
            return
        told.add(entry)
        more = "; further values under this key are ignored silently" if len(told) == MAX_REPORTS_PER_KEY else ""
        if why.startswith("it was signed for another job") and key != K_PUBLICATION:
            log.info("ignoring %r in the coordination store: %s%s", key, why, more)
        else:
            warnings.warn(f"ignoring {key!r} in the coordination store: {why} (not written by this job of this "
                          f"run){more}", RuntimeWarning, stacklevel=4)

    def _typed_read(self, key: str, cls):
        record = self._read(key)
        if record is None:
            return None
        value = cls.from_record(record)
        if value is None:
            self._report(key, "malformed record")
        return value

    def _growing(self, key: str, value: int | None) -> int:
        """The largest of ``value`` and what was read under ``key`` before (a replayed older record changes nothing)."""
        best = max(self._max.get(key, 0), value if value is not None else 0)
        self._max[key] = best
        return best

    def _int_field(self, key: str, name: str) -> int | None:
        record = self._read(key)
        value = record.get(name) if record is not None else None
        if record is not None and (not isinstance(value, int) or isinstance(value, bool)):
            self._report(key, "malformed record")
            return None
        return value

    # -- trainer 0 ---------------------------------------------------------------------------------
    def announce_weights(self, handoff: WeightsHandoff) -> None:
        """Hand ``handoff`` to the index rank (its file is complete)."""
        self._set(K_WEIGHTS, asdict(handoff))

    def consumed(self) -> int:
        """The newest hand-off the index rank has started on (older files can go); 0 before any."""
        return self._growing(K_CONSUMED, self._int_field(K_CONSUMED, "n"))

    def latest_publication(self) -> Publication | None:
        """The newest version the index rank of this job published, if its folder lies inside the run folder."""
        pub = self._typed_read(K_PUBLICATION, Publication)
        if pub is not None and not inside(pub.path, self.run_root):
            self._report(K_PUBLICATION, f"index path {pub.path} is outside the run folder {self.run_root}")
            return None
        return pub

    def mark_adopted(self, version: int) -> None:
        """Tell the index rank which version trainers adopt (before any of them loads it: it is never pruned)."""
        self._set(K_ADOPTED, {"version": int(version)})

    def index_error(self) -> str | None:
        """What the index rank recorded when it failed, or None."""
        record = self._read(K_ERROR)
        return None if record is None else str(record.get("error"))

    def index_process(self) -> IndexProcess | None:
        """Where the index rank runs, as it announced it (None before it did)."""
        return self._typed_read(K_PID, IndexProcess)

    def heartbeat_seq(self) -> int:
        """The index rank's newest heartbeat (0 before any); it grows while the index rank works."""
        return self._growing(K_HEARTBEAT, self._int_field(K_HEARTBEAT, "seq"))

    def send_done(self) -> None:
        """Training has ended: the index rank leaves its loop."""
        self._set(K_DONE, {})

    def bye_received(self) -> bool:
        """The index rank has left its loop."""
        return self._read(K_BYE) is not None

    # -- the index rank ----------------------------------------------------------------------------
    def announce_process(self, pid: int, supervisor: int | None = None) -> None:
        """Record this host, the index rank's pid(s) and their start times (trainer 0 watches them)."""
        self._standing[K_PID] = asdict(IndexProcess.of(pid, supervisor))
        self._set(K_PID, self._standing[K_PID])

    def record_error(self, message: str) -> None:
        """Record why the index rank failed (trainers follow ``on_index_failure``)."""
        self._standing[K_ERROR] = {"error": message}
        self._set(K_ERROR, self._standing[K_ERROR])

    def heartbeat(self) -> None:
        self._hb_seq += 1
        self._set(K_HEARTBEAT, {"seq": self._hb_seq})

    def trainers_done(self) -> bool:
        """Whether trainer 0 said training has ended. Raises when the store is gone."""
        return self._read(K_DONE) is not None

    def newest_weights(self) -> WeightsHandoff | None:
        """Trainer 0's newest hand-off in this job, or None."""
        return self._typed_read(K_WEIGHTS, WeightsHandoff)

    def mark_consumed(self, n: int) -> None:
        """Hand-off ``n`` (and every older one) is taken: trainer 0 may delete their files."""
        self._set(K_CONSUMED, {"n": int(n)})

    def publish(self, pub: Publication) -> None:
        """Announce ``pub`` as the newest version."""
        self._set(K_PUBLICATION, asdict(pub))

    def adopted_version(self) -> int:
        """The newest version trainer 0 adopted in this job (0: none yet)."""
        return self._growing(K_ADOPTED, self._int_field(K_ADOPTED, "version"))

    def say_bye(self) -> None:
        """This index rank has left its loop (trainer 0, the store's host, waits for it)."""
        self._set(K_BYE, {})


def inside(path: str, folder: Path) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside ``folder``."""
    try:
        return Path(path).resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError, ValueError):
        return False
