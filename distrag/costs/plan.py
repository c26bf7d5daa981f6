"""``distrag plan``: what each strategy will cost before anyone spends GPU-hours on it.

For a target (generator and embedder: a Hugging Face id / folder, whose config is read without loading any
weights, or a size such as ``8b``; LoRA or QLoRA rank; corpus size; training questions; epochs; k; the
learning-rate grid m x n; GPU kind and count; MFU; index refresh interval) every strategy of the table
(:mod:`distrag.strategies`: its phases and its search shape) is projected to

* **FLOPs** of one training run and of its learning-rate search, from the ledger's own formulas
  (:mod:`distrag.costs.flops`, applied at the shapes the accountant charges: one prompt with k passages for
  the answer NLL, k one-passage prompts for the RAG losses, the question encoder trained in full or run
  forward, the passages trained on the passage side (MNRL's gold passages and hard negatives with
  ``embed_sides=both``, the k retrieved with ``rag_passage_grad``), corpus re-embeddings for index refreshes and
  for the deployed index);
* **wall-clock and device-hours**: FLOPs / (trainer GPUs x peak FLOP/s x MFU); the index ranks
  (``index_ranks`` GPUs, when a strategy refreshes the index) re-embed in the background and are charged for the
  whole run;
* **memory per device**: weights (bf16; with QLoRA the blocks' linear layers in NF4 as bitsandbytes stores
  them, embeddings, norms and an untied LM head in bf16), LoRA / encoder gradients and AdamW state
  (16 bytes per trainable parameter), activations of one forward (gradient checkpointing and pair chunks
  as configured; ``2 (10 h + 3 i)`` bytes per token and block, an estimate), the answer logits, and 1 GB
  of runtime;
* **index rank sizing**: the passages/s that re-embed the corpus within the staleness target (in trainer
  steps), against what one GPU encodes: the smallest pool of index ranks that keeps up (each takes a GPU from the
  trainers, whose steps then take longer), the recommended ``distributed.index_ranks``.

The default MFU (:data:`DEFAULT_MFU`) is calibrated on this project's measured runs
(``benchmarks/bench_memory.py``: the ledger's FLOPs of a real-model Ft-Gen step over its wall-clock, against
the machine's measured matmul peak); pass the MFU your hardware reaches (``--mfu``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from distrag.costs.flops import (
    ModelDims,
    forward_flops_breakdown,
    lora_param_count,
    recompute_flops,
    train_flops,
    transformer_forward_flops,
    transformer_train_flops,
)
from distrag.errors import ConfigError
from distrag.strategies import STRATEGIES, Phase, Strategy

__all__ = ["DEFAULT_MFU", "GPUS", "KNOWN_MODELS", "SIZES", "GPU", "Plan", "PlanRow", "PlanTarget", "encoder_flops",
           "generator_flops", "known_shape", "model_shape", "plan"]

DEFAULT_MFU = 0.48
"""Model-FLOPs utilisation assumed when none is given, calibrated on this project's measured runs
(``benchmarks/bench_memory.py``, 2 CPU threads, SmolLM2-135M + MiniLM, HotPotQA sample, 8 questions x k=3,
gradient checkpointing on): a real-model Ft-Gen step ran 4.70 GFLOP/s of the ledger's model FLOPs against a
float32 matmul peak of 9.8 GFLOP/s measured in the same run (a machine shared by many jobs, load 24 on 2
cores), MFU 0.48 (RAG-Seq with pair chunks: 0.39). That was measured before the ledger charged the forwards
that checkpointing recomputes; the same step now charges about 1.3x those FLOPs, so against today's ledger the
utilisation was about 0.64 and 0.48 errs towards longer projected wall-clock. GPU runs of LoRA fine-tuning
commonly report 0.3-0.5: pass yours with ``--mfu``."""

RUNTIME_BYTES = 1e9
"""Per-device memory the framework takes whatever the model (CUDA context, allocator slack): an estimate."""

NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
"""QLoRA (``generator.quantization=nf4``, double quantisation): 4 bits a weight, one 8-bit absmax per block of
64 weights and one float32 scale per 256 of those (``tests/models/test_quantization.py`` measures it)."""
NF4_LAYER_BYTES = 16 * 4 + 4 + 256 * 4
"""What bitsandbytes keeps per NF4 layer whatever its size: the 16-value NF4 code, the double quantisation's
offset and its 256-value 8-bit code (float32 each): 1.1 KB, which matters only for tiny models."""


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float
    """Dense bf16 tensor-core FLOP/s (no sparsity)."""
    memory_gb: float


GPUS: dict[str, GPU] = {g.name.lower(): g for g in (
    GPU("A10", 125e12, 24), GPU("L4", 121e12, 24), GPU("A100", 312e12, 80), GPU("H100", 989e12, 80),
    GPU("H200", 989e12, 141))}
"""Datasheet peaks (dense bf16) and memory of the GPUs ``--gpu`` knows."""

_LLAMA = {"model_type": "llama", "hidden_act": "silu"}
SIZES: dict[str, dict[str, Any]] = {
    # generators (Llama-family shapes: SmolLM2-135M, Llama-3.2-1B/3B, Llama-3.1-8B/70B)
    "135m": {**_LLAMA, "hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
             "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True},
    "1b": {**_LLAMA, "hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True},
    "3b": {**_LLAMA, "hidden_size": 3072, "num_hidden_layers": 28, "intermediate_size": 8192,
           "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True},
    "8b": {**_LLAMA, "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False},
    "70b": {**_LLAMA, "hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672,
            "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False},
    # embedders (BERT shapes: all-MiniLM-L6-v2, BERT-base / bge-base, BERT-large / bge-large)
    "22m": {"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6, "intermediate_size": 1536,
            "num_attention_heads": 12, "vocab_size": 30522},
    "110m": {"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 3072,
             "num_attention_heads": 12, "vocab_size": 30522},
    "335m": {"model_type": "bert", "hidden_size": 1024, "num_hidden_layers": 24, "intermediate_size": 4096,
             "num_attention_heads": 16, "vocab_size": 30522},
}
"""Model shapes ``--generator`` / ``--embedder`` accept by size."""


KNOWN_MODELS: dict[str, dict[str, Any]] = {
    # generators: the Llama-3.1-8B shape is the 8b size exactly; Qwen2.5-7B and Mistral-7B-v0.3 differ from it
    # (their config.json files' shapes, written out; Qwen2's q/k/v biases are left out, as the FLOP formulas do)
    "meta-llama/llama-3.1-8b": SIZES["8b"],
    "meta-llama/llama-3.1-8b-instruct": SIZES["8b"],
    "meta-llama/meta-llama-3.1-8b": SIZES["8b"],
    "meta-llama/meta-llama-3.1-8b-instruct": SIZES["8b"],
    "qwen/qwen2.5-7b-instruct": {"model_type": "qwen2", "hidden_act": "silu", "hidden_size": 3584,
                                 "num_hidden_layers": 28, "intermediate_size": 18944, "num_attention_heads": 28,
                                 "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False},
    "mistralai/mistral-7b-instruct-v0.3": {"model_type": "mistral", "hidden_act": "silu", "hidden_size": 4096,
                                           "num_hidden_layers": 32, "intermediate_size": 14336,
                                           "num_attention_heads": 32, "num_key_value_heads": 8,
                                           "vocab_size": 32768, "tie_word_embeddings": False},
    # embedders: BERT-base shapes (bge-base and e5-base are BERT-base; all-mpnet-base-v2 is MPNet-base, the same
    # dimensions with 30,527 tokens) and MiniLM-L6 (the 22m size)
    "baai/bge-base-en-v1.5": SIZES["110m"],
    "intfloat/e5-base-v2": SIZES["110m"],
    "sentence-transformers/all-mpnet-base-v2": {**SIZES["110m"], "model_type": "mpnet", "vocab_size": 30527},
    "sentence-transformers/all-minilm-l6-v2": SIZES["22m"],
}
"""Hub ids whose shapes the plan knows without their config file (keys lower case; an id is also known without
its organisation, e.g. ``bge-base-en-v1.5``): ``distrag plan --config`` projects these offline, nothing
downloaded."""

_KNOWN_BY_NAME = {key.split("/", 1)[1]: cfg for key, cfg in KNOWN_MODELS.items()}


def known_shape(spec: str) -> dict[str, Any] | None:
    """The config-like shape of a size (``8b``) or of a hub id in :data:`KNOWN_MODELS`; None for anything else."""
    key = spec.strip().lower()
    return SIZES.get(key) or KNOWN_MODELS.get(key) or _KNOWN_BY_NAME.get(key)


@dataclass(frozen=True)
class ModelShape:
    """A model's dimensions and parameter count (embeddings and an untied LM head included)."""

    dims: ModelDims
    params: int


_ROLE_FLAGS = {"generator": ("--generator", "135m, 1b, 3b, 8b, 70b", "8b"),
               "embedder": ("--embedder", "22m, 110m, 335m", "110m")}


def model_shape(spec: str, role: str | None = None) -> ModelShape:
    """The shape of a size in :data:`SIZES` (``8b``), of a hub id in :data:`KNOWN_MODELS` (no file read), or of a
    model folder / ``.gguf`` file / cached or reachable hub id (its config read, no weights loaded). ``role``
    (``generator`` / ``embedder``) names the config field and the size flag in the error for a model that is none
    of these."""
    cfg: Any = known_shape(spec)
    if cfg is None:
        from transformers import AutoConfig

        from distrag.models.sources import resolve_model

        try:
            source = resolve_model(spec)
            kw = {"gguf_file": source.gguf_file} if source.gguf_file else {}
            cfg = AutoConfig.from_pretrained(source.path_or_id, **kw)
        except Exception as e:  # noqa: BLE001 - any failure to find the model is the user's to fix
            why = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            if role in _ROLE_FLAGS:
                flag, sizes, example = _ROLE_FLAGS[role]
                raise ConfigError([(f"{role}.model", f"{spec!r}: the plan needs its shape, and it is not a size "
                                                     f"({', '.join(SIZES)}), not a hub id the plan knows "
                                                     f"(distrag.costs.plan.KNOWN_MODELS) and has no readable "
                                                     f"config here ({why}); give its size instead, e.g. "
                                                     f"`distrag plan --config ... {flag} {example}` "
                                                     f"({flag} takes {sizes}), or a local model folder")]) from None
            raise ConfigError([("plan", f"{spec!r}: not a known size ({', '.join(SIZES)}) nor a model: {why}")]) \
                from None
    dims = ModelDims.from_config(cfg)
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    embed = dims.vocab * dims.hidden
    head = dims.head_params if dims.lm_head and not get("tie_word_embeddings", True) else 0
    return ModelShape(dims, dims.dense_params + embed + head)


# ----------------------------------------------------------------------------------------------
# FLOPs at the shapes the accountant charges


def encoder_flops(dims: ModelDims, tokens: int, *, train: bool) -> float:
    """One question of ``tokens`` through the encoder: trained in full (3x forward) or forward only."""
    return (transformer_train_flops(dims, tokens, tokens, "full") if train
            else transformer_forward_flops(dims, tokens, tokens))


def generator_flops(dims: ModelDims, rows: int, prompt_tokens: int, answer_tokens: int, *, lora_params: int,
                    train: bool, blocks_checkpointed: bool = False, chunked: bool = False) -> float:
    """One ``answer_logprobs`` batch of ``rows`` prompts padded to ``prompt_tokens`` with answers (eos
    included) of ``answer_tokens``, as the accountant charges it: logits on the answer columns + 1, LoRA
    training (``2 F + F_attn + 6 P_lora n``, plus the forwards that checkpointing recomputes) or a forward with
    the adapters."""
    width = prompt_tokens + answer_tokens
    parts = forward_flops_breakdown(dims, rows * width, width, lm_head_tokens=rows * (answer_tokens + 1))
    flops = train_flops(sum(parts.values()), "lora" if train else "inference", lora_params=lora_params,
                        tokens=rows * width, attention_flops=parts["attention"])
    if train:
        flops += recompute_flops(parts, lora_params=lora_params, tokens=rows * width,
                                 blocks_checkpointed=blocks_checkpointed, chunked=chunked)
    return flops


@dataclass(frozen=True)
class PlanTarget:
    """What to project (defaults: the project's models on a small corpus; see ``distrag plan --help``)."""

    generator: str = "SmolLM2-135M-Instruct-GGUF"
    embedder: str = "all-MiniLM-L6-v2"
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    qlora: bool = False
    corpus: int = 100_000
    questions: int = 10_000
    epochs: float = 1.0
    k: int = 5
    batch_size: int = 8
    """Questions per optimizer step (all trainers together)."""
    grid: tuple[int, int] = (2, 2)
    """Learning rates searched: (m embedder rates, n generator rates)."""
    gpu: str = "A100"
    n_gpus: int = 1
    mfu: float = DEFAULT_MFU
    refresh_every: int = 0
    """Trainer steps between index refreshes in phases that train the encoder (0: frozen passage vectors)."""
    index_ranks: int = 1
    """GPUs of the job that re-embed the corpus when it is refreshed (``distributed.index_ranks``)."""
    staleness: int | None = None
    """Index staleness target in trainer steps (default: ``refresh_every``)."""
    question_tokens: int = 24
    passage_tokens: int = 160
    answer_tokens: int = 8
    """Answer tokens with the eos."""
    prompt_tokens: int = 60
    """Chat template and system prompt around the question and passages."""
    gradient_checkpointing: bool = True
    pair_micro_batch: int = 0
    embed_sides: str = "both"
    """MNRL's ``train.embed_sides``: ``both`` trains the encoder on each question's gold passage (and hard
    negatives) too, ``question`` on the question alone."""
    hard_negatives: int = 0
    rag_passage_grad: bool = False
    """``train.rag_passage_grad``: RAG phases that train the encoder re-encode the k retrieved passages with
    gradient."""


@dataclass
class PlanRow:
    """One strategy's projection."""

    label: str
    runs: int
    """Training runs of its learning-rate search (the strategy table's grid shape)."""
    train_flops: float
    """One training run (re-embedding for the deployed index included)."""
    search_flops: float
    wall_h: float
    """Wall-clock of the search, hours."""
    device_hours: float
    memory_gb: float
    """Peak memory per trainer device, GB."""
    memory_parts: dict[str, float] = field(default_factory=dict)
    fits: bool = True


@dataclass
class Plan:
    target: PlanTarget
    gpu: GPU
    rows: list[PlanRow]
    step_s: float
    """Seconds per training step of a joint (RAG) phase, the phase the index rank races."""
    passages_per_s_needed: float
    """At ``index_ranks`` index GPUs (the target's): the corpus re-embedded once per staleness target."""
    passages_per_s_per_gpu: float
    index_gpus: int
    """The recommended ``distributed.index_ranks``: the fewest index GPUs that re-embed the corpus within the staleness
    target while the other GPUs of the job train (fewer trainers: slower steps, more time per version)."""
    index_memory_gb: float


class _Projector:
    def __init__(self, t: PlanTarget):
        if t.n_gpus < 1 or not 0 < t.mfu <= 1 or t.batch_size < 1 or t.k < 1 or t.index_ranks < 1:
            raise ConfigError([("plan", "need gpus >= 1, 0 < mfu <= 1, batch size >= 1, k >= 1 and index ranks >= 1")])
        if t.embed_sides not in ("both", "question") or t.hard_negatives < 0:
            raise ConfigError([("plan", f"embed_sides is 'both' or 'question' (got {t.embed_sides!r}) and "
                                        f"hard_negatives >= 0")])
        gpu = GPUS.get(t.gpu.lower())
        if gpu is None:
            raise ConfigError([("plan", f"unknown GPU {t.gpu!r}; known: {', '.join(g.name for g in GPUS.values())}")])
        self.t, self.gpu = t, gpu
        self.g, self.e = model_shape(t.generator, "generator"), model_shape(t.embedder, "embedder")
        self.lora = lora_param_count(self.g.dims, t.lora_r, list(t.lora_targets))
        self.steps = max(1, math.ceil(t.epochs * t.questions / t.batch_size))

    def shapes(self, phase: Phase) -> tuple[int, int]:
        """(rows per question, padded prompt tokens) of the generator's batch in ``phase``, as its loss feeds the
        generator (the strategy table's ``Loss.generator_prompts``): k one-passage prompts, or one with all k."""
        t = self.t
        if phase.spec.generator_prompts == "per_passage":
            return t.k, t.prompt_tokens + t.question_tokens + t.passage_tokens
        return 1, t.prompt_tokens + t.question_tokens + t.k * t.passage_tokens

    @staticmethod
    def runs_generator(phase: Phase) -> bool:
        """Whether ``phase``'s loss runs the generator at all (MNRL does not)."""
        return phase.spec.generator_prompts != "none"

    def trained_passages(self, phase: Phase) -> int:
        """Passages per question encoded with gradient in ``phase`` (the loss's ``passage_side``, switched on by
        ``embed_sides`` / ``rag_passage_grad``): the passage side of the shared encoder training."""
        t, side = self.t, phase.spec.passage_side
        if not phase.train_embedder:
            return 0
        if side == "gold" and t.embed_sides == "both":
            return 1 + (t.hard_negatives if phase.spec.takes_hard_negatives else 0)
        return t.k if side == "retrieved" and t.rag_passage_grad else 0

    def chunked(self, phase: Phase) -> bool:
        """Whether ``phase``'s pairs run in checkpointed chunks (``train.pair_micro_batch``, per-passage prompts)."""
        return phase.spec.generator_prompts == "per_passage" and bool(self.t.pair_micro_batch)

    def question_flops(self, phase: Phase) -> float:
        """FLOPs of one training question in ``phase`` (what the accountant charges to ``train``)."""
        t = self.t
        flops = encoder_flops(self.e.dims, t.question_tokens, train=phase.train_embedder)
        flops += self.trained_passages(phase) * encoder_flops(self.e.dims, t.passage_tokens, train=True)
        if not self.runs_generator(phase):
            return flops
        rows, prompt = self.shapes(phase)
        return flops + generator_flops(self.g.dims, rows, prompt, t.answer_tokens, lora_params=self.lora,
                                       train=phase.train_generator, blocks_checkpointed=t.gradient_checkpointing,
                                       chunked=self.chunked(phase))

    def corpus_flops(self) -> float:
        t = self.t
        return transformer_forward_flops(self.e.dims, t.corpus * t.passage_tokens, t.passage_tokens)

    def phase_flops(self, phase: Phase) -> float:
        return sum(self.phase_parts(phase))

    def phase_parts(self, phase: Phase) -> tuple[float, float]:
        """(training FLOPs, index-refresh FLOPs) of ``phase``."""
        refreshes = (self.steps - 1) // self.t.refresh_every if self.t.refresh_every and phase.train_embedder else 0
        return self.steps * self.t.batch_size * self.question_flops(phase), refreshes * self.corpus_flops()

    def phase_wall_s(self, phase: Phase) -> float:
        """The trainers' time; refreshes run on the index ranks meanwhile, at their GPUs' combined rate (a second
        process when there is only one GPU: they add up)."""
        train, refresh = self.phase_parts(phase)
        trainers = self.trainers(phase)
        if trainers < self.t.n_gpus:
            return max(train / self.rate(trainers), refresh / self.rate(self.t.n_gpus - trainers))
        return (train + refresh) / self.rate(self.t.n_gpus)

    def memory(self, phase: Phase) -> dict[str, float]:
        """Bytes per trainer device in ``phase`` (the module docstring's terms)."""
        t, g, e = self.t, self.g.dims, self.e.dims
        trainers = self.trainers(phase)
        per_device = math.ceil(t.batch_size / trainers)
        out = {"generator weights": self.generator_weight_bytes(),
               "embedder": self.e.params * (16.0 if phase.train_embedder else 2.0),
               "lora + optimizer": self.lora * 16.0 if phase.train_generator else 0.0,
               "runtime": RUNTIME_BYTES}
        block = 2.0 * (10 * g.hidden + 3 * g.intermediate)  # bytes per token and block, all saved activations
        if self.runs_generator(phase):
            rows, prompt = self.shapes(phase)
            rows *= per_device
            width = prompt + t.answer_tokens
            chunk = min(rows, t.pair_micro_batch) if self.chunked(phase) else rows
            if phase.train_generator:
                held = chunk * width  # checkpointed pair chunks: one chunk's activations at a time
                per_token = (g.layers * 2.0 * g.hidden + block) if t.gradient_checkpointing else g.layers * block
                out["activations"] = held * per_token
            else:
                out["activations"] = chunk * width * block  # a forward keeps one block's activations
            out["logits"] = 2 * 4.0 * chunk * (t.answer_tokens + 1) * g.vocab
        if phase.train_embedder:
            tokens = t.question_tokens + self.trained_passages(phase) * t.passage_tokens
            out["activations"] = out.get("activations", 0.0) + per_device * tokens * e.layers * 2 * (
                10 * e.hidden + 3 * e.intermediate)
        return out

    def generator_weight_bytes(self) -> float:
        """The generator's base weights: bf16; with QLoRA, the blocks' linear layers in NF4 (what bitsandbytes
        quantises) and the rest in bf16 (what transformers leaves unquantised: embeddings, norms, the LM head)."""
        g = self.g
        if not self.t.qlora:
            return g.params * 2.0
        linears = g.dims.layers * (7 if g.dims.gated_mlp else 6)  # q, k, v, o + gate, up, down (or up, down)
        dense = g.dims.dense_params
        return dense * NF4_BYTES_PER_WEIGHT + linears * NF4_LAYER_BYTES + (g.params - dense) * 2.0

    def trainers(self, phase: Phase, index_ranks: int | None = None) -> int:
        """Trainer GPUs in ``phase``: the job's, less ``index_ranks`` (default: the target's) when it refreshes."""
        n = self.t.index_ranks if index_ranks is None else index_ranks
        index_rank = self.t.refresh_every and phase.train_embedder and self.t.n_gpus > n
        return self.t.n_gpus - n if index_rank else self.t.n_gpus

    def rate(self, n: int) -> float:
        return n * self.gpu.peak_flops * self.t.mfu

    def row(self, s: Strategy) -> PlanRow:
        t = self.t
        m, n = t.grid
        phases = s.phases()
        reembed = self.corpus_flops() if s.trains_embedder else 0.0
        per_phase = [(p, self.phase_flops(p)) for p in phases]
        run_flops = sum(f for _, f in per_phase) + reembed
        wall_s = sum(self.phase_wall_s(p) for p in phases) + reembed / self.rate(t.n_gpus)
        if s.search == "grid":
            counts = [m * n] * len(phases)
            search_flops, search_wall = m * n * run_flops, m * n * wall_s
        else:
            counts = [m if p.train_embedder else n for p in phases] if phases else []
            search_flops = sum(c * f for c, (_, f) in zip(counts, per_phase)) + (m * reembed if reembed else 0.0)
            search_wall = sum(c * self.phase_wall_s(p) for c, p in zip(counts, phases))
            search_wall += m * reembed / self.rate(t.n_gpus) if reembed else 0.0
        if not phases:  # No-FT: nothing trains; the index is built once
            run_flops = search_flops = 0.0
            search_wall = 0.0
        mem = max((self.memory(p) for p in phases), key=lambda d: sum(d.values()),
                  default=self.memory(Phase("eval", False, False, "nll")))
        gb = sum(mem.values()) / 1e9
        return PlanRow(s.label, s.grid_size(m, n), run_flops, search_flops, search_wall / 3600,
                       search_wall * t.n_gpus / 3600, gb, {k: v / 1e9 for k, v in mem.items()},
                       gb <= self.gpu.memory_gb)


def plan(target: PlanTarget) -> Plan:
    """Project every strategy of the table for ``target`` (module docstring)."""
    p = _Projector(target)
    t = target
    rows = [p.row(s) for s in STRATEGIES]
    # the phase the index rank races: one that trains the encoder and the generator at once (joint)
    joint = next(ph for s in STRATEGIES for ph in s.phases() if ph.train_embedder and ph.train_generator)
    staleness = t.staleness or t.refresh_every or 1
    per_gpu = p.rate(1) / (p.corpus_flops() / t.corpus)

    def needed(index_ranks: int | None = None) -> tuple[float, float]:
        """(seconds per joint step, passages/s that re-embed the corpus within the target) at ``index_ranks``."""
        step = t.batch_size * p.question_flops(joint) / p.rate(p.trainers(replace(joint), index_ranks))
        return step, t.corpus / (staleness * step)

    step_s, rate = needed()
    pool = next((n for n in range(1, t.n_gpus) if n * per_gpu >= needed(n)[1]), None)
    if pool is None:  # no split of this job keeps up: as many as the rate asks with the target's trainers
        pool = max(1, math.ceil(rate / per_gpu))
    return Plan(t, p.gpu, rows, step_s, rate, per_gpu, pool, t.corpus * p.e.dims.hidden * 4 / 1e9)
