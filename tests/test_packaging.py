"""Packaging as users meet it: one version source, ``kite --version``, the fallback to the
pure-Python twin (one warning, or an error with KITE_REQUIRE_EXTENSIONS=1), the installed
wheel under test in CI, and the sdist installing where no C compiler works.

The sdist test installs ``wheels/dist/kite_relay-VERSION.tar.gz`` (or ``$KITE_SDIST``; made by
``bash wheels/build.sh``) into a fresh venv with ``CC=false``: pip fetches the build
requirements (setuptools, Cython) and the dependencies from PyPI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import kite
import kite.fastpath
from kite.net import tlsconn

REPO = Path(__file__).resolve().parents[1]
# Subprocesses import the same kite package as this test process (site-packages in CI,
# src/ in a checkout).
PKG_PARENT = str(Path(kite.__file__).resolve().parents[1])
WARNING = "FastPathFallbackWarning"


def run(args, env=None, timeout=120, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def kite_env(**extra):
    """This environment without KITE_* variables, importing this test run's kite."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KITE_")}
    env["PYTHONPATH"] = PKG_PARENT
    env.update(extra)
    return env


# Makes `from . import _fastpath` fail as it does where the extension was never built.
BLOCK = "import sys; sys.modules['kite._fastpath'] = None; "


def test_one_version_source():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]', pyproject, re.M)
    assert re.search(r'^version = \{ attr = "kite.__version__" \}', pyproject, re.M)
    assert not re.search(r"^version = \"", pyproject, re.M)
    assert re.fullmatch(r"\d+\.\d+\.\d+", kite.__version__)
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert f"## [{kite.__version__}]" in changelog


def test_installed_metadata_matches_the_package():
    from importlib import metadata

    try:
        dist = metadata.distribution("kite-relay")
    except metadata.PackageNotFoundError:
        pytest.skip("kite-relay is not installed (tests run on the checkout's src/)")
    files = {str(dist.locate_file(f)) for f in dist.files or []}
    if str(Path(kite.__file__)) not in files:
        pytest.skip("the installed kite-relay is not the kite under test")
    assert dist.version == kite.__version__


@pytest.mark.parametrize("env, impl", [({}, None), ({"KITE_NO_EXTENSIONS": "1"}, "pure Python")])
def test_version_names_the_fast_path(env, impl):
    r = run([sys.executable, "-m", "kite", "--version"], env=kite_env(**env))
    assert r.returncode == 0, r.stderr
    impl = impl or ("compiled" if kite.fastpath.IMPLEMENTATION == "c" else "pure Python")
    tls = "event loop" if env or tlsconn.native_tls() else "compiled"
    assert r.stdout == f"kite, version {kite.__version__} (fast path: {impl}; TLS: {tls})\n"
    if env:
        assert WARNING not in r.stderr


def test_missing_extension_warns_once():
    code = BLOCK + "import kite.fastpath as f, kite.cli, kite.net.tunnel; print(f.IMPLEMENTATION)"
    r = run([sys.executable, "-c", code], env=kite_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout == "py\n"
    assert r.stderr.count(WARNING) == 1, r.stderr
    assert "pure-Python twin" in r.stderr and "KITE_NO_EXTENSIONS=1" in r.stderr


def test_missing_rewrite_module_warns_naming_it():
    """A checkout built before kite._forwarded existed: the chunk fast path stays compiled,
    request heads take the rewriter's Python path, and the warning says which is missing."""
    if kite.fastpath.IMPLEMENTATION != "c":
        pytest.skip("the compiled fast path is not in use here")
    code = ("import sys; sys.modules['kite._forwarded'] = None; import kite.fastpath as f; "
            "print(f.IMPLEMENTATION, f.rewrite_one_head)")
    r = run([sys.executable, "-c", code], env=kite_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout == "c None\n"
    assert r.stderr.count(WARNING) == 1 and "kite._forwarded" in r.stderr, r.stderr
    r = run([sys.executable, "-c", code], env=kite_env(KITE_REQUIRE_EXTENSIONS="1"))
    assert "ImportError: KITE_REQUIRE_EXTENSIONS=1 but kite._forwarded did not load" in r.stderr


def test_twin_on_request_does_not_warn():
    r = run([sys.executable, "-W", "error", "-c", BLOCK + "import kite.fastpath as f; "
             "print(f.IMPLEMENTATION)"], env=kite_env(KITE_NO_EXTENSIONS="1"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "py\n" and WARNING not in r.stderr


def test_missing_extension_is_an_error_when_required():
    r = run([sys.executable, "-c", BLOCK + "import kite.fastpath"],
            env=kite_env(KITE_REQUIRE_EXTENSIONS="1"))
    assert r.returncode != 0
    assert "ImportError: KITE_REQUIRE_EXTENSIONS=1 but kite._fastpath did not load" in r.stderr


def test_ci_tests_the_installed_wheel():
    """.ci/run sets KITE_TEST_INSTALLED=1: kite must then come from the venv's site-packages,
    with the compiled module and without the Cython sources or any compiler toolchain."""
    if not os.environ.get("KITE_TEST_INSTALLED"):
        pytest.skip("KITE_TEST_INSTALLED is not set (.ci/run sets it)")
    pkg = Path(kite.__file__).resolve().parent
    assert pkg.parent.name == "site-packages", pkg
    assert Path(sys.prefix).resolve() in pkg.parents, (sys.prefix, pkg)
    assert REPO / "src" not in pkg.parents
    assert all(Path(p or ".").resolve() != REPO / "src" for p in sys.path), sys.path
    assert kite.fastpath.IMPLEMENTATION == "c"
    assert list(pkg.glob("_fastpath.cpython-*.so"))
    assert not list(pkg.glob("_fastpath.pyx")) and not list(pkg.glob("_fastpath.c"))
    assert run([sys.executable, "-c", "import Cython"]).returncode != 0


def find_sdist() -> Path:
    given = os.environ.get("KITE_SDIST")
    default = REPO / "wheels" / "dist" / f"kite_relay-{kite.__version__}.tar.gz"
    sdist = Path(given) if given else default
    if not sdist.is_file():
        if os.environ.get("CI") or given:
            pytest.fail(f"no sdist at {sdist}: run `bash wheels/build.sh` first")
        pytest.skip(f"no sdist at {sdist} (bash wheels/build.sh makes it)")
    return sdist


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sdist_without_a_compiler_installs_the_twin(tmp_path):
    """pip install from the sdist with no working C compiler: a pure-Python wheel, the twin
    with one warning; KITE_REQUIRE_EXTENSIONS=1 turns both the build and the import into
    errors."""
    # A path of its own: pip caches wheels built from a local sdist by its path, and the
    # pure-Python wheel made here must never be reused for a build with a compiler.
    sdist = tmp_path / find_sdist().name
    shutil.copy(find_sdist(), sdist)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KITE_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(CC="false", CXX="false", PIP_DISABLE_PIP_VERSION_CHECK="1")

    # Required extension: the build fails, naming the reason.
    r = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "req"),
             str(sdist)], env={**env, "KITE_REQUIRE_EXTENSIONS": "1"}, timeout=600)
    assert r.returncode != 0
    assert "KITE_REQUIRE_EXTENSIONS=1 but kite's extensions could not be built" in r.stdout + r.stderr
    assert not list((tmp_path / "req").glob("*.whl"))

    # Default: a pure-Python wheel, installed with its dependencies.
    venv.create(tmp_path / "venv", with_pip=True, symlinks=True)
    py = str(tmp_path / "venv" / "bin" / "python")
    r = run([py, "-m", "pip", "install", str(sdist)], env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    site = Path(run([py, "-c", "import kite; print(kite.__file__)"], env=env,
                    cwd=tmp_path).stdout.strip()).parent
    assert site.parent.name == "site-packages" and tmp_path in site.parents, site
    assert not list(site.glob("_fastpath*.so"))
    wheel_meta = next(site.parent.glob("kite_relay-*.dist-info")) / "WHEEL"
    assert "Tag: py3-none-any" in wheel_meta.read_text()
    assert run([py, "-c", "import Cython"], env=env, cwd=tmp_path).returncode != 0

    kite_cmd = str(tmp_path / "venv" / "bin" / "kite")
    r = run([kite_cmd, "--version"], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (f"kite, version {kite.__version__} "
                        "(fast path: pure Python; TLS: event loop)\n")
    assert r.stderr.count(WARNING) == 1, r.stderr
    r = run([kite_cmd, "demo", "--once"], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(WARNING) == 1, r.stderr

    r = run([kite_cmd, "--version"], env={**env, "KITE_NO_EXTENSIONS": "1"}, cwd=tmp_path)
    assert r.returncode == 0 and WARNING not in r.stderr, r.stderr
    r = run([py, "-c", "import kite.fastpath"], env={**env, "KITE_REQUIRE_EXTENSIONS": "1"},
            cwd=tmp_path)
    assert r.returncode != 0
    assert "KITE_REQUIRE_EXTENSIONS=1 but kite._fastpath did not load" in r.stderr
