"""One list of user-facing errors, and the one place they become `error: ...` and exit code 2."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from distrag import errors
from distrag.errors import EXIT_USER_ERROR, ConfigError, DataError, UserError, user_error_exit

PACKAGE = Path(errors.__file__).resolve().parent


def test_every_exception_class_of_the_package_is_declared_in_errors_py():
    """A new error goes into the one list (where the CLI and the launcher know it), not into a module."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and (b.id.endswith(("Error", "Exception")) or b.id == "UserError")
                    for b in node.bases):
                found.append(f"{path.relative_to(PACKAGE)}:{node.name}")
    assert not found, f"exception classes outside distrag/errors.py: {found}"


def test_user_errors_are_the_input_errors():
    user = {name for name, obj in vars(errors).items() if inspect.isclass(obj) and issubclass(obj, UserError)}
    assert user == {"UserError", "ConfigError", "DataError", "StrategyError", "ModelNotFoundError", "EmbedderError",
                    "GeneratorError", "IndexLoadError", "CheckpointError", "DSConfigError", "DistError",
                    "OutputLockedError", "BundleError"}
    assert not issubclass(errors.IndexRankFailed, UserError)  # a job failure: exit 1 with its traceback
    assert issubclass(ConfigError, ValueError) and issubclass(errors.CheckpointError, RuntimeError)


def test_messages_name_what_is_wrong():
    e = DataError("must be a non-empty list of strings", file="q.jsonl", record=3, field="answers")
    assert str(e) == "q.jsonl: record 3: field 'answers': must be a non-empty list of strings"
    c = ConfigError([("train.lr", "bad"), ("index.kind", "worse")], "x.yaml")
    assert str(c).splitlines() == ["2 problems in x.yaml:", "  - train.lr: bad", "  - index.kind: worse"]
    one = ConfigError([("index.pq_m", "5 does not divide 32; use one of [1, 2, 4, 8]")])
    assert str(one) == "1 problem in the configuration: index.pq_m: 5 does not divide 32; use one of [1, 2, 4, 8]"


def test_user_error_exit(capsys):
    assert user_error_exit(lambda: 0) == 0

    def bad() -> int:
        raise errors.ModelNotFoundError("unknown model 'nope'")

    assert user_error_exit(bad) == EXIT_USER_ERROR == 2
    assert capsys.readouterr().err == "error: unknown model 'nope'\n"
    assert user_error_exit(bad, speak=lambda: False) == 2  # other ranks exit quietly
    assert capsys.readouterr().err == ""

    def bug() -> int:
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        user_error_exit(bug)


def test_a_full_disk_is_one_line_and_other_os_errors_keep_their_traceback(capsys):
    import errno

    def full() -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/.step_00000002.tmp/rank_00000.pt")

    assert user_error_exit(full) == errors.EXIT_STORAGE_FULL == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: No space left on device writing /runs/x/checkpoints/")
    assert "resume=auto" in err and "Traceback" not in err

    def missing() -> int:
        raise FileNotFoundError(errno.ENOENT, "No such file", "/x")

    with pytest.raises(FileNotFoundError):
        user_error_exit(missing)
