"""A bundle as an MLflow model: a pyfunc whose artifact is the bundle, logged with each run and registrable.

:class:`BundleModel` loads the bundle (verified, from its own config: no training config, no network) and
answers a pandas DataFrame with a ``question`` column, a list of strings, or one string; each answer is
``{"question", "answer", "passages": [{"id", "title", "score", "text"}]}``, the passages best first. So
``mlflow.pyfunc.load_model("runs:/<run>/pipeline")`` works in-process and
``mlflow models serve -m runs:/<run>/pipeline --env-manager local`` answers REST requests (``{"inputs": [...]}``
or ``{"dataframe_records": [{"question": ...}]}``) wherever distrag is installed.

The model is saved as MLflow "models from code": its code is a three-line script (``distrag_pyfunc.py``)
importing :class:`BundleModel`, not a pickle, so the logged model holds no pickled object. It is logged as the
run's artifact ``pipeline`` through the run's own client (:func:`log_bundle_model`: no global MLflow state, the
run stays open), and :func:`register` adds it to the model registry with the run's quality and cost as tags.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from distrag import metric_names as mn
from distrag.redaction import mask_credentials

log = logging.getLogger(__name__)

ARTIFACT = "pipeline"
"""The run-relative path of the logged model: ``runs:/<run id>/pipeline``."""
BUNDLE_KEY = "bundle"
_CODE = ("# The distrag pipeline bundle in artifacts/bundle, as an MLflow pyfunc (distrag/serving/mlflow_model.py).\n"
         "from mlflow.models import set_model\n\n"
         "from distrag.serving.mlflow_model import BundleModel\n\n"
         "set_model(BundleModel())\n")
_REQUIREMENTS = ("torch", "transformers", "peft", "faiss-cpu", "mlflow", "pandas", "safetensors", "pydantic", "pyyaml")


def questions_of(model_input: Any) -> list[str]:
    """The questions of a pyfunc input: a DataFrame's ``question`` column (else its only column), a list or
    array of strings, one string, or ``{"question": [...]}``; cells holding lists are flattened."""
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if isinstance(model_input, pd.DataFrame):
        if "question" in model_input.columns:
            values = model_input["question"].tolist()
        elif len(model_input.columns) == 1:
            values = model_input.iloc[:, 0].tolist()
        else:
            raise ValueError(f"expected a 'question' column, got columns {list(model_input.columns)}")
    elif isinstance(model_input, pd.Series):
        values = model_input.tolist()
    else:
        values = list(model_input)
    out: list[str] = []
    for v in values:
        for q in (v if isinstance(v, (list, tuple)) or hasattr(v, "tolist") and not isinstance(v, str) else [v]):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"each question must be a non-empty string, got {q!r}")
            out.append(q)
    return out


class BundleModel(mlflow.pyfunc.PythonModel):
    """The pyfunc: questions in, answers and passages out (see the module docstring)."""

    def load_context(self, context) -> None:
        from distrag.serving.loader import load_bundle

        self.bundle = load_bundle(context.artifacts[BUNDLE_KEY])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[dict]:
        """Answers of the input's questions (MLflow hands a DataFrame: the signature's one string column; called
        directly, anything :func:`questions_of` takes)."""
        from distrag.data.records import Question
        from distrag.serving.predict import answer

        texts = questions_of(model_input)
        questions = [Question(f"q{i}", t.strip(), ()) for i, t in enumerate(texts)]
        return [{"question": p.question.text, "answer": p.answer,
                 "passages": [{"id": x["id"], "title": x["title"], "score": x["score"], "text": x["text"]}
                              for x in p.passages]}
                for p in answer(self.bundle, questions)]


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in _REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return out


def save_pyfunc(bundle_dir: str | Path, out: str | Path) -> Path:
    """The MLflow model folder of the bundle at ``bundle_dir``, written to ``out`` (which must not exist)."""
    import warnings

    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR as BAR
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    out = Path(out)
    bar = os.environ.get(BAR.name)
    os.environ[BAR.name] = "false"  # MLflow copies the bundle in: a copy, not a download worth a progress bar
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            # an input example would load the whole pipeline once more at logging time, to check it
            warnings.filterwarnings("ignore", message=".*input example.*", category=UserWarning)
            code = Path(tmp) / "distrag_pyfunc.py"
            code.write_text(_CODE)
            mlflow.pyfunc.save_model(str(out), python_model=str(code), artifacts={BUNDLE_KEY: str(bundle_dir)},
                                     signature=ModelSignature(inputs=Schema([ColSpec("string")])),
                                     pip_requirements=_requirements(),
                                     metadata={"distrag_bundle": f"artifacts/{Path(bundle_dir).name}"})
    finally:
        if bar is None:
            os.environ.pop(BAR.name, None)
        else:
            os.environ[BAR.name] = bar
    return out


def log_bundle_model(tracker, bundle_dir: str | Path) -> str:
    """Log the bundle as the MLflow model ``pipeline`` of ``tracker``'s run (a
    :class:`~distrag.reporting.tracking.Tracker`); returns its URI, ``runs:/<run id>/pipeline``."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        local = save_pyfunc(bundle_dir, Path(tmp) / ARTIFACT)
        tracker.client.log_artifacts(tracker.run_id, str(local), ARTIFACT)
    uri = f"runs:/{tracker.run_id}/{ARTIFACT}"
    log.info("MLflow model logged: %s (%.1fs)", uri, time.perf_counter() - t0)
    return uri


def registry_tags(manifest: dict) -> dict[str, str]:
    """The run's quality and cost as model-version tags (quality in %, as the report shows it)."""
    ev = manifest["evaluation"]
    q, c, ci = ev["quality"], ev["costs"], ev["intervals"]
    tags = {"distrag.strategy": manifest["strategy"]["key"], "distrag.dataset": manifest["dataset"],
            "distrag.eval_split": ev["split"], "distrag.n_questions": str(ev["n_questions"]),
            "distrag.run_id": str(ev.get("run_id") or "")}
    for name, value in q.items():  # fractions, in %; counts (n_retrieval_questions) as they are
        tags[f"distrag.{name}" if name.startswith("n_") else f"quality.{name}"] = (
            str(int(value)) if name.startswith("n_") else f"{100 * value:.2f}")
    for name, (lo, hi) in ci.items():
        tags[f"quality.{name}_ci95"] = f"{100 * lo:.1f}-{100 * hi:.1f}"
    for key in (mn.COST_TRAIN_FLOPS, mn.COST_TOTAL_FLOPS, mn.COST_WALL_S, mn.COST_DEVICE_HOURS,
                mn.COST_PEAK_RSS_GB, mn.COST_PEAK_DEVICE_GB):
        if key in c:
            tags[key] = f"{c[key]:.6g}"
    return tags


def register(tracker, model_uri: str, name: str, manifest: dict) -> str:
    """Register ``model_uri`` as a new version of the registered model ``name`` (created if needed) with
    :func:`registry_tags`; returns the version."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"distrag pipelines ({manifest['strategy']['label']}, ...)")
    tags = {k: mask_credentials(v) for k, v in registry_tags(manifest).items()}
    mv = client.create_model_version(name, source=model_uri, run_id=tracker.run_id, tags=tags)
    log.info("registered %s as model %r version %s", model_uri, name, mv.version)
    return str(mv.version)
