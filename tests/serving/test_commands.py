"""``ask`` and ``predict`` with plain values: what they print, the bundle's own split re-read as its run split it,
and the refusals (an empty question, no questions or two sources, data that no longer gives the bundle's corpus)."""

from __future__ import annotations

import json

import pytest

from distrag.errors import DataError
from distrag.serving.commands import ask, predict, split_questions
from distrag.serving.loader import load_bundle

pytestmark = pytest.mark.timeout(600)


def test_ask_prints_the_answer_its_passages_and_nothing_else(bundles, capsys):
    assert ask(bundles["gen_ft"], "Who was born in Stezoxum?", device="cpu") == 0
    out = capsys.readouterr().out
    assert out.startswith("answer: ") and out.count("\n  ") == 3  # the three passages
    assert ask(bundles["gen_ft"], "Who?", k=1, as_json=True, device="cpu") == 0
    row = json.loads(capsys.readouterr().out)
    assert row["answers"] == [] and len(row["passages"]) == 1 and "em" not in row
    with pytest.raises(DataError, match="the question is empty"):
        ask(bundles["gen_ft"], "  ")


def test_the_bundles_own_split_is_the_runs_split(runs, bundles, tmp_path, capsys):
    b = load_bundle(bundles["none"], device="cpu")
    assert [q.id for q in split_questions(b, "test")] == [q.id for q in runs["exp"].splits.test]
    assert predict(bundles["none"], tmp_path / "out.jsonl", split="test", device="cpu", show_progress=False) == 0
    out = capsys.readouterr().out
    n = len(runs["exp"].splits.test)
    assert f"{n} answers (No-FT, top-3 passages each) written to {tmp_path / 'out.jsonl'}" in out
    assert f"on the {n} questions with answers; the bundle recorded test split, {n} questions: EM" in out
    b.cfg.max_eval_questions = 2  # evaluation's cap applies to the split as it did in the run
    assert len(split_questions(b, "test")) == 2
    b.cfg.data.synthetic.seed = 7  # the bundle's data settings now give another corpus: refused, not mixed up
    with pytest.raises(DataError, match="another corpus than the bundle's"):
        split_questions(b, "test")


def test_predict_needs_exactly_one_source_of_questions(bundles, tmp_path):
    for kw in ({}, {"questions": tmp_path / "q.jsonl", "split": "test"}):
        with pytest.raises(DataError, match=r"a file \(--questions FILE\) or the bundle's own split"):
            predict(bundles["none"], tmp_path / "out.jsonl", **kw)
    with pytest.raises(DataError, match="questions file not found"):  # before any model loads
        predict(tmp_path / "not-even-a-bundle", tmp_path / "out.jsonl", questions=tmp_path / "q.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
