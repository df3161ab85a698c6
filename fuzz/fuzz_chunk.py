"""atheris target: control.parse_chunk (every non-data chunk of a live tunnel).

Run: see fuzz/README.md (``fuzz/run_all.sh RUNS chunk``).
"""

import sys

import atheris

with atheris.instrument_imports(include=["kite", "targets"]):
    from targets import check_chunk


def TestOneInput(data: bytes) -> None:
    """Only the documented error classes may escape ``check_chunk`` (they are caught there)."""
    check_chunk(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
