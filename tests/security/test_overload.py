"""Out of descriptors, over the connection caps: the relay neither spins nor floods its log,
and serves again once the connections are gone.  A real relay process with a descriptor
limit of 64 (soft and hard: it cannot raise it), flooded with more connections than that."""

from __future__ import annotations

import resource
import socket
import time

import pytest
from faults import LocalServer, http_get

from support import wait_until

HOST = "site.test.kite"
FDS = 64
FLOOD = 300
#: The relay's CPU time and new log lines over the measuring window, at most.
WINDOW = 3.0
MAX_CPU = 0.3
MAX_LOG_LINES = 5


def _limit_fds():
    resource.setrlimit(resource.RLIMIT_NOFILE, (FDS, FDS))


def _serves(port: int) -> bool:
    try:
        status, body = http_get(port, HOST)
    except OSError:
        return False
    return status.startswith(b"HTTP/1.1 200") and body == bytes(100)


@pytest.mark.parametrize("caps", ["default caps", "caps above the descriptor limit"])
def test_flood_beyond_the_descriptor_limit(relay_process, expose_process, caps):
    srv = LocalServer(mode="http", size=100).start()  # GET: 100 zero bytes
    args = () if caps == "default caps" else ("--max-connections", "100000",
                                               "--max-pending", "100000")
    relay = relay_process(*args, preexec=_limit_fds)
    log = relay.log()
    assert f"descriptor limit {FDS}:" in log, log
    expose_process(f"http://127.0.0.1:{srv.port}", HOST, relay)
    conns = []
    try:
        for _ in range(FLOOD):
            try:
                sock = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
                conns.append(sock)
                # a head begun, never finished: the relay must take it (one that says
                # nothing stays in the kernel: test_silent_connections_stay_in_the_kernel)
                sock.sendall(b"G")
            except (ConnectionResetError, BrokenPipeError):
                pass  # over a cap: reset at once, maybe before connect() returned
        wait_until(lambda: "relay overloaded" in relay.log(), 10, "the relay notices")
        cpu0, lines0 = relay.cpu_seconds(), len(relay.log().splitlines())
        time.sleep(WINDOW)  # the measuring window (nothing is awaited here)
        cpu = relay.cpu_seconds() - cpu0
        new_lines = relay.log().splitlines()[lines0:]
        assert cpu <= MAX_CPU, f"{cpu:.2f} s of CPU in {WINDOW} s"
        assert len(new_lines) <= MAX_LOG_LINES, "\n".join(new_lines[:20])
        assert relay.alive()
    finally:
        for c in conns:
            c.close()
    wait_until(lambda: _serves(relay.port), 15, "the relay serves again")
    srv.close()


def test_a_burst_beyond_max_pending_waits_and_is_served(relay_process, expose_process):
    """More visitors connect at once than --max-pending allows before any of them has sent
    a whole head: the relay pauses accepting (they wait in the listen queue) instead of
    resetting them, and every one of them is served."""
    srv = LocalServer(mode="http", size=100).start()
    relay = relay_process("--max-pending", "4")
    expose_process(f"http://127.0.0.1:{srv.port}", HOST, relay)
    wait_until(lambda: _serves(relay.port), 15, "the kite flies")
    burst = [socket.create_connection(("127.0.0.1", relay.port), timeout=10) for _ in range(40)]
    try:
        for sock in burst:  # a request line only: accepted, and not yet classifiable
            sock.sendall(b"GET / HTTP/1.1\r\n")
        wait_until(lambda: "accepting paused" in relay.log(), 10, "the relay pauses accepting")
        for sock in burst:
            sock.sendall(b"Host: %s\r\nConnection: close\r\n\r\n" % HOST.encode())
        for sock in burst:
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 200") and data.endswith(bytes(100)), data[:200]
    finally:
        for sock in burst:
            sock.close()
    assert "reset" not in relay.log()
    srv.close()


def test_pending_connections_give_way_after_a_while(relay_process, expose_process):
    """--max-pending connections from as many addresses each sent part of a head and no
    more: the relay pauses accepting, and once the oldest has been pending
    PENDING_EVICT_AGE, a visitor waiting in the listen queue is accepted and served in its
    place.  The oldest is reset, the others are still held, the summary line says so."""
    srv = LocalServer(mode="http", size=100).start()
    relay = relay_process("--max-pending", "4")
    expose_process(f"http://127.0.0.1:{srv.port}", HOST, relay)
    wait_until(lambda: _serves(relay.port), 15, "the kite flies")
    held = []
    try:
        for i in range(4):  # four addresses: PENDING_PER_ADDRESS is not what holds them
            sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10,
                                            source_address=(f"127.0.0.{i + 2}", 0))
            sock.sendall(b"GET / HTTP/1.1\r\n")
            held.append(sock)
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as visitor:
            visitor.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                            % HOST.encode())
            assert visitor.recv(64).startswith(b"HTTP/1.1 200")
        with pytest.raises(ConnectionResetError):  # the oldest gave way: reset, not closed
            held[0].recv(1)
        for sock in held[1:]:  # one new connection, one eviction
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
        wait_until(lambda: "reset for a new one after" in relay.log(), 10,
                   "the summary line")
        assert "accepting paused" in relay.log()
    finally:
        for sock in held:
            sock.close()
    srv.close()


def test_tls_connection_that_says_nothing_is_closed(tmp_path, loop_kind, monkeypatch):
    """After the relay's own TLS handshake, the first head is awaited like first bytes are:
    counted as being set up, and closed after FIRST_BYTES_TIMEOUT (here shortened)."""
    import asyncio
    import ssl

    import kite.relay.dispatch as dispatch
    from support import kite_env, run

    monkeypatch.setattr(dispatch, "FIRST_BYTES_TIMEOUT", 0.3)

    async def main():
        async with kite_env(tmp_path) as env:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            reader, writer = await asyncio.open_connection("127.0.0.1", env.port, ssl=ctx,
                                                           server_hostname="localhost")
            d = env.relay.dispatcher
            for _ in range(100):
                if d.tls_waiting:
                    break
                await asyncio.sleep(0.01)
            assert d.tls_waiting == 1 and env.relay.acceptor.connections() >= 1
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert d.tls_waiting == 0 and env.relay.acceptor.silent_total == 1
            writer.close()

    run(main, loop_kind)


@pytest.mark.skipif(not hasattr(socket, "TCP_DEFER_ACCEPT"), reason="Linux only")
def test_silent_connections_stay_in_the_kernel(relay_process, expose_process):
    """Connections that say nothing are not handed to the relay (TCP_DEFER_ACCEPT): more
    of them than its descriptors cost it neither a descriptor nor a pending slot, and a
    visitor is served meanwhile, its first bytes classified as it is accepted."""
    srv = LocalServer(mode="http", size=100).start()
    relay = relay_process(preexec=_limit_fds)
    expose_process(f"http://127.0.0.1:{srv.port}", HOST, relay)
    fds = relay.open_fds()
    # Below the listen backlog: past it the kernel falls back to SYN cookies, which accept
    # without deferring.
    with open("/proc/sys/net/core/somaxconn") as f:
        n = min(FLOOD, int(f.read()) // 2)
    silent = [socket.create_connection(("127.0.0.1", relay.port), timeout=5) for _ in range(n)]
    try:
        assert _serves(relay.port)
        assert relay.open_fds() <= fds + 2, (fds, relay.open_fds())
        assert "overloaded" not in relay.log()
    finally:
        for sock in silent:
            sock.close()
    srv.close()


def test_pending_connections_are_bounded_per_address(relay_process, expose_process):
    """One address may keep PENDING_PER_ADDRESS connections that have not said what they
    are (a head begun, never finished); its next ones are reset at accept, one summary line
    says so, and another address is served meanwhile."""
    from kite.relay.accept import PENDING_PER_ADDRESS

    srv = LocalServer(mode="http", size=100).start()
    relay = relay_process()
    expose_process(f"http://127.0.0.1:{srv.port}", HOST, relay)
    held = []
    try:
        for _ in range(PENDING_PER_ADDRESS):
            sock = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
            sock.sendall(b"G")
            held.append(sock)
        # the relay accepts in arrival order: this one comes after the others are counted
        extra = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
        extra.sendall(b"G")
        try:
            assert extra.recv(1) == b""  # closed at once, not held
        except ConnectionResetError:
            pass  # reset: the usual way
        extra.close()
        wait_until(lambda: "that had not said what they are" in relay.log(), 10,
                   "the summary line")
        other = socket.create_connection(("127.0.0.1", relay.port), timeout=5,
                                         source_address=("127.0.0.2", 0))
        with other:
            other.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                          % HOST.encode())
            assert other.recv(64).startswith(b"HTTP/1.1 200")
        held[0].setblocking(False)
        with pytest.raises(BlockingIOError):  # the first ones are still held, not reset
            held[0].recv(1)
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: _serves(relay.port), 15, "the address is served again")
    srv.close()

