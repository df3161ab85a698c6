"""Visitors handed between the relays of a fleet (``kite relay --redis``).

A visitor whose kite does not fly here, but on another relay of the fleet (the visitor's
DNS answer was stale, or DNS sent it to any relay), is not refused: :meth:`FleetLink.forward`
opens a TLS connection to a relay that flies the kite (its certificate pinned by the
fingerprint it published with its presence), sends the head of :mod:`kite.proto.fleet`
(the fleet's secret, the kite, the visitor's address) and joins the visitor's connection to
it.  The relay that flies the kite takes the connection as a visitor from that address
(:meth:`FleetLink.accepts` checks the secret) and counts its bytes; this relay only carries
them.  Bytes the visitor sent are delivered or the visitor sees its connection close.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import random
import socket
from typing import Optional

from ..net.pipes import PipeEnd
from ..net.tls import cert_fingerprint, client_context
from ..proto.fleet import ForwardHead, build_forward_head
from ..proto.http import http_error
from ..proto.names import domain_candidates

log = logging.getLogger("kite.relay")

__all__ = ["FleetLink", "CONNECT_TIMEOUT"]

#: Seconds to reach the relay that flies the kite (TCP and TLS).
CONNECT_TIMEOUT = 5.0


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


class FleetLink:
    """This relay's side of visitor hand-over: ``presence`` (kite.store.presence) says who
    flies what; ``secret`` is the fleet's."""

    def __init__(self, presence, secret: str) -> None:
        self.presence = presence
        self.secret = secret
        self.forwarded = 0  # visitors handed to other relays
        self._context = client_context(insecure=True)  # verified by the pin, not a CA
        self._tasks: set = set()

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
        head = build_forward_head(ForwardHead(host, proto, port, visitor[0], visitor[1],
                                              self.secret))
        task = asyncio.get_running_loop().create_task(
            self._forward(sock, target, head, proto, host))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(self, sock: socket.socket, target: dict, head: bytes, proto: str,
                       host: str) -> None:
        loop = asyncio.get_running_loop()
        peer = "%s:%s" % sock.getpeername()[:2]
        visitor = _Held()  # what it sends waits until the other relay is there
        try:
            await loop.connect_accepted_socket(lambda: visitor, sock=sock)
        except OSError:
            sock.close()
            return
        fhost, _, fport = target["forward"].rpartition(":")
        relay = _Pinned(target["fingerprint"], head)
        try:
            await asyncio.wait_for(loop.create_connection(
                lambda: relay, fhost.strip("[]"), int(fport), ssl=self._context,
                server_hostname=None), CONNECT_TIMEOUT)
            if not relay.pin_ok:
                raise ConnectionError("its certificate is not the one it published")
        except (OSError, asyncio.TimeoutError, ValueError) as exc:
            log.warning("visitor %s of %s: relay %s unreachable: %s", peer, host,
                        target["forward"], exc or type(exc).__name__)
            if proto in ("http", "websocket"):
                visitor.send(http_error(502, host))
            visitor.close()
            return
        self.forwarded += 1
        log.info("visitor %s of %s:%s handed to relay %s", peer, proto, host, target["forward"])
        visitor.join(relay)
        relay.join(visitor)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
