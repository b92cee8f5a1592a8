"""No import cycle inside ``gradlab``: the graph of imports between its modules is acyclic, and
every module imports on its own.

The graph is read from the source with :mod:`ast`. Every ``import`` statement of a module counts:
at module level, deferred inside a function or under ``if TYPE_CHECKING:`` (a deferred or
type-only import hides a cycle from the interpreter, not from this test). ``from pkg import name``
is an edge to ``pkg.name`` when that is a module, else to ``pkg``. The implicit import of a
module's parent packages is not an edge (``gradlab/__init__.py`` imports every subpackage; a
cycle through it would need an explicit ``import gradlab`` inside the library, which counts).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import gradlab

ROOT = Path(gradlab.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The gradlab modules ``module`` imports anywhere in its body."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in known and m != module}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {
        name: _imports(
            ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", known
        )
        for name, path in modules.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = walk(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = walk(node)
            if found:
                return found
    return None


def test_the_walk_finds_a_cycle_hidden_in_a_deferred_import():
    known = {"pkg.a", "pkg.b"}
    a = ast.parse("from pkg.b import g\n")
    b = ast.parse("def g():\n    from pkg import a\n    return a\n")
    c = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import x\n")
    d = ast.parse("from . import b\nfrom .b import g\n")
    graph = {
        "pkg.a": _imports(a, "pkg.a", False, known),
        "pkg.b": _imports(b, "pkg.b", False, known),
    }
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    assert _cycle(graph) in (["pkg.a", "pkg.b", "pkg.a"], ["pkg.b", "pkg.a", "pkg.b"])
    assert _imports(c, "pkg.b", False, known) == {"pkg.a"}  # type-only imports count too
    assert _imports(d, "pkg.a", False, known) == {"pkg.b"}  # relative imports


def test_the_import_graph_of_gradlab_is_acyclic():
    graph = _graph()
    assert "gradlab._derivatives._dispatch" in graph
    assert graph["gradlab._derivatives._dispatch"] >= {
        "gradlab._derivatives._autotune",
        "gradlab._derivatives._registry",
    }
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


_ALONE = r"""
import importlib, sys
import torch  # loaded once; every gradlab module is then imported alone
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "gradlab" or m.startswith("gradlab.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:  # report every module that fails, not only the first
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print("\n".join(failed))
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    names = sorted(_modules())
    out = subprocess.run(
        [sys.executable, "-c", _ALONE, *names], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "", out.stdout
