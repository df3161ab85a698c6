"""The addresses visitors use to reach a flying kite, as ``kite expose`` prints them.

What the relay's handshake tells (docs/protocol.md §2): ``X-PageKite-Ports``, the ports it
takes visitors on (every kite relay port takes HTTP, TLS and CONNECT alike), and
``X-PageKite-SSL-OK`` per http kite whose TLS the relay itself terminates (pagekite.py's
``--tls_endpoint``).  From that:

* an ``http`` kite: ``http://NAME/`` (``:PORT`` unless the relay takes port 80), and
  ``https://NAME/`` as well when the relay said SSL-OK for it;
* an ``https`` kite (TLS passed through): ``https://NAME/`` (``:PORT`` unless 443);
* a ``raw-PORT`` kite: reached by CONNECT through the relay's own address; port 22 is shown
  as the ``ssh`` line with ``kite connect`` as its ProxyCommand, any other port as the
  ``kite forward`` line that gives it a local port.

A relay that lists no ports (a pagekite.py frontend may not) is taken to serve visitors on
the port the tunnel reached it on.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable, Sequence

from ..config import KiteSpec, RelaySpec
from ..proto.names import bare_proto

__all__ = ["visitor_urls"]


def _ports(advertised: Sequence[str], relay_port: int) -> list[int]:
    out = []
    for p in advertised:
        p = p.strip()
        if p.isdigit() and 0 < int(p) < 65536:
            out.append(int(p))
    return out or [relay_port]


def _web_url(scheme: str, name: str, ports: list[int], relay_port: int) -> str:
    default = 80 if scheme == "http" else 443
    if default in ports:
        return f"{scheme}://{name}/"
    port = relay_port if relay_port in ports else ports[0]
    return f"{scheme}://{name}:{port}/"


def _tls_args(relay: RelaySpec) -> list[str]:
    """``kite connect``'s options that check the relay as this tunnel does."""
    if relay.plain:
        return []
    args = ["--tls"]
    if relay.fingerprint:
        args += ["--fingerprint", relay.fingerprint]
    elif relay.insecure:
        args.append("--insecure")
    elif relay.ca:
        args += ["--ca", os.path.abspath(relay.ca)]  # ssh runs it from any directory
    if relay.server_name:
        args += ["--server-name", relay.server_name]
    return args


def _raw_line(name: str, port: int, relay: RelaySpec) -> str:
    tail = [*_tls_args(relay)]
    if port == 22:
        proxy = " ".join(["kite", "connect", "%h", "%p", "--relay", shlex.quote(relay.address),
                          *(shlex.quote(a) for a in tail)])
        return f"ssh -o ProxyCommand={shlex.quote(proxy)} user@{name}"
    args = ["kite", "forward", f"127.0.0.1:{port}", f"{name}:{port}", "--relay", relay.address,
            *tail]
    return " ".join(shlex.quote(a) for a in args)


def visitor_urls(kite: KiteSpec, relay: RelaySpec, *, ports: Sequence[str] = (),
                 ssl_ok: bool = False) -> list[str]:
    """The lines that reach ``kite`` through ``relay``: URLs, or a command for raw kites.

    ``ports`` is the relay's ``X-PageKite-Ports``; ``ssl_ok`` whether it sent
    ``X-PageKite-SSL-OK`` for this kite.  Wildcard kites show their pattern as it is.
    """
    name = kite.domain
    listed = _ports(ports, relay.port)
    proto = bare_proto(kite.proto)
    if proto in ("http", "websocket"):
        urls = [_web_url("http", name, listed, relay.port)]
        if ssl_ok:
            urls.append(_web_url("https", name, listed, relay.port))
        return urls
    if proto == "https":
        return [_web_url("https", name, listed, relay.port)]
    if proto == "raw":
        _, _, port = kite.proto.partition("-")
        if port.isdigit():
            return [_raw_line(name, int(port), relay)]
    return []


def format_lines(lines: Iterable[str]) -> str:
    return "".join(f"{line}\n" for line in lines)
