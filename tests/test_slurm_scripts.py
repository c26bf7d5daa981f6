"""slurm/*.sbatch as SLURM runs them: a copy in a spool folder, started in the folder the job was submitted
from, with SLURM_* variables set and stand-ins for ``srun``, ``scontrol``, ``hostname`` and ``mlflow`` on PATH
that record their arguments. Each script is run to its launch line, and the command it would launch is
checked (and parsed by the real argument parser and configuration loader)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from distrag import cli
from distrag.config import load_config

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
SCRIPTS = ["train.sbatch", "sweep.sbatch", "mlflow_server.sbatch"]

# Stand-ins: each appends its arguments (one per line, then "--") and the folder it ran in to $FAKE_OUT/<name>.
STUB = """#!/bin/bash
{{ printf '%s\\n' "$@"; echo "--cwd=$PWD"; echo --; }} >>"$FAKE_OUT/{name}"
{body}
"""
STUBS = {
    "srun": "",
    "scontrol": """case "$1 $2" in
  "show hostnames") printf '%s\\n' $FAKE_NODES ;;
  "show job") printf 'JobId=%s JobName=x\\n   Command=%s\\n   WorkDir=%s\\n' "$3" "$FAKE_COMMAND" "$PWD" ;;
esac""",
    "hostname": """case "${1:-}" in
  -f) echo "$FAKE_HOST.cluster.example" ;;
  -s | "") echo "$FAKE_HOST" ;;
  -I) echo "10.0.0.7 fd00::7" ;;
esac""",
    "mlflow": 'if [[ -f "$FAKE_URI_FILE" ]]; then cp "$FAKE_URI_FILE" "$FAKE_OUT/uri_while_serving"; fi',
}


@dataclass
class FakeCluster:
    """A checkout of the repository (the scripts, launch/train.py, the example configs) somewhere else, a
    submit folder, a spool folder and the stand-ins."""

    root: Path
    repo: Path = field(init=False)
    submit: Path = field(init=False)
    out: Path = field(init=False)

    def __post_init__(self):
        self.repo, self.submit, self.out = self.root / "checkout", self.root / "submit", self.root / "out"
        for d in (self.submit, self.out, self.root / "bin", self.root / "spool", self.repo / "launch"):
            d.mkdir(parents=True)
        shutil.copytree(SLURM, self.repo / "slurm")
        shutil.copytree(REPO / "launch" / "configs", self.repo / "launch" / "configs")
        shutil.copytree(REPO / "distrag" / "configs", self.repo / "distrag" / "configs")
        (self.repo / "launch" / "train.py").write_text("# stand-in\n")
        for name, body in STUBS.items():
            stub = self.root / "bin" / name
            stub.write_text(STUB.format(name=name, body=body))
            stub.chmod(0o755)

    def run(self, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
        """Submit ``script`` of the checkout as SLURM would: its copy runs from the spool folder, in the
        submit folder (not the checkout)."""
        spooled = self.root / "spool" / "slurm_script"
        shutil.copy(self.repo / "slurm" / script, spooled)
        full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MLFLOW", "DISTRAG_"))}
        full.update({
            "PATH": f"{self.root / 'bin'}:{os.environ['PATH']}", "FAKE_OUT": str(self.out), "FAKE_NODES": "n1 n2 n3",
            "FAKE_HOST": "n9", "FAKE_COMMAND": str(self.repo / "slurm" / script),
            "FAKE_URI_FILE": str(self.repo / "mlflow" / "tracking_uri.txt"), "PYTHON": sys.executable,
            "SLURM_JOB_ID": "500", "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_NTASKS_PER_NODE": "4",
            "SLURM_SUBMIT_DIR": str(self.submit), "SLURM_CPUS_PER_TASK": "8", **env})
        return subprocess.run(["bash", str(spooled), *args], cwd=self.submit, env=full, capture_output=True,
                              text=True, timeout=120, check=False)

    def calls(self, name: str) -> list[list[str]]:
        """The argument lists ``name`` was called with (its folder last, as ``--cwd=...``)."""
        path = self.out / name
        if not path.exists():
            return []
        return [c.strip("\n").split("\n") for c in path.read_text().split("\n--\n") if c.strip()]

    def launched(self, name: str = "srun") -> tuple[list[str], Path]:
        (call,) = self.calls(name)
        return call[:-1], Path(call[-1].removeprefix("--cwd="))


@pytest.fixture
def cluster(tmp_path) -> FakeCluster:
    return FakeCluster(tmp_path)


def _after(args: list[str], marker: str) -> list[str]:
    return args[args.index(marker) + 1:]


# ----------------------------------------------------------------------------------------------
# every script


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_syntax(name):
    path = SLURM / name
    assert path.is_file()
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    if shutil.which("shellcheck"):
        res = subprocess.run(["shellcheck", "-s", "bash", str(path)], capture_output=True, text=True, check=False)
        assert res.returncode == 0, res.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_headers_submit_as_they_are(name):
    """SLURM reads #SBATCH lines up to the first command; the log goes to the submit folder (no logs/ that
    might not exist); partition and account are documented; the example paths exist; no week-long limits."""
    lines = (SLURM / name).read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines[1:], 1) if line.strip() and not line.startswith("#"))
    directives = [line for line in lines if line.startswith("#SBATCH")]
    assert directives and all(lines.index(d) < first_command for d in directives)
    (output,) = [d.split("=", 1)[1] for d in directives if d.startswith("#SBATCH --output=")]
    assert "/" not in output and ("%j" in output or "%A" in output)
    text = "\n".join(lines)
    assert "SBATCH_PARTITION" in text and "SBATCH_ACCOUNT" in text
    assert "##SBATCH --partition=" in text and "##SBATCH --account=" in text
    (limit,) = [d.split("=", 1)[1] for d in directives if d.startswith("#SBATCH --time=")]
    days = int(limit.split("-")[0]) if "-" in limit else 0
    assert days <= 1, limit
    examples = set(re.findall(r"\b(?:launch|distrag)/configs/[\w.]+\.yaml", text))
    assert all((REPO / p).is_file() for p in examples), examples
    assert examples or name == "mlflow_server.sbatch"  # the server takes no config


# ----------------------------------------------------------------------------------------------
# train.sbatch


def test_train_launches_launch_train_py_from_the_checkout_submitted_anywhere(cluster):
    (cluster.repo / "mlflow").mkdir()
    (cluster.repo / "mlflow" / "tracking_uri.txt").write_text("http://n9.cluster.example:5000\n")
    res = cluster.run("train.sbatch", "train.seed=1")
    assert res.returncode == 0, res.stderr
    args, cwd = cluster.launched()
    assert cwd == cluster.repo.resolve()  # found through scontrol's Command=, not the spool copy or the submit folder
    assert args[:3] == ["--kill-on-bad-exit=1", "--distribution=block", "--ntasks-per-node=4"]
    config = cluster.repo.resolve() / "launch" / "configs" / "joint_refresh.yaml"  # the default config
    assert _after(args, "--ntasks-per-node=4") == [
        sys.executable, "launch/train.py", "--config", str(config), "tracking.uri=http://n9.cluster.example:5000",
        "distributed.index_rank=11", "distributed.resume=auto", "train.seed=1"]
    load_config(config, _after(args, str(config)))  # what it launches is a valid configuration
    assert ["show", "job", "500"] in [c[:3] for c in cluster.calls("scontrol")]
    assert (cluster.repo / "logs" / "hostfile.500").is_file()
    assert not list(cluster.submit.iterdir())  # nothing written where it was submitted (SLURM's log aside)


def test_train_config_relative_to_the_submit_folder_and_the_uri_from_the_environment(cluster):
    own = cluster.submit / "mine.yaml"
    own.write_text("train: {strategy: two_phase}\n")
    res = cluster.run("train.sbatch", "mine.yaml", "train.max_steps=3", MLFLOW_URI="http://other:5000")
    assert res.returncode == 0, res.stderr
    args, _ = cluster.launched()
    assert args[args.index("--config") + 1] == str(own)
    assert "tracking.uri=http://other:5000" in args and args[-1] == "train.max_steps=3"
    # no URI anywhere: the config's own tracking.uri
    res = cluster.run("train.sbatch", "launch/configs/two_phase_zero3.yaml", MLFLOW_URI="")
    assert res.returncode == 0, res.stderr
    args = cluster.calls("srun")[-1]
    assert not [a for a in args if a.startswith("tracking.uri=")]
    assert args[args.index("--config") + 1] == str(cluster.repo.resolve() / "launch/configs/two_phase_zero3.yaml")
    res = cluster.run("train.sbatch", "nope.yaml")
    assert res.returncode == 2 and "nope.yaml not found" in res.stderr


def test_train_script_index_rank_placement(cluster):
    """The index rank lands on the chosen node (its last slot)."""
    res = cluster.run("train.sbatch", "train.seed=1", INDEX_NODE="n2", SLURM_JOB_ID="77")
    assert res.returncode == 0, res.stderr
    args, _ = cluster.launched()
    assert "distributed.index_rank=7" in args and "train.seed=1" in args  # node 2 of 3, its last slot
    assert (cluster.repo / "logs" / "hostfile.77").read_text() == "n1 slots=4\nn2 slots=4\nn3 slots=4\n"
    res = cluster.run("train.sbatch", INDEX_NODE="nX")
    assert res.returncode == 2 and "not in this allocation" in res.stderr


def test_train_script_essentials():
    text = (SLURM / "train.sbatch").read_text()
    for needle in ("#SBATCH --signal=USR1@120", "#SBATCH --requeue", "scontrol show hostnames",
                   "MASTER_ADDR", "MASTER_PORT", "distributed.index_rank=", "distributed.resume=auto"):
        assert needle in text, needle
    sweep = (SLURM / "sweep.sbatch").read_text()
    assert "SLURM_ARRAY_TASK_ID" in sweep and "tracking.uri=" in sweep and "tracking.experiment=" in sweep


def test_a_repository_that_cannot_be_found_is_an_error(cluster):
    spooled = cluster.root / "spool" / "slurm_script"
    shutil.copy(SLURM / "train.sbatch", spooled)
    env = {"PATH": os.environ["PATH"], "HOME": str(cluster.root)}
    res = subprocess.run(["bash", str(spooled)], cwd=cluster.submit, env=env, capture_output=True, text=True,
                         check=False, timeout=60)
    assert res.returncode == 2 and "DISTRAG_REPO" in res.stderr


# ----------------------------------------------------------------------------------------------
# sweep.sbatch


def _sweep_launch(cluster: FakeCluster, i: int = -1) -> tuple[list[str], list[str]]:
    """(srun options, the distrag sweep arguments) of launch ``i``, checked against the real parser."""
    args = cluster.calls("srun")[i][:-1]
    cut = args.index(sys.executable)
    command = args[cut + 1:]
    assert command[:3] == ["-m", "distrag.cli", "sweep"]
    parsed = cli.build_parser().parse_args(command[2:])
    assert parsed.fn is cli.cmd_sweep
    cfg = load_config(parsed.config, parsed.overrides)
    assert cfg.eval_split == "test"  # the selected models are scored on test; the grid points on dev
    return args[:cut], command[3:]


def test_sweep_array_task_runs_distrag_sweep_for_its_strategy(cluster):
    res = cluster.run("sweep.sbatch", SLURM_ARRAY_JOB_ID="500", SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_TASK_COUNT="3")
    assert res.returncode == 0, res.stderr
    options, command = _sweep_launch(cluster)
    assert options == ["--kill-on-bad-exit=1", "--ntasks=1"]
    config = cluster.repo.resolve() / "distrag" / "configs" / "demo.yaml"
    assert command == ["--config", str(config), "tracking.experiment=distrag-sweep-500", "eval_split=test",
                       "output_dir=runs/sweep/500/two_phase", "sweep.strategies=[two_phase]"]
    assert cluster.launched()[1] == cluster.repo.resolve()
    assert "selected on dev, evaluated on test" in res.stdout


def test_sweep_tasks_cover_every_strategy_once(cluster):
    (cluster.repo / "mlflow").mkdir()
    (cluster.repo / "mlflow" / "tracking_uri.txt").write_text("http://n9.cluster.example:5000\n")
    extra = ["sweep.strategies=[gen_ft,two_phase,joint]", "sweep.joint_reuse_two_phase=true"]
    for task in ("0", "1"):
        res = cluster.run("sweep.sbatch", "distrag/configs/demo.yaml", *extra, SLURM_ARRAY_JOB_ID="600",
                          SLURM_ARRAY_TASK_ID=task, SLURM_ARRAY_TASK_COUNT="2")
        assert res.returncode == 0, res.stderr
    runs = [_sweep_launch(cluster, i)[1] for i in range(2)]
    assert [c[-1] for c in runs] == ["sweep.strategies=[gen_ft]", "sweep.strategies=[two_phase,joint]"]
    assert all("tracking.uri=http://n9.cluster.example:5000" in c and c[-3:-1] == extra for c in runs)
    # joint reuses two-phase's rates: one task runs both, so the array has 2 tasks, not 3
    res = cluster.run("sweep.sbatch", "distrag/configs/demo.yaml", *extra, SLURM_ARRAY_JOB_ID="600",
                      SLURM_ARRAY_TASK_ID="2", SLURM_ARRAY_TASK_COUNT="3")
    assert res.returncode == 2 and "--array=0-1" in res.stderr
    # outside an array: one task, every strategy
    res = cluster.run("sweep.sbatch", "distrag/configs/demo.yaml", *extra)
    assert res.returncode == 0, res.stderr
    assert _sweep_launch(cluster)[1][-1] == "sweep.strategies=[gen_ft,two_phase,joint]"


def test_sweep_bad_config_stops_before_srun(cluster):
    res = cluster.run("sweep.sbatch", "distrag/configs/demo.yaml", "sweep.strategies=[bogus]",
                      SLURM_ARRAY_TASK_ID="0")
    assert res.returncode == 2 and not cluster.calls("srun")
    assert "bogus cannot be swept" in res.stderr and "two_phase" in res.stderr


# ----------------------------------------------------------------------------------------------
# mlflow_server.sbatch


def test_mlflow_server_for_the_cluster_allows_this_nodes_host_headers(cluster):
    res = cluster.run("mlflow_server.sbatch", MLFLOW_HOST="0.0.0.0", MLFLOW_ALLOW_NO_AUTH="1",
                      MLFLOW_EXTRA_ALLOWED_HOSTS="mlflow.example.org")
    assert res.returncode == 0, res.stderr
    args, cwd = cluster.launched("mlflow")
    store = cluster.repo.resolve() / "mlflow"
    assert cwd == cluster.repo.resolve()
    assert args == ["server", "--backend-store-uri", f"sqlite:///{store}/mlflow.db", "--artifacts-destination",
                    f"{store}/artifacts", "--serve-artifacts", "--host", "0.0.0.0", "--port", "5000", "--workers",
                    "2", "--allowed-hosts", "n9.cluster.example:5000,n9:5000,localhost:5000,127.0.0.1:5000,"
                    "10.0.0.7:5000,[fd00::7]:5000,mlflow.example.org"]
    # the URI the other scripts read, there while the server runs and gone when it stops
    assert (cluster.out / "uri_while_serving").read_text() == "http://n9.cluster.example:5000\n"
    assert not (store / "tracking_uri.txt").exists()


def test_mlflow_server_on_loopback_keeps_mlflows_defaults(cluster):
    res = cluster.run("mlflow_server.sbatch", MLFLOW_PORT="5123")
    assert res.returncode == 0, res.stderr
    args, _ = cluster.launched("mlflow")
    assert args[args.index("--host") + 1] == "127.0.0.1" and args[args.index("--port") + 1] == "5123"
    assert "--allowed-hosts" not in args  # localhost:* is MLflow's default: a tunnel on any local port works
    assert not (cluster.out / "uri_while_serving").exists()
    assert "ssh -N -L 5123:127.0.0.1:5123 n9.cluster.example" in res.stdout
