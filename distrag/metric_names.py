"""The names distrag records in MLflow (tags, metric names, run kinds), defined once.

Writers (the ledger, the experiment, the sweep, the distributed runner, the index client) and readers
(the report, ``advise``) use these constants, so a name cannot drift between the two sides. The
ledger builds its ``cost/*`` names from its own keys (:meth:`distrag.costs.ledger.CostLedger.to_metrics`);
``tests/reporting/test_report.py`` checks that every ``COST_*`` name below is one the ledger writes.
"""

from __future__ import annotations

# -- tags every distrag run carries --------------------------------------------------------------
TAG_KIND = "distrag.kind"
"""What the run is: one of RUN_KINDS."""
TAG_STRATEGY = "distrag.strategy"
"""Strategy key of the table in distrag/strategies.py (``joint_token``, ...)."""
TAG_LABEL = "distrag.label"
"""The strategy's label in tables (``RAG-Tok``, ...)."""
TAG_DATASET = "distrag.dataset"
TAG_EMBEDDER = "distrag.embedder"
TAG_GENERATOR = "distrag.generator"
TAG_CONFIG_HASH = "distrag.config_hash"
"""Hash of the whole configuration (distrag.config.ExperimentConfig.config_hash)."""
TAG_COMPARISON = "distrag.comparison"
"""Hash of the settings rows must share to be compared: the configuration without the strategy's own
fields (distrag.reporting.comparison.comparison_hash)."""
TAG_GROUP = "distrag.group"
"""The comparison group of a strategy or report run: (dataset, models, eval split, k, comparison hash)
hashed (distrag.reporting.comparison.GroupKey.id); the report and ``advise`` never mix groups."""
TAG_EVAL_SPLIT = "distrag.eval_split"
"""Split the run's quality metrics were measured on (their name prefix)."""
TAG_DECODING = "distrag.decoding"
"""The decoder every row of a comparison is evaluated with (generator.decoding)."""
TAG_GENERATOR_QUANTIZATION = "distrag.generator_quantization"
"""How the generator's base weights were stored: ``none``, ``nf4`` or ``int8`` (generator.quantization)."""
TAG_EVAL_K = "distrag.eval_k"
"""The k every row is evaluated at (retrieval.top_k)."""
TAG_PASSAGE_VECTORS = "distrag.passage_vectors"
"""Which encoder embedded the passages the run was evaluated against: "base" or "re-embedded"."""
TAG_SELECTED_RUN = "distrag.selected_run"
"""On a sweep run: the run id of the selected settings' final evaluation."""
TAG_NOTES = "distrag.notes"
TAG_BUNDLE = "distrag.bundle"
"""The folder of the run's pipeline bundle (distrag/serving/bundle.py): ``<output_dir>/models/<strategy>-<hash>``."""
TAG_MODEL_URI = "distrag.model_uri"
"""The run's bundle as an MLflow model: ``runs:/<run id>/pipeline`` (``tracking.log_model``)."""
TAG_MODEL_VERSION = "distrag.model_version"
"""The model-registry version it was registered as (``tracking.register_model``)."""
TAG_STOPPED = "distrag.stopped"
"""On a run that ended before its last step: why (`preempted`, `stop_after`, `interrupted`, `index_failed`);
its MLflow status says it did not finish (KILLED, or FAILED for `index_failed`)."""
STOP_PREEMPTED, STOP_AFTER = "preempted", "stop_after"
STOP_INTERRUPTED, STOP_INDEX_FAILED = "interrupted", "index_failed"

KIND_EVAL = "eval"
"""`distrag eval`: the No-FT baseline."""
KIND_STRATEGY = "strategy"
"""One strategy trained (or combined) and evaluated: a row of the report."""
KIND_SWEEP = "sweep"
"""A strategy's learning-rate search (parent of its points); records the search cost."""
KIND_SWEEP_POINT = "sweep_point"
"""One grid point of a search, evaluated on dev."""
KIND_RETRIEVAL = "retrieval"
"""`distrag eval --retrieval-only`: the base retriever scored on every question, no generator (not a table row)."""
KIND_REPORT = "report"
"""The report files of one comparison group as artifacts (one run per group, updated in place)."""
RUN_KINDS = (KIND_EVAL, KIND_STRATEGY, KIND_SWEEP, KIND_SWEEP_POINT, KIND_RETRIEVAL, KIND_REPORT)

# -- costs (written by CostLedger.to_metrics with prefix "cost") -------------------------------------
COST_PREFIX = "cost"
COST_TRAIN_FLOPS = "cost/train_flops"
COST_TOTAL_FLOPS = "cost/total_flops"
COST_WALL_S = "cost/wall_s"
COST_DEVICE_HOURS = "cost/device_hours"
COST_TRAINABLE_PARAMS = "cost/trainable_params"
COST_TOTAL_PARAMS = "cost/total_params"
COST_PEAK_RSS_GB = "cost/peak_rss_gb"
"""Largest host resident memory (GB = 1e9 bytes) of any phase of the run; per phase:
``phase_metric(phase, "peak_rss_gb")`` (distrag.costs.memory)."""
COST_PEAK_DEVICE_GB = "cost/peak_device_gb"
"""Largest device memory allocated (GB) in any phase; only runs that used a GPU write it (per phase:
``phase_metric(phase, "peak_device_gb")``)."""
COST_GENERATOR_WEIGHTS_GB = "cost/generator_weights_gb"
"""Bytes (GB = 1e9) the generator's base weights take, measured on the loaded model (quantised codes, their scales,
and what stays unquantised: embeddings, norms, LM head): what ``generator.quantization`` saves
(distrag.models.quantization.base_weight_bytes; the run's ``generator.quantization`` is the tag below)."""
COST_OWN_FLOPS = "cost/own_flops"
"""Written by the experiment: FLOPs of a run's own training and evaluation (what a sweep point adds)."""
COST_PHASE_PREFIX = "cost/phase."
PHASE_INDEX_BUILD = "index_build"
"""Ledger phase: the frozen index of the base encoder, built once per experiment."""
PHASE_INDEX_REBUILD = "index_rebuild"
"""Ledger phase: the corpus re-embedded with the trained encoder for evaluation."""


def phase_metric(phase: str, what: str = "flops") -> str:
    """``cost/phase.<phase>.<what>`` (what: flops, wall_s, device_hours, tokens, passages, peak_rss_gb,
    peak_device_gb)."""
    return f"{COST_PHASE_PREFIX}{phase}.{what}"


def phase_values(costs: dict[str, float], what: str = "flops") -> dict[str, float]:
    """``{phase: value}`` of the ``cost/phase.<phase>.<what>`` entries of ``costs``."""
    suffix = f".{what}"
    return {k[len(COST_PHASE_PREFIX):-len(suffix)]: v for k, v in costs.items()
            if k.startswith(COST_PHASE_PREFIX) and k.endswith(suffix)}


# -- quality (prefixed by the split: test/em, dev/f1, ...) ------------------------------------------
def split_metric(split: str, name: str) -> str:
    return f"{split}/{name}"


N_RETRIEVAL_QUESTIONS = "n_retrieval_questions"
"""Questions the retrieval metrics were computed on: every question of the split (the generation, and so EM / F1
and ``n_questions``, may be capped by ``max_eval_questions``)."""

AT_K_METRICS = ("recall", "recall_all", "answer_recall", "mrr", "ndcg")
"""Quality metrics measured at the eval k: logged as ``<name>_at_<k>`` (e.g. ``test/recall_at_5``) and
under the k-free name ``<name>`` (``test/recall``), which MLflow's compare view lines up across runs
evaluated at different k (k itself is the param ``retrieval.top_k`` and the tag ``distrag.eval_k``)."""


def k_free(metrics: dict[str, float]) -> dict[str, float]:
    """The k-free names of the ``<name>_at_<k>`` entries of ``metrics`` (split prefix kept, if any):
    ``{"test/recall_at_5": 0.4}`` -> ``{"test/recall": 0.4}``."""
    out = {}
    for key, v in metrics.items():
        head, _, tail = key.rpartition("_at_")
        if head and tail.isdigit() and head.rsplit("/", 1)[-1] in AT_K_METRICS:
            out[head] = v
    return out


def train_metric(phase: str, name: str) -> str:
    """Training curves: ``train/<phase>/<loss|p_top1|grad_norm>``."""
    return f"train/{phase}/{name}"


# -- sweeps ---------------------------------------------------------------------------------------
SWEEP_SEARCH_FLOPS = "sweep/search_flops"
SWEEP_SEARCH_WALL_S = "sweep/search_wall_s"
SWEEP_N_POINTS = "sweep/n_points"


def sweep_selected(key: str) -> str:
    """``sweep/selected_<lr_embedder|lr_generator>``."""
    return f"sweep/selected_{key}"


# -- distributed runs -----------------------------------------------------------------------------
DIST_N_TRAINERS = "dist/n_trainers"
DIST_INDEX_VERSIONS = "dist/index_versions"
INDEX_VERSION = "index/version"
INDEX_STALENESS_STEPS = "index/staleness_steps"
INDEX_SWAP_S = "index/swap_s"
INDEX_BUILD_S = "index/build_s"
INDEX_BLOCKED_S = "index/blocked_s"
"""Seconds a trainer's training steps waited on the index protocol (polls, swaps, weights hand-offs)."""
INDEX_BLOCKED_SHARE = "index/blocked_share"
"""``index/blocked_s`` over the trainer's training wall-clock."""
INDEX_STALENESS_MEAN = "index/staleness_mean"
"""Mean, over training steps, of the optimizer steps the index in use lagged behind the encoder."""
INDEX_STALENESS_MAX = "index/staleness_max"
INDEX_VERSIONS_PUBLISHED = "index/versions_published"
"""Index versions the index rank had published when training ended (the newest version's number)."""
INDEX_VERSIONS_ADOPTED = "index/versions_adopted"
"""Index versions the trainers adopted (the same on every trainer; a version already superseded by a newer
publication when the trainers next polled is skipped)."""
INDEX_STALENESS_RECALL_GAP = "index/staleness_recall_gap"
"""At an adoption: the probe's Recall@k (answer recall without context labels) against the candidates re-encoded
with the current encoder minus that against the adopted index (``distrag.retrieval.staleness_probe``); positive:
staleness costs recall. Logged at the step of the adoption, next to ``index/staleness_steps``."""
INDEX_STALENESS_RECALL_STALE = "index/staleness_recall_stale"
"""The probe's recall against the adopted index, as published."""
INDEX_STALENESS_RECALL_FRESH = "index/staleness_recall_fresh"
"""The probe's recall against its candidates re-encoded with the current encoder."""
INDEX_RETIRING_RECALL_GAP = "index/retiring_recall_gap"
"""At an adoption: the same gap for the index the adoption replaces, at its oldest (what a refresh recovers)."""
INDEX_RETIRING_STALENESS = "index/retiring_staleness_steps"
"""Steps the replaced index lagged behind the encoder when it was replaced."""
INDEX_STALENESS_PROBE_S = "index/staleness_probe_s"
"""Seconds trainer 0 spent scoring the probe at an adoption (the other trainers wait at the next collective); kept
apart from ``index/blocked_s``."""
INDEX_STALENESS_RECALL_GAP_MEAN = "index/staleness_recall_gap_mean"
"""Run summary: the mean of ``index/staleness_recall_gap`` over the adoptions (``_max``: the largest)."""
INDEX_STALENESS_RECALL_GAP_MAX = "index/staleness_recall_gap_max"
INDEX_RETIRING_RECALL_GAP_MEAN = "index/retiring_recall_gap_mean"
INDEX_RETIRING_RECALL_GAP_MAX = "index/retiring_recall_gap_max"
INDEX_STALENESS_PROBE_TOTAL_S = "index/staleness_probe_total_s"
"""Run summary: seconds of every probe."""
PHASE_STALENESS_PROBE = "staleness_probe"
"""Ledger phase (inside the training phase) of the staleness probes' encodings, charged to trainer 0."""
PHASE_INDEX_RANK = "index_rank"
"""Ledger phase of a distributed run: the index rank's device time (it holds a device for the whole
run) and the re-embeddings it published that no trainer adopted (adopted ones are charged to trainer 0
when it adopts them)."""


def trainer_metric(trainer: int, metric: str) -> str:
    """One trainer's value of an ``index/*`` metric: ``index/blocked_s`` -> ``index/trainer1/blocked_s``."""
    head, _, name = metric.partition("/")
    return f"{head}/trainer{trainer}/{name}"
