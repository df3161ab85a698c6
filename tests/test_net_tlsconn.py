"""kite's own TLS transport (kite._tls through kite.net.tlsconn) against the event loop's TLS
and OpenSSL's command line, on real sockets on loopback: bytes through intact both ways,
the handshake's results, failures (name, timeout, plain HTTP, cancelled), flow control both
ways, closing with and without close_notify, and the fallback."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import subprocess
import sys

import pytest

import support
from kite.net import tlsconn
from kite.net.tls import server_context
from support import make_certs

pytestmark = pytest.mark.skipif(
    tlsconn.native_tls() is not None, reason=f"kite._tls unused here: {tlsconn.native_tls()}")

ALPN = ["http/1.1"]


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_kind(request):
    return request.param


@pytest.fixture
def certs(tmp_path):
    return make_certs(tmp_path, names=("localhost", "127.0.0.1"))


def contexts(certs):
    server = server_context(certs.cert, certs.key)
    server.set_alpn_protocols(ALPN)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(certs.cert)
    client.set_alpn_protocols(ALPN)
    return server, client


class Collect(asyncio.BufferedProtocol):
    """Keeps what arrives; ``until(n)`` waits for n bytes, ``ended`` for eof or loss."""

    def __init__(self, *, keep_open: bool = False) -> None:
        self.data = bytearray()
        self.buf = bytearray(8192)
        self.keep_open = keep_open
        self.transport = None
        self.eof = False
        self.lost: list = []
        self.paused = 0
        self.resumed = 0
        loop = asyncio.get_running_loop()
        self.ended = loop.create_future()
        self._want = 0
        self._enough = loop.create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint):
        return memoryview(self.buf)  # asyncio's TLS reads into slices of it

    def buffer_updated(self, n: int) -> None:
        self.data += self.buf[:n]
        if len(self.data) >= self._want and not self._enough.done():
            self._enough.set_result(None)

    def eof_received(self):
        self.eof = True
        if not self.ended.done():
            self.ended.set_result("eof")
        return self.keep_open

    def connection_lost(self, exc) -> None:
        self.lost.append(exc)
        if not self.ended.done():
            self.ended.set_result("lost")
        if not self._enough.done():
            if len(self.data) < self._want:
                self._enough.set_exception(ConnectionError("lost before enough bytes"))
            else:
                self._enough.set_result(None)

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1

    async def until(self, n: int, timeout: float = 20.0) -> None:
        self._want = n
        if len(self.data) >= n:
            return
        self._enough = asyncio.get_running_loop().create_future()
        await asyncio.wait_for(self._enough, timeout)


async def pair(certs, *, native_server=True, native_client=False,
               server_factory=Collect, client_factory=Collect, server_name="localhost"):
    """A TLS connection over loopback; each side kite's transport or the event loop's."""
    loop = asyncio.get_running_loop()
    sctx, cctx = contexts(certs)
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    if native_server:
        server = tlsconn.accept_tls(loop, server_factory, a, sctx, handshake_timeout=10)
    else:
        server = loop.connect_accepted_socket(server_factory, sock=a, ssl=sctx)
    if native_client:
        client = tlsconn.connect_tls(loop, client_factory, b, cctx, server_name,
                                     handshake_timeout=10)
    else:
        client = loop.create_connection(client_factory, sock=b, ssl=cctx,
                                        server_hostname=server_name)
    (st, _), (ct, _) = await asyncio.gather(server, client)
    # (The event loop's TLS may return its own protocol in front of the application's.)
    return st, st.get_protocol(), ct, ct.get_protocol()


@pytest.mark.parametrize("native", [(True, False), (False, True), (True, True)],
                         ids=["server", "client", "both"])
def test_bytes_go_through_intact_both_ways(certs, loop_kind, native):
    async def main():
        st, sp, ct, cp = await pair(certs, native_server=native[0], native_client=native[1])
        blob = os.urandom(3 * 1024 * 1024 + 17)  # many records, a last one partly full
        for i in range(0, len(blob), 70_001):
            ct.write(blob[i:i + 70_001])
        await sp.until(len(blob))
        assert hashlib.sha256(sp.data).digest() == hashlib.sha256(blob).digest()
        st.writelines([blob[:5], memoryview(blob)[5:100_000], bytearray(blob[100_000:])])
        await cp.until(len(blob))
        assert bytes(cp.data) == blob
        ct.close()
        st.close()
    support.run(main, loop_kind)


def test_handshake_results_are_reported(certs, loop_kind):
    async def main():
        st, sp, ct, cp = await pair(certs, native_client=True)
        for t in (st, ct):
            info = t.get_extra_info("ssl_object")
            assert info.version() == "TLSv1.3"
            assert info.selected_alpn_protocol() == "http/1.1"
            assert info.cipher()[1] == "TLSv1.3"
            assert t.get_extra_info("sslcontext") is not None
            assert isinstance(t.get_extra_info("socket"), socket.socket)
        server_info = st.get_extra_info("ssl_object")
        assert server_info.server_side and server_info.server_hostname == "localhost"
        assert server_info.getpeercert(binary_form=True) is None  # no client certificate
        der = ct.get_extra_info("ssl_object").getpeercert(binary_form=True)
        pem = open(certs.cert).read()
        assert der == ssl.PEM_cert_to_DER_cert(pem)
        ct.close()
        st.close()
    support.run(main, loop_kind)


def test_a_name_the_certificate_does_not_cover_fails_the_client(certs, loop_kind):
    async def main():
        loop = asyncio.get_running_loop()
        sctx, cctx = contexts(certs)
        a, b = socket.socketpair()
        server = loop.create_task(tlsconn.accept_tls(loop, Collect, a, sctx,
                                                     handshake_timeout=10))
        with pytest.raises(ssl.SSLCertVerificationError) as err:
            await tlsconn.connect_tls(loop, Collect, b, cctx, "other.example",
                                      handshake_timeout=10)
        assert err.value.reason == "CERTIFICATE_VERIFY_FAILED"
        assert "hostname mismatch" in err.value.verify_message.lower()
        assert b.fileno() == -1  # the socket was closed
        with pytest.raises(ssl.SSLError) as srv:
            await server  # the client's alert
        assert srv.value.reason == "SSLV3_ALERT_BAD_CERTIFICATE"
        assert a.fileno() == -1
    support.run(main, loop_kind)


def test_an_address_is_checked_against_the_certificate(certs, loop_kind):
    async def main():
        st, sp, ct, cp = await pair(certs, native_client=True, server_name="127.0.0.1")
        assert st.get_extra_info("ssl_object").server_hostname is None  # no SNI for an IP
        ct.close()
        st.close()
        loop = asyncio.get_running_loop()
        sctx, cctx = contexts(certs)
        a, b = socket.socketpair()
        server = loop.create_task(tlsconn.accept_tls(loop, Collect, a, sctx,
                                                     handshake_timeout=10))
        with pytest.raises(ssl.SSLCertVerificationError):
            await tlsconn.connect_tls(loop, Collect, b, cctx, "127.0.0.2", handshake_timeout=10)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await server
    support.run(main, loop_kind)


def test_a_silent_peer_times_the_handshake_out(certs, loop_kind):
    async def main():
        loop = asyncio.get_running_loop()
        sctx, _ = contexts(certs)
        a, b = socket.socketpair()
        with pytest.raises(asyncio.TimeoutError):
            await tlsconn.accept_tls(loop, Collect, a, sctx, handshake_timeout=0.2)
        assert a.fileno() == -1
        assert b.recv(10) == b""  # the peer sees the end
        b.close()
    support.run(main, loop_kind)


def test_plain_http_gets_a_named_error(certs, loop_kind):
    async def main():
        loop = asyncio.get_running_loop()
        sctx, _ = contexts(certs)
        a, b = socket.socketpair()
        b.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(ssl.SSLError) as err:
            await tlsconn.accept_tls(loop, Collect, a, sctx, handshake_timeout=10)
        assert err.value.reason in ("HTTP_REQUEST", "WRONG_VERSION_NUMBER")
        assert err.value.library == "SSL"
        b.close()
    support.run(main, loop_kind)


def test_a_peer_that_leaves_mid_handshake_is_a_connection_error(certs, loop_kind):
    async def main():
        loop = asyncio.get_running_loop()
        sctx, _ = contexts(certs)
        a, b = socket.socketpair()
        b.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's start
        b.close()
        with pytest.raises((ConnectionError, ssl.SSLError)):
            await tlsconn.accept_tls(loop, Collect, a, sctx, handshake_timeout=10)
        assert a.fileno() == -1
    support.run(main, loop_kind)


def test_cancelled_handshake_closes_the_socket(certs, loop_kind):
    async def main():
        loop = asyncio.get_running_loop()
        sctx, _ = contexts(certs)
        a, b = socket.socketpair()
        task = loop.create_task(tlsconn.accept_tls(loop, Collect, a, sctx, handshake_timeout=10))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert a.fileno() == -1
        b.close()
    support.run(main, loop_kind)


def test_reading_pauses_and_resumes_with_records_already_read(certs, loop_kind):
    async def main():
        st, sp, ct, cp = await pair(certs, native_server=False, native_client=True)
        await asyncio.sleep(0)
        ct.pause_reading()
        assert not ct.is_reading()
        st.write(b"a" * 1000)
        st.write(b"b" * 1000)  # two records; read-ahead may take both in one recv
        await asyncio.sleep(0.1)
        assert len(cp.data) == 0
        ct.resume_reading()
        await cp.until(2000)
        assert bytes(cp.data) == b"a" * 1000 + b"b" * 1000
        ct.close()
        st.close()
    support.run(main, loop_kind)


def test_writing_pauses_while_the_peer_does_not_read(certs, loop_kind):
    async def main():
        st, sp, ct, cp = await pair(certs, native_server=True, native_client=False)
        ct.pause_reading()
        st.set_write_buffer_limits(high=64 * 1024)
        sent = 0
        chunk = b"z" * 65536
        while not sp.paused and sent < 64 * 1024 * 1024:
            st.write(chunk)
            sent += len(chunk)
            await asyncio.sleep(0)
        assert sp.paused == 1 and st.get_write_buffer_size() > 64 * 1024
        ct.resume_reading()
        await cp.until(sent, timeout=60)
        await support_wait(lambda: sp.resumed == 1)
        assert st.get_write_buffer_size() == 0
        ct.close()
        st.close()
    support.run(main, loop_kind)


async def support_wait(cond, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_close_sends_everything_then_close_notify(certs, loop_kind):
    async def main():
        st, sp, ct, cp = await pair(certs, native_server=True, native_client=False)
        ct.pause_reading()
        blob = os.urandom(2 * 1024 * 1024)
        st.write(blob)
        st.close()
        assert st.is_closing()
        st.write(b"dropped")  # after close(): not sent
        ct.resume_reading()
        # close_notify: asyncio's TLS calls eof_received, uvloop's ends the connection
        await asyncio.wait_for(cp.ended, 20)
        await support_wait(lambda: sp.lost == [None] and cp.lost == [None])
        assert bytes(cp.data) == blob
    support.run(main, loop_kind)


@pytest.mark.parametrize("keep_open", [False, True])
def test_the_peers_end_is_eof_received(certs, loop_kind, keep_open):
    async def main():
        st, sp, ct, cp = await pair(
            certs, native_server=True, server_factory=lambda: Collect(keep_open=keep_open))
        ct.write(b"last words")
        ct.close()
        assert await asyncio.wait_for(sp.ended, 10) == "eof"
        assert bytes(sp.data) == b"last words"
        if keep_open:
            assert not st.is_closing()
            st.close()
        await support_wait(lambda: sp.lost == [None])
    support.run(main, loop_kind)


class PauseOnData(Collect):
    """Pauses reading as soon as bytes arrive (a protocol whose consumer is slow); takes
    several records a call (read_batch, as kite's tunnels to kite peers)."""

    read_batch = True

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.calls: list = []

    def buffer_updated(self, n: int) -> None:
        self.calls.append(n)
        super().buffer_updated(n)
        self.transport.pause_reading()


class PauseOnRecord(PauseOnData):
    """The same, a record a call (as kite's tunnels to pagekite.py, whose brake this is)."""

    read_batch = False


@pytest.mark.parametrize("batch", [False, True])
def test_records_come_one_a_call_unless_the_protocol_takes_batches(certs, loop_kind, batch):
    """Two records in one flight: a protocol that pauses reading on the first call gets one
    record without read_batch (nothing passes the brake but the record it acts on), both
    with it."""
    async def main():
        st, sp, ct, cp = await pair(certs, native_server=True, native_client=True,
                                    server_factory=PauseOnData if batch else PauseOnRecord)
        ct.write(b"a" * 3000)
        ct.write(b"b" * 3000)  # two records, sent before the server reads
        await sp.until(3000)
        await asyncio.sleep(0.1)  # nothing may come while paused
        assert sp.calls == ([6000] if batch else [3000])
        st.resume_reading()
        await sp.until(6000)
        assert bytes(sp.data) == b"a" * 3000 + b"b" * 3000
        assert sp.calls == ([6000] if batch else [3000, 3000])
        st.resume_reading()
        ct.close()
        await asyncio.wait_for(sp.ended, 10)
    support.run(main, loop_kind)


class PauseOnDataKeepOpen(PauseOnData):
    def __init__(self) -> None:
        super().__init__(keep_open=True)
        self.eofs = 0

    def eof_received(self):
        self.eofs += 1
        return super().eof_received()


@pytest.mark.parametrize("keep_open", [False, True])
def test_an_end_read_with_the_last_bytes_waits_for_resume_reading(certs, loop_kind,
                                                                  keep_open):
    """Bytes and the peer's close_notify arrive together, and several records are read into
    one loan: the protocol that paused reading on the bytes hears of the end only once it
    reads again, as from any transport, and once."""
    async def main():
        factory = PauseOnDataKeepOpen if keep_open else PauseOnData
        st, sp, ct, cp = await pair(certs, native_server=True, native_client=True,
                                    server_factory=factory)
        ct.write(b"x" * 3000)
        ct.write(b"last words")  # two records, then close_notify, in one flight
        ct.close()
        await sp.until(3010)
        await asyncio.sleep(0.1)  # nothing may come while paused
        assert bytes(sp.data) == b"x" * 3000 + b"last words" and not sp.eof
        st.resume_reading()
        assert await asyncio.wait_for(sp.ended, 10) == "eof"
        if keep_open:  # half-closed: still open, the end heard once
            await asyncio.sleep(0.1)
            assert sp.eofs == 1 and not st.is_closing()
            st.close()
        await support_wait(lambda: sp.lost == [None])
    support.run(main, loop_kind)


def test_a_tcp_end_without_close_notify_is_eof_too(certs, loop_kind):
    async def main():
        st, sp, ct, cp = await pair(certs, native_server=True, native_client=True)
        ct.write(b"cut")
        await sp.until(3)
        ct.get_extra_info("socket").shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(sp.ended, 10) == "eof"
        await support_wait(lambda: sp.lost == [None])
        ct.abort()
    support.run(main, loop_kind)


def test_abort_ends_at_once(certs, loop_kind):
    async def main():
        st, sp, ct, cp = await pair(certs, native_server=True)
        st.write(b"x" * 100)
        st.abort()
        assert st.is_closing()
        await support_wait(lambda: sp.lost == [None])
        assert await asyncio.wait_for(cp.ended, 10) in ("eof", "lost")
        ct.abort()
    support.run(main, loop_kind)


def test_a_protocol_that_raises_resets_the_connection(certs, loop_kind):
    class Raises(Collect):
        def buffer_updated(self, n):
            raise RuntimeError("protocol bug")

    async def main():
        loop = asyncio.get_running_loop()
        seen = []
        loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
        st, sp, ct, cp = await pair(certs, native_server=True, server_factory=Raises)
        ct.write(b"boom")
        await support_wait(lambda: bool(sp.lost))
        assert isinstance(sp.lost[0], RuntimeError) and st.is_closing()
        assert isinstance(seen[0]["exception"], RuntimeError)
        ct.abort()
    support.run(main, loop_kind)


def test_openssl_s_client_talks_to_it(certs, loop_kind):
    async def main():
        loop = asyncio.get_running_loop()
        sctx, _ = contexts(certs)
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        lsock.setblocking(False)
        port = lsock.getsockname()[1]

        class Echo(Collect):
            def buffer_updated(self, n):
                self.transport.write(bytes(self.buf[:n]).upper())

        async def serve():
            conn, _ = await loop.sock_accept(lsock)
            await tlsconn.accept_tls(loop, Echo, conn, sctx, handshake_timeout=10)

        task = loop.create_task(serve())
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
            "-CAfile", certs.cert, "-verify_return_error", "-quiet", "-tls1_2",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            proc.stdin.write(b"hello over tls 1.2\n")
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert line == b"HELLO OVER TLS 1.2\n"
        finally:
            proc.kill()
            await proc.wait()
            await task
            lsock.close()
    support.run(main, loop_kind)


def test_a_context_with_an_sni_callback_gets_the_event_loops_tls(certs, loop_kind):
    async def main():
        sctx, cctx = contexts(certs)
        sctx.sni_callback = lambda obj, name, ctx: None
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        server = tlsconn.accept_tls(loop, Collect, a, sctx, handshake_timeout=10)
        client = loop.create_connection(Collect, sock=b, ssl=cctx, server_hostname="localhost")
        (st, _), (ct, _) = await asyncio.gather(server, client)
        assert type(st).__name__ != "TLSTransport"
        ct.close()
        st.close()
    support.run(main, loop_kind)


def test_kite_native_tls_0_turns_it_off():
    code = "from kite.net import tlsconn; print(tlsconn.native_tls())"
    env = dict(os.environ, KITE_NATIVE_TLS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "KITE_NATIVE_TLS=0 is set"


def test_close_gives_up_after_the_shutdown_timeout(certs, loop_kind, monkeypatch):
    from kite import _tls

    monkeypatch.setattr(_tls, "SHUTDOWN_TIMEOUT", 0.3)

    async def main():
        st, sp, ct, cp = await pair(certs, native_server=True, native_client=False)
        ct.pause_reading()  # never reads: neither the data nor close_notify get through
        while st.get_write_buffer_size() == 0:
            st.write(b"q" * 1024 * 1024)
            await asyncio.sleep(0)
        st.close()
        await support_wait(lambda: sp.lost == [None], timeout=10)
        assert st.get_extra_info("socket").fileno() == -1
        ct.abort()
    support.run(main, loop_kind)


def test_a_closed_transport_is_freed_without_the_cycle_collector(certs, loop_kind):
    import gc

    def transports():
        return [o for o in gc.get_objects() if type(o).__name__ == "TLSTransport"]

    async def one_connection():
        st, sp, ct, cp = await pair(certs, native_server=True, native_client=True)
        ct.write(b"x")
        await sp.until(1)
        ct.close()
        await support_wait(lambda: sp.lost and cp.lost)

    async def main():
        gc.collect()
        before = len(transports())
        gc.disable()
        try:
            await one_connection()
            await asyncio.sleep(0)
            assert len(transports()) == before
        finally:
            gc.enable()
    support.run(main, loop_kind)


@pytest.mark.parametrize("native", [True, False], ids=["compiled", "event-loop"])
def test_a_client_without_a_name_sends_no_sni(certs, loop_kind, native, monkeypatch):
    """As the fleet's links dial: no name, the peer checked by its pin instead."""
    if not native:
        monkeypatch.setattr(tlsconn, "_why_not", "turned off by the test")

    async def main():
        loop = asyncio.get_running_loop()
        sctx, _ = contexts(certs)
        insecure = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        a, b = socket.socketpair()
        (st, _), (ct, _) = await asyncio.gather(
            tlsconn.accept_tls(loop, Collect, a, sctx, handshake_timeout=10),
            tlsconn.connect_tls(loop, Collect, b, insecure, None, handshake_timeout=10))
        assert (type(ct).__name__ == "TLSTransport") == native
        assert st.get_extra_info("ssl_object").server_hostname is None
        der = ct.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert der == ssl.PEM_cert_to_DER_cert(open(certs.cert).read())
        ct.close()
        st.close()
    support.run(main, loop_kind)


def test_writelines_takes_any_iterable_and_checks_every_piece_first(certs, loop_kind):
    async def main():
        st, sp, ct, cp = await pair(certs, native_server=True)
        st.writelines(piece for piece in (b"gen", b"erator"))
        strided = memoryview(b"abcdef")[::2]  # no contiguous buffer
        with pytest.raises((TypeError, ValueError, BufferError)):
            st.writelines([b"never sent", strided])
        st.write(b"|after")
        await cp.until(len(b"generator|after"))
        assert bytes(cp.data) == b"generator|after"
        ct.close()
        st.close()
    support.run(main, loop_kind)


def test_a_connection_made_that_raises_fails_the_handshake(certs, loop_kind):
    class Refuses(Collect):
        def connection_made(self, transport):
            raise RuntimeError("not this one")

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, _ctx: None)
        sctx, cctx = contexts(certs)
        a, b = socket.socketpair()
        client = loop.create_task(loop.create_connection(
            Collect, sock=b, ssl=cctx, server_hostname="localhost"))
        with pytest.raises(RuntimeError, match="not this one"):
            await asyncio.wait_for(
                tlsconn.accept_tls(loop, Refuses, a, sctx, handshake_timeout=10), 10)
        assert a.fileno() == -1
        ct, cp = await client
        assert await asyncio.wait_for(cp.ended, 10) in ("eof", "lost")
        ct.abort()
    support.run(main, loop_kind)


def test_a_context_with_a_key_log_gets_the_event_loops_tls(certs, loop_kind, tmp_path):
    async def main():
        sctx, cctx = contexts(certs)
        sctx.keylog_filename = str(tmp_path / "keys.log")
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        (st, _), (ct, _) = await asyncio.gather(
            tlsconn.accept_tls(loop, Collect, a, sctx, handshake_timeout=10),
            tlsconn.connect_tls(loop, Collect, b, cctx, "localhost", handshake_timeout=10))
        assert type(st).__name__ != "TLSTransport" and type(ct).__name__ == "TLSTransport"
        assert (tmp_path / "keys.log").read_text().count("CLIENT_TRAFFIC_SECRET_0") == 1
        ct.close()
        st.close()
    support.run(main, loop_kind)


def test_a_tls12_server_asking_to_renegotiate_is_declined(certs, loop_kind):
    """openssl s_server's "r" sends a HelloRequest: the client declines it (kite's own
    peers never renegotiate; TLS 1.3 has none), s_server then ends the connection, and
    the client hears why.  (Without OP_NO_RENEGOTIATION a write in the middle of the
    renegotiation failed with no reason.)"""
    async def main():
        loop = asyncio.get_running_loop()
        port = support.free_port()
        server = await asyncio.create_subprocess_exec(
            "openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_2", "-cert",
            certs.cert, "-key", certs.key, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
        try:
            for _ in range(200):
                try:
                    sock = socket.create_connection(("127.0.0.1", port))
                    break
                except OSError:
                    await asyncio.sleep(0.025)
            _, cctx = contexts(certs)
            ct, cp = await tlsconn.connect_tls(loop, Collect, sock, cctx, "localhost",
                                               handshake_timeout=10)
            assert ct.get_extra_info("ssl_object").version() == "TLSv1.2"
            ct.write(b"before\n")
            while b"before" not in await asyncio.wait_for(server.stdout.readline(), 10):
                pass
            server.stdin.write(b"r\n")  # s_server: renegotiate
            await server.stdin.drain()
            for i in range(1000):
                if cp.lost:
                    break
                ct.write(b"during %d\n" % i)
                await asyncio.sleep(0.002)
            await asyncio.wait_for(cp.ended, 10)
            await support_wait(lambda: bool(cp.lost))
            assert isinstance(cp.lost[0], ssl.SSLError), cp.lost
            assert "HANDSHAKE_FAILURE" in cp.lost[0].reason
            while b"no renegotiation" not in (
                    line := await asyncio.wait_for(server.stdout.readline(), 10)):
                assert line, "s_server ended without saying why"
        finally:
            if server.returncode is None:
                server.kill()
            await server.wait()
    support.run(main, loop_kind)
