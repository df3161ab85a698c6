"""The ``kite`` command line: parse options, load config, call one entry point each.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error (one line naming
the problem and the fix).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Optional

import click

from . import __version__
from .errors import ConfigError, KiteError

log = logging.getLogger("kite")

#: After SIGTERM/SIGINT, how long a command may take to wind down before it is cancelled.
GRACE_SECONDS = 30.0


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.INFO
    if quiet:
        level = logging.WARNING
    if verbose:
        level = logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _fail_config(err: ConfigError) -> None:
    click.echo(f"kite: error: {err}", err=True)
    sys.exit(2)


def _run_until_signal(main, loop_kind: Optional[str]) -> int:
    """Run ``main(stop_event)`` on uvloop (or asyncio); SIGTERM/SIGINT set the event."""
    from .net.aio import run

    async def wrapper():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        main_task = loop.create_task(main(stop))

        def on_signal():
            if stop.is_set():  # a second signal: stop now
                main_task.cancel()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, on_signal)
            except (NotImplementedError, RuntimeError):
                pass
        stop_waiter = loop.create_task(stop.wait())
        await asyncio.wait({main_task, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not main_task.done():
            # main() drains on its own (relay: up to --drain-timeout); past that, cancel it.
            done, _ = await asyncio.wait({main_task}, timeout=GRACE_SECONDS)
            if not done:
                main_task.cancel()
        stop_waiter.cancel()
        try:
            return await main_task
        except asyncio.CancelledError:
            return 1

    try:
        return run(wrapper, loop_kind) or 0
    except ConfigError as err:
        _fail_config(err)
    except KiteError as err:
        click.echo(f"kite: error: {err}", err=True)
        return 1
    return 0


_common = [
    click.option("-v", "--verbose", count=True, help="More log output (debug)."),
    click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only."),
    click.option("--loop", "loop_kind", type=click.Choice(["auto", "uvloop", "asyncio"]),
                 default="auto", show_default=True, help="Event loop."),
]


def common_options(f):
    for opt in reversed(_common):
        f = opt(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kite")
def main() -> None:
    """kite: reach servers behind NAT by name, through a relay you run (PageKite protocol)."""


# -- relay ----------------------------------------------------------------------------------
@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Relay TOML config.")
@click.option("--listen", multiple=True, metavar="HOST:PORT",
              help="Address to serve tunnels and visitors on (repeatable). Default 0.0.0.0:443.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="Certificate PEM for TLS tunnels.")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="Key PEM for --tls-cert.")
@click.option("--tls-name", multiple=True, metavar="NAME",
              help="SNI names that mean the relay itself (default: the certificate's names).")
@click.option("--kite", "kites", multiple=True, metavar="PROTO:DOMAIN:SECRET",
              help="Allow backends with SECRET to fly DOMAIN (PROTO * = all; *.dom wildcards).")
@click.option("--single", "single", multiple=True, metavar="DOMAIN",
              help="Only one backend at a time may fly DOMAIN (pagekite.py's Duplicate rule).")
@click.option("--keepalive", type=float, default=30.0, show_default=True,
              help="Seconds of tunnel silence before a PING.")
@click.option("--zchunks", is_flag=True, help="Let pagekite.py backends compress (ZChunks).")
@click.option("--drain-timeout", type=float, default=10.0, show_default=True,
              help="On SIGTERM, seconds to let open streams finish.")
@common_options
def relay(config_file, listen, tls_cert, tls_key, tls_name, kites, single, keepalive, zchunks,
          drain_timeout, verbose, quiet, loop_kind):
    """Run the public relay: tunnels and visitors on one port."""
    _setup_logging(verbose, quiet)
    from .relay.main import build_relay_config, serve_relay

    try:
        cfg = build_relay_config(config_file=config_file, listen=listen, tls_cert=tls_cert,
                                 tls_key=tls_key, tls_names=tls_name, kites=kites, single=single,
                                 keepalive=keepalive, zchunks=zchunks, drain_timeout=drain_timeout)
    except ConfigError as err:
        _fail_config(err)
    sys.exit(_run_until_signal(lambda stop: serve_relay(cfg, stop), loop_kind))


# -- expose ---------------------------------------------------------------------------------
@main.command()
@click.argument("target", required=False)
@click.argument("name", required=False)
@click.option("--relay", "relays", multiple=True, metavar="HOST:PORT",
              help="Relay to fly on (repeatable: one tunnel each).")
@click.option("--secret", envvar="KITE_SECRET", help="Shared secret (or env KITE_SECRET).")
@click.option("--ca", type=click.Path(dir_okay=False), help="Verify the relay against this CA/cert PEM.")
@click.option("--fingerprint", metavar="SHA256", help="Pin the relay certificate's SHA-256.")
@click.option("--insecure", is_flag=True, help="Do not verify the relay's certificate.")
@click.option("--plain", is_flag=True, help="Plain TCP tunnel, no TLS.")
@click.option("--server-name", help="Name to verify the relay certificate against (and SNI).")
@click.option("--connect-name", metavar="NAME",
              help="Reach the relay's TLS with a plain 'CONNECT NAME:443' first, and check its "
                   "certificate against NAME (pagekite.py's --fe_certname: the only TLS tunnel "
                   "a pagekite.py 1.5.2 frontend accepts).")
@click.option("--zchunks", is_flag=True, help="Ask the relay to compress what it sends (ZChunks).")
@click.option("--public-port", type=int, help="tcp:// kites: the port visitors CONNECT to.")
@click.option("--proxy-protocol", type=click.IntRange(0, 2), default=0,
              help="raw/https kites: send a PROXY protocol v1 or v2 header to the target.")
@click.option("--no-forwarded", is_flag=True, help="http kites: do not add X-Forwarded-* headers.")
@click.option("--keepalive", type=float, default=30.0, show_default=True,
              help="Seconds of tunnel silence before a PING.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML file with many kites on several relays.")
@common_options
def expose(target, name, relays, secret, ca, fingerprint, insecure, plain, server_name,
           connect_name, zchunks, public_port, proxy_protocol, no_forwarded, keepalive,
           config_file, verbose, quiet, loop_kind):
    """Fly NAME on the relay(s), serving it from TARGET (port, host:port or URL)."""
    _setup_logging(verbose, quiet)
    from .backend.main import build_backend_config, serve_backend

    try:
        cfg = build_backend_config(
            target=target, name=name, relays=relays, secret=secret, ca=ca,
            fingerprint=fingerprint, insecure=insecure, plain=plain, server_name=server_name,
            public_port=public_port, proxy_protocol=proxy_protocol, forwarded=not no_forwarded,
            keepalive=keepalive, connect_name=connect_name, zchunks=zchunks,
            config_file=config_file)
    except ConfigError as err:
        _fail_config(err)
    sys.exit(_run_until_signal(lambda stop: serve_backend(cfg, stop), loop_kind))


# -- init -----------------------------------------------------------------------------------
@main.command()
@click.argument("what", type=click.Choice(["relay", "backend"]))
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=".",
              show_default=True, help="Where to write the files.")
@click.option("--name", "names", multiple=True,
              help="Relay names for the certificate (default: localhost, 127.0.0.1).")
@click.option("--domain", default="*.kite.localhost", show_default=True,
              help="Kite domain the generated secret may fly (relay).")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def init(what, directory, names, domain, force):
    """Write a config, a certificate and a secret to get started."""
    from .init import init_backend, init_relay

    try:
        if what == "relay":
            init_relay(directory, names=list(names), domain=domain, force=force)
        else:
            init_backend(directory, force=force)
    except ConfigError as err:
        _fail_config(err)


# -- demo -----------------------------------------------------------------------------------
@main.command()
@click.option("--once", is_flag=True, help="Exit after fetching the page (for scripts).")
@common_options
def demo(once, verbose, quiet, loop_kind):
    """Relay + backend + sample site on loopback; prints the URL to try."""
    _setup_logging(verbose, True if not verbose else quiet)
    from .demo import run_demo

    sys.exit(_run_until_signal(lambda stop: run_demo(stop, once=once), loop_kind))


if __name__ == "__main__":  # pragma: no cover
    main()


def _register_client_commands() -> None:
    from .client.commands import COMMANDS
    from .pagekiterc import import_pagekiterc

    for cmd in COMMANDS:
        main.add_command(cmd)
    main.add_command(import_pagekiterc)
    from .bench_command import bench

    main.add_command(bench)


_register_client_commands()
