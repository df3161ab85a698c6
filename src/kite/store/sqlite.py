"""The registry in one SQLite file (stdlib ``sqlite3``, WAL mode).

Several processes share the file: the relay (reads a snapshot when ``PRAGMA data_version``
says another connection committed; writes usage and presence) and ``kite accounts``
commands.  Every change is one ``BEGIN IMMEDIATE`` transaction with a busy timeout, so
concurrent commands queue instead of losing updates, and counters are changed with
``x = x + ?`` (never read-modify-write in Python).

Usage flushes are idempotent: a flush carries the relay's next sequence number, stored in
the same transaction (table ``flushes``); a flush whose number is not above the stored one
was applied already (a retry after an error that hid a commit) and changes nothing.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from typing import Optional

from ..errors import StoreError
from ..proto.names import domain_candidates
from . import NO_LIMITS, Account, Kite, Limits, Snapshot, UsageBatch, check_email, check_name

__all__ = ["SqliteStore", "open_store"]

BUSY_TIMEOUT_MS = 5000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE, secret TEXT NOT NULL,
    quota_bytes INTEGER NOT NULL DEFAULT 0, expires REAL, disabled INTEGER NOT NULL DEFAULT 0,
    period_bytes INTEGER NOT NULL DEFAULT 0, total_bytes INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS kites (
    name TEXT PRIMARY KEY, account_id INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    protos TEXT NOT NULL, total_bytes INTEGER NOT NULL DEFAULT 0, limits TEXT);
CREATE INDEX IF NOT EXISTS kites_account ON kites(account_id);
CREATE TABLE IF NOT EXISTS daily (
    account_id INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE, day TEXT NOT NULL,
    bytes INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (account_id, day));
CREATE TABLE IF NOT EXISTS flushes (relay TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS presence (
    relay TEXT NOT NULL, proto TEXT NOT NULL, name TEXT NOT NULL, since REAL NOT NULL,
    PRIMARY KEY (relay, proto, name));
"""


def open_store(path: str) -> SqliteStore:
    return SqliteStore(path)


class SqliteStore:
    """:class:`~kite.store.Store` on the SQLite file ``path`` (created mode 0600)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            if not os.path.exists(path):
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            self.db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                      check_same_thread=False)
            self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute("PRAGMA synchronous = NORMAL")
            self.db.executescript(_SCHEMA)  # idempotent; outside _tx (it commits itself)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the database {path!r}: {exc}") from None

    def close(self) -> None:
        self.db.close()

    # -- plumbing -------------------------------------------------------------------------------
    def _tx(self):
        store = self

        class _Tx:
            def __enter__(self):
                try:
                    store.db.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as exc:
                    raise StoreError(f"database {store.path!r}: {exc}") from None

            def __exit__(self, kind, exc, tb):
                if kind is None:
                    try:
                        store.db.execute("COMMIT")
                        return False
                    except sqlite3.Error as err:
                        store.db.execute("ROLLBACK")
                        raise StoreError(f"database {store.path!r}: {err}") from None
                store.db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"database {store.path!r}: {exc}") from None
                return False

        return _Tx()

    def _read(self, sql: str, args=()) -> list:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"database {self.path!r}: {exc}") from None

    def _account_row(self, email: str) -> tuple:
        rows = self._read("SELECT id, email, secret, quota_bytes, expires, disabled, "
                          "period_bytes, total_bytes FROM accounts WHERE email = ?",
                          (check_email(email),))
        if not rows:
            raise StoreError(f"no account {email!r}")
        return rows[0]

    @staticmethod
    def _account(row) -> Account:
        return Account(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6], row[7])

    # -- the relay ------------------------------------------------------------------------------
    def data_version(self) -> int:
        """Changes when another connection committed (cheap: no table is read)."""
        return self._read("PRAGMA data_version")[0][0]

    def snapshot(self) -> Snapshot:
        snap = Snapshot()
        try:
            self.db.execute("BEGIN")  # one consistent read
            for row in self.db.execute("SELECT id, email, secret, quota_bytes, expires, disabled,"
                                       " period_bytes, total_bytes FROM accounts"):
                snap.accounts[row[0]] = self._account(row)
            for name, aid, protos, total, limits in self.db.execute(
                    "SELECT name, account_id, protos, total_bytes, limits FROM kites"):
                snap.kites[name] = Kite(name, aid, frozenset(protos.split(",")), total,
                                        Limits.from_json(limits) if limits and limits != "{}" else NO_LIMITS)
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise StoreError(f"database {self.path!r}: {exc}") from None
        return snap

    def last_seq(self, relay: str) -> int:
        rows = self._read("SELECT seq FROM flushes WHERE relay = ?", (relay,))
        return rows[0][0] if rows else 0

    def flush(self, relay: str, batch: UsageBatch) -> bool:
        """Apply ``batch`` in one transaction; False if its ``seq`` was applied before."""
        now = time.time()
        with self._tx():
            cur = self.db.execute(
                "INSERT INTO flushes (relay, seq) VALUES (?, ?) ON CONFLICT (relay) DO UPDATE "
                "SET seq = excluded.seq WHERE excluded.seq > flushes.seq", (relay, batch.seq))
            if cur.rowcount == 0:
                return False
            for aid, n in batch.accounts.items():
                # Quota left stops at 0: what crossed it before the relay's cut (under a
                # second of traffic) is counted in the totals, not owed by the next top-up.
                self.db.execute("UPDATE accounts SET quota_bytes = max(quota_bytes - ?, 0), "
                                "period_bytes"
                                " = period_bytes + ?, total_bytes = total_bytes + ? WHERE id = ?",
                                (batch.charged.get(aid, n), n, n, aid))
                self.db.execute("INSERT INTO daily (account_id, day, bytes) SELECT id, ?, ? FROM"
                                " accounts WHERE id = ? ON CONFLICT (account_id, day) DO UPDATE"
                                " SET bytes = bytes + excluded.bytes", (batch.day, n, aid))
            for name, n in batch.kites.items():
                self.db.execute("UPDATE kites SET total_bytes = total_bytes + ? WHERE name = ?",
                                (n, name))
            for proto, name, online in batch.presence:
                if online:
                    self.db.execute("INSERT OR REPLACE INTO presence VALUES (?, ?, ?, ?)",
                                    (relay, proto, name, now))
                else:
                    self.db.execute("DELETE FROM presence WHERE relay = ? AND proto = ? AND "
                                    "name = ?", (relay, proto, name))
        return True

    def reset_presence(self, relay: str) -> None:
        with self._tx():
            self.db.execute("DELETE FROM presence WHERE relay = ?", (relay,))

    # -- kite accounts --------------------------------------------------------------------------
    def add_account(self, email: str, quota: int, days: Optional[float]) -> Account:
        email = check_email(email)
        with self._tx():
            self._add_account(email, quota, days)
        return self._account(self._account_row(email))

    def signup(self, email: str, name: str, quota: int, protos: frozenset) -> Account:
        """A new account with one kite, in one transaction (both or neither)."""
        email, name = check_email(email), check_name(name)
        with self._tx():
            aid = self._add_account(email, quota, None)
            self._set_kite(aid, name, protos)
        return self._account(self._account_row(email))

    def _add_account(self, email: str, quota: int, days: Optional[float]) -> int:
        secret = secrets.token_urlsafe(24)
        now = time.time()
        expires = now + days * 86400 if days is not None else None
        if self.db.execute("SELECT 1 FROM accounts WHERE email = ?", (email,)).fetchone():
            raise StoreError(f"account {email!r} exists already")
        cur = self.db.execute("INSERT INTO accounts (email, secret, quota_bytes, expires, "
                              "created) VALUES (?, ?, ?, ?, ?)", (email, secret, quota, expires, now))
        return int(cur.lastrowid or 0)

    def set_kite(self, email: str, name: str, protos: frozenset) -> Kite:
        name = check_name(name)
        with self._tx():
            aid = self._account_row(email)[0]
            self._set_kite(aid, name, protos)
        return Kite(name, aid, protos)

    def _set_kite(self, aid: int, name: str, protos: frozenset) -> None:
        # A name belongs to one account: itself and every wildcard above it.
        for cand in [name, *domain_candidates(name.removeprefix("*."))]:
            row = self.db.execute("SELECT account_id FROM kites WHERE name = ?",
                                  (cand,)).fetchone()
            if row and row[0] != aid:
                raise StoreError(f"kite name {name!r} is taken (by {cand!r} of another "
                                 "account)")
        if name.startswith("*."):
            parent = name[2:]
            row = self.db.execute("SELECT account_id FROM kites WHERE name = ?",
                                  (parent,)).fetchone()
            if not row or row[0] != aid:
                raise StoreError(f"wildcard {name!r}: add the kite {parent!r} to this "
                                 "account first (wildcards only under its own names)")
            under = self.db.execute("SELECT name FROM kites WHERE name LIKE ? ESCAPE '\\' "
                                    "AND account_id != ?",
                                    ("%." + parent.replace("_", "\\_"), aid)).fetchone()
            if under:
                raise StoreError(f"wildcard {name!r}: {under[0]!r} below it belongs to "
                                 "another account")
        self.db.execute("INSERT INTO kites (name, account_id, protos) VALUES (?, ?, ?) "
                        "ON CONFLICT (name) DO UPDATE SET protos = excluded.protos",
                        (name, aid, ",".join(sorted(protos))))

    def remove_kite(self, email: str, name: str) -> None:
        name = check_name(name)
        with self._tx():
            aid = self._account_row(email)[0]
            cur = self.db.execute("DELETE FROM kites WHERE name = ? AND account_id = ?",
                                  (name, aid))
            if cur.rowcount == 0:
                raise StoreError(f"account {email!r} has no kite {name!r}")

    def set_limits(self, email: str, name: str, limits: Limits) -> None:
        name = check_name(name)
        with self._tx():
            aid = self._account_row(email)[0]
            cur = self.db.execute("UPDATE kites SET limits = ? WHERE name = ? AND account_id = ?",
                                  (limits.to_json(), name, aid))
            if cur.rowcount == 0:
                raise StoreError(f"account {email!r} has no kite {name!r}")

    def set_quota(self, email: str, size: int, *, add: bool) -> Account:
        with self._tx():
            aid = self._account_row(email)[0]
            if add:
                self.db.execute("UPDATE accounts SET quota_bytes = max(quota_bytes, 0) + ? "
                                "WHERE id = ?", (size, aid))
            else:
                self.db.execute("UPDATE accounts SET quota_bytes = ?, period_bytes = 0 "
                                "WHERE id = ?", (size, aid))
        return self._account(self._account_row(email))

    def set_disabled(self, email: str, disabled: bool) -> Account:
        with self._tx():
            aid = self._account_row(email)[0]
            self.db.execute("UPDATE accounts SET disabled = ? WHERE id = ?", (int(disabled), aid))
        return self._account(self._account_row(email))

    def remove_account(self, email: str) -> None:
        with self._tx():
            aid = self._account_row(email)[0]
            self.db.execute("DELETE FROM accounts WHERE id = ?", (aid,))

    def list_accounts(self) -> list:
        now = time.time()
        rows = self._read("SELECT a.id, a.email, a.secret, a.quota_bytes, a.expires, a.disabled,"
                          " a.period_bytes, a.total_bytes, count(k.name) FROM accounts a LEFT "
                          "JOIN kites k ON k.account_id = a.id GROUP BY a.id ORDER BY a.email")
        out = []
        for row in rows:
            a = self._account(row)
            out.append({"email": a.email, "kites": row[8], "quota_bytes": max(a.quota_bytes, 0),
                        "total_bytes": a.total_bytes, "expires": a.expires,
                        "disabled": a.disabled, "status": a.blocked(now) or "ok"})
        return out

    def show(self, email: str, now: float) -> dict:
        a = self._account(self._account_row(email))
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        today = self._read("SELECT bytes FROM daily WHERE account_id = ? AND day = ?", (a.id, day))
        online: dict[str, list] = {}
        for proto, name in self._read("SELECT proto, name FROM presence"):
            online.setdefault(name, []).append(proto)
        kites = [{"name": n, "protos": sorted(p.split(",")), "total_bytes": t,
                  "online": sorted(online.get(n, [])), **({"limits": json.loads(lim)} if lim
                                                          and lim != "{}" else {})}
                 for n, p, t, lim in self._read("SELECT name, protos, total_bytes, limits FROM "
                                                "kites WHERE account_id = ? ORDER BY name",
                                                (a.id,))]
        return {"email": a.email, "status": a.blocked(now) or "ok", "disabled": a.disabled,
                "expires": a.expires, "quota_bytes": max(a.quota_bytes, 0),
                "today_bytes": today[0][0] if today else 0, "period_bytes": a.period_bytes,
                "total_bytes": a.total_bytes, "kites": kites}
