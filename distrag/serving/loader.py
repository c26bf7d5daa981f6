"""A bundle read back: checked, then loaded into the pipeline it was evaluated as.

:func:`verify_bundle` runs before any model file is opened: the manifest is a distrag bundle's, every file is
the one listed (:func:`distrag.serving.checksums.check_files`: no symlinks out, no pickles, nothing unlisted,
sizes and sha256 equal), and a referenced corpus file is still the one hashed. :func:`load_bundle` then builds
what evaluation used, from the bundle's own config.json (no training config, no network): the saved encoder or
the base one (whose files must hash as when the bundle was written), the base generator with the adapter, the
saved index with its search-time settings, the corpus (its fingerprint pins the order index ids refer to).
Model code from the hub stays off (``trust_remote_code``) whatever the bundle's config says, unless the caller
allows it. Every problem is one :class:`~distrag.errors.BundleError` naming the file.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from distrag.config import ExperimentConfig, build_config
from distrag.data.disk_corpus import CorpusOpener
from distrag.data.parsing import Fields, iter_jsonl
from distrag.data.records import BaseCorpus, Corpus, Passage
from distrag.errors import BundleError, ModelNotFoundError
from distrag.models.embedder import Embedder
from distrag.models.generator import Generator
from distrag.retrieval import index_store
from distrag.retrieval.pipeline import RAGPipeline
from distrag.retrieval.sharded_index import ShardedIndex
from distrag.serving.bundle import CONFIG, FORMAT, FORMAT_VERSION, MANIFEST
from distrag.serving.checksums import check_files, safe_relative, sha256_file, source_fingerprint

log = logging.getLogger(__name__)

_REQUIRED = ("format", "format_version", "strategy", "embedder", "generator", "index", "corpus", "retrieval",
             "evaluation", "files")
WHERE_BUNDLES_ARE = ("bundles are the folders <output_dir>/models/<strategy>-<hash>/ that distrag train, eval and "
                     "demo write")


def read_bundle_manifest(root: Path) -> dict:
    """The parsed, structurally checked ``bundle.json`` of ``root`` (its files are checked by
    :func:`verify_bundle`)."""
    if not root.exists():
        raise BundleError(f"{root}: no such folder")
    if not root.is_dir():
        raise BundleError(f"{root}: not a folder, so not a pipeline bundle; {WHERE_BUNDLES_ARE}")
    mpath = root / MANIFEST
    if mpath.is_symlink() or not mpath.is_file():
        raise BundleError(f"{root}: not a distrag pipeline bundle (no {MANIFEST}); {WHERE_BUNDLES_ARE}")
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"{mpath}: unreadable ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BundleError(f"{mpath}: not a distrag pipeline bundle manifest (format {FORMAT!r} expected)")
    if not isinstance(m.get("format_version"), int) or m["format_version"] > FORMAT_VERSION:
        raise BundleError(f"{mpath}: bundle format v{m.get('format_version')} is newer than this distrag reads "
                          f"(v{FORMAT_VERSION}); upgrade distrag")
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise BundleError(f"{mpath}: missing keys {missing}")
    return m


def verify_bundle(path: str | Path, *, show_progress: bool = False) -> dict:
    """Check a bundle's files against its manifest (see the module docstring); returns the manifest."""
    from tqdm.auto import tqdm

    root = Path(path)
    m = read_bundle_manifest(root)
    ref = m["corpus"].get("reference")
    total = sum(int(e.get("bytes", 0)) for e in m["files"].values() if isinstance(e, dict)) if isinstance(
        m["files"], dict) else 0
    total += int(ref["bytes"]) if isinstance(ref, dict) and isinstance(ref.get("bytes"), int) else 0
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=not show_progress, leave=False) as bar:
        check_files(root, m["files"], ignore=(MANIFEST,), progress=bar)
        if ref is not None:
            _check_reference(root, ref, bar)
    return m


def _check_reference(root: Path, ref: dict, bar) -> None:
    if not isinstance(ref, dict) or not all(isinstance(ref.get(k), t) for k, t in
                                            (("path", str), ("bytes", int), ("sha256", str))):
        raise BundleError(f"{root / MANIFEST}: corpus reference needs 'path', 'bytes' and 'sha256'")
    p = Path(ref["path"])
    if not p.is_file():
        raise BundleError(f"{p}: the corpus file this bundle references is missing (it was not copied into the "
                          f"bundle: over the copy limit); put it back at that path")
    if p.stat().st_size != ref["bytes"]:
        raise BundleError(f"{p}: {p.stat().st_size} bytes, the bundle's reference says {ref['bytes']} (a different "
                          "or altered corpus file)")
    if sha256_file(p, bar) != ref["sha256"]:
        raise BundleError(f"{p}: sha256 differs from the bundle's reference (a different or altered corpus file)")


def corpus_cache_root() -> Path:
    """Where a referenced corpus read from disk keeps its side files on this machine (the bundle holds only the
    files it lists): ``$DISTRAG_CACHE`` or ``$XDG_CACHE_HOME/distrag`` (``~/.cache/distrag``), under ``corpus/``."""
    base = os.environ.get("DISTRAG_CACHE")
    if not base:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distrag"
    return Path(base) / "corpus"


def _read_corpus(root: Path, entry: dict, on_disk: bool | str = "auto") -> BaseCorpus:
    """The bundle's passages exactly as written, or the referenced corpus file, opened as training opened it:
    read by row from disk under ``data.corpus_on_disk`` (``auto``: files of 100 MiB or more), with its side files
    under :func:`corpus_cache_root`, so that serving a 21M-passage corpus holds none of its text."""
    if entry.get("path"):
        path = safe_relative(root, entry["path"])
        passages = []
        for label, rec in iter_jsonl(path):
            f = Fields(rec, str(path), label)
            passages.append(Passage(f.id("id"), f.string("title", allow_empty=True) or "",
                                    f.string("text", allow_empty=True) or ""))
        corpus = Corpus(passages, source=str(path))
    else:
        corpus = CorpusOpener(on_disk, cache_root=corpus_cache_root())(entry["reference"]["path"])
    if len(corpus) != entry.get("passages") or corpus.fingerprint() != entry.get("fingerprint"):
        raise BundleError(f"{corpus.source}: {len(corpus)} passages with fingerprint {corpus.fingerprint()}, the "
                          f"bundle's index was built for {entry.get('passages')} with {entry.get('fingerprint')}")
    return corpus


def base_model(entry: dict, spec: str, gguf_file: str | None, what: str) -> tuple[str, str | None]:
    """The base model to load, as ``(spec, gguf_file)``: ``spec`` when it resolves here, else the folder it resolved
    to when the bundle was written (a path relative to another working folder) when that still exists; and it must
    hold the files the bundle was written with (sha256), else :class:`BundleError`. A model with nothing local to
    hash (a hub id) is loaded with a warning."""
    recorded = entry.get("base_files")
    try:
        now = source_fingerprint(spec, gguf_file)
    except ModelNotFoundError:
        folder = (recorded or {}).get("path")
        if not folder or not Path(folder).is_dir():
            raise
        spec, gguf_file = folder, recorded.get("gguf_file")
        now = source_fingerprint(spec, gguf_file)
    if recorded is None or now is None:
        log.warning("the base %s %r is not a local folder here or was not when the bundle was written: its files "
                    "are not verified", what, spec)
        return spec, gguf_file
    if now["sha256"] != recorded.get("sha256"):
        raise BundleError(f"the base {what} {spec!r} resolves to {now['path']}, whose files differ from those the "
                          f"bundle was made with (sha256 {now['sha256'][:12]} != {str(recorded.get('sha256'))[:12]}); "
                          "install the same version of that model")
    return spec, gguf_file


@dataclass
class LoadedBundle:
    """A verified bundle's pipeline: the models, index and corpus it was evaluated with."""

    path: Path
    manifest: dict
    cfg: ExperimentConfig
    corpus: BaseCorpus
    embedder: Embedder
    generator: Generator
    index: ShardedIndex

    @cached_property
    def pipeline(self) -> RAGPipeline:
        """The pipeline evaluation ran (same retrieval, prompt and decoding)."""
        return RAGPipeline(self.cfg, self.corpus, self.embedder, self.generator, self.index)

    @property
    def label(self) -> str:
        return self.manifest["strategy"]["label"]


def _load_generator(root: Path, m: dict, cfg: ExperimentConfig, device) -> Generator:
    gen = m["generator"]
    merged = safe_relative(root, gen["merged"]) if gen.get("merged") else None
    try:
        spec, gguf_file = base_model(gen, cfg.generator.model, cfg.generator.gguf_file, "generator")
        generator = Generator.from_config(cfg.generator.model_copy(update={"model": spec, "gguf_file": gguf_file}),
                                          device)
    except (ModelNotFoundError, BundleError) as e:
        if merged is None:
            raise
        log.warning("%s; answering with the bundle's merged generator %s instead", e, merged)
        return Generator.from_config(cfg.generator.model_copy(update={"model": str(merged), "gguf_file": None}),
                                     device)
    if gen.get("adapter"):
        generator.load_adapter(safe_relative(root, gen["adapter"]), trainable=False)
    generator.model.eval()
    return generator


def load_bundle(path: str | Path, *, device: str | None = None, verify: bool = True, trust_remote_code: bool = False,
                show_progress: bool = False) -> LoadedBundle:
    """Verify (unless ``verify=False``: a bundle this process just wrote) and load the bundle at ``path``."""
    root = Path(path)
    m = verify_bundle(root, show_progress=show_progress) if verify else read_bundle_manifest(root)
    config_path = safe_relative(root, m.get("config") or CONFIG)
    try:
        tree = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"{config_path}: unreadable ({e})") from None
    cfg = build_config(tree, source=str(config_path))
    cfg.embedder.trust_remote_code = cfg.generator.trust_remote_code = trust_remote_code
    corpus = _read_corpus(root, m["corpus"], cfg.data.corpus_on_disk)
    idx = m["index"]
    index = index_store.load(safe_relative(root, idx["path"]), device=cfg.index.device)
    index.nprobe, index.refine = int(idx["nprobe"]), int(idx["refine"])  # the search settings it was evaluated at
    if len(index) != len(corpus):
        raise BundleError(f"{root / idx['path']}: {len(index)} vectors for {len(corpus)} passages")
    emb = m["embedder"]
    if emb.get("path"):
        embedder = Embedder.load(safe_relative(root, emb["path"]), device)
    else:
        spec, _ = base_model(emb, cfg.embedder.model, None, "question encoder")
        embedder = Embedder.from_config(cfg.embedder.model_copy(update={"model": spec}), device)
    embedder.eval()
    if embedder.dim != index.dim:
        raise BundleError(f"{root}: the question encoder gives {embedder.dim}-d vectors, the index holds {index.dim}-d")
    generator = _load_generator(root, m, cfg, device)
    return LoadedBundle(root, m, cfg, corpus, embedder, generator, index)
