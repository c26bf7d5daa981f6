"""FLOP formulas against torch's FlopCounterMode, and the CostLedger's bookkeeping.

What FlopCounterMode counts: matmul-like aten ops only (mm, addmm, bmm, baddbmm, SDPA kernels it has a
formula for), 2 FLOPs per multiply-add -- the same scope as our formulas (dense weights, attention scores
and values, LM head; no norms, softmax, activations, embeddings lookups, losses).

Apples to apples:
* Attention runs ``eager`` in these tests: Q K^T and P V are plain bmm ops, counted forward and backward.
  With the default ``sdpa`` on CPU, torch dispatches ``aten._scaled_dot_product_flash_attention_for_cpu``,
  for which FlopCounterMode (torch 2.13) has no formula and counts 0; one test registers torch's own SDPA
  formula for that op to check the production path too.
* BERT is built without its pooler (``add_pooling_layer=False``): the pooler is a per-sequence h x h
  matmul that the formula deliberately leaves out.
* Measured est / FlopCounterMode ratios (torch 2.13, transformers 5.24, peft 0.21):
    forward  tiny Llama 1.000, tiny BERT 1.000, Llama h=128 L=4 s=384 1.000 (attention 37 % of F),
             BERT h=128 L=4 s=256 1.000 (attention 33 %), Llama via CPU SDPA (torch's formula) 1.000
    train    LoRA tiny Llama 1.030, LoRA Llama h=128 L=4 s=256 1.017 (the formula charges the input-gradient
             of the layer-0 Q/K/V base matmuls, which autograd skips), full BERT tiny 1.000, full BERT h=128
             L=4 s=256 1.000
    generate tiny Llama with KV cache 1.000
  Without the F_attn term the LoRA step at h=128, s=256 would be 0.896; the default counter on CPU SDPA
  misses all attention (est / count = 1.39).
* The larger configs use h=128 and long sequences rather than h=256, s=128, where attention would be only
  ~9 % of the forward FLOPs -- too little for a 10 % check to notice if the attention term were wrong.
"""

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from distrag.costs.ledger import (
    STANDARD_CATEGORIES,
    CostLedger,
    ModelDims,
    forward_flops_breakdown,
    generate_flops,
    lora_param_count,
    train_flops,
    transformer_forward_flops,
    transformer_train_flops,
    validate_metric_name,
)

TOL = 0.10


def _count(fn, custom_mapping=None) -> int:
    with FlopCounterMode(display=False, custom_mapping=custom_mapping) as fc:
        fn()
    return fc.get_total_flops()


def _tiny_lm(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir, attn_implementation="eager")


def _tiny_bert(tiny_encoder_dir):
    from transformers import BertModel

    return BertModel.from_pretrained(tiny_encoder_dir, attn_implementation="eager", add_pooling_layer=False)


def _llama(h=128, layers=4, vocab=600, impl="eager"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      attn_implementation=impl)
    return LlamaForCausalLM(cfg)


def _bert(h=128, layers=4, vocab=600):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=2 * h, attn_implementation="eager")
    return BertModel(cfg, add_pooling_layer=False)


def _ratio(est, measured):
    assert measured > 0
    return est / measured


# ----------------------------------------------------------------------------------------------
# dimensions


def test_dims_read_from_bert_and_llama_configs(tiny_lm_dir, tiny_encoder_dir):
    from transformers import AutoConfig

    llama = ModelDims.from_config(AutoConfig.from_pretrained(tiny_lm_dir))
    assert (llama.hidden, llama.layers, llama.intermediate, llama.heads, llama.kv_heads, llama.head_dim) == \
        (32, 2, 64, 2, 1, 16)
    assert llama.gated_mlp and llama.lm_head and llama.kv_dim == 16
    # q 32x32 + k,v 32x16 each + o 32x32 + gated MLP 3 x 32x64
    assert llama.dense_params_per_layer == 1024 + 2 * 512 + 1024 + 3 * 2048
    bert = ModelDims.from_config(AutoConfig.from_pretrained(tiny_encoder_dir))
    assert not bert.gated_mlp and not bert.lm_head and bert.kv_heads == bert.heads == 2
    assert bert.dense_params_per_layer == 4 * 32 * 32 + 2 * 32 * 64
    # a model, a dict and GPT-2 attribute names work too
    assert ModelDims.from_config(_tiny_bert(tiny_encoder_dir)) == bert
    gpt2 = ModelDims.from_config({"model_type": "gpt2", "n_embd": 64, "n_layer": 3, "n_head": 4,
                                  "vocab_size": 100, "activation_function": "gelu_new"})
    assert (gpt2.intermediate, gpt2.gated_mlp, gpt2.lm_head) == (256, False, True)
    with pytest.raises(ValueError, match="hidden_size"):
        ModelDims.from_config({"num_hidden_layers": 2})


def test_lora_param_count_matches_peft(tiny_lm_dir):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(_tiny_lm(tiny_lm_dir), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_param_count(model.base_model.model.config, 4, targets) == trainable
    with pytest.raises(ValueError, match="unknown LoRA target"):
        lora_param_count(model.base_model.model.config, 4, ["dense"])


# ----------------------------------------------------------------------------------------------
# forward FLOPs vs FlopCounterMode


def test_forward_tiny_llama(tiny_lm_dir):
    model = _tiny_lm(tiny_lm_dir)
    x = torch.randint(0, model.config.vocab_size, (3, 40))
    measured = _count(lambda: model(input_ids=x))
    est = transformer_forward_flops(model.config, n_tokens=3 * 40, seq_len=40)
    assert abs(_ratio(est, measured) - 1) < TOL


def test_forward_tiny_bert(tiny_encoder_dir):
    model = _tiny_bert(tiny_encoder_dir)
    x = torch.randint(0, model.config.vocab_size, (3, 40))
    measured = _count(lambda: model(input_ids=x))
    est = transformer_forward_flops(model.config, n_tokens=3 * 40, seq_len=40)
    assert abs(_ratio(est, measured) - 1) < TOL


def test_forward_larger_llama_where_attention_matters():
    model = _llama()
    s = 384
    x = torch.randint(0, 600, (1, s))
    with torch.no_grad():
        measured = _count(lambda: model(input_ids=x))
    parts = forward_flops_breakdown(model.config, s, s)
    est = sum(parts.values())
    assert abs(_ratio(est, measured) - 1) < TOL
    # the attention term is large enough that leaving it out would fail the same bound
    assert parts["attention"] / est > 0.25
    assert abs(_ratio(est - parts["attention"], measured) - 1) > TOL


def test_forward_larger_bert():
    model = _bert()
    s = 256
    x = torch.randint(0, 600, (1, s))
    with torch.no_grad():
        measured = _count(lambda: model(input_ids=x))
    parts = forward_flops_breakdown(model.config, s, s)
    assert parts["attention"] / sum(parts.values()) > 0.25
    assert abs(_ratio(sum(parts.values()), measured) - 1) < TOL


def test_forward_llama_with_cpu_sdpa_kernel():
    # The production attention on CPU is SDPA's fused flash kernel. FlopCounterMode has no formula for it
    # (it counts 0 there), so register torch's own SDPA formula for that op (same argument layout q, k, v).
    from torch.utils.flop_counter import sdpa_flop_count

    def cpu_sdpa_flop(q, k, v, *args, out_shape=None, **kwargs):  # shapes, as FlopCounterMode passes them
        return sdpa_flop_count(q, k, v)

    aten = torch.ops.aten
    model = _llama(impl="sdpa")
    s = 256
    x = torch.randint(0, 600, (1, s))
    with torch.no_grad():
        measured = _count(lambda: model(input_ids=x),
                          custom_mapping={aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa_flop})
    est = transformer_forward_flops(model.config, s, s)
    assert abs(_ratio(est, measured) - 1) < TOL


# ----------------------------------------------------------------------------------------------
# training FLOPs vs FlopCounterMode (forward + backward)


def _lora_step_ratio(base, seq, batch):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    x = torch.randint(0, base.config.vocab_size, (batch, seq))
    measured = _count(lambda: model(input_ids=x, labels=x).loss.backward())
    p_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert p_lora == lora_param_count(base.config, 8, targets)
    # the base weights got no gradients, the adapters did (the step really was a LoRA step)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    est = transformer_train_flops(base.config, batch * seq, seq, "lora", lora_params=p_lora)
    return _ratio(est, measured), est, measured


def test_lora_training_step_tiny_llama(tiny_lm_dir):
    ratio, _, _ = _lora_step_ratio(_tiny_lm(tiny_lm_dir), seq=48, batch=2)
    assert abs(ratio - 1) < TOL


def test_lora_training_step_larger_llama():
    base = _llama()
    cfg = base.config
    ratio, _, measured = _lora_step_ratio(base, seq=256, batch=1)
    assert abs(ratio - 1) < TOL
    # without the extra attention backward (both operands of Q K^T and P V are activations) the
    # estimate is low by a third of the attention share
    parts = forward_flops_breakdown(cfg, 256, 256)
    p_lora = lora_param_count(cfg, 8, ["q_proj", "k_proj", "v_proj", "o_proj"])
    without = train_flops(sum(parts.values()), "lora", lora_params=p_lora, tokens=256)
    assert without / measured < ratio - 0.05


def test_full_training_step_tiny_bert(tiny_encoder_dir):
    model = _tiny_bert(tiny_encoder_dir)
    x = torch.randint(0, model.config.vocab_size, (3, 40))
    measured = _count(lambda: model(input_ids=x).last_hidden_state.mean().backward())
    est = transformer_train_flops(model.config, 3 * 40, 40, "full")
    assert est == 3 * transformer_forward_flops(model.config, 3 * 40, 40)
    assert abs(_ratio(est, measured) - 1) < TOL


def test_full_training_step_larger_bert():
    model = _bert()
    s = 256
    x = torch.randint(0, 600, (1, s))
    measured = _count(lambda: model(input_ids=x).last_hidden_state.mean().backward())
    est = transformer_train_flops(model.config, s, s, "full")
    assert abs(_ratio(est, measured) - 1) < TOL


def test_train_flops_modes():
    f, attn = 100.0, 20.0
    assert train_flops(f, "full") == 300.0
    assert train_flops(f, "lora", lora_params=10, tokens=2, attention_flops=attn) == 200 + 20 + 120
    assert train_flops(f, "frozen_input_grad", attention_flops=attn) == 220.0
    assert train_flops(f, "inference") == 100.0
    with pytest.raises(ValueError):
        train_flops(f, "lora", lora_params=10)  # adapters without tokens
    with pytest.raises(ValueError):
        train_flops(f, "everything")


# ----------------------------------------------------------------------------------------------
# generation


def test_generate_with_kv_cache_tiny_llama(tiny_lm_dir):
    model = _tiny_lm(tiny_lm_dir).eval()
    cfg = model.config
    b, p, g = 2, 16, 6
    x = torch.randint(3, cfg.vocab_size, (b, p))
    with torch.no_grad():
        measured = _count(lambda: model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=g,
                                                 min_new_tokens=g, do_sample=False, pad_token_id=cfg.pad_token_id))
    est = generate_flops(cfg, prompt_tokens=p, new_tokens=g, batch=b)
    assert abs(_ratio(est, measured) - 1) < TOL
    # a KV cache is much cheaper than re-running the growing sequence for every new token
    no_cache = sum(transformer_forward_flops(cfg, b * (p + j), p + j, lm_head_tokens=b) for j in range(g))
    assert est < no_cache / 2
    assert generate_flops(cfg, p, 0, b) == 0.0
    assert generate_flops(cfg, p, 1, b) == transformer_forward_flops(cfg, b * p, p, lm_head_tokens=b)


# ----------------------------------------------------------------------------------------------
# the ledger


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def tick(self, dt):
        self.t += dt


def _mlflow_check(name):
    from mlflow.utils.validation import _validate_metric_name

    _validate_metric_name(name)


def test_ledger_totals_and_phases():
    clock = FakeClock()
    led = CostLedger(n_devices=2, clock=clock)
    led.add("encode_passages", 1e9, tokens=5000, passages=100)
    with led.phase("train/generator"):
        clock.tick(10)
        led.add("train", 3e9, tokens=800)
        with led.phase("eval"):  # nested: counted in both phases (inclusive), once in the totals
            clock.tick(5)
            led.add("generate", 2e9, tokens=64)
            assert led.open_phases == ["train/generator", "eval"]
            assert led.wall_s == 15  # open phases count up to now
        with pytest.raises(ValueError, match="already open"), led.phase("train/generator"):
            pass
    with led.phase("eval"):
        clock.tick(1)
        led.add("encode_questions", 1e6, tokens=10)
    assert led.total_flops == 1e9 + 3e9 + 2e9 + 1e6
    assert led.flops("train") == 3e9 and led.flops("nope") == 0
    assert led.tokens == 5000 + 800 + 64 + 10 and led.passages == 100
    assert led.wall_s == 16
    assert led.device_hours() == pytest.approx(32 / 3600)
    assert led.device_hours(n_devices=4) == pytest.approx(64 / 3600)
    gen = led.phase_totals("train/generator")
    assert (gen["flops"], gen["wall_s"], gen["tokens"], gen["entries"]) == (5e9, 15, 864, 1)
    assert gen["by_category"] == {"train": 3e9, "generate": 2e9}
    ev = led.phase_totals("eval")
    assert (ev["flops"], ev["wall_s"], ev["entries"]) == (2e9 + 1e6, 6, 2)


def test_ledger_phase_time_recorded_on_exception():
    clock = FakeClock()
    led = CostLedger(clock=clock)
    with pytest.raises(RuntimeError), led.phase("train/retriever"):
        clock.tick(3)
        raise RuntimeError("boom")
    assert led.wall_s == 3 and led.open_phases == []


def test_ledger_uses_perf_counter_by_default():
    import time

    led = CostLedger()
    with led.phase("sleep"):
        time.sleep(0.02)
    assert 0.015 < led.wall_s < 1.0


def test_to_metrics_names_are_valid_for_mlflow():
    clock = FakeClock()
    led = CostLedger(clock=clock)
    led.set_params(trainable=1000, total=100000)
    with led.phase("train/generator"):
        clock.tick(2)
        led.add("train", 6e9, tokens=100)
    with led.phase("phase 2 retriever-ft"):
        led.add("index_build", 5.0)
    m = led.to_metrics()
    for name in m:
        _mlflow_check(name)
        validate_metric_name(name)
    for cat in STANDARD_CATEGORIES:  # always present, so runs compare column by column
        assert f"cost/{cat}_flops" in m
    assert m["cost/train_flops"] == 6e9 and m["cost/encode_passages_flops"] == 0.0
    assert m["cost/index_build_flops"] == 5.0
    assert m["cost/total_flops"] == 6e9 + 5 and m["cost/tokens"] == 100.0
    assert m["cost/wall_s"] == 2.0 and m["cost/device_hours"] == pytest.approx(2 / 3600)
    assert m["cost/phase.train/generator.flops"] == 6e9 and m["cost/phase.train/generator.wall_s"] == 2.0
    assert m["cost/trainable_params"] == 1000 and m["cost/trainable_fraction"] == pytest.approx(0.01)
    assert all(isinstance(v, float) for v in m.values())
    assert set(led.to_metrics(prefix="cost/phase1")) == {k.replace("cost/", "cost/phase1/", 1) for k in m}


@pytest.mark.parametrize("bad", ["train:gen", "a//b", "/abs", "../up", "trail/", "ü", "x" * 251, ""])
def test_invalid_names_rejected(bad):
    led = CostLedger()
    with pytest.raises(ValueError):
        led.add(bad, 1.0)
    with pytest.raises(ValueError), led.phase(bad):
        pass


def test_invalid_values_rejected():
    led = CostLedger()
    for flops in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            led.add("train", flops)
    with pytest.raises(ValueError):
        led.add("train", 1.0, tokens=-1)


def test_state_round_trip_continues_totals():
    clock = FakeClock()
    led = CostLedger(n_devices=2, clock=clock)
    led.set_params(trainable=10, total=100)
    with led.phase("train/generator"):
        clock.tick(4)
        led.add("train", 1e9, tokens=50)
        state = json.loads(json.dumps(led.state_dict()))  # checkpoint taken mid-phase, via JSON
        clock.tick(6)
    # a resumed run starts from the snapshot (4 s of the open phase included) and continues
    resumed = CostLedger.from_state_dict(state, clock=clock)
    assert resumed.to_metrics() == {**led.to_metrics(), "cost/wall_s": 4.0, "cost/device_hours": 8 / 3600,
                                    "cost/phase.train/generator.wall_s": 4.0,
                                    "cost/phase.train/generator.device_hours": 8 / 3600}
    with resumed.phase("train/generator"):
        clock.tick(1)
        resumed.add("train", 2e9, tokens=20)
    assert resumed.flops("train") == 3e9 and resumed.tokens == 70 and resumed.wall_s == 5
    assert resumed.phase_totals("train/generator")["entries"] == 2
    assert resumed.n_devices == 2 and resumed.trainable_params == 10
    # load into an existing ledger replaces, never adds
    other = CostLedger()
    other.add("generate", 7.0)
    other.load_state_dict(state)
    assert other.flops("generate") == 0 and other.flops("train") == 1e9
    with pytest.raises(ValueError, match="version"):
        other.load_state_dict({**state, "version": 99})


def test_merge_ranks_and_phases():
    def rank_ledger(wall, flops):
        clock = FakeClock()
        led = CostLedger(clock=clock)
        led.set_params(trainable=5, total=50)
        with led.phase("train/generator"):
            clock.tick(wall)
            led.add("train", flops, tokens=10)
        return led

    a, b = rank_ledger(10, 1e9), rank_ledger(12, 2e9)
    par = CostLedger.from_state_dict(a.state_dict()).merge(b, parallel=True)
    assert par.flops("train") == 3e9 and par.tokens == 20
    assert par.wall_s == 12  # ranks ran at the same time
    assert par.device_hours() == pytest.approx(22 / 3600)  # but both devices were busy
    assert par.phase_totals("train/generator")["wall_s"] == 12
    assert par.trainable_params == 5 and par.total_params == 50  # not summed
    seq = CostLedger.from_state_dict(a.state_dict()).merge(b.state_dict())  # a state dict works too
    assert seq.wall_s == 22 and seq.flops() == 3e9
    assert math.isclose(seq.device_hours(), par.device_hours())
