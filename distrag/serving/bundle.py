"""A trained (or the No-FT) pipeline as one folder: everything needed to answer questions, and what it scored and
cost.

Layout (:data:`FORMAT_VERSION` 1)::

    bundle.json    the manifest: strategy, data, base models, what each part below is, the evaluation (quality with
                   95 % intervals, costs, the MLflow run) and the size and sha256 of every other file
    README.md      the model card (distrag/serving/model_card.py)
    config.json    the run's configuration (credentials masked): k, prompt, decoding, generation settings
    embedder/      the trained question encoder in full (small; sentence-transformers layout). Absent when the
                   encoder was not trained: bundle.json names the base model and the sha256 of its files
    adapter/       the LoRA adapter in peft's format (adapter_config.json + adapter_model.safetensors): loadable by
                   transformers + peft alone. Absent for strategies that do not train the generator
    generator/     only with ``--merge``: the generator with the adapter merged in, a plain transformers folder
    index/         the index the pipeline was evaluated with, saved from memory in distrag/retrieval/index_store.py's
                   format (its manifest holds each file's sha256): the frozen base index, or the re-embedded index
                   of a strategy that trained the encoder
    corpus.jsonl   the passages ({id, title, text}; row i is index id i), since the prompt shows their text

The corpus is copied because a bundle must answer on its own (on a serving machine, from an MLflow artifact
store) and the corpora trained in memory are small. A corpus file larger than :data:`CORPUS_COPY_LIMIT` bytes
(Wikipedia's 21M passages are 13 GB) would make every bundle and every logged MLflow model that large; it is
referenced instead: bundle.json keeps its absolute path, size and sha256 (and the corpus' fingerprint, which pins
the order that index ids refer to), and loading checks all three before use.

The index is written, not hard-linked from the run's cache: a link would move the cached files' change time, and
index_store trusts an unchanged file on its inode and change time (one ``stat`` instead of hashing it at every
load), so every later load of the cache would hash it again. A copy costs the index's size per bundle (0.17 MB
for the demo's 112 passages; 1.5 GB for a million 384-d passages, flat).

The folder is written atomically (a temporary sibling renamed into place), so a reader sees a complete bundle or
none; a later run of the same configuration replaces it whole.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from distrag import __version__
from distrag.atomic_io import atomic_directory, atomic_write_json, follow_umask
from distrag.redaction import mask_tree
from distrag.retrieval import index_store
from distrag.serving.checksums import file_table, sha256_file, source_fingerprint

if TYPE_CHECKING:
    from distrag.config import ExperimentConfig
    from distrag.data.records import Corpus
    from distrag.models.embedder import Embedder
    from distrag.models.generator import Generator
    from distrag.retrieval.sharded_index import ShardedIndex
    from distrag.strategies import Strategy

log = logging.getLogger(__name__)

FORMAT = "distrag.bundle"
FORMAT_VERSION = 1
MANIFEST, CARD, CONFIG = "bundle.json", "README.md", "config.json"
EMBEDDER, ADAPTER, MERGED, INDEX, CORPUS = "embedder", "adapter", "generator", "index", "corpus.jsonl"
CORPUS_COPY_LIMIT = 100 * 10**6
"""Corpus files up to this many bytes are copied into the bundle; larger ones are referenced (module docstring)."""


@dataclass
class Evaluation:
    """What the pipeline scored and cost, as the run recorded it."""

    split: str
    n_questions: int
    quality: dict[str, float]
    """Fractions: ``em``, ``f1``, ``recall_at_<k>``, ... (no split prefix)."""
    intervals: dict[str, list[float]]
    """95 % intervals: ``em`` (Wilson, as the report's), ``f1`` (bootstrap of the per-question mean)."""
    costs: dict[str, float]
    """The ledger's ``cost/*`` metrics."""
    run_id: str | None = None
    experiment: str | None = None
    tracking_uri: str | None = None
    group: str | None = None
    """The comparison group (``distrag report --group``)."""
    extra: dict = field(default_factory=dict)

    @classmethod
    def of(cls, split: str, metrics: dict[str, float], per_question: list[dict], costs: dict[str, float],
           **run) -> Evaluation:
        """From an evaluation's metrics and per-question outcomes; ``run``: the run's id, experiment, URI, group."""
        import numpy as np

        from distrag.reporting.columns import em_interval
        from distrag.reporting.paired import paired_bootstrap

        n = int(metrics.get("n_questions", len(per_question)))
        f1s = np.array([float(o["f1"]) for o in per_question if o.get("f1") is not None])
        f1 = paired_bootstrap(np.zeros_like(f1s), f1s) if len(f1s) else None
        intervals = {"em": list(em_interval(float(metrics.get("em", 0.0)), n))}
        if f1 is not None:
            intervals["f1"] = [f1.low, f1.high]
        quality = {k: float(v) for k, v in metrics.items() if k != "n_questions"}
        return cls(split, n, quality, intervals, {k: float(v) for k, v in costs.items()}, **run)


@dataclass
class BundleSource:
    """The evaluated pipeline's parts and what they are."""

    cfg: ExperimentConfig
    strategy: Strategy
    dataset: str
    embedder: Embedder
    generator: Generator
    index: ShardedIndex
    corpus: Corpus
    encoder_trained: bool
    """Save the question encoder in full (else the base model is named and fingerprinted)."""
    passage_vectors: str
    """Which encoder embedded the index's passages ("base" or "re-embedded")."""


def bundle_dir(output_dir: str | Path, cfg: ExperimentConfig, strategy_key: str) -> Path:
    """Where a run's bundle goes: ``output_dir/models/<strategy>-<config hash>/``."""
    return Path(output_dir) / "models" / f"{strategy_key}-{cfg.config_hash()}"


def _write_corpus(src: BundleSource, out: Path) -> dict:
    """The corpus: ``corpus.jsonl`` in the bundle, or a reference to a corpus file over the copy limit."""
    corpus, cfg = src.corpus, src.cfg
    entry = {"path": None, "reference": None, "passages": len(corpus), "fingerprint": corpus.fingerprint()}
    source = Path(cfg.data.corpus_path) if cfg.data.corpus_path else None
    if source is not None and source.is_file() and corpus.source == cfg.data.corpus_path \
            and source.stat().st_size > CORPUS_COPY_LIMIT:
        entry["reference"] = {"path": str(source.resolve()), "bytes": source.stat().st_size,
                              "sha256": sha256_file(source)}
        return entry
    with open(out / CORPUS, "w", encoding="utf-8") as f:
        for p in corpus:
            f.write(json.dumps({"id": p.id, "title": p.title, "text": p.text}, ensure_ascii=False) + "\n")
    entry["path"] = CORPUS
    return entry


def _as_plain_model(model):
    """``model`` as the plain float model it is in memory: transformers dequantizes a GGUF checkpoint into float
    weights at load but keeps its GGUF quantizer as a marker, which refuses ``save_pretrained``. Other quantizers
    (real low-bit weights) are left alone."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = str(getattr(getattr(quantizer, "quantization_config", None), "quant_method", "")).lower()
    if quantizer is not None and method.endswith("gguf") and all(p.is_floating_point() for p in model.parameters()):
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def _write_merged(generator: Generator, out: Path) -> None:
    """The generator with its adapter merged (a copy: the run's models stay as they are), as a plain folder."""
    model = copy.deepcopy(generator.model)
    if generator.is_peft:
        model = model.merge_and_unload()
    _as_plain_model(model).save_pretrained(out, safe_serialization=True)
    generator.tokenizer.save_pretrained(out)


def write_bundle(path: str | Path, src: BundleSource, evaluation: Evaluation, *, merge: bool = False) -> Path:
    """Write the bundle of ``src`` to ``path`` (replacing one there), atomically; see the module docstring.
    ``merge``: also write ``generator/``, the adapter merged in. Returns ``path``."""
    from distrag.serving.model_card import model_card

    t0 = time.perf_counter()
    cfg, path = src.cfg, Path(path)
    with atomic_directory(path, overwrite=True) as tmp:
        atomic_write_json(tmp / CONFIG, mask_tree(cfg.model_dump(mode="json")))
        if src.encoder_trained:
            src.embedder.save(tmp / EMBEDDER)
        if src.generator.is_peft:
            src.generator.save_adapter(tmp / ADAPTER)
        if merge:
            _write_merged(src.generator, tmp / MERGED)
        index_store.save(src.index, tmp / INDEX, version=src.index.version)
        settings = src.index.settings()
        lora = cfg.generator.lora.model_dump(mode="json") if src.generator.is_peft else None
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "distrag_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "strategy": {"key": src.strategy.key, "label": src.strategy.label, "summary": src.strategy.summary},
            "dataset": src.dataset,
            "embedder": {"base": cfg.embedder.model, "trained": src.encoder_trained,
                         "path": EMBEDDER if src.encoder_trained else None,
                         "base_files": None if src.encoder_trained else source_fingerprint(cfg.embedder.model)},
            "generator": {"base": cfg.generator.model, "gguf_file": cfg.generator.gguf_file,
                          "base_files": source_fingerprint(cfg.generator.model, cfg.generator.gguf_file),
                          "adapter": ADAPTER if src.generator.is_peft else None, "lora": lora,
                          "merged": MERGED if merge else None},
            "index": {"path": INDEX, "kind": settings["kind"], "n_shards": settings["n_shards"],
                      "count": len(src.index), "dim": settings["dim"], "nprobe": settings["nprobe"],
                      "refine": settings["refine"], "version": src.index.version,
                      "passage_vectors": src.passage_vectors},
            "corpus": _write_corpus(src, tmp),
            "retrieval": {"top_k": cfg.retrieval.top_k, "decoding": cfg.generator.decoding},
            "config": CONFIG,
            "evaluation": asdict(evaluation),
        }
        (tmp / CARD).write_text(model_card(manifest), encoding="utf-8")
        if merge:  # safetensors writes 0600; everything else here already follows the umask
            follow_umask(tmp / MERGED)
        manifest["files"] = file_table(tmp, skip=(MANIFEST,))
        atomic_write_json(tmp / MANIFEST, manifest)
    size = sum(e["bytes"] for e in manifest["files"].values())
    log.info("pipeline bundle written to %s (%.1f MB, %.1fs)", path, size / 1e6, time.perf_counter() - t0)
    return path

