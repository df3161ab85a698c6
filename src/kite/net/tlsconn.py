"""TLS on a connected socket: kite's own transport where it works, else the event loop's.

:mod:`kite._tls` runs TLS with OpenSSL reading and writing the socket itself (no memory
BIOs, no Python call per record); it needs the compiled module and OpenSSL 3 as Python's
``ssl`` loaded it.  Where either is missing, or ``KITE_NATIVE_TLS=0`` is set in the
environment (for A/B measurements: ``kite bench``) or ``KITE_NO_EXTENSIONS=1`` (no compiled
module at all), the event loop's TLS is used, with the same behaviour.  :func:`native_tls`
says which, and why (``kite --version`` too).

Both functions return ``(transport, protocol)`` once the handshake is done (the protocol's
``connection_made`` has run), and own the socket from the call on: it is closed when the
handshake fails, times out (``asyncio.TimeoutError``) or is cancelled.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Callable
from types import ModuleType
from typing import Optional, TypeVar

__all__ = ["accept_tls", "connect_tls", "native_tls"]

_P = TypeVar("_P", bound=asyncio.BaseProtocol)

_tls: Optional[ModuleType] = None
_why_not: Optional[str]
if os.environ.get("KITE_NATIVE_TLS", "1") == "0":
    _why_not = "KITE_NATIVE_TLS=0 is set"
elif os.environ.get("KITE_NO_EXTENSIONS", "") not in ("", "0"):
    _why_not = "KITE_NO_EXTENSIONS is set"
else:
    try:
        from .. import _tls as _compiled
    except ImportError as exc:
        _why_not = f"kite._tls is not built ({exc})"
    else:
        _tls = _compiled
        _why_not = _compiled.available()


def native_tls() -> Optional[str]:
    """None when kite's own TLS transport is in use, else why the event loop's is."""
    return _why_not


async def accept_tls(
    loop: asyncio.AbstractEventLoop,
    protocol_factory: Callable[[], _P],
    sock: socket.socket,
    context: ssl.SSLContext,
    *,
    handshake_timeout: float,
) -> tuple[asyncio.Transport, _P]:
    """The server side of TLS on the accepted ``sock``."""
    if _tls is None or _why_not is not None or not _tls.usable(context):
        return await loop.connect_accepted_socket(
            protocol_factory, sock=sock, ssl=context,
            ssl_handshake_timeout=handshake_timeout)
    return await _start(loop, protocol_factory, sock, context, True, None, handshake_timeout)


async def connect_tls(
    loop: asyncio.AbstractEventLoop,
    protocol_factory: Callable[[], _P],
    sock: socket.socket,
    context: ssl.SSLContext,
    server_hostname: Optional[str],
    *,
    handshake_timeout: float,
) -> tuple[asyncio.Transport, _P]:
    """The client side of TLS on the connected ``sock``, checking ``server_hostname`` as
    ``context`` says (and sending it as SNI unless it is an address); None: no SNI, and
    ``context`` must not check the name."""
    if _tls is None or _why_not is not None or not _tls.usable(context):
        # The event loop's TLS takes "" for no name (None is refused without a host).
        return await loop.create_connection(
            protocol_factory, sock=sock, ssl=context, server_hostname=server_hostname or "",
            ssl_handshake_timeout=handshake_timeout)
    return await _start(loop, protocol_factory, sock, context, False, server_hostname,
                        handshake_timeout)


async def _start(loop, protocol_factory, sock, context, server_side, server_hostname,
                 handshake_timeout):
    assert _tls is not None
    try:
        protocol = protocol_factory()
        waiter = loop.create_future()
        transport = _tls.TLSTransport(loop, sock, context, protocol, waiter,
                                      server_side=server_side, server_hostname=server_hostname)
    except BaseException:
        sock.close()
        raise
    try:
        transport.start(handshake_timeout)
        await waiter
    except BaseException:
        transport.abort()  # closes the socket, whatever state the handshake was in
        raise
    return transport, protocol
