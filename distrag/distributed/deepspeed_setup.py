"""Setting DeepSpeed up for the generator (trainers only): its configuration built from ours
(:func:`build_ds_config`), DeepSpeed attached to the trainers' process group (:func:`attach_deepspeed`),
the engine's arguments (:func:`engine_kwargs`), and the ZeRO-3 helpers (gathered LoRA adapters, synced
generation, an embedder kept out of ZeRO-3's partitioning).

Batch arithmetic (per trainer, per optimizer step)::

    train.batch_size        questions ONE trainer contributes to one optimizer step
    train.micro_batch_size  questions per forward/backward on one trainer
    accumulation            = batch_size // micro_batch_size
    DeepSpeed train_batch_size = micro_batch_size x accumulation x n_trainers   (global)

So adding trainers grows the global batch; the learning rate is not rescaled for you.

The JSON in ``ds_configs/`` holds ZeRO settings only. Batch fields, clipping and precision are
always derived from our config, and there is no ``optimizer`` block: the training code passes a
torch ``AdamW`` to ``deepspeed.initialize`` (a config optimizer would JIT-compile ``fused_adam``).

ZeRO-3 rules we follow (each is tested in ``tests/distributed/test_deepspeed_setup.py``):

* LoRA adapters must be saved gathered (:func:`gathered_lora_state_dict`, a collective) or they
  are saved as empty shards.
* ``generate()`` under ZeRO-3 needs ``synced_gpus=True`` (:func:`needs_synced_gpus`): ranks that
  finish early must keep joining the parameter gathers of the others.
* The embedder is a second model that must NOT be partitioned: build it outside any
  ``deepspeed.zero.Init`` context and, when a transformers ``HfDeepSpeedConfig`` for ZeRO-3 is alive
  (which makes every ``from_pretrained`` partition itself), inside :func:`outside_zero3_init`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from distrag.config import DistributedConfig, TrainConfig
from distrag.errors import DSConfigError

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"

# Used when the package is installed without the repository's ds_configs/ folder.
_BUILTIN = {
    2: {"zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9},
    3: {"zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                              "stage3_param_persistence_threshold": 0,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9},
}


def ds_config_path(dist_cfg: DistributedConfig) -> Path | None:
    if dist_cfg.ds_config:
        return Path(dist_cfg.ds_config)
    if dist_cfg.zero_stage == 3:
        name = "zero3_offload.json" if dist_cfg.offload else "zero3.json"
    else:
        name = "zero2.json"  # stages 0-2 share it; the stage is overwritten below
    p = DS_CONFIG_DIR / name
    return p if p.is_file() else None


def build_ds_config(train_cfg: TrainConfig, dist_cfg: DistributedConfig, n_trainers: int, *,
                    bf16: bool) -> dict:
    """The dict for ``deepspeed.initialize(config=...)``; see the module docstring for the arithmetic."""
    path = ds_config_path(dist_cfg)
    if path is not None:
        if not path.is_file():
            raise DSConfigError(f"distributed.ds_config: file not found: {path}")
        try:
            cfg = json.loads(path.read_text())
        except ValueError as e:
            raise DSConfigError(f"distributed.ds_config: {path} is not valid JSON: {e}") from None
    else:
        cfg = copy.deepcopy(_BUILTIN[3 if dist_cfg.zero_stage == 3 else 2])
    cfg.pop("optimizer", None)  # we pass torch AdamW; a config optimizer compiles fused_adam
    zero = cfg.setdefault("zero_optimization", {})
    zero["stage"] = dist_cfg.zero_stage
    if dist_cfg.offload and dist_cfg.zero_stage != 3:
        raise DSConfigError("distributed.offload needs distributed.zero_stage=3")
    if not dist_cfg.offload:
        zero.pop("offload_optimizer", None)
        zero.pop("offload_param", None)
    elif "offload_optimizer" not in zero:
        zero["offload_optimizer"] = {"device": "cpu"}
        zero["offload_param"] = {"device": "cpu"}
    if dist_cfg.offload:
        cfg["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on the CPU copies

    micro, per_trainer = train_cfg.micro_batch_size, train_cfg.batch_size
    problems = []
    if n_trainers < 1:
        problems.append(f"n_trainers must be >= 1, got {n_trainers}")
    if per_trainer % micro:
        problems.append(f"train.batch_size ({per_trainer}) must be a multiple of train.micro_batch_size ({micro})")
    if problems:
        raise DSConfigError("DeepSpeed batch configuration: " + "; ".join(problems))
    accum = per_trainer // micro
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = accum
    cfg["train_batch_size"] = micro * accum * n_trainers
    cfg["gradient_clipping"] = train_cfg.max_grad_norm
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": bool(bf16)}
    cfg["fp16"] = {"enabled": False}
    check_ds_batch(cfg, n_trainers)
    return cfg


def uses_bf16(model: torch.nn.Module) -> bool:
    """Whether DeepSpeed runs ``model`` (the generator) in bf16: exactly when its weights were loaded in
    bfloat16 (``generator.dtype`` through :func:`distrag.models.sources.pick_dtype`: ``bfloat16``, or ``auto``
    on a CUDA device that supports it), so the engine's precision always matches the weights'."""
    return any(p.dtype == torch.bfloat16 for p in model.parameters())


def check_ds_batch(ds_config: dict, n_trainers: int) -> None:
    """Raise :class:`DSConfigError` unless train_batch_size == micro x accumulation x n_trainers.

    Call it on the trainers at start with the real DeepSpeed world size (it catches a config built
    for another world, e.g. one that counted the index rank as a trainer)."""
    try:
        micro = int(ds_config["train_micro_batch_size_per_gpu"])
        accum = int(ds_config["gradient_accumulation_steps"])
        total = int(ds_config["train_batch_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise DSConfigError(f"DeepSpeed config lacks numeric batch fields: {e}") from None
    if micro < 1 or accum < 1 or total != micro * accum * n_trainers:
        raise DSConfigError(
            f"DeepSpeed batch arithmetic does not hold: train_batch_size={total} but "
            f"micro_batch ({micro}) x accumulation ({accum}) x trainers ({n_trainers}) = {micro * accum * n_trainers}. "
            "Batch fields are derived from train.batch_size / train.micro_batch_size; was the config built "
            "for another number of trainers (the index rank is not a trainer)?")


def attach_deepspeed(ctx) -> None:
    """Make ``deepspeed.comm`` wrap the trainers-only group built by ``dist.init_roles``.

    Call on every trainer right after ``init_roles`` and before anything that reads DeepSpeed's
    world: ``HfDeepSpeedConfig`` / ``zero.Init`` compute the batch arithmetic with
    ``deepspeed.comm``'s world size, which is 1 until it is attached (then ZeRO-3 model loading fails
    with "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size").
    """
    if ctx.info.is_index:
        raise ValueError("the index rank never joins DeepSpeed")
    if ctx.backend is None:
        return  # single process: deepspeed.initialize sets itself up
    import deepspeed

    deepspeed.init_distributed(dist_backend=ctx.backend, dist_init_required=False, verbose=False)


# ----------------------------------------------------------------------------------------------
# ZeRO-3 helpers


def _module(engine_or_model) -> torch.nn.Module:
    return getattr(engine_or_model, "module", engine_or_model)


def zero_stage(engine_or_model) -> int:
    fn = getattr(engine_or_model, "zero_optimization_stage", None)
    return int(fn()) if callable(fn) else 0


def needs_synced_gpus(engine_or_model) -> bool:
    """Pass as ``generate(..., synced_gpus=...)``: True under ZeRO-3 with more than one trainer."""
    if zero_stage(engine_or_model) != 3:
        return False
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _is_lora_param(name: str) -> bool:
    return "lora_" in name


def gathered_lora_state_dict(engine_or_model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The LoRA adapter weights, full-size, as CPU tensors, on every trainer.

    A collective under ZeRO-3 (every trainer must call it); without ZeRO-3 it is a local copy. Keys
    are peft's (``get_peft_model_state_dict``), ready for ``save_pretrained(state_dict=...)``."""
    from peft import get_peft_model_state_dict

    model = _module(engine_or_model)
    params = [p for n, p in model.named_parameters() if _is_lora_param(n)]
    if not params:
        raise ValueError("no LoRA parameters found (is this a peft model?)")
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
            sd = {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}
    else:
        sd = {k: v.detach().to("cpu", copy=True)
              for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
    empty = [k for k, v in sd.items() if v.numel() == 0]
    if empty:
        raise RuntimeError(f"LoRA tensors still empty after gathering: {empty[:3]}")
    return sd


def save_lora_adapter(engine_or_model, path: str | Path, *, is_writer: bool,
                      adapter_name: str = "default") -> Path | None:
    """Collective: gather the adapters on every trainer; the writer (trainer 0) saves a peft folder
    atomically (``PeftModel.from_pretrained(base, path)`` reloads it)."""
    from distrag.atomic_io import atomic_directory

    sd = gathered_lora_state_dict(engine_or_model, adapter_name)
    if not is_writer:
        return None
    model = _module(engine_or_model)
    with atomic_directory(path, overwrite=True) as tmp:
        model.save_pretrained(str(tmp), state_dict=sd, selected_adapters=[adapter_name],
                              safe_serialization=True)
    return Path(path)


@contextmanager
def outside_zero3_init() -> Iterator[None]:
    """Build a model that ZeRO-3 must not partition (the embedder) inside this block.

    transformers partitions every ``from_pretrained`` under ``deepspeed.zero.Init`` while a ZeRO-3
    ``HfDeepSpeedConfig`` is alive; this hides it for the block and restores it after. (Also do not
    build the embedder inside an explicit ``deepspeed.zero.Init`` context.)"""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # pragma: no cover - transformers always present here
        yield
        return
    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def is_partitioned(module: torch.nn.Module) -> bool:
    """True if any parameter of ``module`` was partitioned by ZeRO-3."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def engine_kwargs(model: torch.nn.Module, ds_config: dict, lr: float, weight_decay: float = 0.0) -> dict[str, Any]:
    """``deepspeed.initialize(**engine_kwargs(...))`` with a torch AdamW over the trainable params."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return {"model": model, "optimizer": opt, "config": ds_config}
