"""Security: the defaults that are right and the fixes of issue 10, each with a test that fails if it regresses.

Defaults already right (tested here):
  * YAML is read with ``yaml.safe_load`` only: a config cannot build Python objects.
  * No shell: no ``shell=True``, ``os.system`` or ``os.popen``; no ``eval``/``exec``; nothing unpickles
    (every ``torch.load`` is ``weights_only=True``, ``np.load`` never allows pickle, no ``pickle.load``).
  * No ``trust_remote_code`` by default: the embedder and generator settings default to False, and no
    call passes a literal True.
  * Tampered faiss files are rejected: a shard or vectors file of another size, or one faiss cannot parse,
    is an :class:`IndexLoadError` naming the file (see the report for what sizes cannot catch).
  * Ids cannot escape the output folder: every path distrag writes is built from fixed names, strategy
    keys, hashes and numbers; run names, experiment names and record ids never become path components.

Fixes (tested where their code lives, and end to end below):
  * Resuming never runs code from a checkpoint: tests/distributed/test_checkpoint.py (a pickle payload is
    refused and its code does not run; DeepSpeed's unpickling loader only runs on a checkpoint whose
    signed manifest matches every file; truncated / random / empty state files are named).
  * A foreign client cannot publish an index version: tests/distributed/test_refresh_client.py (unsigned or
    wrongly signed records ignored with a warning, paths outside the run folder refused);
    tests/distributed/test_stores.py (the stores listen on loopback / MASTER_ADDR only);
    tests/distributed/test_run_secret.py (the run's secret).
  * An outsider on the coordination store cannot replay an earlier job's records, freeze or stop a run with a
    counter or a malformed value, get stale weights adopted or an unrelated process signalled (issue 19):
    tests/distributed/test_refresh_protocol.py (in-process and end to end), tests/test_process_watch.py.
  * Credentials in ``tracking.uri`` never reach logs, params or files: tests/test_redaction.py,
    tests/reporting/test_tracking.py, and a whole ``distrag train`` against an MLflow server below.
  * slurm/mlflow_server.sbatch listens on loopback unless told otherwise, and never on the network
    without authentication unless explicitly allowed (below).

Issue 19 (second round), each with a test that failed before its fix:
  3. checkpoints: signature first for every checkpoint, paths inside the run folder, foreign ones skipped:
     tests/distributed/test_checkpoint.py, tests/distributed/test_runner.py;
  4. the run's secret: not re-created over signed checkpoints, the index rank's own error line:
     tests/distributed/test_run_secret.py, tests/distributed/test_runner.py (torchrun);
  5. index checksums (format v2) and the cache keyed on the weights: tests/retrieval/test_index_store.py,
     tests/retrieval/test_corpus_encoding.py;
  6. the output folder's lock never followed through a link: tests/test_run_lock.py;
  7. credentials with any userinfo character masked: tests/test_redaction.py and below;
  8. YAML alias bombs and recursive aliases: tests/test_config.py;
  9. max_new_tokens against the model's positions: tests/training/test_preflight.py, tests/models/test_generator.py;
  11. the MLflow server for real on loopback, with and without basic-auth (below).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from distrag.config import build_config, load_config
from distrag.errors import ConfigError, IndexLoadError

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("distrag", "launch", "benchmarks") for p in sorted((REPO / d).rglob("*.py"))]


def _calls(path: Path):
    """(dotted name of the callee, call node) for every call in a source file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


# ----------------------------------------------------------------------------------------------
# defaults already right


def test_yaml_is_read_with_safe_load_only(tmp_path):
    unsafe = [f"{p.relative_to(REPO)}: {name}" for p in SOURCES for name, _ in _calls(p)
              if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all")]
    assert not unsafe, unsafe
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.yaml"
    bad.write_text(f"output_dir: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="yaml"):
        load_config(str(bad))
    assert not marker.exists()


def test_no_shell_no_eval_and_nothing_unpickles():
    found = []
    for p in SOURCES:
        for name, call in _calls(p):
            where = f"{p.relative_to(REPO)}:{call.lineno} {name}"
            shell = _keyword(call, "shell")
            if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
                found.append(where + " shell=")
            if name in ("os.system", "os.popen", "eval", "exec", "subprocess.getoutput",
                        "subprocess.getstatusoutput", "pickle.load", "pickle.loads"):
                found.append(where)
            if name == "torch.load":
                w = _keyword(call, "weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    found.append(where + " without weights_only=True")
            if name in ("np.load", "numpy.load"):
                allow = _keyword(call, "allow_pickle")
                if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                    found.append(where + " allow_pickle")
    assert not found, found


def test_no_trust_remote_code_by_default():
    cfg = build_config()
    assert cfg.embedder.trust_remote_code is False and cfg.generator.trust_remote_code is False
    literal_true = [f"{p.relative_to(REPO)}:{call.lineno}" for p in SOURCES for _, call in _calls(p)
                    if isinstance(v := _keyword(call, "trust_remote_code"), ast.Constant) and v.value is True]
    assert not literal_true, literal_true


def _saved_index(root: Path, kind: str) -> Path:
    from distrag.retrieval import index_store
    from distrag.retrieval.sharded_index import ShardedIndex

    vectors = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    index = ShardedIndex(8, kind=kind, n_shards=2, nlist=2, nprobe=2, device="cpu").build(vectors)
    return index_store.save(index, root / kind)


@pytest.mark.parametrize("kind,name", [("flat", "shard_00001.faiss"), ("ivf", "shard_00000.faiss"),
                                       ("ivf", "vectors_00001.npy")])
def test_tampered_index_files_are_rejected(tmp_path, kind, name):
    from distrag.retrieval import index_store

    path = _saved_index(tmp_path, kind)
    target = path / name
    original = target.read_bytes()
    tampered = {
        "truncated": original[: len(original) // 2],
        "appended": original + b"\0" * 16,
        "replaced, same size": np.random.default_rng(1).integers(0, 256, len(original), dtype=np.uint8).tobytes(),
    }
    for what, data in tampered.items():
        target.write_bytes(data)
        with pytest.raises(IndexLoadError, match=str(target)):
            index_store.load(path)
        target.write_bytes(original)
    assert len(index_store.load(path)) == 64
    if name.endswith(".npy"):  # a vectors file holding pickled objects is refused, not unpickled
        with open(target, "wb") as f:
            np.save(f, np.array([object()] * 2, dtype=object), allow_pickle=True)
        with pytest.raises(IndexLoadError, match=str(target)):
            index_store.load(path)


HOSTILE = "../../../escape"


def test_user_text_never_becomes_a_path_component(tmp_path, clean_launcher_env):
    from distrag.distributed.checkpoint import CheckpointManager
    from distrag.distributed.runner import run_dir
    from distrag.retrieval import index_store
    from distrag.strategies import STRATEGIES

    out = tmp_path / "runs"
    for strategy in {s.train_strategy for s in STRATEGIES}:
        cfg = build_config({"output_dir": str(out), "train": {"strategy": strategy},
                            "tracking": {"run_name": HOSTILE, "experiment": HOSTILE}})
        assert run_dir(cfg).resolve().is_relative_to(out.resolve())
    with pytest.raises(ConfigError):  # strategies are a closed list
        build_config(overrides=[f"train.strategy={HOSTILE}"])
    with pytest.raises(ValueError):  # index versions and checkpoint steps are numbers
        index_store.publish(None, out / "index", HOSTILE)
    with pytest.raises(ValueError):
        CheckpointManager(out / "ckpt").save(HOSTILE, {})
    assert not list(tmp_path.rglob("*escape*"))


@pytest.fixture
def clean_launcher_env(monkeypatch):
    from distrag.distributed import roles

    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "DISTRAG_GLOBAL_RANK", "DISTRAG_GLOBAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    roles.reset_context()
    yield monkeypatch
    roles.reset_context()


# ----------------------------------------------------------------------------------------------
# credentials: every exit a message can take


def test_user_errors_and_log_records_are_printed_with_credentials_masked(capsys):
    from distrag.errors import user_error_exit
    from distrag.logging_setup import setup_logging

    uri = "http://bob:" + "hunter2" + "@mlflow.internal:5000"

    def fail() -> int:
        raise ConfigError([("tracking.uri", f"unsupported scheme in {uri}")])

    assert user_error_exit(fail) == 2
    setup_logging(verbose=True)
    try:
        logging.getLogger("mlflow.sub").error("API request to %s/api failed", uri)
        logging.getLogger("distrag.test_security").warning(f"cannot reach {uri}")
    finally:
        setup_logging(verbose=False)
    out = capsys.readouterr()
    text = out.out + out.err
    assert "API request to" in text and "cannot reach" in text  # both records were written...
    assert "hunter2" not in text and text.count("http://***@mlflow.internal:5000") == 3  # ...masked


def test_a_password_with_a_quote_is_masked_at_every_exit(tmp_path, capsys):
    """Issue 19 item 7. Before: ``http://bob:pa'ss...@host`` was printed (log, ``error:`` line, the tracker
    probe's message) and stored in MLflow's params as it was: the masking regex stopped at the quote."""
    from distrag.config import TrackingConfig
    from distrag.errors import user_error_exit
    from distrag.logging_setup import setup_logging
    from distrag.reporting.tracking import Tracker, flatten, tracking_problem

    password = "pa'ss" + "-w0rd(!)"
    uri = f"http://bob:{password}@127.0.0.1:{_free_port()}"  # nothing listens there
    probe = tracking_problem(TrackingConfig(uri=uri))
    assert probe and "no MLflow server answers" in probe

    def fail() -> int:
        raise ConfigError([("tracking.uri", probe), ("tracking.uri", f"as given: {uri!r}")])

    assert user_error_exit(fail) == 2
    setup_logging(verbose=True)
    try:
        logging.getLogger("distrag.test_security").warning("tracking at %r", uri)
    finally:
        setup_logging(verbose=False)
    tracker = Tracker.open(TrackingConfig(uri=f"sqlite:///{tmp_path / 'db.sqlite'}", experiment="e"), run_name="r")
    tracker.log_params(flatten(build_config(overrides=[f"tracking.uri={uri}"]).model_dump(mode="json")))
    params = tracker.client.get_run(tracker.run_id).data.params
    tracker.end()
    out = capsys.readouterr()
    for where, text in (("probe", probe), ("stderr/stdout", out.out + out.err), ("params", json.dumps(params))):
        assert password not in text and "pa'ss" not in text, where
    assert params["tracking.uri"].startswith("http://***@127.0.0.1:")
    assert (out.out + out.err).count("http://***@127.0.0.1:") == 3


# ----------------------------------------------------------------------------------------------
# end to end: a whole `distrag train` with credentials in tracking.uri and hostile ids

SECRET = "S3CR3T-t0ken"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hostile_jsonl_data(folder: Path) -> tuple[Path, Path]:
    """The synthetic task as a JSONL pair whose question and passage ids try to climb out of any folder."""
    from distrag.config import SyntheticConfig
    from distrag.data.synthetic import make_synthetic

    data = make_synthetic(SyntheticConfig(n_entities=8, n_single_hop=12, n_two_hop=4))
    pid = {p.id: f"{HOSTILE}/{p.id}" for p in data.corpus}
    qpath, cpath = folder / "questions.jsonl", folder / "corpus.jsonl"
    cpath.write_text("".join(json.dumps({"id": pid[p.id], "title": p.title, "text": p.text}) + "\n"
                             for p in data.corpus))
    qpath.write_text("".join(json.dumps({"id": f"{HOSTILE}/{q.id}", "question": q.text, "answers": list(q.answers),
                                         "gold_passage_ids": [pid[g] for g in q.gold_passage_ids or []]}) + "\n"
                             for q in data.questions))
    return qpath, cpath


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_keeps_credentials_out_of_logs_params_and_files_and_writes_inside_its_folders(
        tmp_path, tiny_encoder_dir, tiny_lm_dir):
    work = tmp_path / "work"
    work.mkdir()
    store = tmp_path / "mlflow"
    port = _free_port()
    store.mkdir()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store}/db.sqlite",
         "--artifacts-destination", str(store / "artifacts"), "--serve-artifacts", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the MLflow server did not start")
        qpath, cpath = _hostile_jsonl_data(tmp_path)
        uri = f"http://alice:{SECRET}@127.0.0.1:{port}"
        cfg = {"data": {"format": "jsonl", "path": str(qpath), "corpus_path": str(cpath), "dev_fraction": 0.2,
                        "test_fraction": 0.3},
               "embedder": {"model": str(tiny_encoder_dir), "max_length": 64},
               "generator": {"model": str(tiny_lm_dir), "max_new_tokens": 3, "max_passage_chars": 80},
               "retrieval": {"top_k": 3}, "index": {"device": "cpu"},
               "train": {"strategy": "embed_ft", "max_steps": 1, "batch_size": 2, "micro_batch_size": 2,
                         "train_k": 2},
               "tracking": {"uri": uri, "experiment": HOSTILE, "run_name": HOSTILE},
               "output_dir": str(work / "runs")}
        (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        before = set(tmp_path.parent.iterdir())
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; from distrag.cli import main; sys.exit(main(sys.argv[1:]))",
             "train", "--config", "cfg.yaml", "--no-progress"],
            cwd=work, capture_output=True, text=True, timeout=240,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert SECRET not in proc.stdout + proc.stderr and "http://***@127.0.0.1" in proc.stdout
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"http://127.0.0.1:{port}")
        runs = client.search_runs([client.get_experiment_by_name(HOSTILE).experiment_id])
        assert len(runs) == 1 and runs[0].data.params["tracking.uri"] == f"http://***@127.0.0.1:{port}"
        configs = list((work / "runs" / "models").glob("*/config.json"))
        assert configs and json.loads(configs[0].read_text())["tracking"]["uri"] == f"http://***@127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(30)
    leaked = [p for p in tmp_path.rglob("*")
              if p.is_file() and p != work / "cfg.yaml" and SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked  # config.json, the MLflow store and its artifacts alike (the input aside)
    assert set(tmp_path.parent.iterdir()) <= before | {tmp_path}  # nothing written next to the test folder
    assert not [p for p in tmp_path.rglob("*escape*")]  # no id became a file or folder name


# ----------------------------------------------------------------------------------------------
# the MLflow server script


def _run_server_script(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, list[str], dict]:
    """slurm/mlflow_server.sbatch with a stand-in ``mlflow`` that records its arguments and environment."""
    stub = tmp_path / "mlflow_stub"
    stub.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$STUB_OUT/args"\nenv > "$STUB_OUT/env"\n')
    stub.chmod(0o755)
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SLURM_"))}
    full.update({"DISTRAG_REPO": str(tmp_path), "MLFLOW": str(stub), "STUB_OUT": str(tmp_path), **env})
    proc = subprocess.run(["bash", str(REPO / "slurm" / "mlflow_server.sbatch")], env=full, capture_output=True,
                          text=True, timeout=60)
    args = (tmp_path / "args").read_text().splitlines() if (tmp_path / "args").exists() else []
    seen = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line) \
        if (tmp_path / "env").exists() else {}
    return proc, args, seen


def test_the_mlflow_server_listens_on_loopback_by_default(tmp_path):
    proc, args, _ = _run_server_script(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert args[args.index("--host") + 1] == "127.0.0.1" and "--app-name" not in args
    assert not (tmp_path / "mlflow" / "tracking_uri.txt").exists()  # other nodes could not use it
    assert "ssh -N -L" in proc.stdout


def test_the_mlflow_server_never_serves_the_network_without_authentication_unless_told(tmp_path):
    proc, args, _ = _run_server_script(tmp_path, MLFLOW_HOST="0.0.0.0")
    assert proc.returncode == 2 and not args and "without authentication" in proc.stderr
    proc, args, _ = _run_server_script(tmp_path, MLFLOW_HOST="0.0.0.0", MLFLOW_ALLOW_NO_AUTH="1")
    assert proc.returncode == 0 and args[args.index("--host") + 1] == "0.0.0.0"


def test_the_mlflow_server_with_basic_auth(tmp_path):
    proc, _, _ = _run_server_script(tmp_path, MLFLOW_HOST="0.0.0.0", MLFLOW_AUTH="basic-auth")
    assert proc.returncode != 0 and "MLFLOW_TRACKING_USERNAME" in proc.stderr
    proc, args, env = _run_server_script(tmp_path, MLFLOW_HOST="0.0.0.0", MLFLOW_AUTH="basic-auth",
                                         MLFLOW_TRACKING_USERNAME="me", MLFLOW_TRACKING_PASSWORD="pw")
    assert proc.returncode == 0, proc.stderr
    assert args[args.index("--app-name") + 1] == "basic-auth" and "--allowed-hosts" in args
    ini = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600 and "admin_username = me" in ini.read_text()
    assert "pw" not in ini.read_text() and env["MLFLOW_AUTH_ADMIN_PASSWORD"] == "pw"
    assert "authentication: basic-auth" in proc.stdout


# ----------------------------------------------------------------------------------------------
# issue 19, item 11: the server script for real, on loopback


def _post_experiment(port: int, name: str, auth: tuple[str, str] | None = None) -> int:
    """HTTP status of creating an experiment at the server on 127.0.0.1:``port`` (anonymous without ``auth``)."""
    import base64
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/create",
                                 data=json.dumps({"name": name}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _serve(tmp_path: Path, port: int, **env) -> subprocess.Popen:
    """slurm/mlflow_server.sbatch with the real mlflow of this environment, on 127.0.0.1:``port``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SLURM_"))}
    full.update({"DISTRAG_REPO": str(REPO), "MLFLOW": str(Path(sys.executable).parent / "mlflow"),
                 "MLFLOW_DIR": str(tmp_path / "store"), "MLFLOW_PORT": str(port), **env})
    tmp_path.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(["bash", str(REPO / "slurm" / "mlflow_server.sbatch")], env=full, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(port: int, proc: subprocess.Popen, seconds: float = 150) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail(f"the MLflow server did not start: {proc.communicate()[0][-3000:]}")


def _stop(proc: subprocess.Popen) -> str:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()[0]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_mlflow_server_on_loopback_for_real(tmp_path):
    """Without authentication (the default) any local user can write runs: what the README says. With
    MLFLOW_AUTH=basic-auth an anonymous write is refused (401) and the admin's is accepted. Before: the store
    was created 0644 in a 0755 folder, readable by every local user."""
    port = _free_port()
    proc = _serve(tmp_path / "open", port)
    try:
        _wait_for(port, proc)
        assert _post_experiment(port, "anyone") == 200  # no authentication: documented, not a bug
    finally:
        _stop(proc)
    store = tmp_path / "open" / "store"
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    assert stat.S_IMODE((store / "mlflow.db").stat().st_mode) == 0o600
    port = _free_port()
    proc = _serve(tmp_path / "auth", port, MLFLOW_AUTH="basic-auth", MLFLOW_TRACKING_USERNAME="admin",
                  MLFLOW_TRACKING_PASSWORD="pw-for-the-test")
    try:
        _wait_for(port, proc)
        assert _post_experiment(port, "anonymous") == 401
        assert _post_experiment(port, "intruder", ("admin", "wrong")) == 401
        assert _post_experiment(port, "admins", ("admin", "pw-for-the-test")) == 200
    finally:
        out = _stop(proc)
    store = tmp_path / "auth" / "store"
    for name in ("mlflow.db", "basic_auth.db", "basic_auth.ini", "flask_secret_key"):
        assert stat.S_IMODE((store / name).stat().st_mode) == 0o600, name
    assert "pw-for-the-test" not in out


def test_basic_auth_without_mlflows_auth_extra_stops_before_announcing_a_uri(tmp_path):
    """Before: the server printed its URI (and wrote tracking_uri.txt for the jobs) and then failed to start,
    Flask-WTF missing. Now the auth app is imported first, and the message says which extra to install."""
    stub = tmp_path / "mlflow_without_auth"
    stub.write_text("#!/usr/bin/env -S python3 -I\nraise SystemExit('must not be started')\n")
    stub.chmod(0o755)
    probe = subprocess.run(["python3", "-I", "-c", "import mlflow.server.auth"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("the system python3 has MLflow's auth app")
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SLURM_"))}
    full.update({"DISTRAG_REPO": str(tmp_path), "MLFLOW": str(stub), "MLFLOW_DIR": str(tmp_path / "store"),
                 "MLFLOW_HOST": "0.0.0.0", "MLFLOW_AUTH": "basic-auth", "MLFLOW_TRACKING_USERNAME": "me",
                 "MLFLOW_TRACKING_PASSWORD": "pw"})
    proc = subprocess.run(["bash", str(REPO / "slurm" / "mlflow_server.sbatch")], env=full, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "tracking URI" not in proc.stdout
    assert "pip install -e '.[auth]'" in proc.stderr and "must not be started" not in proc.stderr
    assert not (tmp_path / "store" / "tracking_uri.txt").exists()


def test_the_project_declares_and_installs_the_auth_extra():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("mlflow[auth]") for req in extras["auth"])
    assert "auth" in next(line for line in (REPO / "Makefile").read_text().splitlines()
                          if line.startswith("EXTRAS ?=")).split("=", 1)[1].strip().split(",")
