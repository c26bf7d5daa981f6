"""Bundles: every evaluated run (No-FT included) leaves one folder holding what answers questions, the exact index it
was evaluated with (the frozen one or the re-embedded one; the run's cache left untouched), parts loadable by
transformers, peft and sentence-transformers alone, its evaluation, and checksums of every file; large corpora are
referenced, verified."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from distrag.config import build_config
from distrag.data.disk_corpus import DiskCorpus
from distrag.data.parsing import load_corpus_jsonl
from distrag.errors import BundleError
from distrag.reporting.columns import em_interval
from distrag.serving import bundle as bundle_mod
from distrag.serving.bundle import BundleSource, Evaluation, write_bundle
from distrag.serving.checksums import file_table
from distrag.serving.loader import load_bundle, verify_bundle
from distrag.serving.predict import answer
from distrag.strategies import BY_KEY

pytestmark = pytest.mark.timeout(600)


def _manifest(path):
    return json.loads((path / "bundle.json").read_text())


def test_every_run_leaves_a_bundle_with_its_parts_and_evaluation(runs, bundles):
    cfg = runs["cfg"]
    for key, parts in (("none", set()), ("gen_ft", {"adapter"}), ("joint_token", {"adapter", "embedder"})):
        res, models = runs[key]
        path = bundles[key]
        assert path.parent == runs["tmp"] / "runs" / "models"
        assert path.name == f"{key}-{BY_KEY[key].apply(cfg).config_hash()}"
        m = _manifest(path)
        assert (m["format"], m["strategy"]["key"], m["strategy"]["label"]) == ("distrag.bundle", key, res.label)
        assert {p for p in ("adapter", "embedder", "generator") if (path / p).is_dir()} == parts
        assert m["embedder"]["trained"] == ("embedder" in parts) and m["generator"]["adapter"] == (
            "adapter" if "adapter" in parts else None)
        assert m["index"]["passage_vectors"] == models.passage_vectors
        assert m["index"]["count"] == m["corpus"]["passages"] == len(runs["exp"].splits.corpus)
        ev = m["evaluation"]
        assert (ev["run_id"], ev["split"], ev["n_questions"]) == (res.run_id, "test", len(runs["exp"].splits.test))
        assert ev["quality"]["em"] == res.metrics["em"] and ev["quality"]["recall_at_3"] == res.metrics["recall_at_3"]
        assert ev["intervals"]["em"] == list(em_interval(res.metrics["em"], ev["n_questions"]))
        assert ev["costs"]["cost/train_flops"] == res.costs["cost/train_flops"]
        # exactly the files on disk are listed, with their sha256
        assert m["files"] == file_table(path, skip=("bundle.json",))
        assert {"README.md", "config.json", "corpus.jsonl", "index/manifest.json"} <= set(m["files"])
        verify_bundle(path)
    assert not m["embedder"]["base_files"] and m["generator"]["base_files"]["sha256"]  # trained encoder: in full
    assert _manifest(bundles["gen_ft"])["embedder"]["base_files"]["sha256"]  # base encoder: named and hashed


def test_the_index_is_the_evaluated_one_and_the_cache_is_left_untouched(runs, bundles):
    """The bundle's index is the one evaluation searched (frozen or re-embedded), saved in index_store's checksummed
    format; the run's index cache is not linked into it (that would move its files' change time, and index_store
    would hash them again at every later load)."""
    cache = next((runs["tmp"] / "runs" / "index").iterdir())
    cached = {f.name: (f.stat().st_ino, f.stat().st_ctime_ns) for f in cache.iterdir()}
    exp = runs["exp"]
    n = len(exp.splits.corpus)
    for key in ("none", "gen_ft", "joint_token"):
        _, models = runs[key]
        b = load_bundle(bundles[key], device="cpu")
        np.testing.assert_array_equal(b.index.reconstruct(np.arange(n)), models.index.reconstruct(np.arange(n)))
        m = json.loads((bundles[key] / "index" / "manifest.json").read_text())
        assert all(s.get("sha256") for s in m["shards"])
        assert all(os.stat(bundles[key] / "index" / name).st_ino != ino for name, (ino, _) in cached.items()
                   if (bundles[key] / "index" / name).exists())
    assert {f.name: (f.stat().st_ino, f.stat().st_ctime_ns) for f in cache.iterdir()} == cached
    joint = load_bundle(bundles["joint_token"], device="cpu").index.reconstruct(np.arange(n))
    assert not np.array_equal(joint, exp.index.reconstruct(np.arange(n)))  # the re-embedded corpus, not the base


def test_adapter_and_encoder_load_with_peft_transformers_and_sentence_transformers_alone(runs, bundles,
                                                                                          talkative_lm_dir):
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForCausalLM

    _, models = runs["joint_token"]
    path = bundles["joint_token"]
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(talkative_lm_dir), str(path / "adapter"))
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    trained = models.generator.model
    trained.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft.eval()(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=0)
    texts = ["Who founded the company?", "A city on a river."]
    st = SentenceTransformer(str(path / "embedder"), device="cpu")
    np.testing.assert_allclose(st.encode(texts, normalize_embeddings=True), models.embedder.encode(texts), atol=1e-5)


def _source(runs, key, **kw):
    res, models = runs[key]
    cfg = BY_KEY[key].apply(runs["cfg"])
    fields = dict(cfg=cfg, strategy=BY_KEY[key], dataset=runs["exp"].splits.name, embedder=models.embedder,
                  generator=models.generator, index=models.index, corpus=runs["exp"].splits.corpus,
                  encoder_trained=BY_KEY[key].trains_embedder, passage_vectors=models.passage_vectors)
    fields.update(kw)
    ev = Evaluation("test", 5, {"em": 0.2, "f1": 0.3}, {"em": [0.0, 0.6]}, {})
    return BundleSource(**fields), ev


def test_merge_writes_the_generator_as_a_plain_transformers_folder(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    src, ev = _source(runs, "gen_ft")
    before = {k: v.clone() for k, v in src.generator.model.state_dict().items()}
    path = write_bundle(tmp_path / "b", src, ev, merge=True)
    merged = AutoModelForCausalLM.from_pretrained(path / "generator").eval()
    assert not hasattr(merged, "peft_config") and not any("lora" in k for k in merged.state_dict())
    ids = torch.tensor([[5, 17, 42, 9, 3, 11]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, src.generator.model.eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
    after = src.generator.model.state_dict()  # the run's own generator is left as it was (merged a copy)
    assert src.generator.is_peft and all(torch.equal(before[k], after[k]) for k in before)
    assert _manifest(path)["generator"]["merged"] == "generator"
    verify_bundle(path)
    assert "merged copy: `generator/`" in (path / "README.md").read_text()


def test_a_generator_dequantized_from_gguf_is_merged_as_the_plain_model_it_is(tiny_lm_dir, tmp_path):
    """transformers keeps a GGUF checkpoint's quantizer on the float model it dequantized, and then refuses to save
    it; the merged copy drops that marker (and only for GGUF with float weights)."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from distrag.config import GeneratorConfig
    from distrag.models.generator import Generator
    from distrag.serving.bundle import _write_merged

    g = Generator.from_config(GeneratorConfig(model=str(tiny_lm_dir)), device="cpu")
    marker = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gguf"), is_serializable=lambda: False)
    g.model.hf_quantizer = marker
    g.model.config.quantization_config = {"quant_method": "gguf"}
    _write_merged(g, tmp_path / "merged")
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in saved and g.model.hf_quantizer is marker  # the run's model untouched
    ids = torch.tensor([[3, 7, 11]])
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits,
                                   g.model(input_ids=ids).logits, rtol=0, atol=0)


def test_a_rewrite_replaces_the_bundle_whole(runs, tmp_path):
    src, ev = _source(runs, "none")
    path = write_bundle(tmp_path / "b", src, ev)
    (path / "stray.txt").write_text("left by someone")
    with pytest.raises(BundleError, match="stray.txt: not listed in bundle.json"):
        verify_bundle(path)
    write_bundle(path, src, ev)
    assert not (path / "stray.txt").exists()
    verify_bundle(path)
    assert not [p for p in tmp_path.iterdir() if p.name != "b"]  # no temporary folder left beside it


def test_a_corpus_over_the_copy_limit_is_referenced_and_checked(runs, tmp_path, monkeypatch):
    corpus_file = tmp_path / "corpus.jsonl"
    corpus_file.write_text("".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n"
                                   for p in runs["exp"].splits.corpus))
    tree = BY_KEY["none"].apply(runs["cfg"]).model_dump(mode="json")
    tree["data"].update(format="jsonl", path=str(tmp_path / "q.jsonl"), corpus_path=str(corpus_file))
    cfg = build_config(tree)
    corpus = load_corpus_jsonl(str(corpus_file))
    monkeypatch.setattr(bundle_mod, "CORPUS_COPY_LIMIT", 10)
    src, ev = _source(runs, "none", cfg=cfg, corpus=corpus)
    path = write_bundle(tmp_path / "b", src, ev)
    ref = _manifest(path)["corpus"]["reference"]
    assert not (path / "corpus.jsonl").exists()
    assert ref["path"] == str(corpus_file.resolve()) and ref["bytes"] == corpus_file.stat().st_size
    assert [p.id for p in load_bundle(path).corpus] == [p.id for p in corpus]
    # a corpus trained from disk is served from disk: side files in this machine's cache, none in the bundle
    monkeypatch.setenv("DISTRAG_CACHE", str(tmp_path / "cache"))
    tree["data"]["corpus_on_disk"] = True
    src, ev = _source(runs, "none", cfg=build_config(tree), corpus=corpus)
    loaded = load_bundle(write_bundle(tmp_path / "b_disk", src, ev))
    assert isinstance(loaded.corpus, DiskCorpus) and loaded.corpus.folder.parent == tmp_path / "cache" / "corpus"
    assert [loaded.corpus[i] for i in range(len(corpus))] == list(corpus)
    questions = runs["exp"].splits.test[:2]
    in_memory = list(answer(load_bundle(path), questions))
    assert [(p.answer, p.passages) for p in answer(loaded, questions)] == [(p.answer, p.passages) for p in in_memory]
    verify_bundle(tmp_path / "b_disk")  # nothing written into the bundle
    text = corpus_file.read_text()
    corpus_file.write_text(text.replace("a", "b", 1))  # same size, other bytes
    with pytest.raises(BundleError, match="sha256 differs from the bundle's reference"):
        verify_bundle(path)
    corpus_file.unlink()
    with pytest.raises(BundleError, match="corpus file this bundle references is missing"):
        verify_bundle(path)


def test_f1_interval_is_a_bootstrap_of_the_per_question_mean():
    per_q = [{"em": 1.0, "f1": 1.0}, {"em": 0.0, "f1": 0.5}, {"em": 0.0, "f1": 0.0}, {"em": 0.0, "f1": 0.5}]
    ev = Evaluation.of("test", {"em": 0.25, "f1": 0.5, "n_questions": 4.0}, per_q, {"cost/wall_s": 3.0})
    lo, hi = ev.intervals["f1"]
    assert 0.0 <= lo < 0.5 < hi <= 1.0
    assert ev.intervals["em"] == list(em_interval(0.25, 4)) and "n_questions" not in ev.quality
    same = Evaluation.of("test", {"em": 0.0, "f1": 0.4, "n_questions": 2.0}, [{"f1": 0.4}, {"f1": 0.4}], {})
    assert same.intervals["f1"] == pytest.approx([0.4, 0.4])
