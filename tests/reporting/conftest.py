"""Fixtures of the reporting tests: a temporary MLflow SQLite store, migrated once per session."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory):
    """An initialised (migrated) empty MLflow SQLite store; copying it saves each test the migrations."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture()
def store_uri(tmp_path, monkeypatch, empty_db) -> str:
    """A fresh copy of the empty store in ``tmp_path``, which is also the working folder: its URI."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(empty_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"
