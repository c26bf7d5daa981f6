"""The distributed runner: its resume step in-process, then `launch/train.py` end to end (real processes:
torchrun, gloo, tiny models, every strategy).

The launcher tests are the slowest of the suite (each job pays DeepSpeed's start-up); every one is bounded.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distrag import metric_names as mn
from distrag.config import DistributedConfig, ExperimentConfig, TrainConfig
from distrag.costs.ledger import CostLedger
from distrag.distributed import roles, runner
from distrag.distributed.refresh_client import RefreshStats
from distrag.distributed.runner import TrainerRun, _merged_ledger, needs_index_rank, refresh_metrics
from distrag.distributed.world import DistInfo
from distrag.errors import CheckpointError

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------
# in-process: the resume step of a single trainer


@pytest.fixture
def single_trainer(clean_env):
    """The role context of a process started without a launcher (one trainer, no process group)."""
    return roles.init_roles(DistributedConfig(), with_index_rank=False)


def _cfg(tmp_path: Path, resume: str | None = None, seed: int = 0) -> ExperimentConfig:
    return ExperimentConfig(output_dir=str(tmp_path), train=TrainConfig(seed=seed),
                            distributed=DistributedConfig(resume=resume))


def test_read_checkpoint_fresh_start_then_own_checkpoint(single_trainer, tmp_path):
    run = TrainerRun(_cfg(tmp_path, resume="auto"), single_trainer)
    assert run.read_checkpoint() is None  # auto and nothing saved yet: a fresh start
    run.ckpt.save(3, {"config_hash": run.cfg.config_hash(), "run_id": "r1"}, rank_payload={"ledger": None})
    restored = run.read_checkpoint()
    assert restored.step == 3 and restored.payload["run_id"] == "r1"
    assert restored.path == run.root / "checkpoints" / "step_00000003"


def test_read_checkpoint_refuses_another_configuration(single_trainer, tmp_path):
    other = TrainerRun(_cfg(tmp_path, seed=1), single_trainer)
    path = other.ckpt.save(5, {"config_hash": other.cfg.config_hash()})
    run = TrainerRun(_cfg(tmp_path, resume=str(path)), single_trainer)
    assert run.cfg.config_hash() != other.cfg.config_hash()
    with pytest.raises(CheckpointError, match="another configuration"):
        run.read_checkpoint()


def test_read_checkpoint_explicit_missing_is_an_error(single_trainer, tmp_path):
    run = TrainerRun(_cfg(tmp_path, resume=str(tmp_path / "step_00000009")), single_trainer)
    with pytest.raises(CheckpointError, match="step_00000009"):
        run.read_checkpoint()


@pytest.mark.parametrize("key", ["index_path", "index_client.current.path", "index_client.history[0].path"])
def test_read_checkpoint_refuses_a_path_outside_the_run_folder(single_trainer, tmp_path, monkeypatch, key):
    """Before: a joint run's payload ``index_path`` was opened wherever it pointed (issue 19, item 3); now
    every path a checkpoint names must lie inside the run folder, and nothing is opened otherwise."""
    run = TrainerRun(_cfg(tmp_path / "out", resume="auto"), single_trainer)
    outside = str(tmp_path / "elsewhere" / "v000001")
    inside = str(run.root / "index" / "v000001")
    decision = {"version": 1, "path": inside, "weights_step": 0, "step": 2, "staleness": 2, "swap_s": 0.0}
    client = {"current": dict(decision), "history": [dict(decision)], "stats": {}}
    payload = {"config_hash": run.cfg.config_hash(), "index_path": inside, "index_client": client}
    if key == "index_path":
        payload["index_path"] = outside
    elif key == "index_client.current.path":
        client["current"]["path"] = outside
    else:
        client["history"][0]["path"] = outside
    run.ckpt.save(4, payload, rank_payload={"ledger": None})
    opened = []
    monkeypatch.setattr(runner.index_store, "load", lambda p, **kw: opened.append(p))
    with pytest.raises(CheckpointError, match=rf"{re.escape(key)}.*{re.escape(outside)}.*outside the run folder"):
        run.read_checkpoint()
    assert not opened


def test_a_forged_checkpoint_naming_an_outside_index_is_refused_before_anything_opens(single_trainer, tmp_path,
                                                                                      monkeypatch):
    """Before: the unsigned payload was read and its ``index_path`` opened; the signature was checked later,
    and only when a DeepSpeed engine was loaded."""
    from distrag.distributed import checkpoint as ck
    from distrag.distributed import run_secret

    run = TrainerRun(_cfg(tmp_path / "out", resume="auto"), single_trainer)
    path = run.ckpt.save(4, {"config_hash": run.cfg.config_hash()}, rank_payload={"ledger": None})
    torch.save({"step": 4, "payload": {"config_hash": run.cfg.config_hash(),
                                       "index_path": str(tmp_path / "elsewhere")}}, path / "trainer_state.pt")
    m = json.loads((path / ck.MANIFEST).read_text())
    m["files"] = {rel: {"size": (path / rel).stat().st_size, "sha256": ck._sha256(path / rel)}
                  for rel in ck._files(path)}
    m["signature"] = run_secret.sign(run_secret.run_secret(tmp_path / "attacker"), ck._signed_text(m))
    (path / ck.MANIFEST).write_text(json.dumps(m))
    opened = []
    monkeypatch.setattr(runner.index_store, "load", lambda p, **kw: opened.append(p))
    run = TrainerRun(_cfg(tmp_path / "out", resume=str(path)), single_trainer)
    with pytest.raises(CheckpointError, match="signature does not verify"):
        run.read_checkpoint()
    assert not opened


def _trainer_ctx(trainer_rank: int, n_trainers: int = 2) -> roles.DistContext:
    return roles.DistContext(DistInfo(rank=trainer_rank, world_size=n_trainers + 1, local_rank=trainer_rank,
                                            role="trainer", trainer_rank=trainer_rank, n_trainers=n_trainers,
                                            index_rank=n_trainers))


def test_the_frozen_index_build_is_charged_once_in_the_merged_ledger(tmp_path):
    """Every trainer sets up the experiment, but only trainer 0 builds the index (the others load it): only
    trainer 0's ledger starts with the build, so the merged ledger holds it once, not once per trainer."""
    build = CostLedger()
    with build.phase(mn.PHASE_INDEX_BUILD):
        build.add("encode_passages", 1.47e11, passages=100)
    ledgers = []
    for rank in (0, 1):
        run = TrainerRun(_cfg(tmp_path), _trainer_ctx(rank))
        run.exp = SimpleNamespace(index_ledger=build)
        led = run._start_ledger(None)
        with led.phase("joint_token"):
            led.add("train", 1e12)
        ledgers.append(led.state_dict())
    total = _merged_ledger(ledgers)
    assert total.phase_totals(mn.PHASE_INDEX_BUILD)["flops"] == pytest.approx(1.47e11)
    assert total.flops("encode_passages") == pytest.approx(1.47e11) and total.flops("train") == pytest.approx(2e12)


def test_the_index_rank_adds_its_device_time_and_the_versions_no_trainer_adopted(tmp_path):
    run = TrainerRun(_cfg(tmp_path), _trainer_ctx(0))
    for v in (1, 2, 3):  # the index rank published three versions ...
        (run.root / "index" / f"v{v:06d}").mkdir(parents=True)
        (run.root / "index" / f"v{v:06d}" / "manifest.json").write_text("{}")
    run.client = SimpleNamespace(stats=RefreshStats(n_adopted=2))  # ... trainer 0 adopted (and was charged) two
    run.exp = SimpleNamespace(splits=SimpleNamespace(corpus=_Passages(["a", "b"])))
    run.trainer = SimpleNamespace(corpus_pass_flops=lambda: 10.0)  # one pass over the corpus: 10 FLOPs
    led = run._index_rank_ledger(7200.0)
    p = led.phase_totals(mn.PHASE_INDEX_RANK)
    assert p["flops"] == 10.0 and p["passages"] == 2 and led.flops("encode_passages") == 10.0
    assert p["wall_s"] == 7200.0 and led.device_hours() == pytest.approx(2.0)
    trainers = _merged_ledger([CostLedger().state_dict()])
    trainers.merge(led, parallel=True)  # in parallel with the trainers: device time adds, wall-clock does not
    assert trainers.device_hours() == pytest.approx(2.0) and trainers.wall_s == 7200.0


class _Passages(list):
    def texts(self) -> list[str]:
        return list(self)


def test_refresh_metrics_per_trainer_and_overall():
    stats = [RefreshStats(blocked_s=2.0, n_adopted=1).summary(100.0), RefreshStats(blocked_s=4.0).summary(100.0)]
    stats[0]["staleness_mean"] = stats[1]["staleness_mean"] = 1.5
    m = refresh_metrics(stats)
    assert m["index/trainer0/blocked_s"] == 2.0 and m["index/trainer1/blocked_share"] == pytest.approx(0.04)
    assert m[mn.INDEX_BLOCKED_S] == 3.0 and m[mn.INDEX_BLOCKED_SHARE] == pytest.approx(0.03)
    assert m[mn.INDEX_STALENESS_MEAN] == 1.5 and mn.INDEX_STALENESS_MAX in m
    assert refresh_metrics([]) == {}


@pytest.mark.parametrize("strategy,refresh_every,expect", [
    ("joint", 2, True), ("joint", 0, False), ("gen_ft", 2, False), ("two_phase", 2, True)])
def test_index_rank_only_when_a_trained_retriever_is_refreshed(strategy, refresh_every, expect):
    cfg = ExperimentConfig(train=TrainConfig(strategy=strategy, refresh_every=refresh_every))
    assert needs_index_rank(cfg) is expect


# ----------------------------------------------------------------------------------------------
# launch/train.py end to end


def _free_port() -> int:
    # the job uses port, port+1 and port+2
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000:
            try:
                for off in (1, 2):
                    with socket.socket() as s2:
                        s2.bind(("127.0.0.1", port + off))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port triple")


@pytest.fixture(scope="module")
def job_root(tmp_path_factory, tiny_encoder_dir, tiny_lm_dir):
    root = tmp_path_factory.mktemp("launch")
    (root / "cfg.yaml").write_text(f"""
data: {{format: synthetic, synthetic: {{n_entities: 12, n_single_hop: 24, n_two_hop: 8}}}}
embedder: {{model: {tiny_encoder_dir}, max_length: 64}}
generator: {{model: {tiny_lm_dir}, max_new_tokens: 4, max_passage_chars: 100}}
retrieval: {{top_k: 3}}
train: {{strategy: joint, rag_loss: token, train_k: 2, batch_size: 2, micro_batch_size: 1, max_steps: 6}}
distributed: {{index_timeout_s: 120}}
tracking: {{experiment: launch-tests}}
""")
    return root


def launch(root: Path, nproc: int, out: str, *overrides: str, timeout: int = 300) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), str(REPO / "launch" / "train.py"), "--config",
           str(root / "cfg.yaml"), f"output_dir={root / out}",
           f"tracking.uri=sqlite:///{root / out / 'mlflow.db'}", *overrides]
    (root / out).mkdir(parents=True, exist_ok=True)
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    log = p.stdout + p.stderr
    (root / out / "job.log").write_text(log)
    return p.returncode, log


def run_dir(root: Path, out: str) -> Path:
    dirs = list((root / out / "distributed").glob("*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def _finished_runs(db: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("launch-tests")
    return client.search_runs([exp.experiment_id])


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("stage", [2, 3])
def test_joint_with_async_index_refresh(job_root, stage, tiny_encoder_dir):
    """2 trainers + 1 index rank: versions are published, both trainers adopt each at the same step,
    the retriever trains (gradients reached it), one MLflow run records it all."""
    out = f"joint_z{stage}"
    rc, log = launch(job_root, 3, out, f"distributed.zero_stage={stage}", "train.refresh_every=2",
                     "train.max_steps=12")
    assert rc == 0, log[-4000:]
    rd = run_dir(job_root, out)
    versions = sorted(p.name for p in (rd / "index").glob("v*"))
    assert len(versions) >= 2, versions
    a0 = json.loads((rd / "adoptions_trainer0.json").read_text())
    a1 = json.loads((rd / "adoptions_trainer1.json").read_text())
    assert a0, "trainers adopted no index version"
    assert [(d["version"], d["step"]) for d in a0] == [(d["version"], d["step"]) for d in a1]
    assert [d["version"] for d in a0] == sorted({d["version"] for d in a0})
    # the question encoder moved (gradients reached it through p(z|q)), LoRA adapters were saved gathered
    from safetensors.torch import load_file

    model_dir = next((job_root / out / "models").glob("joint_token-*"))
    base = load_file(str(Path(tiny_encoder_dir) / "model.safetensors"))
    tuned = load_file(str(next((model_dir / "embedder").rglob("model.safetensors"))))
    changed = [k for k in base if k in tuned and not torch.equal(base[k], tuned[k])]
    assert changed, "no encoder weight changed under joint training"
    adapter = load_file(str(model_dir / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.numel() > 0 for v in lora_b) and any(v.abs().sum() > 0 for v in lora_b)
    runs = _finished_runs(job_root / out / "mlflow.db")
    assert len(runs) == 1  # one run per experiment, not per rank
    m = runs[0].data.metrics
    assert m["dist/n_trainers"] == 2 and m["dist/index_versions"] >= 1
    assert m["index/version"] >= 1 and "index/staleness_steps" in m and "test/em" in m
    assert m["cost/train_flops"] > 0
    # the frozen index build is charged once (trainer 0 built it), like the one re-embedding after training
    assert m["cost/phase.index_build.flops"] == pytest.approx(m["cost/phase.index_rebuild.flops"], rel=1e-9)
    # the index rank's device time is counted; blocked time and staleness are logged per trainer and overall
    assert m["cost/phase.index_rank.device_hours"] > 0
    assert m["cost/device_hours"] > m["cost/phase.index_rank.device_hours"]
    for name in ("index/blocked_s", "index/trainer0/blocked_s", "index/trainer1/blocked_s"):
        assert m[name] >= 0.0, name
    assert 0.0 <= m["index/blocked_share"] < 1.0 and m["index/staleness_mean"] >= 0.0
    assert m["index/staleness_max"] >= m["index/staleness_mean"]
    assert m["test/recall"] == m["test/recall_at_3"]  # k-free name next to the k-named one


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_joint_with_a_pool_of_two_index_ranks(job_root):
    """2 trainers + 2 index ranks through the launcher: every version is one folder of both ranks' shards, both
    trainers adopt the same versions at the same steps, trainer 0 logs what staleness costs at each adoption, and
    the index ranks' two devices are charged."""
    out = "pool"
    rc, log = launch(job_root, 4, out, "distributed.index_ranks=2", "train.refresh_every=2", "train.max_steps=12")
    assert rc == 0, log[-4000:]
    rd = run_dir(job_root, out)
    versions = sorted((rd / "index").glob("v*"))
    assert versions and not list((rd / "index_parts").glob("*/part*"))
    m = json.loads((versions[-1] / "manifest.json").read_text())
    assert m["n_shards"] == 2 and m["extra"]["index_ranks"] == 2 and m["shards"][1]["start"] == m["shards"][0]["stop"]
    a0 = json.loads((rd / "adoptions_trainer0.json").read_text())
    a1 = json.loads((rd / "adoptions_trainer1.json").read_text())
    assert a0 and [(d["version"], d["step"]) for d in a0] == [(d["version"], d["step"]) for d in a1]
    (run,) = _finished_runs(job_root / out / "mlflow.db")
    metrics = run.data.metrics
    assert metrics["dist/n_trainers"] == 2 and metrics[mn.INDEX_VERSIONS_ADOPTED] == len(a0)
    assert mn.INDEX_STALENESS_RECALL_GAP in metrics and mn.INDEX_STALENESS_RECALL_GAP_MEAN in metrics
    assert metrics[mn.INDEX_STALENESS_PROBE_TOTAL_S] > 0
    from mlflow.tracking import MlflowClient

    gaps = MlflowClient(tracking_uri=f"sqlite:///{job_root / out / 'mlflow.db'}").get_metric_history(
        run.info.run_id, mn.INDEX_STALENESS_RECALL_GAP)
    assert [g.step for g in gaps] == [d["step"] for d in a0]  # one probe per adoption, at its step
    wall_h = metrics["cost/phase.index_rank.wall_s"] / 3600
    assert metrics["cost/phase.index_rank.device_hours"] == pytest.approx(2 * wall_h, rel=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["gen_ft", "independent", "two_phase"])
def test_other_strategies_through_the_launcher(job_root, strategy):
    out = f"s_{strategy}"
    rc, log = launch(job_root, 2, out, f"train.strategy={strategy}", "train.max_steps=2")
    assert rc == 0, log[-4000:]
    hist = json.loads((run_dir(job_root, out) / "history.json").read_text())
    phases = [h["phase"] for h in hist]
    expected = {"gen_ft": ["gen_ft"] * 2, "independent": ["gen_ft"] * 2 + ["embed_ft"] * 2,
                "two_phase": ["two_phase_generator"] * 2 + ["two_phase_retriever"] * 2}[strategy]
    assert phases == expected
    (run,) = _finished_runs(job_root / out / "mlflow.db")
    m = run.data.metrics
    if strategy != "gen_ft":  # 2 trainers, no index rank: the frozen index build charged once, not twice
        assert m["cost/phase.index_build.flops"] == pytest.approx(m["cost/phase.index_rebuild.flops"], rel=1e-9)
    assert "cost/phase.index_rank.device_hours" not in m and "index/blocked_s" not in m


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_corpus_read_from_disk_through_the_launcher(job_root):
    """data.corpus_on_disk with 2 trainers + 1 index rank: trainer 0 writes the side files once (trainer 1 opens
    them after it), the index rank streams the file, and the versions it publishes are adopted at the same steps."""
    from distrag.config import SyntheticConfig
    from distrag.data.synthetic import make_synthetic

    world = make_synthetic(SyntheticConfig(n_entities=12, n_single_hop=24, n_two_hop=8))
    corpus, questions = job_root / "corpus.jsonl", job_root / "questions.jsonl"
    corpus.write_text("".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n" for p in world.corpus))
    questions.write_text("".join(json.dumps({"id": q.id, "question": q.text, "answers": list(q.answers),
                                             "gold_passage_ids": list(q.gold_passage_ids)}) + "\n"
                                 for q in world.questions))
    out = "on_disk"
    rc, log = launch(job_root, 3, out, "data.format=jsonl", f"data.path={questions}", f"data.corpus_path={corpus}",
                     "data.corpus_on_disk=true", "index.chunk_passages=16", "train.refresh_every=2",
                     "train.max_steps=20")  # enough steps for a version to arrive on a loaded CI machine
    assert rc == 0, log[-4000:]
    assert len(list((job_root / out / "corpus").glob("*/corpus.json"))) == 1  # written once, by trainer 0
    assert not list((job_root / out / "corpus").glob(".*"))  # no temporary folder left
    rd = run_dir(job_root, out)
    versions = sorted((rd / "index").glob("v*"))
    assert versions and json.loads((versions[0] / "manifest.json").read_text())["extra"]["corpus_file"] == str(corpus)
    a0 = json.loads((rd / "adoptions_trainer0.json").read_text())
    a1 = json.loads((rd / "adoptions_trainer1.json").read_text())
    assert a0 and [(d["version"], d["step"]) for d in a0] == [(d["version"], d["step"]) for d in a1]
    (run,) = _finished_runs(job_root / out / "mlflow.db")
    assert "test/em" in run.data.metrics and run.data.metrics["cost/phase.index_build.flops"] > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resume_equals_uninterrupted_run(job_root):
    """Stopped at step 3 (checkpoint, exit) and resumed = the uninterrupted run, loss by loss (ZeRO-3)."""
    common = ("distributed.zero_stage=3", "tracking.enabled=false")
    rc, log = launch(job_root, 2, "full", *common)
    assert rc == 0, log[-4000:]
    rc, log = launch(job_root, 2, "cut", *common, "distributed.stop_after=3")
    assert rc == 0, log[-4000:]
    rd = run_dir(job_root, "cut")
    assert not (rd / "history.json").exists()
    assert (rd / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    rc, log = launch(job_root, 2, "cut", *common, "distributed.resume=auto")
    assert rc == 0, log[-4000:]
    full = json.loads((run_dir(job_root, "full") / "history.json").read_text())
    resumed = json.loads((rd / "history.json").read_text())
    assert len(full) == len(resumed) == 6
    for a, b in zip(full, resumed):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5, abs=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_explicit_resume_from_missing_checkpoint_is_an_error(job_root):
    rc, log = launch(job_root, 1, "missing", "distributed.resume=/nonexistent/step_00000009",
                     "tracking.enabled=false")
    assert rc != 0
    assert "/nonexistent/step_00000009" in log


def test_refresh_metrics_carry_trainer_0s_staleness_probes():
    probed = RefreshStats(n_adopted=2)
    probed.note_probe(0.1, 0.3, 2.0)
    probed.note_probe(0.0, 0.2, 1.0)
    m = refresh_metrics([probed.summary(10.0), RefreshStats(n_adopted=2).summary(10.0)])
    assert m[mn.INDEX_STALENESS_RECALL_GAP_MEAN] == pytest.approx(0.05) and m[mn.INDEX_STALENESS_RECALL_GAP_MAX] == 0.1
    assert m[mn.INDEX_RETIRING_RECALL_GAP_MEAN] == pytest.approx(0.25) and m[mn.INDEX_RETIRING_RECALL_GAP_MAX] == 0.3
    assert m[mn.INDEX_STALENESS_PROBE_TOTAL_S] == 3.0
    assert mn.INDEX_STALENESS_RECALL_GAP_MEAN not in refresh_metrics([RefreshStats().summary(10.0)])  # no probes


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_secret_readable_by_others_is_an_error_line_under_torchrun(job_root):
    """Before: the index rank exited 2 with no ``error:`` line; torchrun's ChildFailedError was all there was."""
    from distrag.config import load_config
    from distrag.distributed import run_secret

    out, overrides = "open_secret", ("train.refresh_every=2", "tracking.enabled=false")
    cfg = load_config(job_root / "cfg.yaml", [f"output_dir={job_root / out}", *overrides])
    folder = runner.run_dir(cfg)
    run_secret.run_secret(folder)
    run_secret.secret_path(folder).chmod(0o644)
    rc, log = launch(job_root, 2, out, *overrides)
    assert rc != 0
    assert f"error: {run_secret.secret_path(folder)}: the run's secret is readable by others" in log, log[-3000:]


@pytest.mark.parametrize("quantization,stage,offload,refused", [
    ("int8", 3, False, True), ("int8", 3, True, True), ("int8", 2, False, False), ("nf4", 3, False, False),
    ("nf4", 3, True, False), ("nf4", 2, False, False), ("none", 3, False, False)])
def test_zero3_cannot_hold_int8_weights_and_says_what_to_use(quantization, stage, offload, refused):
    """bitsandbytes keeps an int8 layer's weights whole in the layer's state, out of ZeRO-3's reach (each trainer
    would hold all of them): refused in the world's checks, one line naming the key and what to use instead.
    NF4 partitions (test_deepspeed_setup.py trains it under ZeRO-2 and ZeRO-3)."""
    cfg = ExperimentConfig(train=TrainConfig(strategy="gen_ft"), generator={"quantization": quantization},
                           distributed=DistributedConfig(zero_stage=stage, offload=offload))
    problems = runner.world_problems(cfg, 2)
    if not refused:
        assert problems == []
        return
    assert problems == [("distributed.zero_stage", "3 cannot partition generator.quantization=int8 weights; use "
                                                   "distributed.zero_stage=2 (offload off), or "
                                                   "generator.quantization=nf4 with ZeRO-3")]
    # a strategy that never trains the generator never puts it in a DeepSpeed engine
    assert runner.world_problems(cfg.model_copy(update={"train": TrainConfig(strategy="embed_ft")}), 2) == []


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_int8_under_zero3_is_refused_before_any_model_loads(job_root):
    rc, log = launch(job_root, 1, "int8_z3", "train.strategy=gen_ft", "generator.quantization=int8",
                     "distributed.zero_stage=3", "tracking.enabled=false")
    assert rc != 0 and "exitcode: 2" in log, log[-4000:]  # torchrun reports the user error's exit code 2
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert errors == ["error: 1 problem in the configuration: distributed.zero_stage: 3 cannot partition "
                      "generator.quantization=int8 weights; use distributed.zero_stage=2 (offload off), or "
                      "generator.quantization=nf4 with ZeRO-3"]
    assert "models loaded" not in log and not (job_root / "int8_z3" / "distributed").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_qlora_through_the_launcher(job_root):
    """Ft-Gen on an NF4 generator, 2 trainers, ZeRO-2: trains, saves a non-zero adapter, and the one MLflow run
    records the quantisation and the 4-bit base's measured bytes."""
    from safetensors.torch import load_file

    out = "qlora"
    rc, log = launch(job_root, 2, out, "train.strategy=gen_ft", "train.max_steps=2", "generator.quantization=nf4")
    assert rc == 0, log[-4000:]
    assert [h["phase"] for h in json.loads((run_dir(job_root, out) / "history.json").read_text())] == ["gen_ft"] * 2
    adapter = load_file(str(next((job_root / out / "models").glob("gen_ft-*")) / "adapter" /
                            "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    (run,) = _finished_runs(job_root / out / "mlflow.db")
    assert run.data.tags[mn.TAG_GENERATOR_QUANTIZATION] == "nf4" and run.data.params["generator.quantization"] == "nf4"
    # the tiny Llama in NF4 (float32 on the CPU for what stays unquantised): 77,328 bytes, 61 % of its float32 bytes
    assert run.data.metrics[mn.COST_GENERATOR_WEIGHTS_GB] * 1e9 == pytest.approx(77_328)


def test_refresh_metrics_count_versions_adopted_and_published():
    stats = [RefreshStats(blocked_s=1.0, n_adopted=3).summary(10.0), RefreshStats(n_adopted=3).summary(10.0)]
    m = refresh_metrics(stats, published=5)
    assert m[mn.INDEX_VERSIONS_ADOPTED] == 3 and m[mn.INDEX_VERSIONS_PUBLISHED] == 5
    assert refresh_metrics(stats)[mn.INDEX_VERSIONS_PUBLISHED] == 0


def test_one_process_says_that_refresh_needs_an_index_rank(clean_env, monkeypatch, caplog):
    """torchrun with one process (or plain python): train.refresh_every is not ignored silently."""
    monkeypatch.setattr(TrainerRun, "run", lambda self: 0)
    cfg = ExperimentConfig(train=TrainConfig(strategy="joint", refresh_every=2))
    with caplog.at_level("WARNING", logger="distrag.distributed.runner"):
        assert runner.run(cfg) == 0
    assert "train.refresh_every=2 needs an index rank" in caplog.text and "frozen" in caplog.text


class _Tracker:
    """Records what the run tells MLflow at its end."""

    def __init__(self):
        self.tags, self.status = {}, []

    def set_tags(self, tags):
        self.tags.update(tags)

    def end(self, status="FINISHED"):
        self.status.append(status)


@pytest.mark.parametrize(("stopped", "preempted", "raised", "status", "tag"), [
    (False, False, None, "FINISHED", None),
    (True, False, None, "KILLED", "stop_after"),
    (True, True, None, "KILLED", "preempted"),
    (False, False, RuntimeError, "FAILED", None),
])
def test_a_run_is_finished_only_when_it_finished(single_trainer, tmp_path, monkeypatch, stopped, preempted, raised,
                                                 status, tag):
    run = TrainerRun(_cfg(tmp_path), single_trainer)
    tracker = _Tracker()

    def build(restored):
        run.tracker, run.trainer = tracker, SimpleNamespace(stopped=stopped)

    def train():
        if raised:
            raise raised("boom")

    for name in ("setup", "resume"):
        monkeypatch.setattr(run, name, lambda *a: None)
    monkeypatch.setattr(run, "read_checkpoint", lambda: None)
    monkeypatch.setattr(run, "build_trainer", build)
    monkeypatch.setattr(run, "train_loop", train)
    monkeypatch.setattr(run, "finalize", lambda: 0)
    monkeypatch.setattr(runner.preemption, "preemption_requested", lambda: preempted)
    if raised:
        with pytest.raises(raised):
            run.run()
    else:
        assert run.run() == 0
    assert tracker.status == [status] and tracker.tags.get(mn.TAG_STOPPED) == tag


@pytest.mark.parametrize("overrides, world, problems", [
    ({"index_ranks": 2}, 4, []),
    ({"index_ranks": 2}, 2, [("distributed.index_ranks", "2 index ranks leave no trainer in a world of 2")]),
    ({"index_ranks": 3, "index_rank": 1}, 5, [("distributed.index_rank", "leaves no room for it: use -1 (the last "
                                                                         "3 ranks) or a rank >= 2")]),
    ({"index_ranks": 3, "index_rank": 2}, 5, []),  # ranks 0..2 index, 3..4 train
    ({"index_ranks": 2, "index_rank": 4}, 5, []),  # the last rank, as SLURM's script names it
    ({"index_ranks": 1, "index_rank": 1}, 3, []),
])
def test_a_pool_of_index_ranks_is_checked_against_the_world(overrides, world, problems):
    cfg = ExperimentConfig(train=TrainConfig(strategy="embed_ft", refresh_every=2),
                           distributed=DistributedConfig(**overrides))
    found = runner.world_problems(cfg, world)
    assert [k for k, _ in found] == [k for k, _ in problems]
    assert all(m in msg for (_, m), (_, msg) in zip(problems, found))


def test_a_pool_of_index_ranks_counts_each_device_and_one_corpus_pass_per_version(tmp_path):
    run = TrainerRun(_cfg(tmp_path), _trainer_ctx(0))
    run.ctx.info = DistInfo(0, 5, 0, "trainer", 0, 3, 3, n_index=2)
    (run.root / "index" / "v000001").mkdir(parents=True)
    (run.root / "index" / "v000001" / "manifest.json").write_text("{}")
    run.client = SimpleNamespace(stats=RefreshStats(n_adopted=0))
    run.exp = SimpleNamespace(splits=SimpleNamespace(corpus=_Passages(["a", "b"])))
    run.trainer = SimpleNamespace(corpus_pass_flops=lambda: 10.0)
    led = run._index_rank_ledger(3600.0)
    assert led.device_hours() == pytest.approx(2.0) and led.wall_s == 3600.0  # two devices for the hour
    assert led.flops("encode_passages") == 10.0  # the pool shares each pass: one pass of FLOPs per version
