"""Builds the compiled modules (kite._fastpath, _tls, _forwarded); the rest is in pyproject.toml.

Build-time switches (environment variables):

- ``KITE_NO_EXTENSIONS=1`` skips the extension: a pure-Python wheel (``py3-none-any``) and
  kite uses its twin ``kite._fastpath_py``.
- By default a build that cannot make the extension (no C compiler, Cython missing, a compile
  or link error) prints a warning and makes the same pure-Python wheel instead of failing, so
  ``pip install kite-relay`` from the sdist works on any platform; at run time kite warns once
  that it runs on the slower twin.
- ``KITE_REQUIRE_EXTENSIONS=1`` makes that failure an error (CI, wheels/build.sh and
  cibuildwheel set it).
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel as _bdist_wheel
from setuptools.command.build_ext import build_ext as _build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


NO_EXTENSIONS = _flag("KITE_NO_EXTENSIONS")
REQUIRE_EXTENSIONS = _flag("KITE_REQUIRE_EXTENSIONS")
if NO_EXTENSIONS and REQUIRE_EXTENSIONS:
    sys.exit("KITE_NO_EXTENSIONS and KITE_REQUIRE_EXTENSIONS are both set; unset one")

CYTHON_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
    "embedsignature": True,
}


class build_ext(_build_ext):
    """Cythonizes and compiles kite._fastpath; without a compiler or Cython, builds nothing
    (unless KITE_REQUIRE_EXTENSIONS=1) and leaves the distribution without extensions, so
    bdist_wheel below tags the wheel pure."""

    def run(self):
        if not self.extensions:
            return super().run()
        try:
            from Cython.Build import cythonize
            from Cython.Compiler.Errors import CompileError as CythonCompileError
        except ImportError as exc:
            return self._without_extension(f"Cython is not installed ({exc})")
        try:
            # The .pyx sources become .c; the Extension objects stay the ones finalize_options
            # prepared (setuptools keeps its own attributes on them).
            cythonized = cythonize(self.extensions, compiler_directives=CYTHON_DIRECTIVES)
            sources = {ext.name: ext.sources for ext in cythonized}
            for ext in self.extensions:
                ext.sources = sources[ext.name]
            super().run()
        except (CythonCompileError, CCompilerError, ExecError, PlatformError) as exc:
            self._without_extension(f"{type(exc).__name__}: {exc}")

    def _without_extension(self, reason):
        if REQUIRE_EXTENSIONS:
            raise SystemExit(
                f"KITE_REQUIRE_EXTENSIONS=1 but kite's extensions could not be built: {reason}")
        bar = "*" * 76
        print(f"\n{bar}\nWARNING: kite's compiled modules could not be built: {reason}\n"
              "kite installs without them and uses the pure-Python twin (kite._fastpath_py),\n"
              "the event loop's TLS and the X-Forwarded rewriter's Python path, which are\n"
              "slower. Install a C compiler and reinstall for the compiled modules; "
              f"KITE_REQUIRE_EXTENSIONS=1 makes this an error.\n{bar}\n", file=sys.stderr)
        self.extensions = []
        self.distribution.ext_modules = []


class bdist_wheel(_bdist_wheel):
    """Builds first, then tags the wheel py3-none-any if build_ext dropped the extension
    (setuptools decides the tag from the extension list before anything is built)."""

    def run(self):
        if not self.skip_build:
            self.run_command("build")
        if not self.distribution.has_ext_modules():
            self.root_is_pure = True
        super().run()


ext_modules = []
if not NO_EXTENSIONS:
    ext_modules.append(
        Extension("kite._fastpath", ["src/kite/_fastpath.pyx"], extra_compile_args=["-O3"]))
    ext_modules.append(
        Extension("kite._forwarded", ["src/kite/_forwarded.pyx"], extra_compile_args=["-O3"]))
    # OpenSSL is looked up at run time in the library Python's ssl loaded: nothing to link.
    ext_modules.append(
        Extension("kite._tls", ["src/kite/_tls.pyx"], extra_compile_args=["-O3"]))

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext, "bdist_wheel": bdist_wheel})
