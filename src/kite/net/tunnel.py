"""One tunnel in chunk mode, and the streams it carries: the part relay and backend share.

Theory of operation
-------------------
A :class:`TunnelProtocol` owns one transport (TLS or plain) in chunk mode.  Bytes from the
transport land directly in the fast-path :class:`~kite.fastpath.Demux` (its ``get_buffer`` is
this protocol's).  Data chunks go straight to the sink of their :class:`Stream` (a borrowed
view, copied once into the local transport); every other chunk is turned into events by
:mod:`kite.proto.control` and handled here (PING/PONG, SKB, EOF) or by the side-specific
subclass (stream open on the backend, kite registration).

Writes are corked: every chunk goes into one :class:`~kite.fastpath.ChunkWriter`, and the
first chunk of a loop tick schedules a single flush, so a busy tunnel hands the TLS layer one
buffer (one TLS record train, one syscall) per tick instead of one per chunk.  Local sockets
read straight into the writer's pending buffer (``ChunkWriter.get_data_buffer``): the payload
is copied once, by the kernel, and leaves with its header as one piece.

Flow control (:mod:`kite.proto.flow`): each stream stops reading its local socket while it is
a window ahead of the peer's SKB acknowledgements, and acknowledges what it wrote to its
local socket.  When the tunnel transport itself pushes back (``pause_writing``), every
stream stops reading until it drains.

Scheduling: the bytes written and not yet sent (the writer's buffer, the TLS layer, the
transport's buffer, the kernel's send queue, seen by ``ioctl``) are one FIFO, so the
tunnel keeps them near a target of a few milliseconds of its measured delivery rate
(:class:`~kite.proto.flow.SendQueue`); the kernel's own part is bounded by
``TCP_NOTSENT_LOWAT``.  A stream that has sent more than one quantum in its current burst
(a burst: reads that filled the buffer lent, so more was waiting in the local socket; a
short read ends it) reads on only while the queue is under the target;
otherwise it is held (``PAUSE_QUEUE``), its bytes wait in its own local socket, and held
streams take turns, one quantum per turn, as the queue drains.  A new or small stream is
never held: its first quantum goes straight behind the short queue, not behind a bulk
stream's backlog.

Stream end (docs/protocol.md §5.3): local EOF sends ``EOF: 1R`` and keeps writing; a
peer's ``R`` half-closes the local socket after the pending bytes; a peer's ``W`` stops
reading; once both directions are done, or either side loses its socket, the stream is
discarded with exactly one ``EOF: 1WR`` from this side.  An end sends ``R`` before ``WR``
(:meth:`Stream.finish`); a cut sends ``WR`` alone and resets the local socket
(:meth:`Stream.cut`), and a kite peer's ``WR`` before its ``R`` is a cut here too.  Local
sockets reset when closed until they end well, so a dead process leaves no clean-looking
end behind.

Limits (:mod:`kite.net.limits`, the relay sets :attr:`TunnelProtocol.limits`): a coarse
per-tunnel timer closes idle streams; the local transports' pause/resume events feed a
process-wide budget for buffered bytes.  Nothing of it runs per chunk.
"""

from __future__ import annotations

import asyncio
import enum
import fcntl
import logging
import os
import socket
import struct
import termios
import time
from collections import deque
from typing import Optional

from ..errors import KiteError, RemoteProtocolError
from ..fastpath import ChunkWriter, Demux, StreamSlot
from ..proto import control
from ..proto.flow import (
    KITE_ACK_STEP,
    KITE_MAX_WINDOW,
    KITE_MIN_WINDOW,
    KITE_RATE_FLOOR,
    KITE_TUNNEL_BUDGET,
    PAGEKITE_ACK_STEP,
    PAGEKITE_WINDOW,
    QUEUE_MIN,
    AckPolicy,
    SendQueue,
    SendWindow,
    WindowPolicy,
)
from ..proto.forwarded import ForwardedRewriter
from ..proto.framebudget import FrameBudget
from ..proto.http import MAX_HEAD, http_error
from ..proto.names import HTTP_PROTOS
from ..proto.zchunks import ZInflater
from .busypoll import BusyPoll
from .limits import IDLE_CHECKS, StreamLimits
from .sockets import close_gracefully, reset, reset_on_close, set_nodelay, unsent_bytes

log = logging.getLogger("kite.tunnel")

__all__ = ["TunnelProtocol", "Stream", "StreamState", "StreamProtocol"]

#: Bytes a local socket reads per chunk when the peer is pagekite.py (its own read size).
PAGEKITE_MAX_PAYLOAD = 16256
_SCRATCH = 65536
#: Pending tunnel bytes that flush the corked writer before the next read buffer is lent
#: (StreamProtocol.get_buffer) instead of at the end of the loop tick: one full local read,
#: so a busy stream never makes the corked buffer grow past it while small reads of many
#: streams still leave in one flush per tick.  A tunnel to a kite peer, whose reads are
#: bigger, uses KITE_FLUSH_NOW.
FLUSH_NOW = 64 * 1024
#: Largest data chunk payload towards a kite peer: every local read fills one chunk, so
#: bigger reads mean fewer syscalls, TLS writes and Python calls per byte (kite's demux
#: accepts chunks up to 1 MiB).  pagekite.py peers keep PAGEKITE_MAX_PAYLOAD.
KITE_MAX_PAYLOAD = 128 * 1024 - 32
KITE_FLUSH_NOW = 128 * 1024
#: A queued tunnel->local payload this long or longer is kept as a slice of the demux's
#: receive buffer instead of copied (Stream._write_local) ...
KEEP_MIN = 16 * 1024
#: ... while the receive buffers kept alive that way take less than this, per tunnel.
KEEP_LIMIT = 16 * 1024 * 1024
#: The tunnel transport's write-buffer marks: above HIGH the streams stop reading their
#: local sockets until it drains below LOW.
TUNNEL_HIGH_WATER = 4 * 1024 * 1024
TUNNEL_LOW_WATER = 1024 * 1024
#: What a tunnel may queue towards its peer beyond its streams' windows - control chunks
#: (acks, PONGs, EOFs), and towards pagekite.py the frame budget's padding - before it
#: stops reading from that peer (see TunnelProtocol.queue_limit) ...
CONTROL_SLACK = 1024 * 1024
PAGEKITE_SLACK = 4 * 1024 * 1024
#: ... and how long its reading may stay stopped so before the peer is cut off (aborted).
WRITE_DEADLINE = 30.0
#: A tunnel closed gracefully whose peer has not taken its last bytes after this many
#: seconds is aborted.
CLOSE_DEADLINE = 10.0
#: The kernel's part of the queue (TCP_NOTSENT_LOWAT): twice the scheduler's target and
#: this much for control chunks and the first quanta of new streams, so the kernel never
#: refuses what the target lets through (bytes it refused would wait in the transport,
#: out of the scheduler's sight).
LOWAT_SLACK = 64 * 1024
_SIOCOUTQNSD = 0x894B  # Linux: a TCP socket's bytes not sent yet (SIOCOUTQ: and unacked)
_INT = b"\0\0\0\0"


class StreamState(enum.IntEnum):
    """Where a stream is in its life; :class:`Stream` alone changes it (docs/protocol.md §5.3).

    ``OPEN -(local EOF)-> LOCAL_DONE -(peer EOF R)-> CLOSED``,
    ``OPEN -(peer EOF R)-> PEER_DONE -(local EOF)-> CLOSED``, and from any state
    ``-(peer EOF WR, local socket lost, tunnel gone, flow violation)-> CLOSED``.
    """

    OPEN = 0  # both directions carry data
    LOCAL_DONE = 1  # the local socket ended its input; EOF R sent; the peer's data still goes out
    PEER_DONE = 2  # the peer sent EOF R; the local socket is half-closed after what is queued
    CLOSED = 3  # forgotten by the tunnel; the local socket is closed or closing


_OPEN = StreamState.OPEN
_CLOSED = StreamState.CLOSED

#: Why a stream's local reading is paused: bits of :attr:`Stream.paused`.  Reading resumes
#: when no bit is left.
PAUSE_WINDOW = 1  # a window ahead of the peer's SKB acknowledgements
PAUSE_TUNNEL = 2  # the tunnel transport pushed back (pause_writing)
PAUSE_PEER_CLOSED = 4  # the peer sent EOF W: it cannot deliver what we read
PAUSE_QUEUE = 8  # held by the tunnel's scheduler: the queue below it is full


class Stream:
    """One stream of a tunnel: its slot in the fast path, its local transport, its state.

    Every change of :attr:`state` and :attr:`paused` happens in a method of this class; the
    local protocol and the tunnel report events to it (``on_local_eof``, ``on_peer_eof``,
    ``on_local_lost``, ``close``...).
    """

    __slots__ = (
        "tunnel", "sid", "slot", "transport", "proto", "host", "port", "peer",
        "send_window", "ack", "pending", "delivered", "next_ack", "state", "paused",
        "local_full", "inflated", "rewriter", "fd", "idle_mark", "idle_since", "burst_from",
        "in_burst", "lingering", "__weakref__",
    )

    def __init__(self, tunnel: TunnelProtocol, sid: int, *, proto: str = "", host: str = "",
                 port: int = 0, peer: str = "") -> None:
        self.tunnel = tunnel
        self.sid = sid
        self.slot = StreamSlot(sid, self.sink)
        self.transport: Optional[asyncio.Transport] = None
        self.fd = -1  # the local socket's descriptor, for direct writes (see _write_local)
        self.proto = proto
        self.host = host
        self.port = port
        self.peer = peer  # "ip:port" of the visitor, for logs
        self.send_window = SendWindow(tunnel.policy)
        self.ack = AckPolicy(tunnel.ack_step)
        self.pending: Optional[list] = []  # payloads that arrived before the local socket
        self.delivered = 0  # bytes handed to the local transport
        self.inflated = 0  # bytes of those that kite added (X-Forwarded-*, PROXY header)
        self.rewriter: Optional[ForwardedRewriter] = None  # HTTP kites on the backend
        self.next_ack = tunnel.ack_step  # check for an ack once delivered reaches this
        self.state = _OPEN
        self.paused = 0  # PAUSE_* bits: why local reading is paused (0: it is not)
        self.local_full = False  # the local transport's write buffer is above its high mark
        self.idle_mark: Optional[tuple] = None  # activity() at the last idle check ...
        self.idle_since = 0.0  # ... and when it last changed (loop time)
        self.burst_from = 0  # slot.sent when the current burst of reads began ...
        self.in_burst = False  # ... and whether the latest read filled its buffer
        self.lingering = False  # closed, its last bytes still on their way to the local side

    @property
    def closed(self) -> bool:
        return self.state is _CLOSED

    # -- tunnel -> local ------------------------------------------------------------------
    def sink(self, view: memoryview) -> None:
        """Demux sink: one data payload for this stream (a borrowed view, valid during the
        call only)."""
        transport = self.transport
        if transport is None:
            if self.pending is not None:
                self.pending.append(bytes(view))
                if len(self.pending) > 8 and self._pending_size() > self.tunnel.buffer_limit:
                    self.flow_violation()
            return
        n = len(view)
        if n:
            self._write_local(transport, view)
            self.delivered += n
            if self.local_full and transport.get_write_buffer_size() > self.tunnel.buffer_limit:
                self.flow_violation()
                return
            if self.delivered >= self.next_ack:
                self.check_ack()

    def _write_local(self, transport: asyncio.Transport, view) -> None:
        """Write a borrowed view to the local socket.

        When the transport has nothing queued, the bytes go straight to the socket with
        write(2): the kernel's copy is the only one.  Order is kept - the transport's queue
        is empty - and whatever the socket does not take now is queued.  TLS transports
        (a visitor of ``kite connect --tls``) never take the direct path.

        What is queued is a slice of the demux's receive buffer, not a copy: the demux
        never overwrites bytes a live slice covers (it moves on to another buffer), so a
        local socket that takes bytes slower than the tunnel delivers them - the steady
        state of an upload to a local server - costs no copy and no allocation per chunk.
        A slice keeps its whole buffer allocated, so small rests are copied, and once the
        buffers kept this way reach ``KEEP_LIMIT`` everything is copied until they drain.
        """
        busy = self.tunnel.busy
        if busy is not None:
            busy.poke()  # a request to a local server, a response to a visitor
        fd = self.fd
        k = 0
        if fd >= 0 and not transport.get_write_buffer_size() and not transport.is_closing():
            try:
                k = os.write(fd, view)
            except (BlockingIOError, InterruptedError):
                k = 0
            except OSError:
                k = 0  # a dead socket: the transport's own write below meets the error
            if k == len(view):
                return
        rest = view[k:]
        demux = self.tunnel.demux
        assert demux is not None  # streams exist in chunk mode only
        if len(rest) < KEEP_MIN or demux.pinned >= KEEP_LIMIT:
            rest = bytes(rest)
        transport.write(rest)

    def _pending_size(self) -> int:
        return sum(len(p) for p in self.pending or ())

    def receive_opening(self, payload: bytes) -> None:
        """The payload of the stream-open chunk: the first bytes for the local socket."""
        assert self.pending is not None, "the local socket is attached already"
        self.pending.append(payload)
        self.slot.received += len(payload)

    def prepend_local(self, data: bytes) -> None:
        """Bytes for the local socket ahead of everything the peer sends (a PROXY header);
        only before the local socket is attached.  They are not acknowledged to the peer."""
        assert self.pending is not None, "the local socket is attached already"
        self.pending.insert(0, data)
        self.inflated += len(data)

    def flow_violation(self) -> None:
        """The peer sent far more than the window allows: memory per stream stays bounded,
        so this stream goes (cut: the local side sees an error, not a clean end)."""
        log.warning("%s: stream %d: peer ignored flow control (more than %d bytes buffered); "
                    "stream closed", self.tunnel.name, self.sid, self.tunnel.buffer_limit)
        self.cut()

    def cut(self) -> None:
        """End the stream short (flow violation, memory budget, the peer's cut, bad input):
        the local socket is reset (kite.net.sockets.reset) - a visitor never mistakes a
        cut-off transfer for a clean end - and the peer gets ``EOF: 1WR`` without a ``R``
        first, which a kite peer reads as a cut too (docs/protocol.md §5.3).  A stream that
        is closed already but still writing its last bytes is reset."""
        t = self.transport
        if self.state is _CLOSED:
            if t is not None:
                reset(t)
            return
        self.tunnel.discard(self, close_local=False)
        if t is not None:
            self.tunnel.cut_local(self, t)

    def finish(self) -> None:
        """End the stream well from this side: ``EOF: 1R`` (unless sent), the local socket
        closed after its buffered bytes, ``EOF: 1WR``."""
        if self.state is _CLOSED:
            return
        if self.state is not StreamState.LOCAL_DONE and not self.tunnel.closed:
            self.tunnel.send_eof(self.sid, "R")
        self.tunnel.discard(self, close_local=True)

    def enable_rewriter(self, rewriter: ForwardedRewriter) -> None:
        """Pass tunnel->local bytes through an HTTP head rewriter (X-Forwarded-*)."""
        self.rewriter = rewriter
        self.slot.sink = self._rewrite_sink
        if self.pending:
            raw = b"".join(self.pending)
            out = rewriter.feed(raw)
            self.inflated += len(out) - len(raw)
            self.pending = [out]

    def _rewrite_sink(self, view: memoryview) -> None:
        rewriter = self.rewriter
        assert rewriter is not None  # this sink is set with the rewriter
        n = len(view)
        take = rewriter.verbatim(n)  # a body: passes as it is, no copy, no parser
        if take:
            if take == n:
                self.sink(view)
                return
            self.sink(view[:take])
            if self.state is _CLOSED:
                return
            view = view[take:]
        data = bytes(view)
        try:
            out = rewriter.feed(data)
        except KiteError as exc:
            log.info("%s: stream %d: bad HTTP from visitor %s: %s", self.tunnel.name, self.sid,
                     self.peer, exc)
            self.cut()
            return
        self.inflated += len(out) - len(data)
        transport = self.transport
        if transport is None:
            if self.pending is not None:
                self.pending.append(out)
            return
        if out:
            transport.write(out)
            busy = self.tunnel.busy
            if busy is not None:
                busy.poke()
            self.delivered += len(out)
            if self.delivered >= self.next_ack:
                self.check_ack()

    def check_ack(self, force: bool = False) -> None:
        """Send SKB for the bytes that actually left the local transport's buffer."""
        transport = self.transport
        if transport is None or self.state is _CLOSED:
            return
        written = self.delivered - transport.get_write_buffer_size() - self.inflated
        kib = self.ack.due(written, force=force)
        if kib is not None:
            self.tunnel.send_skb(self.sid, kib)
        self.next_ack = self.delivered + self.tunnel.ack_step

    def attach_transport(self, transport: asyncio.Transport) -> None:
        """The local connection is up: deliver what waited for it.

        Its socket resets when closed (kite.net.sockets.reset_on_close) until the stream
        ends well: if this process dies, the other end sees an error, not a clean end."""
        self.transport = transport
        set_nodelay(transport)
        reset_on_close(transport)
        sock = transport.get_extra_info("socket")
        rcvbuf = self.tunnel.local_rcvbuf
        if sock is not None and rcvbuf:
            # Autotuning grows a socket's receive buffer by how fast it was read, and the
            # streams of one tunnel are read as fast as the tunnel takes their bytes: the
            # sockets that were read most get the biggest buffers and then the most of the
            # tunnel per read.  One fixed size for all keeps concurrent streams even.
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            except OSError:
                pass
        if sock is not None and transport.get_extra_info("ssl_object") is None:
            try:
                self.fd = sock.fileno()
            except (OSError, AttributeError, ValueError):
                self.fd = -1
        # H + S < W (see kite.proto.flow): while the buffer stays below the high-water mark
        # the sender is never blocked, and above it resume_writing forces an ack.
        high = max(4096, self.tunnel.ack_step)
        transport.set_write_buffer_limits(high=high, low=high // 4)
        pending, self.pending = self.pending, None
        for data in pending or ():
            transport.write(data)
            self.delivered += len(data)
        if self.tunnel.write_paused:
            self.paused |= PAUSE_TUNNEL
        if self.paused:
            self._pause_transport()
        if pending:
            self.check_ack(force=True)
        if self.state is StreamState.PEER_DONE:
            self._write_eof()

    # -- flow control ---------------------------------------------------------------------
    def pause(self, reason: int) -> None:
        """Stop reading the local socket for ``reason`` (a PAUSE_* bit)."""
        was = self.paused
        self.paused = was | reason
        if not was:
            self._pause_transport()

    def resume(self, reason: int) -> None:
        """``reason`` no longer holds; reading resumes when no other reason is left."""
        was = self.paused
        if not was & reason:
            return
        self.paused = was & ~reason
        if not self.paused and self.state is not _CLOSED and self.transport is not None:
            try:
                self.transport.resume_reading()
            except (RuntimeError, AttributeError):
                pass

    def _pause_transport(self) -> None:
        if self.transport is not None and self.state is not _CLOSED:
            try:
                self.transport.pause_reading()
            except (RuntimeError, AttributeError):
                pass

    def on_skb(self, kib: int) -> None:
        if (self.send_window.on_ack(kib, self.slot.sent, self.tunnel.loop.time())
                and self.paused & PAUSE_WINDOW):
            self.resume(PAUSE_WINDOW)

    def on_local_full(self, full: bool) -> None:
        """The local transport's write buffer crossed its high (True) or low mark."""
        self.local_full = full
        limits = self.tunnel.limits
        if limits is not None:
            limits.note_full(self, full)
        if not full:
            self.check_ack(force=True)

    # -- limits (kite.net.limits) ---------------------------------------------------------
    def hold_acks(self) -> None:
        """Send no SKB until :meth:`release_acks`: the peer stops once its window is used."""
        self.next_ack = 1 << 62  # sink never reaches it: no check at all while held

    def release_acks(self) -> None:
        self.next_ack = self.delivered
        self.check_ack(force=True)

    def buffered(self) -> int:
        """Bytes the local transport holds in its write buffer."""
        t = self.transport
        return t.get_write_buffer_size() if t is not None else self._pending_size()

    def activity(self) -> tuple:
        """Changes whenever a byte moves either way: read from the local socket, received
        from the peer, or taken by the local peer out of the buffers (the transport's and
        the kernel's send queue)."""
        slot = self.slot
        return slot.sent, slot.received, self.buffered(), unsent_bytes(self.fd)

    def close_idle(self, idle: float) -> None:
        log.info("%s: stream %d (%s %s:%d, visitor %s): no byte either way for %.0f s; closed",
                 self.tunnel.name, self.sid, self.proto, self.host, self.port, self.peer, idle)
        if self.buffered():
            self.cut()  # bytes nobody reads: a graceful close would wait for them forever
        else:
            self.finish()

    # -- ends -----------------------------------------------------------------------------
    def on_local_eof(self) -> bool:
        """The local socket ended its input: tell the peer (EOF R).  Returns whether the
        local transport should stay open for writing."""
        self.tunnel.writer.cancel_data_buffer()
        t = self.transport
        keep = True
        if t is not None and not t.can_write_eof():
            # TLS: the transport closes itself after an EOF, once its bytes are out (asyncio
            # and uvloop alike): that close is an end, not a cut.  Asking it to stay open
            # means nothing there (and both loops log a warning for it).
            reset_on_close(t, on=False)
            keep = False
        state = self.state
        if state is _OPEN:
            self.state = StreamState.LOCAL_DONE
            self.tunnel.send_eof(self.sid, "R")
            return keep
        if state is StreamState.PEER_DONE:
            self.finish()
            return False
        return keep

    def on_local_lost(self) -> None:
        """The local socket is gone."""
        self.tunnel.writer.cancel_data_buffer()
        if self.state is not _CLOSED:
            self.tunnel.discard(self, close_local=False)
        elif self.lingering:
            self.lingering = False
            self.tunnel.on_stream_ended(self)

    def _write_eof(self) -> None:
        """The peer is done sending (PEER_DONE): half-close the local socket after what is
        queued, or close it when this side is done too or cannot half-close."""
        t = self.transport
        if t is None or t.is_closing():
            return
        if t.can_write_eof():
            t.write_eof()
        else:
            # TLS cannot half-close: the peer is done sending, so close after the buffered
            # bytes (a visitor of `kite connect --tls` sees the end of the stream).
            self.finish()

    def on_peer_eof(self, read_closed: bool, write_closed: bool) -> None:
        state = self.state
        if state is _CLOSED:
            return
        if read_closed and write_closed:
            if state is not StreamState.PEER_DONE and self.tunnel.kite_peer:
                # A kite peer sends R before WR when its side ended well: WR alone is a cut.
                self.cut()
                return
            # The peer forgot the stream: finish writing what we have, close, forget it too.
            self.tunnel.discard(self, close_local=True)
            return
        if write_closed:
            self.pause(PAUSE_PEER_CLOSED)  # the peer cannot deliver: stop reading
        if read_closed:
            if state is StreamState.LOCAL_DONE:
                # Both directions are done: close after the buffered bytes are written.
                self.tunnel.discard(self, close_local=True)
            elif state is _OPEN:
                self.state = StreamState.PEER_DONE  # no more data will come
                self._write_eof()

    def close(self) -> bool:
        """Mark the stream closed; False if it was already."""
        if self.state is _CLOSED:
            return False
        self.state = _CLOSED
        return True


class StreamProtocol(asyncio.BufferedProtocol):
    """The local side of a stream: a visitor (relay) or a local server connection (backend).

    Reads land in the tunnel writer's pending buffer (zero copy); the first ``skip`` bytes
    are read into a scratch buffer and dropped (the relay already sent them, peeked, in the
    stream-open chunk; or they are a CONNECT head).
    """

    __slots__ = ("tunnel", "stream", "skip", "_writer", "_slot", "_scratch", "_lent")

    #: A TLS transport (kite._tls) may fill one loan with several records: the stream's
    #: window brakes after the call, as after a plain socket's read of a whole loan.
    read_batch = True

    def __init__(self, tunnel: TunnelProtocol, stream: Stream, skip: int = 0) -> None:
        self.tunnel = tunnel
        self.stream = stream
        self.skip = skip
        self._writer = tunnel.writer
        self._slot = stream.slot
        self._scratch: Optional[bytearray] = None
        self._lent = 0  # size of the latest buffer lent for a read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        limits = self.tunnel.limits
        if limits is not None:
            limits.opened()
        stream = self.stream
        if stream.state is _CLOSED:
            if stream.pending:
                self._deliver_late(transport)  # it ended well before its local side came
                return
            # Cut before its local side came (discard dropped what was pending: None), or
            # ended well with nothing for it.
            page = self.tunnel.cut_page(stream) if stream.pending is None else None
            if page is not None:
                self._deliver_late(transport, [page])
            else:
                reset(transport)
            return
        self.stream.attach_transport(transport)  # type: ignore[arg-type]

    def _deliver_late(self, transport: asyncio.BaseTransport,
                      pending: Optional[list] = None) -> None:
        """A stream that ended before its local socket came (the peer answered and sent its
        EOFs first: a quick error page; or ``pending``, the page of a cut): write what it
        left, then end with FIN.  The ``skip`` bytes, already in the socket, are read first:
        closing a socket with unread input would reset it and lose the answer."""
        if pending is None:
            pending = self.stream.pending
        self.stream.pending = None
        sock = transport.get_extra_info("socket")
        if self.skip and sock is not None:
            try:
                os.read(sock.fileno(), self.skip)
            except (OSError, ValueError, AttributeError):
                pass
        for data in pending or ():
            transport.write(data)  # type: ignore[attr-defined]
        close_gracefully(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.skip:
            if self._scratch is None:
                self._scratch = bytearray(min(self.skip, _SCRATCH))
            return memoryview(self._scratch)[: self.skip]
        writer = self._writer
        # The event loop's hint (libuv: 64 KiB) while the stream's reads fit; a whole
        # quantum (on a fast uplink a kite peer's chunk, 128 KiB) once a read filled its
        # buffer: a bulk stream's reads, chunks and TLS writes are half as many, while a
        # small answer does not reserve room past glibc's mmap threshold in the writer.
        quantum = self.tunnel.send_queue.quantum
        if sizehint <= 0 or sizehint > quantum or self.stream.in_burst:
            sizehint = quantum
        if writer.pending >= self.tunnel.flush_at:
            # libuv reads a busy socket up to 32 times per loop iteration: without this the
            # corked buffer grows to megabytes before the tick's flush (large reallocations,
            # mremap/munmap in the profile, one huge TLS write).  Flushing here, before the
            # next loan, and not in buffer_updated (where uvloop still holds the previous
            # view) lets the writer hand its buffer over without a copy.  Small reads from
            # many streams are still coalesced into one flush per tick.
            self.tunnel.flush_now()
        buf = writer.get_data_buffer(self._slot, sizehint)
        self._lent = len(buf)
        return buf

    def buffer_updated(self, nbytes: int) -> None:
        if self.skip:
            self.skip -= nbytes
            if not self.skip:
                self._scratch = None
            return
        tunnel = self.tunnel
        tunnel.writer.data_buffer_updated(nbytes)
        if not tunnel.flush_scheduled:
            tunnel.schedule_flush()
        stream = self.stream
        sent = self._slot.sent
        if not stream.in_burst:
            stream.burst_from = sent - nbytes
        stream.in_burst = nbytes >= self._lent  # a short read: the local socket is drained
        if sent >= stream.send_window.clear_below and stream.send_window.blocked(sent):
            stream.pause(PAUSE_WINDOW)
        elif tunnel.write_paused:
            stream.pause(PAUSE_TUNNEL)
        elif sent - stream.burst_from > tunnel.send_queue.quantum and tunnel.queue_full():
            tunnel.hold(stream)

    def eof_received(self) -> bool:
        # True keeps the write side open: the peer may still send.
        return self.stream.on_local_eof()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        limits = self.tunnel.limits
        if limits is not None:
            limits.lost(self.stream)
        self.stream.on_local_lost()

    def pause_writing(self) -> None:
        self.stream.on_local_full(True)

    def resume_writing(self) -> None:
        self.stream.on_local_full(False)


class TunnelProtocol(asyncio.BufferedProtocol):
    """A tunnel in chunk mode; subclasses do the handshake and handle side-specific events.

    Subclasses call :meth:`start_chunks` once the handshake is done, and override
    :meth:`on_stream_open`, :meth:`on_kite_message`, :meth:`on_closed`.
    """

    #: seconds of silence before we send PING; None disables keepalive
    keepalive: Optional[float] = 30.0
    #: seconds to wait for any byte after a PING before declaring the tunnel dead
    ping_timeout: float = 10.0
    #: process-wide limits on the streams' local connections (the relay sets them)
    limits: Optional[StreamLimits] = None
    #: the local sockets are HTTP visitors: a cut stream whose response has not started
    #: gets a 502 page instead of a reset (the relay)
    error_pages = False
    #: SO_RCVBUF of every local socket, or None: the kernel's autotuning (see
    #: :meth:`Stream.attach_transport`; the backend sets it, kite.backend.connector)
    local_rcvbuf: Optional[int] = None

    def __init__(self, *, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.transport: Optional[asyncio.Transport] = None
        self.demux: Optional[Demux] = None
        self.writer = ChunkWriter()
        self.flush_at = FLUSH_NOW
        #: the process's busy poller (kite.net.busypoll), poked after each write; None: off
        self.busy: Optional[BusyPoll] = None
        self.streams: dict[int, Stream] = {}
        self.flush_scheduled = False
        self.write_paused = False
        self.closed = False
        self.kite_peer = False  # the peer is kite (KiteFlow): big windows, sparse acks
        # A TLS transport (kite._tls) may fill one loan with several records for a kite
        # peer, whose streams keep kite's window.  A pagekite.py peer keeps none: the brake
        # for it stops reading the tunnel when a local socket is full, and acts between two
        # calls, so each call brings one record.  (An attribute: read at every TLS read.)
        self.read_batch = False
        self.policy = WindowPolicy.fixed(PAGEKITE_WINDOW)
        self.ack_step = PAGEKITE_ACK_STEP
        self.buffer_limit = 2 * PAGEKITE_WINDOW + 256 * 1024
        self.frame_budget: Optional[FrameBudget] = None  # set for pagekite.py peers
        self._chunks_flushed = 0
        self.last_rx = time.monotonic()
        self._ping_sent: Optional[float] = None
        self._keepalive_handle: Optional[asyncio.TimerHandle] = None
        self._idle_handle: Optional[asyncio.TimerHandle] = None
        self.name = "tunnel"
        self.close_reason = ""
        self._hs_buf = bytearray()
        self._hs_scratch: Optional[memoryview] = None
        self._in_demux = False
        self.pings_sent = self.pings_received = self.pongs_received = 0
        self.closed_future: asyncio.Future = self.loop.create_future()
        self.read_stopped = False  # reading paused: the peer does not take what we queue
        self._deadline: Optional[asyncio.TimerHandle] = None
        self.send_queue = SendQueue()  # the scheduler's target for the queue below it
        self.held: deque[Stream] = deque()  # streams held by the scheduler, in turn order
        self.queued = 0  # bytes below the scheduler at the latest look
        self._pace_handle: Optional[asyncio.TimerHandle] = None
        self._tcp: Optional[socket.socket] = None  # the tunnel's TCP socket ...
        self._fd = -1  # ... and its descriptor, for its queue's size (ioctl)
        self.bytes_out = 0  # bytes handed to the transport in chunk mode
        self._unsent_seen = 0  # kernel_unsent() at the latest look ...
        self._out_seen = 0  # ... and bytes_out then
        self._lowat = 0  # TCP_NOTSENT_LOWAT in force (0: none)

    @property
    def window(self) -> int:
        """The window each stream of this tunnel gets now (see kite.proto.flow)."""
        return self.policy.window

    # -- transport callbacks ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_nodelay(transport)
        # Bigger than asyncio's 64 KiB default: the tunnel carries many streams at once.
        transport.set_write_buffer_limits(  # type: ignore[attr-defined]
            high=TUNNEL_HIGH_WATER, low=TUNNEL_LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            self._tcp = sock
            try:
                self._fd = sock.fileno()
            except (OSError, AttributeError, ValueError):
                self._fd = -1
            self._set_lowat(QUEUE_MIN)

    # -- the scheduler: the queue below it, held streams (see "Scheduling" above) --------------
    def _set_lowat(self, target: int) -> None:
        """TCP_NOTSENT_LOWAT for ``target``; changed only when off by more than twice."""
        want = 2 * target + LOWAT_SLACK
        if self._tcp is None or self._lowat <= want <= 2 * self._lowat:
            return
        try:
            self._tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, want)
            self._lowat = want
        except (OSError, AttributeError, ValueError):
            self._tcp = None

    def kernel_unsent(self) -> int:
        """The kernel's unsent bytes (SIOCOUTQNSD); 0 without a TCP socket.  Feeds the
        target's rate estimate with the bytes that have left: those handed to the
        transport less what it and the kernel still hold (SIOCOUTQ; counted on the wire,
        TLS records and all, so off by a fraction of a percent of the queue)."""
        fd = self._fd
        if fd < 0:
            return 0
        try:
            (outq,) = struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, _INT))
            (unsent,) = struct.unpack("i", fcntl.ioctl(fd, _SIOCOUTQNSD, _INT))
        except OSError:
            self._fd = -1  # not a TCP socket after all: user-space queues only
            return 0
        gone = self.bytes_out - outq
        if self.transport is not None:
            gone -= self.transport.get_write_buffer_size()
        self._unsent_seen, self._out_seen = unsent, self.bytes_out
        sq = self.send_queue
        target = sq.target
        sq.sample(self.loop.time(), gone, unsent)
        if sq.target != target:
            self._set_lowat(sq.target)
        return unsent

    def queue_full(self) -> bool:
        """True while the bytes below the scheduler (writer, TLS layer, transport, kernel)
        reach the target; sets :attr:`queued`.

        The kernel is asked only when what it may hold could fill the queue: at most what
        it held at the latest look and all handed over since - so on a fast link once per
        target's worth of bytes, not once per read."""
        transport = self.transport
        queued = self.writer.pending
        if transport is not None:
            queued += transport.get_write_buffer_size()
        target = self.send_queue.target
        if queued < target:
            kernel = self._unsent_seen + self.bytes_out - self._out_seen
            if queued + kernel >= target:
                kernel = self.kernel_unsent()
            queued += kernel
        self.queued = queued
        return queued >= target

    def hold(self, stream: Stream) -> None:
        """Hold ``stream`` until its turn comes (it read while the queue was full)."""
        if stream.paused & PAUSE_QUEUE:
            return
        stream.pause(PAUSE_QUEUE)
        self.held.append(stream)
        if self._pace_handle is None and not self.closed:
            self._pace_handle = self.loop.call_later(self.send_queue.delay(self.queued),
                                                     self.pace_tick)

    def pace_tick(self) -> None:
        """Give held streams their turns, one quantum each, as far as the queue has room;
        look again when it has drained to about half the target."""
        self._pace_handle = None
        if self.closed:
            return
        transport = self.transport
        queued = self.writer.pending + self.kernel_unsent()
        if transport is not None:
            queued += transport.get_write_buffer_size()
        self.queued = queued
        sq = self.send_queue
        room = sq.target - queued
        held = self.held
        while held and room > 0:
            stream = held.popleft()
            if stream.state is _CLOSED:
                continue
            room -= sq.quantum
            stream.burst_from = stream.slot.sent - sq.quantum  # its next read is looked at
            stream.in_burst = True
            stream.resume(PAUSE_QUEUE)
        if held:
            self._pace_handle = self.loop.call_later(sq.delay(queued), self.pace_tick)

    # During the handshake, bytes go to a small buffer; in chunk mode, to the demux.
    def get_buffer(self, sizehint: int) -> memoryview:
        demux = self.demux
        if demux is not None:
            return demux.get_buffer(sizehint)
        if self._hs_scratch is None:
            self._hs_scratch = memoryview(bytearray(MAX_HEAD))
        return self._hs_scratch

    def buffer_updated(self, nbytes: int) -> None:
        self.last_rx = time.monotonic()
        demux = self.demux
        if demux is not None:
            self._in_demux = True
            try:
                demux.buffer_updated(nbytes)
            except RemoteProtocolError as exc:
                self._in_demux = False
                self.abort(f"protocol error from peer: {exc}")
            except KiteError as exc:
                self._in_demux = False
                self.abort(f"internal error: {exc}")
            finally:
                self._in_demux = False
            return
        # Handshake: a few hundred bytes, once per tunnel; copying them is fine.
        assert self._hs_scratch is not None
        self.feed_handshake(self._hs_scratch[:nbytes])

    def feed_handshake(self, data) -> None:
        """Bytes of the handshake (read here, or by the protocol that had the transport)."""
        self._hs_buf += data
        try:
            self.handshake_data(self._hs_buf)
        except KiteError as exc:
            self.abort(str(exc))

    def handshake_data(self, buf: bytearray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def eof_received(self) -> bool:
        self.close(f"{self.name}: peer closed the tunnel")
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        reason = self.close_reason or (f"connection lost: {exc}" if exc else "connection closed")
        self._teardown(reason)

    def pause_writing(self) -> None:
        self.write_paused = True
        self._check_queue()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.read_stopped:
            self.read_stopped = False
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()
        for stream in list(self.streams.values()):
            stream.resume(PAUSE_TUNNEL)

    # -- what the peer does not take ----------------------------------------------------------
    def queue_limit(self) -> int:
        """The most this tunnel queues towards its peer before it stops reading from it.

        What a tunnel queues is bounded by flow control - each stream sends at most its
        window unacknowledged - plus control chunks, which the peer causes (a PONG per
        PING, an EOF per chunk for an unknown stream).  A peer that sends and does not read
        would make the latter grow without end: past this limit the tunnel stops reading
        from it, so it causes nothing more; if it still has not read after
        WRITE_DEADLINE seconds, or the queue passes twice the limit, it is cut off.  A peer
        that reads never meets the limit: the windows keep the queue below it.
        """
        if self.kite_peer:
            windows = max(KITE_TUNNEL_BUDGET, len(self.streams) * KITE_MIN_WINDOW)
            return TUNNEL_HIGH_WATER + windows + CONTROL_SLACK
        return TUNNEL_HIGH_WATER + len(self.streams) * PAGEKITE_WINDOW + PAGEKITE_SLACK

    def _check_queue(self) -> None:
        """Called above the high-water mark: stop reading past queue_limit, abort past twice."""
        transport = self.transport
        if transport is None or self.closed:
            return
        queued = transport.get_write_buffer_size()
        limit = self.queue_limit()
        if queued <= limit:
            return
        if queued > 2 * limit:
            self.abort(f"peer does not read: {queued} bytes queued (limit {limit})")
        elif not self.read_stopped:
            self.read_stopped = True
            transport.pause_reading()
            log.info("%s: peer does not read (%d bytes queued): reading paused", self.name, queued)
            self._deadline = self.loop.call_later(WRITE_DEADLINE, self._write_deadline)

    def _write_deadline(self) -> None:
        self._deadline = None
        if self.read_stopped:
            self.abort(f"peer took nothing for {WRITE_DEADLINE:g} s with "
                       f"{self.transport.get_write_buffer_size() if self.transport else 0} "
                       "bytes queued")

    # -- chunk mode -------------------------------------------------------------------------
    def start_chunks(self, leftover: bytes = b"", *, kite_peer: bool = False,
                     inflate: bool = True) -> None:
        """Switch to chunk mode; ``leftover`` are bytes that followed the handshake."""
        self.kite_peer = self.read_batch = kite_peer
        self.send_queue = SendQueue(KITE_MAX_PAYLOAD if kite_peer else PAGEKITE_MAX_PAYLOAD)
        if kite_peer:
            self.writer = ChunkWriter(max_payload=KITE_MAX_PAYLOAD)
            self.flush_at = KITE_FLUSH_NOW
            self.policy = WindowPolicy(KITE_MIN_WINDOW, KITE_MAX_WINDOW, KITE_TUNNEL_BUDGET,
                                       rate_floor=KITE_RATE_FLOOR)
            self.policy.set_streams(len(self.streams))
            self.ack_step = KITE_ACK_STEP
            self.buffer_limit = 2 * KITE_MAX_WINDOW + 256 * 1024
        else:
            # pagekite.py reads 16256 bytes per chunk and chokes on bursts of tiny frames.
            self.writer = ChunkWriter(max_payload=PAGEKITE_MAX_PAYLOAD)
            self._chunks_flushed = 0
            self.frame_budget = FrameBudget(
                tls=self.transport is not None
                and self.transport.get_extra_info("ssl_object") is not None)
        self.demux = Demux(
            self._on_chunk,
            on_corrupt_chunk=self._on_corrupt_chunk,
            inflater=ZInflater() if inflate else None,
        )
        self._hs_buf = bytearray()
        self._hs_scratch = None
        if self.keepalive:
            self._keepalive_handle = self.loop.call_later(self.keepalive / 8,
                                                          self._keepalive_tick)
        if self.limits is not None and self.limits.idle_timeout:
            self._idle_handle = self.loop.call_later(self.limits.idle_timeout / IDLE_CHECKS,
                                                     self._idle_tick)
        if leftover:
            try:
                self.demux.feed_data(leftover)
            except RemoteProtocolError as exc:
                self.abort(f"protocol error from peer: {exc}")

    def schedule_flush(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def flush_now(self) -> None:
        """Flush at once (the scheduled flush, if any, then finds less or nothing)."""
        writer = self.writer
        writer.cancel_data_buffer()
        data = writer.flush()
        if data is not None and self.transport is not None and not self.closed:
            self.bytes_out += len(data)
            self.transport.write(data)
            if self.busy is not None:
                self.busy.poke()

    def _flush(self) -> None:
        self.flush_scheduled = False
        writer = self.writer
        writer.cancel_data_buffer()
        chunks = writer.chunks_written - self._chunks_flushed
        self._chunks_flushed = writer.chunks_written
        data = writer.flush()
        if data is not None and self.transport is not None and not self.closed:
            self.bytes_out += len(data)
            budget = self.frame_budget
            if budget is None:
                self.transport.write(data)
            else:  # pagekite.py: at most 150 chunks per read (kite.proto.framebudget)
                for piece in budget.split(data, chunks, self.loop.time(),
                                          not self.transport.get_write_buffer_size()):
                    self.transport.write(piece)
            if self.write_paused:
                self._check_queue()
            if self.busy is not None:
                self.busy.poke()  # the peer's answer may follow at once

    def open_stream(self, sid: int, proto: str, host: str, port: int, rip: str, rport: int,
                    *, peer: str, payload: bytes = b"", rtls: bool = False) -> Stream:
        """A new stream ``sid`` towards the peer (the relay's side): added, then announced
        with its stream-open chunk (``payload``: its first bytes; ``rtls``: TLS was
        terminated for it) and its window."""
        stream = Stream(self, sid, proto=proto, host=host, port=port, peer=peer)
        self.add_stream(stream, announce=False)
        header, _ = control.build_stream_open(sid, proto, host, port, rip, rport, rtls=rtls)
        self.write_chunk(header, payload)
        self.announce_window(stream)
        return stream

    def write_chunk(self, header_block: bytes, payload: bytes = b"") -> None:
        w = self.writer
        w.cancel_data_buffer()
        w.write_chunk(header_block, payload)
        if not self.flush_scheduled:
            self.schedule_flush()

    def send_skb(self, sid: int, kib: int) -> None:
        self.write_chunk(*control.build_skb(sid, kib))

    def send_eof(self, sid: int, flags: str) -> None:
        self.write_chunk(*control.build_eof(
            sid, read_closed="R" in flags, write_closed="W" in flags))

    def _on_corrupt_chunk(self, exc: Exception) -> None:
        log.warning("%s: dropped a ZChunk that did not inflate (%s); sent ZRST", self.name, exc)
        self.write_chunk(*control.build_zrst())

    def _on_chunk(self, headers, payload: bytes) -> None:
        for event in control.parse_chunk(headers, payload):
            self.handle_event(event)

    def handle_event(self, event) -> None:
        kind = type(event)
        if kind is control.Skb:
            stream = self.streams.get(event.sid)
            if stream is not None:
                stream.on_skb(event.kib)
        elif kind is control.Eof:
            stream = self.streams.get(event.sid)
            if stream is not None:
                stream.on_peer_eof(event.read_closed, event.write_closed)
        elif kind is control.Ping:
            self.pings_received += 1
            self.write_chunk(*control.build_pong(event.value))
        elif kind is control.Pong:
            self.pongs_received += 1
            self._ping_sent = None
        elif kind is control.Data:
            # Data for a stream we do not know: tell the peer to forget it (§5.2).
            if event.sid not in self.streams:
                self.send_eof(event.sid, "WR")
        elif kind is control.StreamOpen:
            stream = self.streams.get(event.sid)
            if stream is None:
                self.on_stream_open(event)
            elif event.payload:  # pagekite.py treats it as data for a known stream
                stream.slot.sink(memoryview(event.payload))
        elif kind is control.ZReset:
            self.on_zreset()
        elif kind in (control.KiteRequest, control.KiteReply):
            self.on_kite_message(event)
        # Noop and Quota need nothing here.

    def on_stream_open(self, event) -> None:
        """A peer tried to open a stream; only the relay opens streams (backend overrides)."""
        self.send_eof(event.sid, "WR")

    def on_kite_message(self, event) -> None:
        log.debug("%s: ignoring in-band kite message", self.name)

    def on_zreset(self) -> None:
        """The peer could not inflate our data: we never compress, so nothing to reset."""

    # -- streams ------------------------------------------------------------------------------
    def add_stream(self, stream: Stream, *, announce: bool = True) -> None:
        """Track ``stream``; ``announce=False`` when the peer does not know it yet (the relay
        sends the stream-open chunk first, then calls :meth:`announce_window`)."""
        self.streams[stream.sid] = stream
        self.policy.set_streams(len(self.streams))
        self.demux.attach(stream.slot)  # type: ignore[union-attr]
        if announce:
            self.announce_window(stream)

    def announce_window(self, stream: Stream) -> None:
        if not self.kite_peer:
            # pagekite.py applies its window only once a first SKB arrived: without this
            # a visitor that never reads would let it send without limit.
            self.send_skb(stream.sid, 0)

    def discard(self, stream: Stream, *, close_local: bool, send_eof: bool = True) -> None:
        """Forget ``stream``: one EOF WR to the peer, and close the local socket if asked."""
        if not stream.close():
            return
        self.streams.pop(stream.sid, None)
        self.policy.set_streams(len(self.streams))
        if self.demux is not None:
            self.demux.detach(stream.sid)
        if send_eof and not self.closed:
            self.send_eof(stream.sid, "WR")
        t = stream.transport
        if t is None and not close_local:
            stream.pending = None  # cut before its local side came: that side is reset
        if close_local and t is not None and not t.is_closing():
            close_gracefully(t)  # writes what is buffered, then closes (FIN)
            if t.get_write_buffer_size():
                # The stream ends for its observers (on_stream_ended) when its local side
                # has taken the last byte: a slow visitor of a response the relay holds
                # whole is still a visitor.  on_local_lost ends it.
                stream.lingering = True
                if self.limits is not None:
                    self.limits.watch_closing(stream)
        self.on_stream_closed(stream)
        if not stream.lingering:
            self.on_stream_ended(stream)

    def cut_page(self, stream: Stream) -> Optional[bytes]:
        """What the local side of a cut stream gets instead of a reset: on the relay, an
        HTTP visitor whose response has not started gets a 502 page; None: a reset."""
        if self.error_pages and not stream.delivered and stream.proto in HTTP_PROTOS:
            return http_error(502, stream.host)
        return None

    def cut_local(self, stream: Stream, transport: asyncio.Transport) -> None:
        """Reset the local socket of a cut stream, or answer it with :meth:`cut_page`."""
        page = self.cut_page(stream)
        if page is not None:
            transport.write(page)
            close_gracefully(transport)
        else:
            reset(transport)

    def on_stream_closed(self, stream: Stream) -> None:
        """``stream`` left the tunnel (its id may be reused from now on)."""

    def on_stream_ended(self, stream: Stream) -> None:
        """``stream`` is over for its observers: closed, and its local side has taken its
        last byte (or is gone)."""

    # -- idle streams -------------------------------------------------------------------------
    def _idle_tick(self) -> None:
        """Close the streams that moved no byte either way for ``limits.idle_timeout`` s
        (one coarse timer per tunnel; nothing is counted per chunk)."""
        limits = self.limits
        if self.closed or limits is None or not limits.idle_timeout:
            return
        timeout = limits.idle_timeout
        now = self.loop.time()
        for stream in list(self.streams.values()):
            mark = stream.activity()
            if mark != stream.idle_mark:
                stream.idle_mark = mark
                stream.idle_since = now
            elif now - stream.idle_since >= timeout:
                limits.idle_closed += 1
                stream.close_idle(now - stream.idle_since)
        self._idle_handle = self.loop.call_later(timeout / IDLE_CHECKS, self._idle_tick)

    # -- keepalive ----------------------------------------------------------------------------
    def request_ping(self) -> None:
        """PING now; if nothing comes back within ping_timeout the tunnel is closed."""
        if self.closed or self.demux is None or self._ping_sent is not None:
            return
        self._ping_sent = time.monotonic()
        self.pings_sent += 1
        self.write_chunk(*control.build_ping(time.time()))

    def _keepalive_tick(self) -> None:
        """Detect a dead tunnel within ``keepalive`` seconds.

        After ``keepalive / 2`` s without a received byte we PING; if nothing at all arrives
        within ``min(ping_timeout, keepalive / 2)`` s after that, the tunnel is dead: it is
        aborted and its streams are closed (the backend then reconnects).
        """
        if self.closed or not self.keepalive:
            return
        now = time.monotonic()
        half = self.keepalive / 2
        if self._ping_sent is not None and self.last_rx < self._ping_sent:
            if now - self._ping_sent >= min(self.ping_timeout, half):
                self.abort(f"no answer to PING within {min(self.ping_timeout, half):g} s: "
                           "tunnel is dead")
                return
        elif now - self.last_rx >= half:
            self._ping_sent = now
            self.pings_sent += 1
            self.write_chunk(*control.build_ping(time.time()))
        else:
            self._ping_sent = None
        self._keepalive_handle = self.loop.call_later(self.keepalive / 8, self._keepalive_tick)

    # -- closing ------------------------------------------------------------------------------
    def close(self, reason: str = "") -> None:
        if self.closed:
            return
        if self._in_demux:
            # Closing a TLS transport may read (and so call get_buffer) re-entrantly: close
            # once the demux has returned.
            self.close_reason = self.close_reason or reason
            self.loop.call_soon(self.close, reason)
            return
        self.close_reason = self.close_reason or reason
        transport = self.transport
        if transport is not None:
            self._flush()
            transport.close()
            if transport.get_write_buffer_size():
                # A peer that never takes the last bytes must not keep them alive.
                self.loop.call_later(CLOSE_DEADLINE, transport.abort)
        self._teardown(self.close_reason)

    def abort(self, reason: str) -> None:
        if self.closed:
            return
        if self._in_demux:
            self.close_reason = self.close_reason or reason
            self.loop.call_soon(self.abort, reason)
            return
        self.close_reason = self.close_reason or reason
        log.warning("%s: closing: %s", self.name, reason)
        if self.transport is not None:
            self.transport.abort()
        self._teardown(reason)

    def _teardown(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        if self._pace_handle is not None:
            self._pace_handle.cancel()
            self._pace_handle = None
        self.held.clear()
        for stream in list(self.streams.values()):
            stream.close()
            t = stream.transport
            if t is not None and not t.is_closing():
                # The far side is gone: reset, so that a cut-off transfer is seen as an
                # error by the visitor, never as a clean end (no silent truncation).
                self.cut_local(stream, t)
            self.on_stream_closed(stream)
            self.on_stream_ended(stream)
        self.streams.clear()
        self.on_closed(reason)
        if not self.closed_future.done():
            self.closed_future.set_result(reason)

    def on_closed(self, reason: str) -> None:
        pass
