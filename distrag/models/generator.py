"""The answer generator: any Hugging Face causal LM (hub id, folder or GGUF file), prompts, greedy
decoding, LoRA adapters and differentiable answer scoring.

Two paths over the same prompt tokens:

* :meth:`Generator.generate` - batched greedy decoding with LEFT padding, returns short answers;
* :meth:`Generator.answer_logprobs` - one batched forward pass over prompt + answer (+ eos) returning
  ``log p(answer token t | prompt, answer tokens < t)`` per answer token: what every training loss
  (answer NLL, RAG-Sequence, RAG-Token) is built from.

Prompt format: the model's chat template with ``cfg.system_prompt`` as the system message and a user
message that lists the passages then the question (see :meth:`Generator.build_messages`). A tokenizer
without a chat template gets the plain format::

    {system prompt}

    Passages:
    [1] Title: text
    [2] ...

    Question: {question}
    Answer:

Every forward pass is counted in :attr:`Generator.tokens` for the cost ledger.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from distrag.atomic_io import follow_umask
from distrag.config import GeneratorConfig, LoRAConfig
from distrag.data.records import Passage
from distrag.errors import GeneratorError
from distrag.models.quantization import load_quantized, weight_count
from distrag.models.sources import MODEL_LOADS, pick_device, pick_dtype, resolve_model
from distrag.models.text_limits import check_answer_length, tokenize_within


class ScoredBatch(NamedTuple):
    """The shape of one ``answer_logprobs`` forward pass."""

    rows: int
    width: int
    """Padded positions per row (prompt + answer + eos)."""
    logit_positions: int
    """Positions per row whose logits (the LM head) were computed: the answer's, or all if it cannot say."""


class GeneratedBatch(NamedTuple):
    """The shape of one ``generate`` batch."""

    rows: int
    prompt_width: int
    """Padded (left) prompt length."""
    new_tokens: int
    """Tokens the batch ran for: prefill + decode steps, i.e. until its longest answer ended."""


@dataclass
class TokenCounts:
    """What the generator computed since the last :meth:`reset` (read and consumed by the cost ledger's
    accountant): token totals, and the padded shape of every forward pass."""

    prompt: int = 0
    """Real (non-padding) prompt tokens fed to ``generate``."""
    generated: int = 0
    """New tokens produced by ``generate`` (up to and including each row's eos)."""
    scored: int = 0
    """Real tokens (prompt + answer + eos) in ``answer_logprobs`` forward passes."""
    scored_padded: int = 0
    """Positions (padding included) in ``answer_logprobs`` forward passes: the compute actually spent."""
    scored_batches: list[ScoredBatch] = field(default_factory=list)
    """Each ``answer_logprobs`` call's shape."""
    generated_batches: list[GeneratedBatch] = field(default_factory=list)
    """Each ``generate`` batch's shape."""

    def reset(self) -> None:
        self.prompt = self.generated = self.scored = self.scored_padded = 0
        self.scored_batches = []
        self.generated_batches = []

    def as_dict(self) -> dict[str, int]:
        return {"prompt": self.prompt, "generated": self.generated, "scored": self.scored,
                "scored_padded": self.scored_padded}


def _passage_title_text(p) -> tuple[str, str]:
    if isinstance(p, Passage) or (hasattr(p, "title") and hasattr(p, "text")):
        return str(p.title or ""), str(p.text or "")
    if isinstance(p, str):
        return "", p
    raise TypeError(f"expected a Passage (or an object with title and text), got {type(p).__name__}")


class Generator:
    """A causal LM with a tokenizer set up for batched generation and scoring.

    ``model`` is the ``AutoModelForCausalLM`` (after :meth:`add_lora` it is the ``PeftModel``); its
    ``config`` carries the sizes the FLOP ledger needs.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, cfg: GeneratorConfig | None = None, *,
                 name: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg or GeneratorConfig()
        self.name = name or self.cfg.model
        self.tokens = TokenCounts()
        if tokenizer.eos_token_id is None:
            gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            if gen_eos is None:
                raise GeneratorError(f"{self.name}: neither the tokenizer nor the model defines an eos token; "
                                     f"answers could never end")
            tokenizer.eos_token_id = gen_eos if isinstance(gen_eos, int) else gen_eos[0]
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        check_answer_length(self.cfg.max_new_tokens, model.config, self.name, "generator.max_new_tokens")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: GeneratorConfig, device: str | torch.device | None = None) -> Generator:
        """Load ``cfg.model`` (hub id, folder, ``.gguf`` file or alias) on ``device``, in ``cfg.quantization``."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = resolve_model(cfg.model, gguf_file=cfg.gguf_file)
        dev = pick_device(device)
        dtype = pick_dtype(cfg.dtype, dev)
        kw = {"trust_remote_code": cfg.trust_remote_code}
        with MODEL_LOADS:  # transformers' loading is not thread-safe (sources.MODEL_LOADS)
            tok = AutoTokenizer.from_pretrained(source.path_or_id, gguf_file=source.gguf_file, **kw)
            model = (load_quantized(source, cfg, dtype, dev, **kw) if cfg.quantization != "none" else
                     AutoModelForCausalLM.from_pretrained(source.path_or_id, dtype=dtype, gguf_file=source.gguf_file,
                                                          **kw).to(dev))
        model.eval()
        return cls(model, tok, cfg, name=cfg.model)

    # ------------------------------------------------------------------ properties
    @property
    def config(self):
        """The base model's config (hidden_size, num_hidden_layers, intermediate_size, vocab_size...)."""
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def is_peft(self) -> bool:
        return hasattr(self.model, "peft_config")

    @property
    def eos_token_ids(self) -> list[int]:
        ids = [self.tokenizer.eos_token_id]
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for e in [gen_eos] if isinstance(gen_eos, int) else (gen_eos or []):
            if e not in ids:
                ids.append(e)
        return ids

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(weight_count(p) for p in self.model.parameters() if p.requires_grad or not trainable_only)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters with ``requires_grad`` (after :meth:`add_lora`: the adapters only)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ prompts
    def _passage_block(self, passages: Sequence[Passage]) -> str:
        lines = []
        for i, p in enumerate(passages, 1):
            title, text = _passage_title_text(p)
            text = " ".join(text.split())[: self.cfg.max_passage_chars].rstrip()
            lines.append(f"[{i}] {title}: {text}" if title else f"[{i}] {text}")
        return "Passages:\n" + "\n".join(lines) if lines else "Passages: (none)"

    def build_messages(self, question: str, passages: Sequence[Passage]) -> list[dict]:
        """Chat messages: the system prompt, then one user turn with numbered passages and the question.

        Each passage shows as ``[i] Title: text`` with whitespace collapsed and the text cut to
        ``cfg.max_passage_chars`` characters.
        """
        user = f"{self._passage_block(passages)}\n\nQuestion: {question.strip()}"
        msgs = [{"role": "user", "content": user}]
        if self.cfg.system_prompt:
            msgs.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        return msgs

    def build_prompt(self, question: str, passages: Sequence[Passage]) -> str:
        """The prompt string, ready for the assistant's answer (see the module docstring for formats)."""
        msgs = self.build_messages(question, passages)
        if self.has_chat_template:
            return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        system = f"{self.cfg.system_prompt}\n\n" if self.cfg.system_prompt else ""
        return f"{system}{msgs[-1]['content']}\nAnswer:"

    def _tokenize_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        # Chat-templated prompts hold their special tokens; the plain format lets the tokenizer add its own (BOS).
        limit = getattr(self.config, "max_position_embeddings", None)  # less the answer: the prompt's budget
        budget = limit - self.cfg.max_new_tokens if isinstance(limit, int) else None
        return tokenize_within(self.tokenizer, prompts, budget, add_special_tokens=not self.has_chat_template,
                               name=self.name)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[str], *, max_new_tokens: int | None = None,
                 batch_size: int | None = None, show_progress: bool = False,
                 synced_gpus: bool = False) -> list[str]:
        """Greedy answers for ``prompts`` (strings from :meth:`build_prompt`), in order.

        Batches are left-padded; each answer is decoded up to the first eos, stripped and cut at the
        first newline. ``synced_gpus=True`` is required under DeepSpeed ZeRO-3 (every rank must call).
        """
        rows = self.generate_ids(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 show_progress=show_progress, synced_gpus=synced_gpus)
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True) if rows else []
        return [t.strip().split("\n", 1)[0].strip() for t in texts]

    @torch.no_grad()
    def generate_ids(self, prompts: Sequence[str], *, max_new_tokens: int | None = None,
                     batch_size: int | None = None, show_progress: bool = False,
                     synced_gpus: bool = False) -> list[list[int]]:
        """Greedy new token ids per prompt, cut before the first eos (what :meth:`generate` decodes)."""
        from tqdm.auto import tqdm
        from transformers import GenerationConfig

        if isinstance(prompts, str):
            raise TypeError("expected a list of prompts, got a single string")
        prompts = list(prompts)
        if not prompts:
            return []
        bs = int(batch_size or self.cfg.batch_size)
        eos = self.eos_token_ids
        n_new = check_answer_length(int(max_new_tokens or self.cfg.max_new_tokens), self.config, self.name)
        gen_cfg = GenerationConfig(max_new_tokens=n_new, do_sample=False, num_beams=1, eos_token_id=eos,
                                   pad_token_id=self.tokenizer.pad_token_id)
        was_training = self.model.training
        self.model.eval()
        rows: list[list[int]] = []
        try:
            for start in tqdm(range(0, len(prompts), bs), total=math.ceil(len(prompts) / bs),
                              desc="generate", disable=not show_progress, leave=False):
                input_ids, attn = self._left_pad(self._tokenize_prompts(prompts[start:start + bs]))
                out = self.model.generate(input_ids=input_ids, attention_mask=attn, generation_config=gen_cfg,
                                          synced_gpus=synced_gpus)
                self.tokens.prompt += int(attn.sum())
                width = input_ids.shape[1]
                self.tokens.generated_batches.append(GeneratedBatch(len(attn), width, out.shape[1] - width))
                for row in out[:, width:].tolist():
                    cut = next((i for i, t in enumerate(row) if t in eos), None)
                    self.tokens.generated += len(row) if cut is None else cut + 1
                    rows.append(row if cut is None else row[:cut])
        finally:
            self.model.train(was_training)
        return rows

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
                attn[i, width - len(r):] = 1
        return ids.to(self.device), attn.to(self.device)

    # ------------------------------------------------------------------ scoring
    def answer_logprobs(self, prompts: Sequence[str], answers: Sequence[str], *,
                        chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable per-token log-probabilities of ``answers`` (each followed by eos) given ``prompts``.

        Returns ``(logprobs [B, T] float32, mask [B, T] bool)``, right-padded over answer tokens:
        ``logprobs[b, t] = log p(a_t | prompt_b, a_<t)``; zero where ``mask`` is False. Prompt tokens are
        never scored. One forward pass: prompts are left-padded to a common end column and answers
        right-padded after it, with position ids counted over real tokens, so each row equals its
        one-at-a-time result; logits are computed only for the answer positions.

        ``chunk`` > 0: ``chunk`` pairs per forward; with gradients on, each chunk is checkpointed (recomputed
        in the backward pass one chunk at a time): peak activations are one chunk's, results exact.
        """
        if isinstance(prompts, str) or isinstance(answers, str):
            raise TypeError("expected lists of prompts and answers")
        if len(prompts) != len(answers):
            raise GeneratorError(f"{len(prompts)} prompts but {len(answers)} answers")
        if not prompts:
            raise GeneratorError("answer_logprobs needs at least one (prompt, answer) pair")
        step = chunk if 0 < chunk < len(prompts) else len(prompts)
        checkpoint = step < len(prompts) and torch.is_grad_enabled()
        parts = [self._scored_chunk(prompts[i:i + step], answers[i:i + step], checkpoint=checkpoint)
                 for i in range(0, len(prompts), step)]
        if len(parts) == 1:
            return parts[0]
        width = max(lp.shape[1] for lp, _ in parts)
        lp = torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x, _ in parts])
        mask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1]), value=False) for _, m in parts])
        return lp, mask

    def _scored_chunk(self, prompts: Sequence[str], answers: Sequence[str], *,
                      checkpoint: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One ``answer_logprobs`` forward over ``prompts`` / ``answers``, recorded in :attr:`tokens`."""
        eos = self.tokenizer.eos_token_id
        p_ids = self._tokenize_prompts(prompts)
        a_ids = [list(x) + [eos] for x in
                 self.tokenizer([str(a).strip() for a in answers], add_special_tokens=False)["input_ids"]]
        B, P, T = len(p_ids), max(len(p) for p in p_ids), max(len(a) for a in a_ids)
        limit = getattr(self.config, "max_position_embeddings", None)
        longest = max(len(p) + len(a) for p, a in zip(p_ids, a_ids))
        if isinstance(limit, int) and longest > limit:
            raise GeneratorError(f"prompt + answer is {longest} tokens, over the model's limit of {limit}; "
                                 f"lower generator.max_passage_chars or retrieve fewer passages")
        ids = torch.full((B, P + T), self.tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros((B, P + T), dtype=torch.long)
        for i, (p, a) in enumerate(zip(p_ids, a_ids)):
            ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
            ids[i, P:P + len(a)] = torch.tensor(a, dtype=torch.long)
            attn[i, P - len(p):P + len(a)] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        keeps_logits = self._keeps_logits()
        self.tokens.scored += int(attn.sum())
        self.tokens.scored_padded += B * (P + T)
        self.tokens.scored_batches.append(ScoredBatch(B, P + T, T + 1 if keeps_logits else P + T))
        if checkpoint:
            from torch.utils.checkpoint import checkpoint as run_checkpointed

            lp = run_checkpointed(self._answer_forward, ids, attn, P, keeps_logits, use_reentrant=False)
        else:
            lp = self._answer_forward(ids, attn, P, keeps_logits)
        return lp, attn[:, P:].bool()

    def _answer_forward(self, ids: torch.Tensor, attn: torch.Tensor, P: int, keeps_logits: bool) -> torch.Tensor:
        """``[B, T]`` answer-token log-probs (0 on padding); records nothing (a checkpoint reruns it)."""
        T = ids.shape[1] - P
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        # Logits at columns P-1 .. P+T-2 predict the answer tokens at columns P .. P+T-1; models that
        # accept `logits_to_keep` compute the vocabulary projection for the last T + 1 columns only.
        keep = {"logits_to_keep": T + 1} if keeps_logits else {}
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False, **keep)
        logits = out.logits[:, :T] if keeps_logits else out.logits[:, P - 1:P + T - 1]
        targets = ids[:, P:]
        lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return torch.where(attn[:, P:].bool(), lp, torch.zeros_like(lp))

    def set_gradient_checkpointing(self, on: bool) -> None:
        """Per-block gradient checkpointing (non-reentrant) on or off; with it, the input embeddings' output
        requires grad, so LoRA adapters inside checkpointed blocks always get gradients."""
        base = self.model.get_base_model() if self.is_peft else self.model
        if on and getattr(base, "supports_gradient_checkpointing", False):
            if not getattr(base, "is_gradient_checkpointing", False):
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if not hasattr(base, "_require_grads_hook"):
                base.enable_input_require_grads()
        elif not on and getattr(base, "is_gradient_checkpointing", False):
            base.gradient_checkpointing_disable()
            if hasattr(base, "_require_grads_hook"):
                base.disable_input_require_grads()

    def _keeps_logits(self) -> bool:
        base = self.model.get_base_model() if self.is_peft else self.model
        return "logits_to_keep" in inspect.signature(base.forward).parameters

    def sequence_nll(self, prompts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """``-sum_t log p(a_t | ...)`` per pair ``[B]`` (answer tokens + eos), differentiable."""
        lp, mask = self.answer_logprobs(prompts, answers)
        return -(lp * mask).sum(-1)

    # ------------------------------------------------------------------ LoRA
    def add_lora(self, cfg: LoRAConfig | None = None) -> Generator:
        """Wrap the model with a peft LoRA adapter (task CAUSAL_LM); base weights are frozen."""
        from peft import LoraConfig, get_peft_model

        if self.is_peft:
            raise GeneratorError("the generator already has a LoRA adapter")
        cfg = cfg or self.cfg.lora
        names = {n.rsplit(".", 1)[-1] for n, _ in self.model.named_modules()}
        missing = [t for t in cfg.target_modules if t not in names]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in self.model.named_modules()
                             if isinstance(m, torch.nn.Linear)})
            raise GeneratorError(f"LoRA target modules {missing} are not in {self.name}; its linear layers "
                                 f"are {linear}")
        lcfg = LoraConfig(task_type="CAUSAL_LM", r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.target_modules))
        if getattr(self.model, "is_gradient_checkpointing", False):
            # Without this, checkpointed blocks see inputs that need no grad and LoRA trains nothing.
            self.model.enable_input_require_grads()
        self.model = get_peft_model(self.model, lcfg)
        return self

    def save_adapter(self, path: str | Path) -> Path:
        """Write the LoRA adapter (adapter_config.json + weights) to ``path``."""
        if not self.is_peft:
            raise GeneratorError("no LoRA adapter to save: call add_lora() first")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        return follow_umask(path)

    def load_adapter(self, path: str | Path, *, trainable: bool = True) -> Generator:
        """Load a LoRA adapter saved by :meth:`save_adapter` (wraps the model, or replaces its weights)."""
        from peft import PeftModel
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        path = Path(path)
        if not (path / "adapter_config.json").is_file():
            raise GeneratorError(f"{path} holds no LoRA adapter (adapter_config.json missing)")
        if self.is_peft:
            result = set_peft_model_state_dict(self.model, load_peft_weights(str(path), device=str(self.device)))
            bad = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
            if bad:
                raise GeneratorError(f"adapter at {path} does not fit this model: unexpected {bad[:3]}")
        else:
            with MODEL_LOADS:
                self.model = PeftModel.from_pretrained(self.model, str(path), is_trainable=trainable)
        return self
