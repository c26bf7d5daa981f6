"""The launcher's world (torchrun / deepspeed / SLURM environments): ranks and roles, with and without an index
rank, the SLURM fallbacks, and whether the job is on one node."""

from __future__ import annotations

import pytest

from distrag.config import DistributedConfig
from distrag.distributed.world import export_trainer_world, get_dist_info, slurm_job_id
from distrag.errors import DistError


def _env(mp, rank, world, local=0):
    mp.setenv("RANK", str(rank))
    mp.setenv("WORLD_SIZE", str(world))
    mp.setenv("LOCAL_RANK", str(local))


@pytest.mark.parametrize("index_rank,rank,expect", [
    (-1, 3, ("index", -1)), (-1, 0, ("trainer", 0)), (-1, 2, ("trainer", 2)),
    (0, 0, ("index", -1)), (0, 1, ("trainer", 0)), (1, 3, ("trainer", 2)), (-2, 2, ("index", -1)),
])
def test_roles_from_env(clean_env, index_rank, rank, expect):
    _env(clean_env, rank, 4)
    info = get_dist_info(DistributedConfig(index_rank=index_rank))
    assert (info.role, info.trainer_rank) == expect
    assert info.n_trainers == 3 and info.index_rank == index_rank % 4


def test_roles_without_index_rank_and_errors(clean_env):
    _env(clean_env, 2, 3)
    info = get_dist_info(DistributedConfig(), with_index_rank=False)
    assert (info.role, info.trainer_rank, info.n_trainers, info.index_rank) == ("trainer", 2, 3, -1)
    with pytest.raises(DistError, match="outside the world"):
        get_dist_info(DistributedConfig(index_rank=5))
    clean_env.setenv("RANK", "7")
    with pytest.raises(DistError, match="inconsistent"):
        get_dist_info()


def test_slurm_fallbacks(clean_env):
    clean_env.setenv("SLURM_PROCID", "5")
    clean_env.setenv("SLURM_NTASKS", "8")
    clean_env.setenv("SLURM_LOCALID", "1")
    clean_env.setenv("SLURM_JOB_ID", "123456")
    clean_env.setenv("MASTER_ADDR", "node01")
    info = get_dist_info(DistributedConfig())
    assert (info.rank, info.world_size, info.local_rank, info.role) == (5, 8, 1, "trainer")
    assert info.master_addr == "node01" and info.master_port == 20000 + 123456 % 20000


NODE_ENV = ("SLURM_JOB_NUM_NODES", "SLURM_NNODES", "CROSS_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE")


@pytest.mark.parametrize("env,one_node", [
    ({}, False),  # nothing says so: assume several nodes (the stores listen on MASTER_ADDR's address)
    ({"LOCAL_WORLD_SIZE": "4"}, True), ({"LOCAL_WORLD_SIZE": "2"}, False),  # torchrun
    ({"LOCAL_SIZE": "4", "CROSS_SIZE": "1"}, True), ({"LOCAL_SIZE": "2", "CROSS_SIZE": "2"}, False),  # deepspeed
    ({"SLURM_NNODES": "1"}, True), ({"SLURM_JOB_NUM_NODES": "3", "LOCAL_WORLD_SIZE": "4"}, False),  # srun
])
def test_one_node_from_the_launcher(clean_env, env, one_node):
    for k in NODE_ENV:
        clean_env.delenv(k, raising=False)
    _env(clean_env, 1, 4)
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert get_dist_info(DistributedConfig()).one_node is one_node


def test_the_slurm_job_id(clean_env):
    assert slurm_job_id() is None
    clean_env.setenv("SLURM_JOB_ID", "4242")
    assert slurm_job_id() == "4242"


def test_the_trainers_world_is_exported_for_deepspeed_and_the_launchers_values_kept(clean_env):
    """After the rewrite DeepSpeed reads the trainers-only world, and the roles still come from the launcher's."""
    import os

    _env(clean_env, 2, 4)  # global rank 2 of 4 with the index rank at 1: trainer 1 of 3
    clean_env.setenv("MASTER_ADDR", "127.0.0.1")
    clean_env.setenv("MASTER_PORT", "29600")
    info = get_dist_info(DistributedConfig(index_rank=1))
    export_trainer_world(info, 29601)
    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "MASTER_PORT")} == {
        "RANK": "1", "WORLD_SIZE": "3", "MASTER_PORT": "29601"}
    assert get_dist_info(DistributedConfig(index_rank=1)) == info
