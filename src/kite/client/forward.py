"""``kite forward``: a local port whose every connection is CONNECTed through the relay.

For clients that cannot run a ProxyCommand or speak to a proxy (database GUIs, IRC clients,
anything with only "host" and "port" fields): ``kite forward 5433 db.example.com:5432
--relay relay.example.com:443`` and point the client at ``127.0.0.1:5433``.

Each accepted connection is a :class:`LocalEnd` that keeps its reading paused while its own
:class:`~kite.client.connect.RelayEnd` connects and sends ``CONNECT``; after the 200 the two
relay bytes both ways.  Backpressure is per connection and both ways: when either
transport's write buffer passes ``HIGH_WATER`` the other transport stops reading until it is
back under ``LOW_WATER``, so a slow client or a slow kite costs one buffer of at most about
``HIGH_WATER`` + one read per direction, never the process.  A refusal (kite offline, not
a kite, relay unreachable) is logged in one line and that local connection is closed; the
listener keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from ..errors import ConnectFailed, KiteError
from ..net.pipes import PipeEnd
from ..net.sockets import reset
from .connect import RelayEnd, RelayTarget, open_relay

log = logging.getLogger("kite.client")

__all__ = ["LocalEnd", "Forwarder", "serve_forward"]


class LocalEnd(PipeEnd):
    """An accepted local connection; nothing of it goes to the relay before the 200.

    Reading is paused from ``connection_made`` on, but asyncio before 3.12 (gh-103607) and
    uvloop start reading after ``connection_made`` whatever it asked: bytes and EOF that
    arrive before :meth:`link` are kept (one read at most: it pauses again) and passed on
    in order when the relay has answered.
    """

    def __init__(self, forwarder: Forwarder) -> None:
        super().__init__()
        self.forwarder = forwarder
        self.reading_paused = True  # lifted by link()
        self.linked = False
        self._early: list = []  # owned bytes read before link()
        self._early_eof = False
        self.client = "?"

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.client = f"{peer[0]}:{peer[1]}"
        self.forwarder._accepted(self)

    def data_received(self, data: bytes) -> None:
        if self.linked:
            self.bytes_in += len(data)
            peer = self.peer
            assert peer is not None  # link() runs after the RelayEnd bound itself as our peer
            peer.send(data)
            return
        self.bytes_in += len(data)
        self._early.append(data)
        transport = self.transport
        assert transport is not None  # data comes after connection_made
        transport.pause_reading()  # here it holds

    def eof_received(self) -> bool:
        if not self.linked:
            self._early_eof = True
            return True
        return super().eof_received()

    def link(self) -> None:
        """The relay said 200 (``self.peer`` is its RelayEnd): pass on what waited, read on."""
        self.linked = True
        peer, transport = self.peer, self.transport
        # open_relay's RelayEnd bound itself as our peer; connection_made ran (_accepted)
        assert peer is not None and transport is not None
        early, self._early = self._early, []
        for data in early:
            peer.send(data)
        if self._early_eof:
            if not super().eof_received():
                transport.close()
            return
        self.resume_reading()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        super().connection_lost(exc)
        self.forwarder._lost(self)


class Forwarder:
    """Listens on ``(host, port)`` and relays each connection to ``target`` by CONNECT."""

    def __init__(self, host: str, port: int, target: RelayTarget) -> None:
        self.host = host
        self.port = port
        self.target = target
        self.loop = asyncio.get_running_loop()
        self.server: Optional[asyncio.AbstractServer] = None
        self.addresses: list = []
        self.active: set = set()  # LocalEnds whose connection is open
        self.relays: dict = {}  # LocalEnd -> its established RelayEnd
        self._tasks: set = set()
        self.accepted = 0
        self.established = 0
        self.refused = 0

    async def start(self) -> list:
        try:
            self.server = await self.loop.create_server(
                lambda: LocalEnd(self), self.host, self.port, reuse_address=True, backlog=1024)
        except OSError as exc:
            raise KiteError(f"cannot listen on {self.host}:{self.port}: "
                            f"{exc.strerror or exc} (pick another port)") from None
        self.addresses = [s.getsockname()[:2] for s in self.server.sockets]
        return self.addresses

    def _accepted(self, local: LocalEnd) -> None:
        self.accepted += 1
        self.active.add(local)
        task = self.loop.create_task(self._connect(local))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _lost(self, local: LocalEnd) -> None:
        self.active.discard(local)
        self.relays.pop(local, None)

    async def _connect(self, local: LocalEnd) -> None:
        try:
            relay: RelayEnd = await open_relay(self.target, local)
        except ConnectFailed as exc:
            if local.lost:
                log.debug("connection from %s: gone before the relay answered", local.client)
            else:
                self.refused += 1
                log.warning("connection from %s: %s", local.client, exc)
                local.close()
            return
        except asyncio.CancelledError:
            transport = local.transport
            assert transport is not None  # _accepted() is called from connection_made
            reset(transport)
            raise
        if local.lost:
            relay.close()
            return
        self.established += 1
        self.relays[local] = relay
        log.debug("connection from %s: relayed to %s", local.client, self.target.kite)
        local.link()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for local in list(self.active):
            relay = self.relays.get(local)
            # Cut, not ended: both sides see a reset (kite.net.sockets.reset).
            if relay is not None and relay.transport is not None:
                reset(relay.transport)
            if local.transport is not None:
                reset(local.transport)
        if self.server is not None:
            await self.server.wait_closed()


async def serve_forward(host: str, port: int, target: RelayTarget, stop: asyncio.Event) -> int:
    """``kite forward``: serve until ``stop`` is set."""
    fwd = Forwarder(host, port, target)
    addrs = await fwd.start()
    for h, p in addrs:
        where = f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
        log.info("forwarding %s to %s through relay %s%s", where, target.kite, target.relay,
                 " (TLS)" if target.tls else "")
    await stop.wait()
    log.info("forward stopping: %d connections open, %d relayed, %d refused",
             len(fwd.active), fwd.established, fwd.refused)
    await fwd.close()
    return 0
