"""Which relays of a fleet fly which kite, shared in Redis (``kite relay --redis``).

Each relay keeps, on its event loop (redis-py's ``redis.asyncio``):

- the fleet's secret ``kite:fleet:secret`` (made by the first relay; relays hand visitors
  to each other with it, :mod:`kite.relay.fleetlink`);
- its own entry, refreshed every :data:`HEARTBEAT` s with a lifetime of :data:`TTL` s:
  ``kite:fleet:relays`` (sorted set, relay id -> expiry time), ``kite:fleet:info:ID`` (JSON:
  public addresses, the address other relays hand visitors to and the SHA-256 fingerprint
  of its certificate, which they pin) and
  ``kite:fleet:kites:ID`` (set of ``"PROTO NAME"`` it flies);
- a map in memory of every live relay's kites, for lookups that never wait for Redis
  (:meth:`FleetPresence.holders`, :meth:`FleetPresence.addresses`).  Changes arrive at once
  on the channel ``kite:fleet:events``; every :data:`RESYNC` s the whole map is read again,
  which also forgets relays whose entry expired (a relay killed with ``kill -9`` is gone
  from every map within ``TTL + RESYNC`` s).  A clean shutdown removes the entry at once.

Redis unreachable: the map keeps what it knew (visitors keep being served and steered),
the failure is logged once, and when Redis answers again this relay writes its whole set of
kites anew (so nothing that changed meanwhile is lost) and reads the map again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from typing import Callable, Iterable, Optional

from ..errors import StoreError

try:
    import redis
    import redis.asyncio as aioredis
except ImportError:  # pragma: no cover - the [fleet] extra is not installed
    redis = None  # type: ignore[assignment]
    aioredis = None  # type: ignore[assignment]

log = logging.getLogger("kite.fleet")

__all__ = ["FleetPresence", "TTL", "HEARTBEAT", "RESYNC"]

#: Seconds a relay's entry lives without a heartbeat.
TTL = 15.0
#: Seconds between heartbeats (a third of TTL: two may be lost).
HEARTBEAT = 5.0
#: Seconds between full reads of the map (bounds how long a dead relay is still answered).
RESYNC = 10.0
#: Seconds a Redis command may take.
TIMEOUT = 3.0
#: Seconds close() waits for the presence tasks to stop after cancelling them.
CLOSE_WAIT = TIMEOUT + 1.0
#: Seconds to wait for every relay to confirm TXT values (ACME DNS-01) before answering.
TXT_ACK_TIMEOUT = 5.0

ChangeListener = Callable[[str, str], None]  # (proto, name): who holds it changed


class FleetPresence:
    """This relay's presence in the fleet, and its view of every other relay's."""

    def __init__(self, url: str, relay_id: str, public_ips: Iterable[str] = (), *,
                 forward: Optional[str] = None, fingerprint: Optional[str] = None,
                 prefix: str = "kite:fleet:",
                 ttl: float = TTL, heartbeat: float = HEARTBEAT, resync: float = RESYNC) -> None:
        if aioredis is None:
            raise StoreError("--redis needs the redis client: pip install 'kite-relay[fleet]'")
        self.url = url
        self.relay_id = relay_id
        self.ips = list(public_ips)
        self.info = {"ips": self.ips, "forward": forward, "fingerprint": fingerprint}
        self.secret = ""  # the fleet's shared secret (relays hand visitors over with it)
        self.p = prefix
        self.ttl, self.heartbeat, self.resync = ttl, heartbeat, resync
        self.local: set = set()  # "PROTO NAME" flown here
        self.remote: dict = {}  # relay id -> set of "PROTO NAME"
        self.relays: dict = {}  # relay id -> info (ips, forward)
        self._listeners: list = []
        self._txt_listeners: list = []  # (name, values, add) from other relays (ACME DNS-01)
        self._pending: list = []  # (member, online) not yet written
        self._wake = asyncio.Event()
        self._dirty = True  # write the whole local set at the next chance
        self._healthy = True
        self._tasks: list = []
        self._closing = False
        self._acks: set = set()
        self._recorders: list = []  # one list per full read in flight: the events it overlaps
        self.r = aioredis.Redis.from_url(url, socket_timeout=TIMEOUT,
                                         socket_connect_timeout=TIMEOUT, decode_responses=True)

    # -- lookups (memory only) --------------------------------------------------------------------
    def holders(self, proto: str, name: str) -> set:
        """Ids of the relays (this one included) that fly ``proto:name`` now."""
        member = f"{proto} {name}"
        out = {rid for rid, kites in self.remote.items() if member in kites}
        if member in self.local:
            out.add(self.relay_id)
        return out

    def addresses(self, name: str) -> list:
        """Public addresses of every relay that flies any kite ``name`` (sorted)."""
        ips: set = set()
        if any(m.split(" ", 1)[1] == name for m in self.local):
            ips.update(self.ips)
        for rid, kites in self.remote.items():
            if any(m.split(" ", 1)[1] == name for m in kites):
                ips.update(self.relays.get(rid, {}).get("ips", ()))
        return sorted(ips)

    def remote_addresses(self, name: str) -> list:
        """Public addresses of the other relays that fly any kite ``name`` (sorted)."""
        ips: set = set()
        for rid, kites in self.remote.items():
            if any(m.split(" ", 1)[1] == name for m in kites):
                ips.update(self.relays.get(rid, {}).get("ips", ()))
        return sorted(ips)

    def subscribe_txt(self, listener: Callable[[str, list, bool], None]) -> None:
        """``listener(name, values, add)`` when another relay publishes (``add``) or withdraws
        TXT values: every relay's DNS serves the fleet's ACME DNS-01 challenges."""
        self._txt_listeners.append(listener)

    async def share_txt(self, name: str, values: list, add: bool,
                        timeout: float = TXT_ACK_TIMEOUT) -> int:
        """Publish (or withdraw) TXT ``values`` at ``name`` on every other live relay and wait
        until each has applied it (at most ``timeout`` s); returns how many did."""
        nonce = secrets.token_hex(8)
        others = [r for r in self.relays if r != self.relay_id]
        await self.r.publish(self._k("events"), json.dumps(
            {"relay": self.relay_id, "txt": name, "values": list(values), "add": add,
             "ack": nonce}))
        key = self._k(f"txt-ack:{nonce}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            acks = int(await self.r.scard(key))
            if acks >= len(others) or loop.time() >= deadline:
                if acks < len(others):
                    log.warning("fleet: %d of %d relays confirmed the TXT values at %s",
                                acks, len(others), name)
                return acks
            await asyncio.sleep(0.05)

    def subscribe(self, listener: ChangeListener) -> None:
        """``listener(proto, name)`` after the set of relays holding a kite changed."""
        self._listeners.append(listener)

    # -- this relay's kites -----------------------------------------------------------------------
    def presence(self, proto: str, name: str, online: bool) -> None:
        """This relay started or stopped flying ``proto:name`` (a RelayState listener)."""
        member = f"{proto} {name}"
        if online:
            self.local.add(member)
        else:
            self.local.discard(member)
        self._pending.append((member, online))
        self._wake.set()

    def on_presence(self, event) -> None:
        self.presence(event.proto, event.domain, event.online)

    # -- life -------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Register and read the map once (raises StoreError if Redis does not answer)."""
        try:
            await self.r.set(self._k("secret"), secrets.token_urlsafe(32), nx=True)
            self.secret = str(await self.r.get(self._k("secret")))
            await self._write_all()
            ps = await self._subscribe()  # closes what it opened if it fails
        except (redis.RedisError, OSError, asyncio.TimeoutError) as exc:
            raise StoreError(f"fleet presence in Redis: {exc or type(exc).__name__}") from None
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._writer()), loop.create_task(self._reader()),
                       loop.create_task(self._listen(ps))]
        log.info("fleet: relay %s, %d other relays, %d of their kites", self.relay_id,
                 len(self.remote), sum(len(k) for k in self.remote.values()))

    async def close(self) -> None:
        """Leave the fleet at once (other relays stop answering with this relay)."""
        # The writer also stops on the flag: Python 3.11's wait_for() swallows a cancel that
        # arrives as its event is set (a kite going offline at shutdown sets it).
        self._closing = True
        self._wake.set()
        for t in self._tasks:
            t.cancel()
        # Each task ends on the cancel, or on the flag at its next turn where a wait_for
        # swallowed the cancel; close() waits for them a bounded time, never for ever.
        stuck: set = set()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=CLOSE_WAIT)
        if stuck:
            log.warning("fleet: %d presence task(s) did not stop within %g s; left to the "
                        "event loop", len(stuck), CLOSE_WAIT)
        try:
            pipe = self.r.pipeline(transaction=True)
            pipe.zrem(self._k("relays"), self.relay_id)
            pipe.delete(self._k(f"kites:{self.relay_id}"), self._k(f"info:{self.relay_id}"))
            pipe.publish(self._k("events"), json.dumps({"relay": self.relay_id, "gone": True}))
            await asyncio.wait_for(pipe.execute(), TIMEOUT)
        except (redis.RedisError, OSError, asyncio.TimeoutError) as exc:
            log.warning("fleet: could not leave cleanly (%s); the entry expires in %g s",
                        exc, self.ttl)
        try:
            await asyncio.wait_for(self.r.aclose(), TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("fleet: closing the Redis connections took over %g s; left", TIMEOUT)

    def _k(self, name: str) -> str:
        return self.p + name

    def _failed(self, what: str, exc: BaseException) -> None:
        if self._healthy:
            log.warning("fleet: Redis %s failed (%s); serving with what is known", what, exc)
        self._healthy = False
        self._dirty = True

    def _recovered(self) -> None:
        if not self._healthy:
            log.info("fleet: Redis answers again")
        self._healthy = True

    # -- writing ----------------------------------------------------------------------------------
    async def _write_all(self) -> None:
        """This relay's entry and its whole set of kites, replacing what Redis had."""
        key = self._k(f"kites:{self.relay_id}")
        members = sorted(self.local)
        self._pending.clear()
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(key)
        if members:
            pipe.sadd(key, *members)
        pipe.expire(key, int(self.ttl))
        pipe.set(self._k(f"info:{self.relay_id}"), json.dumps(self.info), ex=int(self.ttl))
        pipe.zadd(self._k("relays"), {self.relay_id: time.time() + self.ttl})
        pipe.publish(self._k("events"), json.dumps({"relay": self.relay_id, "all": members,
                                                    "info": self.info}))
        await pipe.execute()
        self._dirty = False

    async def _write_pending(self) -> None:
        changes, self._pending = self._pending, []
        key = self._k(f"kites:{self.relay_id}")
        pipe = self.r.pipeline(transaction=True)
        for member, online in changes:
            (pipe.sadd if online else pipe.srem)(key, member)
        pipe.expire(key, int(self.ttl))
        pipe.publish(self._k("events"), json.dumps(
            {"relay": self.relay_id, "up": [m for m, on in changes if on],
             "down": [m for m, on in changes if not on]}))
        try:
            await pipe.execute()
        except BaseException:
            self._pending[:0] = changes
            raise

    async def _beat(self) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.zadd(self._k("relays"), {self.relay_id: time.time() + self.ttl})
        pipe.expire(self._k(f"kites:{self.relay_id}"), int(self.ttl))
        pipe.set(self._k(f"info:{self.relay_id}"), json.dumps(self.info), ex=int(self.ttl))
        await pipe.execute()

    async def _writer(self) -> None:
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + self.heartbeat
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), max(next_beat - loop.time(), 0))
            except asyncio.TimeoutError:
                pass
            if self._closing:
                return
            self._wake.clear()
            try:
                if self._dirty:
                    await self._write_all()
                    await self._read_all()
                elif self._pending:
                    await self._write_pending()
                if loop.time() >= next_beat:
                    await self._beat()
                    next_beat = loop.time() + self.heartbeat
                self._recovered()
            except (redis.RedisError, OSError) as exc:
                self._failed("write", exc)
                next_beat = loop.time() + min(self.heartbeat, 1.0)  # retry soon

    # -- reading ----------------------------------------------------------------------------------
    async def _read_all(self) -> None:
        """Read every live relay's kites and info; forget the expired ones.  The events that
        arrive while it reads are applied again on top of what it read: the read may have
        seen the map before them, and must not undo them."""
        during: list = []
        self._recorders.append(during)
        try:
            remote, relays = await self._fetch()
        finally:
            self._recorders.remove(during)
        self._replace(remote, relays)
        for ev in during:
            self._apply(ev)

    async def _fetch(self) -> tuple[dict, dict]:
        """Every live relay's kites and info, as Redis has them now."""
        now = time.time()
        live = [str(r) for r in await self.r.zrangebyscore(self._k("relays"), now, "+inf")
                if r != self.relay_id]
        pipe = self.r.pipeline(transaction=False)
        for rid in live:
            pipe.smembers(self._k(f"kites:{rid}"))
            pipe.get(self._k(f"info:{rid}"))
        got = await pipe.execute() if live else []
        remote, relays = {}, {}
        for i, rid in enumerate(live):
            kites, info = got[2 * i], got[2 * i + 1]
            if info is None:  # expired between the two reads
                continue
            remote[rid] = set(kites)
            relays[rid] = json.loads(info)
        await self.r.zremrangebyscore(self._k("relays"), "-inf", now - self.ttl)
        return remote, relays

    def _replace(self, remote: dict, relays: dict) -> None:
        before = self.remote
        self.remote, self.relays = remote, relays
        changed: set = set()
        for rid in before.keys() | remote.keys():
            changed |= before.get(rid, set()) ^ remote.get(rid, set())
        self._notify(changed)

    def _txt_event(self, ev: dict) -> None:
        try:
            name, values, add = str(ev["txt"]), [str(v) for v in ev["values"]], bool(ev["add"])
        except (KeyError, TypeError, ValueError):
            log.warning("fleet: ignored a malformed TXT event")
            return
        for listener in self._txt_listeners:
            try:
                listener(name, values, add)
            except Exception as exc:  # e.g. a name outside this relay's zone
                log.warning("fleet: TXT values at %s not applied: %s", name, exc)
        nonce = ev.get("ack")
        if isinstance(nonce, str) and nonce.isalnum():
            task = asyncio.get_running_loop().create_task(self._ack(nonce))
            self._acks.add(task)
            task.add_done_callback(self._acks.discard)

    async def _ack(self, nonce: str) -> None:
        key = self._k(f"txt-ack:{nonce}")
        try:
            pipe = self.r.pipeline(transaction=True)
            pipe.sadd(key, self.relay_id)
            pipe.expire(key, 60)
            await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self._failed("acknowledge", exc)

    def _notify(self, members: Iterable[str]) -> None:
        for member in members:
            proto, _, name = member.partition(" ")
            for listener in self._listeners:
                try:
                    listener(proto, name)
                except Exception:  # a listener's bug must not stop the fleet's view
                    log.exception("fleet: presence listener failed")

    async def _reader(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.resync)
            try:
                await self._read_all()
                self._recovered()
            except (redis.RedisError, OSError) as exc:
                self._failed("read", exc)

    async def _subscribe(self):
        """Listen to the channel, then read the whole map: subscribed first (Redis confirmed
        it), so that no change published between the two is missed.  Changes published
        before the read and delivered after it are applied again, in order: the map ends
        where the fleet is."""
        ps = self.r.pubsub()
        try:
            await ps.subscribe(self._k("events"))
            while True:
                msg = await asyncio.wait_for(ps.get_message(timeout=TIMEOUT), TIMEOUT + 1)
                if msg is None:
                    raise asyncio.TimeoutError("no confirmation of the subscription")
                if msg.get("type") == "subscribe":
                    break
            await self._read_all()
        except BaseException:
            await ps.aclose()
            raise
        return ps

    async def _listen(self, ps) -> None:
        """Apply other relays' changes as they are published (``ps``: subscribed already;
        after a failure, subscribed again and the map read again)."""
        while not self._closing:
            try:
                if ps is None:
                    ps = await self._subscribe()
                    self._recovered()
                async with ps:
                    async for msg in ps.listen():
                        if msg.get("type") == "message":
                            self._event(msg["data"])
            except (redis.RedisError, OSError, asyncio.TimeoutError) as exc:
                self._failed("subscribe", exc)
                await asyncio.sleep(1.0)
            ps = None

    def _event(self, data: str) -> None:
        try:
            ev = json.loads(data)
            rid = ev["relay"]
        except (ValueError, KeyError, TypeError):
            log.warning("fleet: ignored a malformed event on the channel")
            return
        if rid == self.relay_id:
            return
        if "txt" in ev:
            self._txt_event(ev)
            return
        for during in self._recorders:
            during.append(ev)
        self._apply(ev)

    def _apply(self, ev: dict) -> None:
        """Another relay's change (kites up or down, its whole set, or its leaving)."""
        rid = ev["relay"]
        kites = self.remote.get(rid, set())
        if ev.get("gone"):
            self.remote.pop(rid, None)
            self.relays.pop(rid, None)
            self._notify(kites)
            return
        if "all" in ev:
            new = set(ev["all"])
            self.remote[rid] = new
            self.relays[rid] = ev.get("info") or self.relays.get(rid, {})
            self._notify(kites ^ new)
            return
        up, down = set(ev.get("up", ())), set(ev.get("down", ()))
        if rid not in self.remote:
            self.remote[rid] = kites  # its info arrives with the next full read
        kites |= up
        kites -= down
        self._notify(up | down)
