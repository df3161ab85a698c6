"""The head one relay of a fleet sends another to hand it a visitor (sans-IO).

A visitor reached relay C, but the kite flies on relay A only (a stale DNS answer).  C opens
a TLS connection to A (A's certificate pinned by the fingerprint A published in the fleet's
Redis), sends this head and then the visitor's bytes as they come, and joins the two
connections; A treats what follows the head as a visitor of ``PROTO:HOST`` from ``VISITOR``
(so the visitor's address is preserved, and A alone counts the bytes)::

    FLEET HOST KITE/1\\r\\n
    X-Kite-Fleet: SECRET\\r\\n
    X-Kite-Proto: http\\r\\n
    X-Kite-Port: 443\\r\\n
    X-Kite-Visitor: 198.51.100.7:52011\\r\\n
    \\r\\n

There is no answer head: A's first bytes are already the kite's (or its refusal page, which
C passes on to the visitor).  ``SECRET`` is the fleet's shared secret; it travels only
inside TLS to a pinned certificate.

A **link** carries many visitors over one such TLS connection: C sends ::

    FLEET-LINK KITE/1\r\n
    X-Kite-Fleet: SECRET\r\n
    \r\n

A answers ``KITE/1 200 Link`` and a blank line (or closes the connection: no link), and
from then on both sides speak chunks (kite.proto.control, a kite peer's flow control): C
opens one stream per visitor with the stream-open chunk (``Proto``, ``Host``, ``Port``, and
the visitor's address as ``RIP``/``RPort``), A takes each stream as a visitor from that
address, exactly as it takes the single visitor after a ``FLEET`` head.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ..errors import RemoteProtocolError
from .names import valid_domain, valid_proto

__all__ = ["FLEET_METHOD", "LINK_ANSWER", "LINK_METHOD", "ForwardHead", "build_forward_head",
           "build_link_head", "parse_forward_head", "parse_link_head"]

FLEET_METHOD = b"FLEET "
LINK_METHOD = b"FLEET-LINK "
LINK_ANSWER = b"KITE/1 200 Link\r\n\r\n"
_VERSION = "KITE/1"
_MAX_SECRET = 256


@dataclass(frozen=True)
class ForwardHead:
    host: str
    proto: str  # a kite protocol: http, https, websocket, raw (the bare name)
    port: int  # the public port the visitor used at the first relay
    visitor_ip: str
    visitor_port: int
    secret: str = field(repr=False)


def build_forward_head(head: ForwardHead) -> bytes:
    ip = head.visitor_ip
    where = f"[{ip}]:{head.visitor_port}" if ":" in ip else f"{ip}:{head.visitor_port}"
    return (f"FLEET {head.host} {_VERSION}\r\nX-Kite-Fleet: {head.secret}\r\n"
            f"X-Kite-Proto: {head.proto}\r\nX-Kite-Port: {head.port}\r\n"
            f"X-Kite-Visitor: {where}\r\n\r\n").encode("ascii")


def parse_forward_head(data: bytes) -> ForwardHead:
    """Parse a complete head (through its blank line); raises RemoteProtocolError."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError("fleet head: not ASCII") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[0] != "FLEET" or parts[2] != _VERSION:
        raise RemoteProtocolError(f"fleet head: bad first line {lines[0][:80]!r}")
    host = parts[1].lower()
    if not valid_domain(host):
        raise RemoteProtocolError(f"fleet head: bad host {host[:80]!r}")
    fields: dict = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise RemoteProtocolError("fleet head: a line without a colon")
        name = name.strip().lower()
        if name in fields:
            raise RemoteProtocolError(f"fleet head: {name} twice")
        fields[name] = value.strip()
    try:
        secret = fields["x-kite-fleet"]
        proto = fields["x-kite-proto"].lower()
        port = int(fields["x-kite-port"])
        where = fields["x-kite-visitor"]
    except KeyError as exc:
        raise RemoteProtocolError(f"fleet head: no {exc.args[0]}") from None
    except ValueError:
        raise RemoteProtocolError("fleet head: bad X-Kite-Port") from None
    if not secret or len(secret) > _MAX_SECRET:
        raise RemoteProtocolError("fleet head: bad X-Kite-Fleet")
    if not valid_proto(proto) or "-" in proto or not 0 < port < 65536:
        raise RemoteProtocolError(f"fleet head: bad protocol or port {proto!r}:{port}")
    ip, _, vport = where.rpartition(":")
    ip = ip.strip("[]")
    try:
        ipaddress.ip_address(ip)
        visitor_port = int(vport)
    except ValueError:
        raise RemoteProtocolError(f"fleet head: bad X-Kite-Visitor {where[:60]!r}") from None
    if not 0 <= visitor_port < 65536:
        raise RemoteProtocolError(f"fleet head: bad X-Kite-Visitor {where[:60]!r}")
    return ForwardHead(host, proto, port, ip, visitor_port, secret)


def build_link_head(secret: str) -> bytes:
    return f"FLEET-LINK {_VERSION}\r\nX-Kite-Fleet: {secret}\r\n\r\n".encode("ascii")


def parse_link_head(data: bytes) -> str:
    """The fleet secret of a complete link head; raises RemoteProtocolError."""
    try:
        lines = data.decode("ascii").split("\r\n")
    except UnicodeDecodeError:
        raise RemoteProtocolError("fleet link head: not ASCII") from None
    if lines[0] != f"FLEET-LINK {_VERSION}":
        raise RemoteProtocolError(f"fleet link head: bad first line {lines[0][:80]!r}")
    secret = None
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise RemoteProtocolError("fleet link head: a line without a colon")
        if name.strip().lower() == "x-kite-fleet":
            if secret is not None:
                raise RemoteProtocolError("fleet link head: x-kite-fleet twice")
            secret = value.strip()
    if not secret or len(secret) > _MAX_SECRET:
        raise RemoteProtocolError("fleet link head: bad X-Kite-Fleet")
    return secret
