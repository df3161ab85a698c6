"""atheris target: kite names: valid_proto, valid_domain, proto_port, domain_candidates, domain_matches.

Run: see fuzz/README.md (``fuzz/run_all.sh RUNS names``).
"""

import sys

import atheris

with atheris.instrument_imports(include=["kite", "targets"]):
    from targets import check_names


def TestOneInput(data: bytes) -> None:
    """Only the documented error classes may escape ``check_names`` (they are caught there)."""
    check_names(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
