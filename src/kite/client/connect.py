"""``kite connect``: reach a raw kite through the relay with HTTP CONNECT, bridged to stdio.

Theory of operation
-------------------
A raw kite (ssh, IRC, a database) is reached by sending the relay ``CONNECT host:port
HTTP/1.1``; the relay answers ``200 Connection Established`` and from then on the bytes pass
unframed (``403`` means the name is not a kite on that relay, ``503`` that its backend is
offline).  The request and the answer are :mod:`kite.proto.http`'s; reaching the relay (TCP,
TLS, the pin) is :func:`kite.net.dial.dial`'s; moving bytes is :mod:`kite.net.pipes`'.  This
module holds the conversation with the relay:

1. :func:`refusal_error` turns a non-200 answer into the one-line error the CLI prints.
2. Connecting, two ways: :class:`RelayEnd` is an asyncio protocol that sends the request and,
   once the relay said 200, relays bytes to its peer (plain or TLS; used by ``kite forward``
   and by the copying bridge; :func:`open_relay`); :func:`open_relay_socket` does the same on
   a bare non-blocking socket and consumes not one byte past the answer head -- the socket
   can then be handed to ``os.splice``.
3. The stdio bridge (``kite connect``, ssh's ProxyCommand; :func:`bridge_stdio`): stdin ->
   relay, relay -> stdout.  On Linux with a plain relay connection and pipes/sockets on fds 0
   and 1 (what ssh gives a ProxyCommand), each direction is spliced through a kernel pipe
   (:func:`kite.net.pipes.bridge_splice`): the bytes never enter user space.  Otherwise (TLS,
   a terminal, a file, ``KITE_NO_SPLICE=1``) :class:`~kite.net.pipes.StdioEnd` copies, with
   the same backpressure rules as ``kite forward``.

Ends (both ways): stdin EOF half-closes the relay connection (``shutdown(SHUT_WR)``) and
the bridge keeps reading; the relay's EOF ends the bridge once stdout has taken every byte
(exit status 0).  Over TLS a half-close cannot be sent (asyncio's TLS transports do not
support ``write_eof``), so stdin EOF is only noted there.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from dataclasses import dataclass

from ..config import check_seconds, check_tls_mode, parse_hostport
from ..errors import (
    BadRelayReply,
    ConfigError,
    ConnectFailed,
    KiteOffline,
    NotAKite,
    RelayRefused,
    RelayTLSError,
    RelayUnreachable,
)
from ..net.dial import dial, http_connect, open_tcp, read_refusal_body
from ..net.pipes import PipeEnd, StdioEnd, bridge_splice, nonblocking_ok, splice_usable
from ..net.tls import ClientTLS, normalize_fingerprint
from ..proto.http import (
    MAX_REFUSAL_BODY,
    ConnectReply,
    authority,
    build_connect_request,
    parse_connect_reply,
)

__all__ = [
    "RelayEnd",
    "RelayTarget",
    "bridge_stdio",
    "build_relay_target",
    "open_relay",
    "open_relay_socket",
    "refusal_error",
]


# -- errors -----------------------------------------------------------------------------------
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
        # kite.net.tls's fingerprint check sets verify_message as the ssl module does.
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
    tls: ClientTLS | None = None
    timeout: float = 20.0  # TCP connect + TLS handshake + the relay's answer

    @property
    def relay(self) -> str:
        return authority(self.relay_host, self.relay_port)

    @property
    def kite(self) -> str:
        return authority(self.host, self.port)


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
        self._reply: ConnectReply | None = None

    def connection_made(self, transport) -> None:
        # A pinned certificate was checked before this runs (kite.net.dial).
        super().connection_made(transport)
        t = self.target
        transport.write(build_connect_request(t.host, t.port))

    def _fail(self, exc: ConnectFailed) -> None:
        self.state = self.FAILED
        self._head = bytearray()
        if not self.established.done():
            self.established.set_exception(exc)

    def data_received(self, data: bytes) -> None:
        if self.state == self.OPEN:  # the hot path
            self.bytes_in += len(data)
            peer = self.peer
            assert peer is not None  # bound in __init__
            peer.send(data)
            return
        if self.state == self.FAILED:
            return
        self._head += data
        t = self.target
        transport = self.transport
        assert transport is not None  # data comes after connection_made
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
                transport.close()
        except BadRelayReply as exc:
            self._fail(BadRelayReply(f"relay {t.relay}: {exc} "
                                     "(is --relay a kite relay? is --tls needed?)"))
            transport.abort()

    def eof_received(self) -> bool:
        if self.state == self.HANDSHAKE:
            self._end_of_answer()
            return False
        return super().eof_received()

    def _end_of_answer(self, exc: BaseException | None = None) -> None:
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

    def connection_lost(self, exc: BaseException | None) -> None:
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
    end: RelayEnd | None = None

    def factory() -> RelayEnd:
        nonlocal end
        end = RelayEnd(target, peer)
        return end

    async def connect_and_answer() -> None:
        await dial(target.relay_host, target.relay_port, factory, tls=target.tls,
                   tls_timeout=target.timeout)
        assert end is not None  # made by dial
        await end.established

    try:
        await asyncio.wait_for(connect_and_answer(), target.timeout)
    except ConnectFailed:
        raise
    except BaseException as exc:
        if end is not None and end.transport is not None:
            end.transport.abort()
        if isinstance(exc, (OSError, asyncio.TimeoutError, ssl.SSLError)):
            raise _unreachable(target.relay, exc, target.timeout) from None
        raise
    assert end is not None
    return end


async def open_relay_socket(target: RelayTarget) -> socket.socket:
    """Plain TCP to the relay, CONNECT, and the socket positioned just after the 200 head.

    Only the answer head is consumed (:func:`kite.net.dial.read_connect_reply`), so the
    first byte left in the socket is the kite's: the caller may splice from it directly.
    """
    if target.tls is not None:
        raise ValueError("open_relay_socket is for plain connections; use open_relay for TLS")
    sock: socket.socket | None = None

    async def connect() -> socket.socket:
        nonlocal sock
        sock = await open_tcp(target.relay_host, target.relay_port)
        try:
            reply = await http_connect(sock, target.host, target.port)
        except BadRelayReply as exc:
            raise BadRelayReply(f"relay {target.relay}: {exc} "
                                "(is --relay a kite relay? is --tls needed?)") from None
        if reply is None:
            raise _closed_early(target.relay, target.host, target.port)
        if reply.status == 200:
            return sock
        body = await read_refusal_body(sock, reply)
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


# -- the stdio bridge -------------------------------------------------------------------------
async def bridge_stdio(target: RelayTarget, *, in_fd: int = 0, out_fd: int = 1,
                       stop: asyncio.Event | None = None,
                       splice: bool | None = None) -> int:
    """``kite connect``: CONNECT through the relay, then bridge ``in_fd``/``out_fd`` to it.

    Returns the exit status (0: the far side ended; 1: the relay connection was lost).
    Raises :class:`ConnectFailed` if the connection cannot be set up.  ``splice`` None =
    automatic (plain relay connection, Linux, pipes or sockets on both fds).
    """
    if splice is None:
        splice = target.tls is None and splice_usable(in_fd, out_fd)
    saved = {}
    for fd in {in_fd, out_fd}:
        if nonblocking_ok(fd):
            saved[fd] = os.get_blocking(fd)
            os.set_blocking(fd, False)
    try:
        if splice:
            sock = await open_relay_socket(target)
            try:
                status, error = await bridge_splice(sock, in_fd, out_fd, stop)
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
                       stop: asyncio.Event | None) -> tuple:
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
                       ca: str | None = None, fingerprint: str | None = None,
                       insecure: bool = False, server_name: str | None = None,
                       timeout: float = 20.0, host_key: str = "HOST") -> RelayTarget:
    """Validate the client options into a :class:`RelayTarget` (ConfigError: exit 2)."""
    relay_host, relay_port = parse_hostport(relay, key="--relay", default_port=443, min_port=1)
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
        raise ConfigError(host_key, str(exc), "give the kite's DNS name, e.g. box.example.com") from None
    timeout = check_seconds(timeout, "--timeout", low=0.1, high=3600)
    client_tls = None
    if tls:
        client_tls = ClientTLS(ca=ca, fingerprint=fingerprint, insecure=insecure,
                               server_name=server_name)
        client_tls.context()  # a bad --ca file is a ConfigError now, not a failure later
    return RelayTarget(relay_host, relay_port, host.lower().rstrip("."), port, client_tls,
                       timeout)
