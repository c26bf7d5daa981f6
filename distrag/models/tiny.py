"""Tiny, randomly initialised models built from configs: fast, deterministic, no downloads.

Used by the tests, by ``--quick`` runs and by benchmarks that need a peer on the same model. Each
builder writes a real Hugging Face folder (weights, config, tokenizer, and for the encoder a
sentence-transformers pooling config) so the production loading code is what gets exercised.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

_BASE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Who is the founder of the company? "
    "Which city was she born in? What is the capital of the country? yes no answer question passage "
    "context title The of in is was born founded works at lives capital city company person river "
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 1999 2001 2020"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _train_bpe(texts: Iterable[str], vocab_size: int, specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def make_tiny_encoder(path: str | Path, texts: Iterable[str] = (), *, hidden: int = 32, layers: int = 2,
                      vocab_size: int = 600, seed: int = 0, pooling: str = "mean") -> Path:
    """A BERT encoder with a sentence-transformers pooling config, saved to ``path``."""
    from tokenizers import processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    raw = _train_bpe([_BASE_TEXT, *texts], vocab_size, specials)
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", raw.token_to_id("[CLS]")), ("[SEP]", raw.token_to_id("[SEP]"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                  model_max_length=512)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=raw.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=hidden * 2, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    import json

    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128,
                                                                 "do_lower_case": False}))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}))
    (path / "2_Normalize").mkdir(exist_ok=True)
    return path


def make_tiny_causal_lm(path: str | Path, texts: Iterable[str] = (), *, hidden: int = 32, layers: int = 2,
                        vocab_size: int = 600, seed: int = 0) -> Path:
    """A Llama-architecture causal LM with a ChatML chat template, saved to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw = _train_bpe([_BASE_TEXT, *texts], vocab_size, specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=4096)
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=raw.get_vocab_size(), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=4096, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
