"""The relay's view of the account registry (:mod:`kite.store`): an in-memory snapshot for
every lookup, byte counters for accounting, and the task that keeps both in step with the
database.

Theory of operation
-------------------
Lookups (a kite's secret at handshake, whether a visitor's kite may fly) read the
:class:`~kite.store.Snapshot` in memory, never the database.  Once a second the task asks
the store for ``PRAGMA data_version`` (no table read); when another process (``kite
accounts``) committed, it reads a new snapshot, swaps it in, drops the routes of kites that
were removed and closes their streams.

Bytes are counted where they already are: each stream's fast-path slot counts ``sent`` and
``received``.  Once a second (and when a stream ends) the difference since the last look is
added to its kite and account; nothing is added to the per-chunk path.  Every
:data:`FLUSH_INTERVAL` s (and on shutdown) the counts go to the store as one
:class:`~kite.store.UsageBatch` in one transaction, numbered: a batch that failed is retried
with the same number and content, and the store applies a number once, so a retry never
counts twice and ``kill -9`` loses at most one interval.

An account with no bytes left, past its expiry or disabled is *blocked*: its open streams
are cut within a second, new visitors are refused (:meth:`refusal`), new kite requests get
pagekite's reasons (``quota``, ``nodays``, ``unauthorized``).  Its tunnels stay up, so a
top-up brings the kites back at the next second without the backend reconnecting.

All database calls run in one worker thread (``sqlite3`` blocks; a snapshot of a big
registry takes a while), so the event loop never waits for the disk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from ..errors import StoreError
from ..proto import control
from ..proto.names import domain_candidates
from ..store import NO_LIMITS, Account, Kite, Limits, Snapshot, Store, UsageBatch

log = logging.getLogger("kite.relay")

__all__ = ["Registry", "POLL_INTERVAL", "FLUSH_INTERVAL"]

#: Seconds between looks at the database's change counter and at the streams' counters
#: (how long a stream may run past its account's quota).
POLL_INTERVAL = 0.5
#: Seconds between flushes of the counters (the most ``kill -9`` can lose).
FLUSH_INTERVAL = 2.0

_REFUSALS = {
    "quota": "its account's data quota is exhausted",
    "nodays": "its account has expired",
    "unauthorized": "its account is disabled",
}


class Registry:
    """The snapshot, the counters and the sync task of one relay (see the module doc)."""

    def __init__(self, state, store: Store, relay_id: str = "relay") -> None:
        self.state = state
        self.store = store
        self.relay_id = relay_id
        self.snap = Snapshot()
        self.version: Optional[int] = None
        self.seq = 0
        self.blocked: dict = {}  # account id -> reason
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kite-db")
        self._loop = asyncio.get_running_loop()
        self._seen: dict = {}  # Stream -> [kite name, account id, bytes counted]
        self._accounts: dict = {}  # account id -> bytes not in a batch yet
        self._kites: dict = {}  # kite name -> bytes not in a batch yet
        self._charged: dict = {}  # account id -> bytes of those charged to its quota
        self._presence: list = []
        self._batch: Optional[UsageBatch] = None  # taken, not yet committed (retried as is)
        self._task: Optional[asyncio.Task] = None
        self._quota_sent: dict = {}  # account id -> last kB told to its tunnels
        self._urgent = False  # an account was just blocked: flush now (before any top-up)
        self._next_flush = 0.0
        self._next_quotas = 0.0  # next look at the quotas other relays charged (a fleet)
        self._quiet_until = 0.0  # store errors are logged at most once a minute
        self._flushes = 0  # flushes committed (a snapshot read across one is stale)
        self._open: dict = {}  # kite name -> open visitor streams
        self._rate: dict = {}  # (kite name, visitor address) -> (second, new connections)
        self._nets: dict = {}  # Limits -> (allow, deny) parsed networks

    def db_call(self, fn, *args):
        """Run a store call in the registry's one database thread."""
        return self._loop.run_in_executor(self._pool, fn, *args)

    async def start(self) -> None:
        self.seq = await self.db_call(self.store.last_seq, self.relay_id)
        await self.db_call(self.store.reset_presence, self.relay_id)
        await self.reload()
        self.state.subscribe(lambda e: self._presence.append((e.proto, e.domain, e.online)))
        self._next_flush = self._loop.time() + FLUSH_INTERVAL
        self._task = self._loop.create_task(self._run())
        log.info("registry: %d accounts, %d kites (relay id %s)", len(self.snap.accounts),
                 len(self.snap.kites), self.relay_id)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.tick()
        for _ in range(3):
            if await self.flush():
                break
        self._pool.shutdown(wait=True)
        self.store.close()

    # -- lookups (in memory) ----------------------------------------------------------------------
    def secret(self, proto: str, domain: str) -> Optional[str]:
        """The secret of the account that owns exactly ``domain`` for ``proto``."""
        kite = self.snap.kites.get(domain.lower())
        if kite is None or not kite.allows(proto):
            return None
        acct = self.snap.accounts.get(kite.account_id)
        return acct.secret if acct is not None else None

    def owner(self, host: str) -> tuple[Optional[Kite], Optional[Account]]:
        """The kite (``host`` or a wildcard above it) and account serving ``host``."""
        kites = self.snap.kites
        for cand in domain_candidates(host.lower()):
            kite = kites.get(cand)
            if kite is not None:
                return kite, self.snap.accounts.get(kite.account_id)
        return None, None

    def reason(self, host: str) -> Optional[str]:
        """Why the account kite ``host`` may not fly (quota, nodays, unauthorized), or None."""
        kite, acct = self.owner(host)
        if kite is None or acct is None:
            return None
        return self.blocked.get(acct.id)

    def refusal(self, host: str, ip: str = "") -> Optional[str]:
        """Why a new visitor from ``ip`` may not reach ``host``: its account is blocked, or
        the kite's limits (allow/deny networks, concurrent visitors, rate per address)."""
        kite, acct = self.owner(host)
        if kite is None or acct is None:
            return None
        reason = self.blocked.get(acct.id)
        if reason is not None:
            return f"The kite {host} is not available: {_REFUSALS[reason]}."
        limits = kite.limits
        if limits is NO_LIMITS:
            return None
        if ip and (limits.allow or limits.deny):
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                addr = None
            nets = self._networks(limits)
            if addr is None or any(addr in n for n in nets[1]) or \
                    (nets[0] and not any(addr in n for n in nets[0])):
                return f"The kite {host} does not take visitors from {ip}."
        if limits.max_visitors is not None and \
                self._open.get(kite.name, 0) >= limits.max_visitors:
            return f"The kite {host} has its maximum of {limits.max_visitors} visitors."
        if limits.rate is not None and ip:
            now = int(self._loop.time())
            key = (kite.name, ip)
            second, n = self._rate.get(key, (now, 0))
            if second != now:
                second, n = now, 0
            if len(self._rate) > 100_000:
                self._rate = {k: v for k, v in self._rate.items() if v[0] == now}
            self._rate[key] = (second, n + 1)
            if n >= limits.rate:
                return f"The kite {host} takes at most {limits.rate} new connections a second."
        return None

    def _networks(self, limits: Limits) -> tuple:
        nets = self._nets.get(limits)
        if nets is None:
            nets = ([ipaddress.ip_network(c) for c in limits.allow],
                    [ipaddress.ip_network(c) for c in limits.deny])
            self._nets[limits] = nets
        return nets

    def quota_headers(self, prefix: str, host: str) -> list:
        """pagekite's ``X-PageKite-Quota`` (kB left) and ``-QDays`` for an account kite."""
        _kite, acct = self.owner(host)
        if acct is None:
            return []
        out = [(f"{prefix}-Quota", max(self.left(acct), 0) // 1024)]
        if acct.expires is not None:
            out.append((f"{prefix}-QDays", max(int((acct.expires - time.time()) // 86400), 0)))
        return out

    def left(self, acct: Account) -> int:
        """Bytes left, counting what this relay counted but did not flush yet."""
        pending = self._charged.get(acct.id, 0)
        if self._batch is not None:
            pending += self._batch.charged.get(acct.id, 0)
        return acct.quota_bytes - pending

    # -- the task ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        """Count and enforce every POLL_INTERVAL; the database work runs beside, one
        :meth:`_sync` at a time, so a slow or locked database never delays enforcement."""
        sync: Optional[asyncio.Task] = None
        try:
            while True:
                await asyncio.sleep(POLL_INTERVAL)
                self.tick()
                if sync is None or sync.done():
                    sync = self._loop.create_task(self._sync())
        finally:
            if sync is not None:
                sync.cancel()

    async def _sync(self) -> None:
        try:
            version = await self.db_call(self.store.data_version)
            if version != self.version:
                await self.reload()
            elif hasattr(self.store, "quotas") and self._loop.time() >= self._next_quotas:
                self._next_quotas = self._loop.time() + FLUSH_INTERVAL
                self._apply_quotas(await self.db_call(self.store.quotas))
        except StoreError as exc:
            now = self._loop.time()
            if now >= self._quiet_until:  # one line a minute while the store is away
                self._quiet_until = now + 60.0
                log.warning("registry: %s (serving with the last good registry)", exc)
        if self._urgent or self._loop.time() >= self._next_flush:
            self._urgent = False
            self._next_flush = self._loop.time() + FLUSH_INTERVAL
            await self.flush()

    def _apply_quotas(self, quotas: dict) -> None:
        """Take what other relays of a fleet charged (bytes left per account)."""
        if self._batch is not None:
            return  # our own batch is in flight: the next look sees it applied
        accounts = self.snap.accounts
        for aid, left in quotas.items():
            acct = accounts.get(aid)
            if acct is not None and acct.quota_bytes != left:
                accounts[aid] = dataclasses.replace(acct, quota_bytes=left)
        self._enforce()

    async def reload(self) -> None:
        """Read a new snapshot and apply it (removed kites stop flying).  A store that keeps
        a log of its changes (Redis) gives only what changed since our version."""
        if self.version is not None and hasattr(self.store, "changes_since"):
            delta = await self.db_call(self.store.changes_since, self.version)
            if delta is not None:
                self._apply_changes(*delta)
                return
        while True:
            flushes = self._flushes
            version = await self.db_call(self.store.data_version)
            snap = await self.db_call(self.store.snapshot)
            if flushes == self._flushes:  # else our own flush landed in between: read again
                break
        self.snap = snap
        self.version = version
        self._drop_removed()
        self._enforce()

    def _apply_changes(self, version: int, accounts: dict, kites: dict) -> None:
        """Apply a store's changes (None: removed) to the snapshot, as a reload would."""
        snap = self.snap
        for aid, acct in accounts.items():
            if acct is None:
                snap.accounts.pop(aid, None)
            else:
                snap.accounts[aid] = acct  # (charges in flight: left() subtracts them)
        for name, kite in kites.items():
            if kite is None:
                snap.kites.pop(name, None)
            else:
                snap.kites[name] = kite
        self.version = version
        if accounts or kites:
            log.info("registry: %d accounts and %d kites changed (version %d)", len(accounts),
                     len(kites), version)
        self._drop_removed()
        self._enforce()

    def _drop_removed(self) -> None:
        """Stop flying the kites no longer in the registry (nor granted statically)."""
        state = self.state
        kites = self.snap.kites
        for proto, domain in state.routes.kites():
            kite = kites.get(domain)
            if (kite is not None and kite.allows(proto)) or state.grants.find(proto, domain):
                continue
            state.drop_kite(proto, domain, "kite removed from the registry")

    # -- counting ---------------------------------------------------------------------------------
    def opened(self, stream, peeked: int) -> None:
        """A visitor stream starts; ``peeked`` bytes of it travelled in the open chunk."""
        kite, acct = self.owner(stream.host)
        if kite is not None and acct is not None:
            self._seen[stream] = [kite.name, acct.id, -peeked]
            self._open[kite.name] = self._open.get(kite.name, 0) + 1

    def count(self, stream, final: bool = False) -> None:
        entry = self._seen.pop(stream, None) if final else self._seen.get(stream)
        if entry is None:
            return
        if final:
            left = self._open.get(entry[0], 1) - 1
            if left > 0:
                self._open[entry[0]] = left
            else:
                self._open.pop(entry[0], None)
        slot = stream.slot
        total = slot.sent + slot.received
        n = total - entry[2]
        if n:
            entry[2] = total
            self._kites[entry[0]] = self._kites.get(entry[0], 0) + n
            aid = entry[1]
            self._accounts[aid] = self._accounts.get(aid, 0) + n
            acct = self.snap.accounts.get(aid)
            charge = n if acct is None else min(n, max(self.left(acct), 0))
            self._charged[aid] = self._charged.get(aid, 0) + charge

    def tick(self) -> None:
        """Count the open streams, then block accounts that ran out."""
        for stream in list(self._seen):
            if stream.closed:
                self.count(stream, final=True)
            else:
                self.count(stream)
        self._enforce()

    def _enforce(self) -> None:
        now = time.time()
        blocked = {}
        for aid, acct in self.snap.accounts.items():
            reason = acct.blocked(now) or ("quota" if self.left(acct) <= 0 else None)
            if reason:
                blocked[aid] = reason
        for aid in blocked.keys() - self.blocked.keys():
            self._urgent = True
            log.info("account %s blocked: %s", self.snap.accounts[aid].email, blocked[aid])
        for aid in self.blocked.keys() - blocked.keys():
            acct = self.snap.accounts.get(aid)
            if acct is not None:
                log.info("account %s may fly again", acct.email)
        self.blocked = blocked
        if blocked:
            for stream, (_name, aid, _n) in list(self._seen.items()):
                if aid in blocked:
                    self.count(stream, final=True)
                    self.state.cut_stream(stream)
        self._tell_quota()

    def _tell_quota(self) -> None:
        """In-tunnel ``Quota`` chunks (kB left) when an account's quota changed by 1 %."""
        for tunnel in list(self.state.tunnels):
            if not tunnel.kites or tunnel.closed:
                continue
            for _proto, domain in tunnel.kites:
                _kite, acct = self.owner(domain)
                if acct is None:
                    continue
                kb = max(self.left(acct), 0) // 1024
                last = self._quota_sent.get((tunnel, acct.id))
                if last is None or abs(last - kb) > max(last // 100, 0) or (kb == 0) != (last == 0):
                    self._quota_sent[(tunnel, acct.id)] = kb
                    tunnel.write_chunk(*control.build_quota(kb))
                break
        for key in [k for k in self._quota_sent if k[0].closed]:
            del self._quota_sent[key]

    # -- flushing ---------------------------------------------------------------------------------
    async def flush(self) -> bool:
        """Write the counts as one numbered batch; True when nothing is left to write."""
        if self._batch is None:
            if not (self._accounts or self._kites or self._presence):
                return True
            self.seq += 1
            self._batch = UsageBatch(self.seq, time.strftime("%Y-%m-%d", time.gmtime()),
                                     self._accounts, self._kites, self._presence, self._charged)
            self._accounts, self._kites, self._presence, self._charged = {}, {}, [], {}
        batch = self._batch
        try:
            await self.db_call(self.store.flush, self.relay_id, batch)
        except StoreError as exc:
            log.warning("registry: flush %d failed, will retry: %s", batch.seq, exc)
            return False
        self._batch = None
        self._flushes += 1
        accounts = self.snap.accounts
        for aid, n in batch.accounts.items():  # the snapshot follows our own commit
            acct = accounts.get(aid)
            if acct is not None:
                accounts[aid] = dataclasses.replace(
                    acct, quota_bytes=max(acct.quota_bytes - batch.charged.get(aid, n), 0),
                    period_bytes=acct.period_bytes + n, total_bytes=acct.total_bytes + n)
        return True
