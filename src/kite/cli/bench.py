"""``kite bench``: run the relay benchmark, ``bench/relay_bench.py`` of the source checkout.

The benchmark is not part of the installed package: it starts nginx, stunnel, haproxy,
pagekite.py and wrk, which a wheel cannot bring along, and it lives next to the other
benchmarks in ``bench/``.
This command finds the script (``$KITE_BENCH_SCRIPT``, the checkout this ``kite`` was
installed from in development mode, or ``./bench/relay_bench.py``) and runs it with this
Python, passing every argument through; ``kite bench --help`` shows the benchmark's own
options.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from .run import fail

SCRIPT = Path("bench") / "relay_bench.py"

#: The source checkout when kite runs from one: src/kite/cli/bench.py -> three levels up.
CHECKOUT = Path(__file__).resolve().parents[3]


def find_script() -> Path | None:
    """Where ``bench/relay_bench.py`` is, or None when kite runs from a wheel."""
    env = os.environ.get("KITE_BENCH_SCRIPT")
    candidates = [Path(env)] if env else []
    candidates.append(CHECKOUT / SCRIPT)
    candidates.append(Path.cwd() / SCRIPT)
    for path in candidates:
        if path.is_file():
            return path
    return None


@click.command(
    "bench",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                      "help_option_names": []},  # --help goes to the benchmark
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args) -> None:
    """Relay benchmark against direct, stunnel, haproxy and pagekite.py (kite bench --help)."""
    script = find_script()
    if script is None:
        fail("the relay benchmark (bench/relay_bench.py) is not in this installation; "
             "it runs from a source checkout of kite: cd to the checkout and run "
             "`python bench/relay_bench.py --help` (or set KITE_BENCH_SCRIPT to its path). "
             "It needs nginx-light, stunnel4, haproxy, pagekite and wrk (apt-get install) and "
             "matplotlib for the chart (pip install matplotlib); missing ones are skipped with a note.")
    argv = [sys.executable, str(script), *args]
    sys.stdout.flush()
    sys.stderr.flush()
    # Replace this process: Ctrl-C and SIGTERM reach the benchmark directly, and it stops
    # everything it started.
    os.execv(sys.executable, argv)
