"""``kite relay``: the public relay (entry point kite.relay.main.serve_relay)."""

from __future__ import annotations

import click

from .options import common_options, keepalive_option
from .run import config_errors, serve, setup_logging


@click.command()
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
@click.option("--db", type=click.Path(dir_okay=False),
              help="Account registry (SQLite file, managed with kite accounts).")
@click.option("--signup", metavar="ZONE",
              help="Let people sign up for NAME.ZONE: POST /api/signup on the relay's name.")
@click.option("--signup-quota", metavar="SIZE", help="Starter quota of a sign-up (2.5GB).")
@keepalive_option
@click.option("--zchunks", is_flag=True, help="Let pagekite.py backends compress (ZChunks).")
@click.option("--drain-timeout", type=float, default=10.0, show_default=True,
              help="On SIGTERM, seconds to let open streams finish.")
@common_options
def relay(config_file, listen, tls_cert, tls_key, tls_name, kites, single, db, signup,
          signup_quota, keepalive, zchunks, drain_timeout, verbose, quiet, loop_kind):
    """Run the public relay: tunnels and visitors on one port."""
    setup_logging(verbose, quiet)
    from ..relay.main import build_relay_config, serve_relay

    with config_errors():
        cfg = build_relay_config(config_file=config_file, listen=listen, tls_cert=tls_cert,
                                 tls_key=tls_key, tls_names=tls_name, kites=kites, single=single,
                                 keepalive=keepalive, zchunks=zchunks, drain_timeout=drain_timeout,
                                 db=db, signup=signup, signup_quota=signup_quota)
    serve(lambda stop: serve_relay(cfg, stop), loop_kind)
