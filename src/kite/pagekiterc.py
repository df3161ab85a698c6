"""A kite TOML config from a pagekite.py rc file (``kite import-pagekiterc``).

pagekite.py reads ``~/.pagekite.rc`` (or ``--optfile``) as command-line options, one per
line, without the leading ``--`` (``service_on = http:foo.example.com:localhost:80:SECRET``),
``#`` comments, and ``END`` to stop.  This module reads such a file the way pagekite.py 1.5.2
does (``ConfigureFromFile``: spaces around ``=`` and ``:`` are dropped, ``@kitename`` /
``@kitesecret`` are substituted in order) and writes the equivalent kite config:

* a **backend** rc (``service_on``/``backend`` lines, ``frontend``...) becomes a
  ``kite expose --config`` file: one ``[[relay]]`` per ``frontend``, one ``[[kite]]`` per
  kite, with the secrets;
* a **frontend** rc (``isfrontend``) becomes a ``kite relay --config`` file: ``listen``
  from ``host``/``ports``, ``[[kite]]`` grants from ``domain``, the certificate from
  ``tls_endpoint``.

Nothing is dropped silently: every line is either converted, or reported - on stderr and
as a comment at the end of the output - as ignored (no kite equivalent needed, with the
kite way to do it) or not converted (with the reason).  ``--strict`` turns anything not
converted into exit status 2.

The reference for what each pagekite.py option means is docs/protocol.md and
docs/migrating-from-pagekite.md.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from .config import MAX_KEEPALIVE, MIN_KEEPALIVE
from .errors import ConfigError
from .proto.names import KITE_PROTOS

__all__ = ["RcLine", "Report", "read_rc", "convert", "import_rc", "RUN_WITH"]

#: pagekite.py options that kite does not need: the process, its UI and its log.  Each maps
#: to a hint shown in the report.
IGNORED = {
    "clean": "kite reads only the files you give it",
    "nocrashreport": "kite sends no reports",
    "noproxy": "kite connects directly (no http_proxy / SOCKS support)",
    "nullui": "kite has no interactive UI",
    "remoteui": "kite has no interactive UI",
    "friendly": "kite has no interactive UI",
    "logfile": "kite logs to stderr: let systemd/your supervisor keep it",
    "loglevel": "use kite -v (debug) or -q (warnings only)",
    "debugio": "use kite -v",
    "daemonize": "run kite under systemd or another supervisor",
    "nodaemonize": "kite always runs in the foreground",
    "pidfile": "run kite under systemd or another supervisor",
    "runas": "run kite under systemd with User= (or your supervisor's equivalent)",
    "savefile": "kite never rewrites its config",
    "autosave": "kite never rewrites its config",
    "noautosave": "kite never rewrites its config",
    "save": "kite never rewrites its config",
    "settings": "kite never rewrites its config",
    "shell": "kite has no interactive shell",
    "noloop": "not needed",
    "nopyopenssl": "kite uses Python's ssl module",
    "watch": "use kite -v",
    "watchdog": "run kite under systemd (WatchdogSec / Restart=)",
    "buffers": "kite bounds its buffers by flow control",
    "max_read_bytes": "kite reads in larger pieces and never needs tuning here",
    "select_loop_min_ms": "kite has no polling loop to tune",
    "sslzlib": "TLS compression is insecure; kite never uses it",
    "noprobes": "kite answers no probe requests",
    "nozchunks": "kite backends ask for ZChunks only with zchunks = true",
    "all": "kite flies every kite in its config",
    "noall": "kite flies every kite in its config",
    "new": "not needed",
    "list": "not needed",
    "insecure": "kite has no path filter to switch off (nothing to do)",
}

#: pagekite.py options kite has no equivalent for (the reason is shown).
UNSUPPORTED = {
    "defaults": "pagekite.net's service (DNS-chosen frontends, dynamic DNS) - give your own "
                "relay (frontend = HOST:PORT); kite relays have their own name service",
    "whitelabel": "pagekite.net white-label service - give your own relay",
    "whitelabels": "pagekite.net white-label service - give your own relay",
    "signup": "pagekite.net account sign-up",
    "register": "pagekite.net account sign-up",
    "dyndns": "dynamic DNS updates - kite relays answer DNS for their kites themselves",
    "service_xmlrpc": "pagekite.net XML-RPC",
    "controlpanel": "pagekite.py's web UI",
    "controlpass": "pagekite.py's web UI",
    "httpd": "pagekite.py's built-in HTTP server - run a web server of your own",
    "httppass": "pagekite.py's built-in HTTP server",
    "pemfile": "pagekite.py's built-in HTTP server",
    "selfsign": "pagekite.py's built-in HTTP server; `kite init` writes certificates",
    "webpath": "pagekite.py's built-in HTTP server - run a web server of your own",
    "webroot": "pagekite.py's built-in HTTP server - run a web server of your own",
    "webaccess": "pagekite.py's built-in HTTP server",
    "webindexes": "pagekite.py's built-in HTTP server",
    "uiport": "pagekite.py's web UI",
    "errorurl": "kite relays serve their own error pages; your own: error_pages = \"DIR\" "
                "(templates, docs/config.md)",
    "torify": "kite does not tunnel through Tor/SOCKS",
    "socksify": "kite does not tunnel through Tor/SOCKS",
    "proxy": "kite does not use proxies to reach the relay",
    "wschunks": "WebSocket-framed tunnels (broken in pagekite.py 1.5.2); kite tunnels are "
                "plain or TLS",
    "local": "pagekite.py's local-only mode - run the local server directly",
    "authdomain": "DNS-based remote kite authorisation - list the kites in the relay config",
    "authfail_closed": "DNS-based remote kite authorisation",
    "auththreads": "kite authorises in-process",
    "motd": "messages of the day",
    "upgradeinfo": "upgrade notices",
    "noupgradeinfo": "upgrade notices",
    "ratelimit_ips": "per-IP rate limits",
    "tunnel_acl": "IP ACLs for tunnels - use a firewall",
    "client_acl": "IP ACLs for visitors - use a firewall",
    "accept_acl_file": "IP ACLs - use a firewall",
    "portalias": "port aliases - listen on the ports directly",
    "overload": "overload shedding",
    "overload_cpu": "overload shedding",
    "overload_mem": "overload shedding",
    "overload_file": "overload shedding",
    "tls_legacy": "TLS before 1.2",
    "nofrontend": "kite only uses the relays you list",
    "optfile": "included files are not followed - convert that file as well",
    "optdir": "included directories are not followed - convert those files as well",
    "reloadfile": "included files are not followed - convert that file as well",
    "delete_backend": "deprecated",
}

#: Kite protocols kite flies; anything else in a service_on line is reported.
_DEFAULT_BE_PORT = {"http": 80, "websocket": 80, "https": 443, "raw": None}
_PAGEKITE_FE_PROTOS = ["http", "http2", "http3", "https", "websocket", "irc", "finger",
                       "httpfinger", "raw", "minecraft"]


@dataclass
class RcLine:
    number: int
    text: str  # the line as written (stripped)
    option: str
    value: Optional[str]  # None for flags


@dataclass
class Report:
    """What happened to each line that was not simply converted."""

    ignored: list = field(default_factory=list)  # (RcLine, hint)
    unconverted: list = field(default_factory=list)  # (RcLine, reason)
    notes: list = field(default_factory=list)  # (RcLine or None, text): converted, but mind this

    def lines(self) -> list:
        """One line per report, in file order: NOT converted / ignored / note."""
        items = [(ln.number, f"line {ln.number}: {ln.text!r}: NOT converted: {reason}")
                 if ln.number else (1 << 30, f"NOT converted: {reason}")
                 for ln, reason in self.unconverted]
        items += [(ln.number, f"line {ln.number}: {ln.text!r}: ignored: {hint}")
                  for ln, hint in self.ignored]
        items += [(ln.number, f"line {ln.number}: {ln.text!r}: note: {text}")
                  if ln is not None else (1 << 30, f"note: {text}")
                  for ln, text in self.notes]
        # Reasons quote values from the file: escape what a terminal or a TOML comment
        # must not get raw.
        return [_escaped(text) for _, text in sorted(items, key=lambda i: i[0])]


def read_rc(text: str) -> list:
    """The option lines of an rc file, as pagekite.py's ``ConfigureFromFile`` sees them."""
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("END"):
            break
        norm = re.sub(r"\s*:\s*", ":", re.sub(r"\s*=\s*", "=", line)).lstrip("-")
        if "=" in norm:
            option, value = norm.split("=", 1)
        else:
            option, value = norm, None
        out.append(RcLine(number, line, option.strip().lower(), value))
    return out


def _mask(ln: RcLine, secrets) -> RcLine:
    text = ln.text
    for s in secrets:
        if s:
            text = text.replace(s, "********")
    return RcLine(ln.number, text, ln.option, ln.value)


# Characters TOML refuses anywhere outside escapes (comments included): C0 but HTAB and LF, DEL.
_TOML_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _escaped(text: str) -> str:
    """``text`` with every non-printable character written as a Python escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _q(s: str) -> str:
    """A TOML basic string (JSON escapes are valid TOML; TOML also wants DEL escaped)."""
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


# -- backend ------------------------------------------------------------------------------------
@dataclass
class _Kite:
    name: str
    proto: str  # http, https, raw, websocket
    public_port: Optional[int]
    host: str
    port: int
    secret: str
    line: RcLine
    enabled: bool = True
    options: dict = field(default_factory=dict)


def _digits(text: str) -> bool:
    """ASCII decimal digits only (``str.isdigit`` also takes ``²``, which int() refuses)."""
    return text.isascii() and text.isdigit()


def _keepalive(val: Optional[str], ln: RcLine, report: Report, old):
    try:
        keepalive = float(val or "")
    except ValueError:
        keepalive = -1.0
    if not (keepalive == 0 or MIN_KEEPALIVE <= keepalive <= MAX_KEEPALIVE):  # also nan
        report.unconverted.append((ln, f"keepalive must be {MIN_KEEPALIVE:g} to "
                                       f"{MAX_KEEPALIVE:g} seconds, or 0"))
        return old
    return keepalive


def _parse_service(value: str, kitename: str, kitesecret: str, ln: RcLine, report: Report):
    """``PROTOS:DOMAIN:HOST:PORT:SECRET`` and pagekite.py's shorter forms -> kites."""
    value = value.replace("@kitesecret", kitesecret).replace("@kitename", kitename)
    parts = value.split(":")
    protos = host = port = ""
    secret = ""
    if len(parts) == 5:
        protos, domain, host, port, secret = parts
    elif len(parts) == 4:
        protos, domain, host, port = parts
    elif len(parts) == 3:
        protos, domain, port = parts
    elif len(parts) == 2 and _digits(parts[1]):
        domain, port, protos = parts[0], parts[1], "http"
    else:
        report.unconverted.append((ln, "expected PROTO:KITENAME:HOST:PORT:SECRET"))
        return []
    domain = domain.replace("/", "").lower()
    secret = secret or kitesecret
    host = (host or "localhost").lower()
    if port == "builtin":
        report.unconverted.append((ln, "pagekite.py's built-in HTTP server: run a web server "
                                       "of your own and point the kite at it"))
        return []
    kites = []
    for proto in (protos or "http").replace("/", "-").lower().split(","):
        public = None
        if proto == "ssh":
            proto, public = "raw", 22
        elif "-" in proto:
            proto, _, p = proto.partition("-")
            if not _digits(p):
                report.unconverted.append((ln, f"bad kite protocol {proto}-{p}"))
                continue
            public = int(p)
        if proto not in KITE_PROTOS:
            report.unconverted.append((ln, f"kite protocol {proto!r}: kite flies http, https, "
                                           "raw-PORT (ssh) and websocket kites"))
            continue
        try:
            bport = int(port) if port else _DEFAULT_BE_PORT[proto]
        except ValueError:
            report.unconverted.append((ln, f"bad port {port!r}"))
            continue
        if bport is None:
            bport = public
        if proto == "raw" and public is None:
            public = bport
            report.notes.append((ln, f"a raw kite for any port becomes raw-{public} (visitors "
                                     f"CONNECT {domain}:{public}); add more kites for other "
                                     "ports"))
        if proto in ("http", "https") and public is not None:
            report.notes.append((ln, f"{proto}-{public}: kite registers {proto} kites for every "
                                     f"public port, not only {public}"))
            public = None
        if proto == "websocket":
            report.notes.append((ln, "websocket kite becomes an http kite: kite's http kites "
                                     "carry WebSocket upgrades"))
            proto = "http"
        if not secret:
            report.unconverted.append((ln, "no secret (and no kitesecret before this line)"))
            continue
        if bport is None:
            report.unconverted.append((ln, "no local port"))
            continue
        kites.append(_Kite(domain, proto, public, host, bport, secret, ln))
    return kites


def _add_password(kites: list, user: str, password: str, ln: RcLine, report: Report) -> None:
    """pagekite.py's ``password/USER`` (``user/USER``) kite option: basic auth on http kites
    (checked by kite on every request, pagekite.py checks the first one of a connection)."""
    if not kites:
        report.unconverted.append((ln, "no kite for this option: put it after a service_on line"))
        return
    if not user or ":" in user or not password or not f"{user}:{password}".isprintable():
        report.unconverted.append((ln, "expected password/USER:PASSWORD with a user name "
                                       "without ':' and a non-empty password"))
        return
    for k in kites:
        if k.proto == "http":
            k.options.setdefault("basic_auth", []).append(f"{user}:{password}")
        else:
            report.unconverted.append((ln, f"basic auth on a {k.proto} kite ({k.name}): "
                                           f"only http kites can have it"))


def _convert_backend(lines: list, report: Report, source: str) -> tuple[str, set[str]]:
    kitename = kitesecret = ""
    kites: list = []
    frontends: list = []  # (address, RcLine)
    fe_certnames: list = []
    ca_certs = None
    nocertcheck = False
    keepalive = None
    service_cfg: list = []  # (host, key, value, RcLine)
    secrets: set[str] = set()
    last_kites: list = []  # the kites of the latest service_on line (for +password/...)

    for ln in lines:
        opt, val = ln.option, ln.value
        if opt in ("kitename",):
            kitename = val or ""
        elif opt == "kitesecret":
            kitesecret = val or ""
            secrets.add(kitesecret)
        elif opt in ("service_on", "backend", "service_off", "define_backend"):
            new = _parse_service(val or "", kitename, kitesecret, ln, report)
            for k in new:
                secrets.add(k.secret)
                k.enabled = opt in ("service_on", "backend")
                if not kitename:
                    kitename, kitesecret = k.name, k.secret
            kites += new
            last_kites = new
        elif opt in ("service_cfg", "be_config"):
            parts = (val or "").split(":", 2)
            if len(parts) != 3:
                report.unconverted.append((ln, "expected KITENAME/PORT:KEY:VALUE"))
            else:
                service_cfg.append((parts[0].lower(), parts[1], parts[2], ln))
        elif opt == "frontend":
            frontends.append((val or "", ln))
        elif opt == "frontends":
            parts = (val or "").split(":")
            if len(parts) == 3 and _digits(parts[2]):
                frontends.append((f"{parts[1]}:{parts[2]}", ln))
                report.notes.append((ln, f"kite connects to {parts[1]} (its first address); it "
                                         f"does not pick the {parts[0]} fastest of several"))
            else:
                report.unconverted.append((ln, "expected N:DNSNAME:PORT"))
        elif opt == "fe_certname":
            if val:
                fe_certnames.append((val.lower(), ln))
            else:
                fe_certnames = []
        elif opt == "ca_certs":
            if val:
                ca_certs = (val, ln)
            else:
                report.unconverted.append((ln, "ca_certs needs a file name"))
        elif opt == "fe_nocertcheck":
            nocertcheck = True
            report.notes.append((ln, "TLS without checking the relay's certificate: written "
                                     "as insecure = true (better: ca = or fingerprint =).  "
                                     "pagekite.py 1.5.2 frontends crash on this kind of "
                                     "tunnel; use connect_name with them"))
        elif opt == "keepalive":
            keepalive = _keepalive(val, ln, report, keepalive)
        elif opt.startswith(("+password/", "+user/")):
            # pagekite.py's per-kite shorthand, for the kites of the service line before it.
            user, _, password = ln.text.partition("=")
            user = user.strip().partition("/")[2]
            password = password.strip()
            secrets.add(password)
            _add_password(last_kites, user, password, ln, report)
        elif opt in IGNORED:
            report.ignored.append((ln, IGNORED[opt]))
        elif opt in UNSUPPORTED:
            report.unconverted.append((ln, UNSUPPORTED[opt]))
        elif opt in ("isfrontend", "host", "ports", "protos", "rawports", "domain",
                     "tls_endpoint", "tls_default"):
            report.unconverted.append((ln, "a frontend option in a backend file"))
        else:
            report.unconverted.append((ln, "not a pagekite.py 1.5.2 option kite knows"))

    # service_cfg: per-kite options
    for host, key, value, ln in service_cfg:
        domain, _, port = host.partition("/")
        port_n = int(port) if _digits(port) else 80
        targets = [k for k in kites if k.name == domain
                   and ((k.public_port or 80) == port_n)]
        if not targets:
            report.unconverted.append((ln, f"no kite {host} in this file"))
            continue
        truthy = value not in ("False", "false", "0", "None", "")
        if key == "rawheaders":
            for k in targets:
                k.options["forwarded"] = not truthy
        elif key == "proxyproto":
            for k in targets:
                k.options["proxy_protocol"] = 1 if truthy else 0
                if k.proto == "http" and truthy:
                    k.options["forwarded"] = False
                    report.notes.append((ln, "an http kite with a PROXY header gets no "
                                             "X-Forwarded-* headers (forwarded = false)"))
        elif key == "insecure":
            report.ignored.append((ln, IGNORED["insecure"]))
        elif key == "rewritehost":
            report.unconverted.append((ln, "kite does not rewrite the Host header (it adds "
                                           "X-Forwarded-Host); configure the local server "
                                           "to accept the kite name"))
        elif key.startswith(("password/", "user/")):
            _add_password(targets, key.partition("/")[2], value, ln, report)
            secrets.add(value)
        elif key.startswith("ip/"):
            report.unconverted.append((ln, "per-visitor-IP access control: use the relay's "
                                           "per-kite allow list (kite accounts limits)"))
        else:
            report.unconverted.append((ln, f"unknown kite option {key!r}"))

    out = [f"# kite expose config, converted from {source} by `kite import-pagekiterc`.",
           "# Run it with:  kite expose --config THIS-FILE",
           "# It holds the kites' secrets: keep it private (mode 0600).", ""]
    if keepalive is not None:
        out.append(f"keepalive = {keepalive:g}")
    enabled = [k for k in kites if k.enabled]
    common_secret = None
    if enabled and len({k.secret for k in enabled}) == 1:
        common_secret = enabled[0].secret
        out += ["[defaults]", f"secret = {_q(common_secret)}", ""]
    elif keepalive is not None:
        out.append("")

    tls_lines: list = []
    if nocertcheck:
        tls_lines = ["insecure = true"]
    elif fe_certnames:
        name, ln = fe_certnames[0]
        tls_lines = [f"connect_name = {_q(name)}   # pagekite.py's fe_certname: CONNECT "
                     f"{name}:443, then TLS checked against {name}"]
        if len(fe_certnames) > 1:
            report.notes.append((fe_certnames[1][1], f"kite checks one name per relay: "
                                                     f"{name} is used"))
        if ca_certs:
            tls_lines.append(f"ca = {_q(ca_certs[0])}")
    else:
        tls_lines = ["plain = true   # pagekite.py's default: a plain TCP tunnel "
                     "(add connect_name + ca for TLS)",
                     "# a kite relay with a certificate takes plain tunnels only with "
                     "--allow-plain"]
        if ca_certs:
            report.ignored.append((ca_certs[1], "ca_certs without fe_certname: the tunnel is "
                                                "plain TCP"))
    if not frontends:
        report.unconverted.append((RcLine(0, "(no frontend line)", "", None),
                                   "no relay to fly on: add a [[relay]] table with "
                                   "address = \"HOST:PORT\""))
        out += ["# [[relay]]", "# address = \"RELAY-HOST:443\"", ""]
    for addr, _ln in frontends:
        if ":" not in addr:
            addr = f"{addr}:443"
        out += ["[[relay]]", f"address = {_q(addr)}", *tls_lines, ""]

    for k in kites:
        prefix = "" if k.enabled else "# "
        if not k.enabled:
            report.notes.append((k.line, "disabled (service_off): written commented out"))
        scheme = {"http": "http", "https": "https", "raw": "tcp"}[k.proto]
        host = f"[{k.host}]" if ":" in k.host else k.host
        target = f"{scheme}://{host}:{k.port}"
        block = ["[[kite]]", f"name = {_q(k.name)}", f"target = {_q(target)}"]
        if k.proto == "raw":
            block.append(f"public_port = {k.public_port}")
        if common_secret is None or k.secret != common_secret:
            block.append(f"secret = {_q(k.secret)}")
        for key, value in k.options.items():
            if isinstance(value, list):
                value = "[" + ", ".join(_q(v) for v in value) + "]"
            block.append(f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
        out += [prefix + b if b else b for b in block] + [""]
    if not kites:
        report.unconverted.append((RcLine(0, "(no service_on line)", "", None),
                                   "no kites: add [[kite]] tables with name and target"))
    return "\n".join(out), secrets


# -- frontend -----------------------------------------------------------------------------------
def _convert_frontend(lines: list, report: Report, source: str) -> tuple[str, set[str]]:
    host = "0.0.0.0"
    ports: list = []
    protos = list(_PAGEKITE_FE_PROTOS)
    domains: list = []  # (protos, domain, secret, RcLine)
    endpoints: list = []  # (name, pem, RcLine)
    keepalive = None
    zchunks = True
    secrets: set[str] = set()
    for ln in lines:
        opt, val = ln.option, ln.value
        if opt == "isfrontend":
            continue
        if opt == "host":
            host = val or host
        elif opt == "ports":
            ports = [p for p in (val or "").split(",") if p]
        elif opt == "protos":
            protos = [p.strip().lower() for p in (val or "").split(",") if p.strip()]
        elif opt == "rawports":
            rp = [p for p in (val or "").split(",") if p]
            if any(p != "virtual" for p in rp):
                report.unconverted.append((ln, "raw listener ports (pagekite.py's \"SSH after "
                                               "HTTP\" trick): kite reaches raw kites with "
                                               "HTTP CONNECT on its own port(s) only"))
        elif opt == "domain":
            parts = (val or "").split(":")
            if len(parts) != 3:
                report.unconverted.append((ln, "expected PROTOS:DOMAIN:SECRET"))
                continue
            domains.append((parts[0], parts[1].lower(), parts[2], ln))
            secrets.add(parts[2])
        elif opt == "tls_endpoint":
            name, _, pem = (val or "").partition(":")
            endpoints.append((name.lower(), pem, ln))
        elif opt == "tls_default":
            report.notes.append((ln, "kite treats every TLS hello without SNI as a tunnel to "
                                     "the relay itself"))
        elif opt == "keepalive":
            keepalive = _keepalive(val, ln, report, keepalive)
        elif opt == "nozchunks":
            zchunks = False
        elif opt in IGNORED:
            report.ignored.append((ln, IGNORED[opt]))
        elif opt in UNSUPPORTED:
            report.unconverted.append((ln, UNSUPPORTED[opt]))
        else:
            report.unconverted.append((ln, "not a pagekite.py 1.5.2 frontend option kite "
                                           "knows"))
    out = [f"# kite relay config, converted from {source} by `kite import-pagekiterc`.",
           "# Run it with:  kite relay --config THIS-FILE",
           "# It holds the kites' secrets: keep it private (mode 0600).", ""]
    if not ports:
        report.notes.append((None, "no ports: pagekite.py needs --ports; listening on 443"))
        ports = ["443"]
    out.append("listen = [" + ", ".join(_q(f"{host}:{p}") for p in ports) + "]")
    if endpoints:
        name, pem, ln = endpoints[0]
        out += [f"tls_cert = {_q(pem)}   # pagekite.py's tls_endpoint PEM: key and certificate",
                f"tls_key = {_q(pem)}"]
        pems = {e[1] for e in endpoints}
        if len(pems) > 1:
            for _n, p, l2 in endpoints[1:]:
                if p != pem:
                    report.unconverted.append((l2, f"kite relays hold one certificate: {pem} "
                                                   "is used; put every name in it"))
        out.append("tls_names = [" + ", ".join(_q(e[0]) for e in endpoints
                                               if e[1] == pem) + "]")
        # pagekite.py frontends take plain tunnels beside TLS ones; a kite relay with a
        # certificate only when told: backends without --fe_certname tunnel in plain TCP.
        out.append("allow_plain = true   # pagekite.py backends without --fe_certname tunnel "
                   "in plain TCP; drop it once every backend uses TLS")
        report.notes.append((None, "allow_plain = true: the relay takes plain tunnels like "
                                   "pagekite.py did; remove it when every backend uses TLS"))
    if keepalive is not None:
        out.append(f"keepalive = {keepalive:g}")
    out.append(f"zchunks = {'true' if zchunks else 'false'}   # pagekite.py frontends ask "
               "backends to compress unless --nozchunks")
    out.append("")
    for p_s, domain, secret, ln in domains:
        want = protos if p_s in ("*", "") else [p.lower() for p in p_s.split(",")]
        keep = []
        for p in want:
            if p.split("-", 1)[0] in KITE_PROTOS:
                keep.append(p)
            elif p_s not in ("*", ""):
                report.unconverted.append((ln, f"kite protocol {p!r}: kite relays route "
                                               "http, https, raw and websocket"))
        if not keep:
            continue
        all_kite = sorted(set(keep)) == sorted(KITE_PROTOS)
        out += ["[[kite]]", f"domain = {_q(domain)}",
                "protos = " + ("\"*\"" if all_kite else "[" + ", ".join(_q(p) for p in keep)
                               + "]"),
                f"secret = {_q(secret)}", ""]
    if domains:
        report.notes.append((None, "pagekite.py frontends let one backend fly a kite at a time "
                                   "(Duplicate); kite relays balance several - add single = "
                                   "true to a [[kite]] for the old rule"))
    else:
        report.unconverted.append((RcLine(0, "(no domain line)", "", None),
                                   "no kites allowed: add [[kite]] tables with domain, protos "
                                   "and secret"))
    return "\n".join(out), secrets


def convert(text: str, source: str = "pagekite.rc") -> tuple:
    """``(kind, toml_text, report)`` for an rc file; kind is "backend" or "relay"."""
    lines = read_rc(text)
    report = Report()
    if any(ln.option == "isfrontend" for ln in lines):
        kind, (toml, secrets) = "relay", _convert_frontend(lines, report, source)
    else:
        kind, (toml, secrets) = "backend", _convert_backend(lines, report, source)
    # Reports go to terminals and logs: never with a secret in them.
    report.ignored = [(_mask(a, secrets), b) for a, b in report.ignored]
    report.unconverted = [(_mask(a, secrets), b) for a, b in report.unconverted]
    report.notes = [(_mask(a, secrets) if a else a, b) for a, b in report.notes]
    rep = report.lines()
    if rep:
        toml = toml.rstrip("\n") + "\n\n# Not converted from " + source + " (kite " \
            "import-pagekiterc):\n" + "".join(f"#   {r}\n" for r in rep)
    # Comments quote values from the rc file; TOML allows no control characters there.
    toml = _TOML_CONTROL.sub(lambda m: repr(m.group())[1:-1], toml)
    return kind, toml.rstrip("\n") + "\n", report


#: How to run a converted config of each kind.
RUN_WITH = {"backend": "kite expose --config", "relay": "kite relay --config"}


def import_rc(rcfile: Optional[str] = None, output: Optional[str] = None, *,
              force: bool = False) -> tuple:
    """Convert the rc file ``rcfile`` (default ``~/.pagekite.rc``): ``(kind, toml, report)``.

    With ``output`` the TOML is also written there, mode 0600 (it holds the secrets), over an
    existing file only with ``force``.  ConfigError when the rc file cannot be read or
    ``output`` exists.
    """
    path = rcfile or os.path.expanduser("~/.pagekite.rc")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        # open() sets strerror from errno; str(exc) only if some OSError ever lacks it
        raise ConfigError(path, exc.strerror or str(exc),
                          "give the pagekite.py rc file, e.g. ~/.pagekite.rc") from None
    kind, toml, report = convert(text, source=path)
    if output:
        if os.path.exists(output) and not force:
            raise ConfigError(output, "exists", "use --force to overwrite")
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(toml)
    return kind, toml, report
