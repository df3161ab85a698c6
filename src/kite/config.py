"""Configuration: command-line values and TOML files, validated into plain dataclasses.

Every problem raises :class:`~kite.errors.ConfigError` naming the key and the fix; the CLI
prints it on one line and exits 2.  An unknown key is such a problem (the error names the
nearest known key); relative file names in a file are relative to the file's folder.  Every
key, with an example: docs/config.md.

Backend file (``kite expose --config FILE``)::

    [defaults]              # optional, applies to every relay/kite below
    secret_file = "kite.secret"  # first line; or secret = "..."; or per kite; or env KITE_SECRET
    ca = "relay.pem"        # or fingerprint = "ab12...", or insecure = true, or plain = true

    [[relay]]
    address = "relay.example.com:443"
    # ca / fingerprint / insecure / plain / server_name as in [defaults]
    connect_name = "fe.example.com"  # TLS the pagekite.py way: plain CONNECT fe.example.com:443,
                                     # then TLS checked against that name (pagekite's --fe_certname)

    keepalive = 30.0        # seconds of tunnel silence before a PING
    zchunks = false         # true: ask the relay to compress what it sends (ZChunks)

    [[kite]]
    name = "app.example.com"
    target = "http://127.0.0.1:8080"   # http:// https:// tcp:// or host:port or a port
    public_port = 22        # tcp kites: the port visitors CONNECT to (default: the target's)
    proxy_protocol = 1      # raw/https kites: prepend a PROXY v1/v2 header
    relays = ["relay.example.com:443"]  # default: every relay
    basic_auth = "alice:long-password"  # http kites: visitors must log in (or a list of pairs)
    response_timeout = 60   # http kites: s until the local server's first byte, then 504 (0: off)

Relay file (``kite relay --config FILE``)::

    listen = ["0.0.0.0:443"]
    tls_cert = "relay.crt"
    tls_key = "relay.key"
    tls_names = ["relay.example.com"]
    [[kite]]
    domain = "*.example.com"
    protos = ["http", "https", "raw-22"]   # or "*"
    secret_file = "kite.secret"  # or secret = "..."; or top-level secret_file, --secret-file,
                                 # env KITE_SECRET
    single = false          # true: one backend at a time (pagekite.py's Duplicate)
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import os
import stat
import sys
from dataclasses import dataclass, field
from typing import Collection, Optional
from urllib.parse import urlsplit

from .errors import ConfigError
from .net.busypoll import DEFAULT_US as DEFAULT_BUSY_POLL
from .net.busypoll import MAX_US as MAX_BUSY_POLL
from .proto.names import valid_domain

log = logging.getLogger("kite.config")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore

__all__ = [
    "MIN_KEEPALIVE",
    "MAX_KEEPALIVE",
    "check_keepalive",
    "check_busy_poll",
    "DEFAULT_BUSY_POLL",
    "check_basic_auth",
    "check_seconds",
    "parse_hostport",
    "is_loopback",
    "parse_target",
    "check_tls_mode",
    "Target",
    "KiteSpec",
    "RelaySpec",
    "BackendConfig",
    "load_toml",
    "load_backend_config",
    "check_keys",
    "check_response_timeout",
    "config_dir",
    "resolve_paths",
    "BACKEND_KEYS",
    "DEFAULT_RESPONSE_TIMEOUT",
]


#: ``keepalive`` bounds (seconds of tunnel silence before a PING); 0 turns keepalive off.
MIN_KEEPALIVE = 0.1
MAX_KEEPALIVE = 3600.0


def check_seconds(value: object, key: str, *, low: float, high: float,
                  zero_ok: bool = False) -> float:
    """A finite number of seconds in ``low``..``high`` (or 0 if ``zero_ok``); a TOML or
    command-line value of any type may come in, and only a number (not a bool) passes."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"expected a number of seconds, got {value!r}",
                          "give a number, e.g. 30")
    seconds = float(value)
    if zero_ok and seconds == 0:
        return 0.0
    if not low <= seconds <= high:  # also nan
        zero = " or 0 to turn it off" if zero_ok else ""
        raise ConfigError(key, f"{value!r} is out of range",
                          f"give {low:g} to {high:g} seconds{zero}")
    return seconds


def check_keepalive(value: object, key: str = "--keepalive") -> float:
    """Seconds of tunnel silence before a PING: MIN_KEEPALIVE..MAX_KEEPALIVE, or 0 (off)."""
    return check_seconds(value, key, low=MIN_KEEPALIVE, high=MAX_KEEPALIVE, zero_ok=True)


def check_busy_poll(value: object, key: str = "--busy-poll") -> int:
    """Microseconds of busy polling (kite.net.busypoll): 0 (off) to MAX_BUSY_POLL."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_BUSY_POLL:
        raise ConfigError(key, f"bad value {value!r}", "give whole microseconds from 0 (off) "
                          f"to {MAX_BUSY_POLL}, e.g. {DEFAULT_BUSY_POLL}")
    return value


#: http kites: seconds a local server may take to send the first byte of its answer before
#: the visitor gets a 504 page (0: wait for ever).
DEFAULT_RESPONSE_TIMEOUT = 60.0


def check_response_timeout(value: object, key: str = "--response-timeout") -> Optional[float]:
    """Seconds until the first response byte (0 or None: no limit) -> seconds or None."""
    if value is None:
        return None
    return check_seconds(value, key, low=0.1, high=86400, zero_ok=True) or None


def _port_number(text: str, key: str, *, min_port: int = 1) -> int:
    """A port of ASCII digits in min_port..65535 (``str.isdigit`` would take ``²``)."""
    if not (text.isascii() and text.isdigit() and len(text) <= 5) or not (
            min_port <= int(text) <= 65535):
        raise ConfigError(key, f"bad port {text!r}", f"use a number {min_port}-65535")
    return int(text)


def _check_host(host: str, value: str, key: str) -> str:
    """A DNS name, an IPv4 address or (from ``[...]``) an IPv6 address; lower-cased."""
    h = host.lower()
    if ":" in h:
        try:
            ipaddress.IPv6Address(h)
        except ValueError:
            raise ConfigError(key, f"bad IPv6 address in {value!r}", "use [v6addr]:port") from None
        return h
    if h.endswith("."):
        h = h[:-1]
    if not valid_domain(h, wildcard=False):
        raise ConfigError(key, f"bad host name in {value!r}",
                          "use a DNS name or an IP address, e.g. relay.example.com:443")
    return h


def is_loopback(host: str) -> bool:
    """``host`` (a listening address: ``localhost``, an IP, maybe in brackets) is loopback:
    an endpoint there is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_hostport(value: str, *, key: str, default_host: Optional[str] = None,
                   default_port: Optional[int] = None, min_port: int = 0) -> tuple:
    """``host:port``, ``[v6]:port``, ``port`` (with default_host) or ``host`` (default_port).

    The host must be a DNS name or an IP address; the port ASCII digits in
    ``min_port``..65535.  Anything else is a ConfigError naming ``key``.
    """
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a \"HOST:PORT\" string, got {value!r}", "quote it")
    v = value.strip()
    host, port_s = None, None
    if v.startswith("["):
        end = v.find("]")
        if end < 0:
            raise ConfigError(key, f"bad address {value!r}", "use [v6addr]:port")
        host = v[1:end]
        rest = v[end + 1:]
        if rest.startswith(":"):
            port_s = rest[1:]
        elif rest:
            raise ConfigError(key, f"bad address {value!r}", "use [v6addr]:port")
    elif v.isascii() and v.isdigit():
        port_s = v
    elif v.count(":") == 1:
        host, port_s = v.split(":")
    elif ":" in v:
        raise ConfigError(key, f"bad address {value!r}", "write IPv6 addresses as [addr]:port")
    else:
        host = v
    host = host or default_host
    if host is None:
        raise ConfigError(key, f"no host in {value!r}", "use HOST:PORT")
    host = _check_host(host, value, key)
    if port_s is None or port_s == "":
        if default_port is None:
            raise ConfigError(key, f"no port in {value!r}", "use HOST:PORT")
        port = default_port
    else:
        port = _port_number(port_s, key, min_port=min_port)
    return host, port


@dataclass(frozen=True)
class Target:
    """Where the backend sends a kite's streams, and which kite protocol that makes."""

    proto: str  # http | https | raw
    host: str
    port: int


def parse_target(value: str, *, key: str = "TARGET") -> Target:
    """``8080`` / ``host:port`` (http) or ``http://``, ``https://``, ``tcp://`` URLs."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(key, f"expected a URL, HOST:PORT or a port, got {value!r}",
                          "e.g. \"http://127.0.0.1:8080\"")
    v = str(value).strip()
    if "://" in v:
        try:
            u = urlsplit(v)
            port = u.port
            hostname = u.hostname
        except ValueError as exc:
            raise ConfigError(key, f"bad URL {value!r}: {exc}",
                              "e.g. http://127.0.0.1:8080 or tcp://[::1]:22") from None
        scheme = u.scheme.lower()
        proto = {"http": "http", "https": "https", "tcp": "raw", "raw": "raw",
                 "ws": "http", "ssh": "raw"}.get(scheme)
        if proto is None:
            raise ConfigError(key, f"unknown scheme {scheme!r} in {value!r}",
                              "use http://, https:// or tcp://")
        default_port = {"http": 80, "https": 443, "ssh": 22}.get(scheme)
        if port is None:
            port = default_port
        if port is None:
            raise ConfigError(key, f"no port in {value!r}", "e.g. tcp://127.0.0.1:22")
        if not 1 <= port <= 65535:
            raise ConfigError(key, f"bad port in {value!r}", "use a number 1-65535")
        if u.path not in ("", "/") or u.query or u.fragment or u.username or u.password:
            raise ConfigError(key, f"{value!r} has more than a scheme, host and port",
                              "e.g. http://127.0.0.1:8080")
        host = _check_host(hostname, value, key) if hostname else "127.0.0.1"
        return Target(proto, host, port)
    host, port = parse_hostport(v, key=key, default_host="127.0.0.1", min_port=1)
    return Target("http", host, port)


@dataclass
class KiteSpec:
    """One kite a backend flies."""

    domain: str
    proto: str  # kite protocol as registered: http, https, raw-22, websocket
    secret: str = field(repr=False)
    target: Target = None  # type: ignore[assignment]
    proxy_protocol: int = 0  # 0 off, 1 or 2: PROXY header to the local server
    forwarded: bool = True  # http: add X-Forwarded-For/-Proto/-Host
    relays: Optional[list] = None  # addresses this kite flies on (None: all)
    #: http kites: "USER:PASS" pairs a visitor must give (HTTP basic auth, checked by the
    #: backend on every request); empty: no check.
    basic_auth: tuple = field(default=(), repr=False)
    # http: seconds until the local server's first response byte, then a 504 (None: no limit)
    response_timeout: Optional[float] = DEFAULT_RESPONSE_TIMEOUT

    @property
    def name(self) -> str:
        return f"{self.proto}:{self.domain}"


@dataclass
class RelaySpec:
    host: str
    port: int
    plain: bool = False  # no TLS at all (tests, or behind a TLS terminator)
    ca: Optional[str] = None
    fingerprint: Optional[str] = None
    insecure: bool = False
    server_name: Optional[str] = None  # SNI + name checked; default host unless an IP
    # pagekite-style TLS (pagekite.py's --fe_certname): plain ``CONNECT name:443``, then TLS
    # with SNI and certificate check for ``name`` (unless server_name says otherwise).
    connect_name: Optional[str] = None
    kites: list = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass
class BackendConfig:
    relays: list = field(default_factory=list)
    keepalive: float = 30.0
    ping_timeout: float = 10.0
    zchunks: bool = False
    busy_poll: int = DEFAULT_BUSY_POLL  # the longest busy poll, microseconds; 0: off
    access_log: Optional[str] = None  # "-" (stdout), a file, or None: no access log
    log_format: str = "text"  # access log lines: text or json


def kite_proto_for(target: Target, public_port: Optional[int]) -> str:
    if target.proto == "raw":
        return f"raw-{public_port or target.port}"
    return target.proto


# -- secrets ------------------------------------------------------------------------------------
#: Secrets shorter than this get a warning (relay and backend): they can be guessed.
MIN_SECRET_LENGTH = 16
_warned: set = set()  # (what, key) pairs already warned about: each warning once


def _warn_once(what: str, key: str, message: str, *args: object) -> None:
    if (what, key) not in _warned:
        _warned.add((what, key))
        log.warning(message, *args)


def read_secret_file(path: object, key: str) -> str:
    """The secret in file ``path``: its first line, stripped.  An unreadable file or an empty
    first line is a ConfigError; a file that group or others may read gets a warning."""
    if not isinstance(path, str) or not path:
        raise ConfigError(key, f"expected a file name, got {path!r}", "give the path of the file")
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            first = f.readline(4096)
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path!r}: {exc.strerror or exc}",
                          "give a readable file whose first line is the secret") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(key, f"{path!r} is not a regular file",
                          "give a file whose first line is the secret")
    try:
        secret = first.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(key, f"the first line of {path!r} is not UTF-8 text",
                          "write the secret as text on the first line") from None
    if not secret:
        raise ConfigError(key, f"the first line of {path!r} is empty",
                          "write the secret on the first line")
    if mode & 0o077:
        _warn_once("mode", path, "secret file %r can be read by group or others (mode %03o): "
                   "chmod 600 it", path, mode & 0o777)
    return secret


def pick_secret(secret: object, secret_file: object, *, key: str, file_key: str) -> Optional[str]:
    """The secret given inline (``secret``) or in a file (``secret_file``); not both."""
    if secret is not None and not isinstance(secret, str):
        raise ConfigError(key, f"expected a string, got {type(secret).__name__}", "quote it")
    if secret_file is not None:
        if secret:
            raise ConfigError(file_key, f"cannot be combined with {key}", "give one of them")
        return read_secret_file(secret_file, file_key)
    return secret or None


def warn_short_secret(secret: str, where: str) -> None:
    """One WARNING per ``where`` when ``secret`` is shorter than MIN_SECRET_LENGTH."""
    if len(secret) < MIN_SECRET_LENGTH:
        _warn_once("short", where, "the secret of %s has %d characters: use at least %d "
                   "(`kite init` makes such secrets)", where, len(secret), MIN_SECRET_LENGTH)


def _check_secret(secret: Optional[str], key: str) -> str:
    if not secret:
        raise ConfigError(key, "no secret given",
                          "pass --secret-file FILE, set KITE_SECRET, or put secret_file = \"...\" "
                          "in the config")
    if ":" in secret or any(c.isspace() or not c.isprintable() for c in secret):
        raise ConfigError(key, "the secret contains ':', whitespace or control characters",
                          "use letters, digits and punctuation other than ':'")
    warn_short_secret(secret, key)
    return secret


def check_tls_mode(*, ca: Optional[str] = None, fingerprint: Optional[str] = None,
                   insecure: bool = False, plain: bool = False) -> Optional[str]:
    """At most one way to check the relay: ``--ca``, ``--fingerprint``, ``--insecure``, or (for
    ``kite expose``) ``--plain``.  Returns the option given, or None."""
    modes = [m for m, on in (("--ca", ca), ("--fingerprint", fingerprint),
                             ("--insecure", insecure), ("--plain", plain)) if on]
    if len(modes) > 1:
        raise ConfigError(modes[1], f"cannot be combined with {modes[0]}",
                          "choose one way to check the relay")
    return modes[0] if modes else None


def check_connect_name(name: Optional[str], key: str, *, plain: bool = False) -> Optional[str]:
    """A relay name for ``CONNECT name:443`` + TLS: a DNS name, and TLS must be on."""
    if name is None:
        return None
    n = name.strip().lower().rstrip(".")
    if not n or any(c in n for c in ": /\r\n\t"):
        raise ConfigError(key, f"bad relay name {name!r}",
                          "give the DNS name in the relay's certificate, e.g. relay.example.com")
    if plain:
        raise ConfigError(key, "cannot be combined with plain (it means: TLS after CONNECT)",
                          "drop plain, or drop the relay name")
    return n


def load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("--config", f"no such file {path!r}", "check the path") from None
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path!r}: {exc.strerror or exc}",
                          "give a readable TOML file") from None
    except UnicodeDecodeError:
        raise ConfigError("--config", f"{path}: not UTF-8 text", "save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path}: not valid TOML: {exc}", "fix the syntax") from None


def _tls_opts(d: dict, where: str) -> dict:
    out: dict = {}
    for k in ("ca", "fingerprint", "server_name", "connect_name"):
        if k in d:
            if not isinstance(d[k], str):
                raise ConfigError(f"{where}.{k}", f"expected a string, got {d[k]!r}", "quote it")
            out[k] = d[k]
    for k in ("insecure", "plain"):
        if k in d:
            if not isinstance(d[k], bool):
                raise ConfigError(f"{where}.{k}", f"expected true/false, got {d[k]!r}",
                                  "write true or false")
            out[k] = d[k]
    return out


_TLS_KEYS = {"ca", "fingerprint", "server_name", "connect_name", "insecure", "plain"}
_DEFAULTS_KEYS = _TLS_KEYS | {"secret", "secret_file", "response_timeout"}
_RELAY_KEYS = _TLS_KEYS | {"address"}
_KITE_KEYS = {"name", "target", "public_port", "proxy_protocol", "forwarded", "relays", "secret",
              "secret_file", "basic_auth", "response_timeout"}
#: The top-level keys of a backend file.
BACKEND_KEYS = {"defaults", "relay", "kite", "keepalive", "zchunks", "busy_poll"}
#: Keys holding file names: relative to the config file's folder.
_PATH_KEYS = ("ca", "secret_file")


def check_keys(table: dict, known: Collection[str], where: str) -> None:
    """Every key of ``table`` is one of ``known`` (a misspelt key is not silently ignored):
    the error names the key and the nearest known one."""
    for k in table:
        if k not in known:
            name = f"{where}.{k}" if where else k
            close = difflib.get_close_matches(str(k), sorted(known), n=1, cutoff=0.6)
            fix = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(name, "unknown key", f"{fix}known keys: {', '.join(sorted(known))}")


def resolve_paths(table: dict, keys: Collection[str], base: str) -> None:
    """Make the file names under ``keys`` in ``table`` absolute: a relative name is relative
    to ``base``, the folder of the config file it was written in (``~`` is expanded).
    Values that are not strings are left for the type checks."""
    for k in keys:
        value = table.get(k)
        if isinstance(value, str) and value:
            value = os.path.expanduser(value)
            table[k] = value if os.path.isabs(value) else os.path.join(base, value)


def config_dir(path: str) -> str:
    """The folder relative file names in config file ``path`` are resolved against."""
    return os.path.dirname(os.path.abspath(path))


def tables(data: dict, key: str) -> list:
    """The ``[[key]]`` array of tables (empty if absent); anything else is a ConfigError."""
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(key, "must be an array of tables", f"write [[{key}]] sections")
    return value


def check_bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true/false, got {value!r}", "write true or false")
    return value


def check_port(value: object, key: str) -> int:
    """A port number 1..65535 given as a number (TOML) or an int (command line)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(key, f"{value!r} is not a port", "use a number 1-65535, without quotes")
    return value


def check_kite_name(value: object, key: str) -> str:
    """A kite domain: a DNS name, or ``*.parent``; lower-cased, one trailing dot dropped."""
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {value!r}", "quote it")
    name = value.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    if not valid_domain(name):
        raise ConfigError(key, f"bad kite name {value!r}",
                          "give a DNS name like app.example.com: letters, digits, '-' and '.'")
    return name


def check_basic_auth(value: object, key: str, proto: str) -> tuple:
    """``basic_auth``: one ``"USER:PASS"`` or a list of them, for an http kite only.  The
    credentials are never echoed in an error."""
    pairs = value if isinstance(value, list) else [value]
    if not pairs:
        return ()
    if proto != "http":
        raise ConfigError(key, f"basic auth needs an http kite, not {proto}",
                          "use an http:// target, or protect the service itself")
    out = []
    for pair in pairs:
        if not isinstance(pair, str):
            raise ConfigError(key, f"expected a \"USER:PASS\" string, got {type(pair).__name__}",
                              "quote it")
        user, sep, password = pair.partition(":")
        if not sep or not user or not password:
            raise ConfigError(key, "expected USER:PASS (both non-empty)",
                              "e.g. basic_auth = \"alice:long-password\"")
        if not pair.isprintable():
            raise ConfigError(key, "the credentials contain control characters",
                              "use printable characters only")
        out.append(pair)
    return tuple(out)


def load_backend_config(path: str) -> BackendConfig:
    from .net.tls import normalize_fingerprint

    data = load_toml(path)
    base = config_dir(path)
    check_keys(data, BACKEND_KEYS, "")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError("defaults", "must be a table", "write [defaults]")
    check_keys(defaults, _DEFAULTS_KEYS, "defaults")
    resolve_paths(defaults, _PATH_KEYS, base)
    d_tls = _tls_opts(defaults, "defaults")
    d_secret = pick_secret(defaults.get("secret"), defaults.get("secret_file"),
                           key="defaults.secret", file_key="defaults.secret_file")
    d_secret = d_secret or os.environ.get("KITE_SECRET")
    d_timeout = check_response_timeout(defaults.get("response_timeout", DEFAULT_RESPONSE_TIMEOUT),
                                       "defaults.response_timeout")
    relays: dict = {}
    for i, r in enumerate(tables(data, "relay")):
        where = f"relay[{i}]"
        check_keys(r, _RELAY_KEYS, where)
        resolve_paths(r, _PATH_KEYS, base)
        if "address" not in r:
            raise ConfigError(f"{where}.address", "missing", "e.g. address = \"relay.example.com:443\"")
        host, port = parse_hostport(r["address"], key=f"{where}.address", default_port=443,
                                    min_port=1)
        opts = dict(d_tls)
        opts.update(_tls_opts(r, where))
        if opts.get("fingerprint"):
            opts["fingerprint"] = normalize_fingerprint(opts["fingerprint"])
        if "connect_name" in opts:
            opts["connect_name"] = check_connect_name(opts["connect_name"], f"{where}.connect_name",
                                                      plain=bool(opts.get("plain")))
        spec = RelaySpec(host=host, port=port, **opts)
        relays[spec.address] = spec
    if not relays:
        raise ConfigError("relay", "no relay configured", "add a [[relay]] table with address = ...")
    kites = tables(data, "kite")
    if not kites:
        raise ConfigError("kite", "no kite configured", "add a [[kite]] table with name and target")
    for i, k in enumerate(kites):
        where = f"kite[{i}]"
        check_keys(k, _KITE_KEYS, where)
        resolve_paths(k, _PATH_KEYS, base)
        for req in ("name", "target"):
            if req not in k:
                raise ConfigError(f"{where}.{req}", "missing", "every [[kite]] needs name and target")
        target = parse_target(k["target"], key=f"{where}.target")
        pp = k.get("proxy_protocol", 0)
        if isinstance(pp, bool) or pp not in (0, 1, 2):
            raise ConfigError(f"{where}.proxy_protocol", f"{pp!r} is not 0, 1 or 2", "use 1 or 2")
        public_port = k.get("public_port")
        if public_port is not None:
            public_port = check_port(public_port, f"{where}.public_port")
        secret = pick_secret(k.get("secret"), k.get("secret_file"), key=f"{where}.secret",
                             file_key=f"{where}.secret_file")
        kite_spec = KiteSpec(
            domain=check_kite_name(k["name"], f"{where}.name"),
            proto=kite_proto_for(target, public_port),
            secret=_check_secret(secret or d_secret, f"{where}.secret"),
            target=target,
            proxy_protocol=pp,
            forwarded=check_bool(k.get("forwarded", True), f"{where}.forwarded"),
            response_timeout=check_response_timeout(k["response_timeout"],
                                                    f"{where}.response_timeout")
            if "response_timeout" in k else d_timeout,
        )
        if "basic_auth" in k:
            kite_spec.basic_auth = check_basic_auth(k["basic_auth"], f"{where}.basic_auth",
                                                    kite_spec.proto)
        names = k.get("relays")
        if names is not None and (not isinstance(names, list)
                                  or not all(isinstance(n, str) for n in names)):
            raise ConfigError(f"{where}.relays", f"expected a list of addresses, got {names!r}",
                              "e.g. relays = [\"relay.example.com:443\"]")
        for addr, relay in relays.items():
            if names is None or addr in names or f"{relay.host}:{relay.port}" in names:
                relay.kites.append(kite_spec)
    keepalive = check_keepalive(data.get("keepalive", 30.0), "keepalive")
    zchunks = check_bool(data.get("zchunks", False), "zchunks")
    busy_poll = check_busy_poll(data.get("busy_poll", BackendConfig.busy_poll), "busy_poll")
    return BackendConfig(relays=list(relays.values()), keepalive=keepalive, zchunks=zchunks,
                         busy_poll=busy_poll)
