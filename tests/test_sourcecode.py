"""Tests of the source itself: imports point one way, the layers are the folders, the roles
never import each other, nothing imports in a cycle; ruff and mypy are clean.

Layers, lowest first (a module may import its own layer's modules and lower layers only):

    0  kite.errors, kite.fastpath, kite._fastpath*        the fast path
    1  kite.proto                                         sans-IO protocol
    2  kite.net, kite.config                              shared asyncio layer, configuration
  2.5  kite.names                                         service layer: DNS for the kites
  2.5  kite.store                                         account registry (service layer)
  2.5  kite.certs                                         certificates: ACME (service layer)
    3  kite.relay | kite.backend | kite.client,           the roles (never each other)
       kite.scaffold, kite.pagekiterc
    4  kite.demo                                          relay + backend on loopback
    5  kite.cli                                           the command line
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "kite"

LAYERS = {
    "kite.errors": 0, "kite.fastpath": 0, "kite._fastpath": 0, "kite._fastpath_py": 0,
    "kite.proto": 1,
    "kite.net": 2, "kite.config": 2, "kite.names": 2.5,
    "kite.store": 2.5,
    "kite.certs": 2.5,
    "kite.relay": 3, "kite.backend": 3, "kite.client": 3, "kite.scaffold": 3,
    "kite.pagekiterc": 3,
    "kite.demo": 4,
    "kite.cli": 5, "kite.__main__": 5, "kite": 0,
}
ROLES = ("kite.relay", "kite.backend", "kite.client")
#: What the sans-IO layer must never import.
NOT_SANS_IO = ("asyncio", "socket", "ssl", "selectors", "uvloop")


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def owner(module: str) -> str:
    """The key of LAYERS a module belongs to (its package or itself)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return key
    raise AssertionError(f"module {module} is in no layer: add it to LAYERS")


def _in_type_checking(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute names; TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if _in_type_checking(node, parents):
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            # "from . import x" / "from .pkg import mod": the submodules count too
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if (SRC / Path(*sub.split("."))).with_suffix(".py").exists() or \
                        (SRC / Path(*sub.split("."))).is_dir():
                    found.append((sub, node.lineno))
    return found


def kite_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_imports_point_down_and_roles_stay_apart():
    problems = []
    for name, path in kite_modules().items():
        mine = owner(name)
        for target, line in imports_of(path):
            if target != "kite" and not target.startswith("kite."):
                if LAYERS[mine] == 1 and target.split(".")[0] in NOT_SANS_IO:
                    problems.append(f"{name}:{line} (sans-IO) imports {target}")
                continue
            theirs = owner(target)
            if LAYERS[theirs] > LAYERS[mine]:
                problems.append(f"{name}:{line} imports {target}, a higher layer")
            elif mine in ROLES and theirs in ROLES and theirs != mine:
                problems.append(f"{name}:{line} imports {target}: roles never import each other")
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    modules = kite_modules()
    graph = {name: sorted({t for t, _ in imports_of(path) if t in modules and t != name})
             for name, path in modules.items()}
    # A package's __init__ importing its own submodules is not a cycle of concern; every
    # other edge counts, imports inside functions included.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_exception_class_lives_in_errors():
    stray = []
    for name, path in kite_modules().items():
        if name == "kite.errors":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    ast.unparse(b).endswith(("Error", "Exception", "Failed", "Refused",
                                             "Unreachable", "Offline", "NotAKite"))
                    for b in node.bases):
                stray.append(f"{name}.{node.name}")
    assert not stray, f"exception classes outside kite/errors.py: {stray}"


def _tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} must be installed in CI (pip install '.[test]')")
        pytest.skip(f"{name} not installed")
    return exe


def test_ruff_is_clean():
    out = subprocess.run([_tool("ruff"), "check", "src", "tests", "bench"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_is_clean():
    _tool("mypy")
    out = subprocess.run([sys.executable, "-m", "mypy", "src/kite"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
