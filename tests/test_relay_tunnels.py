"""Tunnel life on the relay: plain and TLS tunnels, both registration variants, Replace,
several backends per kite, the single-backend rule, keepalive, TLS verification, PROXY
protocol.  In-process, real sockets, uvloop and asyncio."""

from __future__ import annotations

import asyncio
import logging
import ssl

import pytest

import wire
from kite.proto import handshake, signing
from support import (
    SECRET,
    http_get,
    http_kite,
    kite_env,
    make_backend,
    make_certs,
    raw_kite,
    run,
    start_http_server,
)


async def _wait(pred, timeout=10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def test_plain_tunnel(tmp_path, loop_kind):
    async def main():
        server, port = await start_http_server(b"plain ok\n")
        async with kite_env(tmp_path, [http_kite("p.test.kite", port)], tls=False) as env:
            head, body = await http_get(env.port, "p.test.kite")
            assert body == b"plain ok\n"
            assert not next(iter(env.relay.state.tunnels)).tls
        server.close()

    run(main, loop_kind)


def test_reconnect_registration_variant(tmp_path, loop_kind):
    """pagekite.py --nozchunks style: close after SignThis, reconnect with signed kites."""

    async def main():
        server, port = await start_http_server(b"reconnect ok\n")
        async with kite_env(tmp_path, tls=False) as env:
            bsalt = signing.make_bsalt("g", f"127.0.0.1:{env.port}", SECRET)
            line = handshake.KiteLine.signed("http", "rc.test.kite", bsalt, SECRET, "")
            reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
            writer.write(handshake.build_tunnel_request([line], zchunks=False))
            reply = handshake.parse_tunnel_response(await reader.readuntil(b"\r\n\r\n"))
            assert reply.sign_this and not reply.ok
            writer.close()
            signed = reply.sign_this[0].answer(SECRET)
            reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
            writer.write(handshake.build_tunnel_request([signed], zchunks=False,
                                                        replace=reply.session_id))
            reply2 = handshake.parse_tunnel_response(await reader.readuntil(b"\r\n\r\n"))
            assert [r.kite for r in reply2.ok] == ["http:rc.test.kite"]
            await _wait(lambda: env.relay.state.routes.kites())
            assert env.relay.state.routes.kites() == [("http", "rc.test.kite")]
            writer.close()
        server.close()

    run(main, loop_kind)


def test_two_backends_share_a_kite_with_failover(tmp_path, loop_kind):
    async def main():
        s1, p1 = await start_http_server(b"one\n")
        s2, p2 = await start_http_server(b"two\n")
        async with kite_env(tmp_path, [http_kite("lb.test.kite", p1)]) as env:
            b2 = await env.add_backend([http_kite("lb.test.kite", p2)])
            await b2.wait_flying(10)
            assert len(env.relay.state.routes.tunnels("http", "lb.test.kite")) == 2
            # Hold one stream open on whichever backend gets it: the next goes to the other.
            r, w = await asyncio.open_connection("127.0.0.1", env.port)
            w.write(b"GET / HTTP/1.1\r\nHost: lb.test.kite\r\n\r\n")
            await r.readuntil(b"\r\n\r\n")
            first = await r.readexactly(4)
            head, body = await http_get(env.port, "lb.test.kite")
            assert body != first
            w.close()
            # Failover: the first backend goes away; every request reaches the second.
            await env.backends[0].close()
            await _wait(lambda: len(env.relay.state.routes.tunnels("http", "lb.test.kite")) == 1)
            for _ in range(5):
                head, body = await http_get(env.port, "lb.test.kite")
                assert body == b"two\n"
        s1.close()
        s2.close()

    run(main, loop_kind)


def test_single_backend_rule_and_replace(tmp_path, loop_kind, caplog):
    async def main():
        s1, p1 = await start_http_server(b"one\n")
        async with kite_env(tmp_path, [http_kite("one.test.kite", p1)]) as env:
            env.relay.config.single_backend.add("one.test.kite")
            # A second, different backend is refused (pagekite.py's Duplicate)...
            other = make_backend(env.port, [http_kite("one.test.kite", p1)], certs=env.certs)
            conn = other.connectors[0]
            result = await conn.run_once()
            assert result in ("refused", "closed: relay accepted none of our kites")
            assert "already flown by another backend" in caplog.text
            # ...but the same backend reconnecting (X-PageKite-Replace) retires its stale
            # tunnel instead of being locked out.
            c = env.backends[0].connectors[0]
            old = c.tunnel
            assert c.session_id
            task = asyncio.ensure_future(c.run_once())
            await _wait(lambda: old.closed and c.flying.is_set() and c.tunnel is not old)
            head, body = await http_get(env.port, "one.test.kite")
            assert body == b"one\n"
            task.cancel()
        s1.close()

    with caplog.at_level(logging.INFO):
        run(main, loop_kind)


def test_keepalive_pings_both_ways(tmp_path, loop_kind):
    async def main():
        server, port = await start_http_server()
        async with kite_env(tmp_path, [http_kite("ka.test.kite", port)], keepalive=0.4,
                            relay_keepalive=0.4) as env:
            c = env.backends[0].connectors[0]
            bt = c.tunnel
            rt = next(iter(env.relay.state.tunnels))
            await _wait(lambda: bt.pongs_received >= 2 and rt.pongs_received >= 2)
            assert not bt.closed and not rt.closed
        server.close()

    run(main, loop_kind)


def test_dead_tunnel_detected_within_keepalive(tmp_path, loop_kind, caplog):
    async def main():
        server, port = await start_http_server(b"back\n")
        async with kite_env(tmp_path, [http_kite("dead.test.kite", port)], keepalive=1.0) as env:
            c = env.backends[0].connectors[0]
            old = c.tunnel
            rt = next(iter(env.relay.state.tunnels))
            rt.transport.pause_reading()  # the relay goes silent: no PONG, no bytes
            t0 = asyncio.get_running_loop().time()
            await _wait(lambda: old.closed, timeout=5)
            assert asyncio.get_running_loop().time() - t0 <= 1.0 + 0.3
            assert "no answer to PING" in caplog.text
            rt.transport.resume_reading()
            await _wait(lambda: c.flying.is_set() and c.tunnel is not old and not c.tunnel.closed)
            head, body = await http_get(env.port, "dead.test.kite")
            assert body == b"back\n"
        server.close()

    with caplog.at_level(logging.INFO):
        run(main, loop_kind)


def test_relay_certificate_verification(tmp_path, loop_kind):
    from kite.backend.connector import Backend
    from kite.config import BackendConfig, RelaySpec

    def backend(env, kite, **tls):
        return Backend(BackendConfig(relays=[RelaySpec(host="127.0.0.1", port=env.port,
                                                       kites=[kite], **tls)]))

    async def main():
        server, port = await start_http_server(b"verified\n")
        async with kite_env(tmp_path) as env:
            kite = http_kite("v.test.kite", port)
            # A CA that did not sign the relay's certificate: never flies.
            wrong = make_certs(tmp_path, stem="wrong")
            with pytest.raises(ssl.SSLCertVerificationError):
                await backend(env, kite, ca=wrong.cert).connectors[0].run_once()
            # No CA at all: the system store does not know a self-signed relay either.
            with pytest.raises(ssl.SSLCertVerificationError):
                await backend(env, kite).connectors[0].run_once()
            # A wrong pin: refused.
            with pytest.raises(ssl.SSLError):
                await backend(env, kite, fingerprint="ab" * 32).connectors[0].run_once()
            # The right pin flies, and so does --insecure.
            for tls in ({"fingerprint": env.certs.fingerprint}, {"insecure": True}):
                good = backend(env, kite, **tls)
                await good.start()
                env.backends.append(good)
                await good.wait_flying(10)
                head, body = await http_get(env.port, "v.test.kite")
                assert body == b"verified\n"
                await good.close()
        server.close()

    run(main, loop_kind)


def test_proxy_protocol_to_raw_target(tmp_path, loop_kind):
    async def main():
        seen = asyncio.Queue()

        async def handle(reader, writer):
            data = b""
            while True:
                parsed = wire.parse_proxy_header(data)
                if parsed is not None:
                    break
                data += await reader.read(4096)
            n, src, dst = parsed
            await seen.put(src)
            writer.write(b"hi " + src[0].encode() + b"\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        for version in (1, 2):
            kite = raw_kite("pp.test.kite", port, 4000 + version, proxy_protocol=version)
            async with kite_env(tmp_path, [kite]) as env:
                reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
                writer.write(b"CONNECT pp.test.kite:%d HTTP/1.1\r\n\r\n" % (4000 + version))
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
                assert await reader.readline() == b"hi 127.0.0.1\n"
                src = await seen.get()
                assert src[0] == "127.0.0.1" and src[1] == writer.get_extra_info("sockname")[1]
                writer.close()
        server.close()

    run(main, loop_kind)


def test_ping_probe_answered_like_pagekite(tmp_path, loop_kind):
    async def main():
        async with kite_env(tmp_path) as env:
            reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
            writer.write(handshake.PING_REQUEST)
            data = await reader.read()
            assert data.startswith(b"HTTP/1.1 503 Unavailable\r\n")
            assert wire.parse_ping_reply(data).uuid == env.relay.state.uuid
            writer.close()

    run(main, loop_kind)


def test_peer_ignoring_flow_control_loses_the_stream_not_the_relay(tmp_path, loop_kind, caplog):
    """A backend that keeps sending to a stalled visitor, whatever the acks say: the relay
    holds at most its buffer limit for that stream, then drops the stream (the visitor sees
    an error), and the tunnel stays up."""
    from kite.fastpath import ChunkWriter, Demux, StreamSlot
    from kite.proto import control

    async def main():
        async with kite_env(tmp_path, tls=False) as env:
            events = []
            demux = Demux(lambda h, p: events.extend(control.parse_chunk(h, p)))
            reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
            line = handshake.KiteLine.signed("http", "greedy.test.kite", "b" * 36, SECRET, "")
            writer.write(handshake.build_tunnel_request([line], zchunks=False,
                                                        extra_features=["KiteFlow"]))
            head = await reader.readuntil(b"\r\n\r\n")
            ch = handshake.parse_tunnel_response(head).sign_this[0]
            w = ChunkWriter()
            w.write_chunk(*handshake.build_inband_request([ch.answer(SECRET)]))
            writer.write(w.flush())

            async def pump_until(pred):
                while not pred():
                    data = await reader.read(65536)
                    assert data, "relay closed the tunnel"
                    demux.feed_data(data)

            await pump_until(lambda: any(isinstance(e, control.KiteReply) for e in events))
            vr, vw = await asyncio.open_connection("127.0.0.1", env.port)
            vw.transport.pause_reading()  # this visitor never reads
            vw.write(b"GET / HTTP/1.1\r\nHost: greedy.test.kite\r\n\r\n")
            await pump_until(lambda: any(isinstance(e, control.StreamOpen) for e in events))
            sid = next(e.sid for e in events if isinstance(e, control.StreamOpen))
            slot = StreamSlot(sid)
            blob = b"x" * 65536
            sent = 0
            while not any(isinstance(e, control.Eof) and e.sid == sid for e in events):
                w.write_data(slot, blob)
                writer.write(w.flush())
                sent += len(blob)
                assert sent < 64 * 1024 * 1024, "relay never dropped the greedy stream"
                await writer.drain()
                try:
                    data = await asyncio.wait_for(reader.read(65536), 0.001)
                    demux.feed_data(data)
                except asyncio.TimeoutError:
                    pass
            assert "peer ignored flow control" in caplog.text
            assert env.relay.state.routes.kites() == [("http", "greedy.test.kite")]
            writer.close()
            vw.close()

    with caplog.at_level(logging.INFO):
        run(main, loop_kind)
