"""The relay's dispatcher: a classified connection becomes a tunnel, a stream or a refusal.

* a TLS ClientHello whose SNI names an https kite is handed to a stream untouched (the
  visitor's TLS is end to end; the relay never decrypts it);
* a ClientHello for the relay itself (no SNI, or one of its own names) is given to the TLS
  layer, which reads that very hello from the socket; inside, :class:`TlsEntry` reads the
  first head: ``CONNECT PageKite:`` makes a tunnel, ``CONNECT host:port`` a visitor of
  ``kite connect --tls``;
* a ClientHello whose SNI names an http kite (and no https kite) that one of the relay's
  certificates covers is terminated here (:class:`TlsVisitor`): the first decrypted request
  head opens an ``http`` stream with ``RTLS: 1`` (as its payload), and the rest of the
  connection's plaintext follows; the backend writes ``X-Forwarded-Proto: https`` (kite
  and pagekite.py alike).  TLS the relay terminates is 1.2 or newer: older ClientHellos
  get a protocol_version alert;
* with certificates on demand (:mod:`kite.certs.ondemand`), a ClientHello for an http kite
  that no certificate covers starts an order for its name and waits for it (bounded); a
  plain ``GET /.well-known/acme-challenge/TOKEN`` the CA sends for a pending order is
  answered before any kite routing;
* ``CONNECT PageKite:`` is a plain tunnel, ``CONNECT host:port`` a proxy visitor for a raw
  or https kite (or pagekite.py's ``CONNECT relay-name:443`` before a TLS tunnel), anything
  else HTTP routed by ``Host``; the pagekite ``HEAD /ping`` probe gets its 503 at once.

Visitors are then streams of a tunnel (:mod:`kite.net.tunnel`): the peeked bytes travel in
the stream-open chunk, exactly as pagekite.py sends them, and the stream's protocol skips
them when it reads them for real.  Only kites are reachable: the relay is never an open
proxy.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import TYPE_CHECKING, Callable, Optional

from ..certs import CertStore
from ..certs.ondemand import ACME_CHALLENGE_PATH, FIRST_VISITOR_WAIT
from ..errors import KiteError, RelayFull, RemoteProtocolError, SniffError, TooManyStreams
from ..net.aio import feed_protocol
from ..net.sockets import reset_on_close
from ..net.tlsconn import accept_tls
from ..net.tunnel import Stream, StreamProtocol
from ..proto import handshake
from ..proto.fleet import FLEET_METHOD, LINK_METHOD, ForwardHead, parse_forward_head
from ..proto.handshake import build_ping_reply
from ..proto.http import (
    MAX_HEAD,
    TUNNEL_CONNECT_OK,
    VISITOR_CONNECT_OK,
    connect_refused,
    find_head_end,
    http_error,
    https_redirect,
)
from ..proto.names import bare_proto, domain_matches
from ..proto.sniff import (
    TLS_1_2,
    TLS_ALERT_INTERNAL_ERROR,
    TLS_ALERT_PROTOCOL_VERSION,
    TLS_ALERT_UNRECOGNIZED_NAME,
    HttpRequest,
    ProxyConnect,
    SniffResult,
)
from ..proto.sniff import sniff as sniff_first_bytes
from .accept import FIRST_BYTES_TIMEOUT, MAX_PEEK
from .hsts import HSTS_FIELD, FirstResponseHeader
from .signup import SignupProtocol
from .state import RelayState
from .tunnel import RelayTunnel

if TYPE_CHECKING:  # pragma: no cover
    from ..certs.ondemand import OnDemandCertificates
    from .accept import PendingVisitor

log = logging.getLogger("kite.relay")

__all__ = ["Dispatcher", "TlsEntry", "TlsVisitor"]

#: Seconds a TLS handshake with the relay itself may take.
TLS_HANDSHAKE_TIMEOUT = 10.0
#: Bytes read from a socket to drop what was peeked.
_CONSUME_STEP = 65536


def _consume(sock: socket.socket, n: int) -> None:
    """Read ``n`` bytes that were peeked (they are in the socket buffer already)."""
    while n > 0:
        got = sock.recv(min(n, _CONSUME_STEP))
        if not got:
            return
        n -= len(got)


def _send_and_close(sock: socket.socket, data: bytes, consume: int = 0) -> None:
    """Answer and close; consume what was peeked first so the close is a FIN, not a RST."""
    try:
        if consume:
            _consume(sock, consume)
        sock.setblocking(True)
        sock.settimeout(1.0)
        if data:
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.close()


def _answer_connect(pv: PendingVisitor, head_length: int, reply: bytes) -> Optional[socket.socket]:
    """Take the socket of a CONNECT visitor, read its head and send ``reply``; None if the
    visitor is gone already."""
    sock = pv.detach()
    try:
        _consume(sock, head_length)
        sock.send(reply)
    except OSError:
        sock.close()
        return None
    return sock


def _peek_length(sock: socket.socket, limit: int) -> int:
    try:
        return len(sock.recv(limit, socket.MSG_PEEK))
    except OSError:
        return 0


#: Request methods the 400 page is sent for (RFC 9110 §9 and WebDAV's common ones).
_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ",
            b"TRACE ", b"PROPFIND ", b"MKCOL ", b"COPY ", b"MOVE ", b"LOCK ", b"UNLOCK ")


def _looks_like_http(data: bytes) -> bool:
    return data.startswith(_METHODS)


def _why_bad(exc: Exception) -> str:
    """The visitor-facing reason for a 400 (never the raw bytes it sent)."""
    text = str(exc)
    if "without Host" in text:
        return "it has no Host header, so the relay cannot tell which kite it is for " \
               "(HTTP/1.0 clients must send one)"
    if "conflicting Host" in text:
        return "it has several different Host headers"
    if "host" in text.lower():
        return "its Host header is not a host name"
    if "longer than" in text:
        return "its head is too long"
    return "it is not a valid HTTP/1.x request"



def tls_failure_reason(exc: BaseException) -> str:
    """Why a TLS handshake with the relay failed, in words (never empty)."""
    if isinstance(exc, asyncio.TimeoutError):
        return f"no handshake within {TLS_HANDSHAKE_TIMEOUT:g} s"
    reason = getattr(exc, "reason", None)
    if isinstance(exc, ssl.SSLError) and reason:
        if "ALERT" in reason and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason):
            return (f"the peer rejected the relay's certificate ({reason}): it does not trust "
                    f"it (the backend needs --ca or --fingerprint)")
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNSUPPORTED_PROTOCOL",
                      "VERSION_TOO_LOW"):
            return f"the peer does not speak a TLS version the relay takes ({reason})"
        return reason
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, EOFError)) or not str(exc):
        what = type(exc).__name__
        return (f"the peer closed the connection during the handshake ({what}; a backend "
                f"that does not trust the relay's certificate does this)")
    return f"{type(exc).__name__}: {exc}"

class TlsEntry(asyncio.Protocol):
    """The first protocol inside a TLS connection the relay terminated: reads one head and
    hands the connection on, to a :class:`RelayTunnel` or as a CONNECT visitor."""

    def __init__(self, dispatcher: Dispatcher, peer: str) -> None:
        self.dispatcher = dispatcher
        self.peer = peer
        self.transport: Optional[asyncio.Transport] = None
        self.buf = bytearray()
        self._timer: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        # Still unclassified: counted as pending, and bounded in time like a new connection.
        self.dispatcher.tls_waiting += 1
        self._timer = self.dispatcher.loop.call_later(FIRST_BYTES_TIMEOUT, self._timeout)

    def _timeout(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is not None:
            log.debug("TLS visitor %s: said nothing within %g s; closed", self.peer,
                      FIRST_BYTES_TIMEOUT)
            self._done()
            transport.abort()
            if self.dispatcher.note_silent is not None:
                self.dispatcher.note_silent()

    def _done(self) -> None:
        """No longer waiting for the head (handed on, or gone)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.dispatcher.tls_waiting -= 1
            self.transport = None

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        self.buf += data
        end = find_head_end(self.buf)
        if end is None:
            if len(self.buf) > MAX_HEAD:
                log.info("TLS visitor %s refused: first head too long", self.peer)
                self._done()
                transport.close()
            return
        data_, self.buf = bytes(self.buf), bytearray()
        try:  # still counted as being set up while its stream opens (admit_visitor)
            self.head_received(transport, data_, end)
        finally:
            self._done()

    def head_received(self, transport: asyncio.Transport, data: bytes, end: int) -> None:
        """The first head is ``data[:end]`` (the rest follows it)."""
        self.dispatcher.tls_head(transport, self.peer, data, end)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._done()


class TlsVisitor(TlsEntry):
    """A visitor of an http kite whose TLS the relay terminates: its first request head
    (read like :class:`TlsEntry` does: bounded in size and time) opens a stream of the
    kite's tunnel as the stream-open payload - pagekite.py backends read the request from
    it - and the transport goes to that stream's :class:`StreamProtocol` (from then on
    plaintext is decrypted straight into the tunnel writer's buffer)."""

    def __init__(self, dispatcher: Dispatcher, addr, port: int, host: str) -> None:
        super().__init__(dispatcher, f"{addr[0]}:{addr[1]}")
        self.addr = addr
        self.port = port
        self.host = host

    def head_received(self, transport: asyncio.Transport, data: bytes, end: int) -> None:
        # The stream-open payload is as large as a peeked plain request at most (the head,
        # and what else fits); a longer first read goes the way of all later data.
        cut = max(end, MAX_PEEK)
        protocol = self.open_stream(transport, data[:cut], end)
        if protocol is not None:
            transport.set_protocol(protocol)
            protocol.connection_made(transport)
            if len(data) > cut:
                feed_protocol(protocol, memoryview(data)[cut:])

    def open_stream(self, transport: asyncio.Transport, data: bytes,
                    end: int) -> Optional[StreamProtocol]:
        return self.dispatcher.terminated_stream(transport, self.addr, self.port, self.host,
                                                 data, end)


class FleetTlsVisitor(TlsVisitor):
    """A visitor of an http kite that flies on another relay of the fleet, whose TLS this
    relay terminates (one of its certificates covers the name): the first head opens a
    stream of the fleet link to that relay, marked ``RTLS`` like a stream of a kite's own
    tunnel, and the decrypted bytes travel on the link."""

    def __init__(self, dispatcher: Dispatcher, addr, port: int, host: str, link) -> None:
        super().__init__(dispatcher, addr, port, host)
        self.link = link

    def open_stream(self, transport: asyncio.Transport, data: bytes,
                    end: int) -> Optional[StreamProtocol]:
        return self.dispatcher.terminated_hand_over(transport, self.addr, self.port,
                                                    self.host, data, end, self.link)


class Dispatcher:
    """Routes classified connections (see the module docstring); owns the tasks it starts."""

    def __init__(self, state: RelayState, certs: CertStore) -> None:
        self.state = state
        self.certs = certs
        self.loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task] = set()
        self.tls_waiting = 0  # TLS connections to the relay whose first head has not come
        self.note_silent: Optional[Callable[[], None]] = None  # the acceptor counts timeouts
        #: Certificates on demand for kite names (--acme-on-demand), set by the server.
        self.on_demand: Optional[OnDemandCertificates] = None

    def setting_up(self) -> int:
        """Connections being set up (TLS handshakes, hand-overs, TLS heads awaited)."""
        return len(self._tasks) + self.tls_waiting

    def _spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel connections still being set up."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- first bytes ----------------------------------------------------------------------------
    def refuse(self, pv: PendingVisitor, reason: str | TooManyStreams, answer: bytes,
               consume: bool = True, *, kite: str = "", proto: str = "", result: str = "refused",
               head: bytes = b"") -> None:
        """Answer ``answer`` and close; the access log says ``result`` (``refused``,
        ``offline``, ``quota``) with ``reason``."""
        log.log(_refusal_level(reason), "visitor %s refused: %s", pv.peer(), reason)
        if self.state.access_log is not None:
            self.state.access_log.refused(pv.peer(), kite, proto, str(reason), result,
                                          head=head)
        sock = pv.detach()
        _send_and_close(sock, answer, _peek_length(sock, MAX_PEEK) if consume else 0)

    def refuse_if_full(self, pv: PendingVisitor, answer: bytes, *, kite: str, proto: str) -> bool:
        """Refuse ``pv`` with ``answer`` when visitors may take no more connections (the
        tunnel reserve: RelayState.admit_visitor); asked before work is spent on a visitor
        whose stream opens later (a TLS handshake, a hand-over)."""
        try:
            self.state.admit_visitor()
        except RelayFull as exc:
            self.refuse(pv, exc, answer, kite=kite, proto=proto)
            return True
        return False

    def page(self, status: int, name: str, *, json_wanted: bool = False,
             variant: str = "") -> bytes:
        """An HTTP refusal page: the relay's template ``STATUS-VARIANT.html`` or
        ``STATUS.html`` (``--error-pages``), else the built-in one."""
        pages = self.state.error_pages
        template = (variant and pages.get(f"{status}-{variant}")) or pages.get(str(status))
        return http_error(status, name, json_wanted=json_wanted, template=template)

    def unrecognised(self, pv: PendingVisitor, exc: Exception, data: bytes) -> None:
        """First bytes no kite can take: an HTTP request (a method and a space first) gets a
        400 page naming the problem, anything else a plain close."""
        answer = b""
        if _looks_like_http(data):
            answer = self.page(400, _why_bad(exc))
        self.refuse(pv, f"unrecognised first bytes: {exc}", answer)

    def dispatch(self, pv: PendingVisitor, result, data: bytes) -> None:
        kind = result.kind
        if kind == "ping":
            sock = pv.detach()
            _send_and_close(sock, build_ping_reply(self.state.uuid), len(data))
        elif kind == "tunnel":
            if self.certs.default is not None and not self.state.config.allow_plain:
                # A relay with a certificate carries secrets and visitors' bytes encrypted
                # only, unless told otherwise (pagekite.py backends without TLS need it).
                self.refuse(pv, "plain (unencrypted) tunnel refused: this relay takes TLS "
                            "tunnels (start it with --allow-plain to take plain ones too)",
                            handshake.TUNNEL_FORBIDDEN)
                return
            self._start_tunnel(pv.detach(), pv.addr)
        elif kind == "connect":
            self._dispatch_connect(pv, result, data)
        elif kind == "http":
            self._dispatch_http(pv, result, data)
        elif kind == "tls":
            self._dispatch_tls(pv, result, data)
        else:  # pragma: no cover - sniff returns only the kinds above
            self.refuse(pv, f"unexpected first bytes {data[:16]!r}", b"")

    def _dispatch_http(self, pv: PendingVisitor, result, data: bytes) -> None:
        host = result.host
        on_demand = self.on_demand
        if on_demand is not None and result.path.startswith(ACME_CHALLENGE_PATH):
            answer = on_demand.http01(host, result.path)
            if answer is not None:  # the CA checks an order under way: before the kites
                log.info("acme: http-01: answered %s for %s", pv.peer(), host)
                sock = pv.detach()
                _send_and_close(sock, answer, _peek_length(sock, MAX_PEEK))
                return
        if self.state.is_relay_name(host) and self.state.signup is not None:
            self._spawn(self._serve_relay_http(pv.detach(), pv.addr[0]))
            return
        if self.state.is_reserved(host):
            self.refuse(pv, f"HTTP for the relay's own name {host}",
                        self.page(404, host, json_wanted=result.wants_json),
                        kite=host, proto="http", head=data)
            return
        bare: tuple[str, ...] = ("websocket", "http") if result.websocket else ("http",)
        protos = tuple(f"{p}-{pv.port}" for p in bare) + bare
        tunnel: Optional[RelayTunnel]
        tunnel, proto = self.state.routes.lookup(protos, host)  # type: ignore[assignment]
        if tunnel is None or proto is None:
            if self._hand_over(pv, protos, host, bare[0], pv.port):
                return
            want_json = result.wants_json
            if self.state.has_grant("http", host):
                self.refuse(pv, f"kite http:{host} is offline",
                            self.page(503, host, json_wanted=want_json),
                            kite=host, proto="http", result="offline", head=data)
            else:
                self.refuse(pv, f"no kite http:{host}",
                            self.page(404, host, json_wanted=want_json),
                            kite=host, proto="http", head=data)
            return
        if on_demand is not None and not self.certs.covers(host):
            on_demand.request(host)  # plain visitors start the order; they are served as ever
        if self._redirects(host) and self.has_https(host, pv.port):
            self.refuse(pv, f"plain HTTP for {host}: redirected to https",
                        https_redirect(host, pv.port, result.path))
            return
        try:
            sid = tunnel.new_sid()
        except TooManyStreams as exc:
            self.refuse(pv, exc, self.page(503, host, json_wanted=result.wants_json),
                        kite=host, proto="http", head=data)
            return
        self._open_stream(pv, tunnel, sid, bare_proto(proto), host, pv.port, payload=data,
                          skip=len(data))

    def _redirects(self, host: str) -> bool:
        """``--redirect-http`` for the relay, or ``redirect_http`` of a ``[[kite]]`` table
        covering ``host``."""
        cfg = self.state.config
        return cfg.redirect_http or bool(cfg.redirect_kites) and any(
            domain_matches(d, host) for d in cfg.redirect_kites)

    def _hsts(self, host: str) -> Optional[int]:
        """The HSTS max-age for ``host``: its ``[[kite]]`` table's (exact before wildcard),
        else the relay's ``--hsts``, else None."""
        cfg = self.state.config
        if cfg.hsts_kites:
            score, value = max(((domain_matches(d, host), v) for d, v in cfg.hsts_kites.items()),
                               key=lambda sv: sv[0])
            if score:
                return value
        return cfg.hsts

    def has_https(self, host: str, port: int) -> bool:
        """Visitors of ``host`` on plain-HTTP ``port`` can reach it over https (on 443 for
        80 and 443, else on the same port): a certificate covers the name (the relay
        terminates TLS for its http kite), or an https kite flies."""
        if self.certs.covers(host):
            return True
        tls_port = 443 if port in (80, 443) else port
        return self.state.routes.lookup((f"https-{tls_port}", "https"), host)[0] is not None

    def _dispatch_tls(self, pv: PendingVisitor, result, data: bytes) -> None:
        sni = result.sni
        certs = self.certs
        default = certs.default
        # The relay's own names first: they are never kites (a wildcard kite above them
        # must not receive the ClientHellos of tunnels).
        if default is not None and (sni is None or self.state.is_relay_name(sni)):
            if result.max_version < TLS_1_2:
                self._refuse_old_tls(pv, result)
                return
            context = certs.context_for(sni) or default.context
            self._start_tunnel(pv.detach(), pv.addr, context)
            return
        if sni and not self.state.is_reserved(sni):
            protos = (f"https-{pv.port}", "https")
            tunnel: Optional[RelayTunnel]
            tunnel, _ = self.state.routes.lookup(protos, sni)  # type: ignore[assignment]
            if tunnel is not None:  # end to end: never decrypted here
                try:
                    sid = tunnel.new_sid()
                except TooManyStreams as exc:
                    self.refuse(pv, exc, b"", kite=sni, proto="https")
                    return
                self._open_stream(pv, tunnel, sid, "https", sni, pv.port, payload=data,
                                  skip=len(data))
                return
            terminate = certs.context_for(sni)
            if terminate is not None and self._http_route(sni, pv.port)[0] is not None:
                if result.max_version < TLS_1_2:
                    self._refuse_old_tls(pv, result)
                    return
                if self.refuse_if_full(pv, b"", kite=sni, proto="https"):
                    return
                self._spawn(self._terminate(pv.detach(), pv.addr, pv.port, sni, terminate))
                return
            if terminate is None and self.on_demand is not None and \
                    self._http_route(sni, pv.port)[0] is not None:
                waiter = self.on_demand.request(sni)
                if waiter is not None:
                    if result.max_version < TLS_1_2:
                        self._refuse_old_tls(pv, result)
                        return
                    if self.refuse_if_full(pv, b"", kite=sni, proto="https"):
                        return
                    self._spawn(self._terminate_when_certified(pv.detach(), pv.addr, pv.port,
                                                               sni, waiter))
                    return
            if self._hand_over(pv, protos, sni, "https", pv.port):
                return
            if terminate is not None and result.max_version >= TLS_1_2 and \
                    self._hand_over_terminated(pv, sni, terminate):
                return
        if sni and self.state.has_grant("https", sni):
            self.refuse(pv, f"kite https:{sni} is offline", TLS_ALERT_INTERNAL_ERROR,
                        kite=sni, proto="https", result="offline")
        else:
            self.refuse(pv, f"no https kite for SNI {sni!r}", TLS_ALERT_UNRECOGNIZED_NAME,
                        kite=sni or "", proto="https")

    def _refuse_old_tls(self, pv: PendingVisitor, result) -> None:
        """TLS the relay terminates is 1.2 or newer: an older client gets the alert now
        (the TLS layer would only close the connection)."""
        self.refuse(pv, f"TLS version 0x{result.max_version:04x} for {result.sni or 'no SNI'}: "
                        "TLS 1.2 or newer needed", TLS_ALERT_PROTOCOL_VERSION)

    def _http_route(self, host: str, port: int):
        """The tunnel and protocol of the http kite ``host`` for a visitor on ``port``."""
        return self.state.routes.lookup((f"http-{port}", "http"), host)

    async def _terminate(self, sock: socket.socket, addr, port: int, host: str,
                         context: ssl.SSLContext) -> None:
        """TLS for a visitor of the http kite ``host``, then a stream (TlsVisitor)."""
        try:
            await accept_tls(self.loop, lambda: TlsVisitor(self, addr, port, host), sock,
                             context, handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            log.info("visitor %s:%s of %s: TLS handshake failed: %s", addr[0], addr[1], host,
                     exc or type(exc).__name__)
            sock.close()

    async def _terminate_when_certified(self, sock: socket.socket, addr, port: int, host: str,
                                        waiter: asyncio.Future) -> None:
        """A TLS visitor of the http kite ``host`` whose certificate is being ordered: wait
        for the order (FIRST_VISITOR_WAIT s at most; the ClientHello waits unread in the
        socket), then terminate its TLS, or send the unrecognized_name alert."""
        try:
            await asyncio.wait_for(asyncio.shield(waiter), FIRST_VISITOR_WAIT)
        except asyncio.TimeoutError:
            pass
        except BaseException:
            sock.close()
            raise
        context = self.certs.context_for(host)
        if context is None or self._http_route(host, port)[0] is None:
            peer = f"{addr[0]}:{addr[1]}"
            reason = f"no certificate for {host} yet (ordered on demand)"
            log.info("visitor %s refused: %s", peer, reason)
            if self.state.access_log is not None:
                self.state.access_log.refused(peer, host, "http", reason, "refused")
            _send_and_close(sock, TLS_ALERT_UNRECOGNIZED_NAME, _peek_length(sock, MAX_PEEK))
            return
        await self._terminate(sock, addr, port, host, context)

    def flies_http(self, name: str) -> bool:
        """An http kite of this relay flies exactly ``name`` (not a wildcard above it), on
        any of its ports."""
        routes = self.state.routes
        return bool(routes.tunnels("http", name)) or any(
            routes.tunnels(f"http-{p}", name) for p in self.state.public_ports)

    def terminated_stream(self, transport: asyncio.Transport, addr, port: int, host: str,
                          data: bytes, end: int) -> Optional[StreamProtocol]:
        """The first request head ``data[:end]`` of a visitor of the http kite ``host``
        whose TLS the relay terminated: open its stream (``RTLS: 1``, ``data`` as payload)
        and return the protocol for the transport; None after answering a refusal (not
        HTTP, the kite went offline meanwhile, too many streams, account blocked)."""
        peer = f"{addr[0]}:{addr[1]}"
        tunnel: Optional[RelayTunnel] = None
        proto: Optional[str] = None
        sid = 0
        result, reason, refusal = _first_request(data, end)
        if result is not None:
            bare: tuple[str, ...] = ("websocket", "http") if result.websocket else ("http",)
            tunnel, proto = self.state.routes.lookup(  # type: ignore[assignment]
                tuple(f"{p}-{port}" for p in bare) + bare, host)
            blocked = self.state.registry and self.state.registry.refusal(host, addr[0])
            if tunnel is None or proto is None:
                reason, refusal = f"kite http:{host} is offline", http_error(503, host)
            elif blocked:
                reason, refusal = blocked, http_error(403, blocked)
            else:
                try:
                    sid = tunnel.new_sid()
                except TooManyStreams as exc:
                    _refuse_terminated(transport, peer, exc, http_error(503, host))
                    return None
        if refusal is not None or tunnel is None or proto is None:
            _refuse_terminated(transport, peer, reason, refusal)
            return None
        stream = tunnel.open_stream(sid, bare_proto(proto), host, port, addr[0], addr[1],
                                    peer=peer, payload=data, rtls=True)
        hsts = self._hsts(host)
        if hsts is not None:
            FirstResponseHeader(stream, HSTS_FIELD, b"max-age=%d" % hsts)
        if self.state.registry is not None:
            self.state.registry.opened(stream, len(data))
        return StreamProtocol(tunnel, stream, 0)

    def _dispatch_connect(self, pv: PendingVisitor, result, data: bytes) -> None:
        host, port = result.host, result.port
        default = self.certs.default
        if port == 443 and default is not None and self.state.is_relay_name(host):
            # pagekite.py's --fe_certname: plain CONNECT to the relay's own name, then TLS.
            sock = _answer_connect(pv, result.head_length, TUNNEL_CONNECT_OK)
            if sock is not None:
                context = self.certs.context_for(host) or default.context
                self._start_tunnel(sock, pv.addr, context)
            return
        tunnel, proto, refusal = self.route_connect(host, port)
        if tunnel is None:
            if self._hand_over_connect(pv, result, host, port):
                return
            answer, reason = refusal
            self.refuse(pv, reason, answer, kite=host, proto="raw",
                        result="offline" if reason.endswith("kite offline") else "refused")
            return
        try:
            sid = tunnel.new_sid()
        except TooManyStreams as exc:
            self.refuse(pv, exc, connect_refused(503, f"kite {host}:{port} is busy"),
                        kite=host, proto=proto)
            return
        sock = _answer_connect(pv, result.head_length, VISITOR_CONNECT_OK)
        if sock is None:
            return
        rest = data[result.head_length:]
        self._open_stream(pv, tunnel, sid, proto, host, port, payload=rest, skip=len(rest),
                          sock=sock)

    # -- the fleet: kites that fly on another relay -------------------------------------------
    def _hand_over(self, pv: PendingVisitor, protos: tuple, host: str, proto: str,
                   port: int) -> bool:
        """Give the visitor to another relay of the fleet that flies the kite, if any."""
        link = self.state.fleet_link
        if link is None or self.state.is_reserved(host):
            return False
        target = link.holder(protos, host)
        if target is None:
            return False
        answer = self.page(503, host) if proto in ("http", "websocket") else b""
        if not self.refuse_if_full(pv, answer, kite=host, proto=proto):
            link.forward(pv.detach(), target, host, proto, port, pv.addr)
        return True

    def _hand_over_terminated(self, pv: PendingVisitor, host: str,
                              context: ssl.SSLContext) -> bool:
        """An https visitor of an http kite of another relay, and a certificate here covers
        the name: terminate its TLS here and hand the plaintext over on the fleet link."""
        link = self.state.fleet_link
        if link is None or self.state.is_reserved(host):
            return False
        port = pv.port
        target = link.holder((f"websocket-{port}", f"http-{port}", "websocket", "http"), host)
        if target is None:
            return False
        if not self.refuse_if_full(pv, b"", kite=host, proto="https"):
            self._spawn(self._terminate_for_fleet(pv.detach(), pv.addr, port, host, context,
                                                  target))
        return True

    async def _terminate_for_fleet(self, sock: socket.socket, addr, port: int, host: str,
                                   context: ssl.SSLContext, target: dict) -> None:
        """The link to ``target`` first (the ClientHello waits unread meanwhile), then TLS
        for the visitor (FleetTlsVisitor).  A relay that takes no link, or cannot be
        reached, costs the visitor its connection (logged): without a link there is no
        stream to carry the plaintext on."""
        fleet = self.state.fleet_link
        assert fleet is not None
        peer = f"{addr[0]}:{addr[1]}"
        try:
            link = await fleet.link_to(target)
        except (OSError, asyncio.TimeoutError, ValueError, KiteError) as exc:
            link, why = None, f"relay {target['forward']} unreachable: {exc or type(exc).__name__}"
        else:
            why = f"relay {target['forward']} takes no fleet link"
        if link is None:
            log.warning("TLS visitor %s of %s refused: %s", peer, host, why)
            reset_on_close(sock)
            sock.close()
            return
        try:
            await accept_tls(self.loop, lambda: FleetTlsVisitor(self, addr, port, host, link),
                             sock, context, handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            log.info("visitor %s of %s: TLS handshake failed: %s", peer, host,
                     exc or type(exc).__name__)
            sock.close()

    def terminated_hand_over(self, transport: asyncio.Transport, addr, port: int, host: str,
                             data: bytes, end: int, link) -> Optional[StreamProtocol]:
        """Like :meth:`terminated_stream`, for a kite of another relay: the first head
        ``data[:end]`` opens an ``RTLS`` stream of the fleet ``link``; None after a refusal."""
        fleet = self.state.fleet_link
        result, reason, refusal = _first_request(data, end)
        if result is not None and (fleet is None or link.closed):
            reason, refusal = "the fleet link closed", http_error(502, host)
        elif result is not None and fleet is not None:
            proto = "websocket" if result.websocket else "http"
            try:
                self.state.admit_visitor()  # again: the handshake took time
                return fleet.open_stream(link, host, proto, port, addr, data, rtls=True)
            except TooManyStreams as exc:
                _refuse_terminated(transport, f"{addr[0]}:{addr[1]}", exc, http_error(503, host))
                return None
        _refuse_terminated(transport, f"{addr[0]}:{addr[1]}", reason, refusal)
        return None

    def _hand_over_connect(self, pv: PendingVisitor, result, host: str, port: int) -> bool:
        """``CONNECT host:port`` for a kite of another relay: answered here, then handed."""
        link = self.state.fleet_link
        if link is None or self.state.is_reserved(host):
            return False
        protos = ((f"https-{port}", "https") if port == 443 else ()) + (f"raw-{port}", "raw")
        target = link.holder(protos, host)
        if target is None:
            return False
        busy = connect_refused(503, f"kite {host}:{port} is busy")
        if self.refuse_if_full(pv, busy, kite=host, proto="raw"):
            return True
        sock = _answer_connect(pv, result.head_length, VISITOR_CONNECT_OK)
        if sock is not None:
            proto = "https" if port == 443 and link.holder(protos[:2], host) else "raw"
            link.forward(sock, target, host, proto, port, pv.addr)
        return True

    def fleet_visitor(self, transport: asyncio.Transport, peer: str, data: bytes,
                      end: int) -> None:
        """A visitor handed over by another relay of the fleet (kite.proto.fleet)."""
        link = self.state.fleet_link
        try:
            head = parse_forward_head(data[:end])
        except RemoteProtocolError as exc:
            log.warning("fleet visitor from %s refused: %s", peer, exc)
            transport.close()
            return
        if link is None or not link.accepts(head.secret):
            log.warning("fleet visitor from %s refused: %s", peer,
                        "not in a fleet" if link is None else "wrong fleet secret")
            transport.close()
            return
        self.fleet_stream(transport, peer, head, data[end:])

    def fleet_link(self, transport: asyncio.Transport, peer: str, data: bytes, end: int) -> None:
        """A link of another relay of the fleet, carrying many visitors (kite.proto.fleet)."""
        link = self.state.fleet_link
        if link is None:
            log.warning("fleet link from %s refused: not in a fleet", peer)
            transport.close()
            return
        link.accept_link(transport, peer, data, end, self.fleet_stream)

    def fleet_stream(self, transport: asyncio.Transport, peer: str, head: ForwardHead,
                     leftover: bytes, rtls: bool = False) -> None:
        """``transport`` is a visitor handed over by relay ``peer`` (its secret checked),
        ``leftover`` its first bytes: join it to the kite's tunnel, or refuse it.  ``rtls``:
        the other relay terminated the visitor's TLS (http and websocket kites only)."""
        if rtls and head.proto not in ("http", "websocket"):
            log.warning("visitor from relay %s refused: RTLS for a %s stream", peer, head.proto)
            transport.close()
            return
        bare: tuple[str, ...] = ("websocket", "http") if head.proto == "websocket" else (head.proto,)
        protos = tuple(f"{p}-{head.port}" for p in bare) + bare
        tunnel: Optional[RelayTunnel]
        tunnel, proto = self.state.routes.lookup(protos, head.host)  # type: ignore[assignment]
        visitor = (f"[{head.visitor_ip}]:{head.visitor_port}" if ":" in head.visitor_ip
                   else f"{head.visitor_ip}:{head.visitor_port}")
        refusal = self.state.registry and self.state.registry.refusal(head.host, head.visitor_ip)
        if tunnel is None or proto is None or refusal:
            reason = refusal or f"kite {head.proto}:{head.host} is not here (any more)"
            log.info("visitor %s (from relay %s) refused: %s", visitor, peer, reason)
            if head.proto in ("http", "websocket"):
                transport.write(http_error(403, reason) if refusal else http_error(503, head.host))
            elif head.proto == "https":
                transport.write(TLS_ALERT_INTERNAL_ERROR)
            transport.close()
            return
        try:
            sid = tunnel.new_sid()
        except TooManyStreams as exc:
            log.log(_refusal_level(exc), "visitor %s (from relay %s) refused: %s", visitor,
                    peer, exc)
            transport.close()
            return
        self._stream_on_transport(transport, tunnel, sid, bare_proto(proto), head.host,
                                  head.port, visitor, leftover, b"", rtls=rtls)

    def route_connect(self, host: str, port: int):
        """Which tunnel carries ``CONNECT host:port``: ``(tunnel, proto, None)``, or
        ``(None, None, (answer, reason))``.  Only kites are reachable: never an open proxy."""
        if port == 443:
            protos: tuple[str, ...] = ("https-443", "https")
        elif port in (80, 8080):
            protos = (f"http-{port}", "http")
        else:
            protos = ()
        protos = protos + (f"raw-{port}", "raw")
        state = self.state
        if state.is_reserved(host):
            msg = f"{host} is this relay, not a kite"
            return None, None, (connect_refused(403, msg), f"CONNECT {host}:{port}: {msg}")
        tunnel, proto = state.routes.lookup(protos, host)
        if tunnel is not None and proto is not None:
            return tunnel, bare_proto(proto), None
        if any(state.has_grant(p, host) for p in protos if "-" in p or p == "raw"):
            return None, None, (connect_refused(503, f"kite {host}:{port} is offline"),
                                f"CONNECT {host}:{port}: kite offline")
        if state.routes.known_domain(host):
            msg = f"{host} is a kite, but not on port {port}"
            return None, None, (connect_refused(403, msg), f"CONNECT {host}:{port}: {msg}")
        msg = f"{host}:{port} is not a kite on this relay"
        return None, None, (connect_refused(403, msg),
                            f"CONNECT {host}:{port}: not a kite (no open proxy)")

    # -- inside the relay's own TLS -------------------------------------------------------------
    def tls_head(self, transport: asyncio.Transport, peer: str, data: bytes, end: int) -> None:
        """The first head inside a TLS connection to the relay (``data[:end]``; the rest
        follows it): a tunnel request, or ``CONNECT host:port`` from ``kite connect --tls``."""
        if data[:17].lower() == b"connect pagekite:":
            tunnel = RelayTunnel(self.state, peer, tls=True)
            transport.set_protocol(tunnel)
            tunnel.connection_made(transport)
            tunnel.feed_handshake(data)
            return
        if data.startswith(FLEET_METHOD):
            self.fleet_visitor(transport, peer, data, end)
            return
        if data.startswith(LINK_METHOD):
            self.fleet_link(transport, peer, data, end)
            return
        if self.state.signup is not None and data[:5] in (b"POST ", b"GET /"):
            protocol = SignupProtocol(self.state.signup, peer.rpartition(":")[0].strip("[]"), data)
            transport.set_protocol(protocol)
            protocol.connection_made(transport)
            return
        result: Optional[SniffResult]
        try:
            result = sniff_first_bytes(data[:end])
        except SniffError as exc:
            result = None
            log.info("TLS visitor %s refused: %s", peer, exc)
        if not isinstance(result, ProxyConnect):
            log.warning("tunnel from %s: bad tunnel request: not CONNECT PageKite", peer)
            transport.write(handshake.TUNNEL_UNAVAILABLE)
            transport.close()
            return
        self._connect_inside_tls(transport, peer, result.host, result.port, data[end:])

    def _connect_inside_tls(self, transport: asyncio.Transport, peer: str, host: str, port: int,
                            leftover: bytes) -> None:
        """``CONNECT host:port`` arrived inside a TLS connection the relay terminated (``kite
        connect --tls`` through strict firewalls): the TLS transport becomes the visitor."""
        tunnel, proto, refusal = self.route_connect(host, port)
        ip = peer.rpartition(":")[0].strip("[]")
        if tunnel is not None and self.state.registry and self.state.registry.refusal(host, ip):
            tunnel, refusal = None, (b"", "account blocked")
        if tunnel is None:
            answer, reason = refusal
            log.info("visitor %s refused: %s", peer, reason)
            if self.state.access_log is not None:
                self.state.access_log.refused(peer, host, proto or "raw", reason,
                                              "quota" if reason == "account blocked" else "refused")
            transport.write(answer)
            transport.close()
            return
        try:
            sid = tunnel.new_sid()
        except TooManyStreams as exc:
            log.log(_refusal_level(exc), "visitor %s refused: %s", peer, exc)
            transport.write(connect_refused(503, f"kite {host}:{port} is busy"))
            transport.close()
            return
        self._stream_on_transport(transport, tunnel, sid, proto, host, port, peer, leftover,
                                  VISITOR_CONNECT_OK)

    def _stream_on_transport(self, transport: asyncio.Transport, tunnel, sid: int, proto: str,
                             host: str, port: int, peer: str, leftover: bytes,
                             reply: bytes, rtls: bool = False) -> None:
        """The connected ``transport`` becomes stream ``sid`` of ``tunnel`` (visitor ``peer``,
        ``leftover``: its bytes already read), after ``reply`` is written to it.  ``rtls``:
        TLS was terminated for it (by another relay of the fleet)."""
        if reply:
            transport.write(reply)
        rip, _, rport = peer.rpartition(":")
        stream = tunnel.open_stream(sid, proto, host, port, rip.strip("[]"), int(rport or 0),
                                    peer=peer, payload=leftover, rtls=rtls)
        hsts = self._hsts(host) if rtls else None
        if hsts is not None:
            FirstResponseHeader(stream, HSTS_FIELD, b"max-age=%d" % hsts)
        if self.state.registry is not None:
            self.state.registry.opened(stream, len(leftover))
        if self.state.access_log is not None:
            self.state.access_log.opened(stream, peeked=len(leftover))
        protocol = StreamProtocol(tunnel, stream, 0)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)

    # -- streams --------------------------------------------------------------------------------
    def _open_stream(self, pv: PendingVisitor, tunnel, sid: int, proto: str, host: str,
                     port: int, *, payload: bytes, skip: int,
                     sock: Optional[socket.socket] = None) -> None:
        """A visitor becomes stream ``sid`` (from ``tunnel.new_sid()``, just before)."""
        registry = self.state.registry
        refusal = registry and registry.refusal(host, pv.addr[0])
        if refusal:  # the account is out of quota, expired or disabled
            assert registry is not None
            result = "quota" if registry.reason(host) else "refused"
            if sock is not None:
                sock.close()
                if self.state.access_log is not None:
                    self.state.access_log.refused(pv.peer(), host, proto, refusal, result)
            else:
                registry = self.state.registry
                why = (registry.reason(host) if registry is not None else None) or "limits"
                self.refuse(pv, refusal,
                            self.page(403, refusal, variant=why) if proto == "http" else b"",
                            kite=host, proto=proto, result=result, head=payload)
            return
        if sock is None:
            sock = pv.detach()
        stream = tunnel.open_stream(sid, proto, host, port, pv.addr[0], pv.addr[1],
                                    peer=pv.peer(), payload=payload)
        if self.state.registry is not None:
            self.state.registry.opened(stream, len(payload))
        if self.state.access_log is not None:
            self.state.access_log.opened(stream, head=payload, peeked=len(payload))
        self._spawn(self._connect_visitor(sock, tunnel, stream, skip))

    async def _connect_visitor(self, sock, tunnel, stream: Stream, skip: int) -> None:
        try:
            await self.loop.connect_accepted_socket(
                lambda: StreamProtocol(tunnel, stream, skip), sock=sock)
        except OSError as exc:
            log.info("visitor %s: %s", stream.peer, exc)
            sock.close()
            tunnel.discard(stream, close_local=False)

    async def _serve_relay_http(self, sock: socket.socket, ip: str) -> None:
        """Plain HTTP to the relay's own name with --signup: POST /api/signup."""
        assert self.state.signup is not None
        service = self.state.signup
        try:
            await self.loop.connect_accepted_socket(lambda: SignupProtocol(service, ip), sock=sock)
        except OSError:
            sock.close()

    # -- tunnels --------------------------------------------------------------------------------
    def _start_tunnel(self, sock: socket.socket, addr,
                      context: Optional[ssl.SSLContext] = None) -> None:
        """A tunnel (or ``kite connect --tls`` visitor) in TLS with ``context``, or plain."""
        self._spawn(self._connect_tunnel(sock, addr, context))

    async def _connect_tunnel(self, sock: socket.socket, addr,
                              context: Optional[ssl.SSLContext]) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        try:
            if context is not None:
                await accept_tls(self.loop, lambda: TlsEntry(self, peer), sock, context,
                                 handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
            else:
                await self.loop.connect_accepted_socket(
                    lambda: RelayTunnel(self.state, peer, tls=False), sock=sock)
        except (OSError, asyncio.TimeoutError) as exc:
            log.info("tunnel from %s: TLS handshake failed: %s", peer, tls_failure_reason(exc))
            self.state.count_handshake("tls")
            sock.close()


def _first_request(data: bytes, end: int) -> tuple[Optional[HttpRequest], str, Optional[bytes]]:
    """The first head ``data[:end]`` inside TLS the relay terminated, as ``(request, "",
    None)``; or ``(None, reason, 400 page)`` when it is not an HTTP/1.x request."""
    try:
        result = sniff_first_bytes(data[:end])
    except SniffError as exc:
        return None, str(exc), http_error(400, "not an HTTP/1.x request")
    if not isinstance(result, HttpRequest):
        return None, "not an HTTP request", http_error(400, "not an HTTP/1.x request")
    return result, "", None


def _refusal_level(reason: object) -> int:
    """The log level of a refusal: RelayFull is summarised by the acceptor's overload line
    (one per OVERLOAD_LOG_INTERVAL), so each visitor is logged at DEBUG only."""
    return logging.DEBUG if isinstance(reason, RelayFull) else logging.INFO


def _refuse_terminated(transport: asyncio.Transport, peer: str, reason: str | TooManyStreams,
                       refusal: Optional[bytes]) -> None:
    """Answer a TLS visitor the relay will not serve (``refusal``, if any) and close."""
    log.log(_refusal_level(reason), "TLS visitor %s refused: %s", peer, reason)
    transport.write(refusal or b"")
    transport.close()
