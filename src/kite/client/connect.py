"""``kite connect``: reach a raw kite through the relay with HTTP CONNECT, bridged to stdio.

Theory of operation
-------------------
A raw kite (ssh, IRC, a database) is reached by sending the relay ``CONNECT host:port
HTTP/1.1``; the relay answers ``200 Connection Established`` and from then on the bytes pass
unframed (``403`` means the name is not a kite on that relay, ``503`` that its backend is
offline).  This module holds three pieces, from the bottom up:

1. The handshake, sans-IO: :func:`build_connect_request` makes the request bytes and
   :func:`parse_connect_reply` reads the answer from whatever bytes have arrived (``None``
   until the head is complete; every length is bounded before anything is buffered).
   :func:`refusal_error` turns a non-200 answer into the one-line error the CLI prints.
2. Connecting, two ways that share (1): :class:`RelayEnd` is an asyncio protocol that sends
   the request and, once the relay said 200, relays bytes to its peer (plain or TLS; used by
   ``kite forward`` and by the copying bridge); :func:`open_relay_socket` does the same on a
   bare non-blocking socket and reads the answer with ``MSG_PEEK`` so not one byte past the
   head is consumed -- the socket can then be handed to ``os.splice``.
3. The stdio bridge (``kite connect``, ssh's ProxyCommand): stdin -> relay, relay -> stdout.
   On Linux with a plain relay connection and pipes/sockets on fds 0 and 1 (what ssh gives a
   ProxyCommand), each direction is spliced through a kernel pipe (:class:`SplicePump`): the
   bytes never enter user space.  Otherwise (TLS, a terminal, a file, ``KITE_NO_SPLICE=1``)
   :class:`StdioEnd` copies, with the same backpressure rules as ``kite forward``.

Ends (both ways): stdin EOF half-closes the relay connection (``shutdown(SHUT_WR)``) and
the bridge keeps reading; the relay's EOF ends the bridge once stdout has taken every byte
(exit status 0).  Over TLS a half-close cannot be sent (asyncio's TLS transports do not
support ``write_eof``), so stdin EOF is only noted there.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import socket
import ssl
import stat
import sys
from dataclasses import dataclass
from typing import Optional

from ..errors import (BadRelayReply, ConnectFailed, KiteOffline, NotAKite, RelayRefused,
                      RelayTLSError, RelayUnreachable)
from ..proto.http import (MAX_HEAD, MAX_REFUSAL_BODY, ConnectReply, authority,
                          build_connect_request, parse_connect_reply)
from ..net.tls import ClientTLS
from ..tunnel import set_nodelay

log = logging.getLogger("kite.client")

__all__ = [
    "HIGH_WATER",
    "LOW_WATER",
    "ConnectFailed",
    "RelayUnreachable",
    "RelayTLSError",
    "RelayRefused",
    "KiteOffline",
    "NotAKite",
    "BadRelayReply",
    "ConnectReply",
    "build_connect_request",
    "parse_connect_reply",
    "refusal_error",
    "RelayTarget",
    "PipeEnd",
    "RelayEnd",
    "open_relay",
    "open_relay_socket",
    "StdioEnd",
    "SplicePump",
    "splice_usable",
    "bridge_stdio",
    "build_relay_target",
    "ssh_config_block",
]

#: Write-buffer marks of every transport and of stdout: above HIGH_WATER the side feeding
#: it stops reading, below LOW_WATER it resumes.  1 MiB keeps a 1 Gbit/s x 10 ms link full.
HIGH_WATER = 1 << 20
LOW_WATER = 256 << 10
#: Bytes per read from stdin (and per splice): large reads, few syscalls.
READ_SIZE = 256 << 10
#: Kernel pipe size requested for splicing (F_SETPIPE_SZ; the default is 64 KiB).
SPLICE_PIPE_SIZE = 1 << 20

_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Python 3.10+ has the name; Linux only)


def refusal_error(reply: ConnectReply, body: bytes, relay: str, host: str,
                  port: int) -> RelayRefused:
    """The one-line error for a non-200 answer (a body from another relay is quoted)."""
    target = authority(host, port)
    status_s = f"{reply.status} {reply.reason}".strip()
    if reply.status == 503:
        return KiteOffline(f"kite {target} is offline: relay {relay} answered {status_s} "
                           f"(is its `kite expose` running, with --public-port {port}? then retry)",
                           reply.status, reply.reason)
    if reply.status == 403:
        return NotAKite(f"{target} is not a raw kite on relay {relay}: it answered {status_s} "
                        "(check the name, and the port against the kite's --public-port)",
                        reply.status, reply.reason)
    said = body[:200].decode("utf-8", "replace").strip().splitlines()
    said_s = said[0].strip() if said else ""
    return RelayRefused(
        f"relay {relay} refused CONNECT {target}: {status_s}{': ' + said_s if said_s else ''}",
        reply.status, reply.reason)


def _closed_early(relay: str, host: str, port: int, reset: bool = False) -> NotAKite:
    """pagekite.py and firewalls close instead of answering a CONNECT they will not carry
    (a close with our request unread is a reset)."""
    return NotAKite(
        f"relay {relay} {'reset' if reset else 'closed'} the connection without answering CONNECT "
        f"{authority(host, port)} (is it a kite relay, and the name a raw kite on it?)",
        0, "closed")


def _unreachable(relay: str, exc: BaseException, timeout: float) -> ConnectFailed:
    if isinstance(exc, asyncio.TimeoutError):
        return RelayUnreachable(f"relay {relay} did not answer within {timeout:g} s "
                                "(check --relay, or a firewall on the way; --timeout)")
    if isinstance(exc, ssl.SSLCertVerificationError):
        # kite.tls's fingerprint check raises one without verify_message.
        why = getattr(exc, "verify_message", None) or (exc.args[0] if exc.args else str(exc))
        return RelayTLSError(f"TLS verification of relay {relay} failed: {why} "
                             "(give --ca PEM or --fingerprint SHA256, or --insecure)")
    if isinstance(exc, ssl.SSLError):
        return RelayTLSError(f"TLS handshake with relay {relay} failed: "
                             f"{exc.reason or exc} (is the relay speaking TLS on that port?)")
    if isinstance(exc, socket.gaierror):
        return RelayUnreachable(f"cannot resolve relay {relay}: {exc.strerror} (check --relay)")
    if isinstance(exc, OSError):
        # asyncio's "Connect call failed (addr)" says less than the errno's own words.
        why = (os.strerror(exc.errno) if exc.errno else exc.strerror or str(exc)
               or type(exc).__name__)
        return RelayUnreachable(f"cannot reach relay {relay}: {why} "
                                "(check --relay and that the relay is running)")
    return RelayUnreachable(f"cannot reach relay {relay}: {exc!r}")


# -- connecting -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RelayTarget:
    """Where to connect and what to ask for: the relay, the kite, TLS, and the time allowed."""

    relay_host: str
    relay_port: int
    host: str  # the kite's name, as sent in CONNECT
    port: int  # its public port
    tls: Optional[ClientTLS] = None
    timeout: float = 20.0  # TCP connect + TLS handshake + the relay's answer

    @property
    def relay(self) -> str:
        return authority(self.relay_host, self.relay_port)

    @property
    def kite(self) -> str:
        return authority(self.host, self.port)


class PipeEnd(asyncio.Protocol):
    """One side of a two-way byte relay over an asyncio transport.

    ``peer`` is the other side: another PipeEnd or a :class:`StdioEnd`, anything with
    ``send``, ``send_eof``, ``pause_reading``, ``resume_reading``, ``close`` and ``read_eof``.
    Backpressure: when this transport's write buffer passes :data:`HIGH_WATER` asyncio calls
    ``pause_writing`` and the peer stops reading until ``resume_writing``.  The pair closes
    when both sides have sent EOF, or when either side is lost.
    """

    def __init__(self) -> None:
        self.transport: Optional[asyncio.Transport] = None
        self.peer = None
        self.read_eof = False  # our transport's far side sent EOF
        self.reading_paused = False  # the peer asked us to stop reading
        self.lost = False
        self.exc: Optional[BaseException] = None
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
        self.peer.send(data)

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

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.lost = True
        self.exc = exc
        if self.peer is not None:
            self.peer.close()

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


class RelayEnd(PipeEnd):
    """The relay side: sends ``CONNECT``, waits for 200, then relays bytes to ``peer``.

    The peer is bound at once (``peer.peer`` becomes this end, so a peer that is lost during
    the handshake closes the relay connection) but must keep its reading paused until
    ``established`` resolves: nothing of the peer's may reach the relay before the 200.
    ``established`` resolves to None after any bytes that came with the answer were passed
    to the peer, or fails with a :class:`ConnectFailed`.
    """

    HANDSHAKE, OPEN, FAILED = "handshake", "open", "failed"

    def __init__(self, target: RelayTarget, peer) -> None:
        super().__init__()
        self.target = target
        self.peer = peer
        peer.peer = self
        self.state = self.HANDSHAKE
        self.established: asyncio.Future = asyncio.get_running_loop().create_future()
        self._head = bytearray()  # the answer so far (bounded by parse_connect_reply)
        self._reply: Optional[ConnectReply] = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        t = self.target
        if t.tls is not None and t.tls.fingerprint:
            try:
                t.tls.check_peer(transport.get_extra_info("ssl_object"))
            except ssl.SSLError as exc:
                self._fail(_unreachable(t.relay, exc, t.timeout))
                transport.abort()
                return
        transport.write(build_connect_request(t.host, t.port))

    def _fail(self, exc: ConnectFailed) -> None:
        self.state = self.FAILED
        self._head = bytearray()
        if not self.established.done():
            self.established.set_exception(exc)

    def data_received(self, data: bytes) -> None:
        if self.state == self.OPEN:  # the hot path
            self.bytes_in += len(data)
            self.peer.send(data)
            return
        if self.state == self.FAILED:
            return
        self._head += data
        t = self.target
        try:
            if self._reply is None:
                self._reply = parse_connect_reply(self._head)
                if self._reply is None:
                    return
                if self._reply.status == 200:
                    rest = bytes(self._head[self._reply.head_length:])
                    self._head = bytearray()
                    self.state = self.OPEN
                    if rest:
                        self.data_received(rest)
                    if not self.established.done():
                        self.established.set_result(None)
                    return
            reply = self._reply
            body = self._head[reply.head_length:]
            want = MAX_REFUSAL_BODY
            if reply.content_length is not None:
                want = min(want, reply.content_length)
            if len(body) >= want:
                self._fail(refusal_error(reply, bytes(body[:want]), t.relay, t.host, t.port))
                self.transport.close()
        except BadRelayReply as exc:
            self._fail(BadRelayReply(f"relay {t.relay}: {exc} "
                                     "(is --relay a kite relay? is --tls needed?)"))
            self.transport.abort()

    def eof_received(self) -> bool:
        if self.state == self.HANDSHAKE:
            self._end_of_answer()
            return False
        return super().eof_received()

    def _end_of_answer(self, exc: Optional[BaseException] = None) -> None:
        """The connection ended during the handshake: say why as precisely as we can."""
        t = self.target
        if self._reply is not None:  # a refusal whose body ended early
            body = bytes(self._head[self._reply.head_length:])
            self._fail(refusal_error(self._reply, body, t.relay, t.host, t.port))
        elif isinstance(exc, (ConnectionResetError, BrokenPipeError)):
            self._fail(_closed_early(t.relay, t.host, t.port, reset=True))
        elif exc is not None:
            self._fail(_unreachable(t.relay, exc, t.timeout))
        else:
            self._fail(_closed_early(t.relay, t.host, t.port))

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if self.state == self.HANDSHAKE:
            self._end_of_answer(exc)
        if self.state != self.OPEN:
            # Not the peer's business yet: whoever awaits ``established`` says why and closes it.
            self.lost = True
            self.exc = exc
            return
        super().connection_lost(exc)


async def open_relay(target: RelayTarget, peer) -> RelayEnd:
    """Connect to the relay (TLS if ``target.tls``), CONNECT, and return the established
    :class:`RelayEnd` whose peer is ``peer``.  Raises :class:`ConnectFailed`."""
    loop = asyncio.get_running_loop()
    kwargs = {}
    if target.tls is not None:
        kwargs["ssl"] = target.tls.context()
        # An IP address is checked against the certificate's IP SANs and sent as no SNI.
        kwargs["server_hostname"] = target.tls.server_name or target.relay_host
        kwargs["ssl_handshake_timeout"] = target.timeout
    end: Optional[RelayEnd] = None

    def factory() -> RelayEnd:
        nonlocal end
        end = RelayEnd(target, peer)
        return end

    async def connect_and_answer() -> None:
        await loop.create_connection(factory, target.relay_host, target.relay_port, **kwargs)
        await end.established

    try:
        await asyncio.wait_for(connect_and_answer(), target.timeout)
    except ConnectFailed:
        raise
    except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
        if end is not None and end.transport is not None:
            end.transport.abort()
        raise _unreachable(target.relay, exc, target.timeout) from None
    return end


async def _wait_fd(loop: asyncio.AbstractEventLoop, fd: int, writable: bool = False) -> None:
    fut = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    (loop.add_writer if writable else loop.add_reader)(fd, ready)
    try:
        await fut
    finally:
        (loop.remove_writer if writable else loop.remove_reader)(fd)


async def open_relay_socket(target: RelayTarget) -> socket.socket:
    """Plain TCP to the relay, CONNECT, and the socket positioned just after the 200 head.

    The answer is read with ``MSG_PEEK`` and only its head is consumed, so the first byte
    left in the socket is the kite's: the caller may splice from it directly.
    """
    if target.tls is not None:
        raise ValueError("open_relay_socket is for plain connections; use open_relay for TLS")
    loop = asyncio.get_running_loop()
    sock: Optional[socket.socket] = None

    async def connect() -> socket.socket:
        nonlocal sock
        infos = await loop.getaddrinfo(target.relay_host, target.relay_port,
                                       type=socket.SOCK_STREAM)
        last: Optional[BaseException] = None
        for family, type_, proto, _, addr in infos:
            s = socket.socket(family, type_, proto)
            s.setblocking(False)
            try:
                await loop.sock_connect(s, addr)
            except OSError as exc:
                s.close()
                last = exc
                continue
            sock = s
            break
        if sock is None:
            raise last or OSError(errno.EHOSTUNREACH, "no address")
        set_nodelay(sock)
        await loop.sock_sendall(sock, build_connect_request(target.host, target.port))
        head = bytearray()  # consumed bytes of an answer head that came in pieces
        while True:
            await _wait_fd(loop, sock.fileno())
            try:
                peeked = sock.recv(MAX_HEAD + 4 - len(head), socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                continue
            if not peeked:
                if head:
                    raise BadRelayReply(f"relay {target.relay}: answer ended in its head "
                                        f"{bytes(head[:40])!r}")
                raise _closed_early(target.relay, target.host, target.port)
            try:
                reply = parse_connect_reply(head + peeked)
            except BadRelayReply as exc:
                raise BadRelayReply(f"relay {target.relay}: {exc} "
                                    "(is --relay a kite relay? is --tls needed?)") from None
            if reply is not None:
                break
            # All of it is head (the head is not complete): take it, so that readiness
            # means new bytes again.
            head += sock.recv(len(peeked))
        need = reply.head_length - len(head)
        while need > 0:  # consume exactly the rest of the head (it is in the buffer)
            need -= len(sock.recv(need))
        if reply.status == 200:
            return sock
        body = b""
        want = min(MAX_REFUSAL_BODY, reply.content_length if reply.content_length is not None
                   else MAX_REFUSAL_BODY)
        while len(body) < want:
            try:
                chunk = await loop.sock_recv(sock, want - len(body))
            except OSError:
                break
            if not chunk:
                break
            body += chunk
        raise refusal_error(reply, body, target.relay, target.host, target.port)

    try:
        return await asyncio.wait_for(connect(), target.timeout)
    except BaseException as exc:
        if sock is not None:
            sock.close()
        if isinstance(exc, (ConnectFailed, asyncio.CancelledError)):
            raise
        if sock is not None and isinstance(exc, (ConnectionResetError, BrokenPipeError)):
            raise _closed_early(target.relay, target.host, target.port, reset=True) from None
        if isinstance(exc, (OSError, asyncio.TimeoutError)):
            raise _unreachable(target.relay, exc, target.timeout) from None
        raise


# -- stdio ------------------------------------------------------------------------------------
def _pollable(fd: int) -> bool:
    """epoll refuses regular files and directories (EPERM): they are always ready."""
    mode = os.fstat(fd).st_mode
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _nonblocking_ok(fd: int) -> bool:
    """O_NONBLOCK is set on the open file description, which a terminal shares with the
    shell: set it only on pipes and sockets (reads happen only when poll says readable)."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


class _FdWatch:
    """Readiness callbacks for one fd; regular files (not pollable) are always ready."""

    __slots__ = ("loop", "fd", "writable", "pollable", "cb", "active", "_handle")

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
    """stdin and stdout as the peer of a :class:`RelayEnd`, copying (the portable path).

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
        self.peer: Optional[PipeEnd] = None  # the RelayEnd (it binds itself)
        self.read_eof = False  # stdin reached EOF
        self.reading_paused = True  # until start(): nothing goes up before the 200
        self._in = _FdWatch(self.loop, in_fd, False, self._on_readable)
        self._out = _FdWatch(self.loop, out_fd, True, self._on_writable)
        self._buf: collections.deque = collections.deque()  # pending stdout bytes (owned)
        self._buffered = 0
        self._peer_paused = False  # we asked the relay to stop reading (stdout is full)
        self._eof_pending = False  # the relay sent EOF: finish once stdout is drained
        self.finished: asyncio.Future = self.loop.create_future()
        self.error: Optional[str] = None

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
        if not data:
            self.read_eof = True
            self._in.stop()
            self.peer.send_eof()
            return
        self.peer.send(data)

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

    def _finish(self, status: int, error: Optional[str] = None) -> None:
        if self.finished.done():
            return
        self._in.stop()
        self._out.stop()
        self.error = error
        self.finished.set_result(status)


# -- splice -----------------------------------------------------------------------------------
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


async def _bridge_splice(sock: socket.socket, in_fd: int, out_fd: int,
                         stop: Optional[asyncio.Event]) -> tuple:
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


async def bridge_stdio(target: RelayTarget, *, in_fd: int = 0, out_fd: int = 1,
                       stop: Optional[asyncio.Event] = None,
                       splice: Optional[bool] = None) -> int:
    """``kite connect``: CONNECT through the relay, then bridge ``in_fd``/``out_fd`` to it.

    Returns the exit status (0: the far side ended; 1: the relay connection was lost).
    Raises :class:`ConnectFailed` if the connection cannot be set up.  ``splice`` None =
    automatic (plain relay connection, Linux, pipes or sockets on both fds).
    """
    if splice is None:
        splice = target.tls is None and splice_usable(in_fd, out_fd)
    saved = {}
    for fd in {in_fd, out_fd}:
        if _nonblocking_ok(fd):
            saved[fd] = os.get_blocking(fd)
            os.set_blocking(fd, False)
    try:
        if splice:
            sock = await open_relay_socket(target)
            try:
                status, error = await _bridge_splice(sock, in_fd, out_fd, stop)
            finally:
                sock.close()
        else:
            status, error = await _bridge_copy(target, in_fd, out_fd, stop)
    finally:
        for fd, blocking in saved.items():
            try:
                os.set_blocking(fd, blocking)
            except OSError:
                pass
    if error:
        raise ConnectFailed(error)
    return status


async def _bridge_copy(target: RelayTarget, in_fd: int, out_fd: int,
                       stop: Optional[asyncio.Event]) -> tuple:
    loop = asyncio.get_running_loop()
    stdio = StdioEnd(in_fd, out_fd)
    relay = await open_relay(target, stdio)
    stdio.start()
    waiters = [stdio.finished]
    if stop is not None:
        waiters.append(loop.create_task(stop.wait()))
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters[1:]:
            w.cancel()
        stdio.stop()  # stops watching the fds (no-op if it finished by itself)
        if relay.transport is not None:
            relay.transport.close()
    return stdio.finished.result(), stdio.error


# -- configuration ----------------------------------------------------------------------------
def build_relay_target(*, host: str, port: int, relay: str, tls: bool = False,
                       ca: Optional[str] = None, fingerprint: Optional[str] = None,
                       insecure: bool = False, server_name: Optional[str] = None,
                       timeout: float = 20.0) -> RelayTarget:
    """Validate the client options into a :class:`RelayTarget` (ConfigError: exit 2)."""
    from ..config import check_tls_mode, parse_hostport
    from ..errors import ConfigError
    from ..net.tls import normalize_fingerprint

    relay_host, relay_port = parse_hostport(relay, key="--relay", default_port=443)
    mode = check_tls_mode(ca=ca, fingerprint=fingerprint, insecure=insecure)
    if mode and not tls:
        raise ConfigError(mode, "only checks a TLS connection to the relay", "add --tls")
    if server_name and not tls:
        raise ConfigError("--server-name", "only names a TLS relay", "add --tls")
    if fingerprint:
        fingerprint = normalize_fingerprint(fingerprint)
    if ca and not os.path.isfile(ca):
        raise ConfigError("--ca", f"no such file {ca!r}", "give the relay's certificate PEM")
    try:
        build_connect_request(host, port)
    except ValueError as exc:
        raise ConfigError("HOST", str(exc), "give the kite's DNS name, e.g. box.example.com") from None
    if not timeout > 0:
        raise ConfigError("--timeout", f"{timeout!r} is not positive", "give seconds, e.g. 20")
    client_tls = None
    if tls:
        client_tls = ClientTLS(ca=ca, fingerprint=fingerprint, insecure=insecure,
                               server_name=server_name)
        client_tls.context()  # a bad --ca file is a ConfigError now, not a failure later
    return RelayTarget(relay_host, relay_port, host.lower().rstrip("."), port, client_tls,
                       timeout)


def ssh_config_block(name: str, relay: str, *, port: int = 22, user: Optional[str] = None,
                     tls_args: tuple = (), command: str = "kite") -> str:
    """The ``~/.ssh/config`` block that reaches raw kite ``name`` through ``relay``.

    ssh runs ProxyCommand through the user's shell, so every argument is shell-quoted.
    """
    import shlex

    from ..errors import ConfigError

    if not name or any(c.isspace() or c in "%*?!\"'\\" for c in name):
        raise ConfigError("NAME", f"bad kite name {name!r}", "give a DNS name like box.example.com")
    args = [command, "connect", "%h", "%p", "--relay", relay, *tls_args]
    proxy = " ".join(a if a in ("%h", "%p") else shlex.quote(a) for a in args)
    lines = [f"Host {name}", f"    HostName {name}", f"    Port {port}"]
    if user:
        lines.append(f"    User {user}")
    lines.append(f"    ProxyCommand {proxy}")
    return "\n".join(lines) + "\n"
