"""atheris target: import-pagekiterc's convert (a pagekite.py rc file).

Run: see fuzz/README.md (``fuzz/run_all.sh RUNS pagekiterc``).
"""

import sys

import atheris

with atheris.instrument_imports(include=["kite", "targets"]):
    from targets import check_pagekiterc


def TestOneInput(data: bytes) -> None:
    """Only the documented error classes may escape ``check_pagekiterc`` (they are caught there)."""
    check_pagekiterc(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
