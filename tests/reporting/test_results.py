"""A result is plain data: what its accessors read, and that the module does no I/O (reading results back
from MLflow is tests/reporting/test_tracking.py's)."""

from __future__ import annotations

import ast
from pathlib import Path

from distrag.reporting import results
from distrag.reporting.results import StrategyResult


def test_metric_and_cost_read_with_their_defaults():
    r = StrategyResult("gen_ft", "Ft-Gen", {"em": 1}, {"cost/wall_s": 5.0}, 5.0)
    assert r.metric("em") == 1.0 and isinstance(r.metric("em"), float)
    assert r.metric("f1") == 0.0 and r.metric("f1", 0.5) == 0.5
    assert r.cost("cost/wall_s") == 5.0 and r.cost("cost/device_hours") is None
    assert r.extra == {} and r.history == [] and StrategyResult("a", "A", {}, {}, 0.0).extra is not r.extra


def test_the_result_module_imports_nothing_that_does_io():
    """Dataclasses only: no MLflow, no other distrag module at run time (the config is a type hint)."""
    tree = ast.parse(Path(results.__file__).read_text())
    runtime = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    modules = {n.module for n in runtime if isinstance(n, ast.ImportFrom)} | {
        a.name for n in runtime if isinstance(n, ast.Import) for a in n.names}
    assert modules == {"__future__", "dataclasses", "typing"}, modules
    nested = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and n not in runtime]
    assert [n.module for n in nested] == ["distrag.config", "distrag.reporting.paired"]  # under TYPE_CHECKING only
