"""The client helpers: ``kite connect``, ``kite forward`` and ``kite ssh-config``.

Entry points: kite.client.connect.bridge_stdio, kite.client.forward.serve_forward and
kite.client.sshconfig.ssh_config_block; the relay target is built by
kite.client.connect.build_relay_target.
"""

from __future__ import annotations

import os

import click

from ..errors import ConfigError
from .options import common_options, relay_options, timeout_option
from .run import config_errors, serve, setup_logging


def _target(host, port, relay, tls, ca, fingerprint, insecure, server_name, timeout,
            host_key="HOST"):
    from ..client.connect import build_relay_target

    return build_relay_target(host=host, port=port, relay=relay, tls=tls, ca=ca,
                              fingerprint=fingerprint, insecure=insecure,
                              server_name=server_name, timeout=timeout, host_key=host_key)


# -- connect ------------------------------------------------------------------------------------
@click.command("connect")
@click.argument("host")
@click.argument("port", type=click.IntRange(1, 65535))
@relay_options
@timeout_option
@common_options
def connect(host, port, relay, tls, ca, fingerprint, insecure, server_name, timeout,
            verbose, quiet, loop_kind):
    """Bridge stdin/stdout to raw kite HOST PORT through the relay (for ssh's ProxyCommand).

    \b
    ssh -o ProxyCommand='kite connect %h %p --relay relay.example.com:443' user@box.example.com
    """
    from ..client.connect import bridge_stdio

    # stderr is the ssh user's terminal: only warnings and errors unless asked (-v).
    setup_logging(verbose, quiet=not verbose)
    with config_errors():
        target = _target(host, port, relay, tls, ca, fingerprint, insecure, server_name, timeout)
    serve(lambda stop: bridge_stdio(target, stop=stop), loop_kind)


# -- forward ------------------------------------------------------------------------------------
@click.command("forward")
@click.argument("listen", metavar="[LISTEN_HOST:]LISTEN_PORT")
@click.argument("kite", metavar="NAME:PORT")
@relay_options
@timeout_option
@common_options
def forward(listen, kite, relay, tls, ca, fingerprint, insecure, server_name, timeout,
            verbose, quiet, loop_kind):
    """Listen on LISTEN_PORT (127.0.0.1 unless a host is given) and relay every connection
    to raw kite NAME:PORT through the relay (for clients that cannot use a proxy)."""
    from ..client.forward import serve_forward
    from ..config import parse_hostport

    setup_logging(verbose, quiet)
    with config_errors():
        lhost, lport = parse_hostport(listen, key="LISTEN", default_host="127.0.0.1")
        name, port = parse_hostport(kite, key="NAME:PORT")
        if not port:
            raise ConfigError("NAME:PORT", f"port 0 in {kite!r}", "give the kite's public port")
        target = _target(name, port, relay, tls, ca, fingerprint, insecure, server_name, timeout,
                         "NAME:PORT")
    serve(lambda stop: serve_forward(lhost, lport, target, stop), loop_kind)


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
    from ..client.sshconfig import running_kite_command, ssh_config_block

    with config_errors():
        target = _target(name, port, relay, tls, ca, fingerprint, insecure, server_name, 20.0,
                         "NAME")
    # The ProxyCommand's own options: the same relay settings, as `kite connect` takes them.
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
    with config_errors():
        block = ssh_config_block(name, target.relay, port=port, user=user,
                                 tls_args=tuple(tls_args), command=running_kite_command())
    click.echo(block, nl=False)
