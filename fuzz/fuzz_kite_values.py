"""atheris target: KiteLine.parse, KiteRef.parse, Challenge.parse (X-PageKite values).

Run: see fuzz/README.md (``fuzz/run_all.sh RUNS kite_values``).
"""

import sys

import atheris

with atheris.instrument_imports(include=["kite", "targets"]):
    from targets import check_kite_values


def TestOneInput(data: bytes) -> None:
    """Only the documented error classes may escape ``check_kite_values`` (they are caught there)."""
    check_kite_values(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
