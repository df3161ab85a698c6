"""atheris target: parse_inband_request and parse_inband_reply (in-band registration chunks).

Run: see fuzz/README.md (``fuzz/run_all.sh RUNS inband``).
"""

import sys

import atheris

with atheris.instrument_imports(include=["kite", "targets"]):
    from targets import check_inband


def TestOneInput(data: bytes) -> None:
    """Only the documented error classes may escape ``check_inband`` (they are caught there)."""
    check_inband(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
