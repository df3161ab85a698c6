"""The ``kite`` command line: parse options, build a config, call one entry point each.

The only package of kite that imports click.  :data:`main` is the ``kite`` group (the console
script ``kite = kite.cli:main``, ``python -m kite``, ``python -m kite.cli``); every command
module is imported and its commands added here:

=================  ==========================================================
``relay.py``       kite relay
``expose.py``      kite expose
``client.py``      kite connect, kite forward, kite ssh-config
``tools.py``       kite init, kite demo, kite import-pagekiterc
``bench.py``       kite bench (runs bench/relay_bench.py of the checkout)
``options.py``     options shared by several commands
``run.py``         logging, run-until-signal on the event loop, exit codes
=================  ==========================================================

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error (one line
``kite: error: ...`` naming the problem and the fix).
"""

from __future__ import annotations

import click

from .. import __version__
from . import bench, client, expose, relay, tools

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kite")
def main() -> None:
    """kite: reach servers behind NAT by name, through a relay you run (PageKite protocol)."""


for _command in (relay.relay, expose.expose, client.connect, client.forward, client.ssh_config,
                 tools.init, tools.demo, tools.import_pagekiterc, bench.bench):
    main.add_command(_command)
del _command
