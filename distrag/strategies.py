"""The strategy table: every fine-tuning strategy is declared here, once.

=============  ===========  ==========================================  ===============  ========  =======
key            label        phases (what trains: loss)                  LR search        labels
=============  ===========  ==========================================  ===============  ========
none           No-FT        -                                           -                no
embed_ft       Ft-Embed     encoder: MNRL                               m                **yes**
gen_ft         Ft-Gen       generator: NLL                              n                no
independent    Independent  generator: NLL, then encoder: MNRL          m + n separate   **yes**
two_phase      Two-phase    generator: RAG, then encoder: RAG           m + n in turn    no
joint_sequence RAG-Seq      both at once: RAG-Sequence                  m x n            no
joint_token    RAG-Tok      both at once: RAG-Token                     m x n            no
=============  ===========  ==========================================  ===============  ========

(m = embedder learning rates searched, n = generator learning rates; "RAG" in two-phase is the
configured ``train.rag_loss``; the two phases run in ``train.two_phase_order``. Every strategy is
evaluated the same way, with ``generator.decoding`` at ``retrieval.top_k``: rows differ only in training.)

Everything that needs to know about strategies reads this table: the configuration's allowed
``train.strategy`` values, the trainer's phases and random streams, the experiment's labels and MLflow keys,
the demo's rows (which row is combined from which), the sweep's search (and which rates a strategy may
reuse), ``advise``'s rule, the cost projection, the distributed runner (whether a run needs an index rank)
and the report's row order. No code outside this module tests a strategy key by name.

Losses are declared here too (:data:`LOSSES`): what each one needs from the data (context labels, hard
negatives) and how the generator sees the top-k passages in a step (not at all, one prompt with all k, or
k one-passage prompts marginalised over p(z|q)), which is what the cost projection (:mod:`distrag.costs.plan`)
and the checks before a run read. What a loss computes in one micro-batch is registered under the same key in
:mod:`distrag.training.losses` (``LOSS_STEPS``), which the trainer dispatches through. Adding a strategy is one
:class:`Strategy` entry below; adding a loss is one :class:`Loss` entry plus its step in
:mod:`distrag.training.losses`.

How the learning-rate search of each strategy runs (``search``):

* ``separate``: each phase is searched on its own grid from the base models and the selected parts are
  combined (independent: Ft-Embed's encoder + Ft-Gen's generator), m + n runs;
* ``sequential``: phase by phase, each phase continuing from the model the previous one selected
  (two-phase), m + n runs;
* ``grid``: every (embedder rate, generator rate) pair, because both parts train at once and their
  rates interact (joint), m x n runs;
* ``none``: nothing trains, nothing to search.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from distrag.errors import StrategyError

if TYPE_CHECKING:
    from distrag.config import ExperimentConfig, TrainConfig
    from distrag.data.records import Question

Search = Literal["none", "separate", "sequential", "grid"]
Prompts = Literal["none", "concat", "per_passage"]
Situation = Literal["labels", "no_labels_rates_known", "no_labels_rates_searched"]
"""The three cases of the paper's decision rule (``distrag advise``): context labels available; none, with
good learning rates known; none, with learning rates still to search."""


@dataclass(frozen=True)
class Loss:
    """A training loss, as the rest of the package needs to know it (its step: ``training/losses.py``)."""

    key: str
    """The key phases name it by (``Phase.loss``) and the trainer dispatches on."""
    summary: str
    """One line for help texts."""
    generator_prompts: Prompts
    """How the generator sees a question's top-k passages in a step: ``none`` (the generator is not run),
    ``concat`` (one prompt holding all k) or ``per_passage`` (k one-passage prompts, marginalised)."""
    needs_labels: bool = False
    """Trains on (question, gold passage) pairs: every training question needs gold passage ids."""
    marginal: bool = False
    """Marginalises over the top-k with p(z|q) = softmax of the retrieval scores, so the gradient reaches the
    question encoder through the passage scores (the RAG losses)."""
    takes_hard_negatives: bool = False
    """Uses ``train.hard_negatives`` retrieved non-gold passages per question."""
    passage_side: Literal["none", "gold", "retrieved"] = "none"
    """Which passages its step encodes with gradient when the passage side trains (the cost projection reads it):
    ``gold``, each question's gold passage and hard negatives (``train.embed_sides=both``); ``retrieved``, the k
    retrieved passages (``train.rag_passage_grad``); ``none``, never (frozen index vectors only)."""


LOSSES: dict[str, Loss] = {loss.key: loss for loss in (
    Loss("mnrl", "multiple-negatives ranking (InfoNCE, cosine) on (question, gold passage) pairs", "none",
         needs_labels=True, takes_hard_negatives=True, passage_side="gold"),
    Loss("nll", "answer negative log-likelihood given one prompt with the top-k passages", "concat"),
    Loss("rag_sequence", "RAG-Sequence marginal likelihood over the top-k", "per_passage", marginal=True,
         passage_side="retrieved"),
    Loss("rag_token", "RAG-Token marginal likelihood over the top-k", "per_passage", marginal=True,
         passage_side="retrieved"),
)}
"""Every loss a phase can train with. ``rag`` in the table (not a key here) is the configured
``train.rag_loss``: ``rag_sequence`` or ``rag_token``."""
RAG_PLACEHOLDER = "rag"


def loss_spec(key: str) -> Loss:
    """The :class:`Loss` of ``key`` (``rag``, still unresolved, reads as a RAG loss)."""
    return LOSSES["rag_token" if key == RAG_PLACEHOLDER else key]


@dataclass(frozen=True)
class Phase:
    """One stage of a strategy: which model trains, with which loss (a key of :data:`LOSSES`). ``loss='rag'``
    in the table means the configured ``train.rag_loss`` (resolved by :meth:`Strategy.phases`)."""

    name: str
    train_embedder: bool
    train_generator: bool
    loss: str

    @property
    def spec(self) -> Loss:
        """What the table says of this phase's loss."""
        return loss_spec(self.loss)

    @property
    def uses_rag(self) -> bool:
        return self.spec.marginal

    @property
    def lr_key(self) -> str:
        """The ``train`` field holding this phase's learning rate (a phase that trains both parts is
        searched on the grid of both)."""
        return "lr_embedder" if self.train_embedder else "lr_generator"


EMBED = Phase("embed_ft", True, False, "mnrl")
GEN = Phase("gen_ft", False, True, "nll")


@dataclass(frozen=True)
class Strategy:
    key: str
    """Stable key: the MLflow tag ``distrag.strategy``, report rows, model folders."""
    label: str
    """Name in tables and plots (the paper's)."""
    train_strategy: str
    """The ``train.strategy`` value that selects it."""
    table_phases: tuple[Phase, ...]
    """Phases in their default order (see :meth:`phases`)."""
    search: Search
    """How its learning-rate search runs (module docstring)."""
    summary: str
    """One line for help texts."""
    rag_loss: str | None = None
    """When set, the strategy is selected by ``train.rag_loss`` too (joint: RAG-Sequence or RAG-Token)."""
    order_configurable: bool = False
    """Its phases run in ``train.two_phase_order`` (table order = ``generator_first``)."""
    combine_from: tuple[str, str] | None = None
    """``(encoder from, generator from)``: the strategy is the question encoder (and its index) of one
    strategy's training and the generator of another's, trained separately; the demo combines those two rows'
    models instead of training them again, and the sweep searches each part as that strategy does."""
    rates_from: str | None = None
    """A strategy whose selected learning rates this one takes instead of its own search when
    ``sweep.joint_reuse_two_phase`` is set (as the paper did for joint)."""
    advised_for: tuple[Situation, ...] = ()
    """The cases of the paper's decision rule in which it is the recommendation (``distrag advise``)."""

    # -- derived -----------------------------------------------------------------------------------
    def phases(self, train: TrainConfig | None = None) -> list[Phase]:
        """The phases to run under ``train`` (RAG loss and two-phase order resolved)."""
        rag = f"rag_{(train.rag_loss if train is not None else 'token')}"
        out = [replace(p, loss=rag) if p.loss == RAG_PLACEHOLDER else p for p in self.table_phases]
        if self.order_configurable and train is not None and train.two_phase_order == "retriever_first":
            out.reverse()
        return out

    def needs_index_rank(self, train: TrainConfig) -> bool:
        """Whether a multi-process run of it has an index rank: a phase trains the question encoder and the
        passage vectors are refreshed while it does (``train.refresh_every`` > 0)."""
        return train.refresh_every > 0 and any(p.train_embedder for p in self.phases(train))

    @property
    def trains_embedder(self) -> bool:
        return any(p.train_embedder for p in self.table_phases)

    @property
    def trains_generator(self) -> bool:
        return any(p.train_generator for p in self.table_phases)

    @property
    def trains(self) -> bool:
        return bool(self.table_phases)

    @property
    def needs_labels(self) -> bool:
        """Needs gold passage ids for every training question (MNRL trains on (question, gold) pairs)."""
        return any(p.spec.needs_labels for p in self.table_phases)

    @property
    def uses_rag(self) -> bool:
        return any(p.uses_rag for p in self.table_phases)

    def phase_stream(self, index: int) -> int:
        """The random stream (data order, dropout, per-step draws) phase ``index`` uses: phases trained
        separately (``search='separate'``) each draw the stream of a run of their own (0), so Independent's
        phases equal the Ft-Gen and Ft-Embed rows exactly; phases that build on each other draw their own."""
        return 0 if self.search == "separate" else index

    def grid_size(self, m: int, n: int) -> int:
        """Training runs its learning-rate search costs, for m embedder and n generator rates."""
        if self.search == "grid":
            return m * n
        return sum(m if p.train_embedder else n for p in self.table_phases)

    def train_overrides(self) -> dict[str, str]:
        """The ``train`` fields that select this strategy."""
        out = {"strategy": self.train_strategy}
        if self.rag_loss is not None:
            out["rag_loss"] = self.rag_loss
        return out

    def apply(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """A copy of ``cfg`` that runs this strategy."""
        c = cfg.model_copy(deep=True)
        for k, v in self.train_overrides().items():
            setattr(c.train, k, v)
        return c


# The table, in the paper's row order (tables, plots and the demo follow it).
STRATEGIES: tuple[Strategy, ...] = (
    Strategy("none", "No-FT", "none", (), "none",
             "no training: the base retriever and generator (the baseline)"),
    Strategy("embed_ft", "Ft-Embed", "embed_ft", (EMBED,), "separate",
             "the shared encoder (question and passage side) with MNRL on (question, gold passage) pairs; needs "
             "context labels"),
    Strategy("gen_ft", "Ft-Gen", "gen_ft", (GEN,), "separate",
             "LoRA generator with answer NLL given the frozen retriever's top-k"),
    # The generator phase runs first so that it retrieves with the *base* retriever, exactly as when the
    # two components are trained separately.
    Strategy("independent", "Independent", "independent", (GEN, EMBED), "separate",
             "Ft-Gen and Ft-Embed trained separately, then combined; needs context labels",
             combine_from=("embed_ft", "gen_ft"), advised_for=("labels",)),
    Strategy("two_phase", "Two-phase", "two_phase",
             (Phase("two_phase_generator", False, True, "rag"), Phase("two_phase_retriever", True, False, "rag")),
             "sequential", "generator, then retriever (order configurable), both with the RAG loss",
             order_configurable=True, advised_for=("no_labels_rates_searched",)),
    Strategy("joint_sequence", "RAG-Seq", "joint", (Phase("joint_sequence", True, True, "rag_sequence"),),
             "grid", "both at once through the RAG-Sequence marginal likelihood", rag_loss="sequence",
             rates_from="two_phase", advised_for=("no_labels_rates_known",)),
    Strategy("joint_token", "RAG-Tok", "joint", (Phase("joint_token", True, True, "rag_token"),),
             "grid", "both at once through the RAG-Token marginal likelihood", rag_loss="token",
             rates_from="two_phase", advised_for=("no_labels_rates_known",)),
)

BY_KEY: dict[str, Strategy] = {s.key: s for s in STRATEGIES}
TRAIN_STRATEGIES: tuple[str, ...] = tuple(dict.fromkeys(s.train_strategy for s in STRATEGIES))
"""Allowed values of ``train.strategy`` (the configuration validates against it)."""
BASELINE: Strategy = next(s for s in STRATEGIES if not s.trains)
"""The row that trains nothing (No-FT): ``distrag eval`` runs it."""


def advised(situation: Situation) -> list[Strategy]:
    """The strategies the paper's decision rule recommends in ``situation`` (table order)."""
    return [s for s in STRATEGIES if situation in s.advised_for]


def needs_index_rank(cfg: ExperimentConfig) -> bool:
    """Whether a multi-process run of ``cfg`` has an index rank (:meth:`Strategy.needs_index_rank`)."""
    return strategy_of(cfg).needs_index_rank(cfg.train)


def get_strategy(key: str) -> Strategy:
    """The table entry of ``key`` (a report key such as ``joint_token``, or a ``train.strategy``
    value that selects one entry alone)."""
    if key in BY_KEY:
        return BY_KEY[key]
    matches = [s for s in STRATEGIES if s.train_strategy == key]
    if len(matches) == 1:
        return matches[0]
    raise StrategyError(f"unknown strategy {key!r}; choose from {', '.join(BY_KEY)}")


def strategy_of(cfg: ExperimentConfig) -> Strategy:
    """The strategy ``cfg.train`` selects."""
    t = cfg.train
    for s in STRATEGIES:
        if s.train_strategy == t.strategy and (s.rag_loss is None or s.rag_loss == t.rag_loss):
            return s
    raise StrategyError(f"unknown strategy {t.strategy!r}; choose from {', '.join(TRAIN_STRATEGIES)}")


def phases_for(cfg: ExperimentConfig) -> list[Phase]:
    """The phases ``cfg`` runs."""
    return strategy_of(cfg).phases(cfg.train)


def check_strategy_data(cfg: ExperimentConfig, train_questions: list[Question],
                        phases: list[Phase] | None = None) -> None:
    """A phase trained with MNRL needs context labels; say so before anything is trained."""
    needs_labels = any(p.spec.needs_labels for p in (phases_for(cfg) if phases is None else phases))
    unlabelled = [q.id for q in train_questions if not q.has_labels]
    if needs_labels and unlabelled:
        no_labels = dict.fromkeys(f"train.strategy={s.train_strategy}" for s in STRATEGIES
                                  if s.trains_embedder and not s.needs_labels)
        raise StrategyError(
            f"strategy '{cfg.train.strategy}' trains the retriever with MNRL on (question, gold passage) pairs, "
            f"but {len(unlabelled)} of {len(train_questions)} training questions have no gold passage ids "
            f"(e.g. {unlabelled[0]!r}). Use {' or '.join(no_labels)}, which need no "
            f"context labels, or give gold_passage_ids in the data.")
