"""The relay's configuration: options and config file -> :class:`RelayConfig`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..config import load_toml, parse_hostport
from ..errors import ConfigError
from .grants import GrantTable, parse_grant

__all__ = ["RelayConfig", "build_relay_config"]


@dataclass
class RelayConfig:
    listen: list = field(default_factory=lambda: [("127.0.0.1", 0)])
    grants: GrantTable = field(default_factory=GrantTable)
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_names: list = field(default_factory=list)  # SNI names that mean "the relay itself"
    keepalive: Optional[float] = 30.0
    ping_timeout: float = 10.0
    drain_timeout: float = 10.0
    zchunks: bool = False  # advertise ZChunks: ask pagekite.py backends to compress
    single_backend: set = field(default_factory=set)  # kites limited to one backend
    db: Optional[str] = None  # the account registry (SQLite file; kite accounts --db)
    signup_zone: Optional[str] = None  # kite relay --signup ZONE: POST /api/signup
    signup_quota: int = 2_500_000_000  # a new account's starter quota (bytes)
    signup_per_hour: int = 5  # sign-ups per client address and hour


def _cert_names(path: str) -> list:
    """DNS names and IPs in a certificate's SAN (the names that mean "this relay")."""
    from cryptography import x509

    try:
        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError) as exc:
        raise ConfigError("tls-cert", f"cannot read certificate {path!r}: {exc}",
                          "give a PEM certificate; `kite init relay` writes one") from None
    names = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        pass
    return names


def build_relay_config(*, config_file: Optional[str] = None, listen: Sequence[str] = (),
                       tls_cert: Optional[str] = None, tls_key: Optional[str] = None,
                       tls_names: Sequence[str] = (), kites: Sequence[str] = (),
                       single: Sequence[str] = (), keepalive: float = 30.0,
                       zchunks: bool = False, drain_timeout: float = 10.0,
                       db: Optional[str] = None, signup: Optional[str] = None,
                       signup_quota: Optional[str] = None) -> RelayConfig:
    grants = GrantTable()
    listen = list(listen)
    names = list(tls_names)
    single_set = {s.lower() for s in single}
    if config_file:
        data = load_toml(config_file)
        known = {"listen", "tls_cert", "tls_key", "tls_names", "kite", "keepalive", "zchunks",
                 "db", "signup", "signup_quota", "signup_per_hour"}
        for k in data:
            if k not in known:
                raise ConfigError(k, "unknown key", f"known keys: {', '.join(sorted(known))}")
        if not listen:
            listen = list(data.get("listen", []))
        tls_cert = tls_cert or data.get("tls_cert")
        tls_key = tls_key or data.get("tls_key")
        names += list(data.get("tls_names", []))
        keepalive = float(data.get("keepalive", keepalive))
        zchunks = zchunks or bool(data.get("zchunks", False))
        db = db or data.get("db")
        signup = signup or data.get("signup")
        signup_quota = signup_quota or data.get("signup_quota")
        per_hour = int(data.get("signup_per_hour", 5))
        for i, k in enumerate(data.get("kite", [])):
            where = f"kite[{i}]"
            if "domain" not in k or "secret" not in k:
                raise ConfigError(where, "needs domain and secret",
                                  "e.g. domain = \"*.example.com\", secret = \"...\"")
            protos = k.get("protos", "*")
            if isinstance(protos, list):
                protos = ",".join(protos)
            g = parse_grant(f"{protos}:{k['domain']}:{k['secret']}", key=where)
            if k.get("single"):
                single_set.add(g.domain)
            grants.add(g)
    for value in kites:
        grants.add(parse_grant(value, key="--kite"))
    if not len(grants) and not db:
        raise ConfigError("--kite", "no kites are allowed on this relay",
                          "add --kite 'PROTO:DOMAIN:SECRET' (or [[kite]] in the config, "
                          "or --db with accounts)")
    extra = _signup_options(db, signup, signup_quota, per_hour if config_file else 5)
    if not listen:
        listen = ["0.0.0.0:443"]
    addrs = [parse_hostport(v, key="--listen", default_host="0.0.0.0") for v in listen]
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("--tls-cert/--tls-key", "give both or neither",
                          "`kite init relay` writes relay.crt and relay.key")
    if tls_cert and tls_key:
        for p in (tls_cert, tls_key):
            if not os.path.exists(p):
                raise ConfigError("--tls-cert/--tls-key", f"no such file {p!r}", "check the path")
        if not names:
            names = _cert_names(tls_cert)
    return RelayConfig(listen=addrs, grants=grants, tls_cert=tls_cert, tls_key=tls_key,
                       tls_names=names, keepalive=keepalive or None, zchunks=zchunks,
                       drain_timeout=drain_timeout, single_backend=single_set, db=db, **extra)


def _signup_options(db, zone, quota, per_hour) -> dict:
    if not zone:
        return {}
    from ..errors import StoreError
    from ..store import check_name, parse_size

    if not db:
        raise ConfigError("--signup", "sign-up needs the account registry", "add --db FILE")
    try:
        zone = check_name(str(zone))
        quota_bytes = parse_size(str(quota)) if quota is not None else 2_500_000_000
    except StoreError as exc:
        raise ConfigError("--signup", str(exc)) from None
    if zone.startswith("*."):
        raise ConfigError("--signup", f"zone {zone!r} is a wildcard", "give the zone's name")
    return {"signup_zone": zone, "signup_quota": quota_bytes, "signup_per_hour": per_hour}

