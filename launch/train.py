#!/usr/bin/env python
"""Distributed fine-tuning entry point.

    deepspeed --num_gpus 3 launch/train.py --config launch/configs/joint_refresh.yaml [key=value ...]
    deepspeed --hostfile hosts launch/train.py --config C
    torchrun --nproc_per_node 3 launch/train.py --config C
    srun ... python launch/train.py --config C          (slurm/train.sbatch)

Every process runs this file. With `train.refresh_every > 0` (and a strategy that trains the
retriever) one rank (`distributed.index_rank`, default the last) re-embeds the corpus and rebuilds
the index asynchronously; all others train. One process is the single-process path with the same
code. Exit codes: 0 on success and after a checkpoint-and-requeue, 2 on bad configuration or data.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", "-c", required=True, help="experiment YAML")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher (LOCAL_RANK is read from the environment)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    args = parser.parse_args()

    from distrag import dist
    from distrag.checkpoint import CheckpointError
    from distrag.cli import _setup_logging
    from distrag.config import ConfigError, load_config
    from distrag.distributed import run
    from distrag.records import DataError
    from distrag.train import StrategyError

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _setup_logging(verbose=True)
    if not dist.get_dist_info(cfg.distributed).is_rank0:
        logging.getLogger("distrag").setLevel(logging.WARNING)  # one voice: trainer 0
    try:
        return run(cfg)
    except (ConfigError, DataError, StrategyError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - any other failure: full traceback, non-zero exit via dist.finish
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    # dist.finish tears the process groups down, flushes and leaves with os._exit: a ZeRO-3 run can
    # otherwise abort in interpreter teardown ("terminate called without an active exception").
    from distrag import dist

    dist.finish(main())
