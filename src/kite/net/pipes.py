"""Byte pipes: two-way relaying between transports, stdio and sockets, with backpressure.

* :class:`PipeEnd` is one side of a two-way relay over an asyncio transport; its ``peer``
  is the other side (another PipeEnd, or a :class:`StdioEnd`).  Bytes read from one side are
  written to the other; when a side's write buffer passes :data:`HIGH_WATER` the other side
  stops reading until it is back under :data:`LOW_WATER`.
* :class:`StdioEnd` is a pair of file descriptors (stdin, stdout) as such a peer, copying
  (the portable path: terminals, files, TLS connections).
* :func:`transport_pair` is an in-memory connection: two :class:`MemoryTransport` objects,
  what one end writes its peer's protocol reads, with the write-buffer marks, pause and
  resume, half-close (``write_eof``), close and reset (``abort``) of a TCP connection.  It
  joins two protocols written for sockets inside one process (the relay's fleet link).
* :func:`bridge_splice` joins a connected socket and two descriptors with two
  :class:`SplicePump` objects: on Linux, with pipes or sockets on both descriptors
  (:func:`splice_usable`; what ssh gives a ProxyCommand), each direction moves through a
  kernel pipe with ``os.splice`` and the bytes never enter user space.

Ends (both ways): the input's EOF half-closes the connection (``shutdown(SHUT_WR)``) and the
bridge keeps reading; the connection's EOF ends the bridge once the output has taken every
byte.  Over TLS a half-close cannot be sent (asyncio's TLS transports do not support
``write_eof``), so an EOF towards TLS is only noted there.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import socket
import stat
import sys

from .sockets import reset, set_nodelay

log = logging.getLogger("kite.net")

__all__ = [
    "HIGH_WATER",
    "LOW_WATER",
    "MemoryTransport",
    "READ_SIZE",
    "SPLICE_PIPE_SIZE",
    "TAKE_MIN",
    "PipeEnd",
    "SplicePump",
    "StdioEnd",
    "bridge_splice",
    "nonblocking_ok",
    "splice_usable",
    "transport_pair",
]

#: Write-buffer marks of every transport and of stdout: above HIGH_WATER the side feeding
#: it stops reading, below LOW_WATER it resumes.  1 MiB keeps a 1 Gbit/s x 10 ms link full.
HIGH_WATER = 1 << 20
LOW_WATER = 256 << 10
#: Bytes per read from stdin (and per splice): large reads, few syscalls.
READ_SIZE = 256 << 10
#: Kernel pipe size requested for splicing (F_SETPIPE_SZ; the default is 64 KiB).
SPLICE_PIPE_SIZE = 1 << 20

#: Writes to a MemoryTransport this long or longer go to a ``take_data`` protocol as they are.
TAKE_MIN = 16 * 1024

_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Python 3.10+ has the name; Linux only)


class PipeEnd(asyncio.Protocol):
    """One side of a two-way byte relay over an asyncio transport.

    ``peer`` is the other side: another PipeEnd or a :class:`StdioEnd`, anything with
    ``send``, ``send_eof``, ``pause_reading``, ``resume_reading``, ``close`` and ``read_eof``.
    Backpressure: when this transport's write buffer passes :data:`HIGH_WATER` asyncio calls
    ``pause_writing`` and the peer stops reading until ``resume_writing``.  The pair closes
    when both sides have sent EOF, or when either side is lost.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: PipeEnd | StdioEnd | None = None  # the owner binds it before reading starts
        self.read_eof = False  # our transport's far side sent EOF
        self.reading_paused = False  # the peer asked us to stop reading
        self.lost = False
        self.exc: BaseException | None = None
        self.bytes_in = 0  # read from our transport
        self.tls = False  # asyncio's TLS transports close on EOF whatever we answer

    # -- asyncio ----------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.tls = transport.get_extra_info("ssl_object") is not None
        set_nodelay(transport)
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        if self.reading_paused:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        peer = self.peer
        assert peer is not None
        peer.send(data)

    def eof_received(self) -> bool:
        self.read_eof = True
        peer = self.peer
        if peer is not None:
            peer.send_eof()
            if peer.read_eof:  # both directions are finished
                peer.close()
                return False
        # Keep writing: the other direction may still be open (not possible over TLS, and
        # asyncio warns if a TLS transport's protocol asks for it).
        return not self.tls

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self.exc = exc
        peer = self.peer
        if peer is None:
            return
        if exc is not None and isinstance(peer, PipeEnd):
            peer.reset()  # cut here (reset, error): cut there too, never a clean end
        else:
            peer.close()

    # -- called by the peer -----------------------------------------------------------------
    def send(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    def send_eof(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if t.can_write_eof():
            t.write_eof()  # after the buffered bytes: asyncio defers the shutdown
        # else TLS: asyncio cannot send a half-close; the connection closes with the pair.

    def pause_reading(self) -> None:
        if not self.reading_paused:
            self.reading_paused = True
            t = self.transport
            if t is not None and not t.is_closing():
                t.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            t = self.transport
            if t is not None and not t.is_closing():
                t.resume_reading()

    def close(self) -> None:
        """The peer is gone: finish writing what is buffered, then close."""
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()

    def reset(self) -> None:
        """The peer was cut: reset this connection (kite.net.sockets.reset)."""
        t = self.transport
        if t is not None:
            reset(t)


# -- in memory ------------------------------------------------------------------------------
class MemoryTransport(asyncio.Transport):
    """One end of :func:`transport_pair`.

    :meth:`write` hands the bytes to the other end's protocol at once while that end reads
    (``get_buffer`` and ``buffer_updated`` for a BufferedProtocol: one copy; a write of
    :data:`TAKE_MIN` bytes or more to a protocol with ``take_data(data)`` as it is: it may
    keep them).  While it has paused reading (or has no protocol yet) they queue here, and
    this end's protocol gets ``pause_writing`` above the high mark, ``resume_writing``
    below the low mark.  An EOF (``write_eof``, ``close``) reaches the other end after the
    queued bytes.  As with TCP, ``abort`` - and a close while bytes for this end wait
    unread - resets: the queued bytes are dropped and the other end's protocol loses its
    connection with ConnectionResetError.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, extra: dict) -> None:
        super().__init__(extra)
        self._loop = loop
        self._protocol: asyncio.BaseProtocol | None = None
        self._take = None  # the protocol's take_data, if it has one
        self.other: MemoryTransport = self
        self._queue: collections.deque = collections.deque()  # written, not yet read there
        self._queued = 0
        self._high, self._low = 64 * 1024, 16 * 1024
        self._write_paused = False  # our protocol was told pause_writing
        self._reading = True  # our protocol takes bytes (not paused)
        self._eof_out = False  # write_eof or close: an EOF follows the queued bytes
        self._eof_in = False  # the other end's EOF reached our protocol
        self._closing = False
        self._lost = False
        self._drain_scheduled = False

    # -- asyncio.Transport ------------------------------------------------------------------
    def get_protocol(self):
        return self._protocol

    def set_protocol(self, protocol) -> None:
        self._protocol = protocol
        self._take = getattr(protocol, "take_data", None)
        self.other._schedule_drain()  # bytes that waited for a protocol

    def is_closing(self) -> bool:
        return self._closing

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if not self._reading:
            self._reading = True
            self.other._schedule_drain()

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self._high = 64 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low

    def get_write_buffer_size(self) -> int:
        return self._queued

    def get_write_buffer_limits(self) -> tuple:
        return self._low, self._high

    def can_write_eof(self) -> bool:
        return True

    def write(self, data) -> None:
        if self._eof_out or self._lost or not data:
            return
        other = self.other
        if other._lost:
            self.abort()  # nobody reads there any more: a write to a closed socket
            return
        if not self._queue and other._takes():
            take = other._take
            if take is not None and len(data) >= TAKE_MIN:
                take(data)
                return
            data = other._feed(data)
            if not data:
                return
        elif not isinstance(data, bytes):
            # A copy: a kept slice would pin the writer's receive buffer (kite's demux then
            # allocates a new one for every read while the queue lasts).
            data = bytes(data)
        self._queue.append(data)
        self._queued += len(data)
        if self._queued > self._high and not self._write_paused:
            self._write_paused = True
            self._call("pause_writing")

    def write_eof(self) -> None:
        if self._eof_out or self._lost:
            return
        self._eof_out = True
        self._drain()

    def close(self) -> None:
        if self._closing or self._lost:
            return
        self._closing = True
        self._reading = False
        self.write_eof()
        if not self._queue or self.other._lost:
            self._finish(None)

    def abort(self) -> None:
        if self._lost:
            return
        self._closing = True
        self._queue.clear()
        self._queued = 0
        self.other._reset()
        self._finish(None)

    def _reset(self) -> None:
        """The other end reset the connection: what this end queued is dropped."""
        if not self._lost:
            self._queue.clear()
            self._queued = 0
            self._finish(ConnectionResetError("the other end of the connection reset it"))

    # -- between the ends ---------------------------------------------------------------------
    def _takes(self) -> bool:
        """Our protocol reads now (the other end may hand it bytes)."""
        return self._reading and self._protocol is not None and not self._lost

    def _feed(self, data):
        """Give our protocol as much of ``data`` as it takes; returns the rest (a copy)."""
        protocol = self._protocol
        if not isinstance(protocol, asyncio.BufferedProtocol):
            protocol.data_received(bytes(data))  # type: ignore[union-attr]
            return b""
        view = memoryview(data)
        while view and self._takes():
            buf = memoryview(protocol.get_buffer(len(view)))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            protocol.buffer_updated(n)
            view = view[n:]
        return bytes(view)

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled and (self._queue or self._eof_out):
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        """Queued bytes (then the EOF) to the other end while it reads."""
        self._drain_scheduled = False
        other = self.other
        while self._queue and other._takes():
            data = self._queue.popleft()
            n = len(data)
            if other._take is not None and n >= TAKE_MIN:
                other._take(data)
                self._queued -= n
                continue
            rest = other._feed(data)
            if rest:
                self._queue.appendleft(rest)
            self._queued -= n - len(rest)
        if self._write_paused and self._queued <= self._low and not self._lost:
            self._write_paused = False
            self._call("resume_writing")
        if other._lost or other._eof_in:
            if self._closing:  # nobody takes the rest: a closed end is done
                self._finish(None)
            return
        if self._queue or not self._eof_out or other._protocol is None:
            return  # more to come (set_protocol and resume_reading drain again)
        other._eof_in = True
        keep = other._call("eof_received")
        if self._closing:
            self._finish(None)
        if not keep:
            other.close()

    def _call(self, name: str, *args):
        protocol = self._protocol
        if protocol is None:
            return None
        return getattr(protocol, name)(*args)

    def _finish(self, exc: Exception | None) -> None:
        """This end is gone: its protocol loses the connection (soon, as asyncio does)."""
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._reading = False
        if self._protocol is not None:
            self._loop.call_soon(self._protocol.connection_lost, exc)
        other = self.other
        if other._lost:
            return
        if other._queue:
            other._reset()  # bytes this end will never read: a reset, as TCP's close
        elif other._eof_out:
            other._finish(None)  # both directions ended: the other end is done too


def transport_pair(loop: asyncio.AbstractEventLoop, extra_a: dict | None = None,
                   extra_b: dict | None = None) -> tuple:
    """Two joined :class:`MemoryTransport` ends, without protocols yet (``set_protocol``
    then the protocol's ``connection_made``); ``extra_*`` answer ``get_extra_info``."""
    a = MemoryTransport(loop, dict(extra_a or {}))
    b = MemoryTransport(loop, dict(extra_b or {}))
    a.other, b.other = b, a
    return a, b


# -- stdio ------------------------------------------------------------------------------------
def _pollable(fd: int) -> bool:
    """epoll refuses regular files and directories (EPERM): they are always ready."""
    mode = os.fstat(fd).st_mode
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def nonblocking_ok(fd: int) -> bool:
    """O_NONBLOCK is set on the open file description, which a terminal shares with the
    shell: set it only on pipes and sockets (reads happen only when poll says readable)."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


class _FdWatch:
    """Readiness callbacks for one fd; regular files (not pollable) are always ready."""

    __slots__ = ("_handle", "active", "cb", "fd", "loop", "pollable", "writable")

    def __init__(self, loop, fd: int, writable: bool, cb) -> None:
        self.loop = loop
        self.fd = fd
        self.writable = writable
        self.pollable = _pollable(fd)
        self.cb = cb
        self.active = False
        self._handle = None

    def start(self) -> None:
        if self.active:
            return
        self.active = True
        if self.pollable:
            try:
                (self.loop.add_writer if self.writable else self.loop.add_reader)(self.fd, self.cb)
                return
            except PermissionError:  # e.g. /dev/null: epoll says EPERM
                self.pollable = False
        self._handle = self.loop.call_soon(self._tick)

    def _tick(self) -> None:
        self._handle = None
        if self.active:
            self.cb()
            if self.active and self._handle is None:
                self._handle = self.loop.call_soon(self._tick)

    def stop(self) -> None:
        if not self.active:
            return
        self.active = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        elif self.pollable:
            (self.loop.remove_writer if self.writable else self.loop.remove_reader)(self.fd)


class StdioEnd:
    """stdin and stdout as the peer of a :class:`PipeEnd` (the relay connection), copying.

    stdin is read only while the relay transport accepts more (``pause_reading`` from the
    relay's ``pause_writing``); stdout is buffered up to :data:`HIGH_WATER`, above which the
    relay transport stops reading.  ``finished`` resolves to the exit status: 0 after the
    relay's EOF once stdout took every byte (or stdout's reader went away), 1 if the relay
    connection was lost (``error`` then says why).
    """

    def __init__(self, in_fd: int = 0, out_fd: int = 1) -> None:
        self.loop = asyncio.get_running_loop()
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.peer: PipeEnd | None = None  # the connection's end (it binds itself)
        self.read_eof = False  # stdin reached EOF
        self.reading_paused = True  # until start(): nothing goes up before the 200
        self._in = _FdWatch(self.loop, in_fd, False, self._on_readable)
        self._out = _FdWatch(self.loop, out_fd, True, self._on_writable)
        self._buf: collections.deque = collections.deque()  # pending stdout bytes (owned)
        self._buffered = 0
        self._peer_paused = False  # we asked the relay to stop reading (stdout is full)
        self._eof_pending = False  # the relay sent EOF: finish once stdout is drained
        self.finished: asyncio.Future = self.loop.create_future()
        self.error: str | None = None

    def start(self) -> None:
        """The relay said 200: start reading stdin."""
        self.resume_reading()

    # -- stdin -> relay -----------------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            data = os.read(self.in_fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("stdin: %s; treated as EOF", exc)
            data = b""
        peer = self.peer
        assert peer is not None  # bound before start() lets stdin be read
        if not data:
            self.read_eof = True
            self._in.stop()
            peer.send_eof()
            return
        peer.send(data)

    def pause_reading(self) -> None:
        self.reading_paused = True
        self._in.stop()

    def resume_reading(self) -> None:
        self.reading_paused = False
        if not self.read_eof and not self.finished.done():
            self._in.start()

    # -- relay -> stdout ----------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        if self.finished.done():
            return
        if not self._buf:
            try:
                n = os.write(self.out_fd, data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._stdout_failed(exc)
                return
            if n == len(data):
                return
            data = data[n:]
            self._out.start()
        self._buf.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._peer_paused:
            self._peer_paused = True
            assert self.peer is not None  # send() comes from the peer
            self.peer.pause_reading()

    def _on_writable(self) -> None:
        buf = self._buf
        while buf:
            data = buf[0]
            try:
                n = os.write(self.out_fd, data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._stdout_failed(exc)
                return
            self._buffered -= n
            if n < len(data):
                buf[0] = data[n:]
                if self._buffered > LOW_WATER:
                    return
                break
            buf.popleft()
        if not buf:
            self._out.stop()
        if self._peer_paused and self._buffered <= LOW_WATER:
            self._peer_paused = False
            assert self.peer is not None  # _peer_paused: send() called, so the peer is bound
            self.peer.resume_reading()
        if self._eof_pending and not buf:
            self._finish(0)

    def _stdout_failed(self, exc: OSError) -> None:
        # EPIPE: whoever read our stdout (ssh) is gone; there is nobody left to tell.
        log.debug("stdout: %s", exc)
        self._buf.clear()
        self._buffered = 0
        if exc.errno == errno.EPIPE:
            self._finish(0)
        else:
            self._finish(1, f"cannot write to stdout: {exc.strerror or exc}")

    def send_eof(self) -> None:
        """The relay's EOF: finish once stdout has every byte."""
        self._eof_pending = True
        if not self._buf:
            self._finish(0)

    def close(self) -> None:
        """The relay connection is gone (after its EOF: the normal end; before: an error)."""
        if self._eof_pending or self.finished.done():
            return
        exc = getattr(self.peer, "exc", None)
        if exc is None:  # closed cleanly without an EOF first (a TLS close): an end too
            self.send_eof()
            return
        self._buf.clear()
        self._finish(1, f"connection to the relay lost: {getattr(exc, 'strerror', None) or exc}")

    def stop(self) -> None:
        """Stop bridging (asked to stop, or the relay connection is being closed)."""
        self._finish(0)

    def _finish(self, status: int, error: str | None = None) -> None:
        if self.finished.done():
            return
        self._in.stop()
        self._out.stop()
        self.error = error
        self.finished.set_result(status)

def splice_usable(*fds: int) -> bool:
    """``os.splice`` moves bytes between a pipe and a pipe/socket/file without copying them
    to user space (Linux 2.6.17+; Python 3.10+).  Terminals are not spliceable."""
    if not hasattr(os, "splice") or not sys.platform.startswith("linux"):
        return False
    if os.environ.get("KITE_NO_SPLICE", "") not in ("", "0"):
        return False
    for fd in fds:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            return False
    return True


class SplicePump:
    """One direction, ``src`` fd -> ``dst`` fd, through a kernel pipe with ``os.splice``.

    ``on_eof()`` is called once src ended and every byte is in dst; ``on_error(pump, exc,
    side)`` when reading src (side "src") or writing dst ("dst") failed.

    Each round splices what ``src`` has into the pipe, then the pipe into ``dst``; the pipe
    is always drained before ``src`` is read again, so an EAGAIN from the first splice
    means ``src`` is empty (never that the pipe is full), and while ``dst`` pushes back
    ``src`` is not read at all: the backpressure is the kernel's.  EOF on ``src`` is passed
    on with ``on_eof`` once the pipe is empty.
    """

    def __init__(self, loop, src: int, dst: int, on_eof, on_error, name: str) -> None:
        self.loop = loop
        self.src = src
        self.dst = dst
        self.on_eof = on_eof
        self.on_error = on_error
        self.name = name
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            import fcntl

            fcntl.fcntl(self.pipe_w, getattr(fcntl, "F_SETPIPE_SZ", _F_SETPIPE_SZ),
                        SPLICE_PIPE_SIZE)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size for an unprivileged user: keep 64 KiB
        self.in_pipe = 0  # bytes in the kernel pipe, not yet in dst
        self.moved = 0
        self.eof = False
        self.done = False
        self._read = _FdWatch(loop, src, False, self._on_readable)
        self._write = _FdWatch(loop, dst, True, self._on_writable)

    def start(self) -> None:
        self._read.start()

    def _on_readable(self) -> None:
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        for _ in range(16):  # bounded: let the other direction run too
            try:
                n = os.splice(self.src, self.pipe_w, SPLICE_PIPE_SIZE, flags=flags)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail(exc, "src")
                return
            if n == 0:
                self.eof = True
                self._read.stop()
                if not self.in_pipe:
                    self._finish()
                return
            self.in_pipe += n
            if not self._drain():
                return

    def _drain(self) -> bool:
        """Pipe -> dst; False when dst pushed back (src reading is paused until it drains)."""
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        while self.in_pipe:
            try:
                n = os.splice(self.pipe_r, self.dst, self.in_pipe, flags=flags)
            except (BlockingIOError, InterruptedError):
                self._read.stop()
                self._write.start()
                return False
            except OSError as exc:
                self._fail(exc, "dst")
                return False
            self.in_pipe -= n
            self.moved += n
        return True

    def _on_writable(self) -> None:
        if not self._drain():
            return
        self._write.stop()
        if self.eof:
            self._finish()
        elif not self.done:
            self._read.start()

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self.on_eof()

    def _fail(self, exc: OSError, side: str) -> None:
        if not self.done:
            self.done = True
            self.stop()
            self.on_error(self, exc, side)

    def stop(self) -> None:
        self._read.stop()
        self._write.stop()

    def close(self) -> None:
        self.stop()
        for fd in (self.pipe_r, self.pipe_w):
            try:
                os.close(fd)
            except OSError:
                pass


async def bridge_splice(sock: socket.socket, in_fd: int, out_fd: int,
                        stop: asyncio.Event | None) -> tuple:
    """Splice ``in_fd`` -> ``sock`` and ``sock`` -> ``out_fd`` until the far side ends or
    ``stop`` is set: ``(exit status, error message or None)`` as :class:`StdioEnd` has them."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    sfd = sock.fileno()

    def up_eof() -> None:  # stdin EOF, all of it in the socket: half-close
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def down_eof() -> None:  # the relay's EOF, all of it on stdout: done
        if not finished.done():
            finished.set_result((0, None))

    def failed(pump: SplicePump, exc: OSError, side: str) -> None:
        if finished.done():
            return
        if pump is up:
            if side == "src":  # stdin cannot be read: as good as its EOF
                log.debug("stdin: %s; treated as EOF", exc)
                up_eof()
            # else the relay stopped taking bytes (EPIPE/ECONNRESET): the downward
            # direction sees why (EOF or reset) and decides.
            return
        if side == "dst":
            if exc.errno == errno.EPIPE:  # stdout's reader (ssh) left: nobody to tell
                finished.set_result((0, None))
            else:
                finished.set_result((1, f"cannot write to stdout: {exc.strerror or exc}"))
        else:
            finished.set_result((1, f"connection to the relay lost: {exc.strerror or exc}"))

    up = SplicePump(loop, in_fd, sfd, up_eof, failed, "stdin->relay")
    down = SplicePump(loop, sfd, out_fd, down_eof, failed, "relay->stdout")
    waiters = [finished]
    if stop is not None:
        waiters.append(loop.create_task(stop.wait()))
    try:
        up.start()
        down.start()
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if not finished.done():
            return 0, None  # asked to stop
        return finished.result()
    finally:
        for w in waiters[1:]:
            w.cancel()
        up.close()
        down.close()
        log.debug("splice bridge: %d bytes up, %d down", up.moved, down.moved)
