"""Roles set up: the single-process world, the trainers' group (nccl on GPUs, gloo on CPUs) that the index rank never
joins (the launcher's environment itself: test_world.py)."""

from __future__ import annotations

import pytest

from distrag.config import DistributedConfig
from distrag.distributed import roles
from distrag.distributed.world import get_dist_info


def _env(mp, rank, world, local=0):
    mp.setenv("RANK", str(rank))
    mp.setenv("WORLD_SIZE", str(world))
    mp.setenv("LOCAL_RANK", str(local))


def test_single_process_roles(clean_env):
    info = get_dist_info(DistributedConfig())
    assert (info.role, info.rank, info.world_size, info.trainer_rank, info.n_trainers) == ("single", 0, 1, 0, 1)
    assert info.is_rank0 and info.is_trainer and not info.distributed
    ctx = roles.init_roles(DistributedConfig())
    assert ctx.store is None and not ctx.has_group
    assert ctx.broadcast_object_trainers({"a": 1}) == {"a": 1}
    assert ctx.all_reduce_flag(True) is True


def test_a_world_of_one_needs_no_mpi_for_deepspeed(clean_env):
    """`python launch/train.py` without a launcher: DeepSpeed finds a complete env:// world of one (it would
    otherwise look for MPI and fail without mpi4py); a launcher's own values are kept."""
    import subprocess
    import sys

    clean_env.setenv("MASTER_ADDR", "127.0.0.1")  # a value a launcher set stays
    roles.init_roles(DistributedConfig())
    import os

    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    assert 0 < int(os.environ["MASTER_PORT"]) < 65536
    code = ("import deepspeed.comm as dist; from distrag.distributed import roles; roles.init_roles(); "
            "dist.init_distributed(dist_backend='gloo', verbose=False); print(dist.get_world_size())")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("1"), out.stderr[-2000:]


def _fake_gpus(mp, n: int) -> list:
    """torch sees ``n`` CUDA devices (none is touched); returns the devices ``set_device`` was given."""
    import torch

    chosen = []
    mp.setattr(torch.cuda, "is_available", lambda: n > 0)
    mp.setattr(torch.cuda, "device_count", lambda: n)
    mp.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


@pytest.mark.parametrize("gpus,setting,expect", [(2, "auto", "nccl"), (0, "auto", "gloo"), (2, "gloo", "gloo"),
                                                 (0, "nccl", "nccl")])
def test_backend_auto_is_nccl_on_gpus_and_gloo_on_cpu(clean_env, gpus, setting, expect):
    _fake_gpus(clean_env, gpus)
    assert roles._choose_backend(DistributedConfig(backend=setting)) == expect


def test_trainers_join_an_nccl_group_on_their_local_gpu_and_the_index_rank_joins_none(clean_env):
    import torch

    groups = []
    clean_env.setattr(roles.tdist, "init_process_group", lambda backend, **kw: groups.append((backend, kw)))
    clean_env.setattr(roles, "open_store", lambda *a, **kw: roles.tdist.HashStore())
    for k in ("MASTER_ADDR", "MASTER_PORT", "DISTRAG_GLOBAL_RANK", "DISTRAG_GLOBAL_WORLD_SIZE",
              "DISTRAG_GLOBAL_MASTER_ADDR", "DISTRAG_GLOBAL_MASTER_PORT"):
        clean_env.setenv(k, "")  # init_roles rewrites them for DeepSpeed; monkeypatch restores them after
        clean_env.delenv(k)
    clean_env.setenv("MASTER_PORT", "29555")
    chosen = _fake_gpus(clean_env, 2)
    _env(clean_env, 1, 3, local=3)  # trainer 1 on local GPU 3 % 2 = 1
    ctx = roles.init_roles(DistributedConfig())
    assert ctx.backend == "nccl" and ctx.device == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    assert ctx._obj_device() == torch.device("cuda", 1)  # small collectives travel on the GPU under nccl
    assert [(b, kw["rank"], kw["world_size"]) for b, kw in groups] == [("nccl", 1, 2)]
    roles.reset_context()
    groups.clear()
    _env(clean_env, 2, 3, local=2)  # the index rank: a GPU of its own, no trainer group
    for k in ("DISTRAG_GLOBAL_RANK", "DISTRAG_GLOBAL_WORLD_SIZE"):
        clean_env.delenv(k, raising=False)
    ctx = roles.init_roles(DistributedConfig())
    assert ctx.info.is_index and ctx.backend is None and groups == [] and ctx.device == torch.device("cuda", 0)
