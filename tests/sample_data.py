"""Small data files in the public formats, written by the tests that need them (shared across folders)."""

from __future__ import annotations

import json
from pathlib import Path


def write_popqa_selfrag(path: Path, n: int = 12) -> Path:
    """PopQA in the Self-RAG layout: answers and retrieved ctxs, no context labels."""
    people = ["Ana Brell", "Tom Vask", "Lia Quorn", "Sam Dretz", "Eli Moor", "Kai Sorn"]
    cities = ["Velmora", "Tarnholm", "Quilford", "Brask", "Ostrava", "Dunvik"]
    lines = []
    for i in range(n):
        p, c = people[i % 6], cities[(i * 5) % 6]
        ctxs = [{"id": f"c{i % 6}", "title": p, "text": f"{p} was born in {c} and works as a teacher."},
                {"id": f"d{(i + 1) % 6}", "title": cities[(i + 1) % 6],
                 "text": f"{cities[(i + 1) % 6]} is a city on the river."}]
        lines.append(json.dumps({"id": f"q{i}", "question": f"In what city was {p} born? ({i})",
                                 "answers": [c], "ctxs": ctxs, "s_pop": 10 + i}))
    path.write_text("\n".join(lines) + "\n")
    return path
