"""atheris target: ZInflater.inflate (compressed chunk bodies).

Run: see fuzz/README.md (``fuzz/run_all.sh RUNS zchunks``).
"""

import sys

import atheris

with atheris.instrument_imports(include=["kite", "targets"]):
    from targets import check_zchunks


def TestOneInput(data: bytes) -> None:
    """Only the documented error classes may escape ``check_zchunks`` (they are caught there)."""
    check_zchunks(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
