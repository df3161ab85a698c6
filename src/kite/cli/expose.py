"""``kite expose``: fly kites on relays (entry point kite.backend.main.serve_backend)."""

from __future__ import annotations

import click

from ..errors import ConfigError
from .options import busy_poll_option, common_options, keepalive_option
from .run import config_errors, fail, serve, setup_logging


@click.command()
@click.argument("target", required=False)
@click.argument("name", required=False)
@click.option("--relay", "relays", multiple=True, metavar="HOST:PORT",
              help="Relay to fly on (repeatable: one tunnel each).")
@click.option("--secret", help="Shared secret.  Visible to every user in `ps`: prefer "
                                "--secret-file or the KITE_SECRET environment variable.")
@click.option("--secret-file", type=click.Path(dir_okay=False),
              help="File whose first line is the secret (mode 0600).  Default: the KITE_SECRET "
                   "environment variable.")
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
@click.option("--public-port", type=int,
              help="tcp:// kites: the port visitors CONNECT to (1-65535).")
@click.option("--proxy-protocol", type=click.IntRange(0, 2), default=0,
              help="raw/https kites: send a PROXY protocol v1 or v2 header to the target.")
@click.option("--no-forwarded", is_flag=True, help="http kites: do not add X-Forwarded-* headers.")
@click.option("--basic-auth", "basic_auth", multiple=True, metavar="USER:PASS",
              help="http kites: visitors must log in with USER:PASS (HTTP basic auth, checked "
                   "here on every request before it reaches TARGET; repeatable).  Visible in "
                   "`ps`: prefer basic_auth in a --config file.")
@click.option("--signup", metavar="EMAIL",
              help="Sign up for NAME on the (first) relay first, and save the secret (mode 0600) "
                   "for the next kite expose.")
@click.option("--access-log", metavar="FILE", default="-", show_default=True,
              help="Where the access log goes: a file, - (standard output) or off.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Access log lines as text or JSON.")
@click.option("--inspect", "inspect", is_flag=False, flag_value="127.0.0.1:4040", default=None,
              metavar="[HOST:PORT]",
              help="http kites: record the last requests and serve them, with replay, on "
                   "this address (alone: 127.0.0.1:4040).  Put it after TARGET NAME, or "
                   "write --inspect=HOST:PORT.  Needs pip install 'kite-relay[admin]'.")
@click.option("--inspect-keep", type=click.IntRange(1, 100_000), default=50, show_default=True,
              help="Requests the inspector keeps.")
@click.option("--inspect-token-file", type=click.Path(dir_okay=False),
              help="File whose first line is the inspector's token (required off loopback; "
                   "default: the KITE_INSPECT_TOKEN environment variable).")
@keepalive_option
@busy_poll_option
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML file with many kites on several relays.")
@click.option("--response-timeout", type=float, default=None, metavar="SECONDS",
              help="http kites: a visitor gets a 504 page when the local server has not begun "
                   "to answer within SECONDS (0: wait for ever).  [default: 60]")
@click.option("--check-config", "check_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Validate the config FILE and exit: 0 and 'ok: ...', or 2 and the error.")
@common_options
def expose(target, name, relays, secret, secret_file, ca, fingerprint, insecure, plain, server_name,
           connect_name, zchunks, public_port, proxy_protocol, no_forwarded, basic_auth, signup,
           access_log, log_format, inspect, inspect_keep, inspect_token_file, keepalive,
           busy_poll, config_file, response_timeout, check_file, verbose, quiet, loop_kind):
    """Fly NAME on the relay(s), serving it from TARGET (port, host:port or URL).

    The kite secret: --secret-file FILE, or the KITE_SECRET environment variable (--secret
    shows in `ps`); with --config, secret_file = "..." in the file.
    """
    setup_logging(verbose, quiet)
    from ..backend.main import build_backend_config, build_inspect_config, serve_backend
    from ..config import check_busy_poll

    if check_file:
        if config_file:
            fail("--check-config takes the config file itself; drop --config")
        config_file = check_file
    with config_errors():
        if inspect and target and not name and not config_file and ":" not in inspect:
            # `--inspect 8080 app.example.com`: click gave TARGET to --inspect.
            raise ConfigError("--inspect", f"took {inspect!r} as its address, so NAME is "
                              "missing", "put --inspect after TARGET NAME, or write "
                              "--inspect=HOST:PORT")
        inspect_cfg = build_inspect_config(inspect, keep=inspect_keep,
                                           token_file=inspect_token_file)
    if signup:
        secret = _signup(signup, name, relays, ca, fingerprint, insecure, plain, server_name,
                         connect_name)
    with config_errors():
        cfg = build_backend_config(
            target=target, name=name, relays=relays, secret=secret, ca=ca,
            fingerprint=fingerprint, insecure=insecure, plain=plain, server_name=server_name,
            public_port=public_port, proxy_protocol=proxy_protocol, forwarded=not no_forwarded,
            keepalive=keepalive, connect_name=connect_name, zchunks=zchunks,
            config_file=config_file, secret_file=secret_file, basic_auth=basic_auth,
            response_timeout=response_timeout)
        if busy_poll is not None:
            cfg.busy_poll = check_busy_poll(busy_poll)
    cfg.access_log = None if access_log == "off" else access_log
    cfg.log_format = log_format
    if check_file:
        kites = {k.name for r in cfg.relays for k in r.kites}
        click.echo(f"ok: {len(kites)} kite{'s' if len(kites) != 1 else ''} on "
                   f"{len(cfg.relays)} relay{'s' if len(cfg.relays) != 1 else ''} "
                   f"({', '.join(r.address for r in cfg.relays)})")
        return
    serve(lambda stop: serve_backend(cfg, stop, inspect_cfg), loop_kind)


def _signup(email, name, relays, ca, fingerprint, insecure, plain, server_name,
            connect_name) -> str:
    """``--signup EMAIL``: ask the first relay for NAME, save and return the secret."""
    import asyncio

    from ..backend.main import build_backend_config
    from ..backend.signup import save_secret, signup
    from ..errors import KiteError

    with config_errors():
        cfg = build_backend_config(target="1", name=name, relays=relays[:1], secret="signup",
                                   ca=ca, fingerprint=fingerprint, insecure=insecure,
                                   plain=plain, server_name=server_name,
                                   connect_name=connect_name)
    relay = cfg.relays[0]
    try:
        answer = asyncio.run(signup(relay, email, relay.kites[0].domain))
    except KiteError as err:
        fail(str(err), 1)
    path = save_secret(answer["kite"], answer["secret"])
    click.echo(f"signed up {email} for {answer['kite']} on {relay.address}: "
               f"{answer.get('quota_bytes', 0) / 1e9:.2f} GB; secret saved in {path}", err=True)
    return answer["secret"]
