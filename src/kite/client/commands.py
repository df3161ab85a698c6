"""Click commands of the client helpers (``kite connect``, ``kite forward``, ``kite ssh-config``).

Registered on the main ``kite`` group by kite.cli.
"""

import click

COMMANDS: list = []
