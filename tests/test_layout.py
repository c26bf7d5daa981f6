"""The layout the package promises: layers whose imports point down, no import circles, every module with its
mirrored test file, one home for the launcher environment.

The layers, bottom to top (docs/architecture.md says what each holds)::

    base         the top-level modules: errors, config, strategies (the strategy table), metric_names, ...
    data         records and loaders
    models       the embedder and the generator
    costs        FLOP formulas, the ledger, memory, the plan
    retrieval    encoding the corpus, the sharded index, the RAG pipeline, metrics
    reporting    results, comparison groups, MLflow, tables, plots, paired statistics, advise
    serving      a trained pipeline as one folder (bundle), loaded again, asked, served as an MLflow model
    training     the strategies' loop, losses, the experiment, sweeps, the demo, checks before a run
    distributed  roles, DeepSpeed trainers, the index rank and its protocol, checkpoints
    cli          the `distrag` command

A module may import from its own layer and the layers below it, never above. Imports under ``if TYPE_CHECKING:``
(type annotations only, never executed) are exempt; every other import counts, function-level ones included.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "distrag"

LAYERS = ("base", "data", "models", "costs", "retrieval", "reporting", "serving", "training", "distributed", "cli")
TOP = {"cli": "cli"}
"""Top-level modules that are not base (the rest of distrag/*.py is)."""

# modules whose tests live under another name (the file says why)
MIRRORED_ELSEWHERE = {
    "data/__init__.py": "data/test_data_loading.py",  # load_data, the format dispatch
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """The layer of ``distrag.<sub>.<mod>`` (its subpackage) or of a top-level ``distrag.<mod>``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "base"  # distrag/__init__.py
    if (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return TOP.get(parts[1], "base")


def _type_only_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of distrag it imports}`` (type-only imports left out)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = _type_only_nodes(tree)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("distrag"):
                for alias in node.names:  # `from distrag.x import y` may name a module y or a name in x
                    deps.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("distrag"))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def test_every_subpackage_has_a_declared_layer():
    subpackages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert subpackages <= set(LAYERS), f"declare the layer of {sorted(subpackages - set(LAYERS))} in LAYERS"


def test_imports_point_down_the_layers():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = sorted(f"{m} ({layer_of(m)}) -> {d} ({layer_of(d)})" for m, deps in import_graph().items()
                    for d in deps if rank[layer_of(d)] > rank[layer_of(m)])
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checks_catch_what_they_are_for():
    """The graph helpers on a constructed graph: an upward import and a circle are found."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    assert layer_of("distrag.retrieval.pipeline") == "retrieval" and layer_of("distrag.config") == "base"
    assert layer_of("distrag.cli") == "cli" and layer_of("distrag") == "base"
    graph = import_graph()
    assert "distrag.config" in graph["distrag.training.trainer"]  # module-level imports are seen
    assert "distrag.retrieval.corpus_encoding" in graph["distrag.training.trainer"]
    assert "distrag.serving.bundle" in graph["distrag.training.experiment"]  # every evaluation writes a bundle
    assert layer_of("distrag.serving.loader") == "serving"


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


def test_only_the_world_module_reads_the_launcher_environment():
    """The launcher's environment has one home: no other module reads RANK / WORLD_SIZE / LOCAL_RANK, MASTER_* or
    SLURM_* itself."""
    names = re.compile(r"""["'](RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT|SLURM_\w+)["']""")
    readers = sorted(py.relative_to(PACKAGE).as_posix() for py in PACKAGE.rglob("*.py") if names.search(py.read_text()))
    assert readers == ["distributed/world.py"], readers
