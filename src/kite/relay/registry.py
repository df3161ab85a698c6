"""Who may fly which kites (grants), and which tunnels fly them now (the routing table).

A kite is ``(proto, domain)``: ``http:app.example.com``, ``raw-22:box.example.com``.  Grants
come from ``--kite PROTO:DOMAIN:SECRET`` or the relay's config file; ``*`` as PROTO means
every protocol, ``*.example.com`` as DOMAIN every name below example.com.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from ..errors import ConfigError

__all__ = ["Grant", "parse_grant", "GrantTable", "Routes", "KITE_PROTOS"]

#: Kite protocols the relay routes (a raw kite may carry a port: raw-22).
KITE_PROTOS = ("http", "https", "raw", "websocket")


def _valid_domain(domain: str) -> bool:
    if not domain or len(domain) > 253 or ":" in domain:
        return False
    labels = domain.split(".")
    if labels[0] == "*":
        labels = labels[1:]
        if not labels:
            return False
    for label in labels:
        if not label or len(label) > 63:
            return False
        if not all(c.isalnum() or c in "-_" for c in label):
            return False
    return True


def bare_proto(proto: str) -> str:
    """``raw-22`` -> ``raw``; ``http-8080`` -> ``http``."""
    return proto.split("-", 1)[0]


@dataclass(frozen=True)
class Grant:
    """Permission to fly ``protos`` (or all, None) on ``domain`` (may be a wildcard)."""

    domain: str
    secret: str = field(repr=False)  # never in logs or reprs
    protos: Optional[frozenset] = None  # None = every protocol
    single: bool = False  # at most one backend at a time (pagekite.py's Duplicate)

    def allows(self, proto: str) -> bool:
        if self.protos is None:
            return True
        return proto in self.protos or bare_proto(proto) in self.protos


def parse_grant(value: str, *, key: str = "kite") -> Grant:
    """Parse ``PROTO[,PROTO...]:DOMAIN:SECRET`` (``*`` for all protocols)."""
    parts = value.split(":", 2)
    if len(parts) != 3 or not parts[2]:
        raise ConfigError(key, "expected PROTO:DOMAIN:SECRET",
                          "e.g. --kite 'http:app.example.com:SECRET' or '*:*.example.com:SECRET'")
    protos_s, domain, secret = parts
    domain = domain.lower().rstrip(".")
    if not _valid_domain(domain):
        raise ConfigError(key, f"bad domain {domain!r}", "use a DNS name, or *.parent for a wildcard")
    protos = None
    if protos_s.strip() != "*":
        items = frozenset(p.strip().lower() for p in protos_s.split(",") if p.strip())
        for p in items:
            if bare_proto(p) not in KITE_PROTOS:
                raise ConfigError(key, f"unknown protocol {p!r}",
                                  "use http, https, raw, raw-PORT, websocket or *")
            if "-" in p and not p.split("-", 1)[1].isdigit():
                raise ConfigError(key, f"bad port in {p!r}", "e.g. raw-22")
        if not items:
            raise ConfigError(key, "no protocol given", "use http, https, raw-22, ... or *")
        protos = items
    return Grant(domain=domain, secret=secret, protos=protos)


def _candidates(domain: str) -> Iterable[str]:
    """``a.b.example.com`` -> itself, ``*.b.example.com``, ``*.example.com``, ``*.com``."""
    yield domain
    labels = domain.split(".")
    for i in range(1, len(labels)):
        yield "*." + ".".join(labels[i:])


class GrantTable:
    """Looks up the secret for a kite: exact domain first, then wildcards, most specific first."""

    def __init__(self, grants: Iterable[Grant] = ()) -> None:
        self._by_domain: dict[str, list[Grant]] = {}
        for g in grants:
            self.add(g)

    def add(self, grant: Grant) -> None:
        self._by_domain.setdefault(grant.domain, []).append(grant)

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_domain.values())

    def find(self, proto: str, domain: str) -> Optional[Grant]:
        """The grant for ``proto`` (``raw-22`` tries ``raw-22`` then ``raw``) on ``domain``."""
        for cand in _candidates(domain.lower()):
            for g in self._by_domain.get(cand, ()):
                if g.allows(proto):
                    return g
        return None

    def exact_secret(self, proto: str, domain: str) -> Optional[str]:
        """The secret granted for exactly ``domain`` (``*.example.com`` asked as such)."""
        for g in self._by_domain.get(domain.lower(), ()):
            if g.allows(proto):
                return g.secret
        return None

    def secret_for(self, proto: str, domain: str) -> Optional[str]:
        g = self.find(proto, domain)
        return g.secret if g else None


class Routes:
    """The online kites: ``(proto, domain)`` -> tunnels that fly it, for routing visitors.

    Several tunnels may fly one kite; a new stream goes to the one with the fewest open
    streams, and when one goes the others carry on (failover).
    """

    def __init__(self) -> None:
        self._table: dict[tuple[str, str], list] = {}

    def add(self, proto: str, domain: str, tunnel) -> None:
        lst = self._table.setdefault((proto, domain), [])
        if tunnel not in lst:
            lst.append(tunnel)

    def remove_tunnel(self, tunnel) -> list[tuple[str, str]]:
        """Forget every kite of ``tunnel``; returns the kites that went offline entirely."""
        gone = []
        for key in list(self._table):
            lst = self._table[key]
            if tunnel in lst:
                lst.remove(tunnel)
                if not lst:
                    del self._table[key]
                    gone.append(key)
        return gone

    def tunnels(self, proto: str, domain: str) -> list:
        return self._table.get((proto, domain), [])

    def kites(self) -> list[tuple[str, str]]:
        return sorted(self._table)

    def lookup(self, protos: Iterable[str], domain: str):
        """The least busy tunnel for the first of ``protos`` flown on ``domain`` (or a
        wildcard kite above it); returns ``(tunnel, proto)`` or ``(None, None)``."""
        for cand in _candidates(domain):
            for proto in protos:
                lst = self._table.get((proto, cand))
                if lst:
                    if len(lst) == 1:
                        return lst[0], proto
                    return min(lst, key=lambda t: len(t.streams)), proto
        return None, None

    def known_domain(self, domain: str) -> bool:
        for cand in _candidates(domain):
            for (_p, d) in self._table:
                if d == cand:
                    return True
        return False
