"""The import graph of ``src/qkcov``: no circles (module-level and function-level imports
alike), ``core/`` never reaches ``transformers``, and every module imports on its own.

The graph is read from the source with ``ast``: an edge ``a → b`` for every ``import`` or
``from ... import`` anywhere in ``a`` (inside functions and ``if TYPE_CHECKING:`` too) that
names the qkcov module ``b``; ``from pkg import name`` points at ``pkg.name`` when that is a
module, else at ``pkg``. Lazy names of a package's ``__getattr__`` (``qkcov/__init__.py``)
are not imports and make no edge.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import qkcov

SRC = Path(qkcov.__file__).parent


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _imports(name: str, path: Path, is_pkg: bool) -> list[str]:
    """Every module name ``name``'s source imports (any depth): ``import a.b`` gives
    ``a.b``; ``from a import b, c`` gives ``a.b`` and ``a.c`` (resolved relative to ``name``)
    and ``a`` itself, for names that are not modules."""
    package = name if is_pkg else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parts = package.split(".")
                mod = ".".join(parts[: len(parts) - node.level + 1] + ([mod] if mod else []))
            found += [f"{mod}.{a.name}" for a in node.names]
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → the qkcov modules it imports (``from pkg import name``: ``pkg.name`` when
    that is a module, else ``pkg``; ``import a.b.c``: the longest prefix that is one)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, (path, is_pkg) in mods.items():
        for target in _imports(m, path, is_pkg):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != m:
                graph[m].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    # planted: function-level imports of the pipeline and a relative ``from . import``
    assert "qkcov.pipeline.config" in graph["qkcov.checks"]
    assert "qkcov.engine.swaps" in graph["qkcov.pipeline.steps.swaps"]
    assert "qkcov.results" in graph["qkcov.export"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    found = cycles(import_graph())
    assert found == [], "import circles in src/qkcov: " + "; ".join(" ↔ ".join(c) for c in found)


def test_results_knows_nothing_of_export_or_report():
    graph = import_graph()
    above = [
        m for m in graph["qkcov.results"] if m == "qkcov.export" or m.startswith("qkcov.report")
    ]
    assert above == []


def test_core_never_reaches_transformers():
    """No module that ``core/`` imports (directly or through others, at any depth) imports
    transformers; the subprocess check in test_pipeline.py shows it at run time."""
    mods, graph = _modules(), import_graph()
    seen, todo = set(), [m for m in graph if m.startswith("qkcov.core")]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph[m]
    bad = [
        m
        for m in sorted(seen)
        if any(t.split(".")[0] == "transformers" for t in _imports(m, *mods[m]))
    ]
    assert bad == [], f"core/ reaches transformers through {bad}"


def test_every_module_imports_first():
    """Each module imported first in a fresh interpreter state of qkcov (torch stays loaded):
    a module-level circle would fail here with a partially initialised module."""
    skip = ("qkcov.__main__", "qkcov.integrations.")  # runs the CLI; optional extras
    names = [m for m in _modules() if not m.startswith(skip)]
    code = (
        "import importlib, sys, torch\n"
        f"names = {names!r}\n"
        "bad = []\n"
        "for n in names:\n"
        "    for k in [k for k in sys.modules if k == 'qkcov' or k.startswith('qkcov.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(n)\n"
        "    except Exception as err:\n"
        "        bad.append(f'{n}: {type(err).__name__}: {err}')\n"
        "print('\\n'.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
