"""Kite names: the protocols a kite may have and the domains it may be called.

A kite is ``(proto, domain)``: ``http:app.example.com``, ``raw-22:box.example.com``,
``https:*.example.com``.  ``proto`` is one of :data:`KITE_PROTOS`, optionally with a port
(``raw-22``, ``http-8080``: the public port visitors use); ``domain`` is a DNS name in lower
case without the trailing dot, or ``*.parent`` for every name below ``parent`` (at any
depth, as pagekite.py matches them).  Relay, backend, registry and handshake all ask this
module; nothing else splits a proto or walks a wildcard.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "KITE_PROTOS",
    "HTTP_PROTOS",
    "bare_proto",
    "proto_port",
    "valid_proto",
    "valid_domain",
    "domain_candidates",
    "domain_matches",
]

#: The kite protocols (docs/protocol.md §2.1): a raw kite carries its public port (raw-22).
KITE_PROTOS = ("http", "https", "raw", "websocket")
#: Kite protocols whose streams are HTTP requests (the backend may rewrite their heads).
HTTP_PROTOS = ("http", "websocket")

#: RFC 1035 limits: a name of at most 253 characters in labels of at most 63.
MAX_NAME = 253
MAX_LABEL = 63


def bare_proto(proto: str) -> str:
    """``raw-22`` -> ``raw``; ``http-8080`` -> ``http``; ``http`` -> ``http``."""
    return proto.split("-", 1)[0]


def proto_port(proto: str) -> Optional[int]:
    """The port of ``raw-22`` (22), or None for a bare or malformed proto."""
    _, sep, port = proto.partition("-")
    if not sep or not (port.isascii() and port.isdigit()) or len(port) > 5:
        return None
    return int(port)


def valid_proto(proto: str) -> bool:
    """One of :data:`KITE_PROTOS`, bare or with a port 1-65535."""
    bare, sep, _ = proto.partition("-")
    if bare not in KITE_PROTOS:
        return False
    if not sep:
        return True
    port = proto_port(proto)
    return port is not None and 1 <= port <= 65535


def valid_domain(domain: str, *, wildcard: bool = True) -> bool:
    """A DNS name of letters, digits, ``-`` and ``_`` (``*.parent`` when ``wildcard``)."""
    if not domain or len(domain) > MAX_NAME:
        return False
    labels = domain.split(".")
    if labels[0] == "*" and wildcard:
        labels = labels[1:]
        if not labels:
            return False
    for label in labels:
        if not label or len(label) > MAX_LABEL:
            return False
        if not all(c.isascii() and (c.isalnum() or c in "-_") for c in label):
            return False
    return True


def domain_candidates(domain: str) -> list[str]:
    """``a.b.example.com`` -> itself, ``*.b.example.com``, ``*.example.com``, ``*.com``: the
    names a kite for ``domain`` may be registered under, most specific first (pagekite.py
    looks kites up in this order, docs/protocol.md §8.1)."""
    out = [domain]
    labels = domain.split(".")
    for i in range(1, len(labels)):
        out.append("*." + ".".join(labels[i:]))
    return out


def domain_matches(pattern: str, domain: str) -> int:
    """How well the kite domain ``pattern`` covers ``domain``: 2 exact, 1 wildcard, 0 not."""
    if pattern == domain:
        return 2
    if pattern.startswith("*.") and domain.endswith(pattern[1:]):
        return 1
    return 0
