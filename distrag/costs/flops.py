r"""FLOP estimates of transformer forward passes, training steps and KV-cached generation, from the
model dimensions in a Hugging Face config.

The ledger (:mod:`distrag.costs.ledger`) records these numbers; the accountant
(:mod:`distrag.costs.accountant`) computes them for the calls the models just made.

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
* ``n_head`` = tokens whose logits are computed: all ``n`` by default, one per sequence in a generation
  prefill, the answer columns only when scoring answers (``Generator.answer_logprobs`` asks the model for
  those logits alone, in its training steps too).
* Padded batches are charged at their padded shape (``n = rows x width``, ``s = width``): the kernels
  compute the padding too. Texts encoded by ``Embedder.encode`` run longest first in batches padded to
  their longest text (:func:`texts_forward_flops`).
* Not counted: embeddings lookups, norms, activations, softmax, residual adds, biases, RoPE (all
  O(h) per token against O(h^2)); BERT's pooler (``2 h^2`` per *sequence*; sentence embedders pool
  without it); MoE routing (dense models only).

Training step, from the forward FLOPs ``F`` of the *base* model and its attention part
``F_attn = 4 L s a n`` (:func:`train_flops`, :func:`transformer_train_flops`)::

    full               3 F                         forward + backward w.r.t. activations + w.r.t. weights
    lora               2 F + F_attn + 6 P_lora n   frozen base: forward + backward w.r.t. activations only;
                                                   adapters (P_lora parameters, ``r (d_in + d_out)`` each):
                                                   2 FLOPs in forward, 4 in backward, per parameter and token
    frozen_input_grad  2 F + F_attn + 4 P_lora n   frozen model that gradients must flow *through* (to
                                                   something trainable below it), no weight gradients
    inference          F + 2 P_lora n              no backward

``P_lora`` counts the LoRA adapters the model carries (0 without): they run in every forward, trained or
not, until merged (a generator evaluated or frozen after a LoRA phase still pays ``2 P_lora`` per token).

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

A generate batch is charged at its padded prompt length and for as many steps as it ran: until its
longest answer ended (finished rows keep decoding padding), not at mean lengths.

These formulas match ``FlopCounterMode`` to < 1 % on the tiny test models when attention runs as
matmuls (``attn_implementation="eager"``); see ``tests/costs/test_flops.py`` for the measured ratios,
and ``tests/costs/test_real_models.py`` for every ledger category on all-MiniLM-L6-v2 and SmolLM2-135M.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "ModelDims",
    "forward_flops_breakdown",
    "generate_flops",
    "lora_param_count",
    "texts_forward_flops",
    "train_flops",
    "transformer_forward_flops",
    "transformer_train_flops",
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


def texts_forward_flops(cfg_like: Any, lengths: Iterable[int], batch_size: int) -> float:
    """Forward FLOPs of encoding texts of token ``lengths`` the way ``Embedder.encode`` runs them: sorted
    longest first, cut into batches of ``batch_size``, each batch padded to its longest text::

        sum over batches  F_fwd(n = rows * width, s = width)

    Only the multiset of lengths matters (input order does not), so the corpus encoded in one call or in
    shards of whole batches (``CorpusEncoder``) costs the same.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    ordered = sorted((int(n) for n in lengths), reverse=True)
    return float(sum(transformer_forward_flops(cfg_like, len(ordered[i:i + batch_size]) * ordered[i],
                                               ordered[i])
                     for i in range(0, len(ordered), batch_size)))


TrainMode = Literal["full", "lora", "frozen_input_grad", "inference"]


def train_flops(forward_flops: float, mode: TrainMode = "full", *, lora_params: int = 0, tokens: int = 0,
                attention_flops: float = 0.0) -> float:
    """FLOPs of one forward + backward pass, from the base model's forward FLOPs ``F`` (module docstring).

    ``full``: ``3 F``. ``lora``: ``2 F + F_attn + 6 P_lora tokens`` (``P_lora`` = adapter parameters, e.g.
    from :func:`lora_param_count` or ``sum(p.numel() for p in model.parameters() if p.requires_grad)``;
    ``tokens`` = tokens that went through the adapters). ``frozen_input_grad``: ``2 F + F_attn + 4 P_lora
    tokens`` (gradients flow through frozen weights, adapters included, to the inputs). ``inference``:
    ``F + 2 P_lora tokens`` (a frozen model's adapters still run).

    ``attention_flops`` is the attention part ``F_attn`` of ``forward_flops``
    (``forward_flops_breakdown(...)["attention"]``); leaving it 0 ignores the extra attention backward of
    the frozen modes. :func:`transformer_train_flops` fills it in for you.
    """
    if forward_flops < 0 or attention_flops < 0 or attention_flops > forward_flops:
        raise ValueError("need 0 <= attention_flops <= forward_flops")
    if lora_params < 0 or tokens < 0:
        raise ValueError("lora_params and tokens must be >= 0")
    if lora_params and not tokens and mode != "full":
        raise ValueError(f"mode={mode!r} with lora_params needs tokens (adapter FLOPs scale with tokens)")
    if mode == "full":
        return 3.0 * forward_flops
    if mode == "lora":
        return 2.0 * forward_flops + attention_flops + 6.0 * lora_params * tokens
    if mode == "frozen_input_grad":
        return 2.0 * forward_flops + attention_flops + 4.0 * lora_params * tokens
    if mode == "inference":
        return float(forward_flops) + 2.0 * lora_params * tokens
    raise ValueError(f"unknown mode {mode!r} (full, lora, frozen_input_grad, inference)")


def recompute_flops(parts: dict[str, float], *, lora_params: int, tokens: int, blocks_checkpointed: bool,
                    chunked: bool) -> float:
    """Forwards recomputed in a LoRA training step's backward pass (executed FLOPs, as ``FlopCounterMode``
    counts them), from the step's :func:`forward_flops_breakdown` ``parts``: per-block gradient checkpointing
    runs the blocks (dense + attention + adapters) once more; checkpointed pair chunks
    (``train.pair_micro_batch``) run the whole chunk, LM head included, once more, and with block
    checkpointing as well the blocks a third time."""
    blocks = parts["dense"] + parts["attention"] + 2.0 * lora_params * tokens
    return (blocks + parts["head"] if chunked else 0.0) + (blocks if blocks_checkpointed else 0.0)


def transformer_train_flops(cfg_like: Any, n_tokens: int, seq_len: int, mode: TrainMode = "full", *,
                            lora_params: int = 0, gated_mlp: bool | None = None,
                            lm_head: bool | None = None) -> float:
    """One training step over ``n_tokens`` tokens in sequences of ``seq_len``: :func:`train_flops` applied
    to :func:`forward_flops_breakdown` (the LM head, if any, runs on every token)."""
    parts = forward_flops_breakdown(cfg_like, n_tokens, seq_len, gated_mlp=gated_mlp, lm_head=lm_head)
    return train_flops(sum(parts.values()), mode, lora_params=lora_params, tokens=n_tokens,
                       attention_flops=parts["attention"])


def generate_flops(cfg_like: Any, prompt_tokens: int, new_tokens: int, batch: int = 1, *, lora_params: int = 0,
                   gated_mlp: bool | None = None, lm_head: bool | None = None) -> float:
    """Greedy/sampled generation with a KV cache (module docstring)::

        F_fwd(n = b P, s = P, n_head = b) + sum_{j=1}^{G-1} b [2 N_dense + 4 L a (P + j) + 2 N_head]
        + 2 P_lora b (P + G - 1)

    ``prompt_tokens`` is the padded prompt length ``P``; ``new_tokens`` = ``G`` tokens produced per sequence
    (sequences that stop early still run in a padded batch until the last one stops); ``lora_params``: the
    adapters of a LoRA model, run on every token fed in.
    """
    if prompt_tokens < 1 or new_tokens < 0 or batch < 0 or lora_params < 0:
        raise ValueError("need prompt_tokens >= 1, new_tokens >= 0, batch >= 0, lora_params >= 0")
    d = ModelDims.from_config(cfg_like, gated_mlp=gated_mlp, lm_head=lm_head)
    if new_tokens == 0:
        return 0.0
    prefill = transformer_forward_flops(d, batch * prompt_tokens, prompt_tokens, lm_head_tokens=batch)
    steps = new_tokens - 1
    context_sum = steps * prompt_tokens + steps * (steps + 1) / 2  # sum_{j=1}^{G-1} (P + j)
    decode = batch * (steps * (2.0 * d.dense_params + 2.0 * d.head_params)
                      + 4.0 * d.layers * d.attn_dim * context_sum)
    adapters = 2.0 * lora_params * batch * (prompt_tokens + steps)  # every token fed in goes through them
    return prefill + decode + adapters


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
