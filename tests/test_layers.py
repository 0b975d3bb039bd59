"""The package's layers: which module may import which.

Each module of ``asyncore_fwd`` sits in one layer; a module imports modules
of its own layer or of the layers below it, at run time (lazy imports in a
function count too) and under ``TYPE_CHECKING`` alike. The imports are read
from the source with ``ast``, so nothing here depends on what happens to be
imported already.

There is no exception: an import from a layer above, or a cycle of imports
(even one only under ``TYPE_CHECKING``), fails the tests, which name it.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, FrozenSet, Iterator, List, Set, Tuple

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "asyncore_fwd"

#: From the bottom up. A module may import its own layer and the layers below.
#: Modules are named by their dotted path in the package; a folder's ``__init__``
#: by the folder's name.
LAYERS: List[Tuple[str, Set[str]]] = [
    ("base: the asyncore import, socket helpers", {"_compat", "_net"}),
    ("loop: timers, wake-up, the loops; nothing of forwarding",
     {"_eventloop", "_eventloop._timers", "_eventloop._wakeup", "_eventloop._loop", "_eventloop._dispatcher",
      "_eventloop._runner"}),
    ("values: rules and the config file", {"_values", "_values._parse", "_values._rules", "_values._config"}),
    ("relay: the two sides of a connection, copy and splice",
     {"_relay", "_relay._sides", "_relay._targets", "_relay._loopback", "_relay._connection", "_relay._copy",
      "_relay._sender", "_relay._splice"}),
    ("operations: what acts on connections",
     {"_ops", "_ops._access", "_ops._timeouts", "_ops._stats", "_ops._proxy", "_ops._proxy_accept", "_ops._balance",
      "_ops._health",
      "toxics", "toxics._link", "toxics._kinds", "toxics._set", "toxics._spec", "toxics._controls"}),
    ("listener: the forwarder",
     {"_listener", "_listener._listening", "_listener._owner", "_listener._pause", "_listener._forwarder",
      "_listener._sessions", "_listener._udp", "_listener._udploop", "_listener._pktinfo", "_listener._udptargets"}),
    ("service: many rules, processes, metrics",
     {"_service", "_service._service", "_service._listeners", "_service._workers", "_service._metrics",
      "_service._reports", "_service._pidfile"}),
    ("entry points", {"__init__", "__main__", "cli", "cli._parser", "cli._logging", "cli._rules", "cli._main",
                      "cli._run", "cli._signals", "pytest_plugin", "_shellfiles",
                      "trace", "trace.__main__", "trace._runner", "trace._text", "trace._capture",
                      "trace._describe", "trace._events", "trace._session", "trace._kernel", "trace._io",
                      "trace._summary", "trace._filter", "trace._jsonl", "trace._enable"}),
]

LAYER_OF: Dict[str, int] = {module: index for index, (_, modules) in enumerate(LAYERS) for module in modules}


def _name_of(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def package_modules() -> Set[str]:
    return {_name_of(path) for path in PACKAGE.rglob("*.py")}


def _path_of(module: str) -> pathlib.Path:
    path = PACKAGE.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, (ast.Name, ast.Attribute)) and ast.unparse(test).endswith("TYPE_CHECKING")


def _module_or_package(name: str, modules: Set[str]) -> str:
    """``name`` if it is a module; else the nearest package above it (``X.y`` where y is a name in X)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or "__init__"


def _imported(node: ast.ImportFrom, importer: str, modules: Set[str]) -> Iterator[str]:
    """The package's modules that one ``from ... import ...`` names."""
    if node.level:
        here = importer.split(".") if _path_of(importer).name == "__init__.py" and importer != "__init__" \
            else importer.split(".")[:-1]
        if node.level - 1 > len(here):
            return
        base = ".".join(here[:len(here) - (node.level - 1)] + ([node.module] if node.module else []))
    elif node.module == "asyncore_fwd" or (node.module or "").startswith("asyncore_fwd."):
        base = (node.module or "").partition(".")[2]
    else:
        return
    for alias in node.names:  # from X import y: y may be a module of package X
        yield _module_or_package(f"{base}.{alias.name}" if base else alias.name, modules)


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
            found.update((name, kind) for name in _imported(node, module, modules) if name != module)
        elif isinstance(node, ast.Import):
            found.update((_module_or_package(alias.name.partition(".")[2], modules), kind) for alias in node.names
                         if alias.name.startswith("asyncore_fwd."))
        visit(node, kind)

    visit(ast.parse(_path_of(module).read_text(encoding="utf-8")), "run time")
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


def test_no_module_imports_from_a_layer_above_it() -> None:
    """(importer, imported, "run time" or "TYPE_CHECKING") for each import that goes up: none."""
    violations = {(module, imported, kind) for module, edges in import_graph().items()
                  for imported, kind in edges if LAYER_OF[imported] > LAYER_OF[module]}
    assert violations == set(), "imports from a layer above"


def test_no_import_cycle() -> None:
    """Groups of modules that import each other, directly or not, even only under TYPE_CHECKING: none."""
    graph = {module: {imported for imported, _ in edges} for module, edges in import_graph().items()}
    assert cycles(graph) == set(), "import cycles"


@pytest.mark.parametrize("source, expected", [
    ("from .._net import x", {("_net", "run time")}),
    ("from .. import _net, __version__", {("_net", "run time"), ("__init__", "run time")}),
    ("from ._splice import y", {("_relay._splice", "run time")}),
    ("from .._eventloop import _loop", {("_eventloop._loop", "run time")}),
    ("from asyncore_fwd._relay._copy import Connection", {("_relay._copy", "run time")}),
    ("import asyncore_fwd.toxics", {("toxics", "run time")}),
    ("def f():\n    from ._splice import AVAILABLE", {("_relay._splice", "run time")}),
    ("if TYPE_CHECKING:\n    from .._listener._forwarder import Forwarder",
     {("_listener._forwarder", "TYPE_CHECKING")}),
    ("if typing.TYPE_CHECKING:\n    from .. import toxics\nelse:\n    from .._net import y",
     {("toxics", "TYPE_CHECKING"), ("_net", "run time")}),
], ids=["relative", "package-names", "sibling", "module-of-a-folder", "absolute", "import-statement", "lazy",
        "type-checking", "else-branch"])
def test_every_form_of_import_is_read(source: str, expected: Set[Tuple[str, str]], tmp_path: pathlib.Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader sees each way a module can import another (so the checks above can fail)."""
    for module in ("_net", "toxics", "_relay/_copy", "_relay/_splice", "_eventloop/_loop", "_listener/_forwarder"):
        (tmp_path / f"{module}.py").parent.mkdir(exist_ok=True)
        (tmp_path / f"{module}.py").write_text("")
    (tmp_path / "_relay" / "probe.py").write_text(source)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    assert imports_of("_relay.probe", package_modules()) == expected


def test_cycles_finds_a_cycle_through_three_modules() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}
