"""The tiny model builders: real Hugging Face folders with the asked sizes, loadable by the production
loaders, deterministic per seed."""

from __future__ import annotations

import torch

from distrag.config import EmbedderConfig, GeneratorConfig
from distrag.models.embedder import Embedder
from distrag.models.generator import Generator
from distrag.models.tiny import make_tiny_causal_lm, make_tiny_encoder


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_encoder_has_the_asked_sizes_and_pooling(tmp_path):
    folder = make_tiny_encoder(tmp_path / "enc", hidden=16, layers=3, pooling="cls")
    emb = Embedder.from_config(EmbedderConfig(model=str(folder)), device="cpu")
    c = emb.model.config
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.intermediate_size) == ("bert", 16, 3, 32)
    assert emb.pooling == "cls" and emb.dim == 16
    assert emb.encode(["Who is the founder of the company?"]).shape == (1, 16)
    ids = emb.tokenizer("yes")["input_ids"]
    assert ids[0] == emb.tokenizer.cls_token_id and ids[-1] == emb.tokenizer.sep_token_id


def test_causal_lm_has_the_asked_sizes_and_a_chat_template(tmp_path):
    folder = make_tiny_causal_lm(tmp_path / "lm", hidden=16, layers=3)
    gen = Generator.from_config(GeneratorConfig(model=str(folder)), device="cpu")
    c = gen.config
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.num_key_value_heads) == ("llama", 16, 3, 1)
    assert gen.has_chat_template
    assert gen.tokenizer.eos_token == "<|im_end|>" and gen.tokenizer.pad_token == "<|endoftext|>"
    prompt = gen.tokenizer.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False,
                                               add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert len(gen.generate([prompt], max_new_tokens=2)) == 1


def test_same_seed_same_weights_and_extra_texts_shape_the_vocabulary(tmp_path):
    a = make_tiny_causal_lm(tmp_path / "a", hidden=16, layers=1, seed=3)
    b = make_tiny_causal_lm(tmp_path / "b", hidden=16, layers=1, seed=3)
    c = make_tiny_causal_lm(tmp_path / "c", hidden=16, layers=1, seed=4)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)

    from transformers import AutoTokenizer

    word = " Quillonbergshire"
    d = make_tiny_encoder(tmp_path / "d", texts=[word * 50], hidden=16, layers=1)
    e = make_tiny_encoder(tmp_path / "e", hidden=16, layers=1)
    n_with = len(AutoTokenizer.from_pretrained(d)(word, add_special_tokens=False)["input_ids"])
    n_without = len(AutoTokenizer.from_pretrained(e)(word, add_special_tokens=False)["input_ids"])
    assert n_with < n_without
