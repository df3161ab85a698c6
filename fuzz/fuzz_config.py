"""atheris target: parse_hostport, parse_target, parse_grant (command-line and TOML values).

Run: see fuzz/README.md (``fuzz/run_all.sh RUNS config``).
"""

import sys

import atheris

with atheris.instrument_imports(include=["kite", "targets"]):
    from targets import check_config


def TestOneInput(data: bytes) -> None:
    """Only the documented error classes may escape ``check_config`` (they are caught there)."""
    check_config(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
