"""The run's secret: a random key that signs what the processes of a run tell each other.

Two things cross a boundary an attacker can reach and are then trusted: the records the index rank
publishes through the coordination TCPStore (a TCP port anyone on the network can connect to; trainers
open the index folder a record names: :mod:`distrag.distributed.refresh_protocol` signs and checks them),
and checkpoint manifests (a checkpoint with a DeepSpeed engine is read by DeepSpeed's loader, which
unpickles). Both are signed with HMAC-SHA256 under this key (:func:`sign`), and a reader accepts only
what verifies (:func:`verify`).

Design: the key is 32 random bytes kept in ``<run folder>/.distrag_secret`` (hex, mode 0600, owned by the
user running the job). The run folder (``output_dir/distributed/<strategy>-<hash>``) is already the one
place every process of a run shares (weights hand-offs, index versions and checkpoints live there, on
the cluster's shared storage), so the key reaches every node without passing through the network or the
environment, and it survives a requeue: checkpoints written by an earlier job of the same run still
verify. Whoever needs the key first creates it atomically (a complete file is hard-linked into place,
so concurrent creators agree on one key); a key file that other users can read or that another user
owns is refused, as ssh refuses a private key with open permissions. Anyone who can read the run folder
as this user can sign; such a user could rewrite the checkpoints and index versions directly anyway.

A missing key is created only while nothing in the run folder was signed with the old one: once complete
checkpoints exist (``checkpoints/step_*/COMPLETE``), a new key would silently make every one of them
unverifiable (each then refused as "not written by this run"), so :func:`run_secret` stops instead and
says how to get the run's progress back (restore the file) or how to start over (move the checkpoints away).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from distrag.errors import DistError

SECRET_FILE = ".distrag_secret"
_KEY_BYTES = 32
SIGNED_MANIFESTS = "checkpoints/step_*/COMPLETE"
"""Files under a run folder signed with its key (:mod:`distrag.distributed.checkpoint`'s manifests): while any
exists, a missing key is an error, never replaced."""


def secret_path(run_folder: str | Path) -> Path:
    """Where the key of the run in ``run_folder`` lives."""
    return Path(run_folder) / SECRET_FILE


def _create(path: Path) -> None:
    """Create ``path`` holding a fresh key, unless it exists (atomic: never a half-written key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(_KEY_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process created it first: theirs is the key
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def _refuse_to_replace(path: Path) -> None:
    """Raise :class:`DistError` when the run folder of the missing key ``path`` holds checkpoints signed with
    it (see the module's docstring): the message says what happened and both ways on."""
    signed = sorted(path.parent.glob(SIGNED_MANIFESTS))
    if not signed:
        return
    folder = signed[0].parent.parent
    raise DistError(
        f"{path}: the run's secret is missing, but {len(signed)} checkpoint(s) in {folder} were signed with it "
        "(it was deleted, or the run folder was copied without it). A new secret would make them unverifiable, "
        f"so none is created. To resume them, put the original file back (mode 0600: chmod 600 {path}); to "
        f"start this run over instead, move {folder} away (or use another output_dir)")


def run_secret(run_folder: str | Path, *, create: bool = True) -> bytes:
    """The key of the run in ``run_folder``, created (mode 0600) when missing and ``create``.

    Raises :class:`DistError` when the key file is readable by others, owned by another user, or not a
    key; when it is missing and either ``create=False`` or checkpoints signed with the lost key remain.
    """
    path = secret_path(run_folder)
    if create and not path.exists():
        _refuse_to_replace(path)
        _create(path)
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise DistError(f"{path}: the run's secret is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise DistError(f"{path}: the run's secret must be a regular file")
    if st.st_uid != os.getuid():
        raise DistError(f"{path}: the run's secret belongs to another user (uid {st.st_uid}); remove it")
    if st.st_mode & 0o077:
        raise DistError(f"{path}: the run's secret is readable by others (mode {stat.S_IMODE(st.st_mode):o}); "
                        f"run: chmod 600 {path}")
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != _KEY_BYTES:
        raise DistError(f"{path}: not a distrag run secret (expected {2 * _KEY_BYTES} hex digits); remove it")
    return key


def sign(key: bytes, *parts: str) -> str:
    """HMAC-SHA256 (hex) of ``parts`` under ``key``; each part is length-prefixed, so the split between
    parts is signed too."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        data = part.encode()
        mac.update(len(data).to_bytes(8, "big"))
        mac.update(data)
    return mac.hexdigest()


def verify(key: bytes, signature: object, *parts: str) -> bool:
    """Whether ``signature`` is :func:`sign` of ``parts`` under ``key`` (constant-time comparison)."""
    return isinstance(signature, str) and hmac.compare_digest(signature, sign(key, *parts))
