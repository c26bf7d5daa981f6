"""Accountant: what each model call is charged, to which category, and that the generator's records are
consumed by charging (a second charge of the same call adds nothing).

Every charge is checked against ``torch.utils.flop_counter.FlopCounterMode`` running the same call on the
tiny models, with ragged inputs (padding in every batch) and eager attention (the counter sees attention as
plain matmuls; see ``test_flops.py``). ``test_real_models.py`` does the same on the real models.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from distrag.config import EmbedderConfig, GeneratorConfig, LoRAConfig
from distrag.costs.accountant import Accountant
from distrag.costs.flops import (
    forward_flops_breakdown,
    generate_flops,
    lora_param_count,
    texts_forward_flops,
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
    embedder = Embedder.from_config(EmbedderConfig(model=str(tiny_encoder_dir), max_length=16), device="cpu")
    embedder.model.set_attn_implementation("eager")
    return embedder


@pytest.fixture()
def gen(tiny_lm_dir):
    generator = Generator.from_config(GeneratorConfig(model=str(tiny_lm_dir)), device="cpu")
    generator.model.set_attn_implementation("eager")
    return generator


def _prompts(gen: Generator) -> list[str]:
    passages = [Passage("p1", "Fox", "The quick brown fox founded the company in 1999.")]
    return [gen.build_prompt(q, passages[: i % 2]) for i, q in enumerate(TEXTS[:3])]


def _counted(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------- embedder


def test_encoder_batch_training_is_three_forwards_charged_to_train(emb):
    batch = emb.tokenize(TEXTS)
    mask = batch["attention_mask"]
    B, S = mask.shape
    assert mask.min() == 0, "the batch must contain padding: charges are at the padded shape"
    fwd = transformer_forward_flops(emb.model.config, B * S, S)

    ledger = CostLedger()
    Accountant(ledger).encoder(emb, mask, train=True, category="encode_questions")
    assert ledger.categories == ["train"]
    assert ledger.flops("train") == pytest.approx(3 * fwd)
    assert ledger.tokens == int(mask.sum()) and ledger.passages == 0
    assert ledger.flops("train") == pytest.approx(_counted(lambda: emb(**batch).sum().backward()), rel=0.02)
    emb.zero_grad(set_to_none=True)

    ledger = CostLedger()
    Accountant(ledger).encoder(emb, mask, train=False, category="encode_passages")
    assert ledger.categories == ["encode_passages"]
    assert ledger.flops("encode_passages") == pytest.approx(fwd)
    assert ledger.passages == B  # passages are counted for passage encoding only
    with torch.no_grad():
        assert fwd == pytest.approx(_counted(lambda: emb(**batch)), rel=0.02)


def test_encode_texts_charges_the_padded_batches_encode_runs(emb):
    lengths = emb.token_lengths(TEXTS)
    assert len(set(lengths)) > 1 and max(lengths) == emb.max_length  # different lengths, one truncated
    cfg = emb.model.config
    want = texts_forward_flops(cfg, lengths, 2)

    ledger = CostLedger()
    acc = Accountant(ledger)
    counted = _counted(lambda: emb.encode(TEXTS, batch_size=2))
    acc.encode_texts(emb, TEXTS, category="encode_questions", batch_size=2)
    assert ledger.flops("encode_questions") == pytest.approx(want)
    assert want == pytest.approx(counted, rel=0.02)
    # padding is charged: more than each text at its own length
    assert want > sum(transformer_forward_flops(cfg, n, n) for n in lengths)
    assert ledger.tokens == sum(lengths) and ledger.passages == 0
    # without batch_size: encode's default, the embedder's batch size (all four texts in one batch here)
    acc.encode_texts(emb, TEXTS, category="encode_passages")
    one_batch = transformer_forward_flops(cfg, len(TEXTS) * max(lengths), max(lengths))
    assert ledger.flops("encode_passages") == pytest.approx(one_batch) and ledger.passages == len(TEXTS)
    assert one_batch == pytest.approx(_counted(lambda: emb.encode(TEXTS)), rel=0.02)
    acc.encode_texts(emb, [], category="encode_passages")
    assert ledger.passages == len(TEXTS) and ledger.total_flops == pytest.approx(want + one_batch)


def test_phase_opens_a_ledger_phase(emb):
    ledger = CostLedger()
    acc = Accountant(ledger)
    with acc.phase("eval"):
        acc.encode_texts(emb, TEXTS[:2], category="encode_questions")
    assert ledger.phases == ["eval"]
    assert ledger.phase_totals("eval")["flops"] == ledger.total_flops > 0


# ---------------------------------------------------------------------------------------------- generator


def test_scoring_is_charged_once_at_the_padded_shape_with_the_head_on_the_answer(gen):
    prompts, answers = _prompts(gen), ["the fox", "no", "1999 river"]
    gen.tokens.reset()
    with torch.no_grad():
        counted = _counted(lambda: gen.answer_logprobs(prompts, answers))
        _, mask = gen.answer_logprobs(prompts, answers)
    counted *= 2
    (B, S, keep), (_, S2, keep2) = gen.tokens.scored_batches
    assert (S, keep) == (S2, keep2) and keep == mask.shape[1] + 1 < S
    padded = gen.tokens.scored_padded
    assert padded == 2 * B * S > gen.tokens.scored  # rows of different lengths: padding was computed too
    ledger = CostLedger()
    acc = Accountant(ledger)
    acc.generator(gen, lp_mask=mask, prompts=prompts, answers=answers, train=False)
    want = 2 * transformer_forward_flops(gen.config, B * S, S, lm_head_tokens=B * keep)
    assert ledger.categories == ["score"]
    assert ledger.flops("score") == pytest.approx(want)
    assert want == pytest.approx(counted, rel=0.02)
    assert ledger.tokens == padded
    assert (gen.tokens.scored_padded, gen.tokens.scored, gen.tokens.scored_batches) == (0, 0, [])  # consumed
    acc.generator(gen, lp_mask=mask, prompts=prompts, answers=answers, train=False)  # nothing new ran
    assert ledger.flops("score") == pytest.approx(want)
    # a frozen generator inside a retriever phase is a forward, charged to the category it is given
    with torch.no_grad():
        gen.answer_logprobs(prompts, answers)
    acc.generator(gen, lp_mask=mask, prompts=prompts, answers=answers, train=False, category="train")
    assert ledger.flops("train") == pytest.approx(want / 2)


def test_lora_training_step_charges_the_lora_formula_to_train(gen):
    targets = ["q_proj", "v_proj"]
    gen.add_lora(LoRAConfig(r=4, alpha=8, target_modules=targets))
    prompts, answers = _prompts(gen), ["the fox", "no", "1999 river"]
    gen.tokens.reset()

    def step():
        lp, mask = gen.answer_logprobs(prompts, answers)
        (-(lp * mask).sum()).backward()

    counted = _counted(step)
    [(B, S, keep)] = gen.tokens.scored_batches
    parts = forward_flops_breakdown(gen.config, B * S, S, lm_head_tokens=B * keep)
    want = train_flops(sum(parts.values()), "lora", lora_params=lora_param_count(gen.config, 4, targets),
                       tokens=B * S, attention_flops=parts["attention"])
    ledger = CostLedger()
    Accountant(ledger).generator(gen, lp_mask=None, prompts=prompts, answers=answers, train=True)
    assert ledger.categories == ["train"]
    assert ledger.flops("train") == pytest.approx(want)
    assert ledger.flops("train") > 2 * sum(parts.values())  # more than a frozen forward + input backward
    # within 10 %: the formula also charges the input-gradient of the first layer, which autograd skips
    assert want == pytest.approx(counted, rel=0.10)


def test_generation_is_charged_per_batch_at_its_padded_shape_and_steps(gen):
    prompts = _prompts(gen)
    widths = [len(x) for x in gen._tokenize_prompts(prompts)]
    assert len(set(widths)) > 1, "prompts of different lengths: the batch is padded"
    gen.tokens.reset()
    counted = _counted(lambda: gen.generate(prompts, max_new_tokens=4, batch_size=2))
    n_prompt, n_gen = gen.tokens.prompt, gen.tokens.generated
    assert n_prompt == sum(widths) and n_gen > 0
    batches = gen.tokens.generated_batches
    assert [(b.rows, b.prompt_width) for b in batches] == [(2, max(widths[:2])), (1, widths[2])]
    ledger = CostLedger()
    acc = Accountant(ledger)
    acc.generation(gen, prompts, ["x"] * len(prompts))
    want = sum(generate_flops(gen.config, b.prompt_width, b.new_tokens, batch=b.rows) for b in batches)
    assert ledger.categories == ["generate"]
    assert ledger.flops("generate") == pytest.approx(want)
    assert want == pytest.approx(counted, rel=0.02)
    assert ledger.tokens == n_prompt + n_gen
    assert gen.tokens.prompt == gen.tokens.generated == 0 and gen.tokens.generated_batches == []
    acc.generation(gen, prompts, ["x"] * len(prompts))  # counters consumed: nothing more to charge
    assert ledger.tokens == n_prompt + n_gen


@pytest.mark.parametrize("checkpointed,chunk", [(True, 0), (False, 2), (True, 2)])
def test_forwards_recomputed_by_checkpointing_are_charged_as_counted(gen, checkpointed, chunk):
    """Block checkpointing and checkpointed pair chunks run forwards again in the backward pass: the ledger
    charges them (executed FLOPs), within 10 % of the counter, and more than the same step without them."""
    targets = ["q_proj", "v_proj"]
    gen.add_lora(LoRAConfig(r=4, alpha=8, target_modules=targets))
    gen.set_gradient_checkpointing(checkpointed)
    gen.model.train()  # transformers checkpoints blocks only in training mode
    prompts, answers = _prompts(gen), ["the fox", "no", "1999 river"]
    gen.tokens.reset()

    def step():
        lp, mask = gen.answer_logprobs(prompts, answers, chunk=chunk)
        (-(lp * mask).sum()).backward()

    counted = _counted(step)
    ledger = CostLedger()
    Accountant(ledger).generator(gen, lp_mask=None, prompts=prompts, answers=answers, train=True,
                                 chunked=bool(chunk))
    plain = CostLedger()
    gen.tokens.reset()
    gen.set_gradient_checkpointing(False)
    gen.answer_logprobs(prompts, answers)
    Accountant(plain).generator(gen, lp_mask=None, prompts=prompts, answers=answers, train=True)
    assert ledger.flops("train") > 1.2 * plain.flops("train")
    assert ledger.flops("train") == pytest.approx(counted, rel=0.10)
