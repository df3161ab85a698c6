"""atheris target: check_signature and check_challenge (tokens from the wire).

Run: see fuzz/README.md (``fuzz/run_all.sh RUNS signing``).
"""

import sys

import atheris

with atheris.instrument_imports(include=["kite", "targets"]):
    from targets import check_signing


def TestOneInput(data: bytes) -> None:
    """Only the documented error classes may escape ``check_signing`` (they are caught there)."""
    check_signing(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
