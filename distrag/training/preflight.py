"""Checks of a configuration against the world, the data, the model files, the output folder and the
tracker, run before any model loads; every problem is reported at once, as config validation does.

Config validation (:mod:`distrag.config`) checks each value alone. What it cannot see is checked here:

* :func:`check_setup` (no data needed): the models resolve (hub id, folder, ``gguf_file``), bitsandbytes
  imports when ``generator.quantization`` needs it, and, for
  ``index.kind=ivfpq``, ``index.pq_m`` divides the embedder's dimension (read from the model's config
  file, no weights loaded); ``output_dir`` is a folder this process can write; ``tracking.uri`` has a
  supported scheme and its server answers (:func:`distrag.reporting.tracking.tracking_problem`, a few
  seconds at most). A launched run (``launch/train.py``) adds the checks of the world and of DeepSpeed's
  settings (:func:`distrag.distributed.runner.check_setup`).
* :func:`check_offline` (a machine without the models, e.g. a login node or CI, before a job is submitted): what
  :func:`check_setup` checks, except that a hub id this machine cannot resolve while the hub is offline is a
  logged WARNING, not a problem (the job's machine downloads it); ``index.pq_m`` is then checked against the
  embedder's known shape (:data:`distrag.costs.plan.KNOWN_MODELS`).
* :func:`check_data` (after the data is split): the eval split (and the training split, when the
  strategy trains) holds questions, ``index.n_shards`` <= passages, ``train.hard_negatives`` <= the
  non-gold passages every training question has, and the strategy's data needs (context labels).

:func:`preflight` runs both and raises one :class:`~distrag.errors.ConfigError` listing every problem.
The command line calls it through :meth:`distrag.training.experiment.Experiment.setup` (after the data
split, before the models load); ``launch/train.py`` calls :func:`distrag.distributed.runner.preflight`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from distrag.config import ExperimentConfig
from distrag.data.records import Splits
from distrag.errors import ConfigError, ModelNotFoundError, StrategyError

Problems = list[tuple[str, str]]
log = logging.getLogger("distrag")


def embedder_dim(cfg: ExperimentConfig) -> int | None:
    """The embedder's vector size from its config file (no weights loaded); None when it does not say.
    Raises :class:`ModelNotFoundError` when ``embedder.model`` names nothing loadable."""
    from transformers import AutoConfig

    from distrag.models.embedder import read_st_settings
    from distrag.models.sources import resolve_model

    source = resolve_model(cfg.embedder.model)
    sub = read_st_settings(source)["subfolder"]
    try:
        mcfg = AutoConfig.from_pretrained(source.path_or_id, trust_remote_code=cfg.embedder.trust_remote_code,
                                          **({"subfolder": sub} if sub else {}))
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"embedder.model {cfg.embedder.model!r}: no readable model config "
                                 f"({str(e).splitlines()[0][:200]})") from None
    dim = getattr(mcfg, "hidden_size", None)
    return int(dim) if isinstance(dim, int) else None


def _offline_hub_id(spec: str) -> bool:
    """Whether ``spec`` is a hub id this machine cannot resolve only because the hub is offline."""
    from distrag.models.sources import OFFLINE_ALIASES, hub_offline, looks_like_hub_id

    return spec.strip() not in OFFLINE_ALIASES and looks_like_hub_id(spec) and hub_offline()


def _warn_unresolved(field: str, spec: str) -> None:
    log.warning("%s %r: a hub id with no cached copy here and the hub offline (HF_HUB_OFFLINE); not checked: the "
                "machine that runs the job must download it or have it cached", field, spec)


def _model_problems(cfg: ExperimentConfig, *, generator: bool = True, offline: bool = False) -> Problems:
    """The models resolve (and ``index.pq_m`` fits the embedder); ``generator=False``: the embedder alone (a
    retrieval-only evaluation loads no generator). ``offline``: an unresolvable hub id while the hub is offline is
    a warning (:func:`check_offline`)."""
    from distrag.models.sources import resolve_model
    from distrag.models.text_limits import answer_length_problem

    problems: Problems = []
    try:
        dim = embedder_dim(cfg)
    except ModelNotFoundError as e:
        dim = None
        if offline and _offline_hub_id(cfg.embedder.model):
            from distrag.costs.plan import known_shape

            _warn_unresolved("embedder.model", cfg.embedder.model)
            dim = (known_shape(cfg.embedder.model) or {}).get("hidden_size")
        else:
            problems.append(("embedder.model", _with_fix(str(e))))
    if dim is not None and cfg.index.kind == "ivfpq" and dim % cfg.index.pq_m:
        divisors = [d for d in range(1, dim + 1) if dim % d == 0 and d <= 64]
        problems.append(("index.pq_m", f"{cfg.index.pq_m} does not divide the embedder's dimension {dim} "
                                       f"(index.kind=ivfpq); use one of {divisors}"))
    if not generator:
        return problems
    try:
        source = resolve_model(cfg.generator.model, gguf_file=cfg.generator.gguf_file)
    except ModelNotFoundError as e:
        if offline and _offline_hub_id(cfg.generator.model):
            _warn_unresolved("generator.model", cfg.generator.model)
        elif cfg.generator.gguf_file and "gguf_file" in str(e):
            there = sorted(p.name for p in Path(cfg.generator.model).expanduser().glob("*.gguf"))
            problems.append(("generator.gguf_file", f"{e}; the .gguf files there: {there or 'none'} (or leave "
                                                    "gguf_file unset for a transformers folder)"))
        else:
            problems.append(("generator.model", _with_fix(str(e))))
    else:
        problem = answer_length_problem(cfg.generator.max_new_tokens, generator_config(cfg, source))
        if problem:
            problems.append(("generator.max_new_tokens", problem.removeprefix("generator.max_new_tokens=")))
    if cfg.generator.quantization != "none":
        from distrag.models.quantization import bitsandbytes_problem

        why = bitsandbytes_problem()
        if why:
            problems.append(("generator.quantization", f"{cfg.generator.quantization} {why}"))
    return problems


def generator_config(cfg: ExperimentConfig, source):
    """The generator's config from its config.json (no weights loaded); None when it cannot be read here (loading
    the model reports that) or the model is a GGUF file: transformers parses a whole GGUF file's metadata for
    its config (5-15 s for SmolLM2-135M here), so a GGUF generator is checked when it loads, still before
    anything is generated (:func:`distrag.models.text_limits.check_answer_length`)."""
    from transformers import AutoConfig

    if source.gguf_file:
        return None
    try:
        return AutoConfig.from_pretrained(source.path_or_id, trust_remote_code=cfg.generator.trust_remote_code)
    except (OSError, ValueError):
        return None


def _with_fix(message: str) -> str:
    """A model-not-found message with how to fix it (alias messages already say which package to install)."""
    if "pip install" in message:
        return message
    return (f"{message}; give a local model folder, a .gguf file, an offline alias, or a hub id that is cached "
            "(or reachable with HF_HUB_OFFLINE unset)")


def output_dir_problem(output_dir: str | Path) -> str | None:
    """Why ``output_dir`` cannot hold this run's files (not a folder, cannot be created, not writable), or None.
    Creates the folder when missing and writes (then removes) a probe file."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        return f"{path} exists and is not a folder; point output_dir at a folder (it is created if missing)"
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".distrag_write_probe_", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return (f"{path} is not writable ({e.strerror or e}); point output_dir at a folder you can write "
                f"(e.g. output_dir=$HOME/distrag-runs)")
    return None


def require_output_dir(output_dir: str | Path) -> None:
    """Raise a :class:`ConfigError` naming ``output_dir`` when :func:`output_dir_problem` finds one (for
    code that writes into it before :func:`preflight` runs, e.g. the output folder's lock)."""
    problem = output_dir_problem(output_dir)
    if problem:
        raise ConfigError([("output_dir", problem)])


def check_setup(cfg: ExperimentConfig, *, tracking: bool = True, generator: bool = True,
                offline: bool = False) -> Problems:
    """The problems that need no data: models (the generator only when it will be loaded), output folder,
    tracker (when ``tracking``). A launched run adds the world's and DeepSpeed's
    (:func:`distrag.distributed.runner.check_setup`). ``offline``: as :func:`check_offline`."""
    from distrag.reporting.tracking import tracking_problem

    problems = _model_problems(cfg, generator=generator, offline=offline)
    out = output_dir_problem(cfg.output_dir)
    if out:
        problems.append(("output_dir", out))
    if tracking and cfg.tracking.enabled:
        trk = tracking_problem(cfg.tracking)
        if trk:
            problems.append(("tracking.uri", trk))
    return problems


def check_offline(cfg: ExperimentConfig, *, tracking: bool = False) -> Problems:
    """:func:`check_setup` on a machine without the models (module docstring): the checks that download nothing,
    with a hub id that cannot be resolved offline logged as a WARNING instead of a problem. The tracker is not
    asked unless ``tracking`` (the job's tracker is often not reachable from where configs are written)."""
    return check_setup(cfg, tracking=tracking, offline=True)


def check_data(cfg: ExperimentConfig, splits: Splits) -> Problems:
    """The problems that need the data: empty splits, shards over passages, hard negatives over the
    non-gold passages, the strategy's needs (context labels)."""
    from distrag.strategies import check_strategy_data, phases_for, strategy_of

    problems: Problems = []
    n_passages = len(splits.corpus)
    if not splits.get(cfg.eval_split):
        fraction = {"dev": "data.dev_fraction", "test": "data.test_fraction"}.get(cfg.eval_split)
        fix = f"raise {fraction} above 0 or choose another eval_split" if fraction else "use more questions"
        problems.append(("eval_split", f"the {cfg.eval_split} split of {splits.name} holds no question, so there "
                                       f"is nothing to score; {fix}"))
    if cfg.index.n_shards > n_passages:
        problems.append(("index.n_shards", f"{cfg.index.n_shards} shards but the corpus of {splits.name} has "
                                           f"{n_passages} passage(s); use at most {n_passages}"))
    strategy = strategy_of(cfg)
    if strategy.trains:
        if not splits.train:
            problems.append(("data", f"the train split of {splits.name} holds no question; lower "
                                     "data.dev_fraction / data.test_fraction or use more questions"))
        takes_negatives = any(p.spec.takes_hard_negatives for p in phases_for(cfg))
        if takes_negatives and cfg.train.hard_negatives:
            most_gold = max((len(q.gold_passage_ids or ()) for q in splits.train), default=1)
            room = n_passages - most_gold
            if cfg.train.hard_negatives > room:
                fix = f"set train.hard_negatives <= {room}" if room > 0 else "set train.hard_negatives=0"
                problems.append(("train.hard_negatives",
                                 f"{cfg.train.hard_negatives} but the corpus has {n_passages} passage(s) and a "
                                 f"training question has {most_gold} gold one(s): at most {max(room, 0)} non-gold "
                                 f"passages exist per question; {fix} or use a larger corpus"))
        try:
            check_strategy_data(cfg, splits.train)
        except StrategyError as e:
            problems.append(("train.strategy", str(e)))
    return problems


def preflight(cfg: ExperimentConfig, splits: Splits | None = None, *, tracking: bool = True,
              problems: Problems | None = None, generator: bool = True) -> None:
    """Raise one :class:`ConfigError` with every problem :func:`check_setup` and (given ``splits``)
    :func:`check_data` find, after ``problems`` found by the caller; return quietly when there is none."""
    problems = [*(problems or []), *check_setup(cfg, tracking=tracking, generator=generator)]
    if splits is not None:
        problems += check_data(cfg, splits)
    if problems:
        raise ConfigError(problems)

