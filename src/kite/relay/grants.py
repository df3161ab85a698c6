"""Who may fly which kites: grants from ``--kite PROTO:DOMAIN:SECRET`` and the config file.

``*`` as PROTO means every protocol, ``*.example.com`` as DOMAIN every name below
example.com (names and wildcards: :mod:`kite.proto.names`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

from ..errors import ConfigError
from ..proto.names import bare_proto, domain_candidates, valid_domain, valid_proto

__all__ = ["Grant", "parse_grant", "GrantTable"]


@dataclass(frozen=True)
class Grant:
    """Permission to fly ``protos`` (or all, None) on ``domain`` (may be a wildcard)."""

    domain: str
    secret: str = field(repr=False)  # never in logs or reprs
    protos: Optional[frozenset] = None  # None = every protocol

    def allows(self, proto: str) -> bool:
        if self.protos is None:
            return True
        return proto in self.protos or bare_proto(proto) in self.protos


def parse_grant(value: str, *, key: str = "kite", default_secret: Optional[str] = None) -> Grant:
    """Parse ``PROTO[,PROTO...]:DOMAIN:SECRET`` (``*`` for all protocols), or
    ``PROTO:DOMAIN`` when ``default_secret`` (from ``--secret-file``/``KITE_SECRET``) is given:
    a secret on the command line shows in ``ps``."""
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {value!r}", "quote it")
    parts = value.split(":", 2)
    if len(parts) == 2 and default_secret:
        parts.append(default_secret)
    if len(parts) != 3 or not parts[2]:
        raise ConfigError(key, "expected PROTO:DOMAIN:SECRET, or PROTO:DOMAIN with --secret-file",
                          "e.g. --kite 'http:app.example.com' --secret-file FILE, or "
                          "'*:*.example.com:SECRET'")
    protos_s, domain, secret = parts
    domain = domain.lower().rstrip(".")
    if not valid_domain(domain):
        raise ConfigError(key, f"bad domain {domain!r}", "use a DNS name, or *.parent for a wildcard")
    protos = None
    if protos_s.strip() != "*":
        items = frozenset(p.strip().lower() for p in protos_s.split(",") if p.strip())
        for p in items:
            if not valid_proto(p):
                if "-" in p and valid_proto(bare_proto(p)):
                    raise ConfigError(key, f"bad port in {p!r}", "e.g. raw-22")
                raise ConfigError(key, f"unknown protocol {p!r}",
                                  "use http, https, raw, raw-PORT, websocket or *")
        if not items:
            raise ConfigError(key, "no protocol given", "use http, https, raw-22, ... or *")
        protos = items
    return Grant(domain=domain, secret=secret, protos=protos)


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

    def __iter__(self) -> Iterator[Grant]:
        for grants in self._by_domain.values():
            yield from grants

    def find(self, proto: str, domain: str) -> Optional[Grant]:
        """The grant for ``proto`` (``raw-22`` tries ``raw-22`` then ``raw``) on ``domain``."""
        for cand in domain_candidates(domain.lower()):
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
