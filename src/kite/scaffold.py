"""Starter files for ``kite init relay|backend``: a config, a certificate and a secret.

Each function writes its files (never over existing ones unless ``force``) and returns the
lines to show the user: what was written, and for a relay the certificate's fingerprint.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from typing import Optional, Sequence

from .errors import ConfigError
from .net.tls import generate_self_signed
from .proto.names import valid_domain

__all__ = ["init_relay", "init_backend"]


def _write(path: str, text: str, force: bool, mode: int = 0o644) -> None:
    if os.path.exists(path) and not force:
        raise ConfigError(path, "already exists", "pass --force to overwrite, or use another --dir")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _toml_str(text: str) -> str:
    """A TOML basic string (JSON escapes are valid TOML; TOML also wants DEL escaped)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _check_names(names: list) -> list:
    """Certificate names: DNS names (``*.parent`` allowed) or IP addresses."""
    out = []
    for name in names:
        n = name.strip().lower().rstrip(".")
        if not valid_domain(n):
            try:
                n = str(ipaddress.ip_address(n))
            except ValueError:
                raise ConfigError("--name", f"bad relay name {name!r}",
                                  "give a DNS name or an IP address, e.g. relay.example.com") from None
        out.append(n)
    return out


def _mkdir(directory: str) -> None:
    if not directory.isprintable():  # it is written into the config's first comment line
        raise ConfigError("--dir", f"bad directory name {directory!r}",
                          "use a name without control characters")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise ConfigError("--dir", f"cannot create {directory!r}: {exc.strerror or exc}",
                          "give a directory you can write to") from None


def _dns_block(zone: str, public_ips: list) -> str:
    """The relay TOML keys that turn the name service on for ``zone``."""
    ips = ", ".join(f'"{ip}"' for ip in public_ips)
    hint = "" if public_ips else "  # EDIT: the relay's public IPv4/IPv6 address(es)"
    return f'''
# DNS for the kites (kite.names): the relay answers for {zone} on UDP and TCP port 53.
# Delegate the zone to it at the parent: {zone}. NS relay.{zone}. and a glue
# record relay.{zone}. A <public IP> (see README, "Names").
dns = ["0.0.0.0:53"]
zone = "{zone}"
public_ips = [{ips}]{hint}
dns_names = ["relay.{zone}"]  # the zone's NS; it answers with public_ips
'''


def init_relay(directory: str, *, names: list, domain: Optional[str], force: bool,
               zone: Optional[str] = None, public_ips: Sequence[str] = ()) -> list:
    """``zone``: DNS on for it (``public_ips`` its A/AAAA; the kite domain becomes ``*.zone``
    when ``domain`` is None)."""
    if zone is not None:
        zone = zone.strip().lower().rstrip(".")
        if not valid_domain(zone, wildcard=False):
            raise ConfigError("--zone", f"bad zone {zone!r}", "give a DNS name, e.g. kites.example.com")
        for ip in public_ips:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ConfigError("--public-ip", f"{ip!r} is not an IP address",
                                  "give the relay's public IPv4 or IPv6 address") from None
    elif public_ips:
        raise ConfigError("--public-ip", "only used with --zone", "add --zone ZONE")
    domain = domain or (f"*.{zone}" if zone else "*.kite.localhost")
    names = _check_names(names) or ["localhost", "127.0.0.1"]
    kite_domain = domain.strip().lower().rstrip(".")
    if not valid_domain(kite_domain):
        raise ConfigError("--domain", f"bad kite domain {domain!r}",
                          "give a DNS name or *.parent, e.g. *.example.com")
    _mkdir(directory)
    cert = os.path.join(directory, "relay.crt")
    key = os.path.join(directory, "relay.key")
    conf = os.path.join(directory, "relay.toml")
    for p in (cert, key, conf):
        if os.path.exists(p) and not force:
            raise ConfigError(p, "already exists", "pass --force to overwrite, or use another --dir")
    pin = generate_self_signed(cert, key, names)
    secret = secrets.token_urlsafe(24).replace("-", "x").replace("_", "y")
    _write(conf, f'''# kite relay configuration (kite relay --config {conf});
# docs/config.md lists every key.  Relative file names are relative to this file's folder.
# Visitors type http://NAME/ (port 80) and https://NAME/ (443); backends tunnel to 443.
# Ports below 1024 need root or CAP_NET_BIND_SERVICE (see README, "Low ports").
listen = ["0.0.0.0:80", "0.0.0.0:443"]
tls_cert = {_toml_str(os.path.basename(cert))}
tls_key = {_toml_str(os.path.basename(key))}
{_dns_block(zone, list(public_ips)) if zone else ""}
[[kite]]
domain = {_toml_str(kite_domain)}
protos = "*"
secret = "{secret}"
''', force, 0o600)
    lines = []
    if zone and not public_ips:
        lines.append(f"edit public_ips in {conf}: the addresses the names of {zone} point at")
    relay_name = next((n for n in names if not n.startswith("*")), "localhost")
    relay_addr = f"[{relay_name}]:443" if ":" in relay_name else f"{relay_name}:443"
    kite = "app." + kite_domain[2:] if kite_domain.startswith("*.") else kite_domain
    conf_abs = os.path.abspath(conf)
    return lines + [
        f"wrote {cert}, {key} and {conf}",
        f"the kite secret is in {conf_abs} ([[kite]] secret; mode 0600): backends need it",
        f"relay certificate SHA-256 fingerprint: {pin}",
        "",
        "next:",
        "  1. start the relay (ports 80 and 443: as root, or see README \"Low ports\"):",
        f"       kite relay --config {conf_abs}",
        "  2. on the machine with the server (here: port 8080), fly a kite:",
        f"       kite expose 8080 {kite} --relay {relay_addr} --fingerprint {pin} "
        f"--secret {secret}",
        f"     (or --ca with a copy of {os.path.basename(cert)}; --secret-file FILE keeps the "
        "secret out of ps; kite init backend --relay ... writes a config)",
        "  3. visit it:",
        f"       curl http://{kite}/",
        "",
        "low ports without root: sudo sysctl -w net.ipv4.ip_unprivileged_port_start=80, or as "
        "a systemd service with AmbientCapabilities=CAP_NET_BIND_SERVICE",
    ]


def init_backend(directory: str, *, force: bool, relay: Optional[str] = None,
                 secret: Optional[str] = None, name: Optional[str] = None,
                 target: str = "8080", ca: Optional[str] = None,
                 fingerprint: Optional[str] = None) -> list:
    """A backend config for ``relay`` (HOST:PORT) with ``secret`` (a new one if None), flying
    ``name`` from ``target``; the relay checked with ``ca`` or ``fingerprint``."""
    from .config import (
        check_kite_name,
        check_tls_mode,
        parse_hostport,
        parse_target,
        warn_short_secret,
    )
    from .net.tls import normalize_fingerprint

    check_tls_mode(ca=ca, fingerprint=fingerprint)
    if relay is not None:
        host, port = parse_hostport(relay, key="--relay", default_port=443, min_port=1)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    else:
        address = "relay.example.com:443"
    if secret is not None and (not secret or ":" in secret or
                               any(c.isspace() or not c.isprintable() for c in secret)):
        raise ConfigError("--secret", "empty, or with ':', whitespace or control characters",
                          "give the secret the relay printed")
    if secret is not None:
        warn_short_secret(secret, "--secret")
    kite = check_kite_name(name, "--name") if name else "app.example.com"
    parse_target(target, key="--target")
    if ca is not None:
        if not os.path.isfile(ca):
            raise ConfigError("--ca", f"no such file {ca!r}", "give the relay's certificate")
        check = f"ca = {_toml_str(os.path.abspath(ca))}"
    elif fingerprint is not None:
        check = f"fingerprint = \"{normalize_fingerprint(fingerprint)}\""
    else:
        check = "# ca = \"relay.crt\"       # verify the relay; or fingerprint = \"...\"; or insecure = true"
    _mkdir(directory)
    conf = os.path.join(directory, "backend.toml")
    new = secret is None
    secret = secret or secrets.token_urlsafe(24).replace("-", "x").replace("_", "y")
    _write(conf, f'''# kite backend configuration (kite expose --config {conf});
# docs/config.md lists every key.  Relative file names are relative to this file's folder.
[defaults]
secret = {_toml_str(secret)}      # the relay must allow it: --kite '*:{kite}:<secret>'
{check}

[[relay]]
address = {_toml_str(address)}

[[kite]]
name = {_toml_str(kite)}
target = {_toml_str(target)}
''', force, 0o600)
    what = "a new secret" if new else "the secret"
    todo = ": edit the relay address and kites" if relay is None else ""
    return [f"wrote {conf} (it holds {what}; mode 0600){todo}",
            f"check it:  kite expose --check-config {os.path.abspath(conf)}",
            f"run it:    kite expose --config {os.path.abspath(conf)}"]
