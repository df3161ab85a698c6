"""atheris target: parse_tunnel_response (the backend reads the relay's 200 head).

Run: see fuzz/README.md (``fuzz/run_all.sh RUNS tunnel_response``).
"""

import sys

import atheris

with atheris.instrument_imports(include=["kite", "targets"]):
    from targets import check_tunnel_response


def TestOneInput(data: bytes) -> None:
    """Only the documented error classes may escape ``check_tunnel_response`` (they are caught there)."""
    check_tunnel_response(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
