"""atheris target: ForwardedRewriter (the visitor's request stream of an HTTP kite).

Run: see fuzz/README.md (``fuzz/run_all.sh RUNS forwarded``).
"""

import sys

import atheris

with atheris.instrument_imports(include=["kite", "targets"]):
    from targets import check_forwarded


def TestOneInput(data: bytes) -> None:
    """Only the documented error classes may escape ``check_forwarded`` (they are caught there)."""
    check_forwarded(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
