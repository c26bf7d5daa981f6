r"""Cost ledger: FLOP estimates from model dimensions, wall-clock phases, and MLflow-ready totals.

Every run records what it cost, so strategies can be compared at equal compute.

FLOP formulas (one multiply-add = 2 FLOPs; dense transformer blocks; matmuls only)
---------------------------------------------------------------------------------
Dimensions read from a Hugging Face config (:class:`ModelDims`): ``h`` hidden size, ``L`` layers, ``i``
intermediate (MLP) size, ``n_q`` attention heads, ``n_kv`` key/value heads, ``d_h`` head dim
(``h / n_q`` unless the config says otherwise), ``V`` vocabulary; ``a = n_q d_h``, ``kv = n_kv d_h``.

Dense matmul parameters touched per token::

    N_attn  = h a (Q) + 2 h kv (K, V) + a h (O)
    N_mlp   = 3 h i   gated MLP (Llama: gate, up, down)      or   2 h i (BERT, GPT-2: up, down)
    N_dense = L (N_attn + N_mlp)
    N_head  = h V     causal LMs only (the LM head; tied or not it is a matmul); encoders: 0

Forward pass over ``n`` tokens in sequences of length ``s`` (:func:`transformer_forward_flops`)::

    F_fwd = 2 N_dense n  +  4 L s a n  +  2 N_head n_head

* ``4 L s a`` per token is the attention itself: ``Q K^T`` (2 s a) and ``softmax(.) V`` (2 s a) per layer.
  We count the full ``s x s`` score matrix, causal or not (no halving for the causal mask). That is
  what ``torch.utils.flop_counter.FlopCounterMode`` counts for SDPA and for eager attention, what
  padded dense kernels compute, and the usual convention (Kaplan et al. 2020, Chinchilla); for a causal
  model the useful work is about half of this term.
* ``n_head`` = tokens whose logits are computed: all ``n`` in training, one per sequence in a
  generation prefill.
* Not counted: embeddings lookups, norms, activations, softmax, residual adds, biases, RoPE (all
  O(h) per token against O(h^2)); BERT's pooler (``2 h^2`` per *sequence*; sentence embedders pool
  without it); MoE routing (dense models only).

Training step, from the forward FLOPs ``F`` of the *base* model and its attention part
``F_attn = 4 L s a n`` (:func:`train_flops`, :func:`transformer_train_flops`)::

    full               3 F                         forward + backward w.r.t. activations + w.r.t. weights
    lora               2 F + F_attn + 6 P_lora n   frozen base: forward + backward w.r.t. activations only;
                                                   adapters (P_lora parameters, ``r (d_in + d_out)`` each):
                                                   2 FLOPs in forward, 4 in backward, per parameter and token
    frozen_input_grad  2 F + F_attn                frozen model that gradients must flow *through* (to
                                                   something trainable below it), no weight gradients
    inference          F                           no backward

A weight matmul's backward is two matmuls of its forward size (``dX`` and ``dW``); a frozen one needs
only ``dX``. The attention matmuls ``Q K^T`` and ``P V`` have activations on *both* sides, so even with
every weight frozen their backward needs both operand gradients: ``2 F_attn``. Hence ``+ F_attn`` for
``lora`` and ``frozen_input_grad`` (``full`` is ``3 F`` for every matmul alike). Without the
``F_attn`` term LoRA steps at long context are under-estimated by about a third of the attention share
(-11 % measured at h=256, L=4, s=512). For LoRA the input-gradient of the layers *below* the first adapter
is not actually needed (autograd skips e.g. the layer-0 Q/K/V base matmuls when only attention is
adapted), so the formula is a slight over-estimate there (a few % on 2-layer models, less on deep ones).

Generation with a KV cache (:func:`generate_flops`), batch ``b``, prompt ``P`` (padded length), ``G`` new
tokens: the prefill produces token 1; tokens 2..G need one decode step each, whose single new token
attends over the cache of length ``P + j``::

    F_gen = F_fwd(n = b P, s = P, n_head = b)
          + sum_{j=1}^{G-1} b [ 2 N_dense + 4 L a (P + j) + 2 N_head ]

These formulas match ``FlopCounterMode`` to < 1 % on the tiny test models when attention runs as
matmuls (``attn_implementation="eager"``); see ``tests/test_ledger.py`` for the measured ratios.

Ledger
------
:class:`CostLedger` tallies FLOPs, tokens and passages per category (``train``, ``encode_questions``,
``encode_passages``, ``generate``, or any other valid name) and per phase, times phases with
``time.perf_counter``, and flattens everything into MLflow-safe metric names (:meth:`CostLedger.to_metrics`).
"""

from __future__ import annotations

import math
import posixpath
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "STANDARD_CATEGORIES",
    "CostLedger",
    "ModelDims",
    "forward_flops_breakdown",
    "generate_flops",
    "lora_param_count",
    "train_flops",
    "transformer_forward_flops",
    "transformer_train_flops",
    "validate_metric_name",
]

# Model types whose MLP has three matrices (gate, up, down). Unknown types fall back to the activation:
# "silu" configs are Llama-style gated MLPs.
_GATED_MLP_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3",
    "gemma3_text", "phi3", "olmo", "olmo2", "granite", "smollm3", "cohere", "internlm2", "deepseek_v2",
    "deepseek_v3", "exaone", "helium", "glm", "glm4",
})
# Model types without an LM head in our use (embedding encoders); anything else is read as a causal LM.
_ENCODER_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "deberta", "deberta-v2", "albert",
    "camembert", "modernbert", "nomic_bert", "new", "xlm", "ernie",
})


def _read(cfg: Any, names: tuple[str, ...], default: Any = None) -> Any:
    for name in names:
        value = cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)
        if value is not None:
            return value
    return default


@dataclass(frozen=True)
class ModelDims:
    """The dimensions the FLOP formulas need (see the module docstring for the symbols)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated_mlp: bool
    lm_head: bool

    @classmethod
    def from_config(cls, cfg_like: Any, *, gated_mlp: bool | None = None,
                    lm_head: bool | None = None) -> ModelDims:
        """Read a ``PretrainedConfig`` (BERT, Llama, GPT-2 names...), a model (its ``.config``), a dict,
        or a ``ModelDims`` (returned, with ``gated_mlp``/``lm_head`` overridden when given).

        ``gated_mlp`` defaults to True for Llama-family model types (and unknown types with ``silu``);
        ``lm_head`` defaults to False for encoder model types (BERT, RoBERTa, MPNet, ...), else True.
        """
        if isinstance(cfg_like, ModelDims):
            dims = cfg_like
            changes = {}
            if gated_mlp is not None:
                changes["gated_mlp"] = gated_mlp
            if lm_head is not None:
                changes["lm_head"] = lm_head
            return dims if not changes else ModelDims(**{**dims.__dict__, **changes})
        cfg = cfg_like
        if not isinstance(cfg, Mapping) and not hasattr(cfg, "hidden_size") and hasattr(cfg, "config"):
            cfg = cfg.config  # a model
        if hasattr(cfg, "get_text_config"):
            cfg = cfg.get_text_config()
        hidden = _read(cfg, ("hidden_size", "n_embd", "d_model"))
        layers = _read(cfg, ("num_hidden_layers", "n_layer", "num_layers"))
        heads = _read(cfg, ("num_attention_heads", "n_head", "num_heads"))
        vocab = _read(cfg, ("vocab_size",))
        missing = [n for n, v in (("hidden_size", hidden), ("num_hidden_layers", layers),
                                  ("num_attention_heads", heads), ("vocab_size", vocab)) if v is None]
        if missing:
            raise ValueError(f"config lacks {', '.join(missing)} (cannot estimate FLOPs)")
        kv_heads = _read(cfg, ("num_key_value_heads", "n_kv_heads"), heads)
        head_dim = _read(cfg, ("head_dim",), hidden // heads)
        intermediate = _read(cfg, ("intermediate_size", "n_inner", "ffn_dim"), 4 * hidden)
        model_type = str(_read(cfg, ("model_type",), "") or "")
        act = str(_read(cfg, ("hidden_act", "activation_function"), "") or "")
        if gated_mlp is None:
            gated_mlp = model_type in _GATED_MLP_TYPES or (
                model_type not in _ENCODER_TYPES and model_type != "gpt2" and act == "silu")
        if lm_head is None:
            lm_head = model_type not in _ENCODER_TYPES
        return cls(hidden=int(hidden), layers=int(layers), intermediate=int(intermediate), heads=int(heads),
                   kv_heads=int(kv_heads), head_dim=int(head_dim), vocab=int(vocab), gated_mlp=bool(gated_mlp),
                   lm_head=bool(lm_head))

    @property
    def attn_dim(self) -> int:
        """``a = n_q d_h`` (query/output width)."""
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """``kv = n_kv d_h`` (key/value width)."""
        return self.kv_heads * self.head_dim

    @property
    def dense_params_per_layer(self) -> int:
        """``N_attn + N_mlp``."""
        n_attn = self.hidden * self.attn_dim + 2 * self.hidden * self.kv_dim + self.attn_dim * self.hidden
        n_mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        return n_attn + n_mlp

    @property
    def dense_params(self) -> int:
        """``N_dense = L (N_attn + N_mlp)``."""
        return self.layers * self.dense_params_per_layer

    @property
    def head_params(self) -> int:
        """``N_head = h V`` for causal LMs, 0 for encoders."""
        return self.hidden * self.vocab if self.lm_head else 0

    def token_flops(self, context: int) -> float:
        """Forward FLOPs of one token attending over ``context`` keys, LM head included."""
        return 2.0 * self.dense_params + 4.0 * self.layers * context * self.attn_dim + 2.0 * self.head_params


def forward_flops_breakdown(cfg_like: Any, n_tokens: int, seq_len: int, *, lm_head_tokens: int | None = None,
                            gated_mlp: bool | None = None, lm_head: bool | None = None) -> dict[str, float]:
    """The three terms of ``F_fwd``: ``{"dense": 2 N_dense n, "attention": 4 L s a n, "head": 2 N_head n_head}``.

    Arguments as in :func:`transformer_forward_flops`.
    """
    if n_tokens < 0 or seq_len < 0:
        raise ValueError("n_tokens and seq_len must be >= 0")
    d = ModelDims.from_config(cfg_like, gated_mlp=gated_mlp, lm_head=lm_head)
    head_tokens = n_tokens if lm_head_tokens is None else lm_head_tokens
    return {"dense": 2.0 * d.dense_params * n_tokens,
            "attention": 4.0 * d.layers * seq_len * d.attn_dim * n_tokens,
            "head": 2.0 * d.head_params * head_tokens}


def transformer_forward_flops(cfg_like: Any, n_tokens: int, seq_len: int, *, lm_head_tokens: int | None = None,
                              gated_mlp: bool | None = None, lm_head: bool | None = None) -> float:
    """``F_fwd = 2 N_dense n + 4 L s a n + 2 N_head n_head`` (module docstring).

    Args:
        cfg_like: HF config, model, dict or :class:`ModelDims`.
        n_tokens: tokens processed, padding included (``batch * seq_len`` for a padded batch).
        seq_len: attention context of each token (the padded sequence length); full ``s x s``, causal or not.
        lm_head_tokens: tokens whose logits are computed (default ``n_tokens``; ignored for encoders).
        gated_mlp, lm_head: override the detection of :meth:`ModelDims.from_config`.
    """
    return sum(forward_flops_breakdown(cfg_like, n_tokens, seq_len, lm_head_tokens=lm_head_tokens,
                                       gated_mlp=gated_mlp, lm_head=lm_head).values())


TrainMode = Literal["full", "lora", "frozen_input_grad", "inference"]


def train_flops(forward_flops: float, mode: TrainMode = "full", *, lora_params: int = 0, tokens: int = 0,
                attention_flops: float = 0.0) -> float:
    """FLOPs of one forward + backward pass, from the base model's forward FLOPs ``F`` (module docstring).

    ``full``: ``3 F``. ``lora``: ``2 F + F_attn + 6 P_lora tokens`` (``P_lora`` = adapter parameters, e.g.
    from :func:`lora_param_count` or ``sum(p.numel() for p in model.parameters() if p.requires_grad)``;
    ``tokens`` = tokens that went through the adapters). ``frozen_input_grad``: ``2 F + F_attn`` (gradients
    flow through frozen weights to the inputs). ``inference``: ``F``.

    ``attention_flops`` is the attention part ``F_attn`` of ``forward_flops``
    (``forward_flops_breakdown(...)["attention"]``); leaving it 0 ignores the extra attention backward of
    the frozen modes. :func:`transformer_train_flops` fills it in for you.
    """
    if forward_flops < 0 or attention_flops < 0 or attention_flops > forward_flops:
        raise ValueError("need 0 <= attention_flops <= forward_flops")
    if mode == "full":
        return 3.0 * forward_flops
    if mode == "lora":
        if lora_params < 0 or tokens < 0:
            raise ValueError("lora_params and tokens must be >= 0")
        if lora_params and not tokens:
            raise ValueError("mode='lora' with lora_params needs tokens (adapter FLOPs scale with tokens)")
        return 2.0 * forward_flops + attention_flops + 6.0 * lora_params * tokens
    if mode == "frozen_input_grad":
        return 2.0 * forward_flops + attention_flops
    if mode == "inference":
        return float(forward_flops)
    raise ValueError(f"unknown mode {mode!r} (full, lora, frozen_input_grad, inference)")


def transformer_train_flops(cfg_like: Any, n_tokens: int, seq_len: int, mode: TrainMode = "full", *,
                            lora_params: int = 0, gated_mlp: bool | None = None,
                            lm_head: bool | None = None) -> float:
    """One training step over ``n_tokens`` tokens in sequences of ``seq_len``: :func:`train_flops` applied
    to :func:`forward_flops_breakdown` (the LM head, if any, runs on every token)."""
    parts = forward_flops_breakdown(cfg_like, n_tokens, seq_len, gated_mlp=gated_mlp, lm_head=lm_head)
    return train_flops(sum(parts.values()), mode, lora_params=lora_params, tokens=n_tokens,
                       attention_flops=parts["attention"])


def generate_flops(cfg_like: Any, prompt_tokens: int, new_tokens: int, batch: int = 1, *,
                   gated_mlp: bool | None = None, lm_head: bool | None = None) -> float:
    """Greedy/sampled generation with a KV cache (module docstring)::

        F_fwd(n = b P, s = P, n_head = b) + sum_{j=1}^{G-1} b [2 N_dense + 4 L a (P + j) + 2 N_head]

    ``prompt_tokens`` is the padded prompt length ``P``; ``new_tokens`` = ``G`` tokens produced per sequence
    (sequences that stop early still run in a padded batch until the last one stops).
    """
    if prompt_tokens < 1 or new_tokens < 0 or batch < 0:
        raise ValueError("need prompt_tokens >= 1, new_tokens >= 0, batch >= 0")
    d = ModelDims.from_config(cfg_like, gated_mlp=gated_mlp, lm_head=lm_head)
    if new_tokens == 0:
        return 0.0
    prefill = transformer_forward_flops(d, batch * prompt_tokens, prompt_tokens, lm_head_tokens=batch)
    steps = new_tokens - 1
    context_sum = steps * prompt_tokens + steps * (steps + 1) / 2  # sum_{j=1}^{G-1} (P + j)
    decode = batch * (steps * (2.0 * d.dense_params + 2.0 * d.head_params)
                      + 4.0 * d.layers * d.attn_dim * context_sum)
    return prefill + decode


_LORA_SHAPES: dict[str, Callable[[ModelDims], tuple[int, int]]] = {
    # Llama-style names
    "q_proj": lambda d: (d.hidden, d.attn_dim), "k_proj": lambda d: (d.hidden, d.kv_dim),
    "v_proj": lambda d: (d.hidden, d.kv_dim), "o_proj": lambda d: (d.attn_dim, d.hidden),
    "gate_proj": lambda d: (d.hidden, d.intermediate), "up_proj": lambda d: (d.hidden, d.intermediate),
    "down_proj": lambda d: (d.intermediate, d.hidden),
    # BERT-style attention names
    "query": lambda d: (d.hidden, d.attn_dim), "key": lambda d: (d.hidden, d.attn_dim),
    "value": lambda d: (d.hidden, d.attn_dim),
}


def lora_param_count(cfg_like: Any, r: int, target_modules: list[str] | tuple[str, ...]) -> int:
    """Adapter parameters ``L sum_m r (d_in_m + d_out_m)`` for peft LoRA on ``target_modules`` of every layer.

    Knows Llama-style (``q_proj`` ... ``down_proj``) and BERT attention (``query``/``key``/``value``) names.
    """
    d = ModelDims.from_config(cfg_like)
    unknown = [m for m in target_modules if m not in _LORA_SHAPES]
    if unknown:
        raise ValueError(f"unknown LoRA target module(s) {unknown}; known: {sorted(_LORA_SHAPES)}")
    return d.layers * sum(r * sum(_LORA_SHAPES[m](d)) for m in target_modules)


# ----------------------------------------------------------------------------------------------
# ledger

STANDARD_CATEGORIES: tuple[str, ...] = ("train", "encode_questions", "encode_passages", "generate")
_NAME_CHARS = re.compile(r"^[A-Za-z0-9_\-./ ]+$")
_MAX_NAME = 250  # MLflow's key length limit


def validate_metric_name(name: str) -> str:
    """Return ``name`` if MLflow accepts it as a metric name on every platform, else raise ``ValueError``.

    MLflow allows letters, digits, ``_ - . / space`` (and ``:`` except on Windows, which we refuse), at
    most 250 characters, and a name that is its own normalised path (no ``//``, ``./``, leading ``/``,
    trailing ``/`` or ``..``).
    """
    if not isinstance(name, str) or not _NAME_CHARS.match(name):
        raise ValueError(f"{name!r}: metric names may only use letters, digits, '_', '-', '.', '/' and spaces")
    if len(name) > _MAX_NAME:
        raise ValueError(f"{name!r}: longer than {_MAX_NAME} characters")
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith(("..", "/")):
        raise ValueError(f"{name!r}: must be a normalised relative path (MLflow treats names as files)")
    return name


@dataclass
class _Tally:
    flops: float = 0.0
    tokens: int = 0
    passages: int = 0
    calls: int = 0

    def add(self, flops: float, tokens: int, passages: int) -> None:
        self.flops += flops
        self.tokens += tokens
        self.passages += passages
        self.calls += 1

    def merge(self, other: _Tally) -> None:
        self.flops += other.flops
        self.tokens += other.tokens
        self.passages += other.passages
        self.calls += other.calls


@dataclass
class _PhaseTally(_Tally):
    wall_s: float = 0.0
    device_s: float = 0.0
    entries: int = 0
    by_category: dict[str, float] = field(default_factory=dict)


class CostLedger:
    """FLOPs, tokens, passages and wall-clock of a run, per category and per phase.

    * ``add(category, flops, tokens, passages)`` adds to the category's totals and to every open phase.
    * ``with ledger.phase("train/generator"):`` times a phase with ``time.perf_counter``. Phases nest;
      a phase's numbers are *inclusive* (they contain its nested phases, like a profiler's inclusive time),
      while the run totals count every add and every second once: the run's ``wall_s`` is the time spent
      inside outermost phases. Re-entering a phase that is already open raises ``ValueError``. A phase can
      be entered many times; its numbers accumulate.
    * ``n_devices``: devices this process's wall-clock occupies (device-seconds = wall x n_devices).
    * ``state_dict()`` / ``load_state_dict()`` carry the totals across a resume (time of open phases up
      to the snapshot included); ``merge()`` sums ledgers of ranks (``parallel=True``) or runs/phases.

    Category and phase names become part of MLflow metric names and are validated on use.
    """

    VERSION = 1

    def __init__(self, n_devices: int = 1, clock: Callable[[], float] = time.perf_counter):
        if n_devices < 1:
            raise ValueError("n_devices must be >= 1")
        self.n_devices = int(n_devices)
        self._clock = clock
        self._categories: dict[str, _Tally] = {}
        self._phases: dict[str, _PhaseTally] = {}
        self._open: list[tuple[str, float]] = []
        self._wall_s = 0.0
        self._device_s = 0.0
        self.trainable_params: int | None = None
        self.total_params: int | None = None

    # -- recording ----------------------------------------------------------------------------

    @contextmanager
    def phase(self, name: str) -> Iterator[CostLedger]:
        """Time a phase (``with ledger.phase("train/generator"): ...``); FLOPs added inside count to it."""
        validate_metric_name(name)
        if any(n == name for n, _ in self._open):
            raise ValueError(f"phase {name!r} is already open")
        tally = self._phases.setdefault(name, _PhaseTally())
        tally.entries += 1
        self._open.append((name, self._clock()))
        try:
            yield self
        finally:
            popped, start = self._open.pop()
            assert popped == name, "phases must close in the reverse order of opening"
            dt = max(0.0, self._clock() - start)
            tally.wall_s += dt
            tally.device_s += dt * self.n_devices
            if not self._open:
                self._wall_s += dt
                self._device_s += dt * self.n_devices

    def add(self, category: str, flops: float, tokens: int = 0, passages: int = 0) -> None:
        """Record ``flops`` (and the ``tokens`` / ``passages`` they processed) under ``category``.

        Standard categories: ``train``, ``encode_questions``, ``encode_passages``, ``generate``; any other
        MLflow-safe name is allowed (e.g. ``index_build``).
        """
        validate_metric_name(category)
        flops = float(flops)
        if not math.isfinite(flops) or flops < 0:
            raise ValueError(f"flops must be finite and >= 0, got {flops}")
        if tokens < 0 or passages < 0:
            raise ValueError("tokens and passages must be >= 0")
        tokens, passages = int(tokens), int(passages)
        self._categories.setdefault(category, _Tally()).add(flops, tokens, passages)
        for name, _ in self._open:
            tally = self._phases[name]
            tally.add(flops, tokens, passages)
            tally.by_category[category] = tally.by_category.get(category, 0.0) + flops

    def set_params(self, trainable: int | None = None, total: int | None = None) -> None:
        """Record the trainable and total parameter counts (logged as ``cost/trainable_params`` ...)."""
        if trainable is not None:
            self.trainable_params = int(trainable)
        if total is not None:
            self.total_params = int(total)

    # -- reading --------------------------------------------------------------------------------

    @property
    def open_phases(self) -> list[str]:
        return [n for n, _ in self._open]

    @property
    def categories(self) -> list[str]:
        return list(self._categories)

    @property
    def phases(self) -> list[str]:
        return list(self._phases)

    def flops(self, category: str | None = None) -> float:
        """Total FLOPs, or those of one category (0 if never used)."""
        if category is None:
            return sum(t.flops for t in self._categories.values())
        t = self._categories.get(category)
        return t.flops if t else 0.0

    @property
    def total_flops(self) -> float:
        return self.flops()

    @property
    def tokens(self) -> int:
        return sum(t.tokens for t in self._categories.values())

    @property
    def passages(self) -> int:
        return sum(t.passages for t in self._categories.values())

    def _open_elapsed(self) -> list[tuple[str, float]]:
        now = self._clock()
        return [(n, max(0.0, now - s)) for n, s in self._open]

    @property
    def wall_s(self) -> float:
        """Seconds spent inside outermost phases (an open phase counts up to now)."""
        open_ = self._open_elapsed()
        return self._wall_s + (open_[0][1] if open_ else 0.0)

    def phase_totals(self, name: str) -> dict[str, Any]:
        """``{flops, tokens, passages, wall_s, device_s, entries, by_category}`` of a phase (inclusive)."""
        t = self._phases[name]
        extra = dict(self._open_elapsed()).get(name, 0.0)
        return {"flops": t.flops, "tokens": t.tokens, "passages": t.passages, "wall_s": t.wall_s + extra,
                "device_s": t.device_s + extra * self.n_devices, "entries": t.entries,
                "by_category": dict(t.by_category)}

    def device_hours(self, n_devices: int | None = None) -> float:
        """Device-hours: ``wall_s * n_devices / 3600`` when ``n_devices`` is given, else the accumulated
        device-seconds (each second weighted by the ledger's ``n_devices`` at the time; sums across merged
        ranks) / 3600."""
        if n_devices is not None:
            return self.wall_s * n_devices / 3600.0
        open_ = self._open_elapsed()
        return (self._device_s + (open_[0][1] * self.n_devices if open_ else 0.0)) / 3600.0

    def to_metrics(self, prefix: str = "cost") -> dict[str, float]:
        """Flat, MLflow-safe metrics::

            {prefix}/total_flops  {prefix}/tokens  {prefix}/passages  {prefix}/wall_s  {prefix}/device_hours
            {prefix}/<category>_flops | _tokens | _passages   (the four standard categories always, 0 if unused)
            {prefix}/trainable_params  {prefix}/total_params  {prefix}/trainable_fraction   (when set)
            {prefix}/phase.<phase>.flops | .wall_s | .device_hours | .tokens | .passages
        """
        validate_metric_name(prefix)
        out: dict[str, float] = {
            "total_flops": self.total_flops, "tokens": float(self.tokens), "passages": float(self.passages),
            "wall_s": self.wall_s, "device_hours": self.device_hours(),
        }
        for cat in dict.fromkeys([*STANDARD_CATEGORIES, *self._categories]):
            t = self._categories.get(cat, _Tally())
            out[f"{cat}_flops"] = t.flops
            out[f"{cat}_tokens"] = float(t.tokens)
            out[f"{cat}_passages"] = float(t.passages)
        if self.trainable_params is not None:
            out["trainable_params"] = float(self.trainable_params)
        if self.total_params is not None:
            out["total_params"] = float(self.total_params)
            if self.trainable_params is not None and self.total_params > 0:
                out["trainable_fraction"] = self.trainable_params / self.total_params
        for name in self._phases:
            p = self.phase_totals(name)
            for key in ("flops", "wall_s", "tokens", "passages"):
                out[f"phase.{name}.{key}"] = float(p[key])
            out[f"phase.{name}.device_hours"] = p["device_s"] / 3600.0
        return {validate_metric_name(f"{prefix}/{k}"): float(v) for k, v in out.items()}

    # -- persistence and merging -------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable snapshot. Open phases contribute their time so far (the live ledger is not
        changed), so a checkpoint taken mid-phase resumes with that time counted once."""
        open_ = self._open_elapsed()
        phases = {}
        for name, t in self._phases.items():
            extra = dict(open_).get(name, 0.0)
            phases[name] = {"flops": t.flops, "tokens": t.tokens, "passages": t.passages, "calls": t.calls,
                            "wall_s": t.wall_s + extra, "device_s": t.device_s + extra * self.n_devices,
                            "entries": t.entries, "by_category": dict(t.by_category)}
        outer = open_[0][1] if open_ else 0.0
        return {
            "version": self.VERSION,
            "n_devices": self.n_devices,
            "wall_s": self._wall_s + outer,
            "device_s": self._device_s + outer * self.n_devices,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "categories": {c: {"flops": t.flops, "tokens": t.tokens, "passages": t.passages, "calls": t.calls}
                           for c, t in self._categories.items()},
            "phases": phases,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this ledger's totals with a snapshot from :meth:`state_dict` (no phase may be open)."""
        if self._open:
            raise RuntimeError(f"cannot load a state while phases are open: {self.open_phases}")
        if state.get("version") != self.VERSION:
            raise ValueError(f"unsupported ledger state version {state.get('version')!r}")
        self.n_devices = int(state["n_devices"])
        self._wall_s = float(state["wall_s"])
        self._device_s = float(state["device_s"])
        self.trainable_params = state.get("trainable_params")
        self.total_params = state.get("total_params")
        self._categories = {validate_metric_name(c): _Tally(float(t["flops"]), int(t["tokens"]),
                                                            int(t["passages"]), int(t["calls"]))
                            for c, t in state["categories"].items()}
        self._phases = {validate_metric_name(n): _PhaseTally(
            float(p["flops"]), int(p["tokens"]), int(p["passages"]), int(p["calls"]), float(p["wall_s"]),
            float(p["device_s"]), int(p["entries"]), {k: float(v) for k, v in p["by_category"].items()})
            for n, p in state["phases"].items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], clock: Callable[[], float] = time.perf_counter) -> CostLedger:
        ledger = cls(n_devices=int(state["n_devices"]), clock=clock)
        ledger.load_state_dict(state)
        return ledger

    def merge(self, other: CostLedger | Mapping[str, Any], parallel: bool = False) -> CostLedger:
        """Add another ledger (or its ``state_dict``, e.g. gathered from another rank) into this one.

        FLOPs, tokens, passages and device-seconds always add. Wall-clock adds for sequential work
        (``parallel=False``: phases or runs one after another) and takes the maximum for ranks that ran
        at the same time (``parallel=True``). Parameter counts are not additive (the same model on every
        rank / phase): the larger is kept. Returns ``self``.
        """
        state = other.state_dict() if isinstance(other, CostLedger) else other
        src = CostLedger.from_state_dict(state)

        def wall(a: float, b: float) -> float:
            return max(a, b) if parallel else a + b

        for c, t in src._categories.items():
            self._categories.setdefault(c, _Tally()).merge(t)
        for n, p in src._phases.items():
            mine = self._phases.setdefault(n, _PhaseTally())
            mine.merge(p)
            mine.wall_s = wall(mine.wall_s, p.wall_s)
            mine.device_s += p.device_s
            mine.entries += p.entries
            for c, f in p.by_category.items():
                mine.by_category[c] = mine.by_category.get(c, 0.0) + f
        self._wall_s = wall(self._wall_s, src._wall_s)
        self._device_s += src._device_s
        for attr in ("trainable_params", "total_params"):
            a, b = getattr(self, attr), getattr(src, attr)
            setattr(self, attr, b if a is None else a if b is None else max(a, b))
        return self

    def __repr__(self) -> str:
        return (f"CostLedger(total_flops={self.total_flops:.3e}, wall_s={self.wall_s:.1f}, "
                f"categories={self.categories}, phases={self.phases})")
