"""Accountant: what each model call is charged, to which category, and that the generator's token
counters are consumed by charging (a second charge of the same call adds nothing)."""

from __future__ import annotations

import pytest
import torch

from distrag.config import EmbedderConfig, GeneratorConfig, LoRAConfig
from distrag.costs.accountant import Accountant
from distrag.costs.flops import (
    forward_flops_breakdown,
    generate_flops,
    lora_param_count,
    train_flops,
    transformer_forward_flops,
)
from distrag.costs.ledger import CostLedger
from distrag.data.records import Passage
from distrag.models.embedder import Embedder
from distrag.models.generator import Generator

TEXTS = ["Who is the founder of the company?", "yes",
         "The quick brown fox jumps over the lazy dog. " * 3, "Which city was she born in?"]


@pytest.fixture(scope="module")
def emb(tiny_encoder_dir):
    return Embedder.from_config(EmbedderConfig(model=str(tiny_encoder_dir), max_length=16), device="cpu")


@pytest.fixture()
def gen(tiny_lm_dir):
    return Generator.from_config(GeneratorConfig(model=str(tiny_lm_dir)), device="cpu")


def _prompts(gen: Generator) -> list[str]:
    passages = [Passage("p1", "Fox", "The quick brown fox founded the company in 1999.")]
    return [gen.build_prompt(q, passages) for q in TEXTS[:3]]


# ---------------------------------------------------------------------------------------------- embedder


def test_encoder_batch_training_is_three_forwards_charged_to_train(emb):
    mask = emb.tokenize(TEXTS)["attention_mask"]
    B, S = mask.shape
    assert mask.min() == 0, "the batch must contain padding: charges are at the padded shape"
    fwd = transformer_forward_flops(emb.model.config, B * S, S)

    ledger = CostLedger()
    Accountant(ledger).encoder(emb, mask, train=True, category="encode_questions")
    assert ledger.categories == ["train"]
    assert ledger.flops("train") == pytest.approx(3 * fwd)
    assert ledger.tokens == int(mask.sum()) and ledger.passages == 0

    ledger = CostLedger()
    Accountant(ledger).encoder(emb, mask, train=False, category="encode_passages")
    assert ledger.categories == ["encode_passages"]
    assert ledger.flops("encode_passages") == pytest.approx(fwd)
    assert ledger.passages == B  # passages are counted for passage encoding only


def test_encode_texts_charges_each_text_at_its_own_length(emb):
    lengths = [len(emb.tokenizer(t, truncation=True, max_length=emb.max_length)["input_ids"]) for t in TEXTS]
    assert len(set(lengths)) > 1 and max(lengths) == emb.max_length  # different lengths, one truncated
    cfg = emb.model.config
    want = sum(transformer_forward_flops(cfg, n, n) for n in lengths)

    ledger = CostLedger()
    acc = Accountant(ledger)
    acc.encode_texts(emb, TEXTS, category="encode_questions")
    assert ledger.flops("encode_questions") == pytest.approx(want)
    # less than the same texts padded to the longest one
    assert want < transformer_forward_flops(cfg, len(TEXTS) * max(lengths), max(lengths))
    assert ledger.tokens == sum(lengths) and ledger.passages == 0
    acc.encode_texts(emb, TEXTS, category="encode_passages")
    assert ledger.flops("encode_passages") == pytest.approx(want) and ledger.passages == len(TEXTS)
    acc.encode_texts(emb, [], category="encode_passages")
    assert ledger.passages == len(TEXTS) and ledger.total_flops == pytest.approx(2 * want)


def test_phase_opens_a_ledger_phase(emb):
    ledger = CostLedger()
    acc = Accountant(ledger)
    with acc.phase("eval"):
        acc.encode_texts(emb, TEXTS[:2], category="encode_questions")
    assert ledger.phases == ["eval"]
    assert ledger.phase_totals("eval")["flops"] == ledger.total_flops > 0


# ---------------------------------------------------------------------------------------------- generator


def test_scoring_is_charged_once_at_the_padded_shape(gen):
    prompts, answers = _prompts(gen), ["the fox", "no", "1999 river"]
    gen.tokens.reset()
    with torch.no_grad():
        _, mask = gen.answer_logprobs(prompts, answers)
    padded = gen.tokens.scored_padded
    assert padded > gen.tokens.scored  # rows of different lengths: padding was computed too
    S = padded // len(prompts)
    ledger = CostLedger()
    acc = Accountant(ledger)
    acc.generator(gen, lp_mask=mask, prompts=prompts, answers=answers, train=False)
    assert ledger.categories == ["score"]
    assert ledger.flops("score") == pytest.approx(transformer_forward_flops(gen.config, padded, S))
    assert ledger.tokens == padded
    assert gen.tokens.scored_padded == gen.tokens.scored == 0  # consumed
    acc.generator(gen, lp_mask=mask, prompts=prompts, answers=answers, train=False)  # nothing new ran
    assert ledger.flops("score") == pytest.approx(transformer_forward_flops(gen.config, padded, S))
    # a frozen generator inside a retriever phase is charged to the category it is given
    with torch.no_grad():
        gen.answer_logprobs(prompts, answers)
    acc.generator(gen, lp_mask=mask, prompts=prompts, answers=answers, train=False, category="train")
    assert ledger.flops("train") == pytest.approx(ledger.flops("score"))


def test_lora_training_step_charges_the_lora_formula_to_train(gen):
    targets = ["q_proj", "v_proj"]
    gen.add_lora(LoRAConfig(r=4, alpha=8, target_modules=targets))
    prompts, answers = _prompts(gen), ["the fox", "no", "1999 river"]
    gen.tokens.reset()
    _, mask = gen.answer_logprobs(prompts, answers)
    padded = gen.tokens.scored_padded
    parts = forward_flops_breakdown(gen.config, padded, padded // len(prompts))
    want = train_flops(sum(parts.values()), "lora", lora_params=lora_param_count(gen.config, 4, targets),
                       tokens=padded, attention_flops=parts["attention"])
    ledger = CostLedger()
    Accountant(ledger).generator(gen, lp_mask=mask, prompts=prompts, answers=answers, train=True)
    assert ledger.categories == ["train"]
    assert ledger.flops("train") == pytest.approx(want)
    assert ledger.flops("train") > 2 * sum(parts.values())  # more than a frozen forward + input backward


def test_generation_is_charged_with_kv_cache_at_mean_lengths(gen):
    prompts = _prompts(gen)
    gen.tokens.reset()
    gen.generate(prompts, max_new_tokens=4)
    n_prompt, n_gen = gen.tokens.prompt, gen.tokens.generated
    assert n_prompt > 0 and n_gen > 0
    ledger = CostLedger()
    acc = Accountant(ledger)
    acc.generation(gen, prompts, ["x"] * len(prompts))
    P, G = max(1, round(n_prompt / len(prompts))), max(1, round(n_gen / len(prompts)))
    assert ledger.categories == ["generate"]
    assert ledger.flops("generate") == pytest.approx(generate_flops(gen.config, P, G, batch=len(prompts)))
    assert ledger.tokens == n_prompt + n_gen
    assert gen.tokens.prompt == gen.tokens.generated == 0
    acc.generation(gen, prompts, ["x"] * len(prompts))  # counters consumed: nothing more to charge
    assert ledger.tokens == n_prompt + n_gen
