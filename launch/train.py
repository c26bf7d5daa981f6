#!/usr/bin/env python
"""Distributed fine-tuning entry point.

    deepspeed --num_gpus 3 launch/train.py --config launch/configs/joint_refresh.yaml [key=value ...]
    deepspeed --hostfile hosts launch/train.py --config C
    torchrun --nproc_per_node 3 launch/train.py --config C
    srun ... python launch/train.py --config C          (slurm/train.sbatch)

Every process runs this file. With `train.refresh_every > 0` (and a strategy that trains the
retriever) one rank (`distributed.index_rank`, default the last) re-embeds the corpus and rebuilds
the index asynchronously; all others train. One process is the single-process path with the same
code. Exit codes: 0 on success and after a checkpoint-and-requeue, 2 on a user error (bad configuration,
data, model, checkpoint; see distrag/errors.py), 1 on any other failure.
"""

from __future__ import annotations

import argparse
import os
import traceback

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", "-c", required=True, help="experiment YAML")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher (LOCAL_RANK is read from the environment)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    args = parser.parse_args()

    from distrag.config import load_config
    from distrag.distributed.runner import preflight, run
    from distrag.distributed.world import get_dist_info
    from distrag.errors import DistError, user_error_exit
    from distrag.logging_setup import quiet_rank, setup_logging

    setup_logging(verbose=True)
    cfg = None

    def job() -> int:
        nonlocal cfg
        cfg = load_config(args.config, args.overrides)
        world = get_dist_info(with_index_rank=False)
        # the world, the models' files, output_dir, the tracker, DeepSpeed settings: before any model loads
        preflight(cfg, world_size=world.world_size, tracking=world.rank == 0)
        if not get_dist_info(cfg.distributed).is_rank0:
            quiet_rank()  # one voice: trainer 0
        return run(cfg)

    def speaks() -> bool:
        """Whether this process prints a user error: trainer 0 (every process before the roles are known)."""
        try:
            if cfg is None:
                return True
            try:
                return get_dist_info(cfg.distributed).is_rank0
            except DistError:  # index_rank outside the world: the launcher's rank 0 speaks
                return get_dist_info(with_index_rank=False).rank == 0
        except DistError:
            return True

    try:
        # a user error is printed once, by rank 0 (or by every process before the roles are known)
        return user_error_exit(job, speak=speaks)
    except Exception:  # noqa: BLE001 - any other failure: full traceback, non-zero exit via roles.finish
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    # roles.finish tears the process groups down, flushes and leaves with os._exit: a ZeRO-3 run can
    # otherwise abort in interpreter teardown ("terminate called without an active exception").
    from distrag.distributed import roles

    roles.finish(main())
