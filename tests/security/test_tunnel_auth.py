"""Tunnels to a real relay process from peers without the secret, or with stolen parts of a
registration: what they can make the relay hold, and what they can fly (nothing).

Findings 1, 2 and 5 of the hardening review (docs/security.md)."""

from __future__ import annotations

import socket
import ssl
import time

from pkpeer import Peer, fly

from kite.errors import HandshakeError
from kite.proto import control, handshake
from support import SECRET

PING = control.build_ping(1.0)
MiB = 1024 * 1024


def _flood(peer: Peer, chunk: bytes, total: int, stall: float = 3.0) -> int:
    """Send ``chunk`` repeatedly, never reading, until ``total`` bytes went out or the relay
    took nothing for ``stall`` seconds (it stopped reading) or closed; returns bytes sent."""
    sock = peer.sock
    sock.setblocking(False)
    block = chunk * max(1, 65536 // len(chunk))
    pending = memoryview(b"")
    sent = 0
    last_progress = time.monotonic()
    while sent < total:
        if not pending:
            pending = memoryview(block)
        try:
            n = sock.send(pending)
        except BlockingIOError:
            if time.monotonic() - last_progress > stall:
                break
            time.sleep(0.01)
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        pending = pending[n:]
        sent += n
        last_progress = time.monotonic()
    sock.setblocking(True)
    return sent


def _ping_chunk() -> bytes:
    from kite.fastpath import ChunkWriter

    w = ChunkWriter()
    w.write_chunk(*PING)
    return w.flush()


def test_unauthenticated_tunnel_is_cut_off_early(relay_process):
    """An unsigned kite line with AddKites gets a challenge, then a tiny chunk mode: the
    relay answers none of its PINGs and aborts it past 64 KiB, instead of queueing replies
    (once: 19 MB of PINGs took the relay from 28 to 598 MiB)."""
    relay = relay_process()
    rss0 = relay.rss_kib()
    with Peer(relay.port, rcvbuf=4096) as peer:
        line = handshake.KiteLine.signed("http", "a.test.kite", "b" * 36, SECRET, "")
        reply = peer.connect([line])
        assert reply.sign_this and not reply.ok
        sent = _flood(peer, _ping_chunk(), 20 * MiB)
        assert sent < 8 * MiB, f"the relay took {sent} bytes from an unauthenticated peer"
        assert peer.closed_by_relay()
    assert relay.rss_kib() - rss0 < 16 * 1024
    relay.proc.wait_for("before any kite was registered")
    assert relay.alive()


def test_registration_timeout_aborts(relay_process):
    """A peer that never answers its challenge and never reads is aborted, not closed
    gracefully behind a buffer it does not drain."""
    relay = relay_process()
    with Peer(relay.port, rcvbuf=4096) as peer:
        line = handshake.KiteLine.signed("http", "a.test.kite", "b" * 36, SECRET, "")
        assert peer.connect([line]).sign_this
        assert peer.closed_by_relay(timeout=40)
    relay.proc.wait_for("no kite registered within")


def test_authenticated_peer_that_does_not_read_is_bounded(relay_process):
    """A backend with the secret that floods PINGs and never reads: the relay stops reading
    from it once its queue passes the tunnel's windows, so its memory stays bounded."""
    relay = relay_process()
    peer, reply, _ = fly(relay.port, "flood.test.kite", SECRET)
    with peer:
        assert [r.kite for r in reply.ok] == ["http:flood.test.kite"]
        rss0 = relay.rss_kib()
        sent = _flood(peer, _ping_chunk(), 200 * MiB)
        assert sent < 120 * MiB, "the relay kept reading a peer that never reads"
        assert relay.rss_kib() - rss0 < 96 * 1024
        relay.proc.wait_for("peer does not read")
    assert relay.alive()


def test_relay_names_are_never_kites(relay_process):
    """A wildcard grant covers the relay's own name: a backend must not fly it, and TLS for
    that name reaches the relay itself even while a wildcard https kite flies."""
    relay = relay_process("--tls-name", "relay.test.kite", "--tls-name", "localhost")
    with Peer(relay.port) as peer:  # refused at once, before any challenge
        line = handshake.KiteLine.signed("https", "relay.test.kite", "b" * 36, SECRET, "")
        reply = peer.connect([line])
        assert not reply.ok and not reply.sign_this
        assert [(r.kite, why) for r, why in reply.invalid] == [("https:relay.test.kite",
                                                                 "reserved")]
    wild, reply, _ = fly(relay.port, "*.test.kite", SECRET, proto="https")
    with wild:
        assert [r.kite for r in reply.ok] == ["https:*.test.kite"]
        ctx = ssl.create_default_context(cafile=relay.cert)
        ctx.check_hostname = False
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="relay.test.kite") as tls:
                assert tls.getpeercert(binary_form=True)  # the relay's own certificate
        # and an HTTP request for the relay's name is not routed to a wildcard http kite
    http, reply, _ = fly(relay.port, "*.test.kite", SECRET, proto="http")
    with http:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: relay.test.kite\r\n\r\n")
            assert c.recv(65536).startswith(b"HTTP/1.1 404 ")


def test_a_captured_signed_line_flies_nothing(relay_process):
    """The signed line of a registration, replayed later (in-band or by re-connecting),
    gets a fresh challenge: each challenge answers one signature."""
    relay = relay_process()
    victim, reply, signed = fly(relay.port, "v.test.kite", SECRET)
    with victim:
        assert reply.ok
        with Peer(relay.port) as replay:  # the re-connect variant
            again = replay.connect([signed])
            assert not again.ok and again.sign_this
        unsigned = handshake.KiteLine.signed("http", "w.test.kite", "c" * 36, SECRET, "")
        with Peer(relay.port) as replay:  # in-band, after a challenge round of its own
            assert replay.connect([unsigned]).sign_this
            replay.inband([signed])
            answer = replay.wait_event(control.KiteReply).reply
            assert not answer.ok and answer.sign_this


def test_replace_needs_the_same_kites(relay_process):
    """Knowing a tunnel's session id is not enough to close it (X-PageKite-Replace)."""
    relay = relay_process()
    victim, reply, _ = fly(relay.port, "s.test.kite", SECRET)
    with victim:
        sid = reply.session_id
        assert sid
        line = handshake.KiteLine.signed("http", "s.test.kite", "c" * 36, "wrong-secret", "")
        with Peer(relay.port) as attacker:
            first = attacker.connect([line], replace=sid)
            assert first.sign_this
            attacker.inband([first.sign_this[0].answer("wrong-secret")])
            with_reply = attacker.wait_event(control.KiteReply).reply
            assert not with_reply.ok
        victim.send_chunk(*PING)
        assert victim.wait_event(control.Pong)  # the victim's tunnel is still up
        assert "replaced by the reconnecting backend" not in relay.log()


def test_signature_guessing_is_slowed_and_logged_in_aggregate(relay_process):
    relay = relay_process()
    bad = "not-the-secret-at-all"
    attempts = 0
    blocked_at = None
    for attempts in range(1, 41):
        try:
            with Peer(relay.port, timeout=5) as peer:
                line = handshake.KiteLine.signed("http", "g.test.kite", "d" * 36, bad, "")
                first = peer.connect([line])
                if not first.sign_this:
                    blocked_at = attempts
                    break
                peer.inband([first.sign_this[0].answer(bad)])
                peer.wait_event(control.KiteReply)
        except (ConnectionError, OSError):
            blocked_at = attempts
            break
    assert blocked_at is not None and blocked_at <= 10, "guesses were never refused"
    log = relay.proc.wait_for("too many failed signatures from 127.0.0.1")
    failures = [ln for ln in log.splitlines() if "failed kite signatures" in ln
                or ("refused: signature" in ln)]
    assert 1 <= len(failures) <= 5, failures  # a summary at 2, 4, 8 ... not a line per guess
    assert bad not in log and SECRET not in log
    # the right secret from the same address waits out the block too
    line = handshake.KiteLine.signed("http", "g.test.kite", "e" * 36, SECRET, "")
    with Peer(relay.port, timeout=5) as peer:
        try:
            first = peer.connect([line])
        except (ConnectionError, OSError, HandshakeError):
            first = None
        assert first is None or not (first.sign_this or first.ok)
