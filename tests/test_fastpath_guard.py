"""Guards around the fast-path selection (aiohttp's pattern): a CI run that requires the
compiled module must not pass silently on the twin, ``KITE_NO_EXTENSIONS=1`` must select the
twin, and both implementations must expose the same API."""

import os
import subprocess
import sys

import pytest

# Subprocesses import the same kite package as this test process (site-packages in CI,
# src/ in an editable checkout).
import kite as _kite_pkg
import kite.fastpath
from fastpath_impls import NO_EXT, REQUIRE_EXT, _load_impl

SRC = os.path.dirname(os.path.dirname(os.path.abspath(_kite_pkg.__file__)))


def run_python(code, **env):
    """``python -c code`` with the KITE_* variables of this run replaced by ``env``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KITE_")}
    environ.update(env)
    environ["PYTHONPATH"] = SRC + os.pathsep + environ.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                          text=True, timeout=60)


SHOW = "import kite.fastpath as f; print(f.IMPLEMENTATION, f.Demux.__module__)"


def test_required_extension_is_in_use():
    if not REQUIRE_EXT:
        pytest.skip("KITE_REQUIRE_EXTENSIONS is not set")
    assert kite.fastpath.IMPLEMENTATION == "c", "the compiled fast path did not load"
    assert kite.fastpath.Demux.__module__ == "kite._fastpath"


def test_no_extensions_selects_the_twin():
    result = run_python(SHOW, KITE_NO_EXTENSIONS="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["py", "kite._fastpath_py"]


def test_without_variables_the_extension_is_preferred():
    result = run_python(SHOW)
    assert result.returncode == 0, result.stderr
    if result.stdout.split()[0] == "py":
        if REQUIRE_EXT:
            pytest.fail("kite._fastpath is not importable in a fresh interpreter")
        pytest.skip("compiled fast path not built")
    assert result.stdout.split() == ["c", "kite._fastpath"]


def test_both_variables_refuse_to_guess():
    result = run_python(SHOW, KITE_NO_EXTENSIONS="1", KITE_REQUIRE_EXTENSIONS="1")
    assert result.returncode != 0
    assert "KITE_NO_EXTENSIONS and KITE_REQUIRE_EXTENSIONS are both set" in result.stderr


def test_selection_matches_this_run():
    expected = "py" if NO_EXT else None
    if expected:
        assert kite.fastpath.IMPLEMENTATION == expected


def public(obj):
    return sorted(n for n in dir(obj) if not n.startswith("_") or n in ("__init__",))


def test_twins_have_the_same_api():
    if NO_EXT:
        pytest.skip("KITE_NO_EXTENSIONS=1: only the twin is in use")
    c, py = _load_impl("c"), _load_impl("py")
    for name in ("MAX_SIZE_DIGITS", "MAX_CHUNK_SIZE", "MAX_DATA_PAYLOAD"):
        assert getattr(c, name) == getattr(py, name)
    assert sorted(c.__all__) == sorted(py.__all__)
    for cls in ("StreamSlot", "Demux", "ChunkWriter"):
        assert public(getattr(c, cls)) == public(getattr(py, cls)), cls


def test_both_implement_the_pyi():
    """Every name of ``_fastpath.pyi`` (the API of record) exists in both implementations."""
    import ast

    with open(os.path.join(SRC, "kite", "_fastpath.pyi")) as f:
        tree = ast.parse(f.read())
    wanted = {}
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and node.target.id.isupper():
            wanted[node.target.id] = None
        elif isinstance(node, ast.ClassDef) and node.name not in ("Inflater",):
            members = set()
            for item in node.body:
                if isinstance(item, ast.AnnAssign):
                    members.add(item.target.id)
                elif isinstance(item, ast.FunctionDef):
                    members.add(item.name)
            wanted[node.name] = members
    assert set(wanted) == {"MAX_SIZE_DIGITS", "MAX_CHUNK_SIZE", "MAX_DATA_PAYLOAD",
                           "StreamSlot", "Demux", "ChunkWriter"}
    impls = [_load_impl("py")] if NO_EXT else [_load_impl("c"), _load_impl("py")]
    for impl in impls:
        for name, members in wanted.items():
            assert hasattr(impl, name), (impl.__name__, name)
            for member in members or ():
                assert hasattr(getattr(impl, name), member), (impl.__name__, name, member)
