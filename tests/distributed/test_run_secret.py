"""The run's secret: created once (0600, atomically, one key for concurrent creators), refused when others
can read it or it is not a key; HMAC signatures and signed store records."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from distrag.distributed import run_secret
from distrag.errors import DistError


def _read_key(folder: str, q) -> None:
    q.put(run_secret.run_secret(folder).hex())


def test_created_private_once_and_shared_by_concurrent_creators(tmp_path):
    folder = tmp_path / "run"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_read_key, args=(str(folder), q)) for _ in range(4)]
    for p in procs:
        p.start()
    keys = {q.get(timeout=60) for _ in procs}
    for p in procs:
        p.join(60)
    assert len(keys) == 1 and run_secret.run_secret(folder).hex() in keys  # one key for every process
    path = run_secret.secret_path(folder)
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in folder.iterdir()] == [run_secret.SECRET_FILE]  # no temporary file left
    assert len(run_secret.run_secret(folder)) == 32


def test_missing_open_foreign_or_malformed_secrets_are_refused(tmp_path):
    with pytest.raises(DistError, match="missing"):
        run_secret.run_secret(tmp_path, create=False)
    run_secret.run_secret(tmp_path)
    path = run_secret.secret_path(tmp_path)
    path.chmod(0o640)
    with pytest.raises(DistError, match="readable by others.*chmod 600"):
        run_secret.run_secret(tmp_path)
    path.chmod(0o600)
    path.write_text("not hex\n")
    with pytest.raises(DistError, match="not a distrag run secret"):
        run_secret.run_secret(tmp_path)
    if os.getuid() == 0:  # only root can give a file away
        path.write_text("ab" * 32)
        os.chown(path, 12345, -1)
        with pytest.raises(DistError, match="belongs to another user"):
            run_secret.run_secret(tmp_path)


def test_signatures_bind_the_key_and_every_part():
    k1, k2 = b"1" * 32, b"2" * 32
    sig = run_secret.sign(k1, "meta/1", '{"a": 1}')
    assert run_secret.verify(k1, sig, "meta/1", '{"a": 1}')
    assert not run_secret.verify(k2, sig, "meta/1", '{"a": 1}')
    assert not run_secret.verify(k1, sig, "meta/2", '{"a": 1}')
    assert not run_secret.verify(k1, sig, "meta/1{", '"a": 1}')  # the split between parts is signed too
    assert not run_secret.verify(k1, None, "meta/1", '{"a": 1}')
