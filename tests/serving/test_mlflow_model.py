"""The bundle as an MLflow model: logged with each run (no pickle in it), loaded in-process from ``runs:/``, registered
with the run's quality and cost as tags, and (slow) served by ``mlflow models serve`` answering a REST request."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from distrag import metric_names as mn
from distrag.data.records import Question
from distrag.serving.loader import load_bundle
from distrag.serving.mlflow_model import ARTIFACT, questions_of, registry_tags
from distrag.serving.predict import answer
from distrag.strategies import BY_KEY

pytestmark = pytest.mark.timeout(600)
REPO = Path(__file__).resolve().parents[2]


def test_questions_come_in_every_shape_mlflow_hands_them():
    assert questions_of(pd.DataFrame({"question": ["a?", "b?"], "other": [1, 2]})) == ["a?", "b?"]
    assert questions_of(pd.DataFrame({0: ["c?"]})) == ["c?"]  # a list, as MLflow frames it
    assert questions_of(["d?", "e?"]) == ["d?", "e?"] and questions_of("f?") == ["f?"]
    assert questions_of({"question": [["g?", "h?"]]}) == ["g?", "h?"]  # {"inputs": {"question": [...]}}
    assert questions_of(pd.Series(["i?"])) == ["i?"]
    with pytest.raises(ValueError, match="expected a 'question' column"):
        questions_of(pd.DataFrame({"a": ["x"], "b": ["y"]}))
    with pytest.raises(ValueError, match="non-empty string"):
        questions_of([" "])


def _expected(bundle_dir, texts):
    b = load_bundle(bundle_dir, device="cpu")
    return [(p.answer, [x["id"] for x in p.passages]) for p in
            answer(b, [Question(f"q{i}", t, ()) for i, t in enumerate(texts)])]


def test_each_run_logs_its_bundle_as_a_pyfunc_loadable_in_process(runs, bundles, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(runs["uri"])
    res, _ = runs["gen_ft"]
    tags = client.get_run(res.run_id).data.tags
    assert tags[mn.TAG_MODEL_URI] == f"runs:/{res.run_id}/{ARTIFACT}"
    files = {a.path for a in client.list_artifacts(res.run_id, ARTIFACT)}
    assert f"{ARTIFACT}/MLmodel" in files and not any(f.endswith(".pkl") for f in files)  # models from code
    monkeypatch.chdir(runs["tmp"])
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(runs["uri"])
    try:
        model = mlflow.pyfunc.load_model(tags[mn.TAG_MODEL_URI])
    finally:
        mlflow.set_tracking_uri(previous)
    texts = [q.text for q in runs["exp"].splits.test[:3]]
    out = model.predict(pd.DataFrame({"question": texts}))
    assert [(o["answer"], [p["id"] for p in o["passages"]]) for o in out] == _expected(bundles["gen_ft"], texts)
    assert out[0]["question"] == texts[0] and set(out[0]["passages"][0]) == {"id", "title", "score", "text"}
    assert [o["answer"] for o in model.predict(texts)] == [o["answer"] for o in out]  # a plain list too


def test_registered_versions_carry_the_runs_quality_and_cost(runs, bundles):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(runs["uri"])
    versions = {v.run_id: v for v in client.search_model_versions("name='tiny-rag'")}
    for key in ("none", "gen_ft", "joint_token"):
        res, _ = runs[key]
        v = versions[res.run_id]
        manifest = json.loads((bundles[key] / "bundle.json").read_text())
        assert v.source == f"runs:/{res.run_id}/{ARTIFACT}" and v.tags == registry_tags(manifest)
        assert client.get_run(res.run_id).data.tags[mn.TAG_MODEL_VERSION] == str(v.version)
    tags = versions[runs["gen_ft"][0].run_id].tags
    assert tags["quality.em"] == f"{100 * runs['gen_ft'][0].metrics['em']:.2f}"
    assert "quality.em_ci95" in tags and float(tags[mn.COST_TRAIN_FLOPS]) > 0 and "cost/wall_s" in tags
    assert tags["distrag.n_questions"] == tags["distrag.n_retrieval_questions"] == str(len(runs["exp"].splits.test))


def test_log_model_off_and_sweep_points_log_no_model(runs, monkeypatch):
    from mlflow.tracking import MlflowClient

    exp, client = runs["exp"], MlflowClient(runs["uri"])
    monkeypatch.chdir(runs["tmp"])
    cfg = BY_KEY["none"].apply(runs["cfg"]).model_copy(deep=True)
    cfg.tracking.register_model = None
    cfg.tracking.log_model = False
    res, _ = exp.run(cfg)
    point, _ = exp.run(BY_KEY["none"].apply(runs["cfg"]), kind=mn.KIND_SWEEP_POINT, split="dev")
    for r in (res, point):
        tags = client.get_run(r.run_id).data.tags
        assert mn.TAG_BUNDLE in tags and mn.TAG_MODEL_URI not in tags  # the bundle still, no MLflow model
        assert not [a for a in client.list_artifacts(r.run_id) if a.path == ARTIFACT]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_rest_request(runs, bundles, tmp_path):
    """`mlflow models serve -m runs:/<run>/pipeline --env-manager local`, for real, on 127.0.0.1."""
    res, _ = runs["joint_token"]
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": runs["uri"], "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # uvicorn, the venv's
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{res.run_id}/{ARTIFACT}",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            cwd=runs["tmp"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    texts = [q.text for q in runs["exp"].splits.test[:2]]
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /ping within 240 s"
            time.sleep(1)
        body = json.dumps({"dataframe_records": [{"question": t} for t in texts]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())["predictions"]
    finally:
        os.killpg(proc.pid, 15)  # the server and its uvicorn worker: the group this test started
        proc.wait(timeout=30)
        log.close()
    assert [(o["answer"], [p["id"] for p in o["passages"]]) for o in out] == _expected(bundles["joint_token"], texts)
