"""Which tunnels fly which kites now: the relay's routing table."""

from __future__ import annotations

from typing import Iterable, Optional

from ..proto.names import domain_candidates

__all__ = ["Routes"]


class Routes:
    """The online kites: ``(proto, domain)`` -> tunnels that fly it, for routing visitors.

    Several tunnels may fly one kite; a new stream goes to the one with the fewest open
    streams, and when one goes the others carry on (failover).
    """

    def __init__(self) -> None:
        self._table: dict[tuple[str, str], list] = {}

    def add(self, proto: str, domain: str, tunnel) -> bool:
        """Route ``proto:domain`` to ``tunnel`` too; True if the kite was offline before."""
        lst = self._table.setdefault((proto, domain), [])
        if tunnel not in lst:
            lst.append(tunnel)
        return len(lst) == 1

    def remove(self, proto: str, domain: str, tunnel) -> bool:
        """Stop routing ``proto:domain`` to ``tunnel``; True if the kite went offline."""
        lst = self._table.get((proto, domain))
        if not lst or tunnel not in lst:
            return False
        lst.remove(tunnel)
        if lst:
            return False
        del self._table[(proto, domain)]
        return True

    def tunnels(self, proto: str, domain: str) -> list:
        return self._table.get((proto, domain), [])

    def kites(self) -> list[tuple[str, str]]:
        return sorted(self._table)

    def lookup(self, protos: Iterable[str], domain: str) -> tuple[Optional[object], Optional[str]]:
        """The least busy tunnel for the first of ``protos`` flown on ``domain`` (or a
        wildcard kite above it); returns ``(tunnel, proto)`` or ``(None, None)``."""
        for cand in domain_candidates(domain):
            for proto in protos:
                lst = self._table.get((proto, cand))
                if lst:
                    if len(lst) == 1:
                        return lst[0], proto
                    return min(lst, key=lambda t: len(t.streams)), proto
        return None, None

    def known_domain(self, domain: str) -> bool:
        """Some kite (any protocol) flies ``domain`` or a wildcard above it."""
        cands = set(domain_candidates(domain))
        return any(d in cands for (_p, d) in self._table)
