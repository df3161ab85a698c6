"""Visitors may not take the relay's last connections: those are kept for tunnels
(``--tunnel-reserve``), so a backend can connect, or reconnect, while a flood of visitors
that stay connected holds everything else (kite.relay.accept.Acceptor.admit_visitor)."""

from __future__ import annotations

import socket
import ssl

import pytest

from support import make_certs, wait_until

HOST = "site.test.kite"
OTHER = "other.test.kite"
MAX_CONNECTIONS = 40
RESERVE = 12


def _visit(port: int, host: str) -> tuple[socket.socket, bytes]:
    """A keep-alive GET; returns the connection (left open) and the status line."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /hold HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
    return sock, _status_line(sock)


def _status_line(sock) -> bytes:
    """The first line the server sends (b"" if it closes first)."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0]


def _serves(port: int, host: str) -> bool:
    try:
        sock, status = _visit(port, host)
    except OSError:
        return False
    sock.close()
    return status.startswith(b"HTTP/1.1 200")


def test_a_visitor_flood_leaves_room_for_tunnels(relay_process, expose_process, http_origin):
    relay = relay_process("--max-connections", str(MAX_CONNECTIONS),
                          "--tunnel-reserve", str(RESERVE))
    assert f"(the last {RESERVE} for tunnels)" in relay.log()
    expose_process(f"http://127.0.0.1:{http_origin.port}", HOST, relay)
    flood: list[socket.socket] = []
    try:
        statuses = []
        for _ in range(MAX_CONNECTIONS):
            sock, status = _visit(relay.port, HOST)
            flood.append(sock)
            statuses.append(status)
        served = [s for s in statuses if s.startswith(b"HTTP/1.1 200")]
        refused = [s for s in statuses if s.startswith(b"HTTP/1.1 503")]
        # the tunnel and the visitors leave RESERVE connections free
        assert len(served) == MAX_CONNECTIONS - RESERVE - 1, statuses
        assert len(refused) == len(statuses) - len(served), statuses
        wait_until(lambda: "kept for tunnels (--tunnel-reserve)" in relay.log(), 10,
                   "the overload line")
        log = relay.log()
        assert log.count("visitor(s) refused: the last") == 1, log  # a summary, not a line each

        # The served visitors stay connected; a second backend still flies.
        expose_process(f"http://127.0.0.1:{http_origin.port}", OTHER, relay)
        assert not _serves(relay.port, OTHER)  # a visitor of it is refused, for now
    finally:
        for sock in flood:
            sock.close()
    wait_until(lambda: _serves(relay.port, OTHER), 15, "the second kite serves")
    assert _serves(relay.port, HOST)


def _https_status(port: int, host: str) -> bytes:
    """The status line of ``GET /`` over TLS with SNI ``host`` (certificate not checked);
    raises OSError (ssl.SSLError) when the relay closes instead."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                     % host.encode())
        return _status_line(sock)


def test_a_full_relay_refuses_tls_before_the_handshake(tmp_path, relay_process,
                                                       expose_process, http_origin):
    """A visitor whose TLS the relay would terminate is refused before the handshake
    costs anything, and served again once the flood is gone."""
    site = make_certs(tmp_path, names=("*.test.kite",), stem="site")
    relay = relay_process("--max-connections", str(MAX_CONNECTIONS),
                          "--tunnel-reserve", str(RESERVE),
                          "--tls-cert", site.cert, "--tls-key", site.key)
    expose_process(f"http://127.0.0.1:{http_origin.port}", HOST, relay)
    assert _https_status(relay.port, HOST) == b"HTTP/1.1 200 OK"
    flood: list[socket.socket] = []
    try:
        for _ in range(MAX_CONNECTIONS - RESERVE - 1):
            sock, status = _visit(relay.port, HOST)
            flood.append(sock)
            assert status.startswith(b"HTTP/1.1 200"), status
        with pytest.raises(OSError):
            _https_status(relay.port, HOST)
    finally:
        for sock in flood:
            sock.close()
    wait_until(lambda: _https_ok(relay.port, HOST), 15, "TLS visitors are served again")


def _https_ok(port: int, host: str) -> bool:
    try:
        return _https_status(port, host) == b"HTTP/1.1 200 OK"
    except OSError:
        return False


def test_the_reserve_is_a_checked_setting(tmp_path):
    from kite.errors import ConfigError
    from kite.relay.accept import default_tunnel_reserve
    from kite.relay.config import build_relay_config

    assert [default_tunnel_reserve(n) for n in (4, 40, 896, 19744, 10 ** 6)] == \
        [1, 10, 56, 1024, 1024]
    cfg = build_relay_config(listen=("127.0.0.1:0",), kites=("http:a.test.kite:" + "s" * 20,),
                             limits={"max_connections": 100, "tunnel_reserve": 0})
    assert cfg.tunnel_reserve == 0
    with pytest.raises(ConfigError, match="tunnel_reserve"):
        build_relay_config(listen=("127.0.0.1:0",), kites=("http:a.test.kite:" + "s" * 20,),
                           limits={"max_connections": 100, "tunnel_reserve": 100})
