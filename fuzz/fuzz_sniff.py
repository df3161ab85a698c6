"""atheris target: sniff (a visitor's first bytes on the relay's public port).

Run: see fuzz/README.md (``fuzz/run_all.sh RUNS sniff``).
"""

import sys

import atheris

with atheris.instrument_imports(include=["kite", "targets"]):
    from targets import check_sniff


def TestOneInput(data: bytes) -> None:
    """Only the documented error classes may escape ``check_sniff`` (they are caught there)."""
    check_sniff(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
