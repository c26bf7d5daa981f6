"""Real English passages available offline: the prose paragraphs of the docstrings of the Python standard
library and the installed packages (``torch``, ``transformers``, ``numpy``, ...), found with ``ast`` (nothing
is imported or run).

``bench_scale.py`` judges IVF / IVF-PQ on MiniLM vectors of these: human-written text on thousands of
topics, unlike the synthetic corpus' word salad. A paragraph is kept when it has at least ``min_words``
words, at least 80 % of them plain words (no code, no doctest, no ``::`` literal blocks), and is not a
duplicate. The order is shuffled with ``seed`` so any prefix mixes all packages. The set depends on what is
installed (about 90,000 paragraphs in this project's virtual environment; median 27 words).
"""

from __future__ import annotations

import ast
import json
import os
import re
import sysconfig
from pathlib import Path

import numpy as np

_WORD = re.compile(r"^[A-Za-z][A-Za-z'\-]*[.,;:]?$")


def docstring_paragraphs(roots: list[Path] | None = None, *, min_words: int = 15) -> list[str]:
    """Prose paragraphs of every docstring under ``roots`` (default: the standard library and site-packages)."""
    if roots is None:
        paths = sysconfig.get_paths()
        roots = [Path(paths["stdlib"]), Path(paths["purelib"])]
    seen: dict[str, None] = {}
    for root in roots:
        for f in sorted(root.rglob("*.py")):
            try:
                tree = ast.parse(f.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError, RecursionError):
                continue
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    continue
                doc = ast.get_docstring(node)
                for para in re.split(r"\n\s*\n", doc or ""):
                    if ">>>" in para or "::" in para:
                        continue
                    words = para.split()
                    if len(words) >= min_words and sum(bool(_WORD.match(w)) for w in words) >= 0.8 * len(words):
                        seen.setdefault(" ".join(words))
    return list(seen)


def write_docstring_corpus(path: str | Path, n_passages: int, *, seed: int = 0) -> int:
    """Up to ``n_passages`` shuffled docstring paragraphs as the corpus JSONL at ``path`` (temp file, then
    rename); returns how many were written (fewer when fewer exist)."""
    paras = docstring_paragraphs()
    order = np.random.default_rng(seed).permutation(len(paras))[:n_passages]
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row, i in enumerate(order):
            f.write(json.dumps({"id": f"d{row}", "title": "", "text": paras[i]}) + "\n")
    os.replace(tmp, path)
    return len(order)
