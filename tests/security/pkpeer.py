"""A hand-driven PageKite peer on a blocking socket: what an attacker (or a careful test
backend) sends a relay, chunk by chunk, built with kite's own protocol layer."""

from __future__ import annotations

import socket
import time
from typing import Optional

from kite.fastpath import ChunkWriter, Demux
from kite.proto import control, handshake, signing
from kite.proto.http import find_head_end

SECRET_BSALT = "b" * 36


class Peer:
    def __init__(self, port: int, *, rcvbuf: Optional[int] = None, timeout: float = 10.0) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.events: list = []
        self.demux = Demux(lambda h, p: self.events.extend(control.parse_chunk(h, p)))
        self.writer = ChunkWriter()
        self.rest = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- handshake --------------------------------------------------------------------------
    def connect(self, lines, *, replace=None, kiteflow: bool = True) -> handshake.RelayReply:
        """Send ``CONNECT PageKite`` with ``lines`` and return the relay's parsed answer."""
        self.sock.sendall(handshake.build_tunnel_request(
            lines, zchunks=False, replace=replace,
            extra_features=["KiteFlow"] if kiteflow else []))
        buf = b""
        while (end := find_head_end(buf)) is None:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"relay closed after {buf!r}")
            buf += data
        self.rest = buf[end:]
        if self.rest:
            self.demux.feed_data(self.rest)
        return handshake.parse_tunnel_response(buf[:end])

    def send_chunk(self, header_block: bytes, payload: bytes = b"") -> None:
        self.writer.write_chunk(header_block, payload)
        self.sock.sendall(self.writer.flush())

    def inband(self, lines) -> None:
        self.send_chunk(*handshake.build_inband_request(lines))

    def wait_event(self, kind, timeout: float = 10.0):
        """Read chunks until an event of ``kind`` arrives; returns it (ConnectionError if the
        relay closes first)."""
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events:
                if isinstance(e, kind):
                    self.events.remove(e)
                    return e
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {kind.__name__} within {timeout} s")
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("relay closed the tunnel")
            self.demux.feed_data(data)

    def closed_by_relay(self, timeout: float = 10.0) -> bool:
        """True once the relay closed or reset the connection (reads and drops the rest)."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(65536):
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True
            except TimeoutError:
                continue
        return False


def fly(port: int, domain: str, secret: str, *, proto: str = "http",
        kiteflow: bool = True) -> tuple[Peer, handshake.RelayReply, handshake.KiteLine]:
    """Register ``proto:domain`` with ``secret`` in the in-band variant; returns the peer,
    the relay's in-band reply and the signed line that flew it."""
    peer = Peer(port)
    bsalt = signing.make_bsalt("test-global", f"127.0.0.1:{port}", secret)
    line = handshake.KiteLine.signed(proto, domain, bsalt, secret, "")
    first = peer.connect([line], kiteflow=kiteflow)
    assert first.sign_this, first
    signed = first.sign_this[0].answer(secret)
    peer.inband([signed])
    reply = peer.wait_event(control.KiteReply).reply
    return peer, reply, signed
