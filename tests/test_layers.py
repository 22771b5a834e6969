"""The layer rule (docs/architecture.md) as an import-graph check over the product's source, with ``ast``.

Layers, lowest first: scheduler/ (pure Python) < kernels/ < engine/ < server/ < train/, loadtests/,
benchmarks/, sparkserve/testing < sparkserve/cli (the product CLI), sparkserve/__main__. An import may
point down or sideways, never up; no circle of imports between modules (function-level imports
included: a lazy import hides a circle, it does not remove it; ``if TYPE_CHECKING:`` imports left out:
they never run); the scheduler and the server import no torch, not even through what they import; the
server reads the engine only through its documented contracts. Every rule is checked on all imports
found anywhere in a file. There are no known exceptions (issue 27 removed the last ones): a new
violation fails.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("scheduler", "kernels", "engine", "server", "train", "loadtests", "benchmarks")
RANK = {"scheduler": 0, "kernels": 1, "engine": 2, "server": 3, "train": 4, "loadtests": 4, "benchmarks": 4, "testing": 4,
        "cli": 5, "__main__": 5, "__init__": 5}
HEAVY = ("torch", "triton")

SERVER_ENGINE_CONTRACTS = {  # what the server may import from engine/ (torch-free by the rule below)
    "sparkserve.engine.outputs",  # outputs, errors, stats records
    "sparkserve.engine.structured.grammar",  # GrammarSpec / GrammarError of a request's constraint
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts if parts[0] == "sparkserve" else ["sparkserve", *parts])


@cache
def modules() -> dict[str, Path]:
    """Every product module (and sparkserve/testing) by its import name."""
    found = {}
    for folder in (*PACKAGES, "sparkserve"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(nodes: list[ast.stmt], top_level_only: bool) -> list[ast.AST]:
    """The statements that run: every node under ``nodes`` (or only ``nodes`` themselves), leaving out
    the bodies of ``if TYPE_CHECKING:`` (annotations only, never imported at run time)."""
    found: list[ast.AST] = []
    todo: list[ast.AST] = list(nodes)
    while todo:
        node = todo.pop()
        found.append(node)
        if _is_type_checking(node):
            todo.extend(node.orelse)  # type: ignore[attr-defined]
        elif not top_level_only:
            todo.extend(ast.iter_child_nodes(node))
    return found


@cache
def imports(name: str, top_level_only: bool = False) -> frozenset[str]:
    """Names ``name`` imports at run time (absolute; ``from a import b`` yields ``a`` and ``a.b``)."""
    path = modules()[name]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in _runtime_nodes(tree.body, top_level_only):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(found)


def edges(name: str, top_level_only: bool = False) -> set[str]:
    """The product modules ``name`` imports."""
    return {m for m in imports(name, top_level_only) if m in modules() and m != name}


def layer(name: str) -> str:
    return name.split(".")[1] if name.count(".") else "__init__"


def imports_heavy(name: str, top_level_only: bool = False) -> bool:
    return any(m.split(".")[0] in HEAVY for m in imports(name, top_level_only))


def circles() -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan), over all imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges(v)):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for name in sorted(modules()):
        if name not in index:
            visit(name)
    return found


def test_the_graph_is_read() -> None:
    """The checks below see the real graph (a broken reader would pass every rule vacuously)."""
    assert len(modules()) > 100 and "sparkserve.scheduler.scheduler" in modules()
    assert "sparkserve.scheduler.request" in edges("sparkserve.scheduler.scheduler")
    assert imports_heavy("sparkserve.engine.model_runner", top_level_only=True)
    assert layer("sparkserve.kernels.rejection") == "kernels" and layer("sparkserve.testing.tiny") == "testing"
    assert layer("sparkserve.cli") == "cli" and "sparkserve.server.http_server" in edges("sparkserve.cli")


def test_no_import_circle() -> None:
    assert circles() == [], "import circle"


def test_imports_point_down_the_layers() -> None:
    """scheduler < kernels < engine < server < train, loadtests, testing (kernels is a leaf above the
    scheduler: it imports nothing from engine/)."""
    upward = {(a, b) for a in modules() for b in edges(a) if RANK[layer(a)] < RANK[layer(b)]}
    assert upward == set(), "an import points up the layers"


def test_scheduler_imports_no_torch_and_nothing_above_it() -> None:
    for name in modules():
        if layer(name) == "scheduler":
            assert not imports_heavy(name), name
            assert all(layer(m) == "scheduler" for m in edges(name)), name


def test_server_imports_no_torch_and_only_engine_contracts() -> None:
    """No server module imports torch, directly or through the top-level imports of what it imports
    (a lazy import inside a function of an imported module is that module's business)."""
    server = [m for m in modules() if layer(m) == "server"]
    for name in server:
        assert not imports_heavy(name), name
        engine = {m for m in edges(name) if layer(m) == "engine"}
        assert engine <= SERVER_ENGINE_CONTRACTS, (name, engine - SERVER_ENGINE_CONTRACTS)
    seen, todo = set(), list(server)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        assert not imports_heavy(name, top_level_only=True), f"{name} (imported by the server) imports torch"
        todo.extend(edges(name, top_level_only=True))
