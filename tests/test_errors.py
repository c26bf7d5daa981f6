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
                    "GeneratorError", "IndexLoadError", "CheckpointError", "DSConfigError", "DistError"}
    assert not issubclass(errors.IndexRankFailed, UserError)  # a job failure: exit 1 with its traceback
    assert issubclass(ConfigError, ValueError) and issubclass(errors.CheckpointError, RuntimeError)


def test_messages_name_what_is_wrong():
    e = DataError("must be a non-empty list of strings", file="q.jsonl", record=3, field="answers")
    assert str(e) == "q.jsonl: record 3: field 'answers': must be a non-empty list of strings"
    c = ConfigError([("train.lr", "bad"), ("index.kind", "worse")], "x.yaml")
    assert str(c).splitlines() == ["2 problems in x.yaml:", "  - train.lr: bad", "  - index.kind: worse"]


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
