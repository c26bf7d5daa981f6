"""What a bundle's files must be before anything reads them, and the fingerprint of a base model's files.

A bundle arrives from a shared folder, a teammate, an MLflow artifact store: untrusted until checked.
:func:`file_table` records every file's size and sha256 when a bundle is written; :func:`check_files` holds the
folder to that table before a single model file is opened:

* every listed file exists as a regular file inside the bundle: a symlink (a file, or a folder on the way) is
  refused, so nothing outside the bundle is ever read through it;
* no file is unlisted (a planted ``pytorch_model.bin`` next to the listed safetensors is found, not loaded);
* no file is of a kind that runs code when loaded (pickles: ``.bin``, ``.pt``, ``.pkl``, ...; Python sources);
* sizes, then sha256, match: a truncated copy or an altered file names itself.

:func:`source_fingerprint` is the sha256 of the files a base model id resolves to (its weights, config and
tokenizer files): a bundle that names a base model instead of carrying it checks that the id still means the
same weights on the machine that loads it.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from distrag.errors import BundleError
from distrag.models.sources import resolve_model

CHUNK = 4 * 2**20
CODE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".py", ".pyc", ".so")
"""Files a bundle never holds: pickles run code when loaded, sources and libraries are code. Weights are
safetensors, indexes faiss files and .npy read without pickles."""
MODEL_FILE_NAMES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                    "added_tokens.json", "chat_template.jinja", "chat_template.json", "modules.json",
                    "sentence_bert_config.json"}
"""Besides weight files, the files of a model folder that change what it computes (hashed by the fingerprint)."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_SKIP_DIRS = {"onnx", "openvino", "__pycache__"}


def sha256_file(path: str | Path, progress=None) -> str:
    """Hex sha256 of a file, read in chunks (``progress.update(bytes)`` after each, when given)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if progress is not None:
                progress.update(len(chunk))
    return h.hexdigest()


def _regular_files(root: Path) -> Iterable[tuple[str, Path]]:
    """(posix relative path, path) of every file under ``root``, sorted; symlinks are refused, not followed."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in sorted(dirnames):
            if (base / name).is_symlink():
                raise BundleError(f"{base / name}: a symlink; a bundle holds its own files, never links out of it")
        dirnames.sort()
        for name in sorted(filenames):
            path = base / name
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise BundleError(f"{path}: not a regular file (a symlink?); a bundle holds its own files only")
            yield path.relative_to(root).as_posix(), path


def file_table(root: str | Path, *, skip: Iterable[str] = (), progress=None) -> dict[str, dict]:
    """``{relative path: {"bytes", "sha256"}}`` of every file under ``root`` except ``skip``."""
    root, skip = Path(root), set(skip)
    return {rel: {"bytes": path.stat().st_size, "sha256": sha256_file(path, progress)}
            for rel, path in _regular_files(root) if rel not in skip}


def safe_relative(root: Path, rel: str) -> Path:
    """``root / rel`` for a manifest's relative path, refused when it could leave ``root`` (absolute, ``..``) or
    names code (:data:`CODE_SUFFIXES`)."""
    if not isinstance(rel, str) or rel.startswith("/") or "\\" in rel or \
            any(part in ("", ".", "..") for part in rel.split("/")):
        raise BundleError(f"{root}: bundle.json lists {rel!r}, which is not a plain path inside the bundle")
    p = PurePosixPath(rel)
    if p.suffix.lower() in CODE_SUFFIXES:
        raise BundleError(f"{root / rel}: a {p.suffix} file; bundles never hold pickles or code (they would run "
                          "when loaded)")
    return root.joinpath(*p.parts)


def check_files(root: str | Path, table: dict, *, ignore: Iterable[str] = (), progress=None) -> None:
    """Hold the folder ``root`` to ``table`` (see the module docstring); raise :class:`BundleError` naming the
    first file that differs. ``ignore``: files present but not in the table (the manifest itself)."""
    root = Path(root)
    real_root = root.resolve()
    if not isinstance(table, dict):
        raise BundleError(f"{root}/bundle.json: 'files' must be a mapping of path -> bytes, sha256")
    for rel, entry in table.items():
        path = safe_relative(root, rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise BundleError(f"{path}: missing (bundle.json lists it; an incomplete copy of the bundle?)") from None
        if not stat.S_ISREG(st.st_mode) or not path.resolve().is_relative_to(real_root):
            raise BundleError(f"{path}: not a regular file inside the bundle (a symlink?); refused")
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or \
                not isinstance(entry.get("sha256"), str):
            raise BundleError(f"{root}/bundle.json: entry of {rel!r} needs 'bytes' and 'sha256'")
        if st.st_size != entry["bytes"]:
            raise BundleError(f"{path}: {st.st_size} bytes, bundle.json says {entry['bytes']} (truncated or "
                              "altered)")
    listed = set(table) | set(ignore)
    extra = [rel for rel, _ in _regular_files(root) if rel not in listed]
    if extra:
        raise BundleError(f"{root / extra[0]}: not listed in bundle.json ({len(extra)} unlisted file(s)); a "
                          "bundle holds exactly the files its manifest lists")
    for rel, entry in table.items():
        digest = sha256_file(root / rel, progress)
        if digest != entry["sha256"]:
            raise BundleError(f"{root / rel}: sha256 {digest[:16]}... differs from bundle.json's "
                              f"{entry['sha256'][:16]}... (altered or corrupted)")


def _model_files(root: Path, gguf_file: str | None) -> list[tuple[str, Path]]:
    if gguf_file:
        return [(gguf_file, root / gguf_file)]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name in MODEL_FILE_NAMES or name.endswith(WEIGHT_SUFFIXES):
                path = Path(dirpath) / name
                out.append((path.relative_to(root).as_posix(), path))
    return out


def source_fingerprint(spec: str, gguf_file: str | None = None) -> dict | None:
    """``{"path", "gguf_file", "files", "sha256"}`` of the model files ``spec`` resolves to here (a GGUF file
    alone, or a folder's weights, config and tokenizer files: one sha256 over each file's name and sha256), or None
    for a hub id that is not a folder on this machine (nothing local to fingerprint)."""
    source = resolve_model(spec, gguf_file=gguf_file)
    if not source.local:
        return None
    root = Path(source.path_or_id)
    files = _model_files(root, source.gguf_file)
    h = hashlib.sha256()
    for rel, path in files:
        h.update(f"{rel}\t{sha256_file(path)}\n".encode())
    return {"path": str(root), "gguf_file": source.gguf_file, "files": len(files), "sha256": h.hexdigest()}
