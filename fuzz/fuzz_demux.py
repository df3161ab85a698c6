"""atheris target: the fast path's Demux, compiled and pure Python, compared (chunk framing, ZChunks).

Run: see fuzz/README.md (``fuzz/run_all.sh RUNS demux``).
"""

import sys

import atheris

with atheris.instrument_imports(include=["kite", "targets"]):
    from targets import check_demux


def TestOneInput(data: bytes) -> None:
    """Only the documented error classes may escape ``check_demux`` (they are caught there)."""
    check_demux(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
