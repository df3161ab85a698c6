"""``python -m kite.cli``: the ``kite`` command."""

from . import main

main()
