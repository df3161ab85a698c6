"""The relay end of a tunnel: the backend's CONNECT PageKite request, kite authorisation
(pagekite-protocol.md §2: challenge, in-band and re-connect rounds), then chunk mode."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..errors import HandshakeError, SniffError
from ..proto import control, handshake
from ..proto.flow import KITE_FLOW_FEATURE
from ..proto.sniff import sniff as sniff_first_bytes
from ..tunnel import TunnelProtocol

if TYPE_CHECKING:  # pragma: no cover
    from .server import RelayServer

log = logging.getLogger("kite.relay")

__all__ = ["RelayTunnel"]

#: A tunnel must fly a kite within this many seconds (pagekite.py waits 60 s for in-band
#: requests after a challenge-only reply).
REGISTRATION_TIMEOUT = 60.0
#: The relay protocols it announces in X-PageKite-Protos.
RELAY_PROTOS = ("http", "https", "raw", "websocket")
#: SIDs wrap like pagekite.py's (process-wide there, per tunnel here).
SID_LIMIT = 0x20000


class RelayTunnel(TunnelProtocol):
    def __init__(self, server: "RelayServer", peer: str, tls: bool) -> None:
        super().__init__()
        self.server = server
        self.peer = peer
        self.tls = tls
        self.name = f"tunnel from {peer}"
        self.keepalive = server.config.keepalive
        self.ping_timeout = server.config.ping_timeout
        self.kites: list = []  # (proto, domain) this tunnel flies
        self.inband_ok = False  # an in-band round succeeded: later rounds skip the FSALT check
        self.session_id = None
        self._next_sid = 0
        self._reg_handle = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.server.tunnels.add(self)
        self._reg_handle = self.loop.call_later(REGISTRATION_TIMEOUT, self._registration_timeout)

    def _registration_timeout(self) -> None:
        self._reg_handle = None
        if not self.kites and not self.closed:
            self.close(f"no kite registered within {REGISTRATION_TIMEOUT:g} s")

    # -- handshake ----------------------------------------------------------------------------
    def handshake_data(self, buf: bytearray) -> None:
        end = handshake.find_head_end(buf)
        if end is None:
            return
        head, leftover = bytes(buf[:end]), bytes(buf[end:])
        del buf[:]
        if self.tls and not head[:18].lower().startswith(b"connect pagekite:"):
            # Not a tunnel: a visitor's CONNECT inside TLS (kite connect --tls).
            try:
                result = sniff_first_bytes(head)
            except SniffError as exc:
                result = None
                log.info("TLS visitor %s refused: %s", self.peer, exc)
            if result is not None and result.kind == "connect":
                self.detach_transport()
                self.server.connect_inside_tls(self, result.host, result.port, leftover)
                return
        try:
            req = handshake.parse_tunnel_request(head)
        except HandshakeError as exc:
            log.warning("%s: bad tunnel request: %s", self.name, exc)
            self.transport.write(handshake.TUNNEL_UNAVAILABLE)
            self.close(f"bad tunnel request: {exc}")
            return
        if not req.kites:
            self.transport.write(handshake.TUNNEL_UNAVAILABLE)
            self.close("tunnel request without kites")
            return
        for old_id in req.replace:
            old = self.server.sessions.get(old_id)
            if old is not None and old is not self:
                log.info("%s: replaces the stale tunnel %s", self.name, old.peer)
                old.close("replaced by the reconnecting backend")
        self.kite_peer = KITE_FLOW_FEATURE in req.features
        reply = self.server.authorizer.authorize(req.kites)
        self._register(reply)
        cfg = self.server.config
        self.transport.write(handshake.build_tunnel_response(
            reply.headers, zchunks=cfg.zchunks, features=("AddKites", KITE_FLOW_FEATURE),
            protos=RELAY_PROTOS, ports=self.server.public_ports, raw_ports=("virtual",)))
        disposition = reply.disposition(req.add_kites)
        if disposition == "close":
            self.close("no kite accepted")
            return
        log.info("tunnel up from %s (%s%s)", self.peer, "TLS" if self.tls else "plain",
                 ", kite peer" if self.kite_peer else f", {req.version or 'unknown version'}")
        self.start_chunks(leftover, kite_peer=self.kite_peer, inflate=True)

    def on_kite_message(self, event) -> None:
        if not isinstance(event, control.KiteRequest):
            return
        reply = self.server.authorizer.authorize(event.request.kites,
                                                 check_fsalt=not self.inband_ok)
        self._register(reply)
        self.write_chunk(*handshake.build_inband_reply(reply.headers))
        if reply.ok:
            self.inband_ok = True
        elif not self.kites:
            self.close("no kite accepted")

    def _register(self, reply) -> None:
        if reply.session_id:
            if self.session_id:
                self.server.sessions.pop(self.session_id, None)
            self.session_id = reply.session_id
            self.server.sessions[reply.session_id] = self
        for d in reply.refused:
            if d.outcome == "duplicate":
                log.info("%s: kite %s refused: a backend already flies it (single)", self.name,
                         d.kite.kite)
            else:
                log.warning("%s: kite %s refused: %s", self.name, d.kite.kite, d.reason)
        for kite in reply.ok:
            key = (kite.proto, kite.domain)
            if key not in self.kites:
                self.kites.append(key)
                self.server.routes.add(kite.proto, kite.domain, self)
                log.info("kite online: %s:%s via %s", kite.proto, kite.domain, self.peer)
        if self.kites and self._reg_handle is not None:
            self._reg_handle.cancel()
            self._reg_handle = None

    def detach_transport(self) -> None:
        """Give the transport to another protocol: forget it without closing it."""
        self.closed = True
        if self._reg_handle is not None:
            self._reg_handle.cancel()
            self._reg_handle = None
        self.server.tunnels.discard(self)

    # -- streams ------------------------------------------------------------------------------
    def new_sid(self) -> int:
        sid = self._next_sid
        while True:
            sid = sid + 1 if sid + 1 < SID_LIMIT else 1
            if sid not in self.streams:
                self._next_sid = sid
                return sid

    def on_closed(self, reason: str) -> None:
        if self._reg_handle is not None:
            self._reg_handle.cancel()
        self.server.tunnel_closed(self)
        if self.kites or self.session_id:
            log.info("tunnel from %s closed: %s", self.peer, reason)
