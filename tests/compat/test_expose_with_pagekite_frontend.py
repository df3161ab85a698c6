"""``kite expose`` flying kites on a real pagekite.py 1.5.2 frontend (``--isfrontend``).

A site that keeps its pagekite.py frontend can replace the backends with kite.  kite
tolerates that version's quirks: it reaches the TLS endpoint with ``CONNECT name:443``
(a direct ClientHello crashes the frontend, §13.1), registers with the re-connect variant
(the in-band variant dies at the first PING, §13.2), never sends more than 150 chunks per
read (§13.9), accepts empty data chunks before EOF, and gets ZChunks only when it asked.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from compat_env import (
    SECRET,
    MiB,
    ZCounter,
    blob,
    burst_size,
    check_kites,
    download,
    fe_live_marker,
    http_get,
    http_kite,
    https_kite,
    kite_backend,
    kite_name,
    raw_kite,
    relay_spec,
    report,
    sha,
    start_services,
    upload,
)

from support import KITE, Proc, run

pytestmark = pytest.mark.compat

WEB, WEB2, SECURE, BOX, BULK = (kite_name(n) for n in ("web", "web2", "secure", "box", "bulk"))


def kites_of(svc):
    return [http_kite(WEB, svc.web), http_kite(WEB2, svc.web), https_kite(SECURE, svc.https),
            raw_kite(BOX, svc.raw, 22)]


VARIANTS = [
    pytest.param("plain", False, "uvloop", id="plain-uvloop"),
    pytest.param("plain", False, "asyncio", id="plain-asyncio"),
    pytest.param("plain", True, "uvloop", id="plain-zchunks"),
    pytest.param("connect", False, "uvloop", id="tls-uvloop"),
    pytest.param("connect", True, "asyncio", id="tls-zchunks-asyncio"),
]


@pytest.mark.parametrize("mode,zchunks,loop_kind", VARIANTS)
def test_kite_expose_flies_every_kite_protocol(pagekite, certs, monkeypatch, mode, zchunks,
                                               loop_kind):
    zc = ZCounter(monkeypatch)
    fe = pagekite.frontend()

    async def main():
        svc = await start_services(certs)
        backend = kite_backend([relay_spec(fe.port, kites_of(svc), certs, mode)],
                               zchunks=zchunks)
        await backend.start()
        try:
            await backend.wait_flying(30)
            for proto, domain in (("http", WEB), ("http", WEB2), ("https", SECURE),
                                  ("raw-22", BOX)):
                await fe.await_log(fe_live_marker(proto, domain))
            tunnel = backend.connectors[0].tunnel
            # All four kites on one tunnel, registered with the re-connect variant.
            assert len(tunnel.flying) == 4
            assert tunnel.signed is not None
            assert not tunnel.kite_peer
            tls = tunnel.transport.get_extra_info("ssl_object") is not None
            assert tls == (mode == "connect")
            assert tunnel.frame_budget is not None and tunnel.frame_budget.tls == tls
            await check_kites(fe.port, certs, web=WEB, extra_web=(WEB2,), raw=BOX)
            # pagekite.py compresses what it sends (stream opens > 64 bytes) only if asked.
            head, _ = await http_get(fe.port, WEB, "/" + "z" * 200)
            assert head.startswith(b"HTTP/1.1 200")
            if zchunks:
                assert zc.count > 0, "the frontend sent no ZChunks although kite asked"
            else:
                assert zc.count == 0
            fe.assert_healthy()
        finally:
            await backend.close()
        svc.close()

    run(main, loop_kind, timeout=120)


@pytest.mark.parametrize("secret,domains,reason", [
    pytest.param("not-the-secret", None, "signature", id="wrong-secret"),
    pytest.param(SECRET, [f"*:other.example:{SECRET}"], "unauthorized", id="unknown-domain"),
])
def test_refused_kite_is_reported_with_the_reason(pagekite, certs, caplog, secret, domains,
                                                  reason):
    fe = pagekite.frontend(**({"domains": domains} if domains else {}))

    async def main():
        backend = kite_backend([relay_spec(fe.port, [http_kite(WEB, 9, secret=secret)], certs,
                                           "plain")])
        await backend.start()
        try:
            want = f"relay 127.0.0.1:{fe.port} refused kite http:{WEB}: {reason}"
            deadline = time.monotonic() + 20
            while want not in caplog.text and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert want in caplog.text
            assert not backend.connectors[0].flying.is_set()
            assert "not-the-secret" not in caplog.text and SECRET not in caplog.text
        finally:
            await backend.close()
        fe.assert_healthy()

    import logging

    with caplog.at_level(logging.INFO):
        run(main, "uvloop", timeout=60)


async def start_barrier_server(n: int, body: bytes):
    """An HTTP server that answers nobody until ``n`` requests have arrived, then everyone
    at once: the burst of answers and EOFs leaves kite in one go however slowly the
    visitors came in.  Returns (server, port, all_arrived event)."""
    arrived = 0
    everyone = asyncio.Event()

    async def handle(reader, writer):
        nonlocal arrived
        try:
            await reader.readuntil(b"\r\n\r\n")
            arrived += 1
            if arrived == n:
                everyone.set()
            await everyone.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % len(body) + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
    return server, server.sockets[0].getsockname()[1], everyone


@pytest.mark.parametrize("mode", ["plain", "connect"])
def test_burst_of_streams_never_overruns_pagekite_reader(pagekite, certs, mode):
    """600 visitors wait at once; kite's answers, empty chunks and EOFs for all of them leave
    in few writes; without the frame budget the frontend crashes with "Too much data" (§13.9).

    The visitors connect in waves of 50: pagekite.py listens with a backlog of 100 and
    accepts slowly, and a connection left in a full accept queue for over half a minute is
    reset by the kernel.  The server's barrier makes the burst, not the arrival rate."""
    n = burst_size(600)
    fe = pagekite.frontend()

    async def visitor(i):
        reader, writer = await asyncio.open_connection("127.0.0.1", fe.port)
        writer.write(b"GET /%d HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                     % (i, WEB.encode()))
        return reader, writer

    async def answer(reader, writer):
        try:
            data = await asyncio.wait_for(reader.read(), 60)
        finally:
            writer.close()
        return data.partition(b"\r\n\r\n")

    async def main():
        server, port, everyone = await start_barrier_server(n, b"burst\n")
        backend = kite_backend([relay_spec(fe.port, [http_kite(WEB, port)], certs, mode)])
        await backend.start()
        try:
            await backend.wait_flying(30)
            visitors = []
            for wave in range(0, n, 50):
                visitors += await asyncio.gather(*(visitor(i)
                                                   for i in range(wave, min(n, wave + 50))))
            try:
                await asyncio.wait_for(everyone.wait(), 60)
            except asyncio.TimeoutError:
                raise AssertionError(f"the local server got fewer than {n} requests; "
                                     f"pagekite.py log:\n{fe.tail(40)}") from None
            results = await asyncio.gather(*(answer(r, w) for r, w in visitors),
                                           return_exceptions=True)
            bad = [(i, r) for i, r in enumerate(results)
                   if isinstance(r, BaseException) or r[2] != b"burst\n"]
            assert not bad, (f"{len(bad)} of {n} visitors failed, first {bad[:3]}; "
                             f"pagekite.py log:\n{fe.tail(40)}")
            budget = backend.connectors[0].tunnel.frame_budget
            fe.assert_healthy()
            report(f"burst of {n} visitors, pagekite.py FE -> kite expose ({mode}): "
                   f"{budget.pieces} writes, {budget.padded} padding bytes")
        finally:
            await backend.close()
        server.close()

    run(main, "uvloop", timeout=150)


@pytest.mark.slow
def test_50mb_each_way_plain_and_tls(pagekite, certs):
    """50 MiB down and 50 MiB up, through a plain and a TLS tunnel at the same time (the
    frontend moves ~1.5 MB/s per stream: pagekite.py sleeps 5 ms per loop)."""
    size = 50 * MiB
    fe_plain, fe_tls = pagekite.frontend(), pagekite.frontend()

    async def main():
        svc = await start_services(certs)
        backend = kite_backend([
            relay_spec(fe_plain.port, [http_kite(BULK, svc.bulk)], certs, "plain"),
            relay_spec(fe_tls.port, [http_kite(BULK, svc.bulk)], certs, "connect")])
        await backend.start()
        try:
            await backend.wait_flying(30)
            results = await asyncio.gather(
                download(fe_plain.port, BULK, size), upload(fe_plain.port, BULK, size),
                download(fe_tls.port, BULK, size), upload(fe_tls.port, BULK, size))
            want = sha(blob(size))
            for (got, digest, _), (digest_up, _) in (results[0:2], results[2:4]):
                assert got == size and digest == want
                assert digest_up == want
            for name, (down, up) in (("plain", results[0:2]), ("tls", results[2:4])):
                report(f"pagekite.py FE -> kite expose, {name}: 50 MiB down "
                       f"{size / down[2] / MiB:.2f} MiB/s, up {size / up[1] / MiB:.2f} MiB/s "
                       "(both directions and both tunnels at once)")
            fe_plain.assert_healthy()
            fe_tls.assert_healthy()
        finally:
            await backend.close()
        svc.close()

    run(main, "uvloop", timeout=240)


def test_slow_visitor_does_not_stall_the_tunnel(pagekite, certs):
    """A visitor that stops reading (then reads at 128 KiB/s) and a fast one on the same
    tunnel: the fast one completes meanwhile, kite stops reading the local server for the
    stalled stream at its window, and the slow one gets every byte."""
    slow_size, fast_size = 512 * 1024, 4 * MiB
    fe = pagekite.frontend()

    async def main():
        svc = await start_services(certs)
        backend = kite_backend([relay_spec(fe.port, [http_kite(BULK, svc.bulk)], certs,
                                           "plain")])
        await backend.start()
        try:
            await backend.wait_flying(30)
            gate = asyncio.Event()
            slow = asyncio.ensure_future(download(fe.port, BULK, slow_size, read_size=8192,
                                                  pace=128 * 1024, gate=gate))
            await asyncio.sleep(0.5)
            got, digest, t_fast = await download(fe.port, BULK, fast_size)
            assert got == fast_size and digest == sha(blob(fast_size))
            assert not slow.done()
            tunnel = backend.connectors[0].tunnel
            # kite stops reading the local server for the stalled stream at its window
            for s in tunnel.streams.values():
                assert s.slot.sent - s.send_window.acked <= tunnel.window + 65536
            gate.set()
            got, digest, t_slow = await slow
            assert got == slow_size and digest == sha(blob(slow_size))
            fe.assert_healthy()
            report(f"slow visitor via pagekite.py FE -> kite expose: fast stream "
                   f"{fast_size / t_fast / MiB:.2f} MiB/s while another visitor stalled")
        finally:
            await backend.close()
        svc.close()

    run(main, "uvloop", timeout=120)


def test_kite_expose_process_restart_in_the_middle(pagekite, certs, tmp_path):
    """``kite expose`` (the real CLI process) is killed mid-transfer and started again:
    the visitor sees an error, the frontend takes the new registration (no Duplicate
    lock-out), and traffic flows again."""
    size = 100 * MiB
    fe = pagekite.frontend()

    async def main():
        svc = await start_services(certs)

        def start(n):
            p = Proc([*KITE, "expose", f"http://127.0.0.1:{svc.bulk}", BULK,
                      "--relay", f"127.0.0.1:{fe.port}", "--connect-name", "fe.testkite.local",
                      "--ca", certs.fe_cert, "--secret", SECRET], tmp_path, f"expose{n}")
            procs.append(p)
            return p

        procs: list = []
        try:
            p1 = start(1)
            await asyncio.to_thread(p1.wait_for, f"kite flying: http:{BULK}", 30)
            reader, writer = await asyncio.open_connection("127.0.0.1", fe.port)
            writer.write(b"GET /blob/%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (size, BULK.encode()))
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2 * MiB)
            p1.stop(sig=9)
            got = 2 * MiB
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                while True:
                    data = await asyncio.wait_for(reader.read(MiB), 30)
                    if not data:
                        raise asyncio.IncompleteReadError(b"", None)
                    got += len(data)
            assert got < size
            writer.close()
            p2 = start(2)
            await asyncio.to_thread(p2.wait_for, f"kite flying: http:{BULK}", 30)
            got, digest, _ = await download(fe.port, BULK, 2 * MiB)
            assert got == 2 * MiB and digest == sha(blob(2 * MiB))
            fe.assert_healthy()
        finally:
            for p in procs:
                p.stop()
        svc.close()

    run(main, "uvloop", timeout=120)


def test_inband_registration_dies_at_first_ping(pagekite, certs):
    """Why kite registers with the re-connect variant: an in-band-registered tunnel is
    closed by pagekite.py 1.5.2 at the backend's first PING (§13.2)."""
    fe = pagekite.frontend()

    async def main():
        from support import start_http_server

        server, port = await start_http_server(b"x")
        backend = kite_backend([relay_spec(fe.port, [http_kite(WEB, port)], certs, "plain")],
                               keepalive=2.0)
        backend.connectors[0].registration = "inband"
        await backend.start()
        try:
            await backend.wait_flying(30)
            first = backend.connectors[0].tunnel
            assert first.signed is None  # in-band
            await asyncio.wait_for(first.closed_future, 20)
            assert first.pings_sent >= 1 and first.pongs_received == 0
            await fe.await_log("Corrupt chunk", timeout=10)
        finally:
            await backend.close()
        server.close()

    run(main, "uvloop", timeout=60)


def test_connect_name_on_a_frontend_without_that_certificate_is_explained(pagekite, certs,
                                                                          caplog):
    """``--connect-name`` against a pagekite.py frontend that has no ``--tls_endpoint`` for
    the name: pagekite.py answers 503 to the CONNECT, and kite says what is missing."""
    import logging

    fe = pagekite.frontend(tls=False)

    async def main():
        backend = kite_backend([relay_spec(fe.port, [http_kite(WEB, 9)], certs, "connect")])
        await backend.start()
        try:
            want = "to CONNECT fe.testkite.local:443 (it has no TLS certificate"
            deadline = time.monotonic() + 20
            while want not in caplog.text and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert want in caplog.text
            assert "--tls_endpoint=fe.testkite.local:PEM" in caplog.text
            assert not backend.connectors[0].flying.is_set()
        finally:
            await backend.close()
        fe.assert_healthy()  # and the frontend is fine (no ClientHello reached it)

    with caplog.at_level(logging.INFO):
        run(main, "uvloop", timeout=60)
