"""Findings 6 and 7 against a real relay process: a tunnel at its stream cap, and kite lines
and PING values with control characters and Unicode digits."""

from __future__ import annotations

import socket
import threading

from pkpeer import Peer, fly

from kite.proto import control
from support import SECRET


def _local_server() -> tuple[socket.socket, int]:
    """A local server that accepts and holds every connection open (never answers)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held: list = []

    def run():
        while True:
            try:
                held.append(srv.accept()[0])
            except OSError:
                return

    threading.Thread(target=run, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_visitors_beyond_the_stream_cap_get_a_503(relay_process, expose_process):
    relay = relay_process("--max-streams", "3")
    srv, port = _local_server()
    expose_process(f"http://127.0.0.1:{port}", "cap.test.kite", relay)
    visitors = []
    try:
        for _ in range(3):  # these hold the tunnel's three streams open
            c = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
            c.sendall(b"GET / HTTP/1.1\r\nHost: cap.test.kite\r\n\r\n")
            visitors.append(c)
        relay.proc.wait_for("tunnel up")
        extra = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
        visitors.append(extra)
        extra.sendall(b"GET / HTTP/1.1\r\nHost: cap.test.kite\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = extra.recv(4096)
            assert data, "closed without an answer"
            answer += data
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert relay.alive()
    finally:
        for c in visitors:
            c.close()
        srv.close()


def test_control_characters_and_unicode_digits_are_protocol_errors(relay_process):
    """Each bad value closes only its own tunnel with a logged, escaped reason; the relay
    keeps serving (it once aborted with "internal error" and raw control characters)."""
    relay = relay_process()
    bad_lines = [
        b"X-PageKite: http:a.test.kite:b\rx::\r\n",
        b"X-PageKite: raw-2\xc2\xb2:a.test.kite:bbbb::\r\n",
        b"X-PageKite: http:a.test.kite\x07:bbbb::\r\n",
    ]
    for line in bad_lines:
        with Peer(relay.port) as peer:
            peer.sock.sendall(b"CONNECT PageKite:1 HTTP/1.0\r\n" + line + b"\r\n")
            assert peer.closed_by_relay()
    # a PING whose value holds a lone CR, on an authenticated tunnel
    peer, reply, _ = fly(relay.port, "edge.test.kite", SECRET)
    with peer:
        assert reply.ok
        body = b"NOOP: 1\r\nPING: 1\r2\r\n\r\n"
        peer.sock.sendall(b"%x\r\n" % len(body) + body)
        assert peer.closed_by_relay()
    log = relay.log()
    assert "\x07" not in log and "\rx" not in log
    assert "internal error" not in log and "Traceback" not in log
    peer, reply, _ = fly(relay.port, "after.test.kite", SECRET)  # still serving
    with peer:
        assert reply.ok
        peer.send_chunk(*control.build_ping(1.0))
        assert peer.wait_event(control.Pong)
