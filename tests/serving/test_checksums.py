"""File tables and the checks a bundle's folder must pass, on small folders built here; and the fingerprint of a
base model's files (what a bundle that names a base model checks it by)."""

from __future__ import annotations

import hashlib
import os

import pytest

from distrag.errors import BundleError, ModelNotFoundError
from distrag.serving.checksums import check_files, file_table, safe_relative, source_fingerprint


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "b"
    (root / "sub").mkdir(parents=True)
    (root / "a.json").write_text('{"x": 1}')
    (root / "sub" / "w.safetensors").write_bytes(b"\x00" * 100)
    return root


def test_the_table_lists_every_file_and_the_folder_passes_it(folder):
    table = file_table(folder)
    assert set(table) == {"a.json", "sub/w.safetensors"} and table["sub/w.safetensors"]["bytes"] == 100
    assert table["a.json"] == {"bytes": 8, "sha256": hashlib.sha256(b'{"x": 1}').hexdigest()}
    check_files(folder, table)
    assert set(file_table(folder, skip=("a.json",))) == {"sub/w.safetensors"}


def test_each_difference_is_named(folder):
    table = file_table(folder)
    (folder / "sub" / "w.safetensors").write_bytes(b"\x01" + b"\x00" * 99)
    with pytest.raises(BundleError, match=r"sub/w.safetensors: sha256 .* differs"):
        check_files(folder, table)
    (folder / "sub" / "w.safetensors").write_bytes(b"\x00" * 99)
    with pytest.raises(BundleError, match="99 bytes, bundle.json says 100"):
        check_files(folder, table)
    (folder / "sub" / "w.safetensors").unlink()
    with pytest.raises(BundleError, match="w.safetensors: missing"):
        check_files(folder, table)
    with pytest.raises(BundleError, match="'files' must be a mapping"):
        check_files(folder, ["a.json"])
    with pytest.raises(BundleError, match="needs 'bytes' and 'sha256'"):
        check_files(folder, {"a.json": {"bytes": "8"}})


def test_links_are_refused_in_both_directions(folder, tmp_path):
    table = file_table(folder)
    os.symlink(tmp_path, folder / "up")  # a folder link, unlisted
    with pytest.raises(BundleError, match="up: a symlink"):
        check_files(folder, table)
    with pytest.raises(BundleError, match="a symlink"):
        file_table(folder)
    (folder / "up").unlink()
    os.symlink(folder / "a.json", folder / "alias.json")  # a file link, even to a file inside
    with pytest.raises(BundleError, match="alias.json: not a regular file"):
        file_table(folder)


@pytest.mark.parametrize("rel", ["/etc/passwd", "../x", "a/../../x", "", "a\\b", "./a.json", "a//b"])
def test_paths_that_could_leave_the_folder_are_refused(folder, rel):
    with pytest.raises(BundleError, match="not a plain path inside the bundle"):
        safe_relative(folder, rel)


@pytest.mark.parametrize("name", ["model.bin", "w.pt", "x.pkl", "code.py", "lib.so"])
def test_code_and_pickles_are_refused_by_name(folder, name):
    with pytest.raises(BundleError, match="bundles never hold pickles or code"):
        safe_relative(folder, f"sub/{name}")


def test_a_base_models_fingerprint_follows_its_model_files_only(tiny_encoder_dir, tmp_path):
    import shutil

    model = shutil.copytree(tiny_encoder_dir, tmp_path / "enc")
    fp = source_fingerprint(str(model))
    assert fp["path"] == str(model.resolve()) and fp["files"] >= 5 and fp["gguf_file"] is None
    (model / "README.md").write_text("notes")  # not a model file: the same fingerprint
    assert source_fingerprint(str(model))["sha256"] == fp["sha256"]
    (model / "1_Pooling" / "config.json").write_text("{}")  # pooling changes what it computes
    assert source_fingerprint(str(model))["sha256"] != fp["sha256"]
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 16)
    assert source_fingerprint(str(gguf)) == {"path": str(tmp_path.resolve()), "gguf_file": "m.gguf", "files": 1,
                                             "sha256": source_fingerprint(str(tmp_path), "m.gguf")["sha256"]}
    with pytest.raises(ModelNotFoundError):
        source_fingerprint(str(tmp_path / "missing"))
