"""Every error a user can cause, in one list, and the one place they become a message and exit code 2.

Each class below is raised for a problem in what the user gave (configuration, data, model names,
checkpoints, the launcher environment) and carries a message that names the thing and how to fix it.
:func:`user_error_exit` is what the command line (``distrag ...``) and ``launch/train.py`` call around
their work: a :class:`UserError` prints ``error: <message>`` on standard error (once per job: rank 0
under a launcher) and returns exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

from distrag.redaction import mask_credentials

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_STORAGE_FULL = 1  # a job failure, not a user error, but reported in one line: no traceback helps here
_STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT)
"""Exit code after Ctrl-C or SIGTERM (128 + SIGINT, as a shell reports it)."""


class UserError(Exception):
    """Base of every error caused by the user's input rather than by a bug."""


class ConfigError(UserError, ValueError):
    """Bad configuration; ``problems`` lists (dotted key, message) pairs, all reported at once: one line
    for one problem (``1 problem in x.yaml: index.kind: ...``), else a head line and one line each."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        head = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        head += f" in {source}" if source else " in the configuration"
        if len(problems) == 1:
            super().__init__(f"{head}: {problems[0][0]}: {problems[0][1]}")
        else:
            super().__init__(head + ":\n" + "\n".join(f"  - {k}: {m}" for k, m in problems))


class DataError(UserError, ValueError):
    """Malformed input. The message names the file, the record (line or index) and the field."""

    def __init__(self, message: str, *, file: str | None = None, record: str | int | None = None,
                 field: str | None = None):
        self.file, self.record, self.field, self.reason = file, record, field, message
        where = []
        if file is not None:
            where.append(str(file))
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class StrategyError(UserError, ValueError):
    """A strategy that cannot run on this data or configuration (e.g. Ft-Embed without context labels)."""


class ModelNotFoundError(UserError, ValueError):
    """The model spec names nothing that can be loaded here."""


class EmbedderError(UserError, ValueError):
    """An encoder folder or pooling setting that cannot be used."""


class GeneratorError(UserError, ValueError):
    """A generator setting or state that cannot work (no eos token, no adapter, prompt too long...)."""


class IndexLoadError(UserError, RuntimeError):
    """A saved index is missing, incomplete or inconsistent; the message names the offending file."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that was asked for is missing, incomplete or unreadable."""


class DSConfigError(UserError, ValueError):
    """The DeepSpeed configuration does not fit the run (batch arithmetic, file, stage)."""


class DistError(UserError, RuntimeError):
    """The launcher environment or the role configuration is inconsistent."""


class OutputLockedError(UserError, RuntimeError):
    """Another run (its pid and host named) is writing the same ``output_dir``."""


class BundleError(UserError, ValueError):
    """A folder that is not a pipeline bundle, or one whose files are missing, altered or unsafe (a symlink out
    of it, a pickle); the message names the file."""


class IndexRankFailed(RuntimeError):
    """The index rank died or stalled and ``distributed.on_index_failure=stop``: raised on every trainer,
    which checkpoint and stop (one message, exit code 1: a failure of the job, not of the user's input)."""


def user_error_exit(fn: Callable[[], int], *, speak: Callable[[], bool] = lambda: True) -> int:
    """Run ``fn``; a :class:`UserError` becomes ``error: ...`` on stderr and exit code 2. ``speak()`` is
    asked at that moment whether this process prints it (under a launcher: rank 0 only, so a job says
    it once). Other exceptions propagate with their traceback."""
    try:
        return fn()
    except UserError as e:
        if speak():
            print(f"error: {mask_credentials(str(e))}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM: what was kept is already logged; no traceback
        if speak():
            print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except OSError as e:
        if e.errno not in _STORAGE_FULL:
            raise
        # Every write is atomic (temp then rename): what was saved before is complete; the failed write left
        # at most a hidden temporary file or folder.
        if speak():
            print(f"error: {e.strerror or e} writing {e.filename or 'a file'}; free space (or point output_dir "
                  "at a larger disk) and run again (distributed.resume=auto continues from the newest complete "
                  "checkpoint)", file=sys.stderr, flush=True)
        return EXIT_STORAGE_FULL
