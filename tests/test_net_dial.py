"""kite.net.dial against real sockets on loopback with real TLS: CA, pin, insecure, SNI,
CONNECT NAME:443 before TLS, refusals, unreachable ports, and no descriptor left behind by
a cancelled or timed-out dial."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import ssl
import threading
import warnings

import pytest

import support
from kite.errors import BadRelayReply, ConnectFailed, RelayRefused
from kite.net import dial as dial_mod
from kite.net.dial import (
    dial,
    http_connect,
    open_tcp,
    read_connect_reply,
    read_refusal_body,
)
from kite.net.tls import ClientTLS, server_context
from kite.proto.http import TUNNEL_CONNECT_OK, connect_refused
from support import make_certs

FE = "fe.example"


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_kind(request):
    return request.param


@pytest.fixture
def certs(tmp_path):
    return make_certs(tmp_path, names=("localhost", "127.0.0.1", FE))


@pytest.fixture
def other_certs(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    return make_certs(other)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def fd_baseline() -> int:
    """This process's descriptor count, once the loop made its first TCP transport (libuv
    opens a reserve descriptor, once per loop, on its first stream)."""
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    server.close()
    await server.wait_closed()
    return fd_count()


async def fds_back_to(baseline: int, timeout: float = 5.0) -> int:
    """Wait (polling the loop) until this process has no more descriptors than before."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while fd_count() > baseline and loop.time() < deadline:
        await asyncio.sleep(0.01)
    return fd_count()


def run(coro_fn, loop_kind):
    """support.run, and no socket may be closed by the garbage collector instead of by its
    owner (the descriptor count alone does not see a socket freed with its last reference)."""
    gc.collect()  # what earlier tests left is theirs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        support.run(coro_fn, loop_kind)
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not unclosed, unclosed


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Relay:
    """A fake relay on 127.0.0.1:0, one blocking thread per connection: optionally answers
    ``CONNECT NAME:443`` first, then speaks TLS (or not), sends a banner at once, and
    upper-cases each line it gets.  Records every byte each connection sent after its TLS
    handshake, the CONNECT heads, and the SNI names asked for."""

    def __init__(self, certs, *, tls=True, connect=None, hang=None):
        self.certs = certs
        self.tls = tls
        self.connect = connect  # None, or the answer to send to a CONNECT head
        self.hang = hang  # None, "tcp" (accept, say nothing), "connect" (no answer)
        self.received: list = []  # per connection: bytes after the handshake
        self.heads: list = []  # CONNECT heads
        self.sni: list = []
        self.conns: list = []
        self.threads: list = []

    async def start(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.accepted = asyncio.Event()
        self.finished = asyncio.Event()
        self.ctx = server_context(self.certs.cert, self.certs.key)
        self.ctx.sni_callback = lambda sslobj, name, ctx: self.sni.append(name)
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self._spawn(self._accept_loop)
        return self.port

    def _spawn(self, fn, *args):
        t = threading.Thread(target=fn, args=args, daemon=True)
        self.threads.append(t)
        t.start()

    def _accept_loop(self):
        while True:
            try:
                conn, _ = self.lsock.accept()
            except OSError:
                return
            self.conns.append(conn)
            self._spawn(self._handle, conn)

    def _signal(self, event):
        self.loop.call_soon_threadsafe(event.set)

    def _handle(self, conn):
        got = bytearray()
        self.received.append(got)
        conn.settimeout(20)
        self._signal(self.accepted)
        try:
            if self.hang == "tcp":
                _drain(conn)
                return
            if self.connect is not None:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    byte = conn.recv(1)
                    if not byte:
                        return
                    head += byte
                self.heads.append(head)
                if self.hang == "connect":
                    _drain(conn)
                    return
                conn.sendall(self.connect)
                if not self.connect.startswith(TUNNEL_CONNECT_OK[:12]):
                    got += _drain(conn)  # a client refused must send nothing more
                    return
            if self.tls:  # a handshake the client gives up fails here
                conn = self.ctx.wrap_socket(conn, server_side=True)
                self.conns.append(conn)
            conn.sendall(b"welcome\n")
            for line in conn.makefile("rb"):
                got += line
                conn.sendall(line.upper())
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()
            self._signal(self.finished)

    async def drop_connections(self):
        """Close the relay's side of every connection and wait for its threads."""
        for conn in list(self.conns):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self.threads[1:]:
            await self.loop.run_in_executor(None, t.join, 10)

    async def close(self):
        self.lsock.close()
        await self.drop_connections()


def _drain(conn) -> bytes:
    out = b""
    while True:
        data = conn.recv(65536)
        if not data:
            return out
        out += data


class Hello(asyncio.Protocol):
    """Writes ``hello`` the moment it is attached (as a tunnel request is) and collects."""

    def __init__(self):
        self.got = bytearray()
        self.transport = None
        self.loop = asyncio.get_running_loop()
        self.complete = self.loop.create_future()

    def connection_made(self, transport):
        self.transport = transport
        transport.write(b"hello\n")

    def data_received(self, data):
        self.got += data
        if self.got.endswith(b"HELLO\n") and not self.complete.done():
            self.complete.set_result(bytes(self.got))


class BufferedHello(asyncio.BufferedProtocol):
    """The same as a BufferedProtocol (what kite's tunnels are)."""

    def __init__(self):
        self.inner = Hello()
        self.buf = bytearray(7)  # small: a hand-over may need several get_buffer rounds
        self.complete = self.inner.complete

    @property
    def got(self):
        return self.inner.got

    @property
    def transport(self):
        return self.inner.transport

    def connection_made(self, transport):
        self.inner.connection_made(transport)

    def get_buffer(self, sizehint):
        return memoryview(self.buf)

    def buffer_updated(self, nbytes):
        self.inner.data_received(bytes(self.buf[:nbytes]))


async def talk(relay, **kw):
    """Dial ``relay`` and expect the banner and the echo of our hello."""
    factory = kw.pop("factory", Hello)
    transport, proto = await dial("127.0.0.1", relay.port, factory, **kw)
    try:
        assert await asyncio.wait_for(proto.complete, 10) == b"welcome\nHELLO\n"
    finally:
        transport.close()
    return transport


# -- TLS ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["ca", "pin", "insecure", "pin-buffered"])
def test_tls_ok(loop_kind, certs, how):
    async def main():
        relay = Relay(certs)
        await relay.start()
        tls = {"ca": ClientTLS(ca=certs.cert), "pin": ClientTLS(fingerprint=certs.fingerprint),
               "pin-buffered": ClientTLS(fingerprint=certs.fingerprint),
               "insecure": ClientTLS(insecure=True)}[how]
        factory = BufferedHello if how == "pin-buffered" else Hello
        transport = await talk(relay, tls=tls, factory=factory)
        assert transport.get_extra_info("ssl_object") is not None
        # An IP address is sent as no SNI and checked against the certificate's IP SANs.
        assert relay.sni == [None]
        await relay.close()

    run(main, loop_kind)


def test_tls_server_name_is_sent_and_checked(loop_kind, certs):
    async def main():
        relay = Relay(certs)
        await relay.start()
        await talk(relay, tls=ClientTLS(ca=certs.cert, server_name="localhost"))
        assert relay.sni == ["localhost"]
        with pytest.raises(ssl.SSLCertVerificationError):
            await dial("127.0.0.1", relay.port, Hello,
                       tls=ClientTLS(ca=certs.cert, server_name="elsewhere.example"))
        await relay.close()

    run(main, loop_kind)


def test_tls_wrong_ca_fails(loop_kind, certs, other_certs):
    async def main():
        relay = Relay(certs)
        await relay.start()
        with pytest.raises(ssl.SSLCertVerificationError):
            await dial("127.0.0.1", relay.port, Hello, tls=ClientTLS(ca=other_certs.cert))
        await relay.close()

    run(main, loop_kind)


@pytest.mark.parametrize("factory", [Hello, BufferedHello])
def test_tls_wrong_pin_fails_before_anything_is_sent(loop_kind, certs, other_certs, factory):
    async def main():
        relay = Relay(certs)
        await relay.start()
        made = []

        def counting_factory():
            made.append(1)
            return factory()

        baseline = await fd_baseline()
        with pytest.raises(ssl.SSLCertVerificationError, match="does not match the pinned"):
            await dial("127.0.0.1", relay.port, counting_factory,
                       tls=ClientTLS(fingerprint=other_certs.fingerprint))
        await asyncio.wait_for(relay.finished.wait(), 10)
        assert made == []  # the protocol was never attached ...
        assert relay.received == [bytearray()]  # ... and the relay got not one byte
        await relay.drop_connections()
        assert await fds_back_to(baseline) <= baseline
        await relay.close()

    run(main, loop_kind)


def test_ssl_context_made_once_by_the_caller_is_used(loop_kind, certs):
    async def main():
        relay = Relay(certs)
        await relay.start()
        tls = ClientTLS(ca=certs.cert)
        await talk(relay, tls=tls, ssl_context=tls.context())
        # A context that trusts nothing fails: it was the one used.
        with pytest.raises(ssl.SSLCertVerificationError):
            await dial("127.0.0.1", relay.port, Hello, tls=tls,
                       ssl_context=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
        await relay.close()

    run(main, loop_kind)


def test_plain(loop_kind, certs):
    async def main():
        relay = Relay(certs, tls=False)
        await relay.start()
        transport = await talk(relay)
        assert transport.get_extra_info("ssl_object") is None
        sock = transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await relay.close()

    run(main, loop_kind)


# -- CONNECT NAME:443, then TLS ----------------------------------------------------------------
@pytest.mark.parametrize("how", ["ca", "pin"])
def test_connect_then_tls(loop_kind, certs, how):
    async def main():
        relay = Relay(certs, connect=TUNNEL_CONNECT_OK)
        await relay.start()
        tls = ClientTLS(ca=certs.cert) if how == "ca" else ClientTLS(fingerprint=certs.fingerprint)
        await talk(relay, tls=tls, connect_name=FE)
        assert relay.heads == [b"CONNECT fe.example:443 HTTP/1.1\r\nHost: fe.example:443\r\n\r\n"]
        assert relay.sni == [FE]  # the connect name is the TLS name
        await relay.close()

    run(main, loop_kind)


def test_connect_refused_says_what_is_missing_and_sends_no_hello(loop_kind, certs):
    async def main():
        relay = Relay(certs, connect=connect_refused(403, "no such name"))
        await relay.start()
        baseline = await fd_baseline()
        with pytest.raises(RelayRefused) as info:
            await dial("127.0.0.1", relay.port, Hello, tls=ClientTLS(ca=certs.cert),
                       connect_name=FE)
        assert info.value.status == 403
        msg = str(info.value)
        assert msg.startswith(f"relay 127.0.0.1:{relay.port} answered '403 Forbidden' to "
                              "CONNECT fe.example:443 (it has no TLS certificate")
        assert "--tls_endpoint=fe.example:PEM" in msg and "--tls-name fe.example" in msg
        await asyncio.wait_for(relay.finished.wait(), 10)
        assert relay.received == [bytearray()]  # no ClientHello after the refusal
        await relay.drop_connections()
        assert await fds_back_to(baseline) <= baseline
        await relay.close()

    run(main, loop_kind)


@pytest.mark.parametrize("answer, error, words", [
    (b"", ConnectFailed, "closed the connection after CONNECT fe.example:443"),
    (b"SSH-2.0-x\r\n", BadRelayReply, "not HTTP"),
    (TUNNEL_CONNECT_OK + b"\x16early", ConnectFailed, "sent data before the TLS handshake"),
])
def test_connect_other_failures(loop_kind, certs, answer, error, words):
    async def main():
        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        baseline = await fd_baseline()
        with pytest.raises(error, match=words):
            await dial("127.0.0.1", port, Hello, tls=ClientTLS(ca=certs.cert), connect_name=FE)
        assert await fds_back_to(baseline) <= baseline
        server.close()
        await server.wait_closed()

    run(main, loop_kind)


# -- TCP ---------------------------------------------------------------------------------------
def test_unreachable_port(loop_kind):
    async def main():
        baseline = await fd_baseline()
        with pytest.raises(ConnectionRefusedError):
            await dial("127.0.0.1", free_port(), Hello)
        with pytest.raises(ConnectionRefusedError):
            await dial("127.0.0.1", free_port(), Hello, tls=ClientTLS(insecure=True),
                       connect_name=FE)
        assert fd_count() <= baseline

    run(main, loop_kind)


def test_every_address_is_tried(monkeypatch):
    """The first address refuses, the second connects; the last error is raised if none does."""

    async def main():
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        good = server.sockets[0].getsockname()
        bad = ("127.0.0.1", free_port())
        loop = asyncio.get_running_loop()
        entry = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "")

        async def fake_getaddrinfo(host, port, **kw):
            return [(*entry, bad), (*entry, good)] if host == "two" else [(*entry, bad)]

        monkeypatch.setattr(loop, "getaddrinfo", fake_getaddrinfo)
        baseline = await fd_baseline()
        sock = await open_tcp("two", 1)
        assert sock.getpeername() == good
        sock.close()
        with pytest.raises(ConnectionRefusedError):
            await open_tcp("one", 1)
        assert fd_count() <= baseline
        server.close()

    run(main, "asyncio")


def test_unresolvable_name(loop_kind):
    async def main():
        with pytest.raises(socket.gaierror):
            await dial("no-such-host.invalid", 443, Hello)

    run(main, loop_kind)


# -- cancel and timeout leave nothing open -----------------------------------------------------
@pytest.mark.parametrize("where", ["tls-handshake", "connect-answer", "pin-handshake"])
@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_interrupted_dial_leaks_no_descriptor(loop_kind, certs, where, how):
    async def main():
        relay = Relay(certs, connect=TUNNEL_CONNECT_OK if where == "connect-answer" else None,
                      hang="connect" if where == "connect-answer" else "tcp")
        await relay.start()
        tls = (ClientTLS(fingerprint=certs.fingerprint) if where == "pin-handshake"
               else ClientTLS(ca=certs.cert))
        kw = {"connect_name": FE} if where == "connect-answer" else {}
        baseline = await fd_baseline()
        for _ in range(3):
            relay.accepted.clear()
            if how == "timeout":
                with pytest.raises(asyncio.TimeoutError):
                    await dial("127.0.0.1", relay.port, Hello, tls=tls, timeout=0.2, **kw)
            else:
                task = asyncio.ensure_future(dial("127.0.0.1", relay.port, Hello, tls=tls, **kw))
                await asyncio.wait_for(relay.accepted.wait(), 10)
                if where == "connect-answer":
                    while not relay.heads:  # the CONNECT was sent: now waiting for the answer
                        await asyncio.sleep(0.005)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
        await relay.drop_connections()
        assert await fds_back_to(baseline) <= baseline
        await relay.close()

    run(main, loop_kind)


# -- CONNECT on a bare socket ------------------------------------------------------------------
def test_http_connect_consumes_exactly_the_head(loop_kind):
    """The answer comes a byte at a time, with the tunnel's first bytes right behind it."""

    async def main():
        answer = b"HTTP/1.1 200 Connection Established\r\nX-A: b\r\n\r\nSSH-2.0-first\r\n"

        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            for i in range(len(answer)):
                writer.write(answer[i:i + 1])
                await writer.drain()
            await reader.read()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        sock = await open_tcp("127.0.0.1", server.sockets[0].getsockname()[1])
        reply = await http_connect(sock, "box", 22)
        assert (reply.status, reply.head_length) == (200, len(answer) - 15)
        loop = asyncio.get_running_loop()
        got = b""
        while len(got) < 15:
            got += await loop.sock_recv(sock, 100)
        assert got == b"SSH-2.0-first\r\n"
        sock.close()
        server.close()

    run(main, loop_kind)


@pytest.mark.parametrize("answer, want", [
    (connect_refused(503, "kite box:22 is offline"), (503, b"kite box:22 is offline\n")),
    (b"HTTP/1.1 407 Login\r\n\r\nlogin first\n", (407, b"login first\n")),  # to EOF
    (b"", None),  # closed without a byte of answer
])
def test_http_connect_refusals(loop_kind, answer, want):
    async def main():
        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        sock = await open_tcp("127.0.0.1", server.sockets[0].getsockname()[1])
        reply = await http_connect(sock, "box", 22)
        if want is None:
            assert reply is None
        else:
            assert (reply.status, await read_refusal_body(sock, reply)) == want
        sock.close()
        server.close()

    run(main, loop_kind)


def test_read_connect_reply_errors(loop_kind):
    async def main():
        for answer, words in ((b"HTTP/1.1 200 OK\r\nX: y", "ended in its head"),
                              (b"SSH-2.0-x\r\n", "not HTTP"),
                              (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 3000, "longer than")):
            a, b = socket.socketpair()
            a.setblocking(False)
            b.sendall(answer)
            b.close()
            with pytest.raises(BadRelayReply, match=words):
                await read_connect_reply(a)
            a.close()

    run(main, loop_kind)


def test_module_exports():
    assert set(dial_mod.__all__) >= {"dial", "open_tcp", "http_connect", "read_connect_reply",
                                     "read_refusal_body"}
