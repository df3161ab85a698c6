"""Type stub of the compiled kite._tls (see _tls.pyx for what it does)."""

import asyncio
import socket
import ssl
from typing import Any, Optional

def available() -> Optional[str]: ...
def usable(context: ssl.SSLContext) -> bool: ...
def set_ciphersuites(context: ssl.SSLContext, suites: str) -> None: ...

class TLSInfo:
    server_side: bool
    server_hostname: Optional[str]
    context: ssl.SSLContext
    def version(self) -> Optional[str]: ...
    def cipher(self) -> Optional[tuple[str, str, int]]: ...
    def selected_alpn_protocol(self) -> Optional[str]: ...
    def compression(self) -> None: ...
    def getpeercert(self, binary_form: bool = ...) -> Any: ...

class TLSTransport(asyncio.Transport):
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        context: ssl.SSLContext,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[None],
        *,
        server_side: bool,
        server_hostname: Optional[str] = ...,
    ) -> None: ...
    def start(self, handshake_timeout: Optional[float]) -> None: ...
