"""Index persistence: a :class:`ShardedIndex` saved to a directory, read back, and published as versions.

One saved index
---------------
:func:`save` writes a directory through :func:`distrag.atomic_io.atomic_directory` (readers see all of it
or nothing)::

    manifest.json          version, dim, count, metric, kind, n_shards, nlist/nprobe/pq_m/pq_nbits/refine,
                           created, extra,
                           shards: [{file, vectors, start, stop, nlist, pq_nbits, bytes}]
    shard_00000.faiss      faiss.write_index of a CPU copy of shard 0
    vectors_00000.npy      float32 rows [start, stop) of shard 0 (ivf / ivfpq only; flat stores them
                           in the .faiss file)

:func:`load` reads it back (optionally at another shard count, from the stored vectors) and raises
:class:`~distrag.errors.IndexLoadError` naming the file when something is missing or inconsistent;
:func:`read_manifest` checks the manifest alone.

Published versions
------------------
:func:`publish` / :func:`latest_version` manage a directory of such versions (``root/v000001``, ...) plus
an atomically replaced ``root/LATEST`` pointer: the index rank publishes, trainers pick the newest, and a
single-process run keeps its frozen index in the same format (``output_dir/index/<signature hash>``).
:func:`prune_versions` deletes old versions (keeping the newest few and any the caller protects).

Versions built in parts
-----------------------
A pool of index ranks builds one version in parts: each part is a saved index over a contiguous row range of the
corpus (:func:`~distrag.retrieval.sharded_index.pool_parts`), with its own shard files and manifest.
:func:`publish_parts` makes them one version: it checks that the parts agree on their settings, moves every part's
files into the version's temporary folder (a rename: no bytes are copied on one filesystem) under the version's
shard numbering, writes one manifest whose shard entries are the parts' entries with their rows offset by the
part's first row (sizes and checksums carried over), and publishes the folder atomically as :func:`publish`
does. :func:`load` reads it like any other version: a manifest's shards are row ranges with their own files, so
parts built apart describe one index.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from distrag.atomic_io import atomic_directory, atomic_write_json, atomic_write_text
from distrag.errors import IndexLoadError
from distrag.retrieval.faiss_backend import resolve_device
from distrag.retrieval.sharded_index import ShardedIndex

__all__ = ["LATEST", "MANIFEST", "latest_version", "load", "manifest", "prune_versions", "publish", "publish_parts",
           "read_manifest", "save"]

FORMAT = "distrag.sharded_index"
FORMAT_VERSION = 1
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


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
            target = tmp / entry["file"]
            faiss.write_index(index.cpu_shard(s), str(target))
            _fsync_file(target)
            entry["bytes"] = target.stat().st_size
            if entry["vectors"] is not None:
                vec_path = tmp / entry["vectors"]
                with open(vec_path, "wb") as f:
                    np.save(f, np.ascontiguousarray(index.shard_vectors(s)))
                    f.flush()
                    os.fsync(f.fileno())
                entry["vectors_bytes"] = vec_path.stat().st_size
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
    if m["format"] != FORMAT or m["format_version"] > FORMAT_VERSION:
        raise IndexLoadError(f"{mpath}: format {m['format']!r} v{m['format_version']} is not readable by "
                             f"this version (expects {FORMAT!r} v{FORMAT_VERSION})")
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


def _read_shard(path: Path, entry: dict, dim: int, kind: str) -> tuple[faiss.Index, np.ndarray | None]:
    """One shard's faiss index and stored vectors (None for ``flat``: the index holds them), checked
    against its manifest ``entry``."""
    fpath = path / entry["file"]
    rows = entry["stop"] - entry["start"]
    if not fpath.is_file():
        raise IndexLoadError(f"{fpath}: shard file missing")
    if "bytes" in entry and fpath.stat().st_size != entry["bytes"]:
        raise IndexLoadError(f"{fpath}: {fpath.stat().st_size} bytes, manifest says {entry['bytes']} "
                             "(truncated or replaced)")
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
    missing, unreadable, or disagrees with the manifest (row count, dimension, kind).
    """
    path = Path(path)
    target_device = device or "auto"
    resolve_device(target_device)  # fail before reading gigabytes
    m = read_manifest(path)
    dim, kind = int(m["dim"]), m["kind"]
    shards, vectors = zip(*(_read_shard(path, entry, dim, kind) for entry in m["shards"]))
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
    target = _next_version_dir(root, version)
    out = save(index, target, version=int(version), extra=extra)
    atomic_write_text(root / LATEST, target.name + "\n")
    return out


_PART_SETTINGS = ("dim", "metric", "kind", "nlist", "nprobe", "pq_m", "pq_nbits", "refine")
"""What the parts of one version must agree on (each shard keeps its own capped ``nlist`` / ``pq_nbits``)."""


def _next_version_dir(root: Path, version: int) -> Path:
    """``root/v{version:06d}``, refused unless ``version`` is newer than every version published under ``root``."""
    if not isinstance(version, (int, np.integer)) or version < 0:
        raise ValueError(f"version must be a non-negative integer, got {version!r}")
    found = _version_dirs(root)
    if found and found[-1][0] >= version:
        raise ValueError(f"cannot publish version {version} under {root}: version {found[-1][0]} "
                         "already exists (versions must increase)")
    return root / f"v{int(version):06d}"


def publish_parts(parts: list[str | Path], root: str | Path, version: int, *, extra: dict | None = None) -> Path:
    """Publish the saved indices ``parts`` (contiguous row ranges of one corpus, in row order) as the one version
    ``root/v{version:06d}`` (module docstring: *Versions built in parts*): their files are moved into it, so the
    part folders are left without them. Raises :class:`IndexLoadError` naming the part whose manifest is bad or
    disagrees with the first part's settings; versions must increase as for :func:`publish`."""
    root = Path(root)
    if not parts:
        raise ValueError("publish_parts needs at least one part")
    target = _next_version_dir(root, version)
    manifests = [read_manifest(p) for p in parts]
    first = manifests[0]
    for part, m in zip(parts[1:], manifests[1:]):
        differ = [k for k in _PART_SETTINGS if m.get(k) != first.get(k)]
        if differ:
            raise IndexLoadError(f"{Path(part) / MANIFEST}: {differ} differ from the first part's "
                                 f"({[first.get(k) for k in differ]} vs {[m.get(k) for k in differ]})")
    combined = {**first, "version": int(version), "extra": dict(extra or {}), "shards": []}
    created = time.time()
    combined["created"] = datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="seconds")
    combined["created_unix"] = created
    moves: list[tuple[Path, str]] = []  # (a part's file, its name in the version)
    offset = 0
    for part, m in zip(parts, manifests):
        for entry in m["shards"]:
            i = len(combined["shards"])
            moved = {**entry, "start": entry["start"] + offset, "stop": entry["stop"] + offset,
                     "file": f"shard_{i:05d}.faiss"}
            moves.append((Path(part) / entry["file"], moved["file"]))
            if entry.get("vectors") is not None:
                moved["vectors"] = f"vectors_{i:05d}.npy"
                moves.append((Path(part) / entry["vectors"], moved["vectors"]))
            combined["shards"].append(moved)
        offset += int(m["count"])
    combined["count"], combined["n_shards"] = offset, len(combined["shards"])
    missing = [str(src) for src, _ in moves if not src.is_file()]
    if missing:  # checked before anything moves: the parts stay whole
        raise IndexLoadError(f"{missing[0]}: shard file missing" + (f" (and {len(missing) - 1} more)"
                                                                      if len(missing) > 1 else ""))
    with atomic_directory(target) as tmp:
        for src, name in moves:
            _move(src, tmp / name)
        atomic_write_json(tmp / MANIFEST, combined)
    atomic_write_text(root / LATEST, target.name + "\n")
    return target


def _move(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` (a copy, then the source removed, across filesystems)."""
    try:
        os.replace(src, dst)
    except OSError:
        shutil.copy2(src, dst)
        src.unlink()


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
