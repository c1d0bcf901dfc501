"""The package's layering (docs/ARCHITECTURE.md): imports only downward, no cycle, no module over 500 lines,
no function-level import of an actstore module in the library layers.

Every import of every module counts, function-level ones included.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "actstore"
#: Bottom to top; modules of one layer may import each other (without a cycle).
LAYERS = [
    {"errors", "environment", "deprecation"},
    {"format"},
    {"storage"},
    {"engine"},
    {"store", "remote"},
    {"models"},
    {"precompute"},
    {"training"},
    {"cli", "__main__"},
]
LEAVES = {"examples", "testing"}  # may import anything; nothing in the library imports them
MAX_LINES = 500
#: Layers that may import actstore modules inside functions (start-up time of the command line, test helpers).
LAZY_IMPORTS_ALLOWED = {"cli", "__main__"} | LEAVES


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                if path.name != "__init__.py":
                    base = base[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets.append(target)
            targets += [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
        elif isinstance(node, ast.Import):
            targets += [a.name for a in node.names]
        for t in targets:
            if t == "actstore" or t.startswith("actstore."):
                while t not in known and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t != name:
                    found.add(t)
    return found


def part(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer(name: str) -> int:
    p = part(name)
    for i, members in enumerate(LAYERS):
        if p in members:
            return i
    raise AssertionError(f"{name}: in no layer of docs/ARCHITECTURE.md (add it to LAYERS or LEAVES)")


@functools.lru_cache(maxsize=1)
def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def test_every_module_is_in_a_layer_and_small() -> None:
    for name, path in modules().items():
        if name != "actstore" and part(name) not in LEAVES:
            layer(name)
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{name}: {lines} lines (at most {MAX_LINES}: split it by concern)"


def test_imports_go_only_downward() -> None:
    bad = []
    for m, targets in graph().items():
        if m == "actstore" or part(m) in LEAVES:
            continue
        for t in targets:
            if t == "actstore":
                if layer(m) < layer("actstore.cli"):
                    bad.append(f"{m} -> actstore (the public API is the top)")
            elif part(t) in LEAVES:
                bad.append(f"{m} -> {t} (a leaf)")
            elif layer(t) > layer(m):
                bad.append(f"{m} -> {t}")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_no_import_cycle() -> None:
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in list(g):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_checker_sees_function_level_imports(tmp_path: Path) -> None:
    """The walk counts imports inside function bodies, relative ones included (or the tests above could not fail)."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from actstore.cli import main\n    from ..store import open\n")
    assert imports("actstore.engine.probe", probe, modules()) == {"actstore.cli", "actstore.store"}


def test_import_actstore_loads_no_command_line_benchmark_or_example() -> None:
    code = ("import sys, actstore; bad = sorted(m for m in sys.modules if m.startswith(('actstore.cli', "
            "'actstore.examples', 'actstore.testing', 'benchmarks'))); print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_layers_table_matches_the_tree() -> None:
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    files = {p.stem for p in PKG.glob("*.py")} - {"__init__"}
    listed = set().union(*LAYERS) | LEAVES
    assert folders | files <= listed, sorted((folders | files) - listed)
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for name in sorted(folders):
        assert f"`{name}/`" in text, f"docs/ARCHITECTURE.md does not describe actstore/{name}/"


def function_level_imports(path: Path) -> list[int]:
    """Line numbers of imports of actstore modules that sit inside a function or method body."""
    found = []
    tree = ast.parse(path.read_text())
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            relative_or_ours = isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("actstore"))
            ours = isinstance(node, ast.Import) and any(a.name.startswith("actstore") for a in node.names)
            if relative_or_ours or ours:
                found.append(node.lineno)
    return sorted(set(found))


def test_library_layers_import_at_module_level_only() -> None:
    bad = [f"{name}:{line}" for name, path in modules().items()
           if part(name) not in LAZY_IMPORTS_ALLOWED for line in function_level_imports(path)]
    assert not bad, "function-level imports of actstore modules (move them to the top of the module):\n" + "\n".join(bad)


def test_function_level_import_check_can_fail(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f():\n    from actstore.store import open\n    import json\n")
    assert function_level_imports(probe) == [4]
