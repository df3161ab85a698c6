"""A stream cut short reaches the visitor as a reset, never as a clean end after a prefix:
real relay and backend processes, a local server in a thread, ``kill -9`` mid-transfer.

Also: the backend flies again soon after a killed relay returns on the same port, and a
stopped peer (SIGSTOP) is noticed within the keepalive window, logged, and recovered from
after SIGCONT.
"""

from __future__ import annotations

import re
import signal
import socket
import time

import pytest
from faults import BIG, Download, LocalServer, Upload, reset_socket

from support import KITE, Proc, free_port, wait_until

HOST = "big.test.kite"
RAW_PORT = 2222
#: Bytes a visitor gets before the test kills something: well into the transfer.
MID = 1 << 20


@pytest.fixture
def server():
    servers = []

    def start(mode="http"):
        s = LocalServer(mode=mode).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def _expose(expose_process, relay, srv, *args):
    if srv.mode == "raw":
        return expose_process(f"tcp://127.0.0.1:{srv.port}", HOST, relay, "--public-port",
                              str(RAW_PORT), *args)
    return expose_process(f"http://127.0.0.1:{srv.port}", HOST, relay, *args)


def _visitor(relay, kind):
    if kind == "raw":
        return Download(relay.port, HOST, connect_port=RAW_PORT)
    if kind == "upload":
        return Upload(relay.port, HOST)
    return Download(relay.port, HOST)


@pytest.mark.parametrize("victim", ["backend", "relay"])
@pytest.mark.parametrize("kind", ["http", "raw", "upload"])
def test_kill_mid_transfer_is_never_a_silent_prefix(relay_process, expose_process, server,
                                                    victim, kind):
    srv = server("raw" if kind == "raw" else "http")
    relay = relay_process()
    backend = _expose(expose_process, relay, srv)
    visitor = _visitor(relay, kind)
    wait_until(lambda: visitor.progress >= MID or visitor.outcome, 20, "transfer under way")
    assert visitor.outcome is None, visitor.outcome
    (backend if victim == "backend" else relay.proc).stop(signal.SIGKILL)
    out = visitor.wait(20)
    assert out.received < BIG, "the transfer finished before the kill: make it bigger"
    if kind == "upload":
        # The visitor's request fails visibly; the local server never takes a cut-off body
        # for a complete one.
        assert out.end in ("reset", "error page", "no answer"), out
        wait_until(lambda: srv.uploads, 10, "the local server saw the upload end")
        assert srv.uploads == ["reset"], srv.uploads
    else:
        assert out.end == "reset", out
        if victim == "relay":
            wait_until(lambda: srv.downloads, 10, "the local server saw the download end")
            assert srv.downloads[0].startswith("reset"), srv.downloads


def test_kite_forward_passes_a_cut_on(relay_process, expose_process, server, tmp_path):
    """``kite forward``: the relay dies mid-download; the forward's client sees a reset."""
    srv = server("raw")
    relay = relay_process()
    _expose(expose_process, relay, srv)
    port = free_port()
    fwd = Proc([*KITE, "forward", f"127.0.0.1:{port}", f"{HOST}:{RAW_PORT}", "--relay",
                f"127.0.0.1:{relay.port}"], tmp_path, "forward")
    try:
        fwd.wait_for("forwarding")
        visitor = Download(port, HOST, bare=True)
        wait_until(lambda: visitor.progress >= MID or visitor.outcome, 20, "transfer under way")
        relay.proc.stop(signal.SIGKILL)
        out = visitor.wait(20)
        assert out.received < BIG and out.end == "reset", out
    finally:
        fwd.stop(signal.SIGKILL)


def test_visitor_reset_resets_the_local_server(relay_process, expose_process, server):
    """A visitor that resets mid-upload: the local server sees a reset too, not an EOF."""
    srv = server("http")
    relay = relay_process()
    _expose(expose_process, relay, srv)
    sock = socket.create_connection(("127.0.0.1", relay.port))
    sock.sendall(b"POST /up HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n"
                 % (HOST.encode(), BIG) + bytes(MID))
    wait_until(lambda: srv.upload_progress > 0, 10, "the upload reached the local server")
    reset_socket(sock)
    wait_until(lambda: srv.uploads, 10, "the local server saw the upload end")
    assert srv.uploads == ["reset"], srv.uploads


def test_local_server_reset_reaches_the_visitor(relay_process, expose_process):
    """The local server resets mid-response: the visitor sees a reset (through the
    backend's cut, EOF WR without R, and the relay's reset)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    port = lsock.getsockname()[1]
    relay = relay_process()
    expose_process(f"http://127.0.0.1:{port}", HOST, relay)
    visitor = Download(relay.port, HOST)
    conn, _ = lsock.accept()
    conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + bytes(MID))
    wait_until(lambda: visitor.progress >= MID // 2, 10, "half of what was sent arrived")
    reset_socket(conn)
    lsock.close()
    out = visitor.wait(20)
    assert out.end == "reset", out


def test_backend_flies_again_soon_after_the_relay_returns(relay_process, expose_process, server):
    srv = server("http")
    relay = relay_process()
    backend = _expose(expose_process, relay, srv)
    port = relay.port
    relay.proc.stop(signal.SIGKILL)
    wait_until(lambda: "tunnel to" in backend.output() and "closed" in backend.output(), 10,
               "the backend noticed")
    flights = backend.output().count("kite flying")
    relay2 = relay_process(listen=f"127.0.0.1:{port}")
    back = time.monotonic()
    wait_until(lambda: backend.output().count("kite flying") > flights, 5,
               "the backend flies again")
    assert time.monotonic() - back <= 2.0
    assert relay2.port == port


def _dead_tunnel_logged(log: str) -> bool:
    return bool(re.search(r"no answer to PING within [\d.]+ s: tunnel is dead", log))


@pytest.mark.parametrize("stopped", ["backend", "relay"])
def test_stopped_peer_is_noticed_within_keepalive(relay_process, expose_process, server,
                                                   stopped):
    keepalive = 2.0
    srv = server("http")
    relay = relay_process("--keepalive", str(keepalive))
    backend = _expose(expose_process, relay, srv, "--keepalive", str(keepalive))
    victim, watcher = ((backend, relay.proc) if stopped == "backend" else (relay.proc, backend))
    flights = backend.output().count("kite flying")
    victim.proc.send_signal(signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        # keepalive/2 of silence, then at most keepalive/2 for an answer, checked every
        # keepalive/8: the tunnel is declared dead within 1.25 x keepalive (+ slack).
        wait_until(lambda: _dead_tunnel_logged(watcher.output()), keepalive * 1.25 + 1.5,
                   f"the {'relay' if stopped == 'backend' else 'backend'} closes the tunnel")
        assert time.monotonic() - stopped_at <= keepalive * 1.25 + 1.5
    finally:
        victim.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: backend.output().count("kite flying") > flights, 15,
               "the backend flies again after SIGCONT")
    visitor = Download(relay.port, HOST)
    wait_until(lambda: visitor.progress > 0 or visitor.outcome, 10, "a visitor gets through")
    assert visitor.progress > 0, visitor.outcome


@pytest.mark.parametrize("victim", ["backend", "local server"])
def test_cut_before_the_response_gets_an_error_page(relay_process, expose_process, victim):
    """Nothing of the response was sent yet: the HTTP visitor gets a 502 page."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    port = lsock.getsockname()[1]
    relay = relay_process()
    backend = expose_process(f"http://127.0.0.1:{port}", HOST, relay)
    visitor = Download(relay.port, HOST)
    conn, _ = lsock.accept()
    conn.recv(65536)  # the request arrived; no answer
    if victim == "backend":
        backend.stop(signal.SIGKILL)
    else:
        reset_socket(conn)
    out = visitor.wait(20)
    assert (out.end, out.detail) == ("error page", "HTTP/1.1 502 Bad Gateway"), out
    lsock.close()
