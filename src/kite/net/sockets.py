"""Socket options every kite connection gets."""

from __future__ import annotations

import socket

__all__ = ["set_nodelay"]


def set_nodelay(transport_or_sock) -> None:
    """TCP_NODELAY on a socket or a transport's socket (TCP only; errors are ignored).

    Without it Nagle's algorithm holds a small write back until the previous one is
    acknowledged, and the peer's delayed ACK makes that a wait of tens of milliseconds per
    request/answer exchange.
    """
    sock = transport_or_sock
    if not isinstance(sock, socket.socket):
        sock = transport_or_sock.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
