"""The relay's accept loop: listening sockets, and new connections until their first bytes
say what they are.

The relay accepts connections itself and *peeks* at their first bytes (``MSG_PEEK``) before
any protocol owns the socket: peeking, not reading, is what lets one port carry TLS tunnels,
TLS visitors passed through untouched, plain tunnels, CONNECT and HTTP visitors.  Once
:func:`kite.proto.sniff.sniff` has classified the bytes, the connection goes to the
:class:`~kite.relay.dispatch.Dispatcher`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from typing import TYPE_CHECKING, Optional

from ..errors import KiteError, SniffError
from ..proto.sniff import sniff as sniff_first_bytes

if TYPE_CHECKING:  # pragma: no cover
    from .dispatch import Dispatcher

log = logging.getLogger("kite.relay")

__all__ = ["Acceptor", "PendingVisitor", "FIRST_BYTES_TIMEOUT", "MAX_PEEK"]

#: How long a new connection may take to say what it is.
FIRST_BYTES_TIMEOUT = 10.0
#: The most the relay peeks at before it must decide (a TLS hello or HTTP head fits).
MAX_PEEK = 16384 + 5
#: Connections taken per listener readiness, so one busy port cannot starve the loop.
ACCEPT_BATCH = 256
LISTEN_BACKLOG = 4096


class PendingVisitor:
    """A new connection whose first bytes are not yet known."""

    __slots__ = ("acceptor", "sock", "addr", "port", "handle", "deadline", "delay", "fd")

    def __init__(self, acceptor: Acceptor, sock: socket.socket, addr, port: int) -> None:
        self.acceptor = acceptor
        self.sock = sock
        self.addr = addr
        self.port = port  # the public port the visitor connected to
        self.fd = sock.fileno()
        self.deadline = time.monotonic() + FIRST_BYTES_TIMEOUT
        self.delay = 0.001
        self.handle: Optional[asyncio.TimerHandle] = None

    def peer(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}"

    def start(self) -> None:
        loop = self.acceptor.loop
        loop.add_reader(self.fd, self.on_readable)
        self.handle = loop.call_later(FIRST_BYTES_TIMEOUT, self.on_timeout)

    def detach(self) -> socket.socket:
        """Stop watching the socket; the caller now owns it."""
        self.acceptor.loop.remove_reader(self.fd)
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.acceptor.pending.discard(self)
        return self.sock

    def close(self) -> None:
        self.detach()
        self.sock.close()

    def on_timeout(self) -> None:
        self.handle = None
        if self in self.acceptor.pending:
            log.info("visitor %s: said nothing within %g s; closed", self.peer(), FIRST_BYTES_TIMEOUT)
            self.close()

    def on_readable(self) -> None:
        dispatcher = self.acceptor.dispatcher
        try:
            data = self.sock.recv(MAX_PEEK, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("visitor %s: %s", self.peer(), exc)
            self.close()
            return
        if not data:
            self.close()
            return
        try:
            result = sniff_first_bytes(data)
        except SniffError as exc:
            dispatcher.refuse(self, f"unrecognised first bytes: {exc}", b"")
            return
        except Exception:  # a bug must cost this visitor, never the relay
            log.exception("visitor %s: sniffing failed", self.peer())
            self.close()
            return
        if result.kind == "need_more":
            if len(data) >= MAX_PEEK:
                dispatcher.refuse(self, "first bytes too long to classify", b"")
                return
            # Level-triggered readiness would fire again at once for the same bytes: wait
            # for more with a short, growing delay instead (rare: heads come in one piece).
            loop = self.acceptor.loop
            loop.remove_reader(self.fd)
            loop.call_later(self.delay, self._rearm)
            self.delay = min(self.delay * 2, 0.05)
            return
        try:
            dispatcher.dispatch(self, result, data)
        except Exception:
            log.exception("visitor %s: dispatch failed", self.peer())
            if self in self.acceptor.pending:
                self.close()

    def _rearm(self) -> None:
        if self in self.acceptor.pending:
            self.acceptor.loop.add_reader(self.fd, self.on_readable)


class Acceptor:
    """Listening sockets and the connections whose first bytes are awaited."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.loop = asyncio.get_running_loop()
        self.dispatcher = dispatcher
        self.pending: set[PendingVisitor] = set()
        self._listeners: list[socket.socket] = []

    def listen(self, host: str, port: int) -> tuple:
        """Listen on ``host:port``; returns the bound ``(host, port)``."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        lsock = socket.socket(family, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            lsock.bind((host, port))
        except OSError as exc:
            lsock.close()
            raise KiteError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        lsock.listen(LISTEN_BACKLOG)
        lsock.setblocking(False)
        bound = lsock.getsockname()[:2]
        self.loop.add_reader(lsock.fileno(), self._on_accept, lsock, bound[1])
        self._listeners.append(lsock)
        log.info("relay listening on %s:%d", bound[0], bound[1])
        return bound

    def _on_accept(self, lsock: socket.socket, port: int) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept failed: %s (out of descriptors?)", exc)
                    return
                raise
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pv = PendingVisitor(self, conn, addr, port)
            self.pending.add(pv)
            pv.start()

    def close(self) -> None:
        """Stop accepting and drop connections that have not said what they are."""
        for lsock in self._listeners:
            self.loop.remove_reader(lsock.fileno())
            lsock.close()
        self._listeners.clear()
        for pv in list(self.pending):
            pv.close()
