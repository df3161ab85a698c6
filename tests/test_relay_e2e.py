"""kite relay + kite expose end to end, in-process, on real loopback sockets and real TLS.

Every test runs on uvloop and on plain asyncio.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import ssl
import subprocess

import pytest

from kite.backend.connector import LOCAL_RCVBUF
from kite.proto import handshake, signing
from support import (
    SECRET,
    http_get,
    http_kite,
    https_kite,
    kite_env,
    make_certs,
    raw_kite,
    run,
    start_banner_server,
    start_http_server,
)


def test_http_through_tls_tunnel_with_curl(tmp_path, loop_kind):
    async def main():
        server, port = await start_http_server(echo_headers=True)
        async with kite_env(tmp_path, [http_kite("app.test.kite", port)]) as env:
            proc = await asyncio.create_subprocess_exec(
                "curl", "-sS", "--max-time", "20", "-H", "Host: app.test.kite",
                f"http://127.0.0.1:{env.port}/hello", stdout=subprocess.PIPE)
            out, _ = await proc.communicate()
            assert proc.returncode == 0
            # The local server saw the request, with X-Forwarded-* added by the backend.
            assert out.startswith(b"GET /hello HTTP/1.1\r\n")
            assert b"X-Forwarded-For: 127.0.0.1\r\n" in out
            assert b"X-Forwarded-Proto: http\r\n" in out
            assert b"X-Forwarded-Host: app.test.kite\r\n" in out
        server.close()

    run(main, loop_kind)


def test_keepalive_requests_each_get_forwarded_headers(tmp_path, loop_kind):
    async def main():
        server, port = await start_http_server(echo_headers=True)
        async with kite_env(tmp_path, [http_kite("app.test.kite", port)]) as env:
            reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
            for i in range(3):
                writer.write(b"GET /%d HTTP/1.1\r\nHost: app.test.kite\r\n"
                             b"X-Forwarded-For: 6.6.6.6\r\n\r\n" % i)
                head = await reader.readuntil(b"\r\n\r\n")
                n = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                body = await reader.readexactly(n)
                assert body.startswith(b"GET /%d HTTP/1.1" % i)
                assert body.count(b"X-Forwarded-For: 127.0.0.1") == 1
                assert b"X-Old-X-Forwarded-For: 6.6.6.6" in body
            writer.close()
        server.close()

    run(main, loop_kind)

def test_local_sockets_get_one_fixed_receive_buffer(tmp_path, loop_kind):
    """The backend fixes SO_RCVBUF of its local connections (autotuning would give the
    streams that were read most the biggest buffers, and so the most of the tunnel); the
    relay leaves its visitors' sockets to the kernel (they come from far away)."""
    async def main():
        server, port = await start_http_server()
        async with kite_env(tmp_path, [http_kite("app.test.kite", port)]) as env:
            reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: app.test.kite\r\n\r\n")
            await reader.readuntil(b"\r\n\r\n")
            tunnel = env.backends[0].connectors[0].tunnel
            (stream,) = tunnel.streams.values()
            sock = stream.transport.get_extra_info("socket")
            # Linux doubles what was asked for, for its bookkeeping.
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * LOCAL_RCVBUF
            (relay_tunnel,) = env.relay.state.tunnels
            (visitor,) = relay_tunnel.streams.values()
            vsock = visitor.transport.get_extra_info("socket")
            assert vsock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) != 2 * LOCAL_RCVBUF
            # Both ends poll for quick answers (kite.net.busypoll), one poller a process.
            assert relay_tunnel.busy is env.relay.state.busy is not None
            assert tunnel.busy is not None and tunnel.busy is not relay_tunnel.busy
            writer.close()
        server.close()

    run(main, loop_kind)



def _tls_server_context(tmp_path, name):
    c = make_certs(tmp_path, names=[name], stem="site")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(c.cert, c.key)
    return ctx, c


def test_https_sni_passthrough_with_curl(tmp_path, loop_kind):
    """The visitor's TLS goes end to end: curl verifies the *site's* certificate."""

    async def main():
        ctx, site_cert = _tls_server_context(tmp_path, "secure.test.kite")

        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            peer_tls = writer.get_extra_info("ssl_object") is not None
            body = b"end-to-end TLS: %s\n" % (b"yes" if peer_tls else b"no")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % len(body) + body)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
        async with kite_env(tmp_path, [https_kite("secure.test.kite", port)]) as env:
            proc = await asyncio.create_subprocess_exec(
                "curl", "-sS", "--max-time", "20", "--cacert", site_cert.cert,
                "--resolve", f"secure.test.kite:{env.port}:127.0.0.1",
                f"https://secure.test.kite:{env.port}/", stdout=subprocess.PIPE)
            out, _ = await proc.communicate()
            assert proc.returncode == 0
            assert out == b"end-to-end TLS: yes\n"
            # The same kite through CONNECT :443 (proxy-aware clients).
            proc = await asyncio.create_subprocess_exec(
                "curl", "-sS", "--max-time", "20", "--cacert", site_cert.cert,
                "-x", f"http://127.0.0.1:{env.port}", "--connect-to",
                "secure.test.kite:443:secure.test.kite:443",
                "https://secure.test.kite/", stdout=subprocess.PIPE)
            out, _ = await proc.communicate()
            assert proc.returncode == 0
            assert out == b"end-to-end TLS: yes\n"
        server.close()

    run(main, loop_kind)


def test_websocket_echo_through_tunnel(tmp_path, loop_kind):
    pytest.importorskip("websockets")
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve

    async def main():
        async def echo(ws):
            async for msg in ws:
                await ws.send(msg)

        async with serve(echo, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1] if hasattr(server, "sockets") else \
                list(server.server.sockets)[0].getsockname()[1]
            async with kite_env(tmp_path, [http_kite("ws.test.kite", port)]) as env:
                # The URI names the kite; the TCP connection goes to the relay.
                uri = f"ws://ws.test.kite:{env.port}/echo"
                async with connect(uri, host="127.0.0.1", port=env.port) as ws:
                    for msg in ["hello", "x" * 100_000, b"\x00\x01binary"]:
                        await ws.send(msg)
                        assert await ws.recv() == msg

    run(main, loop_kind)


def test_raw_connect_server_speaks_first(tmp_path, loop_kind):
    async def main():
        server, port = await start_banner_server()
        async with kite_env(tmp_path, [raw_kite("box.test.kite", port, 22)]) as env:
            reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
            writer.write(b"CONNECT box.test.kite:22 HTTP/1.1\r\nHost: box.test.kite:22\r\n\r\n")
            status = await reader.readuntil(b"\r\n\r\n")
            assert status.startswith(b"HTTP/1.1 200")
            banner = await reader.readline()
            assert banner == b"SSH-2.0-KiteTest\r\n"  # before we sent a byte
            writer.write(b"hello\n")
            assert await reader.readline() == b"HELLO\n"
            writer.write_eof()  # half-close: the server answers, then closes
            assert await reader.read() == b""
            writer.close()
        server.close()

    run(main, loop_kind)


def test_connect_to_non_kite_is_refused(tmp_path, loop_kind):
    async def main():
        server, port = await start_banner_server()
        async with kite_env(tmp_path, [raw_kite("box.test.kite", port, 22)]) as env:
            for target in (f"127.0.0.1:{port}", "example.com:443", "box.test.kite:2222"):
                reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
                writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
                answer = await reader.read()
                assert answer.split(b" ", 2)[1] in (b"403", b"503"), answer
                writer.close()
        server.close()

    run(main, loop_kind)


def test_unknown_and_offline_names(tmp_path, loop_kind):
    async def main():
        async with kite_env(tmp_path) as env:
            head, body = await http_get(env.port, "nosuch.example.org")
            assert head.startswith(b"HTTP/1.1 404")
            head, body = await http_get(env.port, "offline.test.kite")
            assert head.startswith(b"HTTP/1.1 503")
            assert b"offline" in body
            head, body = await http_get(env.port, "offline.test.kite",
                                        headers=b"Accept: application/json\r\n")
            assert b"application/json" in head and b'"error": 503' in body
            # A TLS visitor for an unknown name gets a TLS alert, not a hang.
            ctx = ssl.create_default_context()
            with pytest.raises(ssl.SSLError):
                await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", env.port, ssl=ctx, server_hostname="nosuch.example.org"), 10)

    run(main, loop_kind)


def test_local_server_down_gives_502(tmp_path, loop_kind):
    async def main():
        server, port = await start_http_server()
        server.close()
        await server.wait_closed()
        async with kite_env(tmp_path, [http_kite("down.test.kite", port)]) as env:
            head, body = await http_get(env.port, "down.test.kite")
            assert head.startswith(b"HTTP/1.1 502"), head

    run(main, loop_kind)


def _sha(data):
    return hashlib.sha256(data).hexdigest()


def test_100mb_each_way_intact(tmp_path, loop_kind):
    size = 100 * 1024 * 1024
    blob = os.urandom(1024 * 1024) * 100  # 100 MiB, 1 MiB random pattern

    async def main():
        async def handle(reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"POST"):
                h = hashlib.sha256()
                left = size
                while left:
                    chunk = await reader.read(1 << 20)
                    assert chunk
                    h.update(chunk)
                    left -= len(chunk)
                out = h.hexdigest().encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(out) + out)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                view = memoryview(blob)
                for i in range(0, size, 1 << 20):
                    writer.write(view[i:i + (1 << 20)])
                    await writer.drain()
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with kite_env(tmp_path, [http_kite("bulk.test.kite", port)]) as env:
            # download
            reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
            writer.write(b"GET /big HTTP/1.1\r\nHost: bulk.test.kite\r\n\r\n")
            await reader.readuntil(b"\r\n\r\n")
            h = hashlib.sha256()
            got = 0
            while got < size:
                chunk = await reader.read(1 << 20)
                assert chunk, f"stream ended after {got} bytes"
                h.update(chunk)
                got += len(chunk)
            assert got == size and h.hexdigest() == _sha(blob)
            writer.close()
            # upload
            reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
            writer.write(b"POST /up HTTP/1.1\r\nHost: bulk.test.kite\r\nContent-Length: %d\r\n\r\n"
                         % size)
            view = memoryview(blob)
            for i in range(0, size, 1 << 20):
                writer.write(view[i:i + (1 << 20)])
                await writer.drain()
            await reader.readuntil(b"\r\n\r\n")
            assert (await reader.read(64)).decode() == _sha(blob)
            writer.close()
        server.close()

    run(main, loop_kind, timeout=240)


def test_200_concurrent_streams_on_one_tunnel(tmp_path, loop_kind):
    async def main():
        server, port = await start_banner_server(banner=b"")
        async with kite_env(tmp_path, [raw_kite("echo.test.kite", port, 7)]) as env:
            async def one(i):
                reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
                writer.write(b"CONNECT echo.test.kite:7 HTTP/1.1\r\n\r\n")
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
                payload = (b"stream %d " % i) * 2000 + b"\n"
                writer.write(payload)
                writer.write_eof()
                got = await reader.read()
                writer.close()
                return got == payload.upper()

            results = await asyncio.gather(*(one(i) for i in range(200)))
            assert all(results)
            assert len(env.relay.state.tunnels) == 1
        server.close()

    run(main, loop_kind)


async def start_download_server(size, piece):
    """A local server that answers a request with ``size`` bytes, written 1 MiB at a time:
    ``piece(offset)`` gives the MiB at ``offset``.  Returns (server, port)."""

    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        try:
            for offset in range(0, size, 1 << 20):
                writer.write(piece(offset))
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_stalled_visitor_does_not_stall_other_streams(tmp_path, loop_kind):
    size = 64 * 1024 * 1024

    async def main():
        chunk = os.urandom(1 << 20)
        server, port = await start_download_server(size, lambda offset: chunk)
        async with kite_env(tmp_path, [http_kite("big.test.kite", port)]) as env:
            # The stalled visitor: asks for 64 MiB and never reads.
            r1, w1 = await asyncio.open_connection("127.0.0.1", env.port)
            w1.transport.pause_reading()
            w1.write(b"GET / HTTP/1.1\r\nHost: big.test.kite\r\n\r\n")
            await asyncio.sleep(0)
            # Another visitor on the same tunnel still gets its 64 MiB.
            r2, w2 = await asyncio.open_connection("127.0.0.1", env.port)
            w2.write(b"GET / HTTP/1.1\r\nHost: big.test.kite\r\n\r\n")
            await r2.readuntil(b"\r\n\r\n")
            got = 0
            while got < size:
                data = await r2.read(1 << 20)
                assert data
                got += len(data)
            assert got == size
            # Memory held for the stalled stream stays bounded by its window (at most the
            # tunnel's 16 MiB budget) plus the kernel's socket buffers: far below the 64 MiB
            # the server wanted to send.
            tunnel = next(iter(env.relay.state.tunnels))
            stalled = [s for s in tunnel.streams.values() if s.transport is not None
                       and s.transport.get_write_buffer_size() > 0]
            for s in stalled:
                assert s.transport.get_write_buffer_size() <= tunnel.policy.max_window
            w1.close()
            w2.close()
        server.close()

    run(main, loop_kind, timeout=180)


def test_queued_payload_slices_arrive_intact(tmp_path, loop_kind):
    """A visitor that stops reading: the relay queues what the tunnel still brings as slices
    of its receive buffer, not copies (Stream._write_local).  The demux must never write
    over them - every byte arrives, in order - and the buffers they keep stay bounded."""
    from kite.net.tunnel import KEEP_LIMIT

    size = 48 * 1024 * 1024
    body = os.urandom(size)

    async def main():
        server, port = await start_download_server(size, lambda i: body[i : i + (1 << 20)])
        async with kite_env(tmp_path, [http_kite("big.test.kite", port)]) as env:
            reader, writer = await asyncio.open_connection("127.0.0.1", env.port, limit=1 << 22)
            writer.write(b"GET / HTTP/1.1\r\nHost: big.test.kite\r\n\r\n")
            await reader.readuntil(b"\r\n\r\n")
            got = bytearray()
            # Read fast first (the stream's window grows to the tunnel's budget), ...
            while len(got) < 8 * 1024 * 1024:
                got += await reader.read(1 << 20)
            # ... then stop: the window's worth beyond the kernel's buffers queues in the
            # relay, as long slices kept by the transport.
            writer.transport.pause_reading()
            tunnel = next(iter(env.relay.state.tunnels))
            stream = next(iter(tunnel.streams.values()))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            most = 0
            while stream.transport.get_write_buffer_size() < 4 * 1024 * 1024:
                assert loop.time() < deadline, "the relay never queued for the stalled visitor"
                most = max(most, tunnel.demux.pinned)
                await asyncio.sleep(0.005)
            most = max(most, tunnel.demux.pinned)
            if loop_kind == "uvloop":
                # uvloop queues the slices themselves (asyncio 3.11 copies what it queues).
                assert most > 0
            writer.transport.resume_reading()
            while len(got) < size:
                data = await reader.read(1 << 20)
                assert data, f"stream closed after {len(got)} of {size} bytes"
                got += data
                most = max(most, tunnel.demux.pinned)
            assert len(got) == size and got == body
            # One block past the limit at most: the check comes before a block is retired.
            assert most <= KEEP_LIMIT + 4 * 1024 * 1024
            writer.close()
        server.close()

    run(main, loop_kind, timeout=180)


def test_backend_killed_mid_transfer(tmp_path, loop_kind):
    async def main():
        chunk = os.urandom(1 << 16)
        sent_some = asyncio.Event()

        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
            try:
                while True:
                    writer.write(chunk)
                    await writer.drain()
                    sent_some.set()
            except ConnectionError:
                pass

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with kite_env(tmp_path, [http_kite("dying.test.kite", port)]) as env:
            reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: dying.test.kite\r\n\r\n")
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(100_000)
            # Kill the backend's tunnel abruptly (as if the process died).
            for b in env.backends:
                for c in b.connectors:
                    c._stop = True
                    c.tunnel.transport.abort()
            # The visitor sees the connection end (reset or EOF before Content-Length)...
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                while True:
                    data = await reader.read(1 << 20)
                    if not data:
                        raise asyncio.IncompleteReadError(b"", None)
            # ... and the relay has freed the tunnel and its streams.
            for _ in range(100):
                if not env.relay.state.tunnels:
                    break
                await asyncio.sleep(0.01)
            assert not env.relay.state.tunnels
            assert not env.relay.state.routes.kites()
            writer.close()
        server.close()

    run(main, loop_kind)


def test_backend_flies_again_after_relay_restart(tmp_path, loop_kind):
    from kite.relay.grants import GrantTable, parse_grant
    from kite.relay.server import RelayConfig, RelayServer

    async def main():
        server, port = await start_http_server(b"still here\n")
        async with kite_env(tmp_path, [http_kite("phoenix.test.kite", port)]) as env:
            relay_port = env.port
            await env.relay.close(drain_timeout=0)
            connector = env.backends[0].connectors[0]
            for _ in range(500):
                if not connector.flying.is_set():
                    break
                await asyncio.sleep(0.01)
            assert not connector.flying.is_set()
            # A new relay on the same port: the backend must fly again within 2 s.
            cfg = RelayConfig(listen=[("127.0.0.1", relay_port)],
                              grants=GrantTable([parse_grant("*:*.test.kite:" + SECRET)]),
                              tls_cert=env.certs.cert, tls_key=env.certs.key,
                              tls_names=["localhost"])
            relay2 = RelayServer(cfg)
            await relay2.start()
            t0 = asyncio.get_running_loop().time()
            await asyncio.wait_for(connector.flying.wait(), 2.0)
            elapsed = asyncio.get_running_loop().time() - t0
            assert elapsed < 2.0
            head, body = await http_get(relay_port, "phoenix.test.kite")
            assert body == b"still here\n"
            await relay2.close(drain_timeout=0)
        server.close()

    run(main, loop_kind)


def test_wrong_secret_is_refused(tmp_path, loop_kind, caplog):
    async def main():
        server, port = await start_http_server()
        async with kite_env(tmp_path) as env:
            b = await env.add_backend([http_kite("app.test.kite", port, secret="wrong-secret")])
            connector = b.connectors[0]
            for _ in range(500):
                if "refused kite http:app.test.kite: signature" in caplog.text:
                    break
                await asyncio.sleep(0.01)
            assert "refused kite http:app.test.kite: signature" in caplog.text
            assert not connector.flying.is_set()
            assert not env.relay.state.routes.kites()
            assert "wrong-secret" not in caplog.text and SECRET not in caplog.text
        server.close()

    with caplog.at_level(logging.INFO):
        run(main, loop_kind)


def test_demux_errors_close_only_that_tunnel(tmp_path, loop_kind, caplog):
    """A backend that registers properly and then sends garbage chunks loses its tunnel,
    with a logged reason; the relay and the other tunnels keep serving."""

    async def main():
        server, port = await start_http_server(b"healthy\n")
        async with kite_env(tmp_path, [http_kite("good.test.kite", port)]) as env:
            for garbage in (b"zz\r\n", b"0\r\n", b"5\r\nabcde", b"ffffffffff\r\n",
                            b"10\r\nno-terminator...."):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", env.port, ssl=ssl.create_default_context(cafile=env.certs.cert),
                    server_hostname="localhost")
                bsalt = signing.new_salt() * 4
                line = handshake.KiteLine.signed("http", "evil.test.kite", bsalt, SECRET, "")
                writer.write(handshake.build_tunnel_request([line], zchunks=False))
                head = await reader.readuntil(b"\r\n\r\n")
                reply = handshake.parse_tunnel_response(head)
                ch = reply.sign_this[0]
                signed = ch.answer(SECRET)
                writer.write(b"%x\r\n" % len(b"NOOP: 1\r\nX-PageKite: " + signed.value.encode()
                                                 + b"\r\n\r\n!")
                             + b"NOOP: 1\r\nX-PageKite: " + signed.value.encode() + b"\r\n\r\n!")
                writer.write(garbage)
                # the relay closes this tunnel
                while await reader.read(65536):
                    pass
                writer.close()
                head, body = await http_get(env.port, "good.test.kite")
                assert body == b"healthy\n"
            assert "protocol error from peer" in caplog.text
        server.close()

    with caplog.at_level(logging.INFO):
        run(main, loop_kind)


FUZZ_INPUTS = [
    b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",  # truncated ClientHello
    b"\x16\x03\x01\xff\xff" + os.urandom(300),  # hello with a junk body
    b"\x16" + os.urandom(600),
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: x.test.kite\r\n\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
    b"CONNECT PageKite:1 HTTP/1.0\r\nX-PageKite: a:b\r\n\r\n",
    b"CONNECT PageKite:1 HTTP/1.0\r\n\r\n",
    b"CONNECT nohost HTTP/1.1\r\n\r\n",
    b"CONNECT [::1:99999 HTTP/1.1\r\n\r\n",
    b"\x00\x01\x02garbage\r\n\r\n",
    os.urandom(2048),
]


def test_fuzzing_visitors_get_closed_relay_keeps_serving(tmp_path, loop_kind):
    async def main():
        server, port = await start_http_server(b"alive\n")
        async with kite_env(tmp_path, [http_kite("alive.test.kite", port)]) as env:
            for junk in FUZZ_INPUTS:
                reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
                writer.write(junk)
                try:
                    await asyncio.wait_for(reader.read(), 15)  # closed, not hung
                except ConnectionError:
                    pass
                writer.close()
                head, body = await http_get(env.port, "alive.test.kite")
                assert body == b"alive\n", junk
            assert len(env.relay.state.tunnels) == 1
        server.close()

    run(main, loop_kind)
