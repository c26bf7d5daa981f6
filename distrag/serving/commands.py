"""``distrag ask`` and ``distrag predict``, with plain values (the command line parses the arguments).

* :func:`ask`: one question -> the answer and the top-k passages with their scores (text, or ``--json``);
* :func:`predict`: a questions file (questions JSONL, HotPotQA, PopQA; ``auto`` tells them apart), or the split the
  bundle was evaluated on (``split``, re-read from its own data settings), answered into a JSONL file with a
  progress bar, and scored when the questions carry answers, next to what the bundle recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

from distrag.data.records import Question
from distrag.errors import DataError
from distrag.serving.loader import LoadedBundle, load_bundle
from distrag.serving.predict import BATCH_QUESTIONS, answer, format_prediction, predict_file


def ask(bundle: str | Path, question: str, *, k: int | None = None, as_json: bool = False, device: str | None = None,
        trust_remote_code: bool = False, show_progress: bool = False) -> int:
    """Print the answer of ``question`` and its passages; returns the exit code."""
    if not question.strip():
        raise DataError("the question is empty", field="question")
    b = load_bundle(bundle, device=device, trust_remote_code=trust_remote_code, show_progress=show_progress)
    p = next(answer(b, [Question("q", question.strip(), ())], k=k))
    print(json.dumps(p.row(with_text=True), ensure_ascii=False) if as_json else format_prediction(p))
    return 0


def split_questions(b: LoadedBundle, split: str) -> list[Question]:
    """The questions of ``split`` as the bundle's run split its data (generation capped at ``max_eval_questions``,
    as evaluation capped it)."""
    from distrag.data import load_data

    d = b.cfg.data
    data = load_data(d)
    if data.corpus.fingerprint() != b.manifest["corpus"]["fingerprint"]:
        raise DataError(f"the data the bundle's config names now gives another corpus than the bundle's (fingerprint "
                        f"{data.corpus.fingerprint()} != {b.manifest['corpus']['fingerprint']}): its {split} split "
                        "would not be the run's; pass the questions with --questions", file=d.path, field="data")
    questions = data.split(d.dev_fraction, d.test_fraction, d.split_seed).get(split)
    return questions[:b.cfg.max_eval_questions] if b.cfg.max_eval_questions else questions


def _summary(metrics: dict[str, float], manifest: dict, k: int) -> str:
    from distrag.reporting.columns import em_interval

    n = int(metrics["n_questions"])
    lo, hi = em_interval(metrics["em"], n)
    parts = [f"EM {100 * metrics['em']:.1f} (95% CI {100 * lo:.1f}-{100 * hi:.1f})", f"F1 {100 * metrics['f1']:.1f}"]
    parts += [f"{label}@{k} {100 * metrics[f'{name}_at_{k}']:.1f}" for name, label in
              (("recall", "Recall"), ("recall_all", "Recall-all"), ("answer_recall", "Answer recall"))
              if f"{name}_at_{k}" in metrics]
    ev = manifest["evaluation"]
    recorded = f"{ev['split']} split, {ev['n_questions']} questions: EM {100 * ev['quality'].get('em', 0.0):.1f}"
    return f"{', '.join(parts)} on the {n} questions with answers; the bundle recorded {recorded}"


def predict(bundle: str | Path, out: str | Path, *, questions: str | Path | None = None, fmt: str = "auto",
            split: str | None = None, batch_size: int = BATCH_QUESTIONS, device: str | None = None,
            trust_remote_code: bool = False, show_progress: bool = True) -> int:
    """Answer a questions file (or the bundle's ``split``) into ``out``; print where and, when scored, how well."""
    from distrag.data.questions_file import gold_from_titles, read_questions

    if (questions is None) == (split is None):
        raise DataError("give the questions to answer: a file (--questions FILE) or the bundle's own split "
                        "(--split test)", field="--questions")
    if questions is not None:
        qf = read_questions(questions, fmt)  # a bad file fails before any model loads
    b = load_bundle(bundle, device=device, trust_remote_code=trust_remote_code, show_progress=show_progress)
    if split is not None:
        qs, hotpotqa = split_questions(b, split), b.cfg.data.format == "hotpotqa"
    else:
        qs, hotpotqa = gold_from_titles(qf, b.corpus), qf.format == "hotpotqa"
    preds, metrics = predict_file(b, qs, out, batch_size=batch_size, hotpotqa=hotpotqa, show_progress=show_progress)
    print(f"{len(preds)} answers ({b.label}, top-{b.cfg.retrieval.top_k} passages each) written to {out}")
    if metrics:
        print(_summary(metrics, b.manifest, b.cfg.retrieval.top_k))
    else:
        print("no question has answers: nothing scored")
    return 0
