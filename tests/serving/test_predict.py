"""Predicting with a bundle loaded fresh: the run's own test questions give its recorded predictions and EM exactly;
a file without answers is answered, not scored; the output appears whole or not at all."""

from __future__ import annotations

import json

import pytest

from distrag.data.questions_file import gold_from_titles, read_questions
from distrag.serving import predict as predict_mod
from distrag.serving.loader import load_bundle
from distrag.serving.predict import answer, format_prediction, predict_file, summarize

pytestmark = pytest.mark.timeout(600)


def _write_questions(path, questions, *, answers=True):
    path.write_text("".join(json.dumps({"id": q.id, "question": q.text, **({"answers": list(q.answers),
                                                                            "gold_passage_ids": list(
                                                                                q.gold_passage_ids or [])}
                                                                           if answers else {})}) + "\n"
                            for q in questions))
    return path


@pytest.mark.parametrize("key", ["none", "gen_ft", "joint_token"])
def test_predict_on_the_test_split_gives_the_runs_recorded_em_exactly(runs, bundles, tmp_path, key):
    from mlflow.tracking import MlflowClient

    res, _ = runs[key]
    client = MlflowClient(runs["uri"])
    recorded_metrics = client.get_run(res.run_id).data.metrics
    recorded = [json.loads(line) for line in
                open(client.download_artifacts(res.run_id, "predictions_test.jsonl", str(tmp_path)))]
    bundle = load_bundle(bundles[key], device="cpu")  # fresh: from the folder alone
    (tmp_path / "none").mkdir()
    qf = read_questions(_write_questions(tmp_path / "test.jsonl", runs["exp"].splits.test))
    preds, metrics = predict_file(bundle, gold_from_titles(qf, bundle.corpus), tmp_path / "out.jsonl",
                                  show_progress=False)
    assert metrics["em"] == recorded_metrics["test/em"]  # exactly, not approximately
    assert metrics["f1"] == recorded_metrics["test/f1"]
    assert metrics["recall_at_3"] == recorded_metrics["test/recall_at_3"]
    assert metrics["n_questions"] == len(recorded)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    fields = ("id", "prediction", "retrieved", "em", "f1", "recall", "answer_recall", "mrr", "ndcg")
    assert [{k: r[k] for k in fields} for r in rows] == [{k: r[k] for k in fields} for r in recorded]
    # the comparison is not trivially true: the tiny LM answers (non-empty), and with the adapter otherwise than
    # without it (an adapter that failed to load would answer as No-FT does)
    assert all(r["prediction"] for r in rows)
    if key != "none":
        base_run = runs["none"][0].run_id
        base = [json.loads(line)["prediction"] for line in
                open(client.download_artifacts(base_run, "predictions_test.jsonl", str(tmp_path / "none")))]
        assert [r["prediction"] for r in rows] != base
    assert all(len(r["passages"]) == 3 and r["passages"][0]["score"] >= r["passages"][-1]["score"] for r in rows)
    assert [p["id"] for p in rows[0]["passages"]] == rows[0]["retrieved"] and "text" not in rows[0]["passages"][0]


def test_questions_without_answers_are_answered_not_scored(runs, bundles, tmp_path):
    bundle = load_bundle(bundles["gen_ft"], device="cpu")
    qf = read_questions(_write_questions(tmp_path / "q.jsonl", runs["exp"].splits.test[:3], answers=False))
    preds, metrics = predict_file(bundle, qf.questions, tmp_path / "out.jsonl", show_progress=False)
    assert metrics == {} and all(p.outcomes is None for p in preds) and len(preds) == 3
    assert all("em" not in json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines())
    mixed = [*runs["exp"].splits.test[:2], *qf.questions]  # only the questions with answers are scored
    assert summarize(list(answer(bundle, mixed)), 3)["n_questions"] == 2.0


def test_chunks_are_whole_generation_batches_and_report_progress(runs, bundles):
    bundle = load_bundle(bundles["none"], device="cpu")
    questions = runs["exp"].splits.test

    class Bar:
        seen: list[int] = []

        def update(self, n):
            self.seen.append(n)

    bar = Bar()
    out = list(answer(bundle, questions, batch_size=1, progress=bar))  # rounded up to generator.batch_size = 4
    assert [p.question.id for p in out] == [q.id for q in questions]
    assert bar.seen == [min(4, len(questions) - i) for i in range(0, len(questions), 4)]
    text = format_prediction(out[0])
    assert text.startswith(f"answer: {out[0].answer}\n") and "top 3 passages" in text
    assert f"{out[0].passages[0]['score']:.3f}  {out[0].passages[0]['id']}" in text and "EM " in text


def test_an_interrupted_prediction_leaves_no_output(runs, bundles, tmp_path, monkeypatch):
    bundle = load_bundle(bundles["none"], device="cpu")

    def failing(*a, **kw):
        yield from []
        raise KeyboardInterrupt

    monkeypatch.setattr(predict_mod, "answer", failing)
    with pytest.raises(KeyboardInterrupt):
        predict_file(bundle, runs["exp"].splits.test, tmp_path / "out.jsonl", show_progress=False)
    assert list(tmp_path.iterdir()) == []
