"""atheris target: parse_tunnel_request (the relay reads a backend's CONNECT PageKite head).

Run: see fuzz/README.md (``fuzz/run_all.sh RUNS tunnel_request``).
"""

import sys

import atheris

with atheris.instrument_imports(include=["kite", "targets"]):
    from targets import check_tunnel_request


def TestOneInput(data: bytes) -> None:
    """Only the documented error classes may escape ``check_tunnel_request`` (they are caught there)."""
    check_tunnel_request(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
