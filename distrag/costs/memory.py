"""Peak memory of the phases of a run: host RSS and device memory, exact per phase, nested phases included.

Host: Linux keeps each process's resident high-water mark (``VmHWM`` in ``/proc/self/status``) and lets the
process reset it (``5`` written to ``/proc/self/clear_refs``). Device: ``torch.cuda.max_memory_allocated`` and
``torch.cuda.reset_peak_memory_stats`` (read only when torch has already initialised CUDA; CPU runs record
the host alone). There is one high-water mark per process, but phases nest and several ledgers can have
phases open at once, so every read goes through one :class:`PeakMemory` (:data:`PROCESS_MEMORY`): it reads
the marks, folds them into *every* open :class:`Watch`, and only then resets them. Each watch's peak is
therefore the maximum over its whole lifetime, whatever opened or closed inside it.

Where the mark cannot be reset (another OS, a restricted ``/proc``), a sampler thread reads the resident
size every 20 ms while a watch is open (a peak shorter than that can be missed); without ``/proc`` at all the
process's lifetime peak (``ru_maxrss``, an upper bound) is used.

RSS counts everything resident in the process: models loaded before the phase, allocator caches, libraries.
Resetting the mark resets ``ru_maxrss`` too (the kernel keeps one counter): read a run's peaks from the
ledger (``cost/peak_rss_gb``), not from ``getrusage``.

Freed is not returned: glibc keeps most of what a step freed in small blocks (a fast tokenizer's encodings of
4,096 texts: hundreds of MB) mapped, so it stays resident after the step. :func:`release_free_memory` hands the
free pages back (``malloc_trim``); a corpus encoded chunk by chunk calls it after every chunk, so that the
process does not carry the chunks' leftovers (measured: 390 MB kept after one 10,000-passage chunk of a tiny
BERT, 60 MB with it; benchmarks/bench_corpus_memory.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PROCESS_MEMORY", "PeakMemory", "Watch", "release_free_memory", "rss_bytes"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_SAMPLE_S = 0.02


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """The process's resident size now (``VmRSS``; 0 where ``/proc`` is missing)."""
    kb = _status_kb("VmRSS:")
    return 0 if kb is None else kb * 1024


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, or none to be found)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Give the heap's free pages back to the OS (module docstring); False where that is not possible (no
    glibc). Cheap (a walk over the heap, milliseconds): call it after a step that freed much in small blocks."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def _lifetime_peak_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024  # macOS reports bytes, Linux kB


@dataclass
class Watch:
    """The peaks seen while a watch is open (bytes; ``device`` None when no device was in use)."""

    rss: int = 0
    device: int | None = None


class PeakMemory:
    """The process's memory high-water marks, shared by every open :class:`Watch` (module docstring)."""

    def __init__(self) -> None:
        self._open: list[Watch] = []
        self._lock = threading.RLock()
        self._resettable: bool | None = None
        self._sampler: threading.Thread | None = None

    def __deepcopy__(self, memo: dict) -> PeakMemory:
        return self  # one per process: a copied ledger watches the same marks

    def __reduce__(self):
        return (_process_memory, ())

    # -- watches -------------------------------------------------------------------------------
    def start(self) -> Watch:
        """Open a watch: it sees the peaks from now until :meth:`stop`."""
        with self._lock:
            self._fold()  # what came before belongs to the watches already open
            watch = Watch(rss=rss_bytes())
            self._open.append(watch)
            if not self._can_reset():
                self._start_sampler()
            return watch

    def stop(self, watch: Watch) -> Watch:
        """Close ``watch`` and return it with its peaks."""
        with self._lock:
            self._fold()
            self._open = [w for w in self._open if w is not watch]
            return watch

    def peek(self, watch: Watch) -> Watch:
        """The peaks of an open watch so far (the marks are read and folded, nothing is closed)."""
        with self._lock:
            self._fold()
            return Watch(watch.rss, watch.device)

    # -- reading the marks ---------------------------------------------------------------------
    def _can_reset(self) -> bool:
        if self._resettable is None:
            try:
                _CLEAR_REFS.write_text("5")
                self._resettable = _status_kb("VmHWM:") is not None
            except OSError:
                self._resettable = False
        return self._resettable

    def _fold(self) -> None:
        """Read the marks into every open watch, then reset them (where possible)."""
        if self._can_reset():
            hwm = _status_kb("VmHWM:")
            rss = 0 if hwm is None else hwm * 1024
        else:
            rss = max(rss_bytes(), 0) or _lifetime_peak_bytes()
        device = _device_peak()
        for w in self._open:
            w.rss = max(w.rss, rss)
            if device is not None:
                w.device = max(w.device or 0, device)
        if self._can_reset():
            try:
                _CLEAR_REFS.write_text("5")
            except OSError:
                self._resettable = False
        if device is not None:
            _device_reset()

    def _start_sampler(self) -> None:
        if self._sampler is not None and self._sampler.is_alive():
            return

        def sample() -> None:
            stop = threading.Event()
            while not stop.wait(_SAMPLE_S):
                with self._lock:
                    if not self._open:
                        return
                    now = rss_bytes()
                    for w in self._open:
                        w.rss = max(w.rss, now)

        self._sampler = threading.Thread(target=sample, name="distrag-peak-memory", daemon=True)
        self._sampler.start()


def _cuda():
    torch = sys.modules.get("torch")  # never imports torch: a process that has not loaded it uses no device
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda


def _device_peak() -> int | None:
    cuda = _cuda()
    return None if cuda is None else int(cuda.max_memory_allocated())


def _device_reset() -> None:
    cuda = _cuda()
    if cuda is not None:
        cuda.reset_peak_memory_stats()


def _process_memory() -> PeakMemory:
    return PROCESS_MEMORY


PROCESS_MEMORY = PeakMemory()
"""The one tracker of this process's high-water marks (ledgers use it unless given another)."""
