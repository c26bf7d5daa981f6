"""CheckpointManager: atomic saves, resume rules, RNG round trip, DeepSpeed engine errors."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from distrag.distributed import roles
from distrag.distributed.checkpoint import CheckpointManager, list_complete, resolve_resume
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
               "index": {"version": 3, "path": "/x/v000003"}, "mlflow_run_id": "abc"}
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
    assert resolve_resume("auto", mgr.root) == good
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(str(mgr.root / ".step_00000020.tmp"))
    assert mgr.load(resolve_resume("auto", mgr.root)).payload == {"v": 1}
    mgr.save(30, {"v": 3})  # the next save clears the leftover
    assert not (mgr.root / ".step_00000020.tmp").exists()


def test_resolve_resume_rules(mgr, tmp_path):
    assert resolve_resume(None, mgr.root) is None
    assert resolve_resume("auto", mgr.root) is None  # first run: fresh start
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(str(tmp_path / "nope"))
    a = mgr.save(1, {})
    b = mgr.save(2, {})
    assert resolve_resume("auto", mgr.root) == b
    assert resolve_resume(str(a)) == a
    assert resolve_resume(str(mgr.root)) == b  # a checkpoint root: its newest
    (mgr.root / "latest").write_text("step_99999999\n")  # stale pointer: newest complete one instead
    assert resolve_resume("auto", mgr.root) == b
    incomplete = tmp_path / "half"
    incomplete.mkdir()
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(str(incomplete))
    with pytest.raises(CheckpointError):
        mgr.load(incomplete)


def test_prune_keeps_newest(mgr):
    for s in (1, 2, 3, 4):
        mgr.save(s, {"s": s})
    assert [p.name for p in list_complete(mgr.root)] == ["step_00000003", "step_00000004"]


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
