"""The relay end of a tunnel: the backend's CONNECT PageKite request, kite authorisation
(docs/protocol.md §2: challenge, in-band and re-connect rounds), then chunk mode.

A tunnel is given the relay's :class:`~kite.relay.state.RelayState` and reports to it
(opened, kites registered, closed); it never sees the accept loop or the dispatcher.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from ..errors import HandshakeError, TooManyStreams
from ..net.tunnel import TunnelProtocol
from ..proto import control, handshake
from ..proto.flow import KITE_FLOW_FEATURE
from ..proto.http import find_head_end
from ..proto.names import KITE_PROTOS
from .state import RelayState

log = logging.getLogger("kite.relay")

__all__ = ["RelayTunnel"]

#: A tunnel must fly a kite within this many seconds (pagekite.py waits 60 s for in-band
#: requests after a challenge-only reply).
REGISTRATION_TIMEOUT = 60.0
#: SIDs wrap like pagekite.py's (process-wide there, per tunnel here).
SID_LIMIT = 0x20000


class RelayTunnel(TunnelProtocol):
    error_pages = True  # a visitor whose HTTP response never started gets a 502, not a reset

    def __init__(self, state: RelayState, peer: str, tls: bool) -> None:
        super().__init__()
        self.state = state
        self.peer = peer
        self.tls = tls
        self.name = f"tunnel from {peer}"
        self.keepalive = state.config.keepalive
        self.ping_timeout = state.config.ping_timeout
        self.limits = state.limits
        self.kites: list = []  # (proto, domain) this tunnel flies
        self.inband_ok = False  # an in-band round succeeded: later rounds skip the FSALT check
        self.session_id: Optional[str] = None
        self._next_sid = 0
        self._reg_handle: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.state.tunnel_opened(self)
        self._reg_handle = self.loop.call_later(REGISTRATION_TIMEOUT, self._registration_timeout)

    def _registration_timeout(self) -> None:
        self._reg_handle = None
        if not self.kites and not self.closed:
            self.close(f"no kite registered within {REGISTRATION_TIMEOUT:g} s")

    # -- handshake ----------------------------------------------------------------------------
    def handshake_data(self, buf: bytearray) -> None:
        end = find_head_end(buf)
        if end is None:
            return
        head, leftover = bytes(buf[:end]), bytes(buf[end:])
        del buf[:]
        transport = self.transport
        assert transport is not None
        try:
            req = handshake.parse_tunnel_request(head)
        except HandshakeError as exc:
            log.warning("%s: bad tunnel request: %s", self.name, exc)
            transport.write(handshake.TUNNEL_UNAVAILABLE)
            self.close(f"bad tunnel request: {exc}")
            return
        if not req.kites:
            transport.write(handshake.TUNNEL_UNAVAILABLE)
            self.close("tunnel request without kites")
            return
        state = self.state
        state.replace_sessions(req.replace, self)
        self.kite_peer = KITE_FLOW_FEATURE in req.features
        reply = state.authorize(req.kites)
        self._register(reply)
        transport.write(handshake.build_tunnel_response(
            reply.headers, zchunks=state.config.zchunks, features=("AddKites", KITE_FLOW_FEATURE),
            protos=KITE_PROTOS, ports=state.public_ports, raw_ports=("virtual",)))
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
        reply = self.state.authorize(event.request.kites, check_fsalt=not self.inband_ok)
        self._register(reply)
        self.write_chunk(*handshake.build_inband_reply(reply.headers))
        if reply.ok:
            self.inband_ok = True
        elif not self.kites:
            self.close("no kite accepted")

    def _register(self, reply) -> None:
        for d in reply.refused:
            if d.outcome == "duplicate":
                log.info("%s: kite %s refused: a backend already flies it (single)", self.name,
                         d.kite.kite)
            else:
                log.warning("%s: kite %s refused: %s", self.name, d.kite.kite, d.reason)
        self.state.register(self, reply)
        if self.kites and self._reg_handle is not None:
            self._reg_handle.cancel()
            self._reg_handle = None

    # -- streams ------------------------------------------------------------------------------
    def new_sid(self) -> int:
        """A free stream id; TooManyStreams once ``limits.max_streams`` streams are open."""
        cap = min(self.limits.max_streams if self.limits else SID_LIMIT, SID_LIMIT - 1)
        if len(self.streams) >= cap:
            raise TooManyStreams(f"{self.name}: {len(self.streams)} streams open, the most "
                                 f"one tunnel may carry ({cap})")
        sid = self._next_sid
        for _ in range(SID_LIMIT):  # fewer than cap + 1 steps: cap ids at most are taken
            sid = sid + 1 if sid + 1 < SID_LIMIT else 1
            if sid not in self.streams:
                self._next_sid = sid
                return sid
        raise TooManyStreams(f"{self.name}: no free stream id")  # pragma: no cover

    def on_closed(self, reason: str) -> None:
        if self._reg_handle is not None:
            self._reg_handle.cancel()
        self.state.tunnel_closed(self)
        if self.kites or self.session_id:
            log.info("tunnel from %s closed: %s", self.peer, reason)
