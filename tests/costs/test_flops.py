"""FLOP formulas (distrag/costs/flops.py) against torch's FlopCounterMode.

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

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from distrag.costs.flops import (
    ModelDims,
    forward_flops_breakdown,
    generate_flops,
    lora_param_count,
    texts_forward_flops,
    train_flops,
    transformer_forward_flops,
    transformer_train_flops,
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


def test_texts_encoded_in_length_sorted_padded_batches(tiny_encoder_dir):
    # Embedder.encode sorts longest first and pads each batch of 2 to its longest: (40, 19), (12, 7), (3)
    model = _tiny_bert(tiny_encoder_dir)
    lengths = [7, 40, 19, 3, 12]
    measured = sum(_count(lambda r=r, w=w: model(input_ids=torch.randint(0, 100, (r, w))))
                   for r, w in ((2, 40), (2, 12), (1, 3)))
    est = texts_forward_flops(model.config, lengths, 2)
    assert abs(_ratio(est, measured) - 1) < 0.01
    assert est == texts_forward_flops(model.config, sorted(lengths), 2)  # input order does not matter
    # charging each text at its own length (padding ignored) would be low by a quarter here
    own = texts_forward_flops(model.config, lengths, 1)
    assert own == sum(transformer_forward_flops(model.config, n, n) for n in lengths)
    assert _ratio(own, measured) < 1 - TOL
    assert texts_forward_flops(model.config, lengths, 5) == transformer_forward_flops(model.config, 5 * 40, 40)
    assert texts_forward_flops(model.config, [], 4) == 0.0
    with pytest.raises(ValueError):
        texts_forward_flops(model.config, lengths, 0)


def test_lm_head_on_the_kept_positions_only(tiny_lm_dir):
    # answer scoring computes logits for the answer columns only (logits_to_keep)
    model = _tiny_lm(tiny_lm_dir)
    b, s, keep = 3, 40, 6
    x = torch.randint(0, model.config.vocab_size, (b, s))
    with torch.no_grad():
        measured = _count(lambda: model(input_ids=x, logits_to_keep=keep))
    est = transformer_forward_flops(model.config, b * s, s, lm_head_tokens=b * keep)
    assert abs(_ratio(est, measured) - 1) < 0.01
    # the head on every position would over-charge (the tiny model's head is half its matmuls)
    assert _ratio(transformer_forward_flops(model.config, b * s, s), measured) > 1 + TOL


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
    # adapters a frozen model carries still run: 2 FLOPs per parameter and token forward, 2 more backward
    assert train_flops(f, "inference", lora_params=10, tokens=2) == 100 + 40
    assert train_flops(f, "frozen_input_grad", lora_params=10, tokens=2, attention_flops=attn) == 220 + 80
    assert generate_flops(ModelDims(32, 2, 64, 2, 1, 16, 100, True, True), 5, 3, 2, lora_params=10) == \
        generate_flops(ModelDims(32, 2, 64, 2, 1, 16, 100, True, True), 5, 3, 2) + 2 * 10 * 2 * (5 + 2)
    for mode in ("lora", "inference", "frozen_input_grad"):
        with pytest.raises(ValueError):
            train_flops(f, mode, lora_params=10)  # adapters without tokens
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
