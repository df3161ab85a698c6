"""The relay's accept loop: listening sockets, and new connections until their first bytes
say what they are.

The relay accepts connections itself and *peeks* at their first bytes (``MSG_PEEK``) before
any protocol owns the socket: peeking, not reading, is what lets one port carry TLS tunnels,
TLS visitors passed through untouched, plain tunnels, CONNECT and HTTP visitors.  Once
:func:`kite.proto.sniff.sniff` has classified the bytes, the connection goes to the
:class:`~kite.relay.dispatch.Dispatcher`.  The listeners defer accepting until a connection
has sent something (``DEFER_ACCEPT``), so the first peek, right after ``accept``, usually
classifies it: no readiness to wait for, no timer.

Overload (docs in the constants below): the relay caps the connections it holds open
(``max_connections``: pending, being set up, tunnels, visitors); a connection beyond it is
accepted and reset at once, so the listen queue keeps moving and nothing spins.  Visitors
may not take the last ``tunnel_reserve`` of them (:meth:`Acceptor.admit_visitor`, asked
before each new visitor stream): a flood of visitors that stay connected leaves room for
backends to (re)connect, and their kites keep flying.  Connections
not yet classified are capped too (``max_pending``), but reaching that cap pauses accepting
instead: a burst of visitors (a browser's six connections times many, a benchmark's
thousands at once) waits in the kernel's listen queue for the few milliseconds the relay
needs to read their first bytes, and accepting resumes as soon as the pending ones drop
below the cap (they say what they are, or close, or time out after FIRST_BYTES_TIMEOUT).
A pending connection that has taken PENDING_EVICT_AGE already gives way: the next
connection in the queue is accepted and the oldest pending one reset, so heads begun and
never finished, from however many addresses, hold the cap for that long and no longer, and
a backend reconnecting behind them waits no more than that.
When ``accept`` itself fails for lack of resources (EMFILE, ENFILE, ENOBUFS, ENOMEM) the
listeners are unregistered and tried again after a pause growing from ``ACCEPT_PAUSE_MIN``
to ``ACCEPT_PAUSE_MAX``: a level-triggered listener left registered would fire again at
once, forever.  Either way at most one log line per ``OVERLOAD_LOG_INTERVAL`` says what was
dropped or paused.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import select
import socket
import time
from typing import TYPE_CHECKING, Optional

from ..errors import KiteError, RelayFull, SniffError
from ..net.sockets import reset_on_close
from ..proto.http import MAX_HEAD
from ..proto.sniff import sniff as sniff_first_bytes

if TYPE_CHECKING:  # pragma: no cover
    from .dispatch import Dispatcher

log = logging.getLogger("kite.relay")

__all__ = ["Acceptor", "PendingVisitor", "FIRST_BYTES_TIMEOUT", "MAX_PEEK",
           "default_max_connections", "default_max_pending", "default_tunnel_reserve"]

#: How long a new connection may take to say what it is.
FIRST_BYTES_TIMEOUT = 10.0
#: Seconds the kernel holds a new connection that has sent nothing before handing it to
#: accept() (Linux ``TCP_DEFER_ACCEPT``; elsewhere accept() takes it at once).  Every
#: connection the relay takes speaks first, so a connection reaches the relay with its
#: first bytes, classified without waiting for readiness; one that says nothing holds no
#: descriptor and no pending slot meanwhile, then gets FIRST_BYTES_TIMEOUT more.
DEFER_ACCEPT = 10
#: Connections one source address may have pending at once (accepted, but their bytes do
#: not yet say what they are); IPv6 addresses count by /64.  With DEFER_ACCEPT a client
#: that sends its head is pending for no time at all: only slow or partial senders add up,
#: and beyond this the address's next connections are reset at accept.
PENDING_PER_ADDRESS = 64
#: Seconds after which a pending connection gives way to a new one when ``max_pending``
#: connections are pending: the oldest is reset and the next in the listen queue accepted.
#: Below this age the cap pauses accepting instead (a burst whose heads are on their way).
PENDING_EVICT_AGE = 2.0
#: The most the relay peeks at before it must decide (a TLS hello or HTTP head fits).
MAX_PEEK = MAX_HEAD + 5  # a TLS record header and a 16 KiB head
#: Connections taken per listener readiness, so one busy port cannot starve the loop.
ACCEPT_BATCH = 256
LISTEN_BACKLOG = 4096
#: Descriptors kept free of connections for the relay itself (listeners, epoll, logs,
#: certificates, the odd file): an eighth of the limit, between these bounds.
FD_RESERVE_MIN = 16
FD_RESERVE_MAX = 256
#: Pending connections allowed by default: a quarter of max_connections, at most this.
MAX_PENDING_DEFAULT_CAP = 4096
#: Connections kept for tunnels by default (visitors may not take them): a sixteenth of
#: max_connections, between these bounds, and never more than a quarter of it.
TUNNEL_RESERVE_MIN = 16
TUNNEL_RESERVE_MAX = 1024
#: Pause before accepting again after accept failed for lack of resources: doubles from
#: the first to the second while the failures last.
ACCEPT_PAUSE_MIN = 0.05
ACCEPT_PAUSE_MAX = 1.0
#: At most one overload log line per this many seconds (with counts of what was dropped).
OVERLOAD_LOG_INTERVAL = 10.0


def default_max_connections(nofile: int) -> int:
    """The default ``max_connections`` for a descriptor limit ``nofile``: every descriptor
    but a reserve (an eighth, FD_RESERVE_MIN..FD_RESERVE_MAX)."""
    reserve = min(max(nofile // 8, FD_RESERVE_MIN), FD_RESERVE_MAX)
    return max(1, nofile - reserve)


def default_tunnel_reserve(max_connections: int) -> int:
    """The default ``tunnel_reserve``: a sixteenth of ``max_connections``, within
    TUNNEL_RESERVE_MIN..TUNNEL_RESERVE_MAX, at most a quarter of it (a small relay keeps
    most of its connections for visitors)."""
    return min(max(max_connections // 16, TUNNEL_RESERVE_MIN), TUNNEL_RESERVE_MAX,
               max_connections // 4)


def default_max_pending(max_connections: int) -> int:
    """The default ``max_pending``: a quarter of ``max_connections``, at most
    MAX_PENDING_DEFAULT_CAP (connections that say nothing must not crowd out the rest)."""
    return max(1, min(max_connections // 4, MAX_PENDING_DEFAULT_CAP))


_V4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96, IPv4 addresses in IPv6


def address_key(ip: str):
    """What PENDING_PER_ADDRESS counts by: an IPv4 address (also IPv4-mapped IPv6), or the
    /64 of an IPv6 address (one subscriber's usual allocation)."""
    if ":" not in ip:
        return ip
    try:
        packed = socket.inet_pton(socket.AF_INET6, ip.partition("%")[0])
    except OSError:
        return ip
    if packed[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return packed[:8]


def _peer_done(fd: int) -> bool:
    """The peer has shut down its sending side (Linux ``POLLRDHUP``; elsewhere False)."""
    rdhup = getattr(select, "POLLRDHUP", 0)
    if not rdhup:
        return False
    poller = select.poll()
    poller.register(fd, rdhup)
    return bool(poller.poll(0))


class PendingVisitor:
    """A new connection whose first bytes are not yet known."""

    __slots__ = ("acceptor", "sock", "addr", "port", "handle", "since", "delay", "fd",
                 "watching", "key")

    def __init__(self, acceptor: Acceptor, sock: socket.socket, addr, port: int) -> None:
        self.acceptor = acceptor
        self.sock = sock
        self.addr = addr
        self.port = port  # the public port the visitor connected to
        self.fd = sock.fileno()
        self.since = acceptor.loop.time()  # when it was accepted
        self.delay = 0.001
        self.handle: Optional[asyncio.TimerHandle] = None
        self.watching = False  # registered with the loop for readability
        self.key = None  # its address_key, while it counts against PENDING_PER_ADDRESS

    def peer(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}"

    def start(self) -> None:
        """Classify the connection by the bytes it sent (usually there already: the
        listeners defer accepting until they come, ``DEFER_ACCEPT``); else wait for them,
        FIRST_BYTES_TIMEOUT at most."""
        try:
            ready = self.on_readable()
        except Exception:  # a bug must cost this visitor, never the accept loop
            log.exception("visitor %s: classifying failed", self.peer())
            if self in self.acceptor.pending:
                self.close()
            return
        if not ready:
            self._watch()
        if self.handle is None and self in self.acceptor.pending:
            self.handle = self.acceptor.loop.call_later(FIRST_BYTES_TIMEOUT, self.on_timeout)

    def _watch(self) -> None:
        self.acceptor.loop.add_reader(self.fd, self.on_readable)
        self.watching = True

    def _unwatch(self) -> None:
        if self.watching:
            self.watching = False
            self.acceptor.loop.remove_reader(self.fd)

    def detach(self) -> socket.socket:
        """Stop watching the socket; the caller now owns it."""
        self._unwatch()
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        acceptor = self.acceptor
        acceptor.pending.pop(self, None)
        if self.key is not None:
            acceptor.address_left(self.key)
            self.key = None
        if acceptor.pending_full:
            acceptor.pending_left()
        return self.sock

    def close(self) -> None:
        self.detach()
        self.sock.close()

    def on_timeout(self) -> None:
        self.handle = None
        if self in self.acceptor.pending:
            log.debug("visitor %s: said nothing within %g s; closed", self.peer(),
                      FIRST_BYTES_TIMEOUT)
            self.close()
            self.acceptor.note_silent()

    def on_readable(self) -> bool:
        """Peek at what the connection sent and act on it; False when nothing came yet."""
        dispatcher = self.acceptor.dispatcher
        try:
            data = self.sock.recv(MAX_PEEK, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            log.info("visitor %s: %s", self.peer(), exc)
            self.close()
            return True
        if not data:
            self.close()
            return True
        try:
            result = sniff_first_bytes(data)
        except SniffError as exc:
            dispatcher.unrecognised(self, exc, data)
            return True
        except Exception:  # a bug must cost this visitor, never the relay
            log.exception("visitor %s: sniffing failed", self.peer())
            self.close()
            return True
        if result.kind == "need_more":
            if len(data) >= MAX_PEEK:
                dispatcher.refuse(self, "first bytes too long to classify", b"")
                return True
            if _peer_done(self.fd):  # a peek shows the bytes, not the EOF behind them
                # counted with the silent ones (a summary line), not logged one by one
                log.debug("visitor %s: ended after %d bytes, too few to classify; closed",
                          self.peer(), len(data))
                self.close()
                self.acceptor.note_silent()
                return True
            # Level-triggered readiness would fire again at once for the same bytes: wait
            # for more with a short, growing delay instead (rare: heads come in one piece).
            self._unwatch()
            self.acceptor.loop.call_later(self.delay, self._rearm)
            self.delay = min(self.delay * 2, 0.05)
            return True
        try:
            dispatcher.dispatch(self, result, data)
        except Exception:
            log.exception("visitor %s: dispatch failed", self.peer())
            if self in self.acceptor.pending:
                self.close()
        return True

    def _rearm(self) -> None:
        if self in self.acceptor.pending:
            self._watch()


class Acceptor:
    """Listening sockets and the connections whose first bytes are awaited."""

    def __init__(self, dispatcher: Dispatcher, *, max_connections: int = 1 << 20,
                 max_pending: int = MAX_PENDING_DEFAULT_CAP, tunnel_reserve: int = 0) -> None:
        self.loop = asyncio.get_running_loop()
        self.dispatcher = dispatcher
        #: connections whose first bytes are awaited, oldest first (a dict keeps the order)
        self.pending: dict[PendingVisitor, None] = {}
        self._listeners: list[tuple[socket.socket, int]] = []
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.tunnel_reserve = tunnel_reserve  # the last connections, kept for tunnels
        self.accepting = True  # False while paused (a resource error, or pending_full)
        self.pending_full = False  # paused: max_pending connections await their first bytes
        self._pause = ACCEPT_PAUSE_MIN
        self._retry: Optional[asyncio.TimerHandle] = None
        # what was dropped since the last overload line (and in total, for tests)
        self.over_connections = self.over_pending = self.accept_errors = 0
        self.over_visitors = 0  # visitors refused for the tunnel reserve, since the last line
        self.over_address = 0  # reset for PENDING_PER_ADDRESS, since the last line
        self.address_total = 0
        self.evicted = self.evicted_total = 0  # pending ones reset for PENDING_EVICT_AGE
        self.pending_by_address: dict = {}  # address_key -> pending connections
        self.silent = self.silent_total = 0  # closed for saying nothing in time
        self.dropped_total = self.full_total = 0
        self._last_error = ""
        self._last_log = -OVERLOAD_LOG_INTERVAL
        self._log_handle: Optional[asyncio.TimerHandle] = None
        self._evict_handle: Optional[asyncio.TimerHandle] = None

    def connections(self) -> int:
        """Connections the relay holds open now: pending, being set up, tunnels, visitors."""
        d = self.dispatcher
        state = d.state
        fleet = state.fleet_link
        return (len(self.pending) + d.setting_up() + len(state.tunnels) + state.limits.connections
                + (fleet.visitors() if fleet is not None else 0))

    def admit_visitor(self) -> None:
        """Raise :class:`RelayFull` when a new visitor would take one of the last
        ``tunnel_reserve`` connections (counted, summarised in the overload line).  The
        visitor asking is among :meth:`connections` already (pending, or being set up)."""
        if self.connections() > self.max_connections - self.tunnel_reserve:
            self.over_visitors += 1
            self.full_total += 1
            self._report()
            raise RelayFull(f"{self.connections()} connections open: the last "
                            f"{self.tunnel_reserve} of --max-connections "
                            f"({self.max_connections}) are kept for tunnels")

    def listen(self, host: str, port: int) -> tuple:
        """Listen on ``host:port``; returns the bound ``(host, port)``."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        lsock = socket.socket(family, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        defer = getattr(socket, "TCP_DEFER_ACCEPT", None)
        if defer is not None:
            try:
                lsock.setsockopt(socket.IPPROTO_TCP, defer, DEFER_ACCEPT)
            except OSError as exc:  # defined, not supported (an emulated kernel): no matter
                log.debug("listener %s:%d: TCP_DEFER_ACCEPT: %s", host, port, exc)
        try:
            lsock.bind((host, port))
        except OSError as exc:
            lsock.close()
            raise KiteError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        lsock.listen(LISTEN_BACKLOG)
        lsock.setblocking(False)
        bound = lsock.getsockname()[:2]
        self._listeners.append((lsock, bound[1]))
        if self.accepting:
            self.loop.add_reader(lsock.fileno(), self._on_accept, lsock, bound[1])
        log.info("relay listening on %s:%d", bound[0], bound[1])
        return bound

    def _on_accept(self, lsock: socket.socket, port: int) -> None:
        for _ in range(ACCEPT_BATCH):
            oldest = None
            if len(self.pending) >= self.max_pending:
                oldest = next(iter(self.pending))
                if self.loop.time() - oldest.since < PENDING_EVICT_AGE:
                    self._pause_while_pending(oldest)
                    return
            try:
                conn, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # that connection is gone already; the next may be fine
                self._stop_accepting(exc)
                return
            self._pause = ACCEPT_PAUSE_MIN
            if oldest is not None:
                self._evict(oldest)
            if self.connections() >= self.max_connections:
                self.over_connections += 1
                self.dropped_total += 1
                self._drop(conn)
                continue
            key = None
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                key = address_key(addr[0])
                waiting = self.pending_by_address.get(key, 0)
                if waiting >= PENDING_PER_ADDRESS:
                    self.over_address += 1
                    self.address_total += 1
                    self._drop(conn)
                    continue
                self.pending_by_address[key] = waiting + 1
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setblocking(False)
            pv = PendingVisitor(self, conn, addr, port)
            pv.key = key
            self.pending[pv] = None
            pv.start()

    # -- overload -----------------------------------------------------------------------------
    def note_silent(self) -> None:
        """A connection was closed for saying nothing in time: counted, not logged alone
        (a flood of them is one line per OVERLOAD_LOG_INTERVAL)."""
        self.silent += 1
        self.silent_total += 1
        self._report()

    def _drop(self, conn: socket.socket) -> None:
        """Over a cap (counted by the caller): reset the connection at once (no FIN
        handshake, no TIME_WAIT)."""
        reset_on_close(conn)
        conn.close()
        self._report()

    def _evict(self, pv: PendingVisitor) -> None:
        """The oldest pending connection, older than PENDING_EVICT_AGE, gives its place to
        the one just accepted: reset (counted, summarised in the overload line, not logged
        one by one: a flood of them is one line per OVERLOAD_LOG_INTERVAL)."""
        sock = pv.detach()
        self.evicted += 1
        self.evicted_total += 1
        self._drop(sock)

    def address_left(self, key) -> None:
        """A pending connection from ``key`` (address_key) was classified or closed."""
        n = self.pending_by_address.get(key, 0) - 1
        if n > 0:
            self.pending_by_address[key] = n
        else:
            self.pending_by_address.pop(key, None)

    def _pause_while_pending(self, oldest: PendingVisitor) -> None:
        """max_pending connections await their first bytes: accept nothing more (the rest
        wait in the listen queue) until one of them leaves (:meth:`pending_left`) or the
        oldest of them is PENDING_EVICT_AGE old and may give way (:meth:`_evict`)."""
        self.over_pending += 1
        self.pending_full = True
        if self.accepting:
            self.accepting = False
            for lsock, _ in self._listeners:
                self.loop.remove_reader(lsock.fileno())
        if self._evict_handle is not None:
            self._evict_handle.cancel()
        self._evict_handle = self.loop.call_at(oldest.since + PENDING_EVICT_AGE,
                                               self._evictable)
        self._report()

    def _evictable(self) -> None:
        """The oldest pending connection may give way: accept again (a new connection in
        the listen queue evicts it; none, and nothing changes)."""
        self._evict_handle = None
        if self.pending_full:
            self.pending_full = False
            if self._retry is None:
                self._resume_accepting()

    def pending_left(self) -> None:
        """A pending connection was classified or closed: accept again if paused for it."""
        if len(self.pending) < self.max_pending:
            self.pending_full = False
            if self._evict_handle is not None:
                self._evict_handle.cancel()
                self._evict_handle = None
            if self._retry is None:  # else the resource pause resumes when it is over
                self._resume_accepting()

    def _stop_accepting(self, exc: OSError) -> None:
        """accept() failed (EMFILE, ENFILE, ENOBUFS, ENOMEM, or anything unexpected): unregister every
        listener and try again after a growing pause - never spin on a ready listener."""
        self.accept_errors += 1
        self._last_error = exc.strerror or str(exc)
        if self.accepting:
            self.accepting = False
            for lsock, _ in self._listeners:
                self.loop.remove_reader(lsock.fileno())
        if self._retry is None:
            self._retry = self.loop.call_later(self._pause, self._resume_accepting)
            self._pause = min(self._pause * 2, ACCEPT_PAUSE_MAX)
        self._report()

    def _resume_accepting(self) -> None:
        self._retry = None
        if self.accepting or self.pending_full or not self._listeners:
            return
        self.accepting = True
        for lsock, port in self._listeners:
            self.loop.add_reader(lsock.fileno(), self._on_accept, lsock, port)

    def _report(self) -> None:
        """At most one line per OVERLOAD_LOG_INTERVAL: the first event at once, then what
        happened since, when the interval is over."""
        if self._log_handle is not None:
            return
        now = time.monotonic()
        wait = self._last_log + OVERLOAD_LOG_INTERVAL - now
        if wait > 0:
            self._log_handle = self.loop.call_later(wait, self._log_now)
        else:
            self._log_now()

    def _log_now(self) -> None:
        self._log_handle = None
        parts = []
        if self.over_connections:
            parts.append(f"{self.over_connections} connection(s) reset over --max-connections "
                         f"({self.max_connections})")
        if self.over_address:
            parts.append(f"{self.over_address} connection(s) reset: their address already "
                         f"had {PENDING_PER_ADDRESS} that had not said what they are")
        if self.over_visitors:
            parts.append(f"{self.over_visitors} visitor(s) refused: the last "
                         f"{self.tunnel_reserve} of --max-connections ({self.max_connections}) "
                         f"are kept for tunnels (--tunnel-reserve)")
        if self.over_pending:
            parts.append(f"accepting paused {self.over_pending} time(s) while --max-pending "
                         f"({self.max_pending}) connections had not said what they are")
        if self.evicted:
            parts.append(f"{self.evicted} connection(s) reset for a new one after "
                         f"{PENDING_EVICT_AGE:g} s without saying what they are, while "
                         f"--max-pending ({self.max_pending}) were pending")
        if self.accept_errors:
            parts.append(f"accept failed {self.accept_errors} time(s) ({self._last_error}): "
                         f"paused accepting, up to {ACCEPT_PAUSE_MAX:g} s at a time")
        overloaded = bool(parts)
        if self.silent:
            parts.append(f"{self.silent} connection(s) closed before saying what they are "
                         f"(silent for {FIRST_BYTES_TIMEOUT:g} s, or ended too soon)")
        if not parts:
            return
        self.over_connections = self.over_pending = self.accept_errors = self.silent = 0
        self.over_visitors = self.over_address = self.evicted = 0
        self._last_log = time.monotonic()
        log.log(logging.WARNING if overloaded else logging.INFO, "%s (%d connections open): %s",
                "relay overloaded" if overloaded else "idle connections",
                self.connections(), "; ".join(parts))

    def close(self) -> None:
        """Stop accepting and drop connections that have not said what they are."""
        if self.accepting:
            for lsock, _ in self._listeners:
                self.loop.remove_reader(lsock.fileno())
        self.accepting = False
        for lsock, _ in self._listeners:
            lsock.close()
        self._listeners.clear()
        for handle in (self._retry, self._log_handle, self._evict_handle):
            if handle is not None:
                handle.cancel()
        self._retry = self._log_handle = self._evict_handle = None
        for pv in list(self.pending):
            pv.close()
