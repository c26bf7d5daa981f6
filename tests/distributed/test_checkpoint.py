"""CheckpointManager: atomic saves, resume rules, RNG round trip, DeepSpeed engine errors; every save
verifiable (manifest of sizes and checksums, signed), resume validates first and falls back past corrupt
checkpoints, and reading a checkpoint never runs code from it."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from distrag.distributed import roles, run_secret
from distrag.distributed.checkpoint import (
    MANIFEST,
    CheckpointManager,
    check_plain,
    list_complete,
    read_state,
    referenced_index_versions,
    rng_state,
    set_rng_state,
    torch_bytes,
)
from distrag.errors import CheckpointError


@pytest.fixture
def mgr(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "DISTRAG_GLOBAL_RANK",
              "DISTRAG_GLOBAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    roles.reset_context()
    yield CheckpointManager(tmp_path / "ckpt", keep=2)
    roles.reset_context()


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_save_load_round_trip_with_rng(mgr):
    torch.manual_seed(3)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    payload = {"model": model.state_dict(), "optim": opt.state_dict(), "data_pos": 17,
               "index": {"version": 3, "path": str(mgr.root.parent / "index" / "v000003")}, "mlflow_run_id": "abc"}
    path = mgr.save(5, payload, rank_payload={"sampler": [1, 2, 3]})
    expected = _draws()
    _draws()  # move the generators on
    st = mgr.load(path)
    assert _draws() == expected  # this rank's RNG restored
    assert st.step == 5 and st.rank_payload == {"sampler": [1, 2, 3]}
    assert st.payload["data_pos"] == 17 and st.payload["mlflow_run_id"] == "abc"
    torch.testing.assert_close(st.payload["model"]["weight"], model.weight.detach())
    assert st.payload["optim"]["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert (mgr.root / "latest").read_text().strip() == "step_00000005"


def test_the_manifest_lists_every_file_with_size_and_checksum_and_is_signed(mgr):
    path = mgr.save(1, {"w": torch.ones(3)}, engine=_PickleLoadingEngine())
    m = json.loads((path / MANIFEST).read_text())
    assert sorted(m["files"]) == ["ds/ds/model_states.pt", "rank_00000.pt", "trainer_state.pt"]
    for rel, entry in m["files"].items():
        assert entry["size"] == (path / rel).stat().st_size and len(entry["sha256"]) == 64
    assert m["step"] == 1 and m["engine"] is True
    assert mgr.validate(path)["signature"] == m["signature"]
    secret = mgr.root.parent / run_secret.SECRET_FILE
    assert secret.stat().st_mode & 0o777 == 0o600  # the run's secret, private to the user


def test_a_payload_that_would_need_pickle_is_refused_before_anything_is_written(mgr):
    with pytest.raises(TypeError, match=r"payload\['lr'\].*numpy"):
        mgr.save(1, {"lr": np.float64(0.1)})
    with pytest.raises(TypeError, match=r"rank_payload\['p'\].*Path"):
        mgr.save(1, {}, rank_payload={"p": Path("x")})
    assert not list_complete(mgr.root) and not list(mgr.root.glob(".step_*"))
    check_plain({"t": torch.zeros(1), 3: [1.0, "a", None, True, (torch.float32, torch.Size([2]))]})


class _CrashingEngine:
    def save_checkpoint(self, save_dir, tag=None, **kw):
        (Path(save_dir) / "partial").mkdir(parents=True)
        raise KeyboardInterrupt("killed mid-save")


def test_crash_mid_save_keeps_previous_latest(mgr):
    good = mgr.save(10, {"v": 1})
    with pytest.raises(KeyboardInterrupt):
        mgr.save(20, {"v": 2}, engine=_CrashingEngine())
    assert (mgr.root / ".step_00000020.tmp").is_dir()  # the half-written one
    assert not (mgr.root / "step_00000020").exists()
    assert mgr.resolve("auto") == good
    with pytest.raises(CheckpointError, match="incomplete"):
        mgr.resolve(str(mgr.root / ".step_00000020.tmp"))
    assert mgr.load(mgr.resolve("auto")).payload == {"v": 1}
    mgr.save(30, {"v": 3})  # the next save clears the leftover
    assert not (mgr.root / ".step_00000020.tmp").exists()


def test_resolve_rules(mgr, tmp_path):
    assert mgr.resolve(None) is None and mgr.resolve("none") is None
    assert mgr.resolve("auto") is None  # first run: fresh start
    with pytest.raises(CheckpointError, match="does not exist"):
        mgr.resolve(str(tmp_path / "nope"))
    a = mgr.save(1, {})
    b = mgr.save(2, {})
    assert mgr.resolve("auto") == b
    assert mgr.resolve(str(a)) == a
    assert mgr.resolve(str(mgr.root)) == b  # a checkpoint root: its newest
    (mgr.root / "latest").write_text("step_99999999\n")  # stale pointer: newest complete one instead
    assert mgr.resolve("auto") == b
    incomplete = tmp_path / "half"
    incomplete.mkdir()
    with pytest.raises(CheckpointError, match="incomplete"):
        mgr.resolve(str(incomplete))
    with pytest.raises(CheckpointError):
        mgr.load(incomplete)


def test_prune_keeps_newest(mgr):
    for s in (1, 2, 3, 4):
        mgr.save(s, {"s": s})
    assert [p.name for p in list_complete(mgr.root)] == ["step_00000003", "step_00000004"]


def test_manifests_name_the_index_version_the_index_rank_must_keep(mgr):
    mgr.save(1, {"s": 1}, index_version=4)
    mgr.save(2, {"s": 2})  # no index rank: nothing to keep
    mgr.save(3, {"s": 3}, index_version=6)
    assert referenced_index_versions(mgr.root) == {6}  # step 1 was pruned (keep=2), step 2 names none
    assert mgr.validate(mgr.root / "step_00000003")["index_version"] == 6


class _EngineNotFound:
    def save_checkpoint(self, save_dir, tag=None, **kw):
        (Path(save_dir) / tag).mkdir(parents=True)

    def load_checkpoint(self, load_dir, tag=None, **kw):
        return None, None


def test_engine_load_returning_none_is_an_error(mgr):
    p = mgr.save(1, {}, engine=_EngineNotFound())
    with pytest.raises(CheckpointError, match="returned None"):
        mgr.load(p, engine=_EngineNotFound())
    q = mgr.save(2, {})
    with pytest.raises(CheckpointError, match="no DeepSpeed engine state"):
        mgr.load(q, engine=_EngineNotFound())


# ----------------------------------------------------------------------------------------------
# corrupt checkpoints: named on an explicit resume, skipped (with the reason) by resume=auto


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _random_bytes(f: Path) -> None:  # same size: only the checksum can tell
    f.write_bytes(np.random.default_rng(0).integers(0, 256, f.stat().st_size, dtype=np.uint8).tobytes())


def _empty(f: Path) -> None:
    f.write_bytes(b"")


@pytest.mark.parametrize("damage,reason", [(_truncate, "truncated"), (_random_bytes, "checksum"),
                                           (_empty, "empty")])
@pytest.mark.parametrize("name", ["trainer_state.pt", "rank_00000.pt", "ds/ds/model_states.pt"])
def test_a_damaged_state_file_is_named_and_auto_falls_back(mgr, caplog, damage, reason, name):
    good = mgr.save(1, {"v": 1}, engine=_PickleLoadingEngine())
    bad = mgr.save(2, {"v": 2}, engine=_PickleLoadingEngine())
    damage(bad / name)
    with pytest.raises(CheckpointError, match=rf"{bad / name}.*{reason}|{reason}.*{bad / name}") as err:
        mgr.resolve(str(bad))
    assert str(bad / name) in str(err.value)
    with pytest.raises(CheckpointError, match=reason):
        mgr.load(bad)
    with caplog.at_level(logging.WARNING, logger="distrag.distributed.checkpoint"):
        assert mgr.resolve("auto") == good
    assert f"skipping checkpoint {bad}" in caplog.text and name in caplog.text and reason in caplog.text
    assert mgr.load(good, engine=_PickleLoadingEngine()).payload == {"v": 1}
    damage(good / name)
    with pytest.raises(CheckpointError, match="no valid checkpoint"):  # an explicit root with nothing valid
        CheckpointManager(mgr.root).resolve(str(mgr.root))


def test_missing_unexpected_and_unreadable_manifest(mgr):
    a = mgr.save(1, {})
    (a / "rank_00000.pt").unlink()
    with pytest.raises(CheckpointError, match="rank_00000.pt is missing"):
        mgr.resolve(str(a))
    b = mgr.save(2, {})
    (b / "extra.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="extra.pt is not in the checkpoint's manifest"):
        mgr.resolve(str(b))
    c = mgr.save(3, {})
    (c / MANIFEST).write_text('{"step": 3')  # a torn manifest
    with pytest.raises(CheckpointError, match="no readable COMPLETE"):
        mgr.resolve(str(c))
    (c / MANIFEST).write_text('{"step": 3, "n_trainers": 1}')  # no checksums: cannot be verified
    with pytest.raises(CheckpointError, match="no file checksums"):
        mgr.load(c)
    assert mgr.resolve("auto") is None  # nothing valid left: a fresh start (each skip logged)


# ----------------------------------------------------------------------------------------------
# a pickle payload never runs


class _Payload:
    """Unpickling this object calls ``open(marker, "w")``: the file appears if the code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


class _PickleLoadingEngine:
    """DeepSpeed's loader in miniature: it unpickles what it finds (``weights_only=False``)."""

    def save_checkpoint(self, save_dir, tag=None, **kw):
        (Path(save_dir) / tag).mkdir(parents=True)
        torch.save({"module": {"w": torch.zeros(2)}}, Path(save_dir) / tag / "model_states.pt")

    def load_checkpoint(self, load_dir, tag=None, **kw):
        torch.load(Path(load_dir) / tag / "model_states.pt", weights_only=False)
        return load_dir, {}


def _resign(mgr: CheckpointManager, path: Path, key: bytes) -> None:
    """An attacker who rewrites the manifest to match the files, signing with ``key``."""
    from distrag.distributed import checkpoint as ck

    m = json.loads((path / MANIFEST).read_text())
    m["files"] = {rel: {"size": (path / rel).stat().st_size, "sha256": ck._sha256(path / rel)}
                  for rel in ck._files(path)}
    m["signature"] = run_secret.sign(key, ck._signed_text(m))
    (path / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("name", ["trainer_state.pt", "rank_00000.pt"])
def test_a_pickle_payload_in_our_state_files_is_refused_even_with_a_matching_manifest(mgr, tmp_path, name):
    marker = tmp_path / "pwned"
    path = mgr.save(1, {"v": 1})
    torch.save({"step": 1, "payload": _Payload(marker), "rng": _Payload(marker), "rank_payload": None},
               path / name)
    with pytest.raises(CheckpointError, match=rf"{path / name} is (longer than saved|truncated)"):
        mgr.load(path)  # first line of defence: the manifest's sizes and checksums
    _resign(mgr, path, mgr._secret())  # even a manifest that matches: weights_only refuses the object
    with pytest.raises(CheckpointError, match=rf"cannot read {path / name}: .*could run code"):
        mgr.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("damage", [_truncate, _random_bytes, _empty])
def test_a_state_file_damaged_before_its_manifest_was_written_is_named_not_a_traceback(mgr, damage):
    path = mgr.save(1, {"v": 1})
    damage(path / "trainer_state.pt")
    _resign(mgr, path, mgr._secret())
    with pytest.raises(CheckpointError, match=rf"cannot read {path / 'trainer_state.pt'}"):
        mgr.load(path)


def test_deepspeeds_unpickling_loader_runs_only_on_a_checkpoint_this_run_signed(mgr, tmp_path):
    marker = tmp_path / "pwned"
    engine = _PickleLoadingEngine()
    path = mgr.save(1, {"v": 1}, engine=engine)
    torch.save(_Payload(marker), path / "ds" / "ds" / "model_states.pt")
    with pytest.raises(CheckpointError, match=r"model_states.pt is (longer than saved|truncated)"):
        mgr.load(path, engine=engine)
    assert not marker.exists()
    # a foreign checkpoint, self-consistent but signed with another secret (or not at all)
    _resign(mgr, path, run_secret.run_secret(tmp_path / "attacker"))
    with pytest.raises(CheckpointError, match="signature does not verify"):
        mgr.load(path, engine=engine)
    assert not marker.exists()
    assert mgr.load(mgr.save(2, {"v": 2}, engine=engine), engine=engine).payload == {"v": 2}  # ours loads


# ----------------------------------------------------------------------------------------------
# issue 19, item 3: the signature is checked first, for every checkpoint (not only before DeepSpeed's loader)


def _forge(path: Path, payload: dict, key: bytes | None = None) -> None:
    """An attacker's trainer_state.pt, with the manifest's sizes and checksums recomputed to match; signed with
    ``key`` when given (another run's secret), else keeping the old signature (which no longer verifies)."""
    from distrag.distributed import checkpoint as ck

    torch.save({"step": 1, "payload": payload}, path / "trainer_state.pt")
    m = json.loads((path / MANIFEST).read_text())
    m["files"] = {rel: {"size": (path / rel).stat().st_size, "sha256": ck._sha256(path / rel)}
                  for rel in ck._files(path)}
    if key is not None:
        m["signature"] = run_secret.sign(key, ck._signed_text(m))
    (path / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("signer", ["stale signature", "another run's key"])
def test_a_forged_state_with_a_recomputed_manifest_is_refused_without_an_engine(mgr, tmp_path, signer):
    """Before: sizes and sha256 matched the recomputed manifest and the signature was only checked before
    DeepSpeed's loader, so an Ft-Embed resume (no engine) loaded a zeroed encoder silently."""
    path = mgr.save(1, {"embedder": {"w": torch.ones(4)}})
    key = run_secret.run_secret(tmp_path / "attacker") if signer != "stale signature" else None
    _forge(path, {"embedder": {"w": torch.zeros(4)}}, key)
    with pytest.raises(CheckpointError, match=rf"{path / MANIFEST}: signature does not verify"):
        mgr.load(path)
    with pytest.raises(CheckpointError, match="signature does not verify"):
        mgr.validate(path)


def test_a_checkpoint_copied_in_from_another_run_is_skipped_by_auto(mgr, tmp_path, caplog):
    """Before: the foreign, self-consistent step_50 was chosen by resume=auto and refused later (exit 2)."""
    import shutil

    ours = mgr.save(40, {"v": "ours"})
    other = CheckpointManager(tmp_path / "other_run" / "checkpoints")
    foreign = other.save(50, {"v": "theirs"})
    shutil.copytree(foreign, mgr.root / foreign.name)
    with caplog.at_level(logging.WARNING, logger="distrag.distributed.checkpoint"):
        assert mgr.resolve("auto") == ours
    assert f"skipping checkpoint {mgr.root / foreign.name}" in caplog.text and "another run" in caplog.text
    assert mgr.load(mgr.resolve("auto")).payload == {"v": "ours"}
    with pytest.raises(CheckpointError, match="signature does not verify"):  # named explicitly: an error
        mgr.resolve(str(mgr.root / foreign.name))


# ----------------------------------------------------------------------------------------------
# what state files hold: plain data only, read from the bytes that were checked


def test_plain_data_passes_and_anything_that_needs_pickle_is_named():
    check_plain({"t": torch.zeros(1), 3: [1.0, "a", None, True, (torch.float32, torch.Size([2]))]})
    with pytest.raises(TypeError, match=r"payload\['lr'\].*numpy"):
        check_plain({"lr": np.float64(0.1)})
    with pytest.raises(TypeError, match=r"payload\[0\].*Path"):
        check_plain([Path("x")])


def test_the_rng_state_round_trips_as_plain_data():
    state = rng_state()
    check_plain(state)
    draws = random.random(), float(np.random.rand()), torch.rand(2).tolist()
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), torch.rand(2).tolist()) == draws


class _Code:
    def __reduce__(self):
        return print, ("ran",)


def test_a_state_file_is_read_from_the_bytes_that_match_its_checksum(tmp_path):
    f = tmp_path / "state.pt"
    data = torch_bytes({"step": 1, "payload": {"w": torch.ones(2)}})
    f.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert read_state(f, ("step", "payload"), digest)["step"] == 1
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        read_state(f, ("step", "payload"), "0" * 64)
    with pytest.raises(CheckpointError, match=r"expected keys \['rng'\]"):
        read_state(f, ("rng",), digest)
    evil = torch_bytes({"step": 1, "payload": _Code()})
    f.write_bytes(evil)
    with pytest.raises(CheckpointError, match="could run code"):
        read_state(f, ("step", "payload"), hashlib.sha256(evil).hexdigest())
