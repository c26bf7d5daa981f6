"""Configuration: YAML plus dotted overrides, every problem reported at once under its dotted key, the
config hash, and save/load."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from distrag.config import (
    MAX_VALUES,
    ExperimentConfig,
    bounded_copy,
    build_config,
    load_config,
    parse_overrides,
    parse_value,
    save_config,
)
from distrag.errors import ConfigError
from distrag.strategies import TRAIN_STRATEGIES


def test_defaults_need_no_file():
    cfg = load_config()
    assert cfg == ExperimentConfig()
    assert cfg.train.strategy == "none" and cfg.data.format == "synthetic" and cfg.output_dir == "runs"


def test_every_problem_is_reported_at_once_with_its_dotted_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"train": {"lr": 1e-4, "lr_generator": -1.0}, "index": {"kind": "hnsw"},
                                 "retrieval": {"top_k": "many"}, "colour": "blue"}))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    keys = dict(e.value.problems)
    assert set(keys) == {"train.lr", "train.lr_generator", "index.kind", "retrieval.top_k", "colour"}
    assert "unknown key" in keys["train.lr"] and "unknown key" in keys["colour"]
    assert "greater than 0" in keys["train.lr_generator"]
    assert "'flat', 'ivf' or 'ivfpq'" in keys["index.kind"]
    assert "integer" in keys["retrieval.top_k"]
    msg = str(e.value)
    assert msg.startswith(f"5 problems in {p}:") and "  - index.kind: " in msg


def test_cross_field_checks_name_their_section():
    with pytest.raises(ConfigError) as e:
        build_config({"data": {"format": "jsonl", "path": "q.jsonl"},
                      "train": {"batch_size": 6, "micro_batch_size": 4}})
    keys = dict(e.value.problems)
    assert "corpus_path is required" in keys["data"]
    assert "multiple of train.micro_batch_size" in keys["train"]


def test_unknown_strategy_lists_the_allowed_ones():
    with pytest.raises(ConfigError) as e:
        build_config(overrides=["train.strategy=finetune_everything"])
    ((key, msg),) = e.value.problems
    assert key == "train.strategy"
    assert all(f"'{s}'" in msg for s in TRAIN_STRATEGIES)
    for s in TRAIN_STRATEGIES:
        assert build_config(overrides=[f"train.strategy={s}"]).train.strategy == s


def test_overrides_are_parsed_as_yaml_and_win_over_the_file(tmp_path):
    assert parse_overrides(["train.max_steps=5", "tracking.enabled=false", "sweep.lr_generator=[0.0001, 0.5]",
                            "tracking.uri=", "generator.system_prompt=[not yaml", "data.path=x=y"]) == [
        ("train.max_steps", 5), ("tracking.enabled", False), ("sweep.lr_generator", [0.0001, 0.5]),
        ("tracking.uri", None), ("generator.system_prompt", "[not yaml"), ("data.path", "x=y")]
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  strategy: gen_ft\n  max_steps: 3\nretrieval:\n  top_k: 2\n")
    cfg = load_config(p, ["train.max_steps=7", "index.kind=ivf", "sweep.lr_embedder=[1e-5]"])
    assert (cfg.train.strategy, cfg.train.max_steps, cfg.retrieval.top_k) == ("gen_ft", 7, 2)
    assert cfg.index.kind == "ivf" and cfg.sweep.lr_embedder == [1e-5]
    with pytest.raises(ConfigError, match="the command line") as e:
        build_config(overrides=["train.max_steps"])
    assert e.value.problems == [("train.max_steps", "override must look like key.sub=value")]
    with pytest.raises(ConfigError, match="'output_dir' is not a section"):
        build_config({"output_dir": "runs"}, ["output_dir.sub=1"])


def test_build_config_does_not_change_its_input():
    tree = {"train": {"strategy": "joint"}}
    build_config(tree, ["train.lr_generator=1e-3"])
    assert tree == {"train": {"strategy": "joint"}}


def test_config_hash_ignores_where_results_go_and_how_the_job_is_sliced():
    base = build_config()
    h = base.config_hash()
    assert len(h) == 12 and h == build_config().config_hash()
    same = build_config(overrides=["output_dir=elsewhere", "tracking.uri=sqlite:///x.db", "tracking.enabled=false",
                                   "tracking.run_name=r", "distributed.resume=auto", "distributed.stop_after=3",
                                   "distributed.checkpoint_every=10", "distributed.keep_checkpoints=5"])
    assert same.config_hash() == h
    for override in ("train.lr_generator=1e-3", "train.strategy=joint", "data.synthetic.seed=1",
                     "distributed.zero_stage=3"):
        assert build_config(overrides=[override]).config_hash() != h, override


def test_generator_quantization_shapes_the_hash_and_full_precision_hashes_stay_as_they_were():
    """A quantised run is another configuration (its checkpoints, its comparison group); a full-precision one hashes
    as before ``generator.quantization`` existed, so its checkpoints and recorded groups still match."""
    variants = [[], ["generator.quantization=nf4"], ["generator.quantization=int8"],
                ["generator.quantization=nf4", "generator.quant_compute_dtype=bfloat16"],
                ["generator.quantization=nf4", "generator.double_quant=false"]]
    assert len({build_config(overrides=v).config_hash() for v in variants}) == len(variants)
    tree = build_config().model_dump(mode="json")
    for key in ("quantization", "quant_compute_dtype", "double_quant"):
        del tree["generator"][key]  # the configuration as it was dumped before the fields existed
    tree.pop("tracking")
    tree.pop("output_dir")
    tree.pop("plan")  # added later, and left out of the hash
    del tree["train"]["staleness_probe"]  # a measurement, left out of the hash
    for k in ("resume", "stop_after", "checkpoint_every", "keep_checkpoints", "keep_index_versions", "index_timeout_s",
              "on_index_failure", "index_ranks"):
        del tree["distributed"][k]
    before = hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:12]
    assert build_config().config_hash() == before


def test_save_then_load_round_trips(tmp_path):
    cfg = build_config({"data": {"format": "jsonl", "path": "q.jsonl", "corpus_path": "c.jsonl"}},
                       ["train.strategy=two_phase", "generator.lora.target_modules=[q_proj]", "eval_split=dev"])
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, path)
    assert list(path.parent.iterdir()) == [path]  # written atomically: no temporary file left
    back = load_config(path)
    assert back == cfg and back.config_hash() == cfg.config_hash()


def test_bad_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found") as e:
        load_config(tmp_path / "missing.yaml")
    assert e.value.problems[0][0] == "--config"
    listing = tmp_path / "list.yaml"
    listing.write_text("- train\n- eval\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"\(yaml\)"):
        load_config(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == ExperimentConfig()


# ----------------------------------------------------------------------------------------------
# YAML input: safe_load, every failure named, trees copied within a bound (issue 19 item 8)


LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)) + "output_dir: *i\n"
"""Billion laughs: 9 values, each level 9 aliases of the one before: 9**9 = 387 million strings once expanded."""


@pytest.mark.timeout(30)
def test_an_alias_bomb_is_refused_at_once(tmp_path):
    """Before: the tree was deep-copied through JSON, 40-64 s to a MemoryError traceback."""
    import time

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(LAUGHS)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb\.yaml: \(top level\): it expands to more than 10000 values"):
        load_config(bomb)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(ConfigError, match="expands to more than"):  # a command-line override too
        load_config(None, ["output_dir=" + "[" + ",".join(["&x [1,2,3,4,5,6,7,8,9,10]"] + ["*x"] * 2000) + "]"])


def test_a_self_referencing_alias_is_refused_and_ordinary_aliases_still_work(tmp_path):
    """Before: a recursive alias, a document nested too deep and a YAML date were tracebacks (ValueError
    "Circular reference", RecursionError, TypeError from the JSON copy); each is now one configuration error."""
    loop = tmp_path / "loop.yaml"
    loop.write_text("sweep: &s {strategies: *s}\n")
    with pytest.raises(ConfigError, match=r"loop\.yaml: \(top level\): a YAML alias refers to a value that contains"):
        load_config(loop)
    deep = tmp_path / "deep.yaml"
    deep.write_text("output_dir: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"deep\.yaml: \(yaml\): nested too deeply"):
        load_config(deep)
    dated = tmp_path / "dated.yaml"
    dated.write_text("output_dir: 2024-01-01\n")
    with pytest.raises(ConfigError, match=r"dated\.yaml: output_dir: Input should be a valid string"):
        load_config(dated)
    ok = tmp_path / "ok.yaml"
    ok.write_text("train: {lr_generator: &lr 0.0003, lr_embedder: *lr}\n")
    assert load_config(ok).train.lr_embedder == 0.0003


def test_bounded_copy_counts_every_value_and_override_values_parse_as_yaml():
    shared = [1, 2, 3]
    assert bounded_copy({"a": shared, "b": shared, 3: None}, [10]) == {"a": [1, 2, 3], "b": [1, 2, 3], "3": None}
    with pytest.raises(ValueError, match="expands to more than"):
        bounded_copy({"a": shared, "b": shared}, [8])
    assert MAX_VALUES == 10_000
    assert parse_value("[1, 2]") == [1, 2] and parse_value("a: [") == "a: [" and parse_value("") is None


def test_registering_a_model_needs_a_name_and_a_logged_model():
    from distrag.config import build_config
    from distrag.errors import ConfigError

    assert build_config({"tracking": {"register_model": "rag"}}).tracking.log_model is True  # logged by default
    for bad in ({"register_model": " "}, {"register_model": "rag", "log_model": False}):
        with pytest.raises(ConfigError, match="tracking: tracking.register_model needs a model name and "
                                              "tracking.log_model: true"):
            build_config({"tracking": bad})
