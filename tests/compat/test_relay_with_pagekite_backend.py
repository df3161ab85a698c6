"""``kite relay`` as the frontend of real pagekite.py 1.5.2 backends.

A site that keeps its pagekite.py backends can replace the frontend with kite: every kite
protocol, both tunnel encodings (plain, and pagekite's ``--fe_certname`` TLS), both
registration variants, ZChunks, several kites per tunnel, refusals with the reason
pagekite.py logs, bursts, bulk transfers, slow visitors and backend restarts.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from compat_env import (
    FE_NAME,
    SECRET,
    MiB,
    ZCounter,
    be_flying_marker,
    blob,
    burst_size,
    check_kites,
    download,
    http_get,
    kite_name,
    kite_relay,
    report,
    sha,
    start_services,
    upload,
)

from support import run

pytestmark = pytest.mark.compat

WEB, WEB2, SECURE, BOX, BULK = (kite_name(n) for n in ("web", "web2", "secure", "box", "bulk"))


def services_of(svc):
    return [("http", WEB, svc.web), ("http", WEB2, svc.web), ("https", SECURE, svc.https),
            ("raw-22", BOX, svc.raw)]


async def fly(pagekite, relay, services, **kw):
    """Start a pagekite.py backend on ``relay`` and wait until every kite is live."""
    be = pagekite.backend(relay.port, services, **kw)
    for proto, domain, *_ in services:
        await be.await_log(be_flying_marker(relay.port, proto, domain))
    return be


# (tunnel, kite relay --zchunks, pagekite.py ZChunks); --nozchunks also means re-connect
# registration (docs/protocol.md §13.3).
VARIANTS = [
    pytest.param("plain", True, True, "uvloop", id="plain-inband-zchunks-uvloop"),
    pytest.param("plain", True, True, "asyncio", id="plain-inband-zchunks-asyncio"),
    pytest.param("plain", False, True, "uvloop", id="plain-inband-nozchunks"),
    pytest.param("tls", True, True, "asyncio", id="tls-inband-zchunks"),
    pytest.param("plain", True, False, "uvloop", id="plain-reconnect"),
    pytest.param("tls", False, False, "uvloop", id="tls-reconnect"),
]


@pytest.mark.parametrize("tunnel,relay_z,be_z,loop_kind", VARIANTS)
def test_pagekite_backend_flies_every_kite_protocol(pagekite, certs, monkeypatch, tunnel,
                                                    relay_z, be_z, loop_kind):
    zc = ZCounter(monkeypatch)

    async def main():
        svc = await start_services(certs)
        # pagekite.py's own bug: after a re-connect registration over TLS its tunnel socket
        # stays in blocking mode, and a spurious second read in one loop (epoll
        # re-registration) hangs it until the frontend sends something - its first stream
        # waits for kite's keepalive PING (after keepalive/2 s of silence; pagekite.py's own
        # frontend hangs it far longer).  A short keepalive keeps this variant quick.
        keepalive = 6.0 if (tunnel, be_z) == ("tls", False) else 30.0
        async with kite_relay(certs, zchunks=relay_z, keepalive=keepalive) as relay:
            be = await fly(pagekite, relay, services_of(svc), tls=tunnel == "tls", zchunks=be_z)
            # One tunnel carries all four kites.
            assert len(relay.state.tunnels) == 1
            t = next(iter(relay.state.tunnels))
            assert sorted(t.kites) == sorted([("http", WEB), ("http", WEB2), ("https", SECURE),
                                              ("raw-22", BOX)])
            assert t.tls == (tunnel == "tls")
            assert not t.kite_peer  # pagekite.py: small windows, frame budget
            assert t.frame_budget is not None and t.frame_budget.tls == (tunnel == "tls")
            # Registration: in-band NOOP round by default; --nozchunks re-connects (§2.4).
            assert t.registered_by == ("inband" if be_z else "connect")
            await check_kites(relay.port, certs, web=WEB, extra_web=(WEB2,), raw=BOX)
            # A response > 64 bytes: pagekite.py compresses it iff kite advertised ZChunks.
            head, body = await http_get(relay.port, WEB, "/" + "z" * 200)
            assert head.startswith(b"HTTP/1.1 200")
            if relay_z and be_z:
                assert zc.count > 0, "pagekite.py sent no ZChunks although kite advertised them"
            else:
                assert zc.count == 0
            be.assert_healthy()
        svc.close()

    run(main, loop_kind, timeout=120)


@pytest.mark.parametrize("secret,grants,reason", [
    pytest.param("not-the-secret", None, "signature", id="wrong-secret"),
    pytest.param(SECRET, [f"*:other.{FE_NAME}:{SECRET}"], "unauthorized", id="unknown-domain"),
])
def test_refusal_reason_reaches_pagekite_backend(pagekite, certs, caplog, secret, grants, reason):
    async def main():
        kw = {"grants": grants} if grants else {}
        async with kite_relay(certs, **kw) as relay:
            be = pagekite.backend(relay.port, [("http", WEB, 9, secret)])
            # What pagekite.py logs when a frontend refuses a kite (X-PageKite-Invalid-Why).
            await be.await_log(f"FE=127.0.0.1:{relay.port}; err=Rejected; proto=http; "
                               f"reason={reason}; domain={WEB}")
            assert not relay.state.routes.kites()
            head, _ = await http_get(relay.port, WEB)
            assert head.split(b" ")[1] in (b"503", b"404")
            be.assert_healthy()
        assert "not-the-secret" not in caplog.text and SECRET not in caplog.text

    run(main, "uvloop", timeout=60)


@pytest.mark.parametrize("tunnel", ["plain", "tls"])
def test_burst_of_visitors_never_overruns_pagekite_reader(pagekite, certs, tunnel):
    """800 visitors at once: kite's corked writes would put hundreds of stream-open chunks
    into one pagekite.py read ("Too much data" crash, §13.9); the frame budget prevents it."""
    n = burst_size(800)

    async def main():
        from support import start_http_server

        server, port = await start_http_server(b"burst\n")
        async with kite_relay(certs) as relay:
            be = await fly(pagekite, relay, [("http", WEB, port)], tls=tunnel == "tls")
            results = await asyncio.gather(*(http_get(relay.port, WEB, f"/{i}", timeout=60)
                                             for i in range(n)))
            assert all(body == b"burst\n" for _, body in results)
            t = next(iter(relay.state.tunnels))
            budget = t.frame_budget
            be.assert_healthy()
            report(f"burst of {n} visitors, kite relay -> pagekite.py BE ({tunnel}): "
                   f"{budget.pieces} writes, {budget.padded} padding bytes")
        server.close()

    run(main, "uvloop", timeout=120)


@pytest.mark.parametrize("tunnel,relay_z", [("plain", False), ("tls", True)])
def test_50mb_each_way(pagekite, certs, tunnel, relay_z):
    size = 50 * MiB

    async def main():
        svc = await start_services(certs)
        async with kite_relay(certs, zchunks=relay_z) as relay:
            be = await fly(pagekite, relay, [("http", BULK, svc.bulk)], tls=tunnel == "tls")
            got, digest, t_down = await download(relay.port, BULK, size)
            assert got == size and digest == sha(blob(size))
            digest, t_up = await upload(relay.port, BULK, size)
            assert digest == sha(blob(size))
            be.assert_healthy()
            report(f"kite relay <- pagekite.py BE, {tunnel}{' +ZChunks' if relay_z else ''}: "
                   f"50 MiB down {size / t_down / MiB:.1f} MiB/s, up {size / t_up / MiB:.1f} MiB/s")
        svc.close()

    run(main, "uvloop", timeout=240)


def test_slow_visitor_does_not_stall_the_tunnel(pagekite, certs):
    """A visitor that stops reading, and later reads at 256 KiB/s, shares the pagekite.py
    tunnel with a fast one: the fast one runs at full speed meanwhile, kite buffers no more
    than a flow-control window for the stalled one, and the slow one gets every byte."""
    slow_size, fast_size = 1 * MiB, 30 * MiB

    async def main():
        svc = await start_services(certs)
        async with kite_relay(certs) as relay:
            be = await fly(pagekite, relay, [("http", BULK, svc.bulk)])
            gate = asyncio.Event()
            slow = asyncio.ensure_future(download(relay.port, BULK, slow_size, read_size=16384,
                                                  pace=256 * 1024, gate=gate))
            await asyncio.sleep(0.5)
            got, digest, t_fast = await download(relay.port, BULK, fast_size)
            assert got == fast_size and digest == sha(blob(fast_size))
            assert not slow.done()  # the stalled one is still waiting...
            t = next(iter(relay.state.tunnels))
            for s in t.streams.values():  # ... and kite holds at most a window for it
                if s.transport is not None:
                    assert s.transport.get_write_buffer_size() <= 2 * t.window
            gate.set()
            got, digest, t_slow = await slow
            assert got == slow_size and digest == sha(blob(slow_size))
            be.assert_healthy()
            report(f"slow visitor via kite relay <- pagekite.py BE: fast stream "
                   f"{fast_size / t_fast / MiB:.1f} MiB/s while another visitor stalled")
        svc.close()

    run(main, "uvloop", timeout=120)


def test_backend_restart_in_the_middle(pagekite, certs):
    """pagekite.py dies mid-transfer: the visitor sees an error (never a clean, short end),
    the relay forgets the kite, and the restarted backend flies and serves again."""
    size = 200 * MiB

    async def main():
        svc = await start_services(certs)
        async with kite_relay(certs) as relay:
            be = await fly(pagekite, relay, [("http", BULK, svc.bulk)])
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(b"GET /blob/%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (size, BULK.encode()))
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(5 * MiB)
            be.stop()  # SIGKILL, mid-transfer
            got = 5 * MiB
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                while True:
                    data = await asyncio.wait_for(reader.read(MiB), 20)
                    if not data:
                        raise asyncio.IncompleteReadError(b"", None)
                    got += len(data)
            assert got < size
            writer.close()
            deadline = time.monotonic() + 10
            while relay.state.routes.kites() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert not relay.state.routes.kites()
            head, _ = await http_get(relay.port, BULK)
            assert head.startswith(b"HTTP/1.1 503")  # offline, not unknown
            be2 = await fly(pagekite, relay, [("http", BULK, svc.bulk)])
            got, digest, _ = await download(relay.port, BULK, 5 * MiB)
            assert got == 5 * MiB and digest == sha(blob(5 * MiB))
            be2.assert_healthy()
        svc.close()

    run(main, "uvloop", timeout=120)
