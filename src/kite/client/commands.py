"""Click commands of the client helpers (``kite connect``, ``kite forward``, ``kite ssh-config``).

Registered on the main ``kite`` group by kite.cli (everything in :data:`COMMANDS`).  As in
kite.cli: parse options, build the config, call one entry point; exit 0 success, 1 runtime
failure (one line on stderr), 2 usage or configuration error.  kite.cli is imported inside
the functions: it imports this module while it is being built.
"""

import sys

import click

from ..errors import ConfigError

COMMANDS: list = []


def _relay_options(f):
    options = [
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
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _timeout_option(f):
    return click.option("--timeout", type=float, default=20.0, show_default=True,
                        help="Seconds to reach the relay and get its answer.")(f)


def _common_options(f):
    options = [
        click.option("-v", "--verbose", count=True, help="More log output (debug)."),
        click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only."),
        click.option("--loop", "loop_kind", type=click.Choice(["auto", "uvloop", "asyncio"]),
                     default="auto", show_default=True, help="Event loop."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _target(host, port, relay, tls, ca, fingerprint, insecure, server_name, timeout):
    from .connect import build_relay_target

    return build_relay_target(host=host, port=port, relay=relay, tls=tls, ca=ca,
                              fingerprint=fingerprint, insecure=insecure,
                              server_name=server_name, timeout=timeout)


# -- connect ------------------------------------------------------------------------------------
@click.command("connect")
@click.argument("host")
@click.argument("port", type=click.IntRange(1, 65535))
@_relay_options
@_timeout_option
@_common_options
def connect(host, port, relay, tls, ca, fingerprint, insecure, server_name, timeout,
            verbose, quiet, loop_kind):
    """Bridge stdin/stdout to raw kite HOST PORT through the relay (for ssh's ProxyCommand).

    \b
    ssh -o ProxyCommand='kite connect %h %p --relay relay.example.com:443' user@box.example.com
    """
    from .. import cli
    from .connect import bridge_stdio

    # stderr is the ssh user's terminal: only warnings and errors unless asked (-v).
    cli._setup_logging(verbose, quiet=not verbose)
    try:
        target = _target(host, port, relay, tls, ca, fingerprint, insecure, server_name, timeout)
    except ConfigError as err:
        cli._fail_config(err)
    sys.exit(cli._run_until_signal(lambda stop: bridge_stdio(target, stop=stop), loop_kind))


# -- forward ------------------------------------------------------------------------------------
@click.command("forward")
@click.argument("listen", metavar="[LISTEN_HOST:]LISTEN_PORT")
@click.argument("kite", metavar="NAME:PORT")
@_relay_options
@_timeout_option
@_common_options
def forward(listen, kite, relay, tls, ca, fingerprint, insecure, server_name, timeout,
            verbose, quiet, loop_kind):
    """Listen on LISTEN_PORT (127.0.0.1 unless a host is given) and relay every connection
    to raw kite NAME:PORT through the relay (for clients that cannot use a proxy)."""
    from .. import cli
    from ..config import parse_hostport
    from .forward import serve_forward

    cli._setup_logging(verbose, quiet)
    try:
        lhost, lport = parse_hostport(listen, key="LISTEN", default_host="127.0.0.1")
        name, port = parse_hostport(kite, key="NAME:PORT")
        if not port:
            raise ConfigError("NAME:PORT", f"port 0 in {kite!r}", "give the kite's public port")
        target = _target(name, port, relay, tls, ca, fingerprint, insecure, server_name, timeout)
    except ConfigError as err:
        cli._fail_config(err)
    sys.exit(cli._run_until_signal(lambda stop: serve_forward(lhost, lport, target, stop),
                                   loop_kind))


# -- ssh-config ---------------------------------------------------------------------------------
@click.command("ssh-config")
@click.argument("name")
@click.option("--relay", required=True, metavar="HOST:PORT", help="The kite relay.")
@click.option("--port", type=click.IntRange(1, 65535), default=22, show_default=True,
              help="The kite's public port.")
@click.option("--user", help="Add a User line.")
@click.option("--tls", is_flag=True, help="ProxyCommand uses --tls.")
@click.option("--ca", help="ProxyCommand verifies the relay against this PEM (with --tls).")
@click.option("--fingerprint", metavar="SHA256", help="ProxyCommand pins this SHA-256.")
@click.option("--insecure", is_flag=True, help="ProxyCommand does not verify the relay.")
@click.option("--server-name", help="ProxyCommand's --server-name.")
def ssh_config(name, relay, port, user, tls, ca, fingerprint, insecure, server_name):
    """Print the ~/.ssh/config block that reaches raw kite NAME with `kite connect`."""
    import os

    from .. import cli
    from .connect import ssh_config_block

    try:
        target = _target(name, port, relay, tls, ca, fingerprint, insecure, server_name, 20.0)
        tls_args = []
        if tls:
            tls_args.append("--tls")
        if ca:
            tls_args += ["--ca", os.path.abspath(ca)]  # ssh runs it from any directory
        if fingerprint:
            tls_args += ["--fingerprint", target.tls.fingerprint]
        if insecure:
            tls_args.append("--insecure")
        if server_name:
            tls_args += ["--server-name", server_name]
        click.echo(ssh_config_block(name, target.relay, port=port, user=user,
                                    tls_args=tuple(tls_args)), nl=False)
    except ConfigError as err:
        cli._fail_config(err)


COMMANDS.extend([connect, forward, ssh_config])
