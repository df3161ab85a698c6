"""Getting started and migrating: ``kite init``, ``kite demo``, ``kite import-pagekiterc``.

Entry points: kite.scaffold.init_relay / init_backend, kite.demo.run_demo and
kite.pagekiterc.import_rc.
"""

from __future__ import annotations

import sys

import click

from .options import common_options
from .run import config_errors, serve, setup_logging


# -- init -----------------------------------------------------------------------------------
@click.command()
@click.argument("what", type=click.Choice(["relay", "backend"]))
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=".",
              show_default=True, help="Where to write the files.")
@click.option("--name", "names", multiple=True,
              help="Relay: names for the certificate (default: localhost, 127.0.0.1).  "
                   "Backend: the kite's name (default app.example.com).")
@click.option("--domain", default=None,
              help="Kite domain the generated secret may fly (relay) [*.ZONE, else *.kite.localhost].")
@click.option("--zone", metavar="ZONE", help="Relay: answer DNS for ZONE (the config turns --dns on).")
@click.option("--public-ip", "public_ips", multiple=True, metavar="IP",
              help="Relay with --zone: the public address the kites' names point at (repeatable).")
@click.option("--relay", metavar="HOST:PORT", help="Backend: the relay to fly on.")
@click.option("--secret", help="Backend: the secret the relay gave (default: a new one).")
@click.option("--ca", type=click.Path(dir_okay=False), help="Backend: verify the relay with this PEM.")
@click.option("--fingerprint", metavar="SHA256", help="Backend: pin the relay's certificate.")
@click.option("--target", default="8080", show_default=True,
              help="Backend: the local server (port, host:port or URL).")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def init(what, directory, names, domain, zone, public_ips, relay, secret, ca, fingerprint, target,
         force):
    """Write a config, a certificate and a secret to get started.

    `kite init relay` prints the next three commands; `kite init backend --relay HOST:PORT
    --secret S --fingerprint F` writes a config that flies on that relay.
    """
    from ..errors import ConfigError
    from ..scaffold import init_backend, init_relay

    with config_errors():
        if what == "relay":
            for opt, value in (("--relay", relay), ("--secret", secret), ("--ca", ca),
                               ("--fingerprint", fingerprint)):
                if value:
                    raise ConfigError(opt, "only for kite init backend",
                                      "kite init relay makes the secret and the certificate")
            lines = init_relay(directory, names=list(names), domain=domain, force=force,
                               zone=zone, public_ips=public_ips)
        else:
            if len(names) > 1 or domain or zone or public_ips:
                raise ConfigError("--domain/--zone/--public-ip" if not len(names) > 1 else "--name",
                                  "not for kite init backend", "give one --name for the kite")
            lines = init_backend(directory, force=force, relay=relay, secret=secret,
                                 name=names[0] if names else None, target=target, ca=ca,
                                 fingerprint=fingerprint)
    for line in lines:
        click.echo(line)


# -- demo -----------------------------------------------------------------------------------
@click.command()
@click.option("--once", is_flag=True, help="Exit after fetching the page (for scripts).")
@common_options
def demo(once, verbose, quiet, loop_kind):
    """Relay + backend + sample site on loopback; prints the URL to try."""
    setup_logging(verbose, True if not verbose else quiet)
    from ..demo import run_demo

    serve(lambda stop: run_demo(stop, once=once), loop_kind)


# -- import-pagekiterc ----------------------------------------------------------------------
@click.command("import-pagekiterc")
@click.argument("rcfile", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the kite config here (mode 0600) instead of to stdout.")
@click.option("--force", is_flag=True, help="Overwrite --output if it exists.")
@click.option("--strict", is_flag=True,
              help="Exit with status 2 if any line could not be converted.")
def import_pagekiterc(rcfile, output, force, strict):
    """Write a kite TOML config from a pagekite.py rc file (default ~/.pagekite.rc).

    A backend rc (service_on, frontend...) becomes a `kite expose --config` file; a
    frontend rc (isfrontend) a `kite relay --config` file.  Every line kite does not convert
    is reported on stderr, and as a comment in the output.
    """
    from ..pagekiterc import RUN_WITH, import_rc

    with config_errors():
        kind, toml, report = import_rc(rcfile, output, force=force)
    if output:
        click.echo(f"wrote {output}: a {kind} config; run it with: {RUN_WITH[kind]} {output}",
                   err=True)
    else:
        click.echo(toml, nl=False)
    for line in report.lines():
        click.echo(f"kite: {line}", err=True)
    if strict and report.unconverted:
        click.echo(f"kite: {len(report.unconverted)} line(s) not converted (--strict)", err=True)
        sys.exit(2)
