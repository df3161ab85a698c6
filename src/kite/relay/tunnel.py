"""The relay end of a tunnel: the backend's CONNECT PageKite request, kite authorisation
(docs/protocol.md §2: challenge, in-band and re-connect rounds), then chunk mode.

A tunnel is given the relay's :class:`~kite.relay.state.RelayState` and reports to it
(opened, kites registered, closed); it never sees the accept loop or the dispatcher.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

from ..errors import HandshakeError, TooManyStreams
from ..net.sockets import close_gracefully
from ..net.tunnel import TUNNEL_HIGH_WATER, TUNNEL_LOW_WATER, TunnelProtocol
from ..proto import control, handshake
from ..proto.flow import KITE_FLOW_FEATURE
from ..proto.http import find_head_end, http_error
from ..proto.names import HTTP_PROTOS, KITE_PROTOS
from .state import RelayState

log = logging.getLogger("kite.relay")

__all__ = ["RelayTunnel"]

#: A tunnel must fly a kite within this many seconds, or it is aborted (backends answer a
#: challenge at once; pagekite.py's own relay waits 60 s).
REGISTRATION_TIMEOUT = 20.0
#: Until a tunnel flies a kite, its chunk mode is only for the in-band registration round:
#: nothing but kite requests is answered, it may send at most UNAUTH_BYTES, and what it
#: leaves unread towards it may reach only UNAUTH_QUEUE before reading stops.
UNAUTH_BYTES = 64 * 1024
UNAUTH_QUEUE = 64 * 1024
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
        self.busy = state.busy
        self.kites: list = []  # (proto, domain) this tunnel flies
        self.session_id: Optional[str] = None
        self.registered_by: Optional[str] = None  # "connect" or "inband": how kites first flew
        self.addr = peer.rpartition(":")[0].strip("[]")  # source address, for the auth guard
        self._replace: list[str] = []  # X-PageKite-Replace ids not honoured yet
        self._next_sid = 0
        self._reg_handle: Optional[asyncio.TimerHandle] = None
        self.opened_at = time.time()  # for /api/status

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        transport.set_write_buffer_limits(high=UNAUTH_QUEUE, low=UNAUTH_QUEUE // 4)
        self.state.tunnel_opened(self)
        self._reg_handle = self.loop.call_later(REGISTRATION_TIMEOUT, self._registration_timeout)

    def _registration_timeout(self) -> None:
        self._reg_handle = None
        if not self.kites and not self.closed:
            self.abort(f"no kite registered within {REGISTRATION_TIMEOUT:g} s")

    def queue_limit(self) -> int:
        if not self.kites:
            return UNAUTH_QUEUE
        return super().queue_limit()

    def handle_event(self, event) -> None:
        if self.kites:
            super().handle_event(event)
            return
        # Not authenticated: a tiny chunk mode for the in-band registration round only.
        demux = self.demux
        if demux is not None and demux.bytes_received > UNAUTH_BYTES:
            self.abort(f"{demux.bytes_received} bytes before any kite was registered")
        elif type(event) is control.KiteRequest:
            self.on_kite_message(event)

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
            self.state.count_handshake("bad_request")
            transport.write(handshake.TUNNEL_UNAVAILABLE)
            self.close(f"bad tunnel request: {exc}")
            return
        if not req.kites:
            transport.write(handshake.TUNNEL_UNAVAILABLE)
            self.close("tunnel request without kites")
            return
        state = self.state
        blocked = state.blocked(self.addr)
        if blocked:
            self.state.count_handshake("blocked")
            transport.write(handshake.TUNNEL_UNAVAILABLE)
            self.abort(f"too many failed signatures from {self.addr}: refused for {blocked:.0f} s")
            return
        self.kite_peer = KITE_FLOW_FEATURE in req.features
        self._replace = list(req.replace)
        reply = state.authorize(req.kites, self.addr, self._replace)
        self._register(reply, "connect")
        transport.write(handshake.build_tunnel_response(
            reply.headers, zchunks=state.config.zchunks, features=("AddKites", KITE_FLOW_FEATURE),
            protos=KITE_PROTOS, ports=state.public_ports, raw_ports=("virtual",)))
        disposition = reply.disposition(req.add_kites)
        if disposition == "close":
            self.close("no kite accepted")
            return
        log.info("tunnel up from %s (%s%s)", self.peer, "TLS" if self.tls else "plain",
                 ", kite peer" if self.kite_peer else f", {req.version or 'unknown version'}")
        if state.access_log is not None:
            state.access_log.event("tunnel-up", peer=self.peer, tls=self.tls,
                                   version=req.version or "")
        self.start_chunks(leftover, kite_peer=self.kite_peer, inflate=True)

    def on_kite_message(self, event) -> None:
        if not isinstance(event, control.KiteRequest):
            return
        if self.state.blocked(self.addr):
            self.abort(f"too many failed signatures from {self.addr}")
            return
        reply = self.state.authorize(event.request.kites, self.addr, self._replace)
        self._register(reply, "inband")
        self.write_chunk(*handshake.build_inband_reply(reply.headers))
        if not self.kites and not reply.challenges:
            self.close("no kite accepted")

    def _register(self, reply, how: str) -> None:
        for d in reply.decisions:  # challenges are a step, not an outcome
            if d.outcome != "signthis":
                self.state.count_handshake("ok" if d.outcome == "ok" else d.reason or d.outcome)
        for d in reply.refused:
            if d.outcome == "duplicate":
                log.info("%s: kite %s refused: a backend already flies it (single)", self.name,
                         d.kite.kite)
            elif d.reason not in ("signature", "unauthorized"):  # those: the auth guard logs
                log.warning("%s: kite %s refused: %s", self.name, d.kite.kite, d.reason)
        was_flying = bool(self.kites)
        self._replace = self.state.register(self, reply, self._replace)
        if self.kites and not was_flying:
            # Authenticated: the tunnel's own limits from now on.
            self.registered_by = how
            if self._reg_handle is not None:
                self._reg_handle.cancel()
                self._reg_handle = None
            if self.transport is not None:
                self.transport.set_write_buffer_limits(high=TUNNEL_HIGH_WATER,
                                                       low=TUNNEL_LOW_WATER)


    # -- streams ------------------------------------------------------------------------------
    def new_sid(self) -> int:
        """A free stream id; TooManyStreams once ``limits.max_streams`` streams are open,
        RelayFull (one of them) when the relay keeps its last connections for tunnels."""
        self.state.admit_visitor()
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

    def cut_local(self, stream, transport) -> None:
        """The 502 page of a visitor whose response never started: the relay's template
        (``--error-pages``: 502.html) when it has one; the access log says ``reset``."""
        if self.state.access_log is not None:
            self.state.access_log.mark(
                stream, "reset", f"tunnel closed: {self.close_reason}" if self.closed else "cut")
        template = self.state.error_pages.get("502")
        if template is not None and not stream.delivered and stream.proto in HTTP_PROTOS:
            transport.write(http_error(502, stream.host, template=template))
            close_gracefully(transport)
        else:
            super().cut_local(stream, transport)

    def on_stream_ended(self, stream) -> None:
        if self.state.registry is not None:
            self.state.registry.count(stream, final=True)
        if self.state.access_log is not None:
            self.state.access_log.closed(stream)

    def on_closed(self, reason: str) -> None:
        if self._reg_handle is not None:
            self._reg_handle.cancel()
        self.state.tunnel_closed(self)
        if self.kites or self.session_id:
            log.info("tunnel from %s closed: %s", self.peer, reason)
            if self.state.access_log is not None:
                self.state.access_log.event("tunnel-down", peer=self.peer, reason=reason)
