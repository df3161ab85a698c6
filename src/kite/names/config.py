"""The name service's configuration: relay options and TOML keys -> :class:`NamesConfig`.

Options (``kite relay``) and keys (relay TOML), each option overriding its key:

=========================  ====================  ==============================================
option                     key                   meaning
=========================  ====================  ==============================================
``--dns HOST:PORT``        ``dns``               serve DNS (UDP and TCP) here; repeatable
``--zone ZONE``            ``zone``              the zone the relay is authoritative for
``--public-ip IP``         ``public_ips``        A/AAAA of kites and relay names; repeatable
``--dns-ttl S``            ``dns_ttl``           TTL of the A/AAAA/TXT answers (60)
``--dns-negative-ttl S``   ``dns_negative_ttl``  SOA minimum: how long a miss is cached (30)
``--dns-name NAME``        ``dns_names``         the relay's names in NS (default: tls_names)
``--dns-rate-limit N``     ``dns_rate_limit``    queries per second per address (100; 0 off)
``--dns-update H:P``       ``dns_update``        push RFC 2136 updates to this server
``--dns-update-zone Z``    ``dns_update_zone``   the zone to update there (default: zone)
``--tsig N:ALG:B64``       ``tsig``              TSIG key for the updates
``--tsig-file FILE``       ``tsig_file``         the same, read from a file (keeps it out of ps)
=========================  ====================  ==============================================
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from ..config import parse_hostport
from ..errors import ConfigError
from ..proto.names import valid_domain

__all__ = ["NamesConfig", "TsigKey", "NAMES_KEYS", "build_names_config", "parse_tsig",
           "read_tsig_file", "DNS_PORT"]

DNS_PORT = 53
#: The TSIG algorithms dnspython signs with (RFC 8945 names).
TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1",
                   "hmac-md5")
#: The relay TOML keys this module reads.
NAMES_KEYS = frozenset({"dns", "zone", "public_ips", "dns_ttl", "dns_negative_ttl", "dns_names",
                        "dns_rate_limit", "dns_update", "dns_update_zone", "tsig", "tsig_file"})


@dataclass(frozen=True)
class TsigKey:
    """A TSIG key: its name, algorithm and base64 secret (never in reprs or logs)."""

    name: str
    algorithm: str
    secret: str = field(repr=False)


@dataclass
class NamesConfig:
    listen: list = field(default_factory=list)  # (host, port) served over UDP and TCP
    zone: Optional[str] = None  # lower case, no trailing dot
    public_ips: list = field(default_factory=list)
    ttl: int = 60
    negative_ttl: int = 30
    ns_names: list = field(default_factory=list)  # the relay's names for NS (empty: tls_names)
    rate_limit: int = 100  # queries per second per source address; 0 = no limit
    update_server: Optional[tuple] = None  # (host, port) taking RFC 2136 updates
    update_zone: Optional[str] = None
    tsig: Optional[TsigKey] = None


def _zone(value: Any, key: str) -> str:
    z = str(value).strip().lower().rstrip(".")
    if not valid_domain(z, wildcard=False):
        raise ConfigError(key, f"bad zone {value!r}", "give a DNS name, e.g. kites.example.com")
    return z


def _int(value: Any, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or \
            not str(value).strip().isdigit() or not lo <= int(value) <= hi:
        raise ConfigError(key, f"{value!r} is not a whole number from {lo} to {hi}",
                          "e.g. 60")
    return int(value)


def _list(value: Any, key: str) -> list:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, f"expected a list of strings, got {value!r}", 'e.g. ["..."]')
    return list(value)


def parse_tsig(value: str, key: str = "--tsig") -> TsigKey:
    """``NAME:ALGORITHM:BASE64SECRET`` (the algorithm as in RFC 8945: hmac-sha256, ...)."""
    import base64
    import binascii

    parts = value.strip().split(":", 2)
    if len(parts) != 3 or not all(parts):
        raise ConfigError(key, "expected NAME:ALGORITHM:BASE64SECRET",
                          "e.g. kite-update:hmac-sha256:<secret from `keymgr -t kite-update`>")
    name, alg, secret = parts[0].strip().rstrip(".").lower(), parts[1].strip().lower(), parts[2].strip()
    alg = alg.rstrip(".")
    if alg == "hmac-md5.sig-alg.reg.int":
        alg = "hmac-md5"
    if alg not in TSIG_ALGORITHMS:
        raise ConfigError(key, f"unknown TSIG algorithm {alg!r}",
                          f"use one of {', '.join(TSIG_ALGORITHMS)}")
    if not valid_domain(name, wildcard=False):
        raise ConfigError(key, f"bad TSIG key name {name!r}", "a DNS name, e.g. kite-update")
    try:
        if not base64.b64decode(secret, validate=True):
            raise ValueError
    except (binascii.Error, ValueError):
        raise ConfigError(key, "the TSIG secret is not base64", "copy it from the key file") from None
    return TsigKey(name, alg, secret)


_BIND_KEY = re.compile(r'key\s+"?([^"\s{]+)"?\s*\{(.*?)\}\s*;', re.S)


def read_tsig_file(path: str, key: str = "--tsig-file") -> TsigKey:
    """A TSIG key from a file: one line ``NAME:ALGORITHM:BASE64SECRET``, Knot's ``keymgr -t``
    output (``id:``, ``algorithm:``, ``secret:`` lines) or BIND's ``tsig-keygen`` output."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path!r}: {exc.strerror}", "check the path") from None
    m = _BIND_KEY.search(text)
    if m:
        alg = re.search(r"algorithm\s+\"?([\w.-]+)\"?\s*;", m.group(2))
        sec = re.search(r'secret\s+"([^"]+)"\s*;', m.group(2))
        if alg and sec:
            return parse_tsig(f"{m.group(1)}:{alg.group(1)}:{sec.group(1)}", key)
    fields = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip().lstrip("- ").strip()
        k, sep, v = line.partition(":")
        if sep and k.strip() in ("id", "algorithm", "secret") and v.strip():
            fields[k.strip()] = v.strip().strip("\"'")
    if len(fields) == 3:
        return parse_tsig(f"{fields['id']}:{fields['algorithm']}:{fields['secret']}", key)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if len(lines) == 1:
        return parse_tsig(lines[0], key)
    raise ConfigError(key, f"no TSIG key found in {path!r}",
                      "one line NAME:ALGORITHM:BASE64SECRET, or keymgr -t / tsig-keygen output")


def _pick(cli: dict, data: dict, opt: str, toml_key: str) -> Any:
    v = cli.get(opt)
    if v is None or v == ():
        return data.get(toml_key)
    return v


def build_names_config(data: dict, cli: Optional[dict] = None) -> Optional[NamesConfig]:
    """The name service's settings from the relay TOML ``data`` and the options in ``cli``
    (click's names: dns, zone, public_ip, dns_ttl, ...); None when neither asks for DNS."""
    cli = cli or {}
    dns = _list(_pick(cli, data, "dns", "dns") or [], "--dns")
    update = _pick(cli, data, "dns_update", "dns_update")
    if not dns and not update:
        given = [f"--{k.replace('_', '-')}" for k in
                 ("zone", "public_ip", "dns_name", "dns_update_zone", "tsig", "tsig_file")
                 if cli.get(k)] + sorted(k for k in NAMES_KEYS if k in data)
        if given:
            raise ConfigError(given[0], "only means something with --dns or --dns-update",
                              "add --dns 0.0.0.0:53 (serve the zone) or --dns-update SERVER:PORT")
        return None
    cfg = NamesConfig()
    cfg.listen = [parse_hostport(v, key="--dns", default_host="0.0.0.0", default_port=DNS_PORT)
                  for v in dns]
    zone = _pick(cli, data, "zone", "zone")
    cfg.zone = _zone(zone, "--zone") if zone else None
    if cfg.listen and not cfg.zone:
        raise ConfigError("--zone", "--dns needs the zone to answer for",
                          "e.g. --zone kites.example.com (delegated to this relay)")
    ips = _list(_pick(cli, data, "public_ip", "public_ips") or [], "--public-ip")
    for ip in ips:
        try:
            cfg.public_ips.append(str(ipaddress.ip_address(ip.strip())))
        except ValueError:
            raise ConfigError("--public-ip", f"{ip!r} is not an IP address",
                              "give the relay's public IPv4 or IPv6 address") from None
    if not cfg.public_ips:
        raise ConfigError("--public-ip", "the names need an address to point at",
                          "add --public-ip with the relay's public address (repeatable, v4 and v6)")
    cfg.public_ips = list(dict.fromkeys(cfg.public_ips))
    for opt, attr, lo, hi in (("dns_ttl", "ttl", 0, 604800),
                              ("dns_negative_ttl", "negative_ttl", 0, 86400),
                              ("dns_rate_limit", "rate_limit", 0, 10_000_000)):
        v = _pick(cli, data, opt, opt)
        if v is not None:
            setattr(cfg, attr, _int(v, "--" + opt.replace("_", "-"), lo, hi))
    cfg.ns_names = [_zone(n, "--dns-name") for n in
                    _list(_pick(cli, data, "dns_name", "dns_names") or [], "--dns-name")]
    if update:
        cfg.update_server = parse_hostport(str(update), key="--dns-update", default_port=DNS_PORT)
        uz = _pick(cli, data, "dns_update_zone", "dns_update_zone") or cfg.zone
        if not uz:
            raise ConfigError("--dns-update-zone", "which zone should the updates change?",
                              "e.g. --dns-update-zone kites.example.com")
        cfg.update_zone = _zone(uz, "--dns-update-zone")
        tsig, tsig_file = _pick(cli, data, "tsig", "tsig"), _pick(cli, data, "tsig_file", "tsig_file")
        if tsig and tsig_file:
            raise ConfigError("--tsig", "cannot be combined with --tsig-file", "give one of them")
        if tsig:
            cfg.tsig = parse_tsig(str(tsig))
        elif tsig_file:
            cfg.tsig = read_tsig_file(str(tsig_file))
    elif _pick(cli, data, "tsig", "tsig") or _pick(cli, data, "tsig_file", "tsig_file"):
        raise ConfigError("--tsig", "only used with --dns-update", "add --dns-update SERVER:PORT")
    return cfg


def in_zone(name: str, zone: str) -> bool:
    """``name`` (lower case, no trailing dot) is ``zone`` or below it."""
    return name == zone or name.endswith("." + zone)


def hostnames(names: Iterable[str]) -> list:
    """The DNS names among ``names`` (no IP literals, no ``localhost``), lower case."""
    out = []
    for n in names:
        n = n.lower().rstrip(".")
        try:
            ipaddress.ip_address(n)
            continue
        except ValueError:
            pass
        if "." in n and not n.startswith("*") and valid_domain(n, wildcard=False) \
                and n != "localhost" and not n.endswith(".localhost"):
            out.append(n)
    return out
