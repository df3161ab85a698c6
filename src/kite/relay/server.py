"""The relay (frontend): one port for tunnels and visitors, told apart by their first bytes.

Theory of operation
-------------------
The relay accepts connections itself and *peeks* at their first bytes (``MSG_PEEK``) before
any protocol owns the socket.  Peeking, not reading, is what lets one port do everything:

* a TLS ClientHello whose SNI names an https kite is handed to a stream untouched (the
  visitor's TLS is end to end; the relay never decrypts it);
* a ClientHello for the relay itself (no SNI, or one of its own names) is given to the TLS
  layer, which reads that very hello from the socket, and the tunnel runs inside;
* ``CONNECT PageKite:`` is a plain tunnel, ``CONNECT host:port`` a proxy visitor for a raw
  or https kite (or pagekite.py's ``CONNECT relay-name:443`` before a TLS tunnel), anything
  else HTTP routed by ``Host``; the pagekite ``HEAD /ping`` probe gets its 503 at once.

Visitors are then streams of a tunnel (:mod:`kite.tunnel`): the peeked bytes travel in the
stream-open chunk, exactly as pagekite.py sends them, and the stream's protocol skips them
when it reads them for real.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Optional

from ..errors import KiteError, SniffError
from ..proto.sniff import sniff as sniff_first_bytes
from ..proto import control
from ..proto.handshake import KiteAuthorizer, build_ping_reply
from ..tunnel import Stream, StreamProtocol
from . import pages
from .registry import GrantTable, Routes

log = logging.getLogger("kite.relay")

__all__ = ["RelayConfig", "RelayServer"]

#: How long a new connection may take to say what it is.
FIRST_BYTES_TIMEOUT = 10.0
#: The most the relay peeks at before it must decide (a TLS hello or HTTP head fits).
MAX_PEEK = 16384 + 5


@dataclass
class RelayConfig:
    listen: list = field(default_factory=lambda: [("127.0.0.1", 0)])
    grants: GrantTable = field(default_factory=GrantTable)
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_names: list = field(default_factory=list)  # SNI names that mean "the relay itself"
    keepalive: Optional[float] = 30.0
    ping_timeout: float = 10.0
    drain_timeout: float = 10.0
    zchunks: bool = False  # advertise ZChunks: ask pagekite.py backends to compress
    single_backend: set = field(default_factory=set)  # kites limited to one backend


class _PendingVisitor:
    """A new connection whose first bytes are not yet known."""

    __slots__ = ("server", "sock", "addr", "port", "handle", "deadline", "delay", "fd")

    def __init__(self, server: "RelayServer", sock: socket.socket, addr, port: int) -> None:
        self.server = server
        self.sock = sock
        self.addr = addr
        self.port = port  # the public port the visitor connected to
        self.fd = sock.fileno()
        self.deadline = time.monotonic() + FIRST_BYTES_TIMEOUT
        self.delay = 0.001
        self.handle: Optional[asyncio.TimerHandle] = None

    def peer(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}"

    def start(self) -> None:
        self.server.loop.add_reader(self.fd, self.on_readable)
        self.handle = self.server.loop.call_later(FIRST_BYTES_TIMEOUT, self.on_timeout)

    def detach(self) -> socket.socket:
        """Stop watching the socket; the caller now owns it."""
        loop = self.server.loop
        loop.remove_reader(self.fd)
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.server.pending.discard(self)
        return self.sock

    def close(self) -> None:
        self.detach()
        self.sock.close()

    def on_timeout(self) -> None:
        self.handle = None
        if self in self.server.pending:
            log.info("visitor %s: said nothing within %g s; closed", self.peer(), FIRST_BYTES_TIMEOUT)
            self.close()

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(MAX_PEEK, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("visitor %s: %s", self.peer(), exc)
            self.close()
            return
        if not data:
            self.close()
            return
        try:
            result = sniff_first_bytes(data)
        except SniffError as exc:
            self.server.refuse(self, f"unrecognised first bytes: {exc}", b"")
            return
        except Exception:  # a bug must cost this visitor, never the relay
            log.exception("visitor %s: sniffing failed", self.peer())
            self.close()
            return
        if result.kind == "need_more":
            if len(data) >= MAX_PEEK:
                self.server.refuse(self, "first bytes too long to classify", b"")
                return
            # Level-triggered readiness would fire again at once for the same bytes: wait
            # for more with a short, growing delay instead (rare: heads come in one piece).
            self.server.loop.remove_reader(self.fd)
            self.server.loop.call_later(self.delay, self._rearm)
            self.delay = min(self.delay * 2, 0.05)
            return
        try:
            self.server.dispatch(self, result, data)
        except Exception:
            log.exception("visitor %s: dispatch failed", self.peer())
            if self in self.server.pending:
                self.close()

    def _rearm(self) -> None:
        if self in self.server.pending:
            self.server.loop.add_reader(self.fd, self.on_readable)


def _consume(sock: socket.socket, n: int) -> None:
    """Read ``n`` bytes that were peeked (they are in the socket buffer already)."""
    while n > 0:
        got = sock.recv(min(n, 65536))
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


class RelayServer:
    """``kite relay``: accepts backend tunnels and visitors on the same port(s)."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.loop = asyncio.get_running_loop()
        self.routes = Routes()
        self.tunnels: set = set()
        self.sessions: dict = {}  # X-PageKite-SessionID -> tunnel, for X-PageKite-Replace
        self.pending: set = set()
        self._listeners: list = []
        self.addresses: list = []
        self.secret = os.urandom(20).hex()  # signs challenges; never leaves the process
        self.uuid = hashlib.sha1(self.secret.encode()).hexdigest()
        self.ssl_context = None
        if config.tls_cert:
            from ..tls import server_context

            self.ssl_context = server_context(config.tls_cert, config.tls_key or config.tls_cert)
        self.tls_names = {n.lower() for n in config.tls_names}
        self.closing = False
        self._tasks: set = set()
        self.public_ports: list = []
        self.authorizer = KiteAuthorizer(
            lookup_secret=config.grants.exact_secret,
            challenge_secret=self.secret,
            protos=("http", "https", "raw", "websocket"),
            ports=("virtual",),
            raw_ports=("virtual",),
            is_duplicate=self._is_duplicate,
        )

    def _is_duplicate(self, kite) -> bool:
        """Only for kites limited to one backend (``--single``): another tunnel flies it."""
        if kite.domain not in self.config.single_backend:
            return False
        others = self.routes.tunnels(kite.proto, kite.domain)
        for t in others:
            t.request_ping()  # a stale tunnel that does not answer is closed soon
        return bool(others)

    # -- listening ----------------------------------------------------------------------------
    async def start(self) -> list:
        for host, port in self.config.listen:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            lsock = socket.socket(family, socket.SOCK_STREAM)
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                lsock.bind((host, port))
            except OSError as exc:
                lsock.close()
                raise KiteError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
            lsock.listen(4096)
            lsock.setblocking(False)
            bound = lsock.getsockname()[:2]
            self.loop.add_reader(lsock.fileno(), self._on_accept, lsock, bound[1])
            self._listeners.append(lsock)
            self.addresses.append(bound)
            self.public_ports.append(bound[1])
            log.info("relay listening on %s:%d", bound[0], bound[1])
        return self.addresses

    def _on_accept(self, lsock: socket.socket, port: int) -> None:
        for _ in range(256):
            try:
                conn, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept failed: %s (out of descriptors?)", exc)
                    return
                raise
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pv = _PendingVisitor(self, conn, addr, port)
            self.pending.add(pv)
            pv.start()

    # -- dispatch -----------------------------------------------------------------------------
    def refuse(self, pv: _PendingVisitor, reason: str, answer: bytes, consume: bool = True) -> None:
        log.info("visitor %s refused: %s", pv.peer(), reason)
        sock = pv.detach()
        n = 0
        if consume:
            try:
                n = len(sock.recv(MAX_PEEK, socket.MSG_PEEK))
            except OSError:
                n = 0
        _send_and_close(sock, answer, n)

    def dispatch(self, pv: _PendingVisitor, result, data: bytes) -> None:
        kind = result.kind
        if kind == "ping":
            sock = pv.detach()
            _send_and_close(sock, build_ping_reply(self.uuid), len(data))
        elif kind == "tunnel":
            self._start_tunnel(pv.detach(), pv.addr, tls=False)
        elif kind == "connect":
            self._dispatch_connect(pv, result, data)
        elif kind == "http":
            self._dispatch_http(pv, result, data)
        elif kind == "tls":
            self._dispatch_tls(pv, result, data)
        else:  # pragma: no cover - sniff returns only the kinds above
            self.refuse(pv, f"unexpected first bytes {data[:16]!r}", b"")

    def _dispatch_http(self, pv: _PendingVisitor, result, data: bytes) -> None:
        host = result.host
        protos = ("websocket", "http") if result.websocket else ("http",)
        protos = tuple(f"{p}-{pv.port}" for p in protos) + protos
        tunnel, proto = self.routes.lookup(protos, host)
        if tunnel is None:
            want_json = result.wants_json
            if self.config.grants.find("http", host) is not None:
                self.refuse(pv, f"kite http:{host} is offline",
                            pages.http_error(503, host, json_wanted=want_json))
            else:
                self.refuse(pv, f"no kite http:{host}",
                            pages.http_error(404, host, json_wanted=want_json))
            return
        proto = proto.split("-", 1)[0]
        self._open_stream(pv, tunnel, proto, host, pv.port, payload=data, skip=len(data))

    def _dispatch_tls(self, pv: _PendingVisitor, result, data: bytes) -> None:
        sni = result.sni
        if sni:
            protos = (f"https-{pv.port}", "https")
            tunnel, _ = self.routes.lookup(protos, sni)
            if tunnel is not None:
                self._open_stream(pv, tunnel, "https", sni, pv.port, payload=data, skip=len(data))
                return
        if self.ssl_context is not None and (sni is None or sni in self.tls_names):
            self._start_tunnel(pv.detach(), pv.addr, tls=True)
            return
        if sni and self.config.grants.find("https", sni) is not None:
            self.refuse(pv, f"kite https:{sni} is offline", pages.TLS_ALERT_INTERNAL_ERROR)
        else:
            self.refuse(pv, f"no https kite for SNI {sni!r}", pages.TLS_ALERT_UNRECOGNIZED_NAME)

    def _dispatch_connect(self, pv: _PendingVisitor, result, data: bytes) -> None:
        host, port = result.host, result.port
        if (port == 443 and self.ssl_context is not None and host in self.tls_names):
            # pagekite.py's --fe_certname: plain CONNECT to the relay's own name, then TLS.
            sock = pv.detach()
            try:
                _consume(sock, result.head_length)
                sock.send(b"HTTP/1.0 200 Connection Established\r\n\r\n")
            except OSError:
                sock.close()
                return
            self._start_tunnel(sock, pv.addr, tls=True)
            return
        tunnel, proto, refusal = self.route_connect(host, port)
        if tunnel is None:
            answer, reason = refusal
            self.refuse(pv, reason, answer)
            return
        sock = pv.detach()
        try:
            _consume(sock, result.head_length)
            sock.send(pages.CONNECT_OK)
        except OSError:
            sock.close()
            return
        rest = data[result.head_length:]
        pv.sock = sock
        self._open_stream(pv, tunnel, proto.split("-", 1)[0], host, port, payload=rest,
                          skip=len(rest), detached=True)

    def route_connect(self, host: str, port: int):
        """Which tunnel carries ``CONNECT host:port``: ``(tunnel, proto, None)``, or
        ``(None, None, (answer, reason))``.  Only kites are reachable: never an open proxy."""
        if port == 443:
            protos = ("https-443", "https")
        elif port in (80, 8080):
            protos = (f"http-{port}", "http")
        else:
            protos = ()
        protos = protos + (f"raw-{port}", "raw")
        tunnel, proto = self.routes.lookup(protos, host)
        if tunnel is not None:
            return tunnel, proto.split("-", 1)[0], None
        grants = self.config.grants
        if any(grants.find(p, host) is not None for p in protos if "-" in p or p == "raw"):
            return None, None, (pages.connect_refused(503, f"kite {host}:{port} is offline"),
                                f"CONNECT {host}:{port}: kite offline")
        if self.routes.known_domain(host):
            msg = f"{host} is a kite, but not on port {port}"
            return None, None, (pages.connect_refused(403, msg), f"CONNECT {host}:{port}: {msg}")
        msg = f"{host}:{port} is not a kite on this relay"
        return None, None, (pages.connect_refused(403, msg),
                            f"CONNECT {host}:{port}: not a kite (no open proxy)")

    def connect_inside_tls(self, carrier, host: str, port: int, leftover: bytes) -> None:
        """``CONNECT host:port`` arrived inside a TLS connection the relay terminated (``kite
        connect --tls`` through strict firewalls): the TLS transport becomes the visitor."""
        transport = carrier.transport
        tunnel, proto, refusal = self.route_connect(host, port)
        if tunnel is None:
            answer, reason = refusal
            log.info("visitor %s refused: %s", carrier.peer, reason)
            transport.write(answer)
            transport.close()
            return
        transport.write(pages.CONNECT_OK)
        sid = tunnel.new_sid()
        stream = Stream(tunnel, sid, proto=proto, host=host, port=port, peer=carrier.peer)
        tunnel.add_stream(stream, announce=False)
        rip, _, rport = carrier.peer.rpartition(":")
        tunnel.write_chunk(*control.build_stream_open(
            sid, proto, host, port, rip, int(rport or 0), payload=leftover))
        tunnel.announce_window(stream)
        protocol = StreamProtocol(tunnel, stream, 0)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)

    # -- streams ------------------------------------------------------------------------------
    def _open_stream(self, pv: _PendingVisitor, tunnel, proto: str, host: str, port: int,
                     *, payload: bytes, skip: int, detached: bool = False) -> None:
        sock = pv.sock if detached else pv.detach()
        sid = tunnel.new_sid()
        stream = Stream(tunnel, sid, proto=proto, host=host, port=port, peer=pv.peer())
        tunnel.add_stream(stream, announce=False)
        rip = pv.addr[0]
        tunnel.write_chunk(*control.build_stream_open(
            sid, proto, host, port, rip, pv.addr[1], payload=payload))
        tunnel.announce_window(stream)
        task = self.loop.create_task(self._connect_visitor(sock, tunnel, stream, skip))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect_visitor(self, sock, tunnel, stream: Stream, skip: int) -> None:
        try:
            await self.loop.connect_accepted_socket(
                lambda: StreamProtocol(tunnel, stream, skip), sock=sock)
        except OSError as exc:
            log.info("visitor %s: %s", stream.peer, exc)
            sock.close()
            tunnel.discard(stream, close_local=False)

    # -- tunnels ------------------------------------------------------------------------------
    def _start_tunnel(self, sock: socket.socket, addr, *, tls: bool) -> None:
        from .tunnel import RelayTunnel

        task = self.loop.create_task(self._connect_tunnel(sock, addr, tls, RelayTunnel))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect_tunnel(self, sock, addr, tls: bool, factory) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        try:
            await self.loop.connect_accepted_socket(
                lambda: factory(self, peer, tls), sock=sock,
                ssl=self.ssl_context if tls else None,
                ssl_handshake_timeout=10.0 if tls else None)
        except (OSError, asyncio.TimeoutError) as exc:
            log.info("tunnel from %s: TLS handshake failed: %s", peer, exc or type(exc).__name__)
            sock.close()

    def tunnel_closed(self, tunnel) -> None:
        self.tunnels.discard(tunnel)
        for sid in [k for k, v in self.sessions.items() if v is tunnel]:
            del self.sessions[sid]
        for proto, domain in self.routes.remove_tunnel(tunnel):
            log.info("kite offline: %s:%s", proto, domain)

    # -- shutdown -----------------------------------------------------------------------------
    async def close(self, drain_timeout: Optional[float] = None) -> None:
        """Stop accepting, let open streams finish (up to ``drain_timeout``), close tunnels."""
        if self.closing:
            return
        self.closing = True
        for lsock in self._listeners:
            self.loop.remove_reader(lsock.fileno())
            lsock.close()
        self._listeners.clear()
        for pv in list(self.pending):
            pv.close()
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        deadline = self.loop.time() + timeout
        while any(t.streams for t in self.tunnels) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for tunnel in list(self.tunnels):
            tunnel.close("relay shutting down")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
