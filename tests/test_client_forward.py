"""``kite forward``: a local listener that CONNECTs every accepted connection through the relay.

In-process on uvloop and asyncio against an in-process relay + backend: many connections at
once, half-close, backpressure both ways (a client that does not read, a server that does
not read), refusals that cost one connection, and the command line.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import subprocess
import time

import pytest

from kite.client.connect import RelayTarget
from kite.client.forward import Forwarder
from kite.net.pipes import HIGH_WATER, READ_SIZE
from kite.net.tls import ClientTLS
from support import KITE, kite_env, raw_kite, run
from test_client_connect import (
    CLI_ENV,
    payload,
    start_digest_server,
    start_one_line_server,
    start_tls_terminator,
)

#: A transport's write buffer may pass the high-water mark by what one read hands it.
BUFFER_BOUND = HIGH_WATER + READ_SIZE + (64 << 10)



async def until(predicate, timeout=20.0, what="condition"):
    """Poll a condition of the system under test (no fixed sleeps as synchronisation)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout} s")
        await asyncio.sleep(0.01)


async def forwarder_for(env, host="box.test.kite", port=22, **kw):
    fwd = Forwarder("127.0.0.1", 0, RelayTarget("127.0.0.1", env.port, host, port, **kw))
    (_, lport), = await fwd.start()
    return fwd, lport


async def digest_roundtrip(port, data):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    writer.write_eof()  # the digest server answers only after our half-close
    answer = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return answer


def expected_digest(data):
    return b"%d %s\n" % (len(data), hashlib.sha256(data).hexdigest().encode())


def test_many_concurrent_connections_with_half_close(tmp_path, loop_kind):
    async def main():
        server, port = await start_digest_server()
        async with kite_env(tmp_path, [raw_kite("box.test.kite", port, 22)], tls=False) as env:
            fwd, lport = await forwarder_for(env)
            blobs = [payload(256 << 10, seed=i) for i in range(40)]
            answers = await asyncio.gather(*(digest_roundtrip(lport, b) for b in blobs))
            assert answers == [expected_digest(b) for b in blobs]
            assert fwd.established == 40 and fwd.refused == 0
            await until(lambda: not fwd.active, what="every connection closed")
            await fwd.close()
        server.close()

    run(main, loop_kind)


def test_backpressure_client_that_does_not_read(tmp_path, loop_kind):
    """The kite sends 32 MiB; the client reads nothing until the forwarder has stopped
    reading from the relay, with a bounded buffer; then everything arrives."""
    size = 32 << 20

    async def main():
        async def source(reader, writer):
            try:
                block = payload(1 << 20, seed=7)
                for _ in range(size >> 20):
                    writer.write(block)
                    await writer.drain()
                writer.write_eof()
                await writer.drain()
            except OSError:
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(source, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with kite_env(tmp_path, [raw_kite("box.test.kite", port, 22)], tls=False) as env:
            fwd, lport = await forwarder_for(env)
            reader, writer = await asyncio.open_connection("127.0.0.1", lport)
            await until(lambda: any(r.reading_paused for r in fwd.relays.values()),
                        what="the forwarder pausing the relay side")
            (local, relay), = fwd.relays.items()
            assert local.transport.get_write_buffer_size() <= BUFFER_BOUND
            assert relay.bytes_in < size  # it really stopped before the end
            h = hashlib.sha256()
            n = 0
            block = payload(1 << 20, seed=7)
            while True:
                chunk = await asyncio.wait_for(reader.read(1 << 20), 30)
                if not chunk:
                    break
                n += len(chunk)
                h.update(chunk)
                assert local.transport is None or local.transport.get_write_buffer_size() <= BUFFER_BOUND
            assert n == size
            assert h.digest() == hashlib.sha256(block * (size >> 20)).digest()
            writer.close()
            await fwd.close()
        server.close()

    run(main, loop_kind)


def test_backpressure_server_that_does_not_read(tmp_path, loop_kind):
    """The client sends 32 MiB to a kite that reads nothing until released: the forwarder
    stops reading the client with a bounded buffer toward the relay; then it all arrives."""
    size = 32 << 20

    async def main():
        release = asyncio.Event()

        async def lazy_digest(reader, writer):
            await release.wait()
            h = hashlib.sha256()
            n = 0
            try:
                while True:
                    data = await reader.read(1 << 18)
                    if not data:
                        break
                    n += len(data)
                    h.update(data)
                writer.write(b"%d %s\n" % (n, h.hexdigest().encode()))
                await writer.drain()
            except OSError:
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(lazy_digest, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with kite_env(tmp_path, [raw_kite("box.test.kite", port, 22)], tls=False) as env:
            fwd, lport = await forwarder_for(env)
            data = payload(size, seed=3)
            reader, writer = await asyncio.open_connection("127.0.0.1", lport)
            writer.write(data)
            writer.write_eof()
            await until(lambda: any(loc.reading_paused for loc in fwd.relays),
                        what="the forwarder pausing the client side")
            (local, relay), = fwd.relays.items()
            assert relay.transport.get_write_buffer_size() <= BUFFER_BOUND
            assert local.bytes_in < size
            release.set()
            assert await asyncio.wait_for(reader.read(), 30) == expected_digest(data)
            writer.close()
            await fwd.close()
        server.close()

    run(main, loop_kind)


def test_refusal_costs_one_connection(tmp_path, loop_kind, caplog):
    async def main():
        server, port = await start_digest_server()
        async with kite_env(tmp_path, [raw_kite("box.test.kite", port, 22)], tls=False) as env:
            gone, gone_port = await forwarder_for(env, "gone.test.kite")
            good, good_port = await forwarder_for(env)
            for early in (b"", b"early bytes go nowhere"):
                reader, writer = await asyncio.open_connection("127.0.0.1", gone_port)
                writer.write(early)
                try:
                    assert await asyncio.wait_for(reader.read(), 20) == b""
                except ConnectionResetError:
                    assert early  # closing with unread bytes is a reset (Linux)
                writer.close()
            assert gone.refused == 2 and gone.established == 0
            assert await digest_roundtrip(good_port, b"still fine") == expected_digest(b"still fine")
            await gone.close()
            await good.close()
        server.close()

    with caplog.at_level("WARNING", logger="kite.client"):
        run(main, loop_kind)
    refusals = [r.getMessage() for r in caplog.records if r.name == "kite.client"]
    assert len(refusals) == 2 and all("kite gone.test.kite:22 is offline" in m for m in refusals)


def test_bytes_and_eof_before_the_relay_answers_wait_for_it(loop_kind):
    """A client that sends its request and half-closes at once (``nc -N``) is served: both
    wait in the forwarder until the relay's 200, then go on in order."""

    async def main():
        answer_now = asyncio.Event()
        asked = asyncio.Event()

        async def slow_relay(reader, writer):  # answers the CONNECT only when told
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"CONNECT box.test.kite:22 HTTP/1.1\r\n")
            asked.set()
            await answer_now.wait()
            writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            data = await reader.read()
            writer.write(expected_digest(data))
            writer.close()

        relay = await asyncio.start_server(slow_relay, "127.0.0.1", 0)
        fwd = Forwarder("127.0.0.1", 0, RelayTarget(
            "127.0.0.1", relay.sockets[0].getsockname()[1], "box.test.kite", 22))
        (_, lport), = await fwd.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", lport)
        writer.write(b"early request")
        writer.write_eof()
        await asyncio.wait_for(asked.wait(), 20)
        await asyncio.sleep(0.05)  # not synchronisation: gives the early bytes time to be early
        answer_now.set()
        assert await asyncio.wait_for(reader.read(), 20) == expected_digest(b"early request")
        writer.close()
        await until(lambda: not fwd.active, what="closed")
        await fwd.close()
        relay.close()

    run(main, loop_kind)


def test_forward_over_tls_to_the_relay(tmp_path, loop_kind):
    """--tls: each connection's CONNECT goes inside TLS, verified against the relay's CA.
    (The relay cannot take that yet: a TLS-terminating proxy in front of it stands in.)"""

    async def main():
        server, port = await start_one_line_server()
        async with kite_env(tmp_path, [raw_kite("box.test.kite", port, 22)], tls=True) as env:
            term, term_port = await start_tls_terminator(env.certs, env.port)
            fwd = Forwarder("127.0.0.1", 0, RelayTarget(
                "127.0.0.1", term_port, "box.test.kite", 22, ClientTLS(ca=env.certs.cert)))
            (_, lport), = await fwd.start()

            async def one(i):
                reader, writer = await asyncio.open_connection("127.0.0.1", lport)
                assert await reader.readline() == b"SSH-2.0-KiteTest\r\n"
                writer.write(b"line %d\n" % i)
                assert await asyncio.wait_for(reader.read(), 20) == b"LINE %d\n" % i
                writer.close()

            await asyncio.gather(*(one(i) for i in range(10)))
            assert fwd.established == 10
            await fwd.close()
            term.close()
        server.close()

    run(main, loop_kind)


# -- the command line --------------------------------------------------------------------------
def test_cli_forward_serves_and_stops_on_sigterm(tmp_path):
    async def main():
        server, port = await start_digest_server()
        async with kite_env(tmp_path, [raw_kite("box.test.kite", port, 22)], tls=True) as env:
            proc = await asyncio.create_subprocess_exec(
                *KITE, "forward", "0", "box.test.kite:22", "--relay", f"127.0.0.1:{env.port}",
                stderr=subprocess.PIPE, env=CLI_ENV, start_new_session=True)
            try:
                line = await asyncio.wait_for(proc.stderr.readline(), 20)
                m = re.search(rb"forwarding 127\.0\.0\.1:(\d+) to box\.test\.kite:22 through "
                              rb"relay 127\.0\.0\.1:\d+", line)
                assert m, line
                lport = int(m.group(1))
                data = payload(1 << 20, seed=9)
                answers = await asyncio.gather(*(digest_roundtrip(lport, data) for _ in range(4)))
                assert answers == [expected_digest(data)] * 4
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), 20) == 0
                rest = (await proc.stderr.read()).decode()
                assert "Traceback" not in rest
            finally:
                if proc.returncode is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
        server.close()

    run(main, "uvloop")


@pytest.mark.parametrize("args, rc, words", [
    (["0", "box.test.kite", "--relay", "127.0.0.1:1"], 2, "NAME:PORT: no port"),
    (["0", "box.test.kite:22"], 2, "Missing option '--relay'"),
    (["70000", "box.test.kite:22", "--relay", "127.0.0.1:1"], 2, "bad port"),
    (["127.0.0.1:{busy}", "box.test.kite:22", "--relay", "127.0.0.1:1"], 1, "cannot listen on"),
])
def test_cli_forward_errors(args, rc, words):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        args = [a.format(busy=busy.getsockname()[1]) for a in args]
        proc = subprocess.run(KITE + ["forward", *args], capture_output=True, text=True,
                              env=CLI_ENV, timeout=30)
    finally:
        busy.close()
    assert proc.returncode == rc, proc.stderr
    assert words in proc.stderr and "Traceback" not in proc.stderr
    if rc == 1:
        assert proc.stderr.count("\n") == 1
