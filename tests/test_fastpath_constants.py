"""One source for the cold parts: the twin (``kite._fastpath_py``) defines every constant and
cold helper the two implementations share, and the compiled module imports them instead of
keeping copies.  The exceptions are the constants the compiled per-chunk loop needs at C
compile time (``cdef enum`` in ``_fastpath.pxd``): each must equal the twin's value.
"""

import os
import re

import pytest

from fastpath_impls import NO_EXT, _load_impl

py = _load_impl("py")

# The source tree's .pxd: wheels do not ship the Cython sources.
PXD = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src", "kite",
                   "_fastpath.pxd")

# enum of _fastpath.pxd -> the value the twin defines
MIRRORED = {
    "SIZE_DIGITS": py.MAX_SIZE_DIGITS,
    "SIZE_LINE_WINDOW": py._SIZE_LINE_WINDOW,
    "MAX_SID": py._MAX_SID,
    "SID_DIGITS": py._MAX_SID_DIGITS,
    "SID_HEADER_MAX": len(b"SID: %d\r\n\r\n" % py._MAX_SID),
}

# what the compiled module takes from the twin (the very same objects)
IMPORTED = [
    "__all__",
    "MAX_SIZE_DIGITS",
    "MAX_CHUNK_SIZE",
    "MAX_DATA_PAYLOAD",
    "_INITIAL_CAP",
    "_SHRINK_ABOVE",
    "_MIN_LOAN",
    "_MAX_LOAN",
    "_sid_arg",
    "_max_chunk_size_arg",
    "_max_payload_arg",
    "_slot_type_error",
    "_reentry_error",
    "_no_loan_error",
    "_outside_loan_error",
    "_loan_out_error",
    "_no_inflater_error",
    "_slot_repr",
    "_demux_repr",
    "_writer_repr",
    "_read_size_line",
    "_analyse_body",
    "_inflate_chunk",
    "_dispatch",
    "_check_header_block",
]


@pytest.fixture(scope="module")
def compiled():
    if NO_EXT:
        pytest.skip("KITE_NO_EXTENSIONS=1: only the pure-Python twin is in use")
    return _load_impl("c")


def pxd_enums():
    with open(PXD, encoding="utf-8") as f:
        text = f.read()
    block = text[text.index("cdef enum:") : text.index("cdef class")]
    return {m[1]: int(m[2]) for m in re.finditer(r"^\s+([A-Z_]+)\s*=\s*(\d+)", block, re.M)}


def test_pxd_enums_equal_the_twins_constants():
    enums = pxd_enums()
    assert {name: enums.get(name) for name in MIRRORED} == MIRRORED


def test_compiled_enums_equal_the_twins_constants(compiled):
    # The values the module was compiled with (a stale build shows here).
    assert compiled._ENUMS == MIRRORED


def test_compiled_module_imports_the_cold_parts(compiled):
    for name in IMPORTED:
        assert getattr(compiled, name) is getattr(py, name), name


def test_compiled_module_defines_no_python_function_of_its_own(compiled):
    # Every module-level Python function of the compiled module is the twin's (Cython's
    # own dunders, such as its pickling helpers, aside).
    own = [
        name
        for name, value in vars(compiled).items()
        if not name.startswith("__")
        and callable(value)
        and not isinstance(value, type)
        and getattr(value, "__module__", None) == compiled.__name__
    ]
    assert own == []
