"""The package's layers: which module may import which.

Each module of ``asyncore_fwd`` sits in one layer; a module imports modules
of its own layer or of the layers below it, at run time (lazy imports in a
function count too) and under ``TYPE_CHECKING`` alike. The imports are read
from the source with ``ast``, so nothing here depends on what happens to be
imported already.

Today's exceptions are listed in ``KNOWN_VIOLATIONS`` and ``KNOWN_CYCLES``,
each to be removed as the restructuring removes it: the tests fail on a new
violation, and on a listed one that is gone (so that the list only shrinks).
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, FrozenSet, Iterator, List, Set, Tuple

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "asyncore_fwd"

#: From the bottom up. A module may import its own layer and the layers below.
LAYERS: List[Tuple[str, Set[str]]] = [
    ("base: the asyncore import, socket helpers", {"_compat", "_net"}),
    ("loop: timers, wake-up, the loops; nothing of forwarding", {"_timers", "_wakeup", "_loop"}),
    ("values: rules and the config file", {"_rules", "_config"}),
    ("relay: the two sides of a connection, copy and splice", {"_relay", "_splice"}),
    ("operations: what acts on connections", {"_access", "_timeouts", "_stats", "toxics"}),
    ("forwarder: the listener", {"_forwarder"}),
    ("service: many rules, processes, metrics", {"_service", "_workers", "_metrics", "_pidfile"}),
    ("entry points", {"__init__", "__main__", "cli", "trace", "pytest_plugin", "_shellfiles"}),
]

#: (importer, imported, "run time" or "TYPE_CHECKING"): imports that go up a layer today.
KNOWN_VIOLATIONS: Set[Tuple[str, str, str]] = {
    ("_relay", "_timeouts", "run time"),  # Connection starts its timeouts by name
    ("_relay", "_forwarder", "TYPE_CHECKING"),  # Connection reaches into its Forwarder
}

#: Groups of modules that import each other, directly or not (any kind of import).
KNOWN_CYCLES: Set[FrozenSet[str]] = {
    # _relay -> _forwarder (TYPE_CHECKING) -> the operations and _splice -> _relay.
    frozenset({"_relay", "_forwarder", "_splice", "toxics", "_access", "_stats", "_timeouts"}),
}

LAYER_OF: Dict[str, int] = {module: index for index, (_, modules) in enumerate(LAYERS) for module in modules}


def package_modules() -> Set[str]:
    return {path.stem for path in PACKAGE.glob("*.py")}


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, (ast.Name, ast.Attribute)) and ast.unparse(test).endswith("TYPE_CHECKING")


def _imported(node: ast.ImportFrom, modules: Set[str]) -> Iterator[str]:
    """The package's modules that one ``from ... import ...`` names."""
    if node.level == 1 or node.module == "asyncore_fwd" or (node.module or "").startswith("asyncore_fwd."):
        base = node.module if node.level == 1 else (node.module or "").partition(".")[2]
        if base:
            yield base.split(".")[0]
        else:  # from . import X: a module, or a name of the package's __init__
            for alias in node.names:
                yield alias.name if alias.name in modules else "__init__"


def imports_of(module: str, modules: Set[str]) -> Set[Tuple[str, str]]:
    """(imported module, "run time" or "TYPE_CHECKING") for every import of the package in ``module``."""
    found: Set[Tuple[str, str]] = set()

    def visit(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for statement in child.body:
                    visit_one(statement, "TYPE_CHECKING")
                for statement in child.orelse:
                    visit_one(statement, kind)
            else:
                visit_one(child, kind)

    def visit_one(node: ast.AST, kind: str) -> None:
        if isinstance(node, ast.ImportFrom):
            found.update((name, kind) for name in _imported(node, modules) if name != module)
        elif isinstance(node, ast.Import):
            found.update((alias.name.split(".")[1], kind) for alias in node.names
                         if alias.name.startswith("asyncore_fwd."))
        visit(node, kind)

    visit(ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8")), "run time")
    return found


def import_graph() -> Dict[str, Set[Tuple[str, str]]]:
    modules = package_modules()
    return {module: imports_of(module, modules) for module in modules}


def cycles(graph: Dict[str, Set[str]]) -> Set[FrozenSet[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found: Set[FrozenSet[str]] = set()

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_every_module_has_a_layer() -> None:
    """A new module is placed in a layer (and only one) before it can be imported."""
    placed = [module for _, modules in LAYERS for module in modules]
    assert len(placed) == len(set(placed)), "a module in two layers"
    assert package_modules() == set(placed)


def test_no_module_imports_from_a_layer_above_it_but_the_known_ones() -> None:
    """Upward imports, at run time or under TYPE_CHECKING, are exactly the listed ones."""
    violations = {(module, imported, kind) for module, edges in import_graph().items()
                  for imported, kind in edges if LAYER_OF[imported] > LAYER_OF[module]}
    assert violations - KNOWN_VIOLATIONS == set(), "new imports from a layer above"
    assert KNOWN_VIOLATIONS - violations == set(), "gone: remove them from KNOWN_VIOLATIONS"


def test_no_import_cycle_but_the_known_ones() -> None:
    """Modules that import each other (even only under TYPE_CHECKING) are exactly the listed groups."""
    graph = {module: {imported for imported, _ in edges} for module, edges in import_graph().items()}
    found = cycles(graph)
    assert found - KNOWN_CYCLES == set(), "new import cycles"
    assert KNOWN_CYCLES - found == set(), "gone or changed: update KNOWN_CYCLES"


@pytest.mark.parametrize("source, expected", [
    ("from ._net import x", {("_net", "run time")}),
    ("from . import _loop, __version__", {("_loop", "run time"), ("__init__", "run time")}),
    ("from asyncore_fwd._relay import Connection", {("_relay", "run time")}),
    ("import asyncore_fwd.toxics", {("toxics", "run time")}),
    ("def f():\n    from ._splice import AVAILABLE", {("_splice", "run time")}),
    ("if TYPE_CHECKING:\n    from ._forwarder import Forwarder", {("_forwarder", "TYPE_CHECKING")}),
    ("if typing.TYPE_CHECKING:\n    from . import _relay\nelse:\n    from ._net import y",
     {("_relay", "TYPE_CHECKING"), ("_net", "run time")}),
], ids=["relative", "package-names", "absolute", "import-statement", "lazy", "type-checking", "else-branch"])
def test_every_form_of_import_is_read(source: str, expected: Set[Tuple[str, str]], tmp_path: pathlib.Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader sees each way a module can import another (so the checks above can fail)."""
    (tmp_path / "probe.py").write_text(source)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    assert imports_of("probe", package_modules() | {"_loop", "_net", "_relay", "_splice", "_forwarder", "toxics"}) \
        == expected


def test_cycles_finds_a_cycle_through_three_modules() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}
