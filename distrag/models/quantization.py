"""Quantised base weights for the generator (QLoRA): bitsandbytes NF4 or int8 linear layers, LoRA on top.

Why: a LoRA phase never changes the base weights, so they can be stored in 4 bits (NF4, with the
block scales themselves quantised: "double quantisation") and dequantised block by block for each
matmul in ``generator.quant_compute_dtype``. The adapters, embeddings, norms and LM head stay in
``generator.dtype``; gradients flow through the frozen 4-bit layers to the adapters below them.

Two ways in, one result:

* a transformers folder or hub id loads through ``from_pretrained(quantization_config=...)``, which
  quantises each weight as it is read (the full-precision model never exists in memory);
* a GGUF file cannot: transformers refuses ``gguf_file=`` together with ``quantization_config``. It is
  loaded dequantised, then :func:`quantize_linears` swaps its linear layers for bitsandbytes ones the
  way transformers does (every ``nn.Linear`` but the output embeddings), so the offline SmolLM2 alias
  trains in NF4 like any other model.

On the CPU, bitsandbytes (0.50) repacks a 4-bit weight in place the first time it runs in eval mode on
a CPU with AVX512-BF16 (a bf16 inference layout with the double quantisation undone). That packed path has
no backward, cannot pack layers narrower than one 64-weight block, and changes the bytes the weights take,
so a generator that is evaluated and then trained (every strategy after the No-FT row) would silently lose
the gradient through its base layers. :func:`keep_training_layout` turns it off: weights stay as quantised.

:func:`base_weight_bytes` measures what the base weights occupy (each tensor once, quantisation state
included) for the cost ledger and for checking the ``distrag plan --qlora`` projection.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from distrag.config import GeneratorConfig
from distrag.errors import CheckpointError, GeneratorError

BNB_PIP = "bitsandbytes>=0.50"


def bitsandbytes_problem() -> str | None:
    """Why bitsandbytes cannot be used here (not installed, or broken), else None."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # noqa: BLE001 - an import that fails in any way means "not usable"
        return f"needs bitsandbytes, which cannot be imported ({type(e).__name__}: {str(e)[:120]}); " \
               f"run `pip install '{BNB_PIP}'`, or set generator.quantization=none"
    return None


def compute_dtype(cfg: GeneratorConfig, weights_dtype: torch.dtype) -> torch.dtype:
    """The dtype each quantised matmul runs in: ``generator.quant_compute_dtype``, or with ``auto`` the dtype
    the unquantised weights were loaded in (bfloat16 on GPUs that support it, float32 on the CPU)."""
    from distrag.models.sources import pick_dtype

    return weights_dtype if cfg.quant_compute_dtype == "auto" else pick_dtype(cfg.quant_compute_dtype)


def bnb_config(cfg: GeneratorConfig, weights_dtype: torch.dtype):
    """The ``BitsAndBytesConfig`` of ``generator.quantization`` (nf4 or int8)."""
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=cfg.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype(cfg, weights_dtype))


def load_quantized(source, cfg: GeneratorConfig, dtype: torch.dtype, device: torch.device, **kw):
    """The causal LM of ``source`` with its linear layers in ``cfg.quantization`` on ``device`` (module
    docstring: a GGUF file is dequantised, then quantised by :func:`quantize_linears`)."""
    from transformers import AutoModelForCausalLM

    problem = bitsandbytes_problem()
    if problem:
        raise GeneratorError(f"generator.quantization={cfg.quantization} {problem}")
    if source.gguf_file:
        model = AutoModelForCausalLM.from_pretrained(source.path_or_id, dtype=dtype, gguf_file=source.gguf_file,
                                                     **kw)
        quantize_linears(model, cfg, dtype, device)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.path_or_id, dtype=dtype, device_map={"": str(device)},
                                                     quantization_config=bnb_config(cfg, dtype), **kw)
    keep_training_layout(model)
    return_freed_memory()
    return model


def return_freed_memory() -> None:
    """Hand the heap that loading left free back to the OS. glibc keeps freed memory in its arenas, so without
    this a process that loaded a GGUF file (dequantised, then quantised) stays as resident as the full-precision
    model it no longer holds (measured on SmolLM2: 976 MB after an NF4 load, 288 MB trimmed; benchmarks/README)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def quantize_linears(model: torch.nn.Module, cfg: GeneratorConfig, dtype: torch.dtype,
                     device: torch.device) -> torch.nn.Module:
    """Replace every ``nn.Linear`` of ``model`` but its output embeddings (the LM head stays in ``dtype``, as
    transformers keeps it) by a bitsandbytes layer holding the same weights quantised to
    ``cfg.quantization`` on ``device`` (one layer's full-precision weight there at a time), then move the rest
    of the model there. Marks the model as loaded in 4 / 8 bits, which is how peft knows to wrap these layers
    with its bitsandbytes LoRA layers."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    linears = [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head]
    if not linears:
        raise GeneratorError(f"generator.quantization={cfg.quantization}: {type(model).__name__} has no linear "
                             "layers to quantise")
    cdtype = compute_dtype(cfg, dtype)
    for name, lin in linears:
        w = lin.weight.data
        with torch.device("meta"):
            if cfg.quantization == "int8":
                new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, lin.bias is not None,
                                          has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, lin.bias is not None, cdtype,
                                        compress_statistics=cfg.double_quant, quant_type="nf4")
        if cfg.quantization == "int8":
            new.weight = bnb.nn.Int8Params(w.to("cpu"), requires_grad=False, has_fp16_weights=False).to(device)
        else:
            new.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=cfg.double_quant,
                                           quant_type="nf4", module=new).to(device)
        if lin.bias is not None:
            new.bias = torch.nn.Parameter(lin.bias.data.to(device), requires_grad=False)
        new.source_cls = torch.nn.Linear
        model.set_submodule(name, new)
    model.to(device)  # embeddings, norms, head; the quantised layers are there already
    setattr(model, "is_loaded_in_8bit" if cfg.quantization == "int8" else "is_loaded_in_4bit", True)
    return model


def keep_training_layout(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' eval-time CPU repacking of 4-bit weights (module docstring): without it a
    generator evaluated before it trains would lose the gradient through its base layers."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def is_quantized_param(param: torch.Tensor) -> bool:
    """Whether ``param`` holds bitsandbytes-quantised weights (NF4 codes or int8)."""
    return type(param).__name__ in ("Params4bit", "Int8Params")


def is_quantized(model: torch.nn.Module | None) -> bool:
    """Whether any layer of ``model`` holds bitsandbytes-quantised weights (False for None or a non-module)."""
    parameters = getattr(model, "parameters", None)
    return callable(parameters) and any(is_quantized_param(p) for p in parameters())


def weight_count(param: torch.Tensor) -> int:
    """The weights a parameter holds: its ``numel``, except for a 4-bit one, which packs two weights a byte (its
    ``numel`` is half the layer's; the quantisation state knows the layer's shape)."""
    state = getattr(param, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else param.numel()


def load_trainable_state(src: dict, dst: torch.nn.Module) -> None:
    """Restore the trainable parameters (the adapters) of ``dst`` from a DeepSpeed checkpoint's module state
    ``src``, and nothing else: a quantised base always comes from its model file (its quantisation state is no
    state dict torch loads back, and frozen weights never change). A missing adapter is an error."""
    trainable = [n for n, p in dst.named_parameters() if p.requires_grad]
    missing = [n for n in trainable if n not in src]
    if missing:
        raise CheckpointError(f"the DeepSpeed checkpoint holds no {missing[:3]} (of {len(missing)} trainable "
                              "parameters): it was written for another model")
    dst.load_state_dict({n: src[n] for n in trainable}, strict=False)


@dataclass(frozen=True)
class WeightBytes:
    """What a model's base weights occupy, bytes (each tensor counted once: tied weights share one)."""

    quantized: int
    """The quantised weights' packed codes (NF4: half a byte per weight; int8: one)."""
    quant_state: int
    """Their scales: NF4 absmax per block (and the second level of double quantisation, code tables); int8
    per-row scales."""
    unquantized: int
    """Every other base parameter (embeddings, norms, LM head, biases) in its own dtype."""

    @property
    def total(self) -> int:
        return self.quantized + self.quant_state + self.unquantized


def base_tensors(model: torch.nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Every tensor that holds ``model``'s base weights (LoRA adapters excluded), as ``(name, part, tensor)``,
    ``part`` one of :class:`WeightBytes`' fields: quantised codes, their scales, unquantised parameters. An
    int8 layer's scales move from its weight to the layer's state at its first forward: both are looked at."""
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if "lora_" in name:
                continue
            if not is_quantized_param(p):
                yield name, "unquantized", p.data
                continue
            yield name, "quantized", p.data
            state = getattr(p, "quant_state", None)
            scales = []
            if state is not None:  # NF4: absmax, the code, offset, and the nested state of double quantisation
                scales += [state.absmax, state.code, state.offset]
                if getattr(state, "state2", None) is not None:
                    scales += [state.state2.absmax, state.state2.code]
            scales.append(getattr(p, "SCB", None))  # int8: one float32 scale per output row ...
            scales.append(getattr(getattr(module, "state", None), "SCB", None))  # ... or here, after a forward
            for i, t in enumerate(t for t in scales if isinstance(t, torch.Tensor)):
                yield f"{name}.scales{i}", "quant_state", t


def base_weight_bytes(model: torch.nn.Module) -> WeightBytes:
    """Measure the bytes of ``model``'s base weights as they are held (:func:`base_tensors`): each tensor once
    (tied weights and shared code tables share one), at its real element size."""
    seen: set[int] = set()
    parts = {"quantized": 0, "quant_state": 0, "unquantized": 0}
    for _, part, t in base_tensors(model):
        if t.device.type != "meta" and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            parts[part] += t.numel() * t.element_size()
    return WeightBytes(**parts)
