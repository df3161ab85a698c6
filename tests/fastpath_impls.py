"""Which fast-path implementations the tests run on (imported by conftest and tests; a
module of its own because ``from conftest import`` is ambiguous with tests/compat/)."""

import importlib
import os

import pytest

NO_EXT = os.environ.get("KITE_NO_EXTENSIONS", "") not in ("", "0")
REQUIRE_EXT = os.environ.get("KITE_REQUIRE_EXTENSIONS", "") not in ("", "0")

def _load_impl(name):
    if name == "py":
        return importlib.import_module("kite._fastpath_py")
    try:
        return importlib.import_module("kite._fastpath")
    except ImportError as exc:
        if REQUIRE_EXT:
            pytest.fail(f"KITE_REQUIRE_EXTENSIONS=1 but kite._fastpath did not load: {exc}")
        pytest.skip(f"compiled fast path not built: {exc}")


FASTPATH_IMPLS = ["py"] if NO_EXT else ["c", "py"]


