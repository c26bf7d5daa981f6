"""The report's columns, defined once: :data:`COLUMNS`, from which the terminal table, ``table.md``,
``table.csv`` and ``report.html`` are all made.

A :class:`Column` says where its value comes from (``value`` reads a
:class:`~distrag.reporting.results.StrategyResult`) and how it is written (``format`` for ``table.md``,
``terminal`` for the terminal and the HTML page; ``table.csv`` holds the raw value). Each format escapes the
cells it writes (:mod:`distrag.reporting.escaping`: any string can arrive from a recorded run). A table shows a
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
from distrag.reporting.escaping import csv_cell, md_text, md_url
from distrag.reporting.paired import annotate
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
    """A value as a cell of ``table.md``, in plain text (``table.md`` escapes it: :func:`md_text`)."""
    terminal: Callable[[Any], str] | None = None
    """A value as a cell on the terminal and in ``report.html``, where it differs from ``format``."""
    markdown: Callable[[Any], str] | None = None
    """A value as a cell of ``table.md`` already written in Markdown (a link), where it differs from ``format``:
    it escapes the texts it writes itself (:func:`md_text`, :func:`md_url`)."""
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

    def markdown_cell(self, row: dict) -> str:
        """The column's cell in ``row`` as written in ``table.md``: Markdown, every text in it escaped."""
        v = row.get(self.key)
        if v is None:
            return "-"
        return self.markdown(v) if self.markdown is not None else md_text(self.format(v))


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


def _percent(name: str) -> Callable[[StrategyResult], float | None]:
    """An answer metric in %; None for a row that answered nothing (a retrieval-only evaluation has no EM)."""
    return lambda r: None if "em" not in r.metrics else 100 * r.metrics.get(name, 0.0)


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


def _em_ci(r: StrategyResult) -> tuple[float, float] | None:
    if "em" not in r.metrics:  # a retrieval-only row answered nothing
        return None
    lo, hi = em_interval(r.metrics["em"], _n(r))
    return 100 * lo, 100 * hi


def _cost(name: str) -> Callable[[StrategyResult], float | None]:
    return lambda r: r.costs.get(name)


def _extra(name: str) -> Callable[[StrategyResult], float | None]:
    return lambda r: r.extra.get(name)


def _blocked_percent(r: StrategyResult) -> float | None:
    share = r.extra.get(mn.INDEX_BLOCKED_SHARE)
    return None if share is None else 100 * share


def _staleness_gap(r: StrategyResult) -> float | None:
    """Mean recall gap of the adopted index versions (fresh minus stale recall at each adoption), in points."""
    gap = r.extra.get(mn.INDEX_STALENESS_RECALL_GAP_MEAN)
    return None if gap is None else 100 * gap


def _paired(against: str, metric: str, part: str | None = None) -> Callable[[StrategyResult], Any]:
    """A paired comparison of the row (``vs_baseline`` or ``vs_best``): the interval of ``metric``'s difference, in
    points (x100), or one ``part`` of it (``mean``, ``low``, ``high``) for table.csv."""
    def value(r: StrategyResult) -> Any:
        comparison = getattr(r, against)
        iv = comparison.intervals.get(metric) if comparison is not None else None
        if iv is None:
            return None
        scaled = (100 * iv.mean, 100 * iv.low, 100 * iv.high)
        return scaled if part is None else scaled[("mean", "low", "high").index(part)]

    return value


def _mcnemar_p(r: StrategyResult) -> float | None:
    test = r.vs_baseline.mcnemar.get("em") if r.vs_baseline is not None else None
    return None if test is None else test.p_value


def _difference(v: tuple[float, float, float]) -> str:
    return f"{v[0]:+.1f} [{v[1]:+.1f}, {v[2]:+.1f}]"


def _paired_columns() -> tuple[Column, ...]:
    """The paired comparisons: in the tables dEM and dRecall@k against No-FT (with McNemar's p for EM) and dEM
    against the best row; in table.csv the mean and interval ends of dEM, dF1 and dRecall@k against both."""
    shown = (
        Column("dem_vs_base", "dEM vs No-FT [95% CI]", _paired("vs_baseline", "em"), _difference, csv=False),
        Column("mcnemar_p", "McNemar p (EM vs No-FT)", _mcnemar_p, lambda v: f"{v:.3g}"),
        Column("drecall_vs_base", "dRecall@{k} vs No-FT [95% CI]", _paired("vs_baseline", "recall"), _difference,
               csv=False),
        Column("dem_vs_best", "dEM vs best [95% CI]", _paired("vs_best", "em"), _difference, csv=False),
    )
    raw = tuple(Column(f"d{metric}_vs_{name}_{part}", f"d{metric} vs {name} {part}", _paired(against, metric, part),
                       table=False)
                for against, name in (("vs_baseline", "base"), ("vs_best", "best"))
                for metric in ("em", "f1", "recall") for part in ("mean", "low", "high"))
    return shown + raw


def _int_or_none(v: float | None) -> int | None:
    return None if v is None else int(v)


def _one_decimal(v: float) -> str:
    return f"{v:.1f}"


def _flops(v: float) -> str:
    return f"{v:.3g}"


def _two_decimals(v: float) -> str:
    return f"{v:.2f}"


def _card_name(path: str) -> str:
    """A model card's name: its bundle's folder."""
    return PurePath(path).parent.name


def _card_link(path: str) -> str:
    """A model card as a ``table.md`` link: the bundle's folder, linking to the card."""
    return f"[{md_text(_card_name(path))}]({md_url(path)})"


# ----------------------------------------------------------------------------------------------
# THE column list: tables in this order; table.csv in this order, the table-only em_ci left out

COLUMNS: tuple[Column, ...] = (
    Column("strategy", "Strategy", lambda r: r.label, align="left"),
    Column("em", "EM", _percent("em"), _one_decimal),
    Column("em_ci", "EM 95% CI", _em_ci, lambda v: f"{v[0]:.1f}-{v[1]:.1f}", csv=False),
    Column("f1", "F1", _percent("f1"), _one_decimal),
    Column("recall", "Recall@{k}", _percent_at_k("recall"), _one_decimal),
    Column("recall_all", "Recall-all@{k}", _percent_at_k("recall_all"), _one_decimal),
    Column("answer_recall", "Answer recall@{k}", _percent_at_k("answer_recall"), _one_decimal),
    Column("mrr", "MRR@{k}", _percent_at_k("mrr"), _one_decimal),
    Column("ndcg", "nDCG@{k}", _percent_at_k("ndcg"), _one_decimal),
    *_paired_columns(),
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
    Column("staleness_gap", "Staleness recall gap (pts)", _staleness_gap, _one_decimal),
    Column("search_flops", "LR-search FLOPs", lambda r: r.search_flops, _flops, fmt_flops, show="nonzero"),
    Column("n", "Questions", _n),
    Column("n_retrieval", "Retrieval questions", lambda r: _int_or_none(r.metrics.get(mn.N_RETRIEVAL_QUESTIONS))),
    Column("model_card", "Model card", lambda r: f"{r.bundle}/README.md" if r.bundle else None, _card_name,
           markdown=_card_link, align="left"),
    # in table.csv only: the interval's ends, what the caption says once, where the row comes from
    Column("em_ci_low", "EM 95% CI low", lambda r: (_em_ci(r) or (None, None))[0], table=False),
    Column("em_ci_high", "EM 95% CI high", lambda r: (_em_ci(r) or (None, None))[1], table=False),
    Column("k", "k", _eval_k, table=False),
    Column("decoding", "Decoding", lambda r: r.decoding or None, table=False),
    Column("run_id", "MLflow run", lambda r: r.run_id, table=False),
)
"""Every column of the report, in order."""


# ----------------------------------------------------------------------------------------------
# the table from the columns


def result_rows(results: Sequence[StrategyResult]) -> list[dict]:
    """One dict per result: every column's raw value under its key (quality in %; the plots read these). The rows
    are compared question by question first (:func:`distrag.reporting.paired.annotate`)."""
    annotate(results)
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
    if any(r.get("dem_vs_base") is not None or r.get("dem_vs_best") is not None for r in rows):
        text += ("; d<metric> = the row minus No-FT (or minus the best row by EM), in points, over the questions both "
                 "answered, with its 95 % paired bootstrap interval (10,000 resamples); McNemar p: exact test of the "
                 "EM differences; an interval that covers 0 does not tell the two rows apart")
    return text + "." if text else ""


def markdown_table(rows: Sequence[dict]) -> str:
    """``table.md``'s table (without its caption); every cell escaped (a label's ``|``, HTML or line break stays
    text in its own cell)."""
    cols = table_columns(rows)
    lines = ["| " + " | ".join(md_text(h) for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(c.markdown_cell(r) for c, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[dict]) -> str:
    """``table.csv``: every CSV column, shown in the tables or not, with its raw value; a text that a spreadsheet
    would run as a formula (``=``, ``+``, ``-``, ``@``, tab, carriage return first) starts with ``'``
    (:func:`csv_cell`), numbers stay numbers."""
    keys = [c.key for c in COLUMNS if c.csv]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: csv_cell(r.get(k)) for k in keys})
    return buf.getvalue()
