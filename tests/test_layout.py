"""The layout the package promises (issue 7): every module has its mirrored test file, none is too long."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "distrag"
MAX_LINES = 420  # "about 400": a module that grows past it is doing two things

# modules whose tests live under another name (the file says why)
MIRRORED_ELSEWHERE = {
    "data/__init__.py": "data/test_data_loading.py",  # load_data, the format dispatch
}


def _is_trivial(path: Path) -> bool:
    """Only a docstring, imports and constants: nothing to test."""
    body = ast.parse(path.read_text()).body
    return all(isinstance(n, (ast.Expr, ast.Import, ast.ImportFrom, ast.Assign)) for n in body)


def test_every_module_has_its_mirrored_test_file():
    missing = []
    for py in sorted(PACKAGE.rglob("*.py")):
        rel = py.relative_to(PACKAGE).as_posix()
        if py.name == "__init__.py" and _is_trivial(py):
            continue
        expected = MIRRORED_ELSEWHERE.get(rel) or str(Path(rel).parent / f"test_{py.stem}.py").removeprefix("./")
        if not (REPO / "tests" / expected).is_file():
            missing.append(f"distrag/{rel} -> tests/{expected}")
    assert not missing, "modules without their test file:\n" + "\n".join(missing)


def test_no_module_is_too_long():
    long = {py.relative_to(REPO).as_posix(): n for py in PACKAGE.rglob("*.py")
            if (n := len(py.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_only_the_roles_module_reads_the_launcher_environment():
    """Distributed roles have one home: no other module reads RANK / WORLD_SIZE / LOCAL_RANK itself."""
    readers = []
    for py in PACKAGE.rglob("*.py"):
        text = py.read_text()
        if any(f'"{var}"' in text for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
            readers.append(py.relative_to(PACKAGE).as_posix())
    assert readers == ["distributed/roles.py"], readers


def _runtime_imports() -> dict[str, set[str]]:
    """Each module's distrag imports, at module level or in a function; those under ``if TYPE_CHECKING:``
    (type hints only) left out."""
    modules = {".".join(py.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): py
               for py in PACKAGE.rglob("*.py")}
    graph = {}
    for name, py in modules.items():
        tree = ast.parse(py.read_text())
        hints = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and "TYPE_CHECKING" in ast.unparse(block.test) for stmt in block.body for n in ast.walk(stmt)}
        deps = set()
        for n in ast.walk(tree):
            if id(n) in hints:
                continue
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("distrag"):
                deps |= {f"{n.module}.{a.name}" if f"{n.module}.{a.name}" in modules else n.module for a in n.names}
            elif isinstance(n, ast.Import):
                deps |= {a.name for a in n.names}
        graph[name] = {d for d in deps if d in modules and d not in (name, "distrag")}
    return graph


def test_reporting_imports_point_down_and_the_package_has_no_import_cycle():
    """Issue 16: reporting sits below training, distributed and the command line, and no two modules
    import each other, however indirectly (a circle makes the import order matter)."""
    graph = _runtime_imports()
    above = ("distrag.training", "distrag.distributed", "distrag.cli")
    upward = {m: sorted(d for d in deps if d.startswith(above)) for m, deps in graph.items()
              if m.startswith("distrag.reporting")}
    assert not any(upward.values()), {m: d for m, d in upward.items() if d}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join([*path[path.index(d):], d])
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_serving_sits_between_reporting_and_training():
    """Issue 20: distrag/serving (bundles, loading, predicting, the MLflow model) uses data, models, retrieval and
    reporting, and is used by training (every evaluation writes a bundle), distributed and the command line: it
    imports nothing above it, and nothing below it imports it."""
    graph = _runtime_imports()
    above = ("distrag.training", "distrag.distributed", "distrag.cli")
    below = ("distrag.data", "distrag.models", "distrag.costs", "distrag.retrieval", "distrag.reporting",
             "distrag.config", "distrag.errors", "distrag.strategies", "distrag.metric_names", "distrag.atomic_io",
             "distrag.redaction", "distrag.logging_setup")
    upward = {m: sorted(d for d in deps if d.startswith(above)) for m, deps in graph.items()
              if m.startswith("distrag.serving")}
    assert not any(upward.values()), {m: d for m, d in upward.items() if d}
    users = {m: sorted(d for d in deps if d.startswith("distrag.serving")) for m, deps in graph.items()
             if m.startswith(below)}
    assert not any(users.values()), {m: d for m, d in users.items() if d}
    assert any(d.startswith("distrag.serving") for d in graph["distrag.training.experiment"])
