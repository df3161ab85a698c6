"""The fleet's link (kite.relay.fleetlink, kite.proto.fleet): relay B hands every visitor of
a kite flying on relay A over one long-lived TLS connection to A, one stream a visitor.

* the in-memory connection that joins a stream of the link to a stream of the kite's
  tunnel at A (kite.net.pipes.transport_pair): bytes both ways, backpressure, half-close,
  close and reset;
* real relays on one real redis-server (A on 127.0.0.2, B on 127.0.0.3): many visitors at
  once over one link, each with its own address; an upload and a download of megabytes
  intact; a stream's end; A killed mid-download: the visitor sees the cut, never a clean
  end; the link refuses a wrong secret and a bad stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import re
import signal
import socket
import ssl
import sys
import threading
import time

import pytest
import redis as redis_lib
from prometheus_client.parser import text_string_to_metric_families

from kite.fastpath import ChunkWriter, Demux
from kite.net.pipes import transport_pair
from kite.net.tls import server_context
from kite.proto import control
from kite.proto.fleet import LINK_ANSWER, build_link_head
from kite.relay.fleetlink import FleetLink
from redisd import RedisServer
from support import SECRET, Proc, free_port, make_certs
from support import wait_until as until

KITE = "app.link.test.kite"
MB = 1000 * 1000

ORIGIN = r'''
import hashlib, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path.startswith("/bytes/"):
            n = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            block = b"k" * 65536
            while n > 0:
                self.wfile.write(block[:n])
                n -= len(block)
            return
        body = ("xff=%s path=%s\n" % (self.headers.get("X-Forwarded-For"), self.path)).encode()
        if self.headers.get("X-Forwarded-Proto") == "https":
            body = b"https " + body
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        out = ("%d %s\n" % (len(body), hashlib.sha256(body).hexdigest())).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a):
        pass
ThreadingHTTPServer.daemon_threads = True
s = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print("serving", flush=True)
s.serve_forever()
'''


# -- the in-memory connection ------------------------------------------------------------------
class Recorder(asyncio.BufferedProtocol):
    """Notes what its transport does to it; reads through a small buffer."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.events: list = []
        self.buf = bytearray(1000)
        self.eof_answer = True

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.events.append("made")

    def get_buffer(self, sizehint: int):
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self.buf[:nbytes]

    def eof_received(self):
        self.events.append("eof")
        return self.eof_answer

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")

    def connection_lost(self, exc) -> None:
        self.events.append(("lost", type(exc).__name__ if exc else None))


def pair():
    loop = asyncio.get_running_loop()
    a, b = transport_pair(loop, {"peername": ("192.0.2.1", 1)}, {"peername": ("192.0.2.2", 2)})
    pa, pb = Recorder(), Recorder()
    for t, p in ((a, pa), (b, pb)):
        t.set_protocol(p)
        p.connection_made(t)
    return a, b, pa, pb


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_memory_pair_bytes_backpressure_and_half_close():
    async def main():
        a, b, pa, pb = pair()
        assert b.get_extra_info("peername") == ("192.0.2.2", 2)
        a.write(b"x" * 2500)  # more than one read buffer: three reads, no copy kept
        assert pb.data == b"x" * 2500 and not a.get_write_buffer_size()
        b.pause_reading()
        a.set_write_buffer_limits(high=3000, low=1000)
        a.write(memoryview(b"y" * 2000))
        a.write(b"z" * 2000)
        assert a.get_write_buffer_size() == 4000 and pa.events[-1] == "pause"
        a.write_eof()  # after the queued bytes
        await settle()
        assert "eof" not in pb.events and len(pb.data) == 2500
        b.resume_reading()
        await settle()
        assert pb.data == b"x" * 2500 + b"y" * 2000 + b"z" * 2000
        assert pa.events[-1] == "resume" and pb.events[-1] == "eof"
        b.write(b"answer")  # the other direction still carries bytes
        assert pa.data == b"answer"
        b.close()
        await settle()
        # b's EOF reaches a; both directions are done, so both ends are gone
        assert pa.events[-2:] == ["eof", ("lost", None)]
        assert pb.events[-1] == ("lost", None)
        assert a.is_closing() and b.is_closing()

    asyncio.run(main())


def test_memory_pair_reset_and_write_after_close():
    async def main():
        a, b, pa, pb = pair()
        b.pause_reading()
        a.write(b"never read")
        a.abort()  # a reset: the queued bytes are dropped, the other end sees an error
        await settle()
        assert pb.data == b"" and ("lost", "ConnectionResetError") in pb.events
        assert ("lost", None) in pa.events
        c, d, pc, pd = pair()
        pd.eof_answer = False  # d closes once c's EOF arrives
        c.close()
        await settle()
        assert ("lost", None) in pc.events and ("lost", None) in pd.events
        d.write(b"too late")  # a write to a closed connection is dropped, never a crash
        assert pc.data == b""
        e, f, pe, pf = pair()
        f.pause_reading()
        e.write(b"unread")
        f.close()  # closed with bytes for it unread: the writer's connection resets
        await settle()
        assert ("lost", "ConnectionResetError") in pe.events and ("lost", None) in pf.events

    asyncio.run(main())


# -- real relays -------------------------------------------------------------------------------
@pytest.fixture
def fleet(tmp_path, relay_process, expose_process):
    """Relays A (flies the kite, an origin behind it) and B of one fleet, B serving it."""
    redis = RedisServer(tmp_path)
    port = free_port()
    origin = Proc([sys.executable, "-c", ORIGIN, str(port)], tmp_path, "origin")
    origin.wait_for("serving", timeout=20)
    grant = (f"http:{KITE}:{SECRET}",)
    a = relay_process("--redis", redis.url(0), "--relay-id", "relay-a", grants=grant,
                      listen="127.0.0.2:0", name="a")
    b = relay_process("--redis", redis.url(0), "--relay-id", "relay-b", "--admin",
                      "127.0.0.3:0", grants=grant,
                      listen="127.0.0.3:0", name="b")
    expose_process(f"http://127.0.0.1:{port}", KITE, a)
    until(lambda: get(b, "/ready")[0] == 200, 10, "relay B hands visitors to relay A")
    yield redis, a, b
    origin.stop(signal.SIGKILL)
    redis.stop()


def test_https_visitor_of_an_http_kite_terminated_at_b(tmp_path, relay_process,
                                                       expose_process):
    """An https visitor reaches B for an http kite that flies on A: B's certificate covers
    the name, so B terminates the TLS and hands the plaintext over on the link as an RTLS
    stream; the backend sees X-Forwarded-Proto: https.  Without a certificate for the name
    B has nothing to terminate with, and the visitor gets the TLS alert."""
    redis = RedisServer(tmp_path)
    port = free_port()
    origin = Proc([sys.executable, "-c", ORIGIN, str(port)], tmp_path, "origin")
    origin.wait_for("serving", timeout=20)
    site = make_certs(tmp_path, names=(KITE,), stem="site")
    grant = (f"http:{KITE}:{SECRET}",)
    a = relay_process("--redis", redis.url(0), "--relay-id", "relay-a", grants=grant,
                      listen="127.0.0.2:0", name="a")
    b = relay_process("--redis", redis.url(0), "--relay-id", "relay-b", "--tls-cert",
                      site.cert, "--tls-key", site.key, grants=grant, listen="127.0.0.3:0",
                      name="b")
    try:
        expose_process(f"http://127.0.0.1:{port}", KITE, a)
        until(lambda: get(b, "/ready")[0] == 200, 10, "relay B hands visitors to relay A")
        ctx = ssl.create_default_context(cafile=site.cert)
        ctx.set_alpn_protocols(["http/1.1"])
        for i in range(3):  # the first over a new TLS session each time, on the one link
            with socket.create_connection((b.host, b.port), timeout=10) as raw, \
                    ctx.wrap_socket(raw, server_hostname=KITE) as s:
                conn = http.client.HTTPConnection(KITE, timeout=10)
                conn.sock = s
                for j in range(2):  # keep-alive inside the terminated TLS
                    conn.request("GET", f"/tls/{i}/{j}", headers={"Host": KITE})
                    resp = conn.getresponse()
                    assert (resp.status, resp.read()) == (
                        200, f"https xff=127.0.0.1 path=/tls/{i}/{j}\n".encode())
        assert "TLS terminated here" in b.log()
        # A holds no certificate for the name: a visitor sent to A directly gets the alert
        # (A does not terminate), which shows the TLS above really ended at B.
        with socket.create_connection((a.host, a.port), timeout=10) as raw:
            with pytest.raises(ssl.SSLError):
                ctx.wrap_socket(raw, server_hostname=KITE)
    finally:
        origin.stop(signal.SIGKILL)
        redis.stop()


def get(relay, path: str, source: str = "127.0.0.9") -> tuple[int, bytes]:
    with socket.create_connection((relay.host, relay.port), timeout=30,
                                  source_address=(source, 0)) as s:
        conn = http.client.HTTPConnection(relay.host, relay.port, timeout=30)
        conn.sock = s
        conn.request("GET", path, headers={"Host": KITE})
        resp = conn.getresponse()
        return resp.status, resp.read()


def handovers(relay) -> dict:
    """``kite_fleet_handovers_total`` of ``relay``'s /metrics, by the other relay."""
    m = re.search(r"admin listening on http://([\d.]+):(\d+)/", relay.log())
    assert m, relay.log()
    conn = http.client.HTTPConnection(m.group(1), int(m.group(2)), timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return {s.labels["relay"]: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == "kite_fleet_handovers_total"}


def test_many_visitors_share_one_link(fleet):
    _, a, b = fleet
    results: dict = {}

    def visitor(i: int) -> None:
        source = f"127.0.0.{10 + i % 5}"
        with socket.create_connection((b.host, b.port), timeout=30,
                                      source_address=(source, 0)) as s:
            conn = http.client.HTTPConnection(b.host, b.port, timeout=30)
            conn.sock = s
            got = []
            for j in range(5):  # keep-alive: five requests on one connection
                conn.request("GET", f"/v{i}/{j}", headers={"Host": KITE})
                resp = conn.getresponse()
                got.append((resp.status, resp.read().decode().strip()))
            results[i] = (source, got)

    threads = [threading.Thread(target=visitor, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 40
    for i, (source, got) in results.items():
        assert got == [(200, f"xff={source} path=/v{i}/{j}") for j in range(5)], got
    assert a.log().count("fleet link up from") == 1  # all of them on one link
    assert b.log().count("of its link)") >= 41  # each at DEBUG (the fixture's -v) ...
    # ... and the first at INFO, once for the kite and relay
    assert b.log().count(f"visitors of http:{KITE} are handed to relay {a.host}:{a.port}, "
                         "which flies it") == 1, b.log()
    handed = handovers(b)
    assert list(handed) == [f"{a.host}:{a.port}"] and handed[f"{a.host}:{a.port}"] >= 41
    # A stream's end leaves the link up: a new visitor after all those ended uses it too.
    assert get(b, "/after")[1] == b"xff=127.0.0.9 path=/after\n"
    assert a.log().count("fleet link up from") == 1


def test_upload_and_download_through_the_link(fleet):
    _, _, b = fleet
    body = bytes(range(256)) * (12 * 4096)  # 12 MiB up: more than a window, both pair ends
    conn = http.client.HTTPConnection(b.host, b.port, timeout=60)
    conn.request("POST", "/up", body=body, headers={"Host": KITE})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.read().decode().split() == [str(len(body)), hashlib.sha256(body).hexdigest()]
    conn.request("GET", f"/bytes/{30 * MB}", headers={"Host": KITE})
    resp = conn.getresponse()
    got = 0
    while chunk := resp.read(1 << 20):
        assert chunk == b"k" * len(chunk)
        got += len(chunk)
    assert resp.status == 200 and got == 30 * MB


def test_relay_gone_mid_download_is_a_cut(fleet):
    _, a, b = fleet
    with socket.create_connection((b.host, b.port), timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(f"GET /bytes/{500 * MB} HTTP/1.1\r\nHost: {KITE}\r\n\r\n".encode())
        got = 0
        while got < 1 * MB:  # the download is under way, read slowly
            data = s.recv(65536)
            assert data
            got += len(data)
        a.proc.stop(signal.SIGKILL)
        ended = "clean end"
        try:
            while got < 500 * MB:
                data = s.recv(1 << 20)
                if not data:
                    break
                got += len(data)
        except ConnectionResetError:
            ended = "reset"
        assert ended == "reset" and got < 500 * MB, (ended, got)
    until(lambda: "fleet link to 127.0.0.2" in b.log(), 5, "B logs the link's end")


def _tls_to(relay):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx.wrap_socket(socket.create_connection((relay.host, relay.port), timeout=10))


def _read_all(s) -> bytes:
    out = b""
    try:
        while data := s.recv(65536):
            out += data
    except (ConnectionResetError, ssl.SSLError, TimeoutError):
        pass
    return out


def test_link_refuses_a_wrong_secret_and_a_bad_stream(fleet):
    redis, a, _ = fleet
    secret = redis_lib.Redis.from_url(redis.url(0)).get("kite:fleet:secret").decode()
    with _tls_to(a) as s:
        s.sendall(build_link_head("not-" + secret))
        assert _read_all(s) == b""  # closed, no answer
    until(lambda: "fleet link from" in a.log() and "wrong fleet secret" in a.log(), 5,
          "A logs the refusal")
    with _tls_to(a) as s:
        s.sendall(build_link_head(secret))
        answer = b""
        while len(answer) < len(LINK_ANSWER):
            answer += s.recv(len(LINK_ANSWER) - len(answer))
        assert answer == LINK_ANSWER
        w = ChunkWriter()
        # a stream with a protocol a relay never hands over, then one for a kite A does
        # not fly
        w.write_chunk(*control.build_stream_open(1, "http-8080", KITE, 80, "192.0.2.7", 5))
        w.write_chunk(*control.build_stream_open(2, "http", "nope.link.test.kite", 80,
                                                 "192.0.2.7", 5))
        w.write_chunk(*control.build_eof(2, read_closed=True, write_closed=False))
        s.sendall(bytes(w.flush()))
        events: list = []
        demux = Demux(lambda h, p: events.extend(control.parse_chunk(h, p)))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (
                any(isinstance(e, control.Eof) and e.sid == 1 and e.write_closed
                    for e in events)
                and any(isinstance(e, control.Eof) and e.sid == 2 and e.read_closed
                        for e in events)):
            data = s.recv(65536)
            assert data
            demux.feed_data(data)
        page = b"".join(bytes(e.payload) for e in events
                        if isinstance(e, control.Data) and e.sid == 2)
        assert b"503" in page.split(b"\r\n", 1)[0], page[:200]
        assert not any(isinstance(e, control.Data) and e.sid == 1 for e in events)
    assert "bad stream open" in a.log()


# -- a relay that takes no link (an older kite), in process --------------------------------
class OldRelay(asyncio.Protocol):
    """Answers a link head as a relay without links does (not ``KITE/1 200 Link``) and takes
    a ``FLEET`` head's visitor: says who it is from, then echoes."""

    heads: list = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.buf = b""
        self.head = None

    def data_received(self, data: bytes) -> None:
        if self.head is not None:
            self.transport.write(data)
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        self.head, rest = self.buf[:end + 4], self.buf[end + 4:]
        OldRelay.heads.append(self.head.split(b"\r\n", 1)[0])
        if self.head.startswith(b"FLEET-LINK "):
            self.transport.write(b"HTTP/1.1 503 Unavailable\r\n\r\n")
            self.transport.close()
            return
        visitor = [line for line in self.head.split(b"\r\n") if line.startswith(b"X-Kite-Visitor")]
        self.transport.write(b"from " + visitor[0].split(b": ")[1] + b"\n" + rest)


def test_relay_without_links_gets_one_connection_a_visitor(tmp_path):
    certs = make_certs(tmp_path)

    async def visit(link, target, proto: str, send: bytes, expect: int = -1) -> bytes:
        """What a visitor sending ``send`` (then EOF) reads: ``expect`` bytes, or until
        the end (over TLS the EOF does not reach the other relay: an echo stays open)."""
        loop = asyncio.get_running_loop()
        lsock = socket.create_server(("127.0.0.1", 0))
        lsock.setblocking(False)
        reader, writer = await asyncio.open_connection(*lsock.getsockname())
        writer.write(send)
        await writer.drain()
        writer.write_eof()
        sock, _ = await loop.sock_accept(lsock)
        lsock.close()
        # its first bytes are waiting in the socket, as when the dispatcher hands it over
        link.forward(sock, target, "app.link.test.kite", proto, 80, ("192.0.2.7", 4242))
        got = await asyncio.wait_for(
            reader.read() if expect < 0 else reader.readexactly(expect), 10)
        writer.close()
        return got

    async def main():
        OldRelay.heads = []
        server = await asyncio.get_running_loop().create_server(
            OldRelay, "127.0.0.1", 0, ssl=server_context(certs.cert, certs.key))
        port = server.sockets[0].getsockname()[1]
        link = FleetLink(None, "fleet-secret")
        target = {"forward": f"127.0.0.1:{port}", "fingerprint": certs.fingerprint}
        hello = b"from 192.0.2.7:4242\n"
        assert await visit(link, target, "raw", b"ping", len(hello) + 4) == hello + b"ping"
        assert await visit(link, target, "raw", b"again", len(hello) + 5) == hello + b"again"
        # one link head, refused; then each visitor on a connection of its own
        assert OldRelay.heads == [b"FLEET-LINK KITE/1", b"FLEET app.link.test.kite KITE/1",
                                  b"FLEET app.link.test.kite KITE/1"]
        # a certificate that is not the one published: no secret sent, HTTP visitors get 502
        wrong = dict(target, fingerprint="0" * 64)
        got = await visit(FleetLink(None, "fleet-secret"), wrong, "http", b"GET / HTTP/1.1\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 502"), got[:80]
        assert len(OldRelay.heads) == 3
        # nobody listening: the same
        server.close()
        await server.wait_closed()
        got = await visit(FleetLink(None, "fleet-secret"), target, "http", b"GET / HTTP/1.1\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 502"), got[:80]
        await link.close()

    asyncio.run(main())
