"""Socket options every kite connection gets, and how a connection is cut or ended."""

from __future__ import annotations

import fcntl
import logging
import resource
import socket
import struct
import termios

log = logging.getLogger("kite.net")

__all__ = ["set_nodelay", "reset_on_close", "reset", "close_gracefully", "unsent_bytes",
           "raise_nofile_limit"]

#: SO_LINGER on with 0 seconds: close(2) drops what is unsent and sends RST.
_LINGER_RESET = struct.pack("ii", 1, 0)
#: SO_LINGER off (the default): close(2) sends what is buffered, then FIN.
_LINGER_OFF = struct.pack("ii", 0, 0)


def _socket_of(transport_or_sock):
    if isinstance(transport_or_sock, socket.socket):
        return transport_or_sock
    try:
        return transport_or_sock.get_extra_info("socket")
    except (AttributeError, RuntimeError):
        return None


def set_nodelay(transport_or_sock) -> None:
    """TCP_NODELAY on a socket or a transport's socket (TCP only; errors are ignored).

    Without it Nagle's algorithm holds a small write back until the previous one is
    acknowledged, and the peer's delayed ACK makes that a wait of tens of milliseconds per
    request/answer exchange.
    """
    sock = _socket_of(transport_or_sock)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def reset_on_close(transport_or_sock, on: bool = True) -> None:
    """From now on, closing the socket resets it (``on``: SO_LINGER on, 0 s) or ends it
    with FIN after the buffered bytes (``on=False``: SO_LINGER off, the default).

    A stream's local socket is armed when it attaches (kite.net.tunnel): if the process
    dies (``kill -9``), the kernel closes it with RST, so the far side sees an error
    instead of a clean end after a prefix.  A graceful close disarms it first
    (:func:`close_gracefully`).  Works on a socket, a plain transport (asyncio or uvloop)
    and a TLS transport (its TCP socket); errors (a socket closed already) are ignored.
    """
    sock = _socket_of(transport_or_sock)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET if on else _LINGER_OFF)
    except (OSError, ValueError, AttributeError):
        pass


def reset(transport) -> None:
    """Cut a connection: the peer sees a reset (ECONNRESET; an SSL error over TLS), never
    a clean end.  What is buffered is dropped.  For asyncio and uvloop transports, TLS too
    (``abort`` alone closes with FIN on both loops)."""
    reset_on_close(transport)
    transport.abort()


def close_gracefully(transport) -> None:
    """End a connection well: the buffered bytes are written, then FIN (or TLS close_notify)
    - also when :func:`reset_on_close` armed it."""
    reset_on_close(transport, on=False)
    transport.close()


def unsent_bytes(fd: int) -> int:
    """Bytes in a socket's send queue that the peer has not acknowledged yet (SIOCOUTQ);
    0 for ``fd < 0`` or on error."""
    if fd < 0:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force
    (an unlimited one counts as 2**20, Linux's default fs.nr_open)."""
    unlimited = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == unlimited:
        return 1 << 20
    target = hard if hard != unlimited else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, target, exc)
    return soft
