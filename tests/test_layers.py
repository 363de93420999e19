"""The import rules of the layout, asserted from the source (docs/INTERFACES.md, "Layers").

cm3leon <- tasks <- evals core <- reports <- evals/cli (the roof). Every import counts, the
deferred ones inside functions too: a deferred import is still a dependency, it only hides a
cycle from the interpreter. `if TYPE_CHECKING:` blocks are the one exception (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cm3leon", "tasks", "evals", "reports")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            out[_module_name(path)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _resolve(name: str) -> str | None:
    """The project module an imported dotted name lands in (longest known prefix)."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in MODULES:
            return cand
        parts.pop()
    return None


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.add(alias.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".") if is_pkg else module.split(".")[:-1]
                    base = base[:len(base) - (child.level - 1)]
                    prefix = ".".join(base + ([child.module] if child.module else []))
                else:
                    prefix = child.module or ""
                for alias in child.names:
                    found.add(f"{prefix}.{alias.name}")  # `from pkg import mod` imports pkg.mod
                if not all(f"{prefix}.{a.name}" in MODULES for a in child.names):
                    found.add(prefix)  # a name the package (its __init__) defines
            visit(child)

    visit(tree)
    return {r for r in (_resolve(n) for n in found) if r and r != module}


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _pkg(module: str) -> str:
    return module.split(".")[0]


def _violations(rule) -> list[str]:
    return sorted(f"{m} imports {d}" for m, deps in GRAPH.items() for d in deps if rule(m, d))


def test_graph_is_not_empty():
    # a parser that found nothing would pass every rule below
    assert "cm3leon.transformer" in GRAPH["cm3leon.sampling"]
    assert "tasks.spec" in GRAPH["tasks.loaders"]
    assert any(_pkg(d) == "cm3leon" for deps in GRAPH.values() for d in deps)


def test_cm3leon_imports_nothing_of_the_harness():
    assert _violations(lambda m, d: _pkg(m) == "cm3leon" and _pkg(d) != "cm3leon") == []


def test_tasks_import_only_cm3leon():
    assert _violations(lambda m, d: _pkg(m) == "tasks" and _pkg(d) not in ("tasks", "cm3leon")) == []


def test_reports_never_import_the_engine_or_the_cli():
    bad = lambda m, d: _pkg(m) == "reports" and (d == "evals.engine" or d.startswith("evals.cli"))  # noqa: E731
    assert _violations(bad) == []


def test_only_the_cli_imports_reports():
    bad = lambda m, d: _pkg(d) == "reports" and _pkg(m) != "reports" and not m.startswith("evals.cli")  # noqa: E731
    assert _violations(bad) == []


def test_html_and_leaderboard_do_not_import_each_other():
    pair = {"reports.html", "reports.leaderboard"}
    assert _violations(lambda m, d: {m, d} == pair) == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    return out


def _is_package_init(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def test_no_import_cycles():
    # A package __init__ that re-exports its children forms a harmless two-way edge with each of
    # them (`pkg/__init__` imports `pkg.x`; `pkg.x` is imported as `pkg.x`, which runs the init).
    # Those edges are left out; every other cycle is a layering error.
    graph = {m: set(deps) for m, deps in GRAPH.items()}
    for m in graph:
        if _is_package_init(m):
            for d in graph[m]:
                if d.startswith(m + "."):
                    graph[d].discard(m)
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("pkg", PACKAGES)
def test_every_package_has_modules(pkg):
    assert any(_pkg(m) == pkg for m in MODULES)


# ----------------------------------------------------------------------------- sizes
MAX_MODULE_LINES = 600  # outside tasks/shapes/ (the demo world is one generator, kept whole)
MAX_FUNCTION_LINES = 60  # in evals/ and cm3leon/sampling.py


def test_no_module_over_600_lines():
    big = {m: n for m, p in MODULES.items() if not m.startswith("tasks.shapes")
           and (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert big == {}


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_function_over_60_lines_in_evals_and_the_sampler():
    paths = [p for m, p in MODULES.items() if m.startswith("evals")] + [MODULES["cm3leon.sampling"]]
    assert [f for p in paths for f in _long_functions(p)] == []
