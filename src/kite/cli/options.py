"""Options shared by several commands, each defined once.

Each helper is a decorator adding its options in the order they appear in ``--help``.
"""

from __future__ import annotations

import click

__all__ = ["busy_poll_option", "common_options", "keepalive_option", "relay_options",
           "timeout_option"]


def _apply(options: list, f):
    for opt in reversed(options):
        f = opt(f)
    return f


def common_options(f):
    """``-v/--verbose``, ``-q/--quiet``, ``--loop`` (parameters verbose, quiet, loop_kind)."""
    return _apply([
        click.option("-v", "--verbose", count=True, help="More log output (debug)."),
        click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only."),
        click.option("--loop", "loop_kind", type=click.Choice(["auto", "uvloop", "asyncio"]),
                     default="auto", show_default=True, help="Event loop."),
    ], f)


def keepalive_option(f):
    """``--keepalive`` of kite relay and kite expose."""
    return click.option("--keepalive", type=float, default=30.0, show_default=True,
                        help="Seconds of tunnel silence before a PING (0.1-3600; 0: none).")(f)


def busy_poll_option(f):
    """``--busy-poll`` of kite relay and kite expose (kite.net.busypoll)."""
    return click.option("--busy-poll", type=int, default=None, metavar="USEC",
                        help="After sending what may be answered at once, poll up to USEC "
                             "microseconds instead of sleeping (adapts; yields the CPU to "
                             "anyone who needs it; 0: off).  [default: 200]")(f)


def relay_options(f):
    """How the client commands (connect, forward) reach the relay: ``--relay`` and TLS."""
    return _apply([
        click.option("--relay", required=True, metavar="HOST:PORT",
                     help="The kite relay (port 443 if omitted)."),
        click.option("--tls", is_flag=True,
                     help="Wrap the connection to the relay in TLS (a relay on 443 behind strict "
                          "firewalls)."),
        click.option("--ca", type=click.Path(dir_okay=False),
                     help="With --tls: verify the relay against this CA/cert PEM."),
        click.option("--fingerprint", metavar="SHA256",
                     help="With --tls: pin the relay certificate's SHA-256."),
        click.option("--insecure", is_flag=True,
                     help="With --tls: do not verify the relay's certificate."),
        click.option("--server-name",
                     help="With --tls: name to verify the relay certificate against (and SNI)."),
    ], f)


def timeout_option(f):
    """``--timeout`` of the client commands."""
    return click.option("--timeout", type=float, default=20.0, show_default=True,
                        help="Seconds to reach the relay and get its answer.")(f)
