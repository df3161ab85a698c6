"""``kite expose`` entry point: options or a TOML file -> BackendConfig -> running tunnels."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Optional, Sequence

from ..config import (
    DEFAULT_RESPONSE_TIMEOUT,
    BackendConfig,
    KiteSpec,
    RelaySpec,
    _check_secret,
    check_basic_auth,
    check_connect_name,
    check_keepalive,
    check_kite_name,
    check_port,
    check_response_timeout,
    check_tls_mode,
    kite_proto_for,
    load_backend_config,
    parse_hostport,
    parse_target,
    pick_secret,
    read_secret_file,
)
from ..errors import ConfigError, PermanentFailure
from .connector import Backend

log = logging.getLogger("kite.backend")

__all__ = ["build_backend_config", "build_inspect_config", "serve_backend"]

#: On SIGTERM, how long open streams may take to finish before the tunnels close.
DRAIN_TIMEOUT = 10.0


def build_backend_config(*, target: Optional[str], name: Optional[str], relays: Sequence[str],
                         secret: Optional[str], ca: Optional[str] = None,
                         fingerprint: Optional[str] = None, insecure: bool = False,
                         plain: bool = False, server_name: Optional[str] = None,
                         public_port: Optional[int] = None, proxy_protocol: int = 0,
                         forwarded: bool = True, keepalive: float = 30.0,
                         connect_name: Optional[str] = None, zchunks: bool = False,
                         config_file: Optional[str] = None,
                         secret_file: Optional[str] = None,
                         basic_auth: Sequence[str] = (),
                         response_timeout: Optional[float] = None) -> BackendConfig:
    """Validate ``kite expose``'s options (or its ``--config`` file) into a BackendConfig.

    The secret: ``secret`` (``--secret``) or ``secret_file``, not both; without either, the
    ``KITE_SECRET`` environment variable.  ``basic_auth``: ``USER:PASS`` pairs visitors of
    an http kite must give.  ``response_timeout``: http kites' seconds until the local
    server's first response byte (None: the default, 0: no limit).
    """
    keepalive = check_keepalive(keepalive, "--keepalive")
    if public_port is not None:
        public_port = check_port(public_port, "--public-port")
    if config_file:
        if target or name:
            raise ConfigError("--config", "TARGET/NAME given together with --config",
                              "put every kite in the config file, or use TARGET NAME alone")
        if basic_auth:
            raise ConfigError("--basic-auth", "not used with --config",
                              "put basic_auth = \"USER:PASS\" in the config's [[kite]]")
        if relays:
            raise ConfigError("--relay", "not used with --config",
                              "put the relays in the config's [[relay]] tables")
        if secret or secret_file:
            raise ConfigError("--secret-file" if secret_file else "--secret",
                              "not used with --config",
                              "put secret_file = \"...\" in the config's [defaults] or [[kite]]")
        cfg = load_backend_config(config_file)
        if response_timeout is not None:
            timeout = check_response_timeout(response_timeout)
            for r in cfg.relays:
                for k in r.kites:
                    k.response_timeout = timeout
        cfg.keepalive = keepalive if keepalive != 30.0 else cfg.keepalive
        cfg.zchunks = cfg.zchunks or zchunks
        if connect_name:
            for r in cfg.relays:
                r.connect_name = check_connect_name(connect_name, "--connect-name", plain=r.plain)
        return cfg
    if not target or not name:
        raise ConfigError("TARGET NAME", "missing", "e.g. kite expose 8080 app.example.com --relay HOST:PORT")
    if not relays:
        raise ConfigError("--relay", "no relay given", "add --relay HOST:PORT")
    check_tls_mode(ca=ca, fingerprint=fingerprint, insecure=insecure, plain=plain)
    connect_name = check_connect_name(connect_name, "--connect-name", plain=plain)
    if fingerprint:
        from ..net.tls import normalize_fingerprint

        fingerprint = normalize_fingerprint(fingerprint)
    t = parse_target(target)
    if proxy_protocol and t.proto == "http":
        raise ConfigError("--proxy-protocol", "only for tcp:// and https:// targets",
                          "http kites get X-Forwarded-For instead")
    domain = check_kite_name(name, "NAME")
    secret = pick_secret(secret, secret_file, key="--secret", file_key="--secret-file")
    secret = secret or os.environ.get("KITE_SECRET")
    if not secret:
        from .signup import saved_secret

        secret = saved_secret(domain)  # from an earlier kite expose --signup
    kite = KiteSpec(domain=domain, proto=kite_proto_for(t, public_port),
                    secret=_check_secret(secret, "--secret"), target=t,
                    proxy_protocol=proxy_protocol, forwarded=forwarded,
                    response_timeout=check_response_timeout(
                        DEFAULT_RESPONSE_TIMEOUT if response_timeout is None else response_timeout))
    if basic_auth:
        kite.basic_auth = check_basic_auth(list(basic_auth), "--basic-auth", kite.proto)
    specs = []
    for r in relays:
        host, port = parse_hostport(r, key="--relay", default_port=443, min_port=1)
        specs.append(RelaySpec(host=host, port=port, plain=plain, ca=ca, fingerprint=fingerprint,
                               insecure=insecure, server_name=server_name,
                               connect_name=connect_name, kites=[kite]))
    return BackendConfig(relays=specs, keepalive=keepalive, zchunks=zchunks)


def _say(line: str) -> None:
    """One line for the user on stdout (the visitor URLs, the inspector's address); a
    closed stdout (``| head -1``) is not the tunnel's problem."""
    try:
        print(line, flush=True)
    except (OSError, ValueError):
        pass


def build_inspect_config(address: Optional[str], *, keep: int = 50,
                         token_file: Optional[str] = None):
    """``--inspect [HOST:PORT]`` (None: off), ``--inspect-keep``, ``--inspect-token-file``
    (default: the KITE_INSPECT_TOKEN environment variable) into an InspectConfig, checked
    (kite.backend.inspect.check_inspect_config)."""
    if address is None:
        return None
    from .inspect import DEFAULT_ADDRESS, InspectConfig, check_inspect_config

    host, port = parse_hostport(address, key="--inspect", default_host=DEFAULT_ADDRESS[0],
                                default_port=DEFAULT_ADDRESS[1])
    token = (read_secret_file(token_file, "--inspect-token-file") if token_file
             else os.environ.get("KITE_INSPECT_TOKEN") or None)
    return check_inspect_config(InspectConfig(host=host, port=port, keep=keep, token=token))


async def serve_backend(cfg: BackendConfig, stop: asyncio.Event, inspect=None) -> int:
    """Fly ``cfg``'s kites until ``stop``; ``inspect`` (kite.backend.inspect.InspectConfig)
    serves the request inspector.  Raises PermanentFailure when a relay refused us for good."""
    inspector = None
    if inspect is not None:
        from .inspect import Inspector

        inspector = Inspector(inspect)
        host, port = await inspector.start()
        _say(f"inspector: http://{host}:{port}/")
    backend = Backend(cfg, inspector=inspector, announce=_say)
    await backend.start()
    stop_wait = asyncio.ensure_future(stop.wait())
    failed_wait = asyncio.ensure_future(backend.failed.wait())
    await asyncio.wait({stop_wait, failed_wait}, return_when=asyncio.FIRST_COMPLETED)
    stop_wait.cancel()
    failed_wait.cancel()
    if backend.failed.is_set():
        await backend.close()
        if inspector is not None:
            await inspector.close()
        raise PermanentFailure("; ".join(backend.failures()))
    if backend.open_streams():
        log.info("backend stopping: draining %d open streams (up to %g s)",
                 backend.open_streams(), DRAIN_TIMEOUT)
        await backend.drain(DRAIN_TIMEOUT)
    log.info("backend stopping")
    await backend.close()
    if inspector is not None:
        await inspector.close()
    return 0
