"""The relay's configuration: options and config file -> :class:`RelayConfig`."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..certs.acme_config import ACME_KEYS, AcmeConfig, build_acme_config
from ..config import (
    DEFAULT_BUSY_POLL,
    check_bool,
    check_busy_poll,
    check_keepalive,
    check_keys,
    check_seconds,
    config_dir,
    is_loopback,
    load_toml,
    parse_hostport,
    pick_secret,
    read_secret_file,
    resolve_paths,
    tables,
    warn_short_secret,
)
from ..errors import ConfigError
from ..names.config import NAMES_KEYS, NamesConfig, build_names_config
from ..net.limits import (
    DEFAULT_BUFFER_BUDGET,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_STREAMS,
    DEFAULT_SLOW_READER_TIMEOUT,
)
from ..proto.names import valid_domain
from .grants import GrantTable, parse_grant

__all__ = ["RelayConfig", "build_relay_config", "load_error_pages", "LIMIT_KEYS", "RELAY_KEYS",
           "ERROR_PAGE_NAMES"]


@dataclass
class RelayConfig:
    listen: list = field(default_factory=lambda: [("127.0.0.1", 0)])
    grants: GrantTable = field(default_factory=GrantTable)
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    # every (cert, key) pair, the first being tls_cert/tls_key; empty: just that one
    tls_pairs: list = field(default_factory=list)
    redirect_http: bool = False  # 308 plain-HTTP visitors of a kite with HTTPS to https://
    hsts: Optional[int] = None  # Strict-Transport-Security max-age on terminated HTTPS
    # per kite ([[kite]] redirect_http / hsts), by grant domain (a *.parent covers below it)
    redirect_kites: set = field(default_factory=set)
    hsts_kites: dict = field(default_factory=dict)
    tls_names: list = field(default_factory=list)  # SNI names that mean "the relay itself"
    keepalive: Optional[float] = 30.0
    ping_timeout: float = 10.0
    busy_poll: int = DEFAULT_BUSY_POLL  # the longest busy poll, microseconds; 0: off
    drain_timeout: float = 10.0
    zchunks: bool = False  # advertise ZChunks: ask pagekite.py backends to compress
    single_backend: set = field(default_factory=set)  # kites limited to one backend
    # -- connection and stream limits (docs in kite.relay.accept and kite.net.limits) --
    max_connections: Optional[int] = None  # visitors + tunnels + pending; None: from the fd limit
    max_pending: Optional[int] = None  # connections not yet classified; None: derived
    tunnel_reserve: Optional[int] = None  # connections visitors may not take; None: derived
    max_streams: int = DEFAULT_MAX_STREAMS  # streams per tunnel
    idle_timeout: Optional[float] = DEFAULT_IDLE_TIMEOUT  # s without a byte; None: never
    buffer_budget: Optional[int] = DEFAULT_BUFFER_BUDGET  # bytes in visitor buffers; None: no cap
    slow_reader_timeout: float = DEFAULT_SLOW_READER_TIMEOUT  # s held over budget, then cut
    names: Optional[NamesConfig] = None  # DNS for the kites (--dns, --dns-update): kite.names
    db: Optional[str] = None  # the account registry (SQLite file; kite accounts --db)
    signup_zone: Optional[str] = None  # kite relay --signup ZONE: POST /api/signup
    signup_quota: int = 2_500_000_000  # a new account's starter quota (bytes)
    signup_per_hour: int = 5  # sign-ups per client address and hour
    #: This relay's name in the account registry: it keys the relay's presence rows and its
    #: numbered usage flushes, so relays sharing one database need different ids.
    relay_id: Optional[str] = None  # None: "relay", or with --redis the host name
    acme: Optional[AcmeConfig] = None  # automatic certificates (--acme): kite.certs.acme
    # -- observability (kite.net.accesslog, kite.relay.admin) --
    access_log: Optional[str] = None  # "-" (stdout), a file, or None: no access log
    log_format: str = "text"  # access log lines: text or json
    admin: Optional[tuple] = None  # (host, port) of /metrics, /api/status and the dashboard
    admin_token: Optional[str] = None  # Bearer token the admin endpoint requires
    allow_plain: bool = False  # with a certificate: take unencrypted tunnels too (--allow-plain)
    error_pages: dict = field(default_factory=dict)  # page name (404, 403-quota) -> template


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


_RELAY_KEYS = {"listen", "tls_cert", "tls_key", "tls", "redirect_http", "hsts", "tls_names",
               "kite", "keepalive", "busy_poll", "zchunks",
               "secret_file", "db", "redis", "signup", "signup_quota", "signup_per_hour",
               "relay_id",
               "max_connections", "max_pending", "tunnel_reserve", "max_streams", "idle_timeout",
               "buffer_budget", "slow_reader_timeout", "access_log", "log_format", "admin",
               "admin_token_file", "allow_plain", "error_pages"}
#: Keys holding file names: relative to the config file's folder.
_PATH_KEYS = ("tls_cert", "tls_key", "secret_file", "db", "tsig_file", "error_pages",
              "admin_token_file")
_GRANT_KEYS = {"domain", "protos", "secret", "secret_file", "single", "redirect_http", "hsts"}


#: Every top-level key of a relay file.
RELAY_KEYS = frozenset(_RELAY_KEYS | NAMES_KEYS | ACME_KEYS)

#: The pages ``--error-pages DIR`` may replace (``NAME.html``); see docs/config.md.
ERROR_PAGE_NAMES = ("400", "403", "403-quota", "403-nodays", "403-unauthorized", "403-limits",
                    "404", "502", "503")
#: Bound on one page template, in bytes.
MAX_ERROR_PAGE = 65536


def load_error_pages(directory: str) -> dict:
    """The templates in ``directory`` (``404.html``, ...): name -> text.  Missing files are
    left out (the built-in page is used); other files are ignored.  An unreadable folder, a
    page that is not UTF-8 or larger than MAX_ERROR_PAGE is a ConfigError."""
    if not os.path.isdir(directory):
        raise ConfigError("error_pages", f"{directory!r} is not a folder",
                          "give a folder with files such as 404.html and 503.html")
    pages = {}
    for name in ERROR_PAGE_NAMES:
        path = os.path.join(directory, f"{name}.html")
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_ERROR_PAGE + 1)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError("error_pages", f"cannot read {path!r}: {exc.strerror or exc}",
                              "make the page readable") from None
        if len(raw) > MAX_ERROR_PAGE:
            raise ConfigError("error_pages", f"{path!r} is larger than {MAX_ERROR_PAGE} bytes",
                              "keep pages small (link to images, do not inline them)")
        try:
            pages[name] = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError("error_pages", f"{path!r} is not UTF-8 text",
                              "save it as UTF-8") from None
    return pages


def _strings(value: object, key: str, example: str) -> list:
    """A TOML list of strings (a single string counts as a list of one)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, f"expected a list of strings, got {value!r}", f"e.g. {example}")
    return list(value)


def _path(value: object, key: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"expected a file name, got {value!r}", "quote it")
    return value


def _relay_name(value: str, key: str) -> str:
    """A name that means the relay itself (SNI): a DNS name, wildcard, or an IP address."""
    name = value.strip().lower().rstrip(".")
    if valid_domain(name):
        return name
    try:
        ipaddress.ip_address(name)
    except ValueError:
        raise ConfigError(key, f"bad name {value!r}", "give a DNS name like relay.example.com") from None
    return name


#: A relay id: 1-64 letters, digits, '.', '_' or '-', starting with a letter or a digit.
_RELAY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_relay_id(value: object, key: str) -> str:
    """A relay id (see RelayConfig.relay_id); anything else is a ConfigError."""
    if not isinstance(value, str) or not _RELAY_ID.fullmatch(value):
        shown = value if isinstance(value, str) and value.isprintable() else "that value"
        raise ConfigError(key, f"bad relay id {shown!r}",
                          "use 1-64 letters, digits, '.', '_' or '-', e.g. relay-eu1")
    return value


def _tls_pairs(certs: Sequence[str], keys: Sequence[str], data: dict) -> list:
    """The (cert, key) pairs: the options' (``--tls-cert``/``--tls-key`` in pairs), else the
    file's ``tls_cert``/``tls_key`` then its ``[[tls]]`` tables."""
    if len(certs) != len(keys):
        raise ConfigError("--tls-cert/--tls-key", f"{len(certs)} certificate(s) but "
                          f"{len(keys)} key(s)", "give them in pairs: --tls-cert C --tls-key K")
    pairs = list(zip(certs, keys, strict=True))
    if pairs:
        return pairs
    cert, key = _path(data.get("tls_cert"), "tls_cert"), _path(data.get("tls_key"), "tls_key")
    if bool(cert) != bool(key):
        raise ConfigError("tls_cert/tls_key", "give both or neither",
                          "`kite init relay` writes relay.crt and relay.key")
    if cert and key:
        pairs.append((cert, key))
    for i, t in enumerate(tables(data, "tls")):
        where = f"tls[{i}]"
        check_keys(t, {"cert", "key"}, where)
        cert, key = _path(t.get("cert"), f"{where}.cert"), _path(t.get("key"), f"{where}.key")
        if not cert or not key:
            raise ConfigError(where, "needs cert and key",
                              'e.g. cert = "wild.crt", key = "wild.key"')
        pairs.append((cert, key))
    return pairs


def _hsts(value: object, key: str) -> int:
    """A Strict-Transport-Security max-age in seconds."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10 ** 9:
        raise ConfigError(key, f"bad value {value!r}",
                          "seconds browsers keep to https, e.g. 31536000 (a year)")
    return value


def _seq(value) -> list:
    """An option given once (a string) or repeated (a sequence)."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def build_relay_config(*, config_file: Optional[str] = None, listen: Sequence[str] = (),
                       tls_cert=None, tls_key=None, redirect_http: bool = False,
                       hsts: Optional[int] = None,
                       tls_names: Sequence[str] = (), kites: Sequence[str] = (),
                       single: Sequence[str] = (), keepalive: float = 30.0,
                       busy_poll: Optional[int] = None,
                       zchunks: bool = False, drain_timeout: float = 10.0,
                       limits: Optional[dict] = None,
                       secret_file: Optional[str] = None,
                       dns_options: Optional[dict] = None,
                       db: Optional[str] = None, signup: Optional[str] = None,
                       signup_quota: Optional[str] = None,
                       redis: Optional[str] = None,
                       relay_id: Optional[str] = None,
                       acme_options: Optional[dict] = None,
                       observe: Optional[dict] = None, allow_plain: bool = False,
                       error_pages: Optional[str] = None) -> RelayConfig:
    """Validate the options and the TOML file (options win) into a RelayConfig.

    A grant's secret comes from ``PROTO:DOMAIN:SECRET``, or, for ``PROTO:DOMAIN`` and a
    ``[[kite]]`` without ``secret``/``secret_file``, from ``secret_file`` (the option, else
    the file's top-level key) or the ``KITE_SECRET`` environment variable.
    """
    grants = GrantTable()
    listen_option = listen
    listen = list(listen)
    names = [_relay_name(n, "--tls-name") for n in tls_names]
    single_set = set()
    redirect_kites: set = set()
    hsts_kites: dict = {}
    for s in single:
        domain = s.lower().rstrip(".")
        if not valid_domain(domain):
            raise ConfigError("--single", f"bad kite name {s!r}", "give a DNS name or *.parent")
        single_set.add(domain)
    keepalive = check_keepalive(keepalive, "--keepalive")
    drain_timeout = check_seconds(drain_timeout, "--drain-timeout", low=0, high=3600)
    data: dict = {}
    per_hour: object = 5
    if config_file:
        data = load_toml(config_file)
        check_keys(data, RELAY_KEYS, "")
        resolve_paths(data, _PATH_KEYS, config_dir(config_file))
        for t in data.get("tls", []) if isinstance(data.get("tls"), list) else []:
            if isinstance(t, dict):
                resolve_paths(t, ("cert", "key"), config_dir(config_file))
    if secret_file is None:
        secret_file = _path(data.get("secret_file"), "secret_file")
    default_secret = (read_secret_file(secret_file, "--secret-file") if secret_file
                      else os.environ.get("KITE_SECRET") or None)
    if data:
        if not listen:
            listen = _strings(data.get("listen", []), "listen", 'listen = ["0.0.0.0:443"]')
        redirect_http = redirect_http or check_bool(data.get("redirect_http", False),
                                                    "redirect_http")
        if hsts is None:
            hsts = data.get("hsts")
        names += [_relay_name(n, "tls_names") for n in
                  _strings(data.get("tls_names", []), "tls_names", 'tls_names = ["relay.example.com"]')]
        if "keepalive" in data:
            keepalive = check_keepalive(data["keepalive"], "keepalive")
        zchunks = zchunks or check_bool(data.get("zchunks", False), "zchunks")
        db = db or _path(data.get("db"), "db")
        redis = redis or _path(data.get("redis"), "redis")
        signup = signup or data.get("signup")
        signup_quota = signup_quota or data.get("signup_quota")
        per_hour = data.get("signup_per_hour", 5)
        if relay_id is None and "relay_id" in data:
            relay_id = check_relay_id(data["relay_id"], "relay_id")
        allow_plain = allow_plain or check_bool(data.get("allow_plain", False), "allow_plain")
        error_pages = error_pages or _path(data.get("error_pages"), "error_pages")
        for i, k in enumerate(tables(data, "kite")):
            where = f"kite[{i}]"
            check_keys(k, _GRANT_KEYS, where)
            resolve_paths(k, ("secret_file",), config_dir(config_file or "."))
            if "domain" not in k:
                raise ConfigError(where, "needs domain, and secret or secret_file",
                                  "e.g. domain = \"*.example.com\", secret_file = \"kite.secret\"")
            if not isinstance(k["domain"], str):
                raise ConfigError(f"{where}.domain", f"expected a string, got {k['domain']!r}",
                                  "quote it")
            protos = ",".join(_strings(k.get("protos", "*"), f"{where}.protos",
                                       'protos = ["http", "raw-22"] or "*"'))
            secret = pick_secret(k.get("secret"), k.get("secret_file"), key=f"{where}.secret",
                                 file_key=f"{where}.secret_file") or default_secret
            if not secret:
                raise ConfigError(where, "needs secret or secret_file",
                                  "e.g. secret_file = \"kite.secret\" (or --secret-file, KITE_SECRET)")
            g = parse_grant(f"{protos}:{k['domain']}:{secret}", key=where)
            if check_bool(k.get("single", False), f"{where}.single"):
                single_set.add(g.domain)
            if check_bool(k.get("redirect_http", False), f"{where}.redirect_http"):
                redirect_kites.add(g.domain)
            if "hsts" in k:
                hsts_kites[g.domain] = _hsts(k["hsts"], f"{where}.hsts")
            grants.add(g)
    listen_key = "--listen" if list(listen_option) else "listen"
    addrs = [parse_hostport(v, key=listen_key, default_host="0.0.0.0")
             for v in listen or ["0.0.0.0:443"]]
    for value in kites:
        grants.add(parse_grant(value, key="--kite", default_secret=default_secret))
    db = _registry(db, redis)
    if not len(grants) and not db:
        raise ConfigError("--kite", "no kites are allowed on this relay",
                          "add --kite 'PROTO:DOMAIN' with --secret-file FILE (or [[kite]] in "
                          "the config, or --db with accounts)")
    for g in grants:
        warn_short_secret(g.secret, f"kite {g.domain}")
    extra = _signup_options(db, signup, signup_quota, per_hour)
    extra["relay_id"] = check_relay_id(relay_id, "--relay-id") if relay_id is not None else None
    pairs = _tls_pairs(_seq(tls_cert), _seq(tls_key), data)
    for pair in pairs:
        for p in pair:
            if not os.path.exists(p):
                raise ConfigError("--tls-cert/--tls-key", f"no such file {p!r}", "check the path")
    if pairs and not names:
        names = _cert_names(pairs[0][0])  # the first certificate's names mean the relay
    hsts = _hsts(hsts, "hsts") if hsts is not None else None
    first = pairs[0] if pairs else (None, None)
    names_cfg = build_names_config(data, dns_options)
    acme = build_acme_config(data, acme_options, zone=names_cfg.zone if names_cfg else None,
                             dns_served=bool(names_cfg and names_cfg.listen), db=db)
    if acme is not None and acme.zone and names_cfg is not None:
        # The relay's names in the zone (its NS names, default relay.ZONE) name the relay:
        # the ACME certificate (*.ZONE) covers them.
        for n in names_cfg.ns_names or [f"relay.{acme.zone}"]:
            if n.endswith("." + acme.zone) and n not in names:
                names.append(n)
    cfg = RelayConfig(listen=addrs, grants=grants, tls_cert=first[0], tls_key=first[1],
                      tls_pairs=pairs, redirect_http=redirect_http, hsts=hsts,
                      redirect_kites=redirect_kites, hsts_kites=hsts_kites, tls_names=names,
                      keepalive=keepalive or None, zchunks=zchunks,
                      drain_timeout=drain_timeout, single_backend=single_set,
                      names=names_cfg, db=db, acme=acme,
                      allow_plain=allow_plain,
                      error_pages=load_error_pages(error_pages) if error_pages else {}, **extra)
    if busy_poll is not None:
        cfg.busy_poll = check_busy_poll(busy_poll, "--busy-poll")
    elif "busy_poll" in data:
        cfg.busy_poll = check_busy_poll(data["busy_poll"], "busy_poll")
    _apply_limits(cfg, data, limits or {})
    _apply_observe(cfg, data, observe or {})
    return cfg


def _apply_observe(cfg: RelayConfig, data: dict, options: dict) -> None:
    """The access log and the admin endpoint: ``observe`` holds the options ``access_log``,
    ``log_format``, ``admin``, ``admin_token``, ``admin_token_file`` (None: unset; the
    TOML keys of the same name apply) and ``access_log_default`` (the CLI's ``-``)."""
    def pick(key):
        value = options.get(key)
        return data.get(key) if value is None else value

    access_log = pick("access_log") or options.get("access_log_default")
    if access_log is not None:
        if not isinstance(access_log, str) or not access_log:
            raise ConfigError("access_log", f"bad value {access_log!r}",
                              'a file name, "-" (standard output) or "off"')
        cfg.access_log = None if access_log == "off" else access_log
    fmt = pick("log_format")
    if fmt is not None:
        if fmt not in ("text", "json"):
            raise ConfigError("--log-format", f"bad value {fmt!r}", "text or json")
        cfg.log_format = fmt
    admin = pick("admin")
    if admin is None:
        return
    if not isinstance(admin, str):
        raise ConfigError("admin", f"bad value {admin!r}", 'e.g. admin = "127.0.0.1:4041"')
    if admin.startswith(":"):
        admin = "127.0.0.1" + admin
    host, port = parse_hostport(admin, key="--admin", default_host="127.0.0.1")
    token = options.get("admin_token")
    token_file = options.get("admin_token_file") or _path(data.get("admin_token_file"),
                                                          "admin_token_file")
    if token is None and token_file:
        token = read_secret_file(token_file, "--admin-token-file")
    if not is_loopback(host) and not token:
        raise ConfigError("--admin", f"{host} is not a loopback address and no token is set",
                          "add --admin-token-file FILE (or --admin-token T), or listen on 127.0.0.1")
    import importlib.util

    missing = [m for m in ("aiohttp", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError("--admin", f"needs {' and '.join(missing)}, not installed",
                          "pip install 'kite-relay[admin]'")
    cfg.admin = (host, port)
    cfg.admin_token = token or None



# -- connection and stream limits: TOML key -> (type, minimum) ----------------------------------
#: Options win over TOML keys; 0 means "no limit" for idle_timeout and buffer_budget (MiB).
LIMIT_KEYS = {
    "max_connections": (int, 1),
    "max_pending": (int, 1),
    "tunnel_reserve": (int, 0),
    "max_streams": (int, 1),
    "idle_timeout": (float, 0),
    "buffer_budget": (int, 0),  # MiB
    "slow_reader_timeout": (float, 0),
}


def _apply_limits(cfg: RelayConfig, data: dict, options: dict) -> None:
    for key, (kind, low) in LIMIT_KEYS.items():
        value = options.get(key)
        if value is None:
            value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (kind is int and not isinstance(value, int)) or value < low:
            raise ConfigError(key, f"bad value {value!r}",
                              f"a {'whole ' if kind is int else ''}number >= {low}")
        if key == "buffer_budget":
            cfg.buffer_budget = int(value) * 1024 * 1024 or None
        elif key == "idle_timeout":
            cfg.idle_timeout = float(value) or None
        else:
            setattr(cfg, key, kind(value))
    if cfg.tunnel_reserve is not None and cfg.max_connections is not None \
            and cfg.tunnel_reserve >= cfg.max_connections:
        raise ConfigError("tunnel_reserve", f"{cfg.tunnel_reserve} leaves visitors none of "
                          f"max_connections ({cfg.max_connections})",
                          "a number below max_connections")


def _registry(db: Optional[str], redis: Optional[str]) -> Optional[str]:
    """The registry's location: the SQLite file, or the Redis URL a fleet shares."""
    from ..store.opener import is_redis_url

    if db and redis:
        raise ConfigError("--redis", "--db and --redis name two registries", "give one")
    if redis and not is_redis_url(redis):
        raise ConfigError("--redis", f"bad URL {redis!r}", "use redis://HOST:PORT/DB")
    if db and is_redis_url(db):
        raise ConfigError("--db", f"{db!r} is a Redis URL", "give it as --redis")
    return redis or db


def _signup_options(db, zone, quota, per_hour) -> dict:
    if not zone:
        return {}
    from ..errors import StoreError
    from ..store import check_name, parse_size

    if not db:
        raise ConfigError("--signup", "sign-up needs the account registry", "add --db FILE (or --redis URL)")
    if isinstance(per_hour, bool) or not isinstance(per_hour, int) or not 0 < per_hour <= 10000:
        raise ConfigError("signup_per_hour", f"bad value {per_hour!r}", "a whole number 1-10000")
    try:
        zone = check_name(str(zone))
        quota_bytes = parse_size(str(quota)) if quota is not None else 2_500_000_000
    except StoreError as exc:
        raise ConfigError("--signup", str(exc)) from None
    if zone.startswith("*."):
        raise ConfigError("--signup", f"zone {zone!r} is a wildcard", "give the zone's name")
    return {"signup_zone": zone, "signup_quota": quota_bytes, "signup_per_hour": per_hour}
