"""kite's TLS 1.3 cipher suite order (kite.net.tls.prefer_ciphers): AES-128-GCM first, on
every context kite makes; ChaCha20 for a client that asks for it first."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading

import pytest

import support
from kite.certs.store import tls_server_context
from kite.net import tlsconn
from kite.net.tls import TLS13_CIPHERSUITES, client_context, server_context, tls13_order
from support import make_certs

_tls = pytest.importorskip("kite._tls")
if _tls.available() is not None:
    pytest.skip(f"kite._tls is off: {_tls.available()}", allow_module_level=True)

AES128 = "TLS_AES_128_GCM_SHA256"
AES256 = "TLS_AES_256_GCM_SHA384"
CHACHA = "TLS_CHACHA20_POLY1305_SHA256"


@pytest.fixture
def certs(tmp_path):
    return make_certs(tmp_path, names=("localhost",))


def _serve_one(sctx: ssl.SSLContext, sock: socket.socket, out: dict) -> threading.Thread:
    """Accept one TLS connection on ``sock`` (listening, or one end of a pair) in a thread;
    ``out["server"]`` gets the cipher it negotiated."""
    def run():
        try:
            conn = sock.accept()[0] if _listening(sock) else sock
            conn.settimeout(20)
            with sctx.wrap_socket(conn, server_side=True) as s:
                out["server"] = s.cipher()[0]
                s.sendall(b"y")  # the client waits for it: the tickets went out before
                s.recv(1)
        except (OSError, ssl.SSLError) as exc:
            out["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _listening(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def _handshake(sctx: ssl.SSLContext, cctx: ssl.SSLContext) -> dict:
    a, b = socket.socketpair()
    out: dict = {}
    thread = _serve_one(sctx, a, out)
    b.settimeout(20)
    with cctx.wrap_socket(b, server_hostname="localhost") as c:
        out["client"] = c.cipher()[0]
        assert c.recv(1) == b"y"
        c.sendall(b"x")
    thread.join(20)
    return out


def _s_client(sctx: ssl.SSLContext, suites: str, cafile: str) -> dict:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl program is not installed")
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    lsock.settimeout(30)
    out: dict = {}
    thread = _serve_one(sctx, lsock, out)
    try:
        subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{lsock.getsockname()[1]}",
             "-servername", "localhost", "-CAfile", cafile, "-tls1_3",
             "-ciphersuites", suites],
            input=b"x", capture_output=True, timeout=30, check=False)
        thread.join(20)
    finally:
        lsock.close()
    return out


@pytest.mark.parametrize("make_server", [server_context, tls_server_context],
                         ids=["tunnel-context", "visitor-context"])
def test_kite_client_and_server_agree_on_aes128(certs, make_server):
    out = _handshake(make_server(certs.cert, certs.key), client_context(certs.cert))
    assert out == {"server": AES128, "client": AES128}


def test_a_client_that_prefers_aes256_gets_aes128_from_a_kite_server(certs):
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # as OpenSSL's default order does
    client.load_verify_locations(certs.cert)
    _tls.set_ciphersuites(client, f"{AES256}:{CHACHA}:{AES128}")
    assert _handshake(tls_server_context(certs.cert, certs.key), client)["server"] == AES128


@pytest.mark.parametrize("make_server", [server_context, tls_server_context],
                         ids=["tunnel-context", "visitor-context"])
def test_a_client_that_puts_chacha20_first_gets_chacha20(certs, make_server):
    out = _s_client(make_server(certs.cert, certs.key), f"{CHACHA}:{AES128}", certs.cert)
    assert out.get("server") == CHACHA, out


def test_a_client_that_offers_only_aes256_gets_it(certs):
    out = _s_client(server_context(certs.cert, certs.key), AES256, certs.cert)
    assert out.get("server") == AES256, out


def test_kites_own_transport_negotiates_aes128(certs):
    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        (st, _), (ct, _) = await asyncio.gather(
            tlsconn.accept_tls(loop, asyncio.Protocol, a,
                               tls_server_context(certs.cert, certs.key), handshake_timeout=10),
            tlsconn.connect_tls(loop, asyncio.Protocol, b, client_context(certs.cert),
                                "localhost", handshake_timeout=10))
        try:
            assert tlsconn.native_tls() is not None or type(st).__name__ == "TLSTransport"
            assert st.get_extra_info("ssl_object").cipher()[0] == AES128
            assert ct.get_extra_info("ssl_object").cipher()[0] == AES128
        finally:
            st.abort()
            ct.abort()
    support.run(main, "uvloop")


def test_kite_client_contexts_offer_kites_order():
    names = [c["name"] for c in client_context(insecure=True).get_ciphers()][:3]
    assert ":".join(names) == TLS13_CIPHERSUITES


def test_only_the_order_changes():
    assert tls13_order([AES256, CHACHA, AES128]) == [AES128, CHACHA, AES256]
    assert tls13_order([AES256, CHACHA]) == [CHACHA, AES256]  # nothing added
    assert tls13_order(["TLS_AES_128_CCM_SHA256", AES256]) == [AES256, "TLS_AES_128_CCM_SHA256"]
    assert tls13_order([]) == []


def test_a_system_policy_that_turns_a_suite_off_is_obeyed(tmp_path):
    conf = tmp_path / "openssl.cnf"
    conf.write_text("openssl_conf = init\n[init]\nssl_conf = ssl\n[ssl]\n"
                    "system_default = policy\n[policy]\n"
                    f"Ciphersuites = {AES256}:{CHACHA}\n")
    code = ("import ssl; from kite.net.tls import client_context, server_context; "
            "v13 = lambda c: [x['name'] for x in c.get_ciphers() if x['protocol'] == 'TLSv1.3']; "
            "print(v13(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)), "
            "v13(client_context(insecure=True)))")
    env = dict(os.environ, OPENSSL_CONF=str(conf))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == f"{[AES256, CHACHA]} {[CHACHA, AES256]}"


@pytest.mark.parametrize("suites", ["", "TLS_NO_SUCH_SUITE", f"{AES128}:BOGUS", f"{AES128}::",
                                    f"{AES128}\0{AES256}"])
def test_a_list_openssl_would_not_take_whole_is_a_value_error(suites):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    before = ctx.get_ciphers()
    with pytest.raises(ValueError):
        _tls.set_ciphersuites(ctx, suites)
    assert ctx.get_ciphers() == before  # as it was


def test_set_ciphersuites_takes_an_ssl_context_and_a_string():
    with pytest.raises(TypeError):
        _tls.set_ciphersuites(object(), AES128)
    with pytest.raises(TypeError):
        _tls.set_ciphersuites(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), None)


def test_without_the_compiled_module_openssls_order_stays():
    code = ("import ssl; from kite.net.tls import client_context; "
            "names = lambda c: [x['name'] for x in c.get_ciphers()]; "
            "print(names(client_context(insecure=True)) == "
            "names(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)))")
    env = dict(os.environ, KITE_NO_EXTENSIONS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "True"


def test_the_benchmarks_tls_peers_are_given_kites_order():
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    from relaybench.common import TLS13_SUITES

    assert TLS13_SUITES == TLS13_CIPHERSUITES
