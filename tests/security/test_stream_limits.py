"""Limits on streams (kite.net.limits), in-process on real loopback sockets, both loops:
streams per tunnel, idle streams, the memory budget for visitor buffers."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest

from kite.errors import TooManyStreams
from kite.relay.config import RelayConfig
from kite.relay.state import RelayState
from kite.relay.tunnel import SID_LIMIT, RelayTunnel
from support import http_kite, https_kite, kite_env, raw_kite, run, start_banner_server

RAW_PORT = 2222


# -- stream ids ------------------------------------------------------------------------------
def test_new_sid_fails_cleanly_at_the_cap():
    async def main():
        tunnel = RelayTunnel(RelayState(RelayConfig(max_streams=3)), "127.0.0.1:1", tls=False)
        sids = [tunnel.new_sid() for _ in range(3)]
        for sid in sids:
            tunnel.streams[sid] = object()
        with pytest.raises(TooManyStreams):
            tunnel.new_sid()
        del tunnel.streams[sids[1]]
        assert tunnel.new_sid() not in tunnel.streams

    run(main, "asyncio")


def test_new_sid_never_loops_when_every_id_is_taken():
    """Even with a cap above the id space, allocation ends: an error, not a loop."""
    async def main():
        tunnel = RelayTunnel(RelayState(RelayConfig(max_streams=10 * SID_LIMIT)), "x:1",
                             tls=False)
        tunnel.streams.update(dict.fromkeys(range(1, SID_LIMIT - 1)))
        last = tunnel.new_sid()
        assert last == SID_LIMIT - 1
        tunnel.streams[last] = None
        with pytest.raises(TooManyStreams):
            tunnel.new_sid()

    run(main, "asyncio")


async def _connect_raw(port: int, host: str):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"CONNECT %s:%d HTTP/1.1\r\n\r\n" % (host.encode(), RAW_PORT))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return reader, writer, head


def test_visitors_beyond_max_streams_are_refused(tmp_path, loop_kind):
    async def main():
        banner, bport = await start_banner_server()
        kites = [raw_kite("box.test.kite", bport, RAW_PORT), http_kite("web.test.kite", bport),
                 https_kite("tls.test.kite", bport)]
        async with kite_env(tmp_path, kites, max_streams=2) as env:
            held = []
            for _ in range(2):
                reader, writer, head = await _connect_raw(env.port, "box.test.kite")
                assert head.startswith(b"HTTP/1.1 200")
                await reader.readuntil(b"\r\n")  # the banner: the stream is up
                held.append(writer)
            # CONNECT: refused with 503
            _, writer, head = await _connect_raw(env.port, "box.test.kite")
            assert head.startswith(b"HTTP/1.1 503"), head
            writer.close()
            # HTTP: a 503 page
            reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: web.test.kite\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 10)
            assert answer.startswith(b"HTTP/1.1 503"), answer[:100]
            writer.close()
            # TLS (SNI routed, end to end): closed
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", env.port, ssl=ctx, server_hostname="tls.test.kite"), 10)
            # One visitor leaves: there is room again.
            held.pop().close()
            tunnel, = env.relay.state.tunnels
            for _ in range(200):
                if len(tunnel.streams) < 2:
                    break
                await asyncio.sleep(0.01)
            reader, writer, head = await _connect_raw(env.port, "box.test.kite")
            assert head.startswith(b"HTTP/1.1 200")
            writer.close()
            for w in held:
                w.close()
            for _ in range(500):  # let them end well before the tunnel goes
                if not tunnel.streams:
                    break
                await asyncio.sleep(0.01)
        banner.close()

    run(main, loop_kind)


# -- idle streams ----------------------------------------------------------------------------
def test_idle_stream_is_closed_active_one_is_not(tmp_path, loop_kind):
    idle_timeout = 1.0

    async def main():
        banner, bport = await start_banner_server()
        async with kite_env(tmp_path, [raw_kite("box.test.kite", bport, RAW_PORT)],
                            idle_timeout=idle_timeout) as env:
            loop = asyncio.get_running_loop()
            ireader, iwriter, _ = await _connect_raw(env.port, "box.test.kite")
            await ireader.readuntil(b"\r\n")
            areader, awriter, _ = await _connect_raw(env.port, "box.test.kite")
            await areader.readuntil(b"\r\n")
            start = loop.time()

            async def chatter():
                while True:
                    awriter.write(b"ping\n")
                    assert await areader.readuntil(b"\n") == b"PING\n"
                    await asyncio.sleep(idle_timeout / 4)

            talk = asyncio.ensure_future(chatter())
            # The idle one ends (a clean end: it was idle, nothing was cut) within
            # idle_timeout * (1 + 1/IDLE_CHECKS) plus slack.
            rest = await asyncio.wait_for(ireader.read(), idle_timeout * 1.1 + 2)
            assert rest == b""
            assert loop.time() - start >= idle_timeout * 0.9
            assert env.relay.state.limits.idle_closed == 1
            await asyncio.sleep(idle_timeout * 1.5)
            assert not talk.done(), talk  # still chatting
            talk.cancel()
            awriter.close()
            iwriter.close()
        banner.close()

    run(main, loop_kind)


# -- memory budget ---------------------------------------------------------------------------
async def _start_stream_server(total: int):
    """HTTP server streaming ``total`` bytes per GET, with backpressure (drain)."""
    chunk = bytes(256 * 1024)

    async def handle(reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
            left = total
            while left:
                writer.write(chunk[:left])
                left -= min(left, len(chunk))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_slow_readers_over_the_budget_are_cut(tmp_path, loop_kind):
    budget = 4 << 20

    async def main():
        server, port = await _start_stream_server(256 << 20)
        async with kite_env(tmp_path, [http_kite("big.test.kite", port)], buffer_budget=budget,
                            slow_reader_timeout=0.5) as env:
            limits = env.relay.state.limits
            socks = []
            for _ in range(16):  # never read: each holds up to a window at the relay
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
                s.setblocking(False)
                await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", env.port))
                s.send(b"GET / HTTP/1.1\r\nHost: big.test.kite\r\n\r\n")
                socks.append(s)
            for _ in range(1000):
                if limits.slow_cut:
                    break
                await asyncio.sleep(0.01)
            assert limits.slow_cut, (limits.buffered(), len(limits.full))
            # Cut down to the budget, and it stays there (the rest are held).
            await asyncio.sleep(1.0)
            assert limits.buffered() <= budget + (2 << 20), limits.buffered()
            # A cut visitor sees a reset once it reads what reached it.
            resets = 0
            for s in socks:
                s.setblocking(True)
                s.settimeout(0.5)
                try:
                    while s.recv(1 << 20):
                        pass
                except ConnectionResetError:
                    resets += 1
                except TimeoutError:
                    pass  # not cut: still held
                s.close()
            assert resets >= limits.slow_cut > 0
        server.close()

    run(main, loop_kind)
