"""The ``kite`` command line: parse options, build a config, call one entry point each.

The only package of kite that imports click.  :data:`main` is the ``kite`` group (the console
script ``kite = kite.cli:main``, ``python -m kite``, ``python -m kite.cli``); every command
module is imported and its commands added here:

=================  ==========================================================
``relay.py``       kite relay
``accounts.py``    kite accounts (the relay's account registry)
``expose.py``      kite expose
``client.py``      kite connect, kite forward, kite ssh-config
``tools.py``       kite init, kite demo, kite import-pagekiterc
``bench.py``       kite bench (runs bench/relay_bench.py of the checkout)
``status.py``      kite status (a relay's admin endpoint, as tables)
``options.py``     options shared by several commands
``run.py``         logging, run-until-signal on the event loop, exit codes
=================  ==========================================================

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error (one line
``kite: error: ...`` naming the problem and the fix).
"""

from __future__ import annotations

import sys
from typing import Any

import click

from .. import __version__
from . import accounts, bench, client, expose, relay, status, tools
from .run import fail

__all__ = ["main"]


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """``kite --version``: the version, and the fast path and TLS this installation runs on."""
    if not value or ctx.resilient_parsing:
        return
    from .. import fastpath
    from ..net import tlsconn

    impl = "compiled" if fastpath.IMPLEMENTATION == "c" else "pure Python"
    tls = "compiled" if tlsconn.native_tls() is None else "event loop"
    click.echo(f"kite, version {__version__} (fast path: {impl}; TLS: {tls})")
    ctx.exit()



#: click >= 8.2 raises this for ``kite`` without a command (8.1 prints the help and exits 0).
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class KiteGroup(click.Group):
    """The ``kite`` group: a usage error (unknown option, a value of the wrong type, a missing
    argument) is one line ``kite: error: ...`` and exit 2, like a ConfigError."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            status = super().main(*args, **kwargs)
        except _NO_ARGS_IS_HELP as err:  # `kite` alone: the help
            err.show()
            sys.exit(err.exit_code)
        except click.UsageError as err:
            where = f" (see '{err.ctx.command_path} --help')" if err.ctx is not None else ""
            fail(f"{err.format_message()}{where}", err.exit_code)
        except click.ClickException as err:
            fail(err.format_message(), err.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(status if isinstance(status, int) else 0)


@click.group(cls=KiteGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_print_version, help="Show the version and the fast path, then exit.")
def main() -> None:
    """kite: reach servers behind NAT by name, through a relay you run (PageKite protocol)."""


for _command in (relay.relay, expose.expose, client.connect, client.forward, client.ssh_config,
                 tools.init, tools.demo, tools.import_pagekiterc, bench.bench,
                 accounts.accounts, status.status):
    main.add_command(_command)
del _command
