"""TLS termination at the relay for http kites: a real ``kite relay`` process with three
certificates (its own, ``*.test.kite`` ECDSA, ``rsa.test.kite`` RSA), real ``kite expose``
processes, curl, Python's ssl and the websockets client as visitors.

The relay's own names are those of its first certificate (relay.test.kite); the others
serve https for the http kites they cover; an https kite still passes through untouched.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest

from kite.net.tls import generate_self_signed
from support import KITE, SECRET, Proc

ZONE = "test.kite"
BLOB = os.urandom(1 << 20)
RELAY_NAME = f"relay.{ZONE}"


class EchoHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the request line and the headers it received."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path.startswith("/blob/"):  # N bytes of BLOB
            size = int(self.path[6:])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            for i in range(0, size, len(BLOB)):
                self.wfile.write(BLOB[: min(len(BLOB), size - i)])
            return
        body = (f"{self.requestline}\r\n{self.headers}").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        left = int(self.headers["Content-Length"])
        h = hashlib.sha256()
        while left:
            chunk = self.rfile.read(min(left, 1 << 20))
            h.update(chunk)
            left -= len(chunk)
        body = h.hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class EchoServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # visitors that hang up early (handshake-only tests) are not errors here


def make_pair(directory, stem, names, key_type="ec"):
    """A self-signed certificate and key in ``directory``: (cert, key, SHA-256 pin)."""
    cert, key = str(directory / f"{stem}.crt"), str(directory / f"{stem}.key")
    fp = generate_self_signed(cert, key, names, key_type=key_type)
    return cert, key, fp


class Certs:
    """The relay's three pairs: its own (first), ``*.test.kite`` (ECDSA), ``rsa.test.kite``."""

    def __init__(self, d):
        self.relay = make_pair(d, "relay", [RELAY_NAME, "127.0.0.1"])
        self.wild = make_pair(d, "wild", [f"*.{ZONE}"])
        self.rsa = make_pair(d, "rsa", [f"rsa.{ZONE}"], key_type="rsa")


@pytest.fixture
def origin():
    """An HTTP server on a thread that echoes request heads; yields its port."""
    server = EchoServer(("127.0.0.1", 0), EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def https_origin(tmp_path):
    """A TLS server with its own certificate (secure.test.kite): the https kite's."""
    cert, key, _ = make_pair(tmp_path, "origin", [f"secure.{ZONE}"])
    server = EchoServer(("127.0.0.1", 0), EchoHandler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], cert
    server.shutdown()
    server.server_close()


@pytest.fixture
def ws_origin():
    """A websocket echo server (the websockets package, sync API) on a thread."""
    from websockets.sync.server import serve

    def echo(ws):
        for msg in ws:
            ws.send(f"echo {msg} via {ws.request.headers.get('X-Forwarded-Proto')}")

    server = serve(echo, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.socket.getsockname()[1]
    server.shutdown()


@pytest.fixture
def https_relay(tmp_path):
    """``https_relay(*extra)``: a kite relay process with the three certificates; returns
    (port, Certs).  ``kites(...)`` then starts ``kite expose`` processes and waits until
    each flies."""
    certs = Certs(tmp_path)
    procs: list[Proc] = []

    def start(*extra):
        argv = [*KITE, "relay", "--listen", "127.0.0.1:0", "-v", "--kite", f"*:*.{ZONE}"]
        for cert, key, _ in (certs.relay, certs.wild, certs.rsa):
            argv += ["--tls-cert", cert, "--tls-key", key]
        proc = Proc([*argv, *extra], tmp_path, f"relay{len(procs)}",
                    env={"KITE_SECRET": SECRET})
        procs.append(proc)
        out = proc.wait_for("relay listening on", timeout=30)
        port = int(out.split("relay listening on 127.0.0.1:")[1].split()[0])
        return port, certs, proc

    def expose(port, target, name):
        argv = [*KITE, "expose", target, name, "--relay", f"127.0.0.1:{port}",
                "--fingerprint", certs.relay[2], "-v"]
        proc = Proc(argv, tmp_path, f"expose{len(procs)}", env={"KITE_SECRET": SECRET})
        procs.append(proc)
        proc.wait_for("flying", timeout=30)
        return proc

    start.expose = expose  # type: ignore[attr-defined]
    yield start
    for p in procs:
        p.stop(signal.SIGKILL)


def curl(port, name, path="/", *, cacert, extra=()):
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    out = subprocess.run(
        ["curl", "-sS", "-i", "--max-time", "20", "--cacert", cacert, "--resolve",
         f"{name}:{port}:127.0.0.1", *extra, f"https://{name}:{port}{path}"],
        capture_output=True, timeout=30)
    return out.returncode, out.stdout.decode(errors="replace"), out.stderr.decode(errors="replace")


def tls_connect(port, server_hostname, *, ca=None, alpn=None, version=None):
    """A TLS handshake with the relay; returns the SSLSocket (the caller closes it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca:
        ctx.load_verify_locations(ca)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if version:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer old versions at all
        ctx.minimum_version = ctx.maximum_version = version
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        return ctx.wrap_socket(sock, server_hostname=server_hostname)
    except BaseException:
        sock.close()
        raise


def pem_der(path):
    return ssl.PEM_cert_to_DER_cert(open(path).read())


def test_terminates_tls_for_an_http_kite(https_relay, origin):
    port, certs, relay = https_relay()
    https_relay.expose(port, f"http://127.0.0.1:{origin}", f"app.{ZONE}")
    rc, out, err = curl(port, f"app.{ZONE}", "/hello?x=1", cacert=certs.wild[0])
    assert rc == 0, err
    assert out.startswith("HTTP/1.1 200"), out
    assert "GET /hello?x=1 HTTP/1.1" in out
    assert "X-Forwarded-Proto: https" in out, out
    assert "X-Forwarded-For: 127.0.0.1" in out, out
    # ALPN: http/1.1 even when the visitor prefers h2
    with tls_connect(port, f"app.{ZONE}", ca=certs.wild[0], alpn=["h2", "http/1.1"]) as s:
        assert s.selected_alpn_protocol() == "http/1.1"
        assert s.version() in ("TLSv1.2", "TLSv1.3")
    # plain HTTP still works, and says so
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: app.{ZONE}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and b"X-Forwarded-Proto: http\n" in data
    # A visitor's TLS ending is no reason for a warning (a TLS transport cannot stay open
    # for writing after the peer's EOF; the stream must not ask it to).
    relay.stop()
    assert "WARNING" not in relay.output(), relay.output()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_bulk_both_ways_through_termination(https_relay, origin, tmp_path, loop):
    port, certs, _ = https_relay("--loop", loop)
    https_relay.expose(port, f"http://127.0.0.1:{origin}", f"app.{ZONE}")
    size = 24 << 20
    out = tmp_path / "down.bin"
    rc, _, err = curl(port, f"app.{ZONE}", f"/blob/{size}", cacert=certs.wild[0],
                      extra=("-o", str(out)))
    assert rc == 0, err
    expected = hashlib.sha256(BLOB * (size // len(BLOB))).hexdigest()
    head, _, body = out.read_bytes().partition(b"\r\n\r\n")  # curl -i: the head too
    assert head.startswith(b"HTTP/1.1 200") and len(body) == size, head
    assert hashlib.sha256(body).hexdigest() == expected
    up = tmp_path / "up.bin"
    up.write_bytes(BLOB * 16)
    rc, body, err = curl(port, f"app.{ZONE}", "/up", cacert=certs.wild[0],
                         extra=("--data-binary", f"@{up}", "-H", "Content-Type: x/y"))
    assert rc == 0, err
    assert body.endswith(hashlib.sha256(BLOB * 16).hexdigest()), body[-200:]
    # head and a large body in one write: the first decrypted read is longer than a
    # stream-open payload takes
    body = BLOB[: 300 * 1024]
    with tls_connect(port, f"app.{ZONE}", ca=certs.wild[0]) as s:
        s.sendall(f"POST /big HTTP/1.1\r\nHost: app.{ZONE}\r\nContent-Length: {len(body)}\r\n"
                  "Connection: close\r\n\r\n".encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    assert data.endswith(hashlib.sha256(body).hexdigest().encode())
    # keep-alive: several requests on one TLS connection (curl reuses it)
    rc, body, err = curl(port, f"app.{ZONE}", "/one", cacert=certs.wild[0],
                         extra=(f"https://app.{ZONE}:{port}/two",))
    assert rc == 0 and "GET /one " in body and "GET /two " in body, err


def test_two_certificates_chosen_by_sni(https_relay, origin):
    port, certs, _ = https_relay()
    https_relay.expose(port, f"http://127.0.0.1:{origin}", f"*.{ZONE}")
    with tls_connect(port, f"rsa.{ZONE}", ca=certs.rsa[0]) as s:
        assert s.getpeercert(binary_form=True) == pem_der(certs.rsa[0])
    with tls_connect(port, f"www.{ZONE}", ca=certs.wild[0]) as s:
        assert s.getpeercert(binary_form=True) == pem_der(certs.wild[0])
    for name, ca in ((f"rsa.{ZONE}", certs.rsa[0]), (f"www.{ZONE}", certs.wild[0])):
        rc, out, err = curl(port, name, cacert=ca)
        assert rc == 0, err
        assert f"Host: {name}" in out and "X-Forwarded-Proto: https" in out, out


def test_passthrough_still_wins_when_an_https_kite_flies(https_relay, origin, https_origin):
    tls_port, origin_cert = https_origin
    port, certs, _ = https_relay()
    https_relay.expose(port, f"http://127.0.0.1:{origin}", f"*.{ZONE}")
    https_relay.expose(port, f"https://127.0.0.1:{tls_port}", f"secure.{ZONE}")
    # *.test.kite covers secure.test.kite, but the https kite gets the TLS end to end
    rc, out, err = curl(port, f"secure.{ZONE}", "/e2e", cacert=origin_cert)
    assert rc == 0, err
    assert "GET /e2e HTTP/1.1" in out
    assert "X-Forwarded-Proto" not in out  # the relay never saw the plaintext


def test_no_sni_gets_the_relay_certificate(https_relay):
    port, certs, _ = https_relay()
    with tls_connect(port, None) as s:
        assert s.getpeercert(binary_form=True) == pem_der(certs.relay[0])
    with tls_connect(port, RELAY_NAME, ca=certs.relay[0]) as s:
        assert s.getpeercert(binary_form=True) == pem_der(certs.relay[0])


def test_unknown_sni_gets_an_alert(https_relay, origin):
    port, certs, _ = https_relay()
    https_relay.expose(port, f"http://127.0.0.1:{origin}", f"app.{ZONE}")
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        tls_connect(port, "nope.example.org")  # no kite, no certificate
    # granted (*.test.kite) but not flying, and no certificate covers it: "offline"
    with pytest.raises(ssl.SSLError, match="INTERNAL_ERROR"):
        tls_connect(port, f"a.b.{ZONE}")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_tls_versions_are_refused(https_relay, origin, version):
    port, certs, proc = https_relay()
    https_relay.expose(port, f"http://127.0.0.1:{origin}", f"app.{ZONE}")
    for name in (None, f"app.{ZONE}"):  # the relay's own TLS, and a terminated kite
        try:
            tls_connect(port, name, version=version).close()
        except ssl.SSLError as exc:
            if "NO_PROTOCOLS_AVAILABLE" in str(exc):
                pytest.skip(f"this OpenSSL cannot even offer {version.name}")
            assert "PROTOCOL_VERSION" in str(exc), exc  # the alert, not just a close
        else:
            raise AssertionError(f"{version.name} handshake with the relay succeeded")
    proc.wait_for("TLS 1.2 or newer needed", timeout=10)
    # the relay still serves
    rc, out, err = curl(port, f"app.{ZONE}", cacert=certs.wild[0])
    assert rc == 0 and "X-Forwarded-Proto: https" in out, err


def test_redirect_http_gives_308(https_relay, origin):
    port, certs, _ = https_relay("--redirect-http")
    https_relay.expose(port, f"http://127.0.0.1:{origin}", f"app.{ZONE}")
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(f"GET /a/b?c=1 HTTP/1.1\r\nHost: app.{ZONE}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head = data.decode()
    assert head.startswith("HTTP/1.1 308"), head
    assert f"Location: https://app.{ZONE}:{port}/a/b?c=1\r\n" in head
    # ... and the https URL works
    rc, out, err = curl(port, f"app.{ZONE}", "/a/b?c=1", cacert=certs.wild[0])
    assert rc == 0 and out.startswith("HTTP/1.1 200"), err


def test_websocket_over_wss_terminated_at_the_relay(https_relay, ws_origin):
    from websockets.sync.client import connect

    port, certs, _ = https_relay()
    https_relay.expose(port, f"http://127.0.0.1:{ws_origin}", f"ws.{ZONE}")
    ctx = ssl.create_default_context(cafile=certs.wild[0])
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    with connect(f"wss://ws.{ZONE}:{port}/chat", sock=sock, ssl=ctx,
                 server_hostname=f"ws.{ZONE}", open_timeout=20) as ws:
        for i in range(3):
            ws.send(f"hello {i}")
            assert ws.recv(timeout=20) == f"echo hello {i} via https"


def test_certificate_replaced_on_disk_is_served_without_restart(https_relay, origin, tmp_path):
    port, certs, proc = https_relay()
    https_relay.expose(port, f"http://127.0.0.1:{origin}", f"app.{ZONE}")
    old = pem_der(certs.wild[0])
    with tls_connect(port, f"app.{ZONE}") as s:
        assert s.getpeercert(binary_form=True) == old
    new_cert, new_key, _ = make_pair(tmp_path, "wild2", [f"*.{ZONE}", "extra.org"])
    os.replace(new_key, certs.wild[1])  # key first: a poll in between sees a mismatch
    os.replace(new_cert, certs.wild[0])
    new = pem_der(certs.wild[0])
    deadline = time.monotonic() + 30
    while True:
        with tls_connect(port, f"app.{ZONE}") as s:
            if s.getpeercert(binary_form=True) == new:
                break
        assert time.monotonic() < deadline, proc.output()
        time.sleep(0.2)
    rc, out, err = curl(port, f"app.{ZONE}", cacert=certs.wild[0])
    assert rc == 0 and "X-Forwarded-Proto: https" in out, err
    assert proc.proc.poll() is None


def test_sighup_reloads_and_a_bad_file_keeps_the_old_pair(https_relay, origin):
    port, certs, proc = https_relay()
    https_relay.expose(port, f"http://127.0.0.1:{origin}", f"*.{ZONE}")
    old = pem_der(certs.rsa[0])
    with open(certs.rsa[0], "w") as f:
        f.write("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    os.kill(proc.pid, signal.SIGHUP)
    proc.wait_for("reload failed, still serving the old one", timeout=30)
    with tls_connect(port, f"rsa.{ZONE}") as s:  # the old pair, still
        assert s.getpeercert(binary_form=True) == old
    assert proc.proc.poll() is None


def test_a_pair_installed_at_run_time_serves_https(tmp_path):
    """A relay that started without certificates (plain tunnels) gets one later
    (``CertStore.install``, what automatic certificates call): HTTPS for its http kite."""
    import asyncio

    from support import http_kite, kite_env, run, start_http_server

    cert, key, _ = make_pair(tmp_path, "late", [f"*.{ZONE}"])

    async def main():
        server, origin_port = await start_http_server(echo_headers=True)
        async with kite_env(tmp_path, [http_kite(f"app.{ZONE}", origin_port)], tls=False) as env:
            ctx = ssl.create_default_context(cafile=cert)
            with pytest.raises(ssl.SSLError):  # no certificate yet: an alert
                await asyncio.open_connection("127.0.0.1", env.port, ssl=ctx,
                                              server_hostname=f"app.{ZONE}")
            env.relay.certs.install(cert, key)
            reader, writer = await asyncio.open_connection("127.0.0.1", env.port, ssl=ctx,
                                                           server_hostname=f"app.{ZONE}")
            writer.write(f"GET /late HTTP/1.1\r\nHost: app.{ZONE}\r\nConnection: close\r\n\r\n"
                         .encode())
            data = await asyncio.wait_for(reader.read(), 20)
            writer.close()
            assert data.startswith(b"HTTP/1.1 200"), data
            assert b"X-Forwarded-Proto: https\r\n" in data, data
        server.close()

    run(main, "uvloop")


def test_hsts_on_the_first_response_of_each_terminated_connection(https_relay, origin):
    port, certs, _ = https_relay("--hsts", "600")
    https_relay.expose(port, f"http://127.0.0.1:{origin}", f"app.{ZONE}")
    rc, out, err = curl(port, f"app.{ZONE}", "/one", cacert=certs.wild[0],
                        extra=(f"https://app.{ZONE}:{port}/two",))  # one connection, two requests
    assert rc == 0, err
    first, _, second = out.partition("HTTP/1.1 200 OK\r\n")[2].partition("HTTP/1.1 200 OK\r\n")
    assert "Strict-Transport-Security: max-age=600\r\n" in first, out
    assert "GET /two " in first and "GET /one " in second  # curl's order: extra URL first
    assert "Strict-Transport-Security" not in second  # later responses pass untouched
    # plain HTTP never gets it
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: app.{ZONE}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and b"Strict-Transport" not in data


def test_redirect_and_hsts_per_kite(https_relay, origin, tmp_path):
    conf = tmp_path / "relay.toml"
    conf.write_text(f'[[kite]]\ndomain = "app.{ZONE}"\nsecret_file = "{tmp_path / "s"}"\n'
                    'redirect_http = true\nhsts = 5\n')
    (tmp_path / "s").write_text(SECRET + "\n")
    os.chmod(tmp_path / "s", 0o600)
    port, certs, _ = https_relay("--config", str(conf))
    https_relay.expose(port, f"http://127.0.0.1:{origin}", f"*.{ZONE}")

    def plain(name):
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(f"GET /p HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data.decode(errors="replace")

    assert plain(f"app.{ZONE}").startswith("HTTP/1.1 308")
    assert plain(f"other.{ZONE}").startswith("HTTP/1.1 200")  # no redirect for it
    rc, out, err = curl(port, f"app.{ZONE}", cacert=certs.wild[0])
    assert rc == 0 and "Strict-Transport-Security: max-age=5\r\n" in out, err
    rc, out, err = curl(port, f"other.{ZONE}", cacert=certs.wild[0])
    assert rc == 0 and "Strict-Transport-Security" not in out, err


def test_a_long_first_read_is_split_between_stream_open_and_data():
    """TlsVisitor: the stream-open payload stays within MAX_PEEK; what the first decrypted
    read held beyond it reaches the stream's protocol as data, in order (no network)."""
    import asyncio

    from kite.relay.accept import MAX_PEEK
    from kite.relay.dispatch import TlsVisitor

    got: dict = {"opened": None, "data": bytearray()}

    class Recorder(asyncio.BufferedProtocol):
        def connection_made(self, transport):
            pass

        def get_buffer(self, sizehint):
            self.buf = bytearray(1000)  # smaller than the rest: several loans
            return self.buf

        def buffer_updated(self, n):
            got["data"] += self.buf[:n]

    class Dispatcher:
        def terminated_stream(self, transport, addr, port, host, data, end):
            got["opened"] = (data, end)
            return Recorder()

    class Transport:
        def set_protocol(self, protocol):
            self.protocol = protocol

    head = f"POST / HTTP/1.1\r\nHost: app.{ZONE}\r\nContent-Length: 50000\r\n\r\n".encode()
    data = head + BLOB[:50000]
    TlsVisitor(Dispatcher(), ("127.0.0.1", 5), 443, f"app.{ZONE}").head_received(
        Transport(), data, len(head))
    opened, end = got["opened"]
    assert end == len(head) and opened == data[:MAX_PEEK]
    assert bytes(got["data"]) == data[MAX_PEEK:]


def test_sessions_resume_with_tickets(https_relay, origin):
    port, certs, _ = https_relay()
    https_relay.expose(port, f"http://127.0.0.1:{origin}", f"app.{ZONE}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(certs.wild[0])
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # the session is there after the handshake
    session = None
    for attempt in range(2):
        with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
            with ctx.wrap_socket(raw, server_hostname=f"app.{ZONE}", session=session) as s:
                assert s.session_reused == (attempt == 1)
                session = s.session
                assert session is not None and session.has_ticket
