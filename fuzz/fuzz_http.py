"""atheris target: parse_connect_reply and find_head_end (HTTP heads, the answer to a CONNECT).

Run: see fuzz/README.md (``fuzz/run_all.sh RUNS http``).
"""

import sys

import atheris

with atheris.instrument_imports(include=["kite", "targets"]):
    from targets import check_http


def TestOneInput(data: bytes) -> None:
    """Only the documented error classes may escape ``check_http`` (they are caught there)."""
    check_http(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
