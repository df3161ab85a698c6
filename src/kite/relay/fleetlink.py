"""Visitors handed between the relays of a fleet (``kite relay --redis``).

A visitor whose kite does not fly here, but on another relay of the fleet (the visitor's
DNS answer was stale, or DNS sent it to any relay), is not refused: :meth:`FleetLink.forward`
hands it to a relay that flies the kite, over TLS to that relay's certificate (pinned by the
fingerprint it published with its presence), with the fleet's secret, the kite and the
visitor's address (kite.proto.fleet).  The relay that flies the kite takes it as a visitor
from that address (:meth:`FleetLink.accepts` checks the secret) and counts its bytes; this
relay only carries them.  Bytes the visitor sent are delivered or the visitor sees its
connection close.

* **The link** (the rule): one long-lived TLS connection to each relay visitors go to, made
  at the first visitor, carries every visitor as a stream in chunk mode (kite.net.tunnel:
  a kite peer's flow control, corked writes), so many visitors share TLS records and
  syscalls.  The relay that flies the kite joins each stream of the link to a stream of
  the kite's tunnel through an in-memory connection (kite.net.pipes.transport_pair), as if
  the visitor were connected to it.
* **One connection a visitor** (the ``FLEET`` head): towards a relay that answers the link
  head otherwise (an older kite), which is asked for a link again after
  :data:`LINK_RETRY` seconds.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import random
import socket
from typing import Callable, Optional

from ..errors import KiteError, RemoteProtocolError, TooManyStreams
from ..net.aio import feed_protocol
from ..net.busypoll import BusyPoll
from ..net.dial import open_tcp
from ..net.pipes import PipeEnd, transport_pair
from ..net.tls import cert_fingerprint, client_context
from ..net.tlsconn import connect_tls
from ..net.tunnel import (
    KITE_MAX_PAYLOAD,
    PAUSE_TUNNEL,
    PAUSE_WINDOW,
    Stream,
    StreamProtocol,
    TunnelProtocol,
)
from ..proto.fleet import (
    LINK_ANSWER,
    ForwardHead,
    build_forward_head,
    build_link_head,
    parse_link_head,
)
from ..proto.http import find_head_end, http_error
from ..proto.names import domain_candidates, valid_domain, valid_proto
from .tunnel import SID_LIMIT

log = logging.getLogger("kite.relay")

__all__ = ["FleetLink", "CONNECT_TIMEOUT", "LINK_RETRY"]

#: Seconds to reach the relay that flies the kite (TCP and TLS, and the link's answer).
CONNECT_TIMEOUT = 5.0
#: Seconds before a relay that refused a link is asked for one again.
LINK_RETRY = 60.0
#: (kite, relay) pairs whose first hand-over is logged at INFO; after that many, DEBUG only.
ANNOUNCED_MAX = 10_000


class _Held(PipeEnd):
    """A pipe end that keeps what it reads until its peer is bound (:meth:`join`)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list = []

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.bytes_in += len(data)
            self.held.append(data)
        else:
            super().data_received(data)

    def eof_received(self) -> bool:
        if self.peer is None:
            self.held.append(None)  # delivered as EOF after the held bytes
            return not self.tls
        return super().eof_received()

    def join(self, peer: PipeEnd) -> None:
        self.peer = peer
        held, self.held = self.held, []
        for data in held:
            if data is None:
                self.read_eof = True
                peer.send_eof()
            else:
                peer.send(data)


class _Pinned(_Held):
    """The side towards the other relay: checks the pin before anything is written."""

    def __init__(self, fingerprint: str, head: bytes) -> None:
        super().__init__()
        self.fingerprint = fingerprint
        self.head = head
        self.pin_ok = False

    def connection_made(self, transport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der or not hmac.compare_digest(cert_fingerprint(der), self.fingerprint):
            transport.abort()  # never the secret to a certificate the fleet did not publish
            return
        self.pin_ok = True
        super().connection_made(transport)
        transport.write(self.head)


class _LinkOut(TunnelProtocol):
    """This relay's end of a link to the relay that flies the kites: one stream a visitor,
    the visitor's connection its local side (as a relay's visitors on a backend's tunnel)."""

    error_pages = True  # an HTTP visitor cut before its answer started gets a 502 page

    def __init__(self, fingerprint: str, head: bytes, forward: str) -> None:
        super().__init__()
        self.fingerprint = fingerprint
        self.head = head
        self.forward = forward  # the other relay's address
        self.name = f"fleet link to {forward}"
        self.ready: asyncio.Future = self.loop.create_future()
        self._next_sid = 0

    def connection_made(self, transport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der or not hmac.compare_digest(cert_fingerprint(der), self.fingerprint):
            transport.abort()  # never the secret to a certificate the fleet did not publish
            self.close_reason = "its certificate is not the one it published"
            return
        super().connection_made(transport)
        transport.write(self.head)

    def handshake_data(self, buf: bytearray) -> None:
        end = find_head_end(buf)
        if end is None:
            if len(buf) > len(LINK_ANSWER):
                raise RemoteProtocolError("no link: an unexpected answer")
            return
        if bytes(buf[:end]) != LINK_ANSWER:
            raise RemoteProtocolError(f"no link: {bytes(buf[:end])[:60]!r}")
        self.start_chunks(bytes(buf[end:]), kite_peer=True)
        if not self.ready.done():
            self.ready.set_result(True)

    def new_sid(self) -> int:
        if len(self.streams) >= SID_LIMIT - 1:
            raise TooManyStreams(f"{self.name}: {len(self.streams)} streams open")
        sid = self._next_sid
        while True:
            sid = sid + 1 if sid + 1 < SID_LIMIT else 1
            if sid not in self.streams:
                self._next_sid = sid
                return sid

    def on_closed(self, reason: str) -> None:
        if not self.ready.done():
            if reason.startswith("no link"):
                self.ready.set_result(False)  # it answered, but takes no link
            else:
                self.ready.set_exception(ConnectionError(reason))
                self.ready.exception()  # retrieved: awaited only while visitors wait
        else:
            log.info("%s closed: %s", self.name, reason)


class _LinkSide(StreamProtocol):
    """A stream of the link at the kite's relay, as one end of the in-memory connection
    whose other end is the visitor's stream on the kite's tunnel."""

    __slots__ = ()

    def take_data(self, data) -> None:
        """A large payload (kite.net.pipes.TAKE_MIN) leaves at once, after what the
        tunnel's writer holds, in one ``writelines``: data chunks made of a head and a
        slice of the payload itself (docs/protocol.md §4: ``SIZE CRLF SID: n CRLF CRLF
        payload``).  TLS encrypts it where it is, and nothing holds on to the slices of
        the kite tunnel's receive buffer, which it can then reuse."""
        tunnel = self.tunnel
        transport = tunnel.transport
        if self.skip or tunnel.closed or transport is None:
            feed_protocol(self, data)
            return
        writer = tunnel.writer
        writer.cancel_data_buffer()
        corked = writer.flush()
        pieces = [] if corked is None else [corked]
        slot = self._slot
        block = b"SID: %d\r\n\r\n" % slot.sid
        view = memoryview(data)
        for start in range(0, len(view), KITE_MAX_PAYLOAD):
            piece = view[start:start + KITE_MAX_PAYLOAD]
            pieces.append(b"%x\r\n%s" % (len(block) + len(piece), block))
            pieces.append(piece)
            slot.sent += len(piece)
        transport.writelines(pieces)
        stream = self.stream
        if slot.sent >= stream.send_window.clear_below and stream.send_window.blocked(slot.sent):
            stream.pause(PAUSE_WINDOW)
        elif tunnel.write_paused:
            stream.pause(PAUSE_TUNNEL)


class _LinkIn(TunnelProtocol):
    """The end of a link at the relay that flies the kites: each stream is a visitor of
    the address in its stream-open chunk, handed to ``opener`` (the dispatcher's
    ``fleet_stream``) on one end of an in-memory connection whose other end is the stream."""

    def __init__(self, peer: str, opener: Callable) -> None:
        super().__init__()
        self.peer = peer
        self.opener = opener
        self.name = f"fleet link from {peer}"

    def handshake_data(self, buf: bytearray) -> None:  # pragma: no cover - chunks at once
        raise RemoteProtocolError("no handshake on a fleet link")

    def on_stream_open(self, event) -> None:
        proto, host, port, rip, rport = event.proto, event.host, event.port, event.rip, \
            event.rport
        try:
            ok = (valid_proto(proto) and "-" not in proto and valid_domain(host)
                  and port is not None and 0 < port < 65536 and rip is not None
                  and rport is not None and 0 <= rport < 65536
                  and bool(ipaddress.ip_address(rip)))
        except ValueError:
            ok = False
        if not ok:
            log.warning("%s: stream %d refused: bad stream open %s:%s:%s from %s:%s",
                        self.name, event.sid, proto, host[:80], port, rip, rport)
            self.send_eof(event.sid, "WR")
            return
        visitor = f"[{rip}]:{rport}" if ":" in rip else f"{rip}:{rport}"
        stream = Stream(self, event.sid, proto=proto, host=host, port=port, peer=visitor)
        self.add_stream(stream)
        if event.payload:
            stream.receive_opening(event.payload)
        here, there = transport_pair(self.loop, {"peername": self.peer},
                                     {"peername": (rip, rport)})
        protocol = _LinkSide(self, stream)
        here.set_protocol(protocol)
        protocol.connection_made(here)
        self.opener(there, self.peer, ForwardHead(host, proto, port, rip, rport, ""), b"",
                    rtls=event.rtls)


class FleetLink:
    """This relay's side of visitor hand-over: ``presence`` (kite.store.presence) says who
    flies what; ``secret`` is the fleet's."""

    def __init__(self, presence, secret: str, busy: Optional[BusyPoll] = None) -> None:
        self.presence = presence
        self.secret = secret
        self.busy = busy  # the relay's busy poller, for its links' tunnels too
        self.forwarded: dict[str, int] = {}  # visitors handed over, by the other relay's address
        self._announced: set = set()  # (proto:host, relay) whose hand-over was logged at INFO
        self._context = client_context(insecure=True)  # verified by the pin, not a CA
        self._tasks: set = set()
        self._links: dict = {}  # (forward address, fingerprint) -> _LinkOut
        self._no_link: dict = {}  # (forward address, fingerprint) -> loop time to ask again
        self._incoming: set = set()  # _LinkIn

    def visitors(self) -> int:
        """Visitors this relay hands over (being handed, and carried on its links to other
        relays): each holds its connection here, counted with the relay's connections.
        Visitors carried one connection each (an older relay, no link) are not counted."""
        return len(self._tasks) + sum(len(link.streams) for link in list(self._links.values()))

    def accepts(self, secret: str) -> bool:
        return hmac.compare_digest(secret.encode(), self.secret.encode())

    def holder(self, protos: tuple, host: str) -> Optional[dict]:
        """Another relay that flies one of ``protos`` for ``host`` (or a wildcard above
        it), as its published info (``forward`` address, ``fingerprint``); None if none."""
        me = self.presence.relay_id
        for cand in domain_candidates(host):
            for proto in protos:
                ids = sorted(self.presence.holders(proto, cand) - {me})
                usable = [self.presence.relays[i] for i in ids
                          if self.presence.relays.get(i, {}).get("forward")
                          and self.presence.relays[i].get("fingerprint")]
                if usable:
                    return random.choice(usable)
        return None

    def forward(self, sock: socket.socket, target: dict, host: str, proto: str, port: int,
                visitor: tuple) -> None:
        """Hand the visitor connected on ``sock`` (its first bytes still unread) to the
        relay ``target`` (from :meth:`holder`)."""
        task = asyncio.get_running_loop().create_task(
            self._forward(sock, target, host, proto, port, visitor))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def accept_link(self, transport: asyncio.Transport, peer: str, data: bytes, end: int,
                    opener: Callable) -> None:
        """The link head ``data[:end]`` came from ``peer`` on ``transport``: if it has the
        fleet's secret, the connection becomes a link whose streams go to ``opener``."""
        try:
            secret = parse_link_head(bytes(data[:end]))
        except RemoteProtocolError as exc:
            log.warning("fleet link from %s refused: %s", peer, exc)
            transport.close()
            return
        if not self.accepts(secret):
            log.warning("fleet link from %s refused: wrong fleet secret", peer)
            transport.close()
            return
        link = _LinkIn(peer, opener)
        link.busy = self.busy
        transport.set_protocol(link)
        link.connection_made(transport)
        transport.write(LINK_ANSWER)
        self._incoming.add(link)
        link.closed_future.add_done_callback(lambda _f: self._incoming.discard(link))
        log.info("fleet link up from %s", peer)
        link.start_chunks(bytes(data[end:]), kite_peer=True)

    def open_stream(self, link: _LinkOut, host: str, proto: str, port: int, visitor: tuple,
                    payload: bytes = b"", *, rtls: bool = False) -> StreamProtocol:
        """A new stream of ``link`` for the visitor ``visitor`` (ip, port) of
        ``proto:host`` on ``port``, whose first bytes are ``payload``: the protocol for the
        visitor's transport (the caller attaches it).  ``rtls``: this relay terminated the
        visitor's TLS.  Raises TooManyStreams.  (The dispatcher asks the tunnel reserve
        before it hands a visitor over.)"""
        sid = link.new_sid()
        where = "%s:%s" % visitor[:2]
        stream = link.open_stream(sid, proto, host, port, visitor[0], visitor[1], peer=where,
                                  payload=payload, rtls=rtls)
        self._handed(where, f"{proto}:{host}", link.forward,
                     f" (stream {sid} of its link){', TLS terminated here' if rtls else ''}")
        return StreamProtocol(link, stream)

    def _handed(self, visitor: str, kite: str, relay: str, detail: str = "") -> None:
        """Count a visitor handed to ``relay``; the first of each kite and relay is logged
        at INFO (until ANNOUNCED_MAX pairs were), every visitor at DEBUG: a busy relay
        hands over thousands a second, and the access log of the relay that flies the
        kite has each of them."""
        self.forwarded[relay] = self.forwarded.get(relay, 0) + 1
        key = (kite, relay)
        if key not in self._announced and len(self._announced) < ANNOUNCED_MAX:
            self._announced.add(key)
            log.info("visitors of %s are handed to relay %s, which flies it (the first: %s%s; "
                     "the rest at DEBUG)", kite, relay, visitor, detail)
        else:
            log.debug("visitor %s of %s handed to relay %s%s", visitor, kite, relay, detail)

    async def link_to(self, target: dict) -> Optional[_LinkOut]:
        """The link to ``target`` (made if there is none); None if it takes no link.
        Raises what connecting raises when it cannot be reached at all."""
        loop = asyncio.get_running_loop()
        key = (target["forward"], target["fingerprint"])
        link = self._links.get(key)
        if link is None or link.closed:
            if self._no_link.get(key, 0.0) > loop.time():
                return None
            link = _LinkOut(target["fingerprint"], build_link_head(self.secret),
                            target["forward"])
            link.busy = self.busy
            self._links[key] = link
            link.closed_future.add_done_callback(
                lambda _f: self._links.pop(key, None) if self._links.get(key) is link else None)
            fhost, _, fport = target["forward"].rpartition(":")
            try:
                await asyncio.wait_for(self._connect(lambda: link, fhost.strip("[]"), int(fport)),
                                       CONNECT_TIMEOUT)
            except BaseException as exc:
                link.abort(f"cannot connect: {exc or type(exc).__name__}")
                raise
        try:
            linked = await asyncio.wait_for(asyncio.shield(link.ready), CONNECT_TIMEOUT)
        except asyncio.TimeoutError:
            link.abort("no answer to the link head")
            raise
        if not linked:
            if key not in self._no_link or self._no_link[key] <= loop.time():
                log.info("relay %s takes no fleet link (%s): visitors one connection each "
                         "for %g s", target["forward"], link.close_reason, LINK_RETRY)
            self._no_link[key] = loop.time() + LINK_RETRY
            return None
        if link.closed:
            raise ConnectionError(link.close_reason or "link closed")
        return link

    async def _connect(self, factory: Callable[[], asyncio.BaseProtocol], host: str,
                       port: int) -> None:
        """TLS to the relay at ``host:port`` with ``factory``'s protocol (its pin is checked
        by the protocol, before it writes anything)."""
        sock = await open_tcp(host, port)
        await connect_tls(asyncio.get_running_loop(), factory, sock, self._context, None,
                          handshake_timeout=CONNECT_TIMEOUT)

    async def _forward(self, sock: socket.socket, target: dict, host: str, proto: str,
                       port: int, visitor: tuple) -> None:
        loop = asyncio.get_running_loop()
        peer = "%s:%s" % sock.getpeername()[:2]
        try:
            link = await self.link_to(target)
        except (OSError, asyncio.TimeoutError, ValueError, KiteError) as exc:
            log.warning("visitor %s of %s: relay %s unreachable: %s", peer, host,
                        target["forward"], exc or type(exc).__name__)
            await self._refuse(sock, proto, host)
            return
        if link is not None:
            await self._over_link(link, sock, host, proto, port, visitor)
            return
        head = build_forward_head(ForwardHead(host, proto, port, visitor[0], visitor[1],
                                              self.secret))
        held = _Held()  # what it sends waits until the other relay is there
        try:
            await loop.connect_accepted_socket(lambda: held, sock=sock)
        except OSError:
            sock.close()
            return
        fhost, _, fport = target["forward"].rpartition(":")
        relay = _Pinned(target["fingerprint"], head)
        try:
            await asyncio.wait_for(self._connect(lambda: relay, fhost.strip("[]"), int(fport)),
                                   CONNECT_TIMEOUT)
            if not relay.pin_ok:
                raise ConnectionError("its certificate is not the one it published")
        except (OSError, asyncio.TimeoutError, ValueError) as exc:
            log.warning("visitor %s of %s: relay %s unreachable: %s", peer, host,
                        target["forward"], exc or type(exc).__name__)
            if proto in ("http", "websocket"):
                held.send(http_error(502, host))
            held.close()
            return
        self._handed(peer, f"{proto}:{host}", target["forward"])
        held.join(relay)
        relay.join(held)

    async def _refuse(self, sock: socket.socket, proto: str, host: str) -> None:
        """The visitor cannot be handed over: an HTTP visitor gets a 502 page.  What it sent
        so far is read first: a socket closed with unread input resets, page and all."""
        visitor = _Held()
        try:
            sock.setblocking(False)
            while sock.recv(65536):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            sock.close()
            return
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: visitor, sock=sock)
        except OSError:
            sock.close()
            return
        if proto in ("http", "websocket"):
            visitor.send(http_error(502, host))
        visitor.close()

    async def _over_link(self, link: _LinkOut, sock: socket.socket, host: str, proto: str,
                         port: int, visitor: tuple) -> None:
        """The visitor on ``sock`` (from ``visitor``, ip and port) becomes a new stream of
        ``link`` (no payload: its bytes are still in its socket)."""
        try:
            protocol = self.open_stream(link, host, proto, port, visitor)
        except TooManyStreams as exc:
            log.warning("visitor %s:%s of %s: %s", visitor[0], visitor[1], host, exc)
            await self._refuse(sock, proto, host)
            return
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: protocol, sock=sock)
        except OSError:
            sock.close()
            protocol.stream.cut()

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for link in list(self._links.values()) + list(self._incoming):
            link.close("relay stopping")
