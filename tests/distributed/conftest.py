"""Fixtures of the distributed tests: a process with no launcher environment and no roles set up."""

from __future__ import annotations

import os

import pytest

from distrag.distributed import roles

LAUNCHER_ENV = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "DISTRAG_GLOBAL_RANK",
                "DISTRAG_GLOBAL_WORLD_SIZE", "DISTRAG_GLOBAL_MASTER_ADDR", "DISTRAG_GLOBAL_MASTER_PORT"]
"""What torchrun, deepspeed, SLURM and distrag's own index-rank launcher set."""


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables and a forgotten role context (before and after); yields ``monkeypatch``."""
    for k in LAUNCHER_ENV:
        monkeypatch.delenv(k, raising=False)
    roles.reset_context()
    yield monkeypatch
    roles.reset_context()
    for k in LAUNCHER_ENV:  # what the code under test set (init_roles: a world of one for DeepSpeed)
        os.environ.pop(k, None)
