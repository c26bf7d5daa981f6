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
the demo's rows, the sweep's search, ``advise``'s rule and the report's row order. Adding a strategy
is one :class:`Strategy` entry below plus, if it needs one, its loss in :mod:`distrag.training.losses`
(dispatched in :meth:`distrag.training.trainer.Trainer.compute_loss`).

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

Loss = Literal["mnrl", "nll", "rag_sequence", "rag_token", "rag"]
Search = Literal["none", "separate", "sequential", "grid"]


@dataclass(frozen=True)
class Phase:
    """One stage of a strategy: which model trains, with which loss. ``loss='rag'`` in the table means
    the configured ``train.rag_loss`` (resolved by :meth:`Strategy.phases`)."""

    name: str
    train_embedder: bool
    train_generator: bool
    loss: Loss

    @property
    def uses_rag(self) -> bool:
        return self.loss.startswith("rag")

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

    # -- derived -----------------------------------------------------------------------------------
    def phases(self, train: TrainConfig | None = None) -> list[Phase]:
        """The phases to run under ``train`` (RAG loss and two-phase order resolved)."""
        rag = f"rag_{(train.rag_loss if train is not None else 'token')}"
        out = [replace(p, loss=rag) if p.loss == "rag" else p for p in self.table_phases]
        if self.key == "two_phase" and train is not None and train.two_phase_order == "retriever_first":
            out.reverse()
        return out

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
        return any(p.loss == "mnrl" for p in self.table_phases)

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
             "question encoder with MNRL on (question, gold passage) pairs; needs context labels"),
    Strategy("gen_ft", "Ft-Gen", "gen_ft", (GEN,), "separate",
             "LoRA generator with answer NLL given the frozen retriever's top-k"),
    # The generator phase runs first so that it retrieves with the *base* retriever, exactly as when the
    # two components are trained separately.
    Strategy("independent", "Independent", "independent", (GEN, EMBED), "separate",
             "Ft-Gen and Ft-Embed trained separately, then combined; needs context labels"),
    Strategy("two_phase", "Two-phase", "two_phase",
             (Phase("two_phase_generator", False, True, "rag"), Phase("two_phase_retriever", True, False, "rag")),
             "sequential", "generator, then retriever (order configurable), both with the RAG loss"),
    Strategy("joint_sequence", "RAG-Seq", "joint", (Phase("joint_sequence", True, True, "rag_sequence"),),
             "grid", "both at once through the RAG-Sequence marginal likelihood", rag_loss="sequence"),
    Strategy("joint_token", "RAG-Tok", "joint", (Phase("joint_token", True, True, "rag_token"),),
             "grid", "both at once through the RAG-Token marginal likelihood", rag_loss="token"),
)

BY_KEY: dict[str, Strategy] = {s.key: s for s in STRATEGIES}
TRAIN_STRATEGIES: tuple[str, ...] = tuple(dict.fromkeys(s.train_strategy for s in STRATEGIES))
"""Allowed values of ``train.strategy`` (the configuration validates against it)."""


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
    needs_labels = any(p.loss == "mnrl" for p in (phases_for(cfg) if phases is None else phases))
    unlabelled = [q.id for q in train_questions if not q.has_labels]
    if needs_labels and unlabelled:
        no_labels = dict.fromkeys(f"train.strategy={s.train_strategy}" for s in STRATEGIES
                                  if s.trains_embedder and not s.needs_labels)
        raise StrategyError(
            f"strategy '{cfg.train.strategy}' trains the retriever with MNRL on (question, gold passage) pairs, "
            f"but {len(unlabelled)} of {len(train_questions)} training questions have no gold passage ids "
            f"(e.g. {unlabelled[0]!r}). Use {' or '.join(no_labels)}, which need no "
            f"context labels, or give gold_passage_ids in the data.")
