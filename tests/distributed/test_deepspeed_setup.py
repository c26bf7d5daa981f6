"""DeepSpeed config arithmetic, and ZeRO-2/3 engines over 2 trainers beside an index rank."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _dist_workers import Job

from distrag.config import DistributedConfig, TrainConfig
from distrag.distributed.deepspeed_setup import DS_CONFIG_DIR, build_ds_config, check_ds_batch
from distrag.errors import DSConfigError


def test_batch_arithmetic_from_train_config():
    cfg = build_ds_config(TrainConfig(batch_size=8, micro_batch_size=2, max_grad_norm=0.5),
                          DistributedConfig(zero_stage=2), n_trainers=3, bf16=True)
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_batch_size"] == 2 * 4 * 3
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert cfg["zero_optimization"]["stage"] == 2
    assert "optimizer" not in cfg  # torch AdamW is passed: no fused_adam compile


def test_stage_and_offload_select_files():
    z3 = build_ds_config(TrainConfig(), DistributedConfig(zero_stage=3), 2, bf16=False)
    assert z3["zero_optimization"]["stage"] == 3 and "offload_param" not in z3["zero_optimization"]
    off = build_ds_config(TrainConfig(), DistributedConfig(zero_stage=3, offload=True), 2, bf16=False)
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert off["zero_force_ds_cpu_optimizer"] is False
    with pytest.raises(DSConfigError, match="offload needs"):
        build_ds_config(TrainConfig(), DistributedConfig(zero_stage=2, offload=True), 2, bf16=False)
    z1 = build_ds_config(TrainConfig(), DistributedConfig(zero_stage=1), 2, bf16=False)
    assert z1["zero_optimization"]["stage"] == 1


def test_all_shipped_json_files_parse():
    files = sorted(DS_CONFIG_DIR.glob("*.json"))
    assert {f.name for f in files} >= {"zero2.json", "zero3.json", "zero3_offload.json"}
    for f in files:
        d = json.loads(f.read_text())
        assert "optimizer" not in d and "zero_optimization" in d


def test_custom_file_optimizer_block_dropped_and_errors(tmp_path):
    p = tmp_path / "mine.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"},
                             "train_batch_size": 999}))
    cfg = build_ds_config(TrainConfig(batch_size=4, micro_batch_size=4), DistributedConfig(ds_config=str(p)), 2,
                          bf16=False)
    assert "optimizer" not in cfg and cfg["train_batch_size"] == 8  # derived, not the file's 999
    with pytest.raises(DSConfigError, match="not found"):
        build_ds_config(TrainConfig(), DistributedConfig(ds_config=str(tmp_path / "x.json")), 2, bf16=False)
    with pytest.raises(DSConfigError, match="n_trainers"):
        build_ds_config(TrainConfig(), DistributedConfig(), 0, bf16=False)
    bad = TrainConfig.model_construct(**{**TrainConfig().model_dump(), "batch_size": 6, "micro_batch_size": 4})
    with pytest.raises(DSConfigError, match="multiple"):
        build_ds_config(bad, DistributedConfig(), 2, bf16=False)


def test_check_catches_config_built_for_another_world():
    cfg = build_ds_config(TrainConfig(batch_size=4, micro_batch_size=2), DistributedConfig(), 3, bf16=False)
    check_ds_batch(cfg, 3)
    with pytest.raises(DSConfigError, match="index rank is not a trainer"):
        check_ds_batch(cfg, 4)  # e.g. the index rank counted as a trainer


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_engine_beside_index_rank(tmp_path, tiny_lm_dir, tiny_encoder_dir, stage):
    """2 trainers build a ZeRO engine over a LoRA Llama while rank 2 is the index rank: no hang,
    two optimizer steps, a gathered (non-empty) adapter that reloads to the same outputs, an engine
    checkpoint round trip, and an embedder that stays unpartitioned."""
    job = Job("ds", {"out": str(tmp_path), "stage": stage, "lm": str(tiny_lm_dir),
                     "encoder": str(tiny_encoder_dir)}, 3, tmp_path, env={"PYTHONWARNINGS": "ignore"})
    codes = job.wait(280)
    assert codes == [0, 0, 0], job.output()
    r0, r1 = job.result(0), job.result(1)
    for r in (r0, r1):
        assert r["ds_world"] == 2 and r["zero_stage"] == stage and r["global_steps"] == 2
        assert r["synced"] is (stage == 3)
        assert r["ckpt_step"] == 2 and r["ckpt_losses"] == r0["losses"]  # trainer 0 wrote the payload
        assert all(np.isfinite(r["losses"]))
        assert r["embedder"] == {"partitioned": False, "full_shapes": True,
                                 "word_emb": r["embedder"]["word_emb"]}
        assert r["embedder"]["word_emb"][1] == 32 and r["embedder"]["word_emb"][0] > 100
        assert r["embedder_naive_partitioned"] is (True if stage == 3 else None)
    assert r0["losses"] != r1["losses"]  # different data per trainer
    assert job.result(2)["role"] == "index"

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    lora_b = [t for k, t in adapter.items() if "lora_B" in k]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)  # trained, not the zero init
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        logits = model(input_ids=torch.arange(5, 17).unsqueeze(0)).logits.numpy()
    np.testing.assert_allclose(logits, np.load(tmp_path / "logits.npy"), rtol=1e-4, atol=1e-5)
    # and the adapter matters: the base model alone gives other outputs
    with torch.no_grad(), model.disable_adapter():
        plain = model(input_ids=torch.arange(5, 17).unsqueeze(0)).logits.numpy()
    assert not np.allclose(plain, logits, atol=1e-5)


@pytest.mark.parametrize("dtype,expect", [(torch.bfloat16, True), (torch.float32, False), (torch.float16, False)])
def test_engine_precision_follows_the_generator_weights(tiny_lm_dir, dtype, expect):
    """bf16 in the DeepSpeed config exactly when the generator was loaded in bfloat16 (``generator.dtype``
    ``bfloat16``, or ``auto`` on a GPU that supports it), LoRA adapter or not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distrag.config import LoRAConfig
    from distrag.distributed.deepspeed_setup import uses_bf16
    from distrag.models.generator import Generator

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=dtype)
    assert uses_bf16(model) is expect
    gen = Generator(model, AutoTokenizer.from_pretrained(tiny_lm_dir)).add_lora(LoRAConfig(r=2, alpha=4))
    assert uses_bf16(gen.model) is expect
    ds = build_ds_config(TrainConfig(batch_size=2, micro_batch_size=2), DistributedConfig(), 1,
                         bf16=uses_bf16(gen.model))
    assert ds["bf16"]["enabled"] is expect and ds["fp16"]["enabled"] is False
