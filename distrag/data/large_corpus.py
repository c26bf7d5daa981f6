"""A synthetic corpus of any size (1M+ passages) with realistic passage lengths, written as JSONL in chunks.

For scale tests of the index path (:mod:`distrag.data.corpus_stream`, :mod:`distrag.retrieval.vector_store`):
nothing is held but one chunk of passages, and the file is the same for the same arguments (seeded).

Lengths
    Words per passage ~ lognormal with median ``median_words`` (default 70) and log-sd ``sigma`` (0.6:
    mean about 84 words, 90 % between about 26 and 190), clipped to ``[min_words, max_words]``: the shape
    of Wikipedia paragraphs as DPR's 100-word passages and HotPotQA's paragraphs have it.
Words
    A Zipf-distributed general vocabulary (``words``: e.g. the whole words of a real tokenizer's vocabulary;
    default: ``n_words`` pronounceable pseudo-words) mixed with ``topic_share`` of words from the passage's
    topic (one of ``n_topics``, each a fixed set of ``topic_words`` words), so a real encoder's embeddings
    form topic clusters as real corpora's do. Sentences end with a full stop about every 18 words.
Records
    ``{"id": "p<row>", "title": "<two topic words> <row>", "text": ...}``, the corpus JSONL format.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["pseudo_words", "word_counts", "write_large_corpus"]

_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "ch",
           "cl", "dr", "gr", "pl", "sh", "st", "th", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_CODAS = ("", "", "n", "r", "s", "l", "m", "t", "nd", "st")


def pseudo_words(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct pronounceable lower-case pseudo-words (1-3 syllables), deterministic by ``seed``."""
    rng = np.random.default_rng(seed)
    seen: dict[str, None] = {}
    while len(seen) < n:
        syllables = rng.integers(1, 4)
        word = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                       + _CODAS[rng.integers(len(_CODAS))] for _ in range(syllables))
        seen.setdefault(word)
    return list(seen)


def word_counts(rng: np.random.Generator, n: int, *, median_words: float = 70.0, sigma: float = 0.6,
                min_words: int = 10, max_words: int = 400) -> np.ndarray:
    """``n`` passage lengths in words: lognormal(log(median_words), sigma) clipped to [min_words, max_words]."""
    lengths = np.rint(rng.lognormal(np.log(median_words), sigma, n))
    return np.clip(lengths, min_words, max_words).astype(np.int64)


def write_large_corpus(path: str | Path, n_passages: int, *, seed: int = 0, words: Sequence[str] | None = None,
                       n_words: int = 20_000, n_topics: int = 2_000, topic_words: int = 40,
                       topic_share: float = 0.35, median_words: float = 70.0, sigma: float = 0.6,
                       min_words: int = 10, max_words: int = 400, chunk_passages: int = 20_000) -> Path:
    """Write ``n_passages`` synthetic passages to the JSONL ``path`` (see the module docstring), one chunk
    of ``chunk_passages`` at a time, through a temporary file renamed at the end. Returns ``path``."""
    if n_passages < 1:
        raise ValueError(f"n_passages must be >= 1, got {n_passages}")
    if not 0.0 <= topic_share <= 1.0:
        raise ValueError(f"topic_share must be in [0, 1], got {topic_share}")
    rng = np.random.default_rng(seed)
    vocab = np.asarray(list(words) if words is not None else pseudo_words(n_words, seed), dtype=object)
    if len(vocab) < topic_words:
        raise ValueError(f"need at least topic_words={topic_words} words, got {len(vocab)}")
    ends = np.asarray([w + "." for w in vocab], dtype=object)  # the same words closing a sentence
    zipf = 1.0 / np.arange(1, len(vocab) + 1) ** 1.07
    cdf = np.cumsum(zipf / zipf.sum())
    topics = np.stack([rng.choice(len(vocab), topic_words, replace=False) for _ in range(n_topics)])
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for start in range(0, n_passages, chunk_passages):
            n = min(chunk_passages, n_passages - start)
            lengths = word_counts(rng, n, median_words=median_words, sigma=sigma, min_words=min_words,
                                  max_words=max_words)
            topic = rng.integers(0, n_topics, n)
            total = int(lengths.sum())
            word_topic = np.repeat(topic, lengths)
            general = np.minimum(np.searchsorted(cdf, rng.random(total)), len(vocab) - 1)
            from_topic = topics[word_topic, rng.integers(0, topic_words, total)]
            ids = np.where(rng.random(total) < topic_share, from_topic, general)
            stop = rng.random(total) < 1 / 18
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            stop[bounds[1:] - 1] = True  # every passage ends a sentence
            tokens = np.where(stop, ends[ids], vocab[ids]).tolist()
            lines = []
            for i in range(n):
                row = start + i
                t = topics[topic[i]]
                body = " ".join(tokens[bounds[i]:bounds[i + 1]])
                lines.append(json.dumps({"id": f"p{row}", "title": f"{vocab[t[0]].title()} {vocab[t[1]]} {row}",
                                         "text": body[:1].upper() + body[1:]}))
            f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
