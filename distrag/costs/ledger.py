"""Cost ledger: FLOPs, tokens, passages and wall-clock of a run, per category and per phase, as
MLflow-ready totals.

Every run records what it cost, so strategies can be compared at equal compute. The FLOP numbers come
from :mod:`distrag.costs.flops`.

:class:`CostLedger` tallies FLOPs, tokens and passages per category (``train``, ``encode_questions``,
``encode_passages``, ``generate``, or any other valid name) and per phase, times phases with
``time.perf_counter``, records each phase's peak host RSS and peak device memory
(:mod:`distrag.costs.memory`), and flattens everything into MLflow-safe metric names
(:meth:`CostLedger.to_metrics`).
"""

from __future__ import annotations

import copy
import math
import posixpath
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from distrag.costs.memory import PROCESS_MEMORY, PeakMemory, Watch

__all__ = ["STANDARD_CATEGORIES", "CostLedger", "validate_metric_name"]

STANDARD_CATEGORIES: tuple[str, ...] = ("train", "encode_questions", "encode_passages", "generate")
_NAME_CHARS = re.compile(r"^[A-Za-z0-9_\-./ ]+$")
_MAX_NAME = 250  # MLflow's key length limit
_GB = 1e9


def validate_metric_name(name: str) -> str:
    """Return ``name`` if MLflow accepts it as a metric name on every platform, else raise ``ValueError``.

    MLflow allows letters, digits, ``_ - . / space`` (and ``:`` except on Windows, which we refuse), at
    most 250 characters, and a name that is its own normalised path (no ``//``, ``./``, leading ``/``,
    trailing ``/`` or ``..``).
    """
    if not isinstance(name, str) or not _NAME_CHARS.match(name):
        raise ValueError(f"{name!r}: metric names may only use letters, digits, '_', '-', '.', '/' and spaces")
    if len(name) > _MAX_NAME:
        raise ValueError(f"{name!r}: longer than {_MAX_NAME} characters")
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith(("..", "/")):
        raise ValueError(f"{name!r}: must be a normalised relative path (MLflow treats names as files)")
    return name


@dataclass
class _Tally:
    flops: float = 0.0
    tokens: int = 0
    passages: int = 0
    calls: int = 0

    def add(self, flops: float, tokens: int, passages: int) -> None:
        self.flops += flops
        self.tokens += tokens
        self.passages += passages
        self.calls += 1

    def merge(self, other: _Tally) -> None:
        self.flops += other.flops
        self.tokens += other.tokens
        self.passages += other.passages
        self.calls += other.calls


@dataclass
class _PhaseTally(_Tally):
    wall_s: float = 0.0
    device_s: float = 0.0
    entries: int = 0
    by_category: dict[str, float] = field(default_factory=dict)
    peak_rss: int = 0
    """Bytes; 0 = not measured."""
    peak_device: int | None = None
    """Bytes; None = no device in use."""

    def see_peaks(self, rss: int, device: int | None) -> None:
        self.peak_rss = max(self.peak_rss, rss)
        if device is not None:
            self.peak_device = max(self.peak_device or 0, device)


class CostLedger:
    """FLOPs, tokens, passages and wall-clock of a run, per category and per phase.

    * ``add(category, flops, tokens, passages)`` adds to the category's totals and to every open phase.
    * ``with ledger.phase("train/generator"):`` times a phase with ``time.perf_counter``. Phases nest;
      a phase's numbers are *inclusive* (they contain its nested phases, like a profiler's inclusive time),
      while the run totals count every add and every second once: the run's ``wall_s`` is the time spent
      inside outermost phases. Re-entering a phase that is already open raises ``ValueError``. A phase can
      be entered many times; its numbers accumulate.
    * ``n_devices``: devices this process's wall-clock occupies (device-seconds = wall x n_devices).
    * every phase records its peak host RSS and peak device memory (``memory``, default the process's
      :data:`~distrag.costs.memory.PROCESS_MEMORY`; ``None`` records none); the run's peaks are the largest.
    * ``state_dict()`` / ``load_state_dict()`` carry the totals across a resume (time of open phases up
      to the snapshot included); ``merge()`` sums ledgers of ranks (``parallel=True``) or runs/phases.

    Category and phase names become part of MLflow metric names and are validated on use.
    """

    VERSION = 1

    def __init__(self, n_devices: int = 1, clock: Callable[[], float] = time.perf_counter,
                 memory: PeakMemory | None = PROCESS_MEMORY):
        if n_devices < 1:
            raise ValueError("n_devices must be >= 1")
        self.n_devices = int(n_devices)
        self._clock = clock
        self._memory = memory
        self._watches: list[Watch | None] = []
        self._peaks = _PhaseTally()  # the run's peaks (its other fields stay unused)
        self._categories: dict[str, _Tally] = {}
        self._phases: dict[str, _PhaseTally] = {}
        self._open: list[tuple[str, float]] = []
        self._wall_s = 0.0
        self._device_s = 0.0
        self.trainable_params: int | None = None
        self.total_params: int | None = None
        self.generator_weight_bytes: int | None = None

    # -- recording ----------------------------------------------------------------------------

    @contextmanager
    def phase(self, name: str) -> Iterator[CostLedger]:
        """Time a phase (``with ledger.phase("train/generator"): ...``); FLOPs added inside count to it."""
        validate_metric_name(name)
        if any(n == name for n, _ in self._open):
            raise ValueError(f"phase {name!r} is already open")
        tally = self._phases.setdefault(name, _PhaseTally())
        tally.entries += 1
        self._open.append((name, self._clock()))
        self._watches.append(self._memory.start() if self._memory is not None else None)
        try:
            yield self
        finally:
            watch = self._watches.pop()
            if watch is not None:
                self._memory.stop(watch)
                tally.see_peaks(watch.rss, watch.device)
                self._peaks.see_peaks(watch.rss, watch.device)
            popped, start = self._open.pop()
            assert popped == name, "phases must close in the reverse order of opening"
            dt = max(0.0, self._clock() - start)
            tally.wall_s += dt
            tally.device_s += dt * self.n_devices
            if not self._open:
                self._wall_s += dt
                self._device_s += dt * self.n_devices

    def add(self, category: str, flops: float, tokens: int = 0, passages: int = 0) -> None:
        """Record ``flops`` (and the ``tokens`` / ``passages`` they processed) under ``category``.

        Standard categories: ``train``, ``encode_questions``, ``encode_passages``, ``generate``; any other
        MLflow-safe name is allowed (e.g. ``index_build``).
        """
        validate_metric_name(category)
        flops = float(flops)
        if not math.isfinite(flops) or flops < 0:
            raise ValueError(f"flops must be finite and >= 0, got {flops}")
        if tokens < 0 or passages < 0:
            raise ValueError("tokens and passages must be >= 0")
        tokens, passages = int(tokens), int(passages)
        self._categories.setdefault(category, _Tally()).add(flops, tokens, passages)
        for name, _ in self._open:
            tally = self._phases[name]
            tally.add(flops, tokens, passages)
            tally.by_category[category] = tally.by_category.get(category, 0.0) + flops

    def set_params(self, trainable: int | None = None, total: int | None = None, *,
                   generator_weight_bytes: int | None = None) -> None:
        """Record the trainable and total parameter counts (logged as ``cost/trainable_params`` ...) and the bytes
        the generator's base weights take as measured (``cost/generator_weights_gb``: a memory cost that
        ``generator.quantization`` changes, recorded like the FLOPs it does not)."""
        if trainable is not None:
            self.trainable_params = int(trainable)
        if total is not None:
            self.total_params = int(total)
        if generator_weight_bytes is not None:
            self.generator_weight_bytes = int(generator_weight_bytes)

    # -- reading --------------------------------------------------------------------------------

    @property
    def open_phases(self) -> list[str]:
        return [n for n, _ in self._open]

    @property
    def categories(self) -> list[str]:
        return list(self._categories)

    @property
    def phases(self) -> list[str]:
        return list(self._phases)

    def flops(self, category: str | None = None) -> float:
        """Total FLOPs, or those of one category (0 if never used)."""
        if category is None:
            return sum(t.flops for t in self._categories.values())
        t = self._categories.get(category)
        return t.flops if t else 0.0

    @property
    def total_flops(self) -> float:
        return self.flops()

    @property
    def tokens(self) -> int:
        return sum(t.tokens for t in self._categories.values())

    @property
    def passages(self) -> int:
        return sum(t.passages for t in self._categories.values())

    def _open_elapsed(self) -> list[tuple[str, float]]:
        now = self._clock()
        return [(n, max(0.0, now - s)) for n, s in self._open]

    @property
    def wall_s(self) -> float:
        """Seconds spent inside outermost phases (an open phase counts up to now)."""
        open_ = self._open_elapsed()
        return self._wall_s + (open_[0][1] if open_ else 0.0)

    def phase_totals(self, name: str) -> dict[str, Any]:
        """``{flops, tokens, passages, wall_s, device_s, entries, by_category, peak_rss, peak_device}`` of a
        phase (inclusive; peaks in bytes, of its closed entries: 0 / None when not measured)."""
        t = self._phases[name]
        extra = dict(self._open_elapsed()).get(name, 0.0)
        return {"flops": t.flops, "tokens": t.tokens, "passages": t.passages, "wall_s": t.wall_s + extra,
                "device_s": t.device_s + extra * self.n_devices, "entries": t.entries,
                "by_category": dict(t.by_category), "peak_rss": t.peak_rss, "peak_device": t.peak_device}

    @property
    def peak_rss(self) -> int:
        """Largest host RSS of any closed phase, bytes (0: not measured)."""
        return self._peaks.peak_rss

    @property
    def peak_device(self) -> int | None:
        """Largest device memory allocated in any closed phase, bytes (None: no device in use)."""
        return self._peaks.peak_device

    def device_hours(self, n_devices: int | None = None) -> float:
        """Device-hours: ``wall_s * n_devices / 3600`` when ``n_devices`` is given, else the accumulated
        device-seconds (each second weighted by the ledger's ``n_devices`` at the time; sums across merged
        ranks) / 3600."""
        if n_devices is not None:
            return self.wall_s * n_devices / 3600.0
        open_ = self._open_elapsed()
        return (self._device_s + (open_[0][1] * self.n_devices if open_ else 0.0)) / 3600.0

    def to_metrics(self, prefix: str = "cost") -> dict[str, float]:
        """Flat, MLflow-safe metrics::

            {prefix}/total_flops  {prefix}/tokens  {prefix}/passages  {prefix}/wall_s  {prefix}/device_hours
            {prefix}/<category>_flops | _tokens | _passages   (the four standard categories always, 0 if unused)
            {prefix}/trainable_params  {prefix}/total_params  {prefix}/trainable_fraction   (when set)
            {prefix}/generator_weights_gb                     (when set; GB = 1e9 bytes)
            {prefix}/phase.<phase>.flops | .wall_s | .device_hours | .tokens | .passages
            {prefix}/peak_rss_gb  {prefix}/phase.<phase>.peak_rss_gb          (when measured; GB = 1e9 bytes)
            {prefix}/peak_device_gb  {prefix}/phase.<phase>.peak_device_gb    (when a device was in use)
        """
        validate_metric_name(prefix)
        out: dict[str, float] = {
            "total_flops": self.total_flops, "tokens": float(self.tokens), "passages": float(self.passages),
            "wall_s": self.wall_s, "device_hours": self.device_hours(),
        }
        for cat in dict.fromkeys([*STANDARD_CATEGORIES, *self._categories]):
            t = self._categories.get(cat, _Tally())
            out[f"{cat}_flops"] = t.flops
            out[f"{cat}_tokens"] = float(t.tokens)
            out[f"{cat}_passages"] = float(t.passages)
        if self.peak_rss:
            out["peak_rss_gb"] = self.peak_rss / _GB
        if self.peak_device is not None:
            out["peak_device_gb"] = self.peak_device / _GB
        if self.trainable_params is not None:
            out["trainable_params"] = float(self.trainable_params)
        if self.total_params is not None:
            out["total_params"] = float(self.total_params)
            if self.trainable_params is not None and self.total_params > 0:
                out["trainable_fraction"] = self.trainable_params / self.total_params
        if self.generator_weight_bytes is not None:
            out["generator_weights_gb"] = self.generator_weight_bytes / _GB
        for name in self._phases:
            p = self.phase_totals(name)
            for key in ("flops", "wall_s", "tokens", "passages"):
                out[f"phase.{name}.{key}"] = float(p[key])
            out[f"phase.{name}.device_hours"] = p["device_s"] / 3600.0
            if p["peak_rss"]:
                out[f"phase.{name}.peak_rss_gb"] = p["peak_rss"] / _GB
            if p["peak_device"] is not None:
                out[f"phase.{name}.peak_device_gb"] = p["peak_device"] / _GB
        return {validate_metric_name(f"{prefix}/{k}"): float(v) for k, v in out.items()}

    # -- persistence and merging -------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable snapshot. Open phases contribute their time and memory peaks so far (the live
        ledger is not changed), so a checkpoint taken mid-phase resumes with that time counted once."""
        open_ = self._open_elapsed()
        run, phases = copy.copy(self._peaks), {}
        seen = {name: self._memory.peek(w) for (name, _), w in zip(self._open, self._watches) if w is not None}
        for name, t in self._phases.items():
            extra = dict(open_).get(name, 0.0)
            peaks = copy.copy(t)
            if name in seen:
                peaks.see_peaks(seen[name].rss, seen[name].device)
                run.see_peaks(seen[name].rss, seen[name].device)
            phases[name] = {"flops": t.flops, "tokens": t.tokens, "passages": t.passages, "calls": t.calls,
                            "wall_s": t.wall_s + extra, "device_s": t.device_s + extra * self.n_devices,
                            "entries": t.entries, "by_category": dict(t.by_category),
                            "peak_rss": peaks.peak_rss, "peak_device": peaks.peak_device}
        outer = open_[0][1] if open_ else 0.0
        return {
            "version": self.VERSION,
            "n_devices": self.n_devices,
            "wall_s": self._wall_s + outer,
            "device_s": self._device_s + outer * self.n_devices,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "generator_weight_bytes": self.generator_weight_bytes,
            "peak_rss": run.peak_rss,
            "peak_device": run.peak_device,
            "categories": {c: {"flops": t.flops, "tokens": t.tokens, "passages": t.passages, "calls": t.calls}
                           for c, t in self._categories.items()},
            "phases": phases,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this ledger's totals with a snapshot from :meth:`state_dict` (no phase may be open)."""
        if self._open:
            raise RuntimeError(f"cannot load a state while phases are open: {self.open_phases}")
        if state.get("version") != self.VERSION:
            raise ValueError(f"unsupported ledger state version {state.get('version')!r}")
        self.n_devices = int(state["n_devices"])
        self._wall_s = float(state["wall_s"])
        self._device_s = float(state["device_s"])
        self.trainable_params = state.get("trainable_params")
        self.total_params = state.get("total_params")
        self.generator_weight_bytes = state.get("generator_weight_bytes")  # absent from states written before it
        self._peaks = _PhaseTally()
        self._peaks.see_peaks(int(state.get("peak_rss") or 0), state.get("peak_device"))
        self._categories = {validate_metric_name(c): _Tally(float(t["flops"]), int(t["tokens"]),
                                                            int(t["passages"]), int(t["calls"]))
                            for c, t in state["categories"].items()}
        self._phases = {validate_metric_name(n): _PhaseTally(
            float(p["flops"]), int(p["tokens"]), int(p["passages"]), int(p["calls"]), float(p["wall_s"]),
            float(p["device_s"]), int(p["entries"]), {k: float(v) for k, v in p["by_category"].items()},
            int(p.get("peak_rss") or 0), p.get("peak_device"))  # states written before peaks: none measured
            for n, p in state["phases"].items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], clock: Callable[[], float] = time.perf_counter,
                        memory: PeakMemory | None = PROCESS_MEMORY) -> CostLedger:
        ledger = cls(n_devices=int(state["n_devices"]), clock=clock, memory=memory)
        ledger.load_state_dict(state)
        return ledger

    def merge(self, other: CostLedger | Mapping[str, Any], parallel: bool = False) -> CostLedger:
        """Add another ledger (or its ``state_dict``, e.g. gathered from another rank) into this one.

        FLOPs, tokens, passages and device-seconds always add. Wall-clock adds for sequential work
        (``parallel=False``: phases or runs one after another) and takes the maximum for ranks that ran
        at the same time (``parallel=True``). Parameter counts and weight bytes are not additive (the same model
        on every rank / phase) and neither are memory peaks: the larger is kept. Returns ``self``.
        """
        state = other.state_dict() if isinstance(other, CostLedger) else other
        src = CostLedger.from_state_dict(state, memory=None)

        def wall(a: float, b: float) -> float:
            return max(a, b) if parallel else a + b

        for c, t in src._categories.items():
            self._categories.setdefault(c, _Tally()).merge(t)
        for n, p in src._phases.items():
            mine = self._phases.setdefault(n, _PhaseTally())
            mine.merge(p)
            mine.wall_s = wall(mine.wall_s, p.wall_s)
            mine.device_s += p.device_s
            mine.entries += p.entries
            for c, f in p.by_category.items():
                mine.by_category[c] = mine.by_category.get(c, 0.0) + f
            mine.see_peaks(p.peak_rss, p.peak_device)
        self._peaks.see_peaks(src.peak_rss, src.peak_device)
        self._wall_s = wall(self._wall_s, src._wall_s)
        self._device_s += src._device_s
        for attr in ("trainable_params", "total_params", "generator_weight_bytes"):
            a, b = getattr(self, attr), getattr(src, attr)
            setattr(self, attr, b if a is None else a if b is None else max(a, b))
        return self

    def __repr__(self) -> str:
        return (f"CostLedger(total_flops={self.total_flops:.3e}, wall_s={self.wall_s:.1f}, "
                f"categories={self.categories}, phases={self.phases})")
