"""The report's columns, defined once: :data:`COLUMNS`, from which the terminal table, ``table.md``,
``table.csv`` and ``report.html`` are all made.

A :class:`Column` says where its value comes from (``value`` reads a
:class:`~distrag.reporting.results.StrategyResult`) and how it is written (``format`` for ``table.md``,
``terminal`` for the terminal and the HTML page; ``table.csv`` holds the raw value). A table shows a
column only when some row has a value for it, so a metric that only some runs record (device memory, the
index refresh's) costs nothing elsewhere.

**Adding a column** is one entry in :data:`COLUMNS` plus the code that writes the metric it reads. A result
read back from MLflow keeps every metric of its run (:func:`distrag.reporting.tracking.load_group`): its
eval split's quality without the prefix in ``metrics``, the ledger's ``cost/*`` in ``costs``, every other
metric under its full name in ``extra``.

The number formats the report and ``advise`` share (:func:`fmt_flops`, the Wilson interval
:func:`em_interval`) live here too, below the plots and the report that use them.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Literal

from distrag import metric_names as mn
from distrag.reporting.results import StrategyResult


def fmt_flops(x: float | None) -> str:
    """FLOPs with a unit prefix, for people (``3.10 T``); ``-`` when unknown."""
    if x is None:
        return "-"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"


def em_interval(em: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson 95 % interval of an exact-match rate ``em`` (a fraction) measured on ``n`` questions: whether
    two rows differ beyond noise. (0, 1) when nothing was scored."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    mid = (em + z * z / (2 * n)) / denom
    half = z * math.sqrt(em * (1 - em) / n + z * z / (4 * n * n)) / denom
    return max(0.0, mid - half), min(1.0, mid + half)


@dataclass(frozen=True)
class Column:
    """One column of the report's table."""

    key: str
    """Its name in a row of :func:`result_rows` and its field in ``table.csv``."""
    header: str
    """Its heading in the tables; ``{k}`` is replaced by the k the rows were evaluated at."""
    value: Callable[[StrategyResult], Any]
    """Its raw value in one result; None when the run did not measure it (``-`` in the tables)."""
    format: Callable[[Any], str] = str
    """A value as a cell of ``table.md``."""
    terminal: Callable[[Any], str] | None = None
    """A value as a cell on the terminal and in ``report.html``, where it differs from ``format``."""
    show: Literal["measured", "nonzero", "always"] = "measured"
    """When the tables show it: some row has a value, some row a non-zero one, or always."""
    align: Literal["left", "right"] = "right"
    table: bool = True
    """Shown in the tables (terminal, ``table.md``, ``report.html``)."""
    csv: bool = True
    """Written to ``table.csv`` (the raw value; empty when None)."""

    def shown(self, rows: Sequence[dict]) -> bool:
        """Whether the tables of ``rows`` show this column."""
        values = [r.get(self.key) for r in rows]
        if self.show == "always":
            return True
        return any(values) if self.show == "nonzero" else any(v is not None for v in values)

    def cell(self, row: dict, *, terminal: bool = False) -> str:
        """The column's cell in ``row`` (``terminal``: as on the terminal and in ``report.html``)."""
        v = row.get(self.key)
        if v is None:
            return "-"
        return (self.terminal or self.format)(v) if terminal else self.format(v)


# ----------------------------------------------------------------------------------------------
# what the columns read


def _at_k(metrics: dict[str, float], name: str) -> tuple[float | None, int | None]:
    """(value, k) of an at-k metric: its k-free name (``recall``), else ``<name>_at_<k>`` (runs recorded
    before the k-free names); (None, None) when not measured."""
    for key, v in metrics.items():
        head, _, tail = key.rpartition("_at_")
        if head == name and tail.isdigit():
            return metrics.get(name, v), int(tail)
    return metrics.get(name), None


def _percent(name: str) -> Callable[[StrategyResult], float]:
    return lambda r: 100 * r.metrics.get(name, 0.0)


def _percent_at_k(name: str) -> Callable[[StrategyResult], float | None]:
    def value(r: StrategyResult) -> float | None:
        v = _at_k(r.metrics, name)[0]
        return None if v is None else 100 * v

    return value


def _eval_k(r: StrategyResult) -> int | None:
    """The k of the result, else the one its at-k metric names carry."""
    return r.k or next((at for name in mn.AT_K_METRICS if (at := _at_k(r.metrics, name)[1])), None)


def _n(r: StrategyResult) -> int:
    return int(r.metrics.get("n_questions", 0))


def _em_ci(r: StrategyResult) -> tuple[float, float]:
    lo, hi = em_interval(r.metrics.get("em", 0.0), _n(r))
    return 100 * lo, 100 * hi


def _cost(name: str) -> Callable[[StrategyResult], float | None]:
    return lambda r: r.costs.get(name)


def _extra(name: str) -> Callable[[StrategyResult], float | None]:
    return lambda r: r.extra.get(name)


def _blocked_percent(r: StrategyResult) -> float | None:
    share = r.extra.get(mn.INDEX_BLOCKED_SHARE)
    return None if share is None else 100 * share


def _int_or_none(v: float | None) -> int | None:
    return None if v is None else int(v)


def _one_decimal(v: float) -> str:
    return f"{v:.1f}"


def _flops(v: float) -> str:
    return f"{v:.3g}"


def _two_decimals(v: float) -> str:
    return f"{v:.2f}"


# ----------------------------------------------------------------------------------------------
# THE column list: tables in this order; table.csv in this order, the table-only em_ci left out

COLUMNS: tuple[Column, ...] = (
    Column("strategy", "Strategy", lambda r: r.label, align="left"),
    Column("em", "EM", _percent("em"), _one_decimal),
    Column("em_ci", "EM 95% CI", _em_ci, lambda v: f"{v[0]:.1f}-{v[1]:.1f}", show="always", csv=False),
    Column("f1", "F1", _percent("f1"), _one_decimal),
    Column("recall", "Recall@{k}", _percent_at_k("recall"), _one_decimal),
    Column("recall_all", "Recall-all@{k}", _percent_at_k("recall_all"), _one_decimal),
    Column("answer_recall", "Answer recall@{k}", _percent_at_k("answer_recall"), _one_decimal),
    Column("mrr", "MRR@{k}", _percent_at_k("mrr"), _one_decimal),
    Column("ndcg", "nDCG@{k}", _percent_at_k("ndcg"), _one_decimal),
    Column("passage_vectors", "Passages", lambda r: r.passage_vectors or None, align="left"),
    Column("train_flops", "Train FLOPs", lambda r: r.costs.get(mn.COST_TRAIN_FLOPS, 0.0), _flops, fmt_flops),
    Column("total_flops", "Total FLOPs", lambda r: r.costs.get(mn.COST_TOTAL_FLOPS, 0.0), _flops, fmt_flops),
    Column("wall_s", "Wall-clock (s)", lambda r: r.costs.get(mn.COST_WALL_S, r.seconds), lambda v: f"{v:.0f}"),
    Column("device_hours", "Device-hours", _cost(mn.COST_DEVICE_HOURS), lambda v: f"{v:.4f}"),
    Column("trainable_params", "Trainable params", _cost(mn.COST_TRAINABLE_PARAMS), lambda v: f"{int(v):,}"),
    Column("peak_rss_gb", "Peak RSS (GB)", _cost(mn.COST_PEAK_RSS_GB), _two_decimals),
    Column("peak_device_gb", "Peak device (GB)", _cost(mn.COST_PEAK_DEVICE_GB), _two_decimals),
    Column("staleness", "Index staleness (steps)", _extra(mn.INDEX_STALENESS_MEAN), _one_decimal),
    Column("blocked_share", "Blocked on index (%)", _blocked_percent, _one_decimal),
    Column("search_flops", "LR-search FLOPs", lambda r: r.search_flops, _flops, fmt_flops, show="nonzero"),
    Column("n", "Questions", _n),
    Column("n_retrieval", "Retrieval questions", lambda r: _int_or_none(r.metrics.get(mn.N_RETRIEVAL_QUESTIONS))),
    Column("model_card", "Model card", lambda r: f"{r.bundle}/README.md" if r.bundle else None,
           lambda v: f"[{PurePath(v).parent.name}]({v})", lambda v: PurePath(v).parent.name, align="left"),
    # in table.csv only: the interval's ends, what the caption says once, where the row comes from
    Column("em_ci_low", "EM 95% CI low", lambda r: _em_ci(r)[0], table=False),
    Column("em_ci_high", "EM 95% CI high", lambda r: _em_ci(r)[1], table=False),
    Column("k", "k", _eval_k, table=False),
    Column("decoding", "Decoding", lambda r: r.decoding or None, table=False),
    Column("run_id", "MLflow run", lambda r: r.run_id, table=False),
)
"""Every column of the report, in order."""


# ----------------------------------------------------------------------------------------------
# the table from the columns


def result_rows(results: Sequence[StrategyResult]) -> list[dict]:
    """One dict per result: every column's raw value under its key (quality in %; the plots read these)."""
    return [{c.key: c.value(r) for c in COLUMNS} for r in results]


def table_columns(rows: Sequence[dict]) -> list[tuple[Column, str]]:
    """The columns the tables of ``rows`` show, each with its header (``{k}`` filled in)."""
    k = next((r["k"] for r in rows if r.get("k")), "k")
    return [(c, c.header.format(k=k)) for c in COLUMNS if c.table and c.shown(rows)]


def table_caption(rows: Sequence[dict]) -> str:
    """What every row shares, said once: the decoder and k (rows differ only in training)."""
    parts = []
    for key, what in (("decoding", "decoding"), ("k", "k")):
        values = sorted({str(r[key]) for r in rows if r.get(key) is not None})
        if values:
            parts.append(f"{what}={'/'.join(values)}" + (" (MIXED)" if len(values) > 1 else ""))
    text = "All rows evaluated with " + ", ".join(parts) if parts else ""
    if any(r.get("recall") is not None for r in rows):
        text += ("; Recall@k = mean share of each question's gold passages in the top k, Recall-all@k = share of "
                 "questions with all of them")
    if any(r.get("passage_vectors") for r in rows):
        text += "; Passages: base = the base encoder's vectors, re-embedded = the corpus re-encoded after training"
    return text + "." if text else ""


def markdown_table(rows: Sequence[dict]) -> str:
    """``table.md``'s table (without its caption)."""
    cols = table_columns(rows)
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(c.cell(r) for c, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[dict]) -> str:
    """``table.csv``: every CSV column, shown in the tables or not, with its raw value."""
    keys = [c.key for c in COLUMNS if c.csv]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in keys})
    return buf.getvalue()
