"""What a run prints while it works, for every entry point (``distrag ...`` and ``launch/train.py``):
log records, Python warnings and progress, in one format per destination.

``setup_logging(verbose)`` sends every log record, distrag's and the libraries', through one handler that
masks tracking credentials (:class:`distrag.redaction.CredentialFilter`):

* on a terminal (standard error is a TTY): rich's handler (colours, aligned columns);
* anywhere else (a SLURM job's output file, a pipe, CI): plain lines that are never wrapped,
  ``2026-12-01 02:53:25 INFO    distrag.training.demo: == Ft-Gen ==``, and no progress bar: the
  libraries' tqdm bars are switched off (``TQDM_DISABLE``, set before they are first imported),
  :func:`progress_enabled` keeps distrag's own per-step bars off, and :class:`Progress` (the demo's
  strategies, a sweep's grid points) logs a line every ``every_pct`` percent instead of drawing a bar.

Libraries: the loggers in :data:`NOISY_LOGGERS` are turned down to errors, and what they still log goes
through the one handler, even from a library that installs its own handler again after the set-up
(DeepSpeed does so when it is first imported). Python warnings are logged as one line each; the
libraries' deprecation notices (``DeprecationWarning``, ``FutureWarning``) and the ``UserWarning`` s raised
inside the packages of :data:`THIRD_PARTY` are hidden unless ``DISTRAG_SHOW_WARNINGS=1``. distrag's own
warnings always show.

``quiet_rank()`` is what a non-zero rank of a distributed job calls: only trainer 0 speaks.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

from distrag.redaction import CredentialFilter

T = TypeVar("T")

NOISY_LOGGERS = ("transformers", "sentence_transformers", "mlflow", "alembic", "urllib3", "httpx",
                 "huggingface_hub", "faiss", "DeepSpeed", "bitsandbytes", "kernels")
THIRD_PARTY = ("transformers", "torch", "deepspeed", "peft", "sentence_transformers", "mlflow", "huggingface_hub",
               "accelerate", "gguf", "faiss", "datasets", "pydantic", "sqlalchemy", "alembic", "bitsandbytes")
"""Packages whose ``UserWarning`` s are hidden (unless ``DISTRAG_SHOW_WARNINGS=1``)."""
SHOW_WARNINGS_ENV = "DISTRAG_SHOW_WARNINGS"
PLAIN_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
PLAIN_DATEFMT = "%Y-%m-%d %H:%M:%S"


def is_interactive() -> bool:
    """Whether standard error is a terminal someone watches (False in a SLURM job, a pipe, a test)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def progress_enabled(requested: bool = True) -> bool:
    """Whether per-step progress bars should be drawn: asked for (no ``--no-progress``) and on a terminal."""
    return requested and is_interactive()


class _StderrHandler(logging.StreamHandler):
    """Plain lines to whatever ``sys.stderr`` is when a record is emitted (not the stream of the moment it
    was created: test runners and notebooks swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _ThroughRoot(logging.Filter):
    """On a library's logger: a record at ``level`` or above goes to the root logger's handlers (which mask
    credentials), and never to a handler the library attached to its logger itself."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.level:
            for handler in logging.getLogger().handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)
        return False


def _make_handler(interactive: bool) -> logging.Handler:
    if interactive:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False)
    else:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT, datefmt=PLAIN_DATEFMT))
    handler.addFilter(CredentialFilter())  # a tracking URI's credentials never reach the log
    return handler


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning``: one log line (``UserWarning: ... (file.py:12)``) through the one handler."""
    if file is not None:  # an explicit destination: written there, as the standard function does
        try:
            file.write(warnings.formatwarning(message, category, filename, lineno, line))
        except OSError:
            pass
        return
    logging.getLogger("py.warnings").warning("%s: %s (%s:%s)", category.__name__, message, filename, lineno)


def filter_warnings() -> None:
    """Hide the libraries' deprecation notices and :data:`THIRD_PARTY` ``UserWarning`` s, unless
    ``DISTRAG_SHOW_WARNINGS=1``; log every warning that remains as one line."""
    warnings.showwarning = _log_warning
    if os.environ.get(SHOW_WARNINGS_ENV, "") not in ("", "0"):
        return
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", category=UserWarning, module=rf"({'|'.join(THIRD_PARTY)})(\.|$)")


def setup_logging(verbose: bool = True, *, progress: bool = True, interactive: bool | None = None) -> None:
    """Configure logging, warnings and progress for this process (see the module docstring).

    ``verbose``: INFO, else WARNING. ``progress=False`` (``--no-progress``) switches the libraries' bars
    off on a terminal too. ``interactive`` overrides the terminal detection (:func:`is_interactive`).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tty = is_interactive() if interactive is None else interactive
    if not (tty and progress):
        os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is first imported (by transformers below)
    if not tty:
        try:  # a log file: results printed on stdout appear when printed, in order with the log lines
            sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        except (AttributeError, ValueError):  # not a text stream that can be reconfigured
            pass
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", handlers=[_make_handler(tty)], force=True)
    logging.getLogger("distrag").setLevel(level)
    filter_warnings()
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:  # mlflow installs its own stderr handler when imported: configure it first, then route it
        import mlflow  # noqa: F401
    except ImportError:  # pragma: no cover - mlflow is a dependency
        pass
    # after the imports above: importing transformers resets huggingface_hub's level
    for noisy in NOISY_LOGGERS:
        logger = logging.getLogger(noisy)
        logger.setLevel(logging.ERROR)
        # through our one (credential-masking) handler, never a library's own
        for own in list(logger.handlers):
            logger.removeHandler(own)
        logger.propagate = True
        for old in [f for f in logger.filters if isinstance(f, _ThroughRoot)]:
            logger.removeFilter(old)
        logger.addFilter(_ThroughRoot(logging.ERROR))


def quiet_rank() -> None:
    """Every rank but trainer 0: warnings and errors only."""
    logging.getLogger("distrag").setLevel(logging.WARNING)


# ----------------------------------------------------------------------------------------------
# overall progress


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Progress over ``total`` steps of a long command (the demo's strategies, a sweep's grid points).

    On a terminal: a tqdm bar that stays on screen above the per-step bars. Anywhere else: a log line
    (``demo: 3/7 strategies (43%), Ft-Gen done; 4m10s elapsed, about 5m33s left``) each time another
    ``every_pct`` percent is done, and at the end. Nothing at all when ``enabled`` is False.
    """

    def __init__(self, total: int, desc: str, *, enabled: bool = True, unit: str = "step",
                 every_pct: float = 10.0, interactive: bool | None = None):
        self.total, self.desc, self.unit, self.every_pct = max(int(total), 0), desc, unit, every_pct
        self.done = 0
        self._t0 = time.perf_counter()
        self._next_pct = every_pct
        tty = is_interactive() if interactive is None else interactive
        self._lines = enabled and not tty
        self._bar = None
        if enabled and tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, leave=True, disable=False, position=0,
                             dynamic_ncols=True)
        self._log = logging.getLogger("distrag.progress")

    def advance(self, what: str = "") -> None:
        """One more step done (``what``: its name)."""
        self.done += 1
        self.total = max(self.total, self.done)
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.set_postfix_str(what, refresh=False)
            self._bar.update(1)
        elif self._lines:
            pct = 100.0 * self.done / self.total
            if pct + 1e-9 >= self._next_pct or self.done == self.total:
                self._next_pct = (pct // self.every_pct + 1) * self.every_pct
                self._log.info("%s", self.line(what))

    def line(self, what: str = "") -> str:
        """The progress line as logged: counts, percent, the step just done, elapsed and estimated time."""
        elapsed = time.perf_counter() - self._t0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f}%)"
        if what:
            text += f", {what} done"
        text += f"; {_duration(elapsed)} elapsed"
        if 0 < self.done < self.total:
            text += f", about {_duration(elapsed / self.done * (self.total - self.done))} left"
        return text

    def track(self, items: Iterable[T], name: Callable[[T], str] = str) -> Iterator[T]:
        """Yield ``items``; each counts as done when the loop body comes back for the next (a ``continue``
        counts too)."""
        for item in items:
            yield item
            self.advance(name(item))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def track(items: Sequence[T], desc: str, *, enabled: bool = True, unit: str = "step",
          name: Callable[[T], str] = str, interactive: bool | None = None) -> Iterator[T]:
    """``for x in track(items, "demo"):`` a :class:`Progress` over ``items``, closed when the loop ends."""
    progress = Progress(len(items), desc, enabled=enabled, unit=unit, interactive=interactive)
    try:
        yield from progress.track(items, name)
    finally:
        progress.close()
