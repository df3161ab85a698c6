"""Builds the one compiled module, kite._fastpath; everything else is in pyproject.toml.

KITE_NO_EXTENSIONS=1 at build time skips the extension (the pure-Python twin is used);
KITE_REQUIRE_EXTENSIONS=1 makes a failed compile fail the build instead of falling back.
"""
import os

from setuptools import Extension, setup

NO_EXTENSIONS = os.environ.get("KITE_NO_EXTENSIONS", "") not in ("", "0")

ext_modules = []
if not NO_EXTENSIONS:
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [
            Extension(
                "kite._fastpath",
                ["src/kite/_fastpath.pyx"],
                extra_compile_args=["-O3"],
            )
        ],
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "embedsignature": True,
        },
    )

setup(ext_modules=ext_modules)
