"""``kite relay``: the public relay (entry point kite.relay.main.serve_relay)."""

from __future__ import annotations

import click

from .options import _apply, busy_poll_option, common_options, keepalive_option
from .run import config_errors, fail, serve, setup_logging


def dns_options(f):
    """The name service's options (kite.names.config): they reach build_relay_config as
    ``dns_options``; unset ones are None, so the config file's keys apply."""
    return _apply([
        click.option("--dns", multiple=True, metavar="HOST:PORT",
                     help="Serve DNS for --zone here, UDP and TCP (port 53 if omitted; repeatable)."),
        click.option("--zone", metavar="ZONE", help="The zone delegated to this relay."),
        click.option("--public-ip", multiple=True, metavar="IP",
                     help="The relay's public address: the A/AAAA of every flying kite (repeatable)."),
        click.option("--dns-ttl", type=int, metavar="SECONDS", help="TTL of the answers [60]."),
        click.option("--dns-negative-ttl", type=int, metavar="SECONDS",
                     help="How long resolvers may cache a miss (SOA minimum) [30]."),
        click.option("--dns-name", multiple=True, metavar="NAME",
                     help="The relay's names for NS (default: its TLS names; else relay.ZONE)."),
        click.option("--dns-rate-limit", type=int, metavar="N",
                     help="Queries per second per address; past it they are ignored (0: off) [100]."),
        click.option("--dns-update", metavar="SERVER:PORT",
                     help="Push the kites' A/AAAA to this DNS server (RFC 2136 dynamic updates)."),
        click.option("--dns-update-zone", metavar="ZONE", help="The zone to update (default: --zone)."),
        click.option("--tsig", metavar="NAME:ALGORITHM:BASE64SECRET", envvar="KITE_TSIG",
                     help="TSIG key for the updates (env KITE_TSIG; --tsig-file keeps it out of ps)."),
        click.option("--tsig-file", type=click.Path(dir_okay=False),
                     help="Read the TSIG key from FILE (NAME:ALG:SECRET, keymgr -t or tsig-keygen)."),
    ], f)


#: The options of acme_options: they reach build_relay_config as ``acme_options``.
ACME_OPTIONS = ("acme", "acme_email", "acme_ca", "state_dir", "acme_on_demand",
                "acme_on_demand_per_hour")


def acme_options(f):
    """Automatic certificates (kite.certs.acme_config); unset ones are None, so the config
    file's keys apply."""
    return _apply([
        click.option("--acme", metavar="DIRECTORY_URL",
                     help="Get and renew a certificate for ZONE and *.ZONE from this ACME "
                          "directory (DNS-01 in the relay's own DNS; needs --dns and --zone, except "
                          "with --acme-on-demand alone)."),
        click.option("--acme-email", metavar="EMAIL", help="The ACME account's contact address."),
        click.option("--acme-ca", type=click.Path(dir_okay=False), metavar="PEM",
                     help="CA file that verifies the ACME server's HTTPS (default: the system's)."),
        click.option("--state-dir", type=click.Path(file_okay=False), metavar="DIR",
                     help="Where the relay keeps its ACME account and certificates (mode 0700; "
                          "default: the folder of --db, else $XDG_STATE_HOME/kite)."),
        click.option("--acme-on-demand", is_flag=True, default=None,
                     help="Also get certificates for kite names outside the zone when visited "
                          "(HTTP-01 on the relay's port 80; only names its kites fly)."),
        click.option("--acme-on-demand-per-hour", type=int, default=None, metavar="N",
                     help="At most N on-demand orders per hour [10]."),
    ], f)


@click.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Relay TOML config.")
@click.option("--listen", multiple=True, metavar="HOST:PORT",
              help="Address to serve tunnels and visitors on (repeatable). Default 0.0.0.0:443.")
@click.option("--tls-cert", multiple=True, type=click.Path(dir_okay=False),
              help="Certificate PEM (repeatable, each with a --tls-key): the first is the "
                   "relay's own; any certificate also serves https for the http kites it covers.")
@click.option("--tls-key", multiple=True, type=click.Path(dir_okay=False),
              help="Key PEM of the --tls-cert in the same position.")
@click.option("--tls-name", multiple=True, metavar="NAME",
              help="SNI names that mean the relay itself (default: the first certificate's names).")
@click.option("--redirect-http", is_flag=True,
              help="Send plain-HTTP visitors of a kite that has HTTPS a 308 to its https:// URL.")
@click.option("--hsts", type=click.IntRange(min=0), default=None, metavar="SECONDS",
              help="Strict-Transport-Security max-age on HTTPS the relay terminates (first "
                   "response of each connection; the server's own header wins).")
@click.option("--kite", "kites", multiple=True, metavar="PROTO:DOMAIN[:SECRET]",
              help="Allow backends with the secret to fly DOMAIN (PROTO * = all; *.dom "
                   "wildcards).  Without :SECRET the secret is --secret-file's or KITE_SECRET's; "
                   "a SECRET here is visible to every user in `ps`.")
@click.option("--secret-file", type=click.Path(dir_okay=False),
              help="File whose first line is the secret of --kite PROTO:DOMAIN grants and of "
                   "[[kite]] tables without one (mode 0600).  Default: env KITE_SECRET.")
@click.option("--single", "single", multiple=True, metavar="DOMAIN",
              help="Only one backend at a time may fly DOMAIN (pagekite.py's Duplicate rule).")
@click.option("--db", type=click.Path(dir_okay=False),
              help="Account registry (SQLite file, managed with kite accounts).")
@click.option("--redis", "redis_url", metavar="URL",
              help="Account registry in Redis (redis://HOST:PORT/DB), shared by a fleet.")
@click.option("--relay-id", metavar="ID",
              help="This relay's name in the registry (its presence and usage flushes); "
                   "relays sharing one registry need different ids [relay; with --redis: "
                   "the host name].")
@click.option("--signup", metavar="ZONE",
              help="Let people sign up for NAME.ZONE: POST /api/signup on the relay's name.")
@click.option("--signup-quota", metavar="SIZE", help="Starter quota of a sign-up (2.5GB).")
@keepalive_option
@busy_poll_option
@click.option("--zchunks", is_flag=True, help="Let pagekite.py backends compress (ZChunks).")
@click.option("--drain-timeout", type=float, default=10.0, show_default=True,
              help="On SIGTERM, seconds to let open streams finish.")
# -- connection and stream limits (TOML keys of the same name, with _; options win) --
@click.option("--max-connections", type=click.IntRange(min=1), default=None,
              help="Open connections (visitors, tunnels, unclassified); more are closed at "
                   "once. Default: the descriptor limit minus a reserve.")
@click.option("--max-pending", type=click.IntRange(min=1), default=None,
              help="Connections that have not yet said what they are; more are closed at "
                   "once. Default: max-connections / 4, at most 4096.")
@click.option("--tunnel-reserve", type=click.IntRange(min=0), default=None,
              help="Connections visitors may not take, kept for backends to (re)connect "
                   "(0: none; below --max-connections). Default: max-connections / 16, 16 "
                   "to 1024, at most a quarter.")
@click.option("--max-streams", type=click.IntRange(min=1), default=None,
              help="Visitors one tunnel may carry at once; more are refused.  [default: 16384]")
@click.option("--idle-timeout", type=click.FloatRange(min=0), default=None,
              help="Close a visitor stream after this many seconds without a byte either "
                   "way (0: never).  [default: 600]")
@click.option("--buffer-budget", type=click.IntRange(min=0), default=None, metavar="MIB",
              help="MiB all visitors' unsent data may take; slow readers beyond it are held, "
                   "then cut (0: no limit).  [default: 256]")
@click.option("--slow-reader-timeout", type=click.FloatRange(min=0), default=None,
              help="Seconds a slow reader may be held over the budget before it is cut.  "
                   "[default: 30]")
@click.option("--access-log", metavar="FILE",
              help="Where the access log goes: a file, - (standard output) or off.  [default: -]")
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="Access log lines as text or JSON.  [default: text]")
@click.option("--admin", is_flag=False, flag_value="127.0.0.1:4041", default=None,
              metavar="[HOST:]PORT",
              help="Serve /metrics, /api/status and a dashboard here (--admin alone: "
                   "127.0.0.1:4041; a non-loopback address needs a token).")
@click.option("--admin-token", envvar="KITE_ADMIN_TOKEN",
              help="Bearer token for the admin endpoint (env KITE_ADMIN_TOKEN; shows in `ps`).")
@click.option("--admin-token-file", type=click.Path(dir_okay=False),
              help="Read the admin token from FILE (its first line).")
@click.option("--allow-plain", is_flag=True,
              help="With --tls-cert: take plain (unencrypted) tunnels too, e.g. from "
                   "pagekite.py backends without TLS.  Without a certificate every tunnel is "
                   "plain.")
@click.option("--error-pages", type=click.Path(file_okay=False), metavar="DIR",
              help="Folder of page templates (404.html, 503.html, 403-quota.html ...; "
                   "docs/config.md); missing ones are the built-in pages.")
@click.option("--check-config", "check_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Validate the config FILE (with the other options) and exit: 0 and 'ok: "
                   "...', or 2 and the error.")
@dns_options
@acme_options
@common_options
def relay(config_file, listen, tls_cert, tls_key, tls_name, redirect_http, hsts, kites,
          secret_file, single, db, redis_url, relay_id, signup, signup_quota, keepalive, busy_poll,
          zchunks, drain_timeout, max_connections, max_pending, tunnel_reserve, max_streams,
          idle_timeout, buffer_budget, slow_reader_timeout,
          access_log, log_format, admin, admin_token, admin_token_file,
          allow_plain, error_pages, check_file, verbose, quiet, loop_kind, **dns):
    """Run the public relay: tunnels and visitors on one port.

    SIGHUP re-reads the config: new kites and secrets take effect, removed ones stop
    flying, certificates are read again and [[tls]] pairs added or removed, nothing else
    drops; a bad config is logged and the running one kept.
    """
    setup_logging(verbose, quiet)
    from ..relay.main import build_relay_config, serve_relay

    if check_file and config_file:
        fail("--check-config takes the config file itself; drop --config")
    acme = {k: dns.pop(k) for k in ACME_OPTIONS}  # **dns gathers every grouped option

    def load():
        return build_relay_config(
            config_file=check_file or config_file, listen=listen, tls_cert=tls_cert,
            tls_key=tls_key, tls_names=tls_name, redirect_http=redirect_http, hsts=hsts,
            kites=kites, single=single,
            keepalive=keepalive, busy_poll=busy_poll, zchunks=zchunks,
            drain_timeout=drain_timeout, secret_file=secret_file,
            limits={"max_connections": max_connections, "max_pending": max_pending,
                    "tunnel_reserve": tunnel_reserve,
                    "max_streams": max_streams, "idle_timeout": idle_timeout,
                    "buffer_budget": buffer_budget, "slow_reader_timeout": slow_reader_timeout},
            dns_options=dict(dns), db=db, signup=signup, signup_quota=signup_quota,
            redis=redis_url, relay_id=relay_id, acme_options=acme,
            observe={"access_log": access_log, "access_log_default": "-",
                     "log_format": log_format, "admin": admin, "admin_token": admin_token,
                     "admin_token_file": admin_token_file},
            allow_plain=allow_plain, error_pages=error_pages)

    with config_errors():
        cfg = load()
        if check_file:
            click.echo(_summary(cfg))
            return
    serve(lambda stop: serve_relay(cfg, stop, reload=load), loop_kind)


def _summary(cfg) -> str:
    """``kite relay --check-config``: the one line that says what the config would run,
    after loading its certificate as the relay would."""
    import ssl

    from ..errors import ConfigError
    from ..net.tls import server_context

    tls = "no TLS (plain tunnels)"
    if cfg.tls_cert:
        try:
            server_context(cfg.tls_cert, cfg.tls_key or cfg.tls_cert)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("tls_cert", f"cannot load {cfg.tls_cert!r} with its key: {exc}",
                              "give a PEM certificate and its key") from None
        tls = "TLS tunnels" + (" and plain ones" if cfg.allow_plain else "")
    listen = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in cfg.listen)
    n = len(cfg.grants)
    extra = "" if not cfg.db else f", accounts in {cfg.db}"
    dns = "" if cfg.names is None else ", DNS on"
    return (f"ok: {n} kite{'s' if n != 1 else ''} granted{extra}; listening on {listen}; "
            f"{tls}{dns}")
