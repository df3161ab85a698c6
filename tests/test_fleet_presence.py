"""Fleet presence in a real redis-server (kite.store.presence): a kite one relay flies is
seen by another at once, a relay that stops without leaving (kill -9) is forgotten after
its entry expires, a clean leave is seen at once, and a Redis restart loses nothing that
the relays still fly.  Short lifetimes keep the test quick; the logic is the same."""

from __future__ import annotations

import asyncio
import time

import pytest

from kite.store.presence import FleetPresence
from redisd import RedisServer

FAST = {"ttl": 2.0, "heartbeat": 0.4, "resync": 0.5}


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


async def until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


def test_presence_spreads_and_expires(redis_server):
    async def main():
        url = redis_server.url(4)
        a = FleetPresence(url, "A", ["192.0.2.1"], forward="127.0.0.2:443", **FAST)
        b = FleetPresence(url, "B", ["192.0.2.2", "2001:db8::2"], **FAST)
        seen: list = []
        b.subscribe(lambda proto, name: seen.append((proto, name)))
        await a.start()
        await b.start()
        a.presence("http", "app.example.com", True)
        await until(lambda: b.holders("http", "app.example.com") == {"A"}, 5, "B sees A's kite")
        assert ("http", "app.example.com") in seen
        assert b.addresses("app.example.com") == ["192.0.2.1"]
        assert b.relays["A"]["forward"] == "127.0.0.2:443"
        b.presence("http", "app.example.com", True)
        await until(lambda: a.holders("http", "app.example.com") == {"A", "B"}, 5, "A sees B")
        assert a.addresses("app.example.com") == ["192.0.2.1", "192.0.2.2", "2001:db8::2"]
        a.presence("http", "app.example.com", False)
        await until(lambda: b.holders("http", "app.example.com") == {"B"}, 5, "A's kite goes")

        # A stops without leaving (its tasks die, as with kill -9): forgotten after the TTL.
        a.presence("raw-22", "box.example.com", True)
        await until(lambda: b.holders("raw-22", "box.example.com") == {"A"}, 5, "box up")
        for t in a._tasks:
            t.cancel()
        await asyncio.gather(*a._tasks, return_exceptions=True)
        t0 = time.monotonic()
        await until(lambda: not b.holders("raw-22", "box.example.com"), 10, "A forgotten")
        assert time.monotonic() - t0 >= 1.0  # not before its entry could have expired
        await a.r.aclose()

        # A clean leave is seen at once (no wait for the TTL).
        c = FleetPresence(url, "C", ["192.0.2.3"], ttl=30, heartbeat=10, resync=30)
        await c.start()
        c.presence("https", "c.example.com", True)
        await until(lambda: b.holders("https", "c.example.com") == {"C"}, 5, "C's kite")
        await c.close()
        await until(lambda: not b.holders("https", "c.example.com"), 2, "C left")
        await b.close()

    asyncio.run(main())


async def _two_relays(url):
    """Relays A and B sharing the registry at ``url``, started (the caller closes them)."""
    a = FleetPresence(url, "A", ["192.0.2.1"], **FAST)
    b = FleetPresence(url, "B", ["192.0.2.2"], **FAST)
    await a.start()
    await b.start()
    return a, b


def test_redis_restart_loses_nothing(tmp_path):
    (tmp_path / "first").mkdir()
    first = RedisServer(tmp_path / "first")
    servers = [first]

    async def main():
        url = first.url(5)
        a, b = await _two_relays(url)
        a.presence("http", "one.example.com", True)
        await until(lambda: b.holders("http", "one.example.com") == {"A"}, 5, "one up")
        first.stop()  # persistence is off: Redis comes back empty
        a.presence("http", "two.example.com", True)  # a change while Redis is away
        await until(lambda: not a._healthy and not b._healthy, 5, "both see Redis gone")
        assert b.holders("http", "one.example.com") == {"A"}  # what was known stays
        (tmp_path / "second").mkdir()
        servers.append(RedisServer(tmp_path / "second", port=first.port))
        await until(lambda: b.holders("http", "two.example.com") == {"A"}, 10,
                    "A rewrites its kites when Redis is back, B reads them")
        assert b.holders("http", "one.example.com") == {"A"}
        await until(lambda: a.holders("http", "none.example.com") == set() and
                    "B" in a.relays, 10, "B's entry is back too")
        await b.close()
        await a.close()

    try:
        asyncio.run(main())
    finally:
        for s in servers:
            s.stop()


def test_close_right_after_a_change_leaves(redis_server):
    """A kite that goes offline as the relay shuts down (its change wakes the writer just
    as close() cancels it) must not keep the writer alive: close() returns and the relay
    is gone from Redis."""
    async def main():
        url = redis_server.url(5)
        a, b = await _two_relays(url)
        a.presence("http", "app.example", True)
        await until(lambda: b.holders("http", "app.example") == {"A"}, 5, "B sees A's kite")
        a.presence("http", "app.example", False)
        await asyncio.wait_for(a.close(), 10)  # a bound on a hang, not a measurement
        await until(lambda: "A" not in b.relays, 5, "B sees A leave")
        await b.close()

    asyncio.run(main())


def test_close_is_bounded_when_a_task_ignores_its_cancel(redis_server, caplog):
    """A presence task that swallows its cancel (as a Python 3.11 wait_for can) holds
    close() for a bounded time only; the relay still leaves the fleet."""
    async def main():
        a, b = await _two_relays(redis_server.url(5))
        released = False

        async def deaf() -> None:
            while not released:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    pass

        stuck = asyncio.get_running_loop().create_task(deaf())
        a._tasks.append(stuck)
        await asyncio.wait_for(a.close(), 20)  # a bound on a hang, not a measurement
        assert "did not stop" in caplog.text
        await until(lambda: "A" not in b.relays, 5, "B sees A leave")
        await b.close()
        released = True
        stuck.cancel()
        await stuck

    asyncio.run(main())


def test_a_change_just_after_the_first_read_is_seen_at_once(redis_server):
    """A relay that starts subscribes to the channel before it reads the map: a kite that
    another relay brings up just after that read reaches it on the channel, not at the
    next full read (an hour away here)."""

    async def main():
        url = redis_server.url(5)
        a = FleetPresence(url, "A", ["192.0.2.1"], **FAST)
        await a.start()

        class ReadThenChange(FleetPresence):
            changed = False

            async def _read_all(self) -> None:
                await super()._read_all()
                if not self.changed:
                    self.changed = True
                    a.presence("http", "late.example.com", True)  # right after the read
                    key, member = a._k("kites:A"), "http late.example.com"
                    deadline = time.monotonic() + 5
                    while not await a.r.sismember(key, member):  # A wrote and published it
                        assert time.monotonic() < deadline, "A never wrote its kite"
                        await asyncio.sleep(0.01)

        b = ReadThenChange(url, "B", ["192.0.2.2"], ttl=60.0, heartbeat=20.0, resync=3600.0)
        await b.start()
        try:
            assert b.changed
            await until(lambda: b.holders("http", "late.example.com") == {"A"}, 5,
                        "B sees the kite A brought up just after B read the map")
        finally:
            await b.close()
            await a.close()

    asyncio.run(main())


def test_a_full_read_does_not_undo_a_change_that_came_meanwhile(redis_server):
    """A full read of the map may return what Redis held before a change that reached this
    relay on the channel while the read was under way: the change stays applied."""

    async def main():
        url = redis_server.url(6)
        a = FleetPresence(url, "A", ["192.0.2.1"], **FAST)
        await a.start()

        class SlowRead(FleetPresence):
            during_read = None  # what to do after fetching and before the read returns

            async def _fetch(self):
                got = await super()._fetch()
                if self.during_read is not None:
                    await self.during_read()
                return got

        b = SlowRead(url, "B", ["192.0.2.2"], ttl=60.0, heartbeat=20.0, resync=3600.0)
        await b.start()

        async def kite_up_meanwhile():
            a.presence("http", "meanwhile.example.com", True)
            await until(lambda: b.holders("http", "meanwhile.example.com") == {"A"}, 5,
                        "the change reaches B on the channel during the read")

        try:
            b.during_read = kite_up_meanwhile
            await b._read_all()  # what B's reader does every RESYNC s
            assert b.holders("http", "meanwhile.example.com") == {"A"}
        finally:
            await b.close()
            await a.close()

    asyncio.run(main())
