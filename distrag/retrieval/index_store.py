"""Index persistence: a :class:`ShardedIndex` saved to a directory, read back, and published as versions.

One saved index
---------------
:func:`save` writes a directory through :func:`distrag.atomic_io.atomic_directory` (readers see all of it
or nothing)::

    manifest.json          version, dim, count, metric, kind, n_shards, nlist/nprobe/pq_m/pq_nbits/refine,
                           created, extra,
                           shards: [{file, vectors, start, stop, nlist, pq_nbits, bytes, sha256,
                                     vectors_bytes, vectors_sha256}]
    shard_00000.faiss      faiss.write_index of a CPU copy of shard 0
    vectors_00000.npy      float32 rows [start, stop) of shard 0 (ivf / ivfpq only; flat stores them
                           in the .faiss file)

:func:`load` reads it back (optionally at another shard count, from the stored vectors) and raises
:class:`~distrag.errors.IndexLoadError` naming the file when something is missing or inconsistent;
:func:`read_manifest` checks the manifest alone.

Checksums (format v2): sizes and shapes cannot tell a shard rewritten at the same size (rows reversed: every
search wrong, Recall@3 75 -> 0, issue 19), so the manifest holds the sha256 of every file and :func:`load`
refuses a file that does not match. Hashing is not free: sha256 ran at 0.35-0.7 GB/s on this project's 2
shared CPU cores (44-88 ms for a 20,000 x 384 float32 flat index, 30.7 MB, which faiss reads in 12-14 ms),
i.e. 25-45 s for a 16 GB index, on every trainer, at every index adoption (a step all trainers wait at). So
the hash is computed once, by the writer: :func:`save` hashes each file it wrote (inside the 0700 temporary
folder of :func:`~distrag.atomic_io.atomic_directory`, which nobody else can enter) and records its inode and
ctime (the change time, which every write, rename or chmod moves forward and no user can set back).
:func:`load` re-hashes only a file whose inode or ctime differ from the record, or whose ctime is not older
than the manifest's (written after the record: a file changed since is never trusted on its stat); a file
rewritten in place or replaced is therefore always hashed and refused, while an untouched version costs one
``stat`` per file to verify (3-4 ms more than no check, measured). Re-hashing runs in threads while faiss
parses, and nothing is returned before every hash matched. Format v1 (no checksums) is refused with a message
saying to rebuild: reading it unverified would let whoever rewrites a shard also rewrite the manifest down to
v1. The manifest itself is not signed: checksums catch damage and a rewrite of a data file alone; someone who
can rewrite the manifest too can replace the index (see the README's security section).

Published versions
------------------
:func:`publish` / :func:`latest_version` manage a directory of such versions (``root/v000001``, ...) plus
an atomically replaced ``root/LATEST`` pointer: the index rank publishes, trainers pick the newest, and a
single-process run keeps its frozen index in the same format (``output_dir/index/<signature hash>``).
:func:`prune_versions` deletes old versions (keeping the newest few and any the caller protects).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from distrag.atomic_io import atomic_directory, atomic_write_json, atomic_write_text
from distrag.errors import IndexLoadError
from distrag.retrieval.faiss_backend import resolve_device
from distrag.retrieval.sharded_index import ShardedIndex

__all__ = ["LATEST", "MANIFEST", "latest_version", "load", "manifest", "prune_versions", "publish", "read_manifest",
           "save"]

FORMAT = "distrag.sharded_index"
FORMAT_VERSION = 2
"""2: every file's sha256 in the manifest (1 had sizes only, and is refused)."""
_CHUNK = 1 << 20
MANIFEST = "manifest.json"
LATEST = "LATEST"
_VERSION_DIR = re.compile(r"^v(\d{6,})$")
_SETTINGS = ("dim", "kind", "n_shards", "nlist", "nprobe", "pq_m", "metric")


# ----------------------------------------------------------------------------------------------
# one saved index


def manifest(index: ShardedIndex, *, version: int | None = None, extra: dict | None = None) -> dict[str, Any]:
    """What :func:`save` writes to ``manifest.json`` (default ``version`` / ``extra``: the index's own)."""
    shards = [{"file": f"shard_{i:05d}.faiss", "vectors": None if index.kind == "flat" else f"vectors_{i:05d}.npy",
               **entry} for i, entry in enumerate(index.shard_layout())]
    settings = index.settings()
    created = index.created if index.created is not None else time.time()
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "version": index.version if version is None else int(version),
        "dim": settings["dim"], "count": len(index), "metric": settings["metric"], "kind": settings["kind"],
        "n_shards": settings["n_shards"], "nlist": settings["nlist"], "nprobe": settings["nprobe"],
        "pq_m": settings["pq_m"], "pq_nbits": settings["pq_nbits"], "refine": settings["refine"], "shards": shards,
        "created": datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="seconds"),
        "created_unix": created, "faiss_version": faiss.__version__,
        "extra": dict(index.extra if extra is None else extra),
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)  # hashlib releases the GIL on large updates: threads hash in parallel
    return h.hexdigest()


def _seal(path: Path) -> dict:
    """fsync a file just written into the save's private (0700) temporary folder, then its size, sha256 and the
    stat that proves it unchanged later (inode, ctime). Nobody else can enter that folder, so the bytes hashed
    are the bytes written."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    digest = _sha256(path)
    st = os.stat(path)
    return {"bytes": st.st_size, "sha256": digest, "stat": [st.st_ino, st.st_ctime_ns]}


def save(index: ShardedIndex, path: str | Path, *, version: int = 0, extra: dict | None = None,
         overwrite: bool = False) -> Path:
    """Write ``index`` to directory ``path`` atomically (all of it appears at once, or nothing).

    ``version`` and ``extra`` (JSON-serialisable: corpus fingerprint, embedder id, ...; default: the
    index's own) go into the manifest and, once written, onto the index. An existing ``path`` is an error
    unless ``overwrite``. Returns ``path``.
    """
    if not index.is_built:
        raise RuntimeError("the index is empty: call build() before save()")
    path = Path(path)
    m = manifest(index, version=version, extra=extra)
    json.dumps(m)  # fail before writing anything if extra is not JSON-serialisable
    with atomic_directory(path, overwrite=overwrite) as tmp:
        for s, entry in enumerate(m["shards"]):
            faiss.write_index(index.cpu_shard(s), str(tmp / entry["file"]))
            entry.update(_seal(tmp / entry["file"]))
            if entry["vectors"] is not None:
                with open(tmp / entry["vectors"], "wb") as f:
                    np.save(f, np.ascontiguousarray(index.shard_vectors(s)))
                entry.update({f"vectors_{k}": v for k, v in _seal(tmp / entry["vectors"]).items()})
        atomic_write_json(tmp / MANIFEST, m)
    index.version, index.extra = m["version"], dict(m["extra"])
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Parse and check ``path/manifest.json`` (structure only; files are checked by :func:`load`)."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise IndexLoadError(f"{path}: no such index directory")
    if not mpath.is_file():
        raise IndexLoadError(f"{mpath}: missing (not a saved ShardedIndex, or an incomplete copy)")
    try:
        m = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise IndexLoadError(f"{mpath}: unreadable manifest ({e})") from None
    required = ("format", "format_version", "dim", "count", "metric", "kind", "n_shards", "nlist",
                "nprobe", "pq_m", "shards")
    missing = [key for key in required if key not in m] if isinstance(m, dict) else list(required)
    if missing:
        raise IndexLoadError(f"{mpath}: missing keys {missing}")
    if m["format"] != FORMAT or not isinstance(m["format_version"], int) or m["format_version"] > FORMAT_VERSION:
        raise IndexLoadError(f"{mpath}: format {m['format']!r} v{m['format_version']} is not readable by "
                             f"this version (expects {FORMAT!r} v{FORMAT_VERSION})")
    if m["format_version"] < FORMAT_VERSION:
        raise IndexLoadError(f"{mpath}: format v{m['format_version']} has no checksums (written by an older "
                             "distrag), so its files cannot be verified: rebuild it (a cached frozen index under "
                             "output_dir/index is rebuilt by itself; a run's published version: start the run "
                             "again, or resume from a checkpoint taken after this upgrade)")
    shards = m["shards"]
    if len(shards) != m["n_shards"]:
        raise IndexLoadError(f"{mpath}: n_shards={m['n_shards']} but {len(shards)} shard entries")
    expect = 0
    for entry in shards:
        if entry["start"] != expect or entry["stop"] < entry["start"]:
            raise IndexLoadError(f"{mpath}: shard {entry['file']} covers rows [{entry['start']}, "
                                 f"{entry['stop']}), expected to start at {expect}")
        expect = entry["stop"]
    if expect != m["count"]:
        raise IndexLoadError(f"{mpath}: shards cover {expect} rows but count={m['count']}")
    return m


class _Checks:
    """The files of one :func:`load` and their verification: trusted on an unchanged stat, else hashed in a
    thread while they are parsed (see the module's docstring)."""

    def __init__(self, path: Path, pool: ThreadPoolExecutor):
        self.pool = pool
        self.manifest_ctime = os.stat(path / MANIFEST).st_ctime_ns
        self.pending: list[tuple[Path, str, Future]] = []
        self.hashed = 0

    def start(self, fpath: Path, want: object, recorded: object) -> None:
        """Verify ``fpath`` against the manifest's sha256 ``want`` and stat record ``recorded``."""
        if not isinstance(want, str):
            raise IndexLoadError(f"{fpath}: no sha256 in the manifest ({MANIFEST} edited?): the file cannot be "
                                 "verified")
        st = os.stat(fpath)
        if recorded == [st.st_ino, st.st_ctime_ns] and st.st_ctime_ns < self.manifest_ctime:
            return  # not changed since its writer hashed it
        self.hashed += 1
        self.pending.append((fpath, want, self.pool.submit(_sha256, fpath)))

    def finish(self) -> None:
        """Raise :class:`IndexLoadError` naming the first file whose sha256 differs from the manifest's."""
        for fpath, want, digest in self.pending:
            if digest.result() != want:
                raise IndexLoadError(f"{fpath}: does not match its sha256 in the manifest (rewritten or damaged "
                                     "after it was saved); rebuild the index")

    def cancel(self) -> None:
        for *_, digest in self.pending:
            digest.cancel()


def _read_shard(path: Path, entry: dict, dim: int, kind: str, checks: _Checks) -> tuple[faiss.Index, np.ndarray | None]:
    """One shard's faiss index and stored vectors (None for ``flat``: the index holds them), checked
    against its manifest ``entry``; each file's verification starts before it is parsed."""
    fpath = path / entry["file"]
    rows = entry["stop"] - entry["start"]
    if not fpath.is_file():
        raise IndexLoadError(f"{fpath}: shard file missing")
    if "bytes" in entry and fpath.stat().st_size != entry["bytes"]:
        raise IndexLoadError(f"{fpath}: {fpath.stat().st_size} bytes, manifest says {entry['bytes']} "
                             "(truncated or replaced)")
    checks.start(fpath, entry.get("sha256"), entry.get("stat"))
    try:
        index = faiss.read_index(str(fpath))
    except (RuntimeError, MemoryError) as e:  # faiss raises RuntimeError on bad files
        raise IndexLoadError(f"{fpath}: not a readable faiss index ({str(e).strip()[:200]})") from None
    if index.d != dim or index.ntotal != rows:
        raise IndexLoadError(f"{fpath}: holds {index.ntotal} vectors of dim {index.d}, manifest expects "
                             f"{rows} of dim {dim}")
    if kind == "flat":
        if not isinstance(index, faiss.IndexFlat):
            raise IndexLoadError(f"{fpath}: {type(index).__name__}, manifest says kind='flat'")
        return index, None
    if entry.get("vectors") is None:
        raise IndexLoadError(f"{path / MANIFEST}: shard {entry['file']} has no vectors file")
    vpath = path / entry["vectors"]
    if not vpath.is_file():
        raise IndexLoadError(f"{vpath}: vectors file missing")
    if "vectors_bytes" in entry and vpath.stat().st_size != entry["vectors_bytes"]:
        raise IndexLoadError(f"{vpath}: {vpath.stat().st_size} bytes, manifest says "
                             f"{entry['vectors_bytes']} (truncated or replaced)")
    checks.start(vpath, entry.get("vectors_sha256"), entry.get("vectors_stat"))
    try:
        v = np.load(vpath, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise IndexLoadError(f"{vpath}: unreadable ({e})") from None
    if v.shape != (rows, dim) or v.dtype != np.float32:
        raise IndexLoadError(f"{vpath}: shape {list(v.shape)} {v.dtype}, manifest expects "
                             f"[{rows}, {dim}] float32")
    return index, v


def load(path: str | Path, *, n_shards: int | None = None, device: str | None = None) -> ShardedIndex:
    """Load a saved index, optionally at another shard count (rebuilt from the stored vectors).

    Raises :class:`IndexLoadError` naming the file when the manifest or a shard / vectors file is
    missing, unreadable, or disagrees with the manifest (row count, dimension, kind, sha256). Every file is
    hashed while it is parsed (threads), and nothing is returned before every hash matched.
    """
    path = Path(path)
    target_device = device or "auto"
    resolve_device(target_device)  # fail before reading gigabytes
    m = read_manifest(path)
    dim, kind = int(m["dim"]), m["kind"]
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="distrag-index-sha256") as pool:
        checks = _Checks(path, pool)
        try:
            shards, vectors = zip(*(_read_shard(path, entry, dim, kind, checks) for entry in m["shards"]))
        except IndexLoadError:
            checks.cancel()
            raise
        checks.finish()
    settings = {**{key: m[key] for key in _SETTINGS}, "refine": m.get("refine", 1), "pq_nbits": m.get("pq_nbits", 8)}
    facts = {"version": int(m.get("version", 0)), "extra": dict(m.get("extra") or {}),
             "created": m.get("created_unix")}
    if n_shards is not None and n_shards != m["n_shards"]:
        saved = ShardedIndex.from_parts(settings, list(shards), list(vectors), m["shards"], device="cpu", **facts)
        return saved.reshard(n_shards, device=target_device)
    return ShardedIndex.from_parts(settings, list(shards), list(vectors), m["shards"], device=target_device,
                                   **facts)


# ----------------------------------------------------------------------------------------------
# a directory of published versions


def _version_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _VERSION_DIR.match(child.name)
        if match and child.is_dir() and (child / MANIFEST).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_version(root: str | Path) -> tuple[int, Path] | None:
    """``(version, directory)`` of the newest complete version under ``root`` (``root/v000007``), or None.

    Complete = named ``v`` + six or more digits and holding ``manifest.json``; temporary directories of
    saves in progress (``.v000008.*.tmp``) never match. The directory scan is authoritative and ``LATEST``
    is a convenience pointer for shell tools, so a crash between publishing a version directory and
    updating ``LATEST`` loses nothing.
    """
    found = _version_dirs(Path(root))
    return found[-1] if found else None


def publish(index: ShardedIndex, root: str | Path, version: int, *, extra: dict | None = None) -> Path:
    """Save ``index`` as ``root/v{version:06d}`` atomically, then atomically point ``root/LATEST`` at it.

    Versions must increase: publishing a version not newer than the latest published one is an error.
    Returns the version directory.
    """
    root = Path(root)
    if not isinstance(version, (int, np.integer)) or version < 0:
        raise ValueError(f"version must be a non-negative integer, got {version!r}")
    found = _version_dirs(root)
    if found and found[-1][0] >= version:
        raise ValueError(f"cannot publish version {version} under {root}: version {found[-1][0]} "
                         "already exists (versions must increase)")
    name = f"v{int(version):06d}"
    out = save(index, root / name, version=int(version), extra=extra)
    atomic_write_text(root / LATEST, name + "\n")
    return out


def prune_versions(root: str | Path, keep: int, protect: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """Delete the versions under ``root`` older than the newest ``keep``, except those in ``protect``
    (the version the trainers use, versions a checkpoint names). Each goes out of sight at once (renamed
    to a hidden ``.v000003.pruned`` folder, which no reader matches) and is then removed. Returns the
    versions deleted."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    for leftover in root.glob(".v*.pruned"):  # left by a pruner that crashed half-way
        shutil.rmtree(leftover, ignore_errors=True)
    found = _version_dirs(root)
    deleted = []
    for version, path in found[:-keep]:
        if version in protect:
            continue
        hidden = root / f".{path.name}.pruned"
        try:
            os.replace(path, hidden)
        except OSError:  # already gone (another pruner): nothing to do
            continue
        shutil.rmtree(hidden, ignore_errors=True)
        deleted.append(version)
    return deleted
