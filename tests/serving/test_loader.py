"""Loading a bundle: the pipeline it was evaluated as, from its own files; and one clear error for a folder that is
not a bundle, files missing, altered, unlisted or linked out of it, a pickle, a base model that changed."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from distrag.errors import BundleError, ModelNotFoundError
from distrag.retrieval.pipeline import RAGPipeline
from distrag.serving.bundle import write_bundle
from distrag.serving.checksums import file_table
from distrag.serving.loader import load_bundle, verify_bundle
from distrag.strategies import BY_KEY

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def copy_of(bundles, tmp_path):
    """A private copy of a bundle, to break."""

    def make(key):
        return shutil.copytree(bundles[key], tmp_path / key)

    return make


def _rewrite_manifest(path, edit):
    m = json.loads((path / "bundle.json").read_text())
    edit(m)
    (path / "bundle.json").write_text(json.dumps(m))


@pytest.mark.parametrize("key", ["none", "gen_ft", "joint_token"])
def test_a_loaded_bundle_retrieves_and_scores_as_the_evaluated_pipeline(runs, bundles, key):
    _, models = runs[key]
    exp = runs["exp"]
    b = load_bundle(bundles[key], device="cpu")
    questions = exp.splits.test
    live = RAGPipeline(BY_KEY[key].apply(runs["cfg"]), exp.splits.corpus, models.embedder, models.generator,
                       models.index)
    got, want = b.pipeline.retrieve(questions), live.retrieve(questions)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.scores, want.scores)
    prompts = [b.generator.build_prompt(q.text, ps) for q, ps in zip(questions, b.pipeline.passages_for(got.ids))]
    answers = [q.answers[0] for q in questions]
    models.generator.model.eval()
    with torch.no_grad():
        lp, mask = b.generator.answer_logprobs(prompts, answers)
        lp_live, mask_live = models.generator.answer_logprobs(prompts, answers)
    assert torch.equal(mask, mask_live) and torch.equal(lp, lp_live)  # the same weights, bit for bit
    assert b.label == runs[key][0].label and b.cfg.retrieval.top_k == 3


def test_not_a_bundle_is_one_clear_error(tmp_path):
    with pytest.raises(BundleError, match="no such folder"):
        load_bundle(tmp_path / "nowhere")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(BundleError, match="file.txt: not a folder, so not a pipeline bundle"):
        load_bundle(f)
    with pytest.raises(BundleError, match=r"not a distrag pipeline bundle \(no bundle.json\)"):
        load_bundle(tmp_path)
    (tmp_path / "bundle.json").write_text("{nope")
    with pytest.raises(BundleError, match="bundle.json: unreadable"):
        load_bundle(tmp_path)
    (tmp_path / "bundle.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(BundleError, match="not a distrag pipeline bundle manifest"):
        load_bundle(tmp_path)
    (tmp_path / "bundle.json").write_text(json.dumps({"format": "distrag.bundle", "format_version": 99}))
    with pytest.raises(BundleError, match="v99 is newer than this distrag reads"):
        load_bundle(tmp_path)


def test_missing_truncated_or_altered_index_files_are_named(copy_of):
    path = copy_of("gen_ft")
    shard = path / "index" / "shard_00000.faiss"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit
    with pytest.raises(BundleError, match=r"index/shard_00000.faiss: sha256 .* differs from bundle.json"):
        load_bundle(path)
    shard.write_bytes(data[:-8])
    with pytest.raises(BundleError, match=rf"{len(data) - 8} bytes, bundle.json says {len(data)}"):
        load_bundle(path)
    shard.unlink()
    with pytest.raises(BundleError, match=r"index/shard_00000.faiss: missing"):
        load_bundle(path)


def test_symlinks_out_of_the_bundle_are_never_followed(copy_of, tmp_path):
    path = copy_of("none")
    outside = tmp_path / "outside.jsonl"
    shutil.copy(path / "corpus.jsonl", outside)  # the very same bytes: refused for being a link, not for content
    (path / "corpus.jsonl").unlink()
    os.symlink(outside, path / "corpus.jsonl")
    with pytest.raises(BundleError, match="corpus.jsonl: not a regular file inside the bundle"):
        verify_bundle(path)
    path = copy_of("gen_ft")
    moved = tmp_path / "adapter_elsewhere"
    shutil.move(path / "adapter", moved)
    os.symlink(moved, path / "adapter")
    with pytest.raises(BundleError, match="not a regular file inside the bundle|a symlink"):
        verify_bundle(path)


def test_unlisted_files_pickles_and_paths_out_are_refused(copy_of):
    path = copy_of("gen_ft")
    (path / "adapter" / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(BundleError, match="adapter_model.bin: not listed in bundle.json"):
        load_bundle(path)
    # listing it does not help: bundles never hold pickles
    _rewrite_manifest(path, lambda m: m["files"].update(file_table(path, skip=("bundle.json",))))
    with pytest.raises(BundleError, match=r"adapter_model.bin: a .bin file; bundles never hold pickles"):
        load_bundle(path)
    (path / "adapter" / "adapter_model.bin").unlink()
    _rewrite_manifest(path, lambda m: (m["files"].pop("adapter/adapter_model.bin"),
                                       m["files"].update({"../escape.txt": {"bytes": 1, "sha256": "0" * 64}})))
    with pytest.raises(BundleError, match="lists '../escape.txt', which is not a plain path inside the bundle"):
        load_bundle(path)


def _bundle_with_models(runs, tmp_path, encoder_dir, lm_dir, name="b"):
    """A No-FT bundle whose base models are the given folders."""
    from distrag.serving.bundle import BundleSource, Evaluation

    exp, (_, models) = runs["exp"], runs["none"]
    tree = BY_KEY["none"].apply(runs["cfg"]).model_dump(mode="json")
    tree["embedder"]["model"], tree["generator"]["model"] = str(encoder_dir), str(lm_dir)
    tree["generator"]["trust_remote_code"] = True
    from distrag.config import build_config

    cfg = build_config(tree)
    src = BundleSource(cfg, BY_KEY["none"], exp.splits.name, models.embedder, models.generator, models.index,
                       exp.splits.corpus, False, "base")
    return write_bundle(tmp_path / name, src, Evaluation("test", 1, {"em": 0.0}, {"em": [0.0, 1.0]}, {}))


def test_base_models_must_be_the_files_the_bundle_was_made_with(runs, tmp_path, tiny_encoder_dir, talkative_lm_dir,
                                                                monkeypatch):
    enc, lm = tmp_path / "enc", tmp_path / "lm"
    shutil.copytree(tiny_encoder_dir, enc)
    shutil.copytree(talkative_lm_dir, lm)
    path = _bundle_with_models(runs, tmp_path, enc, lm)
    b = load_bundle(path, device="cpu")
    assert b.cfg.generator.trust_remote_code is False  # hub code stays off, whatever the bundle's config says
    # the same models reached through another working folder: the bundle finds the folders it was made with
    monkeypatch.chdir(tmp_path)
    rel = _bundle_with_models(runs, tmp_path, "enc", "lm", name="relative")
    monkeypatch.chdir(tmp_path / "relative")
    assert load_bundle(rel, device="cpu").embedder.dim == b.embedder.dim
    cfg_file = enc / "config.json"
    cfg_file.write_text(cfg_file.read_text() + "\n")  # the id now means other files
    with pytest.raises(BundleError, match=r"base question encoder .* whose files differ from those the bundle was"):
        load_bundle(path)
    shutil.rmtree(enc)
    with pytest.raises(ModelNotFoundError):
        load_bundle(path)
