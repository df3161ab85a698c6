"""Relay benchmark: kite against a direct connection, haproxy, a stunnel pair and pagekite.py, on loopback.

The entry script; the code is the package ``relaybench/`` beside it (bench/README.md).

    python bench/relay_bench.py --help
    python bench/relay_bench.py --quick
"""

import os
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

from relaybench.cli import main  # noqa: E402 - after the path above

if __name__ == "__main__":
    sys.exit(main())
