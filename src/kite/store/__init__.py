"""The account registry: accounts, their kites, quotas and usage, behind a small interface.

:class:`Store` is what the relay and ``kite accounts`` need from a registry;
:class:`~kite.store.sqlite.SqliteStore` implements it on one SQLite file (WAL mode), a Redis
store can implement it later.  Values are checked here (:func:`check_email`,
:func:`check_name`, :func:`parse_size`), so every store refuses the same bad input with the
same :class:`~kite.errors.StoreError`.

Secrets are stored as they are, not hashed: the relay must verify pagekite's kite
signatures, ``sha1(SECRET + payload)`` (docs/protocol.md §2), which needs the secret itself.
They are protected like an SSH host key instead: the file is created mode 0600, secrets
never appear in reprs, logs or ``list``/``show`` output (only ``add`` prints one, once).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Optional, Protocol

from ..errors import StoreError
from ..proto.names import valid_domain, valid_proto

__all__ = ["Account", "Kite", "Limits", "NO_LIMITS", "check_cidrs", "Snapshot", "Store", "UsageBatch",
           "check_email", "check_name", "check_protos", "parse_size", "format_size", "DEFAULT_PROTOS"]

DEFAULT_PROTOS = ("http", "https")
_EMAIL = re.compile(r"^[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})+$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


@dataclass(frozen=True)
class Account:
    id: int
    email: str
    secret: str = field(repr=False)  # never in logs or reprs
    quota_bytes: int = 0  # bytes left; <= 0: exhausted
    expires: Optional[float] = None  # Unix time, None: never
    disabled: bool = False
    period_bytes: int = 0  # bytes since the quota was last set
    total_bytes: int = 0

    def blocked(self, now: float) -> Optional[str]:
        """Why this account's kites may not fly (pagekite's reject reasons), or None."""
        if self.disabled:
            return "unauthorized"
        if self.expires is not None and now >= self.expires:
            return "nodays"
        if self.quota_bytes <= 0:
            return "quota"
        return None


@dataclass(frozen=True)
class Limits:
    """Per-kite limits the relay enforces on visitors (None / empty: no limit)."""

    max_visitors: Optional[int] = None  # concurrent visitor connections
    rate: Optional[int] = None  # new connections per second from one visitor address
    allow: tuple = ()  # CIDRs: if any, only visitors from these
    deny: tuple = ()  # CIDRs refused

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in dataclasses.asdict(self).items() if v})

    @classmethod
    def from_json(cls, text: Optional[str]) -> Limits:
        data = json.loads(text) if text else {}
        return cls(data.get("max_visitors"), data.get("rate"), tuple(data.get("allow", ())),
                   tuple(data.get("deny", ())))


NO_LIMITS = Limits()


def check_cidrs(values) -> tuple:
    try:
        return tuple(str(ipaddress.ip_network(v, strict=False)) for v in values)
    except ValueError as exc:
        raise StoreError(f"bad network: {exc} (use CIDRs like 10.0.0.0/8 or ::1/128)") from None


@dataclass(frozen=True)
class Kite:
    name: str  # a DNS name or *.parent
    account_id: int
    protos: frozenset
    total_bytes: int = 0
    limits: Limits = NO_LIMITS

    def allows(self, proto: str) -> bool:
        return proto in self.protos or proto.split("-", 1)[0] in self.protos


@dataclass
class Snapshot:
    """Everything the relay keeps in memory: accounts by id, kites by name."""

    accounts: dict = field(default_factory=dict)
    kites: dict = field(default_factory=dict)


@dataclass
class UsageBatch:
    """One flush of the relay's counters: bytes per account and per kite, on ``day``
    (YYYY-MM-DD, UTC), presence changes ``(proto, name, online)``, and what is charged to
    each account's quota (``charged``; default: all its bytes) - the relay charges no more
    than what was left when it counted, so bytes that crossed the quota before the cut are
    never taken from a later top-up."""

    seq: int
    day: str
    accounts: dict = field(default_factory=dict)
    kites: dict = field(default_factory=dict)
    presence: list = field(default_factory=list)
    charged: dict = field(default_factory=dict)


class Store(Protocol):
    """A registry.  Every method is one short transaction; all may raise StoreError."""

    def data_version(self) -> int: ...
    def snapshot(self) -> Snapshot: ...
    def last_seq(self, relay: str) -> int: ...
    def flush(self, relay: str, batch: UsageBatch) -> bool: ...
    def reset_presence(self, relay: str) -> None: ...
    def add_account(self, email: str, quota: int, days: Optional[float]) -> Account: ...
    def signup(self, email: str, name: str, quota: int, protos: frozenset) -> Account: ...
    def set_kite(self, email: str, name: str, protos: frozenset) -> Kite: ...
    def remove_kite(self, email: str, name: str) -> None: ...
    def set_limits(self, email: str, name: str, limits: Limits) -> None: ...
    def set_quota(self, email: str, size: int, *, add: bool) -> Account: ...
    def set_disabled(self, email: str, disabled: bool) -> Account: ...
    def remove_account(self, email: str) -> None: ...
    def list_accounts(self) -> list: ...
    def show(self, email: str, now: float) -> dict: ...
    def close(self) -> None: ...


def check_email(email: str) -> str:
    if not isinstance(email, str) or len(email) > 254 or not _EMAIL.match(email):
        raise StoreError(f"bad email {email!r}: use an ASCII address like name@example.com")
    return email.lower()


def check_name(name: str) -> str:
    n = name.lower().rstrip(".") if isinstance(name, str) else ""
    if not n.isascii() or not valid_domain(n) or "." not in n.lstrip("*."):
        raise StoreError(f"bad kite name {name!r}: use a DNS name (or *.name for a wildcard)")
    return n


def check_protos(value: str) -> frozenset:
    items = frozenset(p.strip().lower() for p in value.split(",") if p.strip())
    bad = [p for p in items if not valid_proto(p)]
    if bad or not items:
        raise StoreError(f"bad protocols {value!r}: use http, https, raw-PORT, websocket")
    return items


def parse_size(value: str) -> int:
    """``2.5GB``, ``500MB``, ``10k``, ``1234`` (bytes; decimal units) -> bytes."""
    m = _SIZE.match(value) if isinstance(value, str) else None
    if not m:
        raise StoreError(f"bad size {value!r}: use bytes or a number with KB, MB, GB, TB")
    unit = (m.group(2) or "").upper().rstrip("B")
    n = float(m.group(1)) * _UNITS[unit]
    if n > 2**62:
        raise StoreError(f"size {value!r} is too large")
    return int(n)


def format_size(n: int) -> str:
    for unit, f in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n} B"
