"""Data loaders: every format becomes the canonical :class:`~distrag.data.records.RAGData`.

``load_data(cfg)`` dispatches on ``cfg.format``:

============  ==============================================================  ===================
format        questions (``cfg.path``)                                        corpus
============  ==============================================================  ===================
synthetic     generated from ``cfg.synthetic`` (no file)                      generated world
hotpotqa      official JSON / HF layout, .json or .jsonl, or a hub id          context paragraphs
popqa         original TSV/CSV, FlashRAG JSONL, Self-RAG JSONL, or a hub id    Self-RAG ctxs, else
                                                                              ``corpus_path``
jsonl         generic questions JSONL                                          ``corpus_path``
============  ==============================================================  ===================

``cfg.corpus_path`` (a corpus JSONL) replaces the corpus built from the questions file, except for
``synthetic`` whose gold ids refer to its own world. It is held in memory, or read by row from the file
(:class:`~distrag.data.disk_corpus.DiskCorpus`, ``cfg.corpus_on_disk``) with its side files under
``corpus_cache`` (the run's ``output_dir/corpus``), written by the ``writer`` process. ``cfg.max_questions``
keeps the first N questions; where the corpus is built from the questions file it is built from those N.
Splitting is the caller's: ``load_data(cfg).split(cfg.dev_fraction, cfg.test_fraction, cfg.split_seed)``.
Formats are documented in docs/data_formats.md. Bad input raises :class:`~distrag.data.records.DataError`.
"""

from __future__ import annotations

from pathlib import Path

from distrag.config import DataConfig
from distrag.data.disk_corpus import CorpusOpener
from distrag.data.records import RAGData
from distrag.errors import DataError

__all__ = ["FORMATS", "load_data"]

FORMATS = ("synthetic", "hotpotqa", "popqa", "jsonl")


def load_data(cfg: DataConfig, *, corpus_cache: str | Path | None = None, writer: bool = True) -> RAGData:
    """Load the questions and corpus that ``cfg`` describes (an on-disk corpus' side files under ``corpus_cache``,
    built there by a ``writer``, waited for by the others)."""
    opener = CorpusOpener(cfg.corpus_on_disk, Path(corpus_cache) if corpus_cache is not None else None, writer)
    if cfg.format == "synthetic":
        from distrag.data.synthetic import make_synthetic

        if cfg.corpus_path:
            raise DataError("corpus_path cannot be used with format='synthetic': the synthetic questions' "
                            "gold passages belong to the generated world", field="data.corpus_path")
        data = make_synthetic(cfg.synthetic)
        if cfg.max_questions is not None:
            data = RAGData(data.name, data.corpus, data.questions[:cfg.max_questions])
        return data
    if cfg.path is None:  # DataConfig already forbids this; kept for configs built without validation
        raise DataError(f"data.path is required for format={cfg.format!r}", field="data.path")
    if cfg.format == "hotpotqa":
        from distrag.data.hotpotqa import load_hotpotqa

        return load_hotpotqa(cfg.path, corpus_path=cfg.corpus_path, max_questions=cfg.max_questions,
                             hub_split=cfg.hub_split, open_corpus=opener)
    if cfg.format == "popqa":
        from distrag.data.popqa import load_popqa

        return load_popqa(cfg.path, corpus_path=cfg.corpus_path, max_questions=cfg.max_questions,
                          hub_split=cfg.hub_split, open_corpus=opener)
    if cfg.format == "jsonl":
        from distrag.data.jsonl import load_jsonl

        if not cfg.corpus_path:
            raise DataError("format='jsonl' needs data.corpus_path (the corpus JSONL)", file=cfg.path,
                            field="data.corpus_path")
        return load_jsonl(cfg.path, cfg.corpus_path, max_questions=cfg.max_questions, open_corpus=opener)
    raise DataError(f"unknown data format {cfg.format!r}; expected one of {', '.join(FORMATS)}",
                    field="data.format")
