"""Dialing a relay: the one dialer of the backend (``kite expose``) and the client commands.

Theory of operation
-------------------
:func:`dial` connects in up to three steps and hands the connection to a protocol:

1. TCP (:func:`open_tcp`): the name is resolved with ``getaddrinfo`` and each address is
   tried in turn until one connects.  TCP_NODELAY is set.
2. Optionally a plain ``CONNECT NAME:443`` (``connect_name``; pagekite.py's ``--fe_certname``
   way in, docs/protocol.md §1.2): the answer head is read exactly (:func:`read_connect_reply`
   peeks with ``MSG_PEEK`` and consumes only the head) and must be ``200``; the relay must
   send nothing more before the TLS handshake.
3. Optionally TLS on that same socket, checked as :class:`~kite.net.tls.ClientTLS` says:
   against a CA file or the system store, by a SHA-256 pin of the certificate, or not at all
   (insecure).  The name sent as SNI and checked against the certificate is
   ``tls.server_name``, else ``connect_name``, else the relay's host; an IP address is sent
   as no SNI and checked against the certificate's IP addresses (the ssl module's rules).

A pin is checked right after the handshake and *before* the protocol is attached: the
protocol's ``connection_made`` (which may write at once, as a tunnel request does) only runs
on a connection whose certificate matched, so nothing is sent to a peer that failed the pin.
Until then a holding protocol keeps reading paused and keeps whatever arrives, and hands it
over with the connection.

Cancel-safe: whatever step is interrupted (by ``timeout``, by a caller's cancel, by an
error), the socket made so far is closed; once it is handed to ``create_connection``, the
transport made of it is closed (by the event loop itself if ``create_connection`` did not
complete).

Errors are the steps' own: ``OSError`` (``socket.gaierror`` included) for TCP,
``ssl.SSLError`` (``ssl.SSLCertVerificationError`` for a failed check or pin),
``asyncio.TimeoutError`` for ``timeout``, and for the CONNECT step
:class:`~kite.errors.RelayRefused` (not 200), :class:`~kite.errors.BadRelayReply` (not an
HTTP answer) or :class:`~kite.errors.ConnectFailed` (closed without an answer).

:func:`http_connect` and :func:`read_refusal_body` are the CONNECT conversation on a bare
socket for callers that keep the socket (``kite connect`` splices it).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from collections.abc import Callable
from typing import TypeVar

from ..errors import BadRelayReply, ConnectFailed, RelayRefused
from ..proto.http import (
    MAX_HEAD,
    MAX_REFUSAL_BODY,
    ConnectReply,
    authority,
    build_connect_request,
    parse_connect_reply,
)
from .aio import feed_protocol
from .sockets import set_nodelay
from .tls import ClientTLS
from .tlsconn import connect_tls

__all__ = [
    "TLS_HANDSHAKE_TIMEOUT",
    "dial",
    "http_connect",
    "open_tcp",
    "read_connect_reply",
    "read_refusal_body",
]

_P = TypeVar("_P", bound=asyncio.BaseProtocol)

#: Default bound on the TLS handshake alone.
TLS_HANDSHAKE_TIMEOUT = 10.0
#: The port of the relay's own TLS names in ``CONNECT NAME:443`` (pagekite.py's fixed choice).
CONNECT_TLS_PORT = 443


# -- TCP ----------------------------------------------------------------------------------------
async def open_tcp(host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket to ``host:port`` with TCP_NODELAY.

    Every address ``getaddrinfo`` gives is tried in its order; the error of the last one is
    raised if none connects.  No socket is left open when this raises or is cancelled.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: BaseException | None = None
    for family, type_, proto, _canon, addr in infos:
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, addr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:  # cancelled
            sock.close()
            raise
        set_nodelay(sock)
        return sock
    raise last or OSError(errno.EHOSTUNREACH, f"no address for {host!r}")


# -- CONNECT on a bare socket -------------------------------------------------------------------
async def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    fut = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def read_connect_reply(sock: socket.socket) -> ConnectReply | None:
    """Read the answer head to a CONNECT, and not one byte past it.

    The socket is read with ``MSG_PEEK`` and only the head is consumed, so the first byte
    left in the socket is the first byte of the tunnel.  Returns None if the peer closed
    without a byte of answer; raises :class:`~kite.errors.BadRelayReply` for what is not an
    HTTP answer head (or one that ended early).
    """
    loop = asyncio.get_running_loop()
    head = bytearray()  # consumed bytes of a head that came in pieces
    while True:
        await _readable(loop, sock.fileno())
        try:
            peeked = sock.recv(MAX_HEAD - len(head), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            continue
        if not peeked:
            if head:
                raise BadRelayReply(f"answer ended in its head {bytes(head[:40])!r}")
            return None
        reply = parse_connect_reply(head + peeked)
        if reply is not None:
            break
        # All of it is head (the head is not complete): take it, so that readiness means
        # new bytes again.
        head += sock.recv(len(peeked))
    need = reply.head_length - len(head)
    while need > 0:  # consume exactly the rest of the head (it is in the buffer)
        need -= len(sock.recv(need))
    return reply


async def http_connect(sock: socket.socket, host: str, port: int) -> ConnectReply | None:
    """Send ``CONNECT host:port`` on ``sock`` and read the answer head (see
    :func:`read_connect_reply`)."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, build_connect_request(host, port))
    return await read_connect_reply(sock)


async def read_refusal_body(sock: socket.socket, reply: ConnectReply) -> bytes:
    """The body of a refusal, up to its Content-Length or EOF, at most MAX_REFUSAL_BODY."""
    loop = asyncio.get_running_loop()
    want = MAX_REFUSAL_BODY
    if reply.content_length is not None:
        want = min(want, reply.content_length)
    body = b""
    while len(body) < want:
        try:
            chunk = await loop.sock_recv(sock, want - len(body))
        except OSError:
            break
        if not chunk:
            break
        body += chunk
    return body


async def _connect_for_tls(sock: socket.socket, relay: str, name: str) -> None:
    """``CONNECT name:443`` and its 200, with nothing after it (TLS comes next)."""
    what = f"CONNECT {name}:{CONNECT_TLS_PORT}"
    try:
        reply = await http_connect(sock, name, CONNECT_TLS_PORT)
    except BadRelayReply as exc:
        raise BadRelayReply(f"relay {relay}: {exc} (the answer to {what})") from None
    if reply is None:
        raise ConnectFailed(f"relay {relay} closed the connection after {what}")
    if reply.status != 200:
        status = f"{reply.status} {reply.reason}".strip()
        raise RelayRefused(
            f"relay {relay} answered {status!r} to {what} (it has no TLS certificate for "
            f"{name!r}: pagekite.py needs --tls_endpoint={name}:PEM, kite relay --tls-name "
            f"{name})", reply.status, reply.reason)
    try:
        early = sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        early = b""
    if early:
        raise ConnectFailed(f"relay {relay} sent data before the TLS handshake after {what}")


# -- the pin gate -------------------------------------------------------------------------------
class _Holding(asyncio.Protocol):
    """Holds a fresh TLS connection until its pin is checked: reading paused, anything that
    arrives anyway kept in order, to be handed to the real protocol."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.eof = False
        self.lost = False
        self.exc: BaseException | None = None

    def connection_made(self, transport) -> None:
        transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.data.append(data)

    def eof_received(self) -> None:
        self.eof = True  # a TLS transport closes after it whatever the answer

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self.exc = exc


def _hand_over(transport, holding: _Holding, protocol: asyncio.BaseProtocol) -> None:
    """Attach ``protocol`` to a transport the holding protocol kept, as if it had been there."""
    transport.set_protocol(protocol)
    transport.resume_reading()
    protocol.connection_made(transport)
    for data in holding.data:
        if transport.is_closing():
            break
        feed_protocol(protocol, data)
    holding.data.clear()
    if (holding.eof and not transport.is_closing()
            and not protocol.eof_received()):  # type: ignore[attr-defined]
        transport.close()


# -- the dialer ---------------------------------------------------------------------------------
async def dial(
    host: str,
    port: int,
    protocol_factory: Callable[[], _P],
    *,
    tls: ClientTLS | None = None,
    ssl_context: ssl.SSLContext | None = None,
    connect_name: str | None = None,
    timeout: float | None = None,
    tls_timeout: float = TLS_HANDSHAKE_TIMEOUT,
) -> tuple[asyncio.Transport, _P]:
    """Connect to the relay at ``host:port`` and return ``(transport, protocol)``.

    ``tls`` None: plain TCP.  Otherwise TLS checked as ``tls`` says (``ssl_context``, if
    given, is ``tls.context()`` made once by the caller).  ``connect_name``: first a plain
    ``CONNECT connect_name:443``.  ``timeout`` bounds everything (None: each step has only
    its own bounds); ``tls_timeout`` the TLS handshake.  See the module docstring for the
    errors raised.
    """
    if timeout is None:
        return await _dial(host, port, protocol_factory, tls, ssl_context, connect_name,
                           tls_timeout)
    return await asyncio.wait_for(
        _dial(host, port, protocol_factory, tls, ssl_context, connect_name, tls_timeout),
        timeout)


async def _dial(host, port, protocol_factory, tls, ssl_context, connect_name, tls_timeout):
    loop = asyncio.get_running_loop()
    sock = await open_tcp(host, port)
    try:
        if connect_name:
            await _connect_for_tls(sock, authority(host, port), connect_name)
        ctx = None
        if tls is not None:
            ctx = ssl_context if ssl_context is not None else tls.context()
    except BaseException:
        sock.close()
        raise
    # From here on the socket belongs to the transport create_connection makes, which
    # closes it if create_connection fails or is cancelled.
    if tls is None:
        return await loop.create_connection(protocol_factory, sock=sock)
    assert ctx is not None
    server_hostname = tls.server_name or connect_name or host
    if not tls.fingerprint:
        return await connect_tls(loop, protocol_factory, sock, ctx, server_hostname,
                                 handshake_timeout=tls_timeout)
    transport, holding = await connect_tls(loop, _Holding, sock, ctx, server_hostname,
                                           handshake_timeout=tls_timeout)
    try:
        tls.check_peer(transport.get_extra_info("ssl_object"))
        if holding.lost:
            raise holding.exc or ConnectionResetError(
                errno.ECONNRESET, "connection lost right after the TLS handshake")
        protocol = protocol_factory()
        _hand_over(transport, holding, protocol)
    except BaseException:
        transport.abort()
        raise
    return transport, protocol
