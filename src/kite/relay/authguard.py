"""Failed kite signatures, counted per source address: a guesser is slowed down and logged in
aggregate, never once per guess.

Each address may fail :data:`FREE_FAILURES` signatures; every failure after that blocks it
for twice as long as the one before (from :data:`FIRST_BLOCK` up to :data:`MAX_BLOCK`
seconds).  A blocked address gets its tunnels refused before anything is checked.  The count
is forgotten :data:`FORGET_AFTER` seconds after the last failure.  At most
:data:`MAX_TRACKED` addresses are remembered (the least recently failing go first), so a
flood from many addresses costs bounded memory.

Logging: the first failure of an address is logged with its reason; then only counts, at
the 2nd, 4th, 8th, ... failure ("N failed signatures in S s; blocked for B s").  Sans-IO:
the caller passes the clock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("kite.relay")

__all__ = ["AuthGuard", "FREE_FAILURES", "FIRST_BLOCK", "MAX_BLOCK", "FORGET_AFTER", "MAX_TRACKED"]

FREE_FAILURES = 5
FIRST_BLOCK = 2.0
MAX_BLOCK = 600.0
FORGET_AFTER = 3600.0
MAX_TRACKED = 16384


@dataclass
class _Record:
    first: float  # time of the first failure counted
    last: float  # time of the latest failure
    failures: int = 0
    blocked_until: float = 0.0


class AuthGuard:
    def __init__(self, *, free: int = FREE_FAILURES, first_block: float = FIRST_BLOCK,
                 max_block: float = MAX_BLOCK, forget_after: float = FORGET_AFTER,
                 max_tracked: int = MAX_TRACKED) -> None:
        self.free = free
        self.first_block = first_block
        self.max_block = max_block
        self.forget_after = forget_after
        self.max_tracked = max_tracked
        self._records: dict[str, _Record] = {}  # least recently failing first

    def __len__(self) -> int:
        return len(self._records)

    def blocked(self, addr: str, now: float) -> float:
        """Seconds ``addr`` stays blocked (0: it may try)."""
        rec = self._records.get(addr)
        if rec is None:
            return 0.0
        if now - rec.last > self.forget_after:
            del self._records[addr]
            return 0.0
        return max(0.0, rec.blocked_until - now)

    def failed(self, addr: str, now: float, kite: str, reason: str) -> None:
        """One failed signature (or a kite without a grant) from ``addr``."""
        records = self._records
        rec = records.pop(addr, None)
        if rec is None or now - rec.last > self.forget_after:
            rec = _Record(first=now, last=now)
        records[addr] = rec  # most recent last
        while len(records) > self.max_tracked:
            del records[next(iter(records))]
        rec.failures += 1
        rec.last = now
        extra = rec.failures - self.free
        if extra > 0:
            block = min(self.max_block, self.first_block * 2 ** min(extra - 1, 30))
            rec.blocked_until = now + block
        n = rec.failures
        if n == 1:
            log.warning("%s: kite %s refused: %s", addr, kite, reason)
        elif n & (n - 1) == 0:  # 2, 4, 8, ...: a summary, not a line per guess
            block = max(0.0, rec.blocked_until - now)
            log.warning("%s: %d failed kite signatures in %.0f s%s", addr, n, now - rec.first,
                        f"; blocked for {block:.0f} s" if block else "")
