"""The layers of the clipjax package, read from its sources with ``ast``: the module import graph (every import, at
the top of a module or inside a function) has no circle in ``clipjax.data`` and none elsewhere but the ones listed
below; the ingestion tool is imported by no runtime module; no module of ``clipjax.data`` is over 600 lines; and
every module of the package imports."""

import ast
import importlib
import pathlib

import pytest

import clipjax

PACKAGE = pathlib.Path(clipjax.__file__).parent
MAX_LINES = 600
# Import circles that are known and not yet taken apart: each is the set of its modules (none left).
KNOWN_CIRCLES: list[frozenset[str]] = []


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["clipjax", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """The clipjax modules that module ``name`` imports (a package's ``__init__`` not counted for its submodules)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import clipjax.data.core as x` names a module; keep the longest
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                out.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_of_clipjax_data_has_no_circle():
    graph = _graph()
    assert "clipjax.data.ingest" in graph and "clipjax.data.wds_names" in graph
    assert "clipjax.data.wds_names" in graph["clipjax.data.wds"] and "clipjax.data.wds_names" in graph[
        "clipjax.data.ingest.plan"]
    data = {k: {w for w in v if w.startswith("clipjax.data")} for k, v in graph.items() if k.startswith("clipjax.data")}
    assert _circles(data) == []


def test_the_import_graph_of_clipjax_has_no_circle_but_the_known_ones():
    assert sorted(map(sorted, _circles(_graph()))) == sorted(map(sorted, KNOWN_CIRCLES))


def test_the_circle_finder_finds_circles():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_runtime_module_imports_the_ingestion_tool():
    graph = _graph()
    users = sorted(k for k, v in graph.items() if any(w.startswith("clipjax.data.ingest") for w in v)
                   and not k.startswith("clipjax.data.ingest"))
    assert users == []


def test_no_module_of_clipjax_data_is_over_600_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in (PACKAGE / "data").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


@pytest.mark.parametrize("name", sorted(k for k in _modules() if k.startswith("clipjax.data")
                                        and not k.endswith("__main__")))
def test_every_module_of_clipjax_data_imports(name):
    importlib.import_module(name)
