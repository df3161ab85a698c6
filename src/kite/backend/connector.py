"""``kite expose``: dial out to relays, fly kites, relay streams to local servers.

Theory of operation
-------------------
One :class:`RelayConnector` per relay keeps one tunnel up, with all of that relay's kites on
it, and reconnects by itself (exponential backoff with jitter, reset once a tunnel flew).

Registration (docs/protocol.md §2): the first request carries every kite with an empty
challenge; the relay answers ``SignThis`` per kite.  Towards a kite relay (it announces the
``KiteFlow`` feature) the signed kites go *in-band*, in a NOOP chunk on the same connection.
Towards anything else (pagekite.py 1.5.2) kite uses the *re-connect* variant: close, and
connect again with the signed lines — because that FE kills in-band-registered tunnels on the
first PING (§13.2), while re-connect-registered tunnels keep answering PONG.

TLS: the ClientHello (with SNI) is normally the first byte on the wire.  With
``RelaySpec.connect_name`` (``--connect-name NAME``, TOML ``connect_name``) the backend first
sends a plain ``CONNECT NAME:443``, waits for ``200``, and then does TLS checked against NAME
— pagekite.py's ``--fe_certname`` mode, and the only encrypted tunnel a pagekite.py 1.5.2
frontend survives (a ClientHello reaching its port directly crashes it, §13.1).  A kite relay
accepts it too for the names in its ``--tls-name``.  Dialing (TCP, that CONNECT, TLS) is
:func:`kite.net.dial.dial`'s; a pinned certificate (``--fingerprint``) is checked before the
tunnel request, which names and signs our kites, is written.

ZChunks: advertised only with ``BackendConfig.zchunks``; only then may the relay compress,
and a compressed chunk without it is a protocol error that closes the tunnel.  kite never
compresses what it sends.

Streams: the relay opens them; :class:`BackendTunnel` connects to the kite's local server on
the first chunk, even with an empty payload (servers that speak first: sshd), and relays
bytes with the shared machinery of :mod:`kite.net.tunnel`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import ssl
import time
from collections.abc import Callable
from typing import Optional

from .. import __version__
from ..config import BackendConfig, KiteSpec, RelaySpec
from ..errors import KiteError
from ..net.accesslog import AccessLog, AccessRecord, open_access_log, response_status
from ..net.busypoll import BusyPoll
from ..net.dial import dial
from ..net.memory import MemoryTrimmer
from ..net.tls import ClientTLS
from ..net.tunnel import Stream, StreamProtocol, TunnelProtocol
from ..proto import control, forwarded, handshake, proxyproto, signing
from ..proto.flow import KITE_FLOW_FEATURE
from ..proto.http import find_head_end, http_error
from ..proto.names import HTTP_PROTOS, bare_proto, domain_matches
from ..proto.sniff import TLS_ALERT_INTERNAL_ERROR
from . import failures
from .basicauth import AuthGuard, BasicAuth
from .urls import visitor_urls

log = logging.getLogger("kite.backend")

__all__ = ["Backend", "RelayConnector", "BackendTunnel"]

#: Backoff between reconnects: first retry after BACKOFF_MIN, doubling up to BACKOFF_MAX.
#: The cap is low on purpose: a relay that restarts must see its kites fly again within ~2 s,
#: and a connection attempt to a relay that is down costs one SYN.  A relay that *refuses*
#: our kites (wrong secret, not allowed) is retried at most every BACKOFF_REFUSED seconds.
BACKOFF_MIN = 0.1
BACKOFF_MAX = 1.5
BACKOFF_REFUSED = 30.0
HANDSHAKE_TIMEOUT = 20.0  # bounds the dial (TCP, CONNECT NAME:443, TLS) and the registration
TLS_HANDSHAKE_TIMEOUT = 10.0
VERSION = f"kite-{__version__}"
#: SO_RCVBUF of the connections to local servers (the kernel doubles it): fixed, so that
#: concurrent downloads through one tunnel share it evenly (kite.net.tunnel, "Scheduling");
#: 2 MiB of buffer: as much as a busy download autotunes to on loopback, and a LAN round
#: trip at 10 Gbit/s.
LOCAL_RCVBUF = 1024 * 1024


def _kite_matches(spec: KiteSpec, proto: str, host: str, port: int) -> int:
    """0 = no match; higher = better (exact port-specific > bare proto; exact > wildcard)."""
    dscore = domain_matches(spec.domain, host)
    if not dscore:
        return 0
    kp = spec.proto
    if kp == f"{proto}-{port}":
        return dscore * 10 + 3
    base = bare_proto(kp)
    if kp == proto or (base == proto and "-" in kp and proto != "raw"):
        return dscore * 10 + 2
    if proto == "raw" and base == "raw":
        return dscore * 10 + 1
    if proto == "websocket" and kp == "http":
        return dscore * 10 + 1
    return 0


class _FirstResponse(StreamProtocol):
    """The local side of an HTTP stream until its first read: notes the response status for
    the access log, then hands the transport to a plain :class:`StreamProtocol` (nothing is
    added to the reads after the first)."""

    __slots__ = ("_record", "_view")

    def __init__(self, tunnel: TunnelProtocol, stream: Stream, record: AccessRecord) -> None:
        super().__init__(tunnel, stream)
        self._record = record
        self._view: Optional[memoryview] = None

    def get_buffer(self, sizehint: int) -> memoryview:
        self._view = view = super().get_buffer(sizehint)
        return view

    def buffer_updated(self, nbytes: int) -> None:
        view, self._view = self._view, None
        if view is not None:
            self._record.status = response_status(view[:nbytes])
        super().buffer_updated(nbytes)
        transport = self.stream.transport
        if transport is not None:
            transport.set_protocol(StreamProtocol(self.tunnel, self.stream))


class BackendTunnel(TunnelProtocol):
    """The backend end of one tunnel: registration, then local connections per stream."""

    local_rcvbuf = LOCAL_RCVBUF

    def __init__(self, connector: RelayConnector, signed: Optional[list]) -> None:
        super().__init__()
        self.connector = connector
        self.name = f"tunnel to {connector.spec.address}"
        self.keepalive = connector.config.keepalive
        self.ping_timeout = connector.config.ping_timeout
        self.busy = connector.busy
        self.signed = signed  # re-connect round: the signed kite lines to send
        self.handshake_done: asyncio.Future = self.loop.create_future()
        self.flying: list = []
        self._inband_pending = False
        self._response_timers: dict = {}  # sid -> TimerHandle, until the first response byte

    # -- handshake ----------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        c = self.connector
        lines = self.signed if self.signed is not None else c.round1_lines()
        req = handshake.build_tunnel_request(
            lines, zchunks=c.config.zchunks, replace=c.session_id, version=VERSION,
            extra_features=[KITE_FLOW_FEATURE])
        transport.write(req)

    def handshake_data(self, buf: bytearray) -> None:
        end = find_head_end(buf)
        if end is None:
            return
        head = bytes(buf[:end])
        leftover = bytes(buf[end:])
        resp = handshake.parse_tunnel_response(head)
        self.connector.handle_response(self, resp, leftover)

    def on_kite_message(self, event) -> None:
        if isinstance(event, control.KiteReply):
            self.connector.handle_inband_reply(self, event.reply)

    # -- streams ------------------------------------------------------------------------------
    def on_stream_open(self, event) -> None:
        spec = self.connector.find_kite(event.proto, event.host, event.port)
        stream = Stream(self, event.sid, proto=event.proto, host=event.host, port=event.port,
                        peer=f"{event.rip}:{event.rport}")
        self.add_stream(stream)
        access_log = self.connector.access_log
        if spec is None:
            log.info("%s: stream %d for unknown kite %s:%s:%s refused", self.name, event.sid,
                     event.proto, event.host, event.port)
            if access_log is not None:
                access_log.refused(stream.peer, event.host, event.proto, "no such kite here",
                                   head=event.payload or b"")
            self._refuse_stream(stream, 503)
            return
        record = None
        if access_log is not None:
            record = access_log.opened(stream, head=event.payload or b"")
        if event.payload:
            stream.receive_opening(event.payload)
        # Basic auth (kite.backend.basicauth): its gate reads every request head and adds
        # the X-Forwarded-* fields itself.
        auth = self.connector.basic_auth.get(spec.name) if event.proto in HTTP_PROTOS else None
        if auth is None and spec.proto in HTTP_PROTOS and spec.forwarded \
                and event.proto in HTTP_PROTOS:
            rewriter = forwarded.ForwardedRewriter(
                client_ip=event.rip, proto="https" if event.rtls else "http", host=event.host)
            stream.enable_rewriter(rewriter)
        # --inspect: taps the stream from its first chunk on (kite.backend.inspect); None
        # when off, so the data path is untouched.  Kites with basic auth are not recorded.
        inspector = self.connector.inspector
        tap = inspector.tap(stream, spec, event) if inspector is not None and auth is None \
            else None
        task = self.loop.create_task(self._connect_local(stream, spec, event, record, tap, auth))
        self.connector.tasks.add(task)
        task.add_done_callback(self.connector.tasks.discard)

    async def _connect_local(self, stream: Stream, spec: KiteSpec, event,
                             record: Optional[AccessRecord] = None, tap=None,
                             auth: Optional[BasicAuth] = None) -> None:

        target = spec.target
        factory = None
        if auth is not None:
            guard = AuthGuard(self, stream, auth, client_ip=event.rip,
                              proto="https" if event.rtls else "http", host=event.host,
                              add_headers=spec.forwarded)
            if not guard.start():
                return  # the first request had no valid credentials: 401, no local dial
            factory = guard.protocol
        elif spec.proxy_protocol and stream.rewriter is None:
            maker = proxyproto.proxy_v1 if spec.proxy_protocol == 1 else proxyproto.proxy_v2
            try:
                header = maker(event.rip or "0.0.0.0", event.rport or 0, "127.0.0.1", event.port or 0)
            except (ValueError, KiteError):
                header = b""
            if header:
                stream.prepend_local(header)
        # The local side's protocol: one of the guard's, the inspector's, or the access
        # log's (reads the first response's status), else the plain one.
        if factory is None:
            if tap is not None:
                factory = tap.protocol_factory(self, stream)
            elif record is not None and record.method:
                factory = functools.partial(_FirstResponse, self, stream, record)
            else:
                factory = functools.partial(StreamProtocol, self, stream)
        try:
            await self.loop.create_connection(
                factory, target.host, target.port)
        except OSError as exc:
            log.info("%s: kite %s: local server %s:%d: %s", self.name, spec.name, target.host,
                     target.port, exc.strerror or exc)
            if self.connector.access_log is not None:
                self.connector.access_log.mark(
                    stream, "refused", f"local server {target.host}:{target.port}: "
                    f"{exc.strerror or exc}")
            if not stream.closed:
                self._refuse_stream(stream, 502)
            return
        if spec.response_timeout and stream.proto in HTTP_PROTOS and not stream.closed:
            self._arm_response_timer(stream, spec.response_timeout, stream.delivered)

    # -- the 504 timer: one per http stream, until the local server's first byte --------------
    def _arm_response_timer(self, stream: Stream, timeout: float, mark: int) -> None:
        self._response_timers[stream.sid] = self.loop.call_later(
            timeout, self._response_overdue, stream, timeout, mark)

    def _response_overdue(self, stream: Stream, timeout: float, mark: int) -> None:
        """``timeout`` s after the visitor's last byte reached the local server (``mark``
        bytes delivered then), it has not sent one: the visitor gets a 504 page.  Bytes still
        going to it (a slow upload) start the wait afresh."""
        self._response_timers.pop(stream.sid, None)
        if stream.closed or stream.slot.sent:
            return
        if stream.delivered != mark:
            self._arm_response_timer(stream, timeout, stream.delivered)
            return
        log.info("%s: stream %d (%s, visitor %s): the local server sent nothing for %g s; "
                 "answered 504", self.name, stream.sid, stream.host, stream.peer, timeout)
        self._refuse_stream(stream, 504)

    def on_stream_closed(self, stream: Stream) -> None:
        timer = self._response_timers.pop(stream.sid, None)
        if timer is not None:
            timer.cancel()

    def on_stream_ended(self, stream: Stream) -> None:
        if self.connector.access_log is not None:
            self.connector.access_log.closed(stream)

    def _refuse_stream(self, stream: Stream, status: int) -> None:
        """Tell the visitor, in its protocol, that the local side is not there: an answer
        (HTTP page, TLS alert) ends well (EOF R, then WR); a raw stream is cut (WR alone,
        which a kite relay passes on as a reset)."""
        if stream.proto in HTTP_PROTOS:
            answer = http_error(status, stream.host)
        elif stream.proto == "https":
            answer = TLS_ALERT_INTERNAL_ERROR
        else:
            self.discard(stream, close_local=False)
            return
        self.writer.cancel_data_buffer()
        self.writer.write_data(stream.slot, answer)
        stream.finish()

    def cut_local(self, stream: Stream, transport: asyncio.Transport) -> None:
        if self.connector.access_log is not None:
            self.connector.access_log.mark(
                stream, "reset", f"tunnel closed: {self.close_reason}" if self.closed else "cut")
        super().cut_local(stream, transport)

    def on_closed(self, reason: str) -> None:
        self.connector.tunnel_closed(self, reason)


class RelayConnector:
    """Keeps one tunnel to one relay flying, with all of that relay's kites."""

    def __init__(self, config: BackendConfig, spec: RelaySpec) -> None:
        self.config = config
        self.spec = spec
        self.loop = asyncio.get_running_loop()
        self.session_id: Optional[str] = None
        self.tunnel: Optional[BackendTunnel] = None
        self.tasks: set = set()
        self.inspector = None  # kite.backend.inspect.Inspector with --inspect
        self.global_secret = os.urandom(16).hex()
        self.flying = asyncio.Event()
        self.relay_ports: list = []  # X-PageKite-Ports: where visitors reach the relay
        #: Set when a permanent failure outlived its retries (kite.backend.failures): the
        #: report, and ``Backend.failed`` is set.
        self.failure: Optional[str] = None
        self._permanent: Optional[str] = None  # the current attempt failed for good: why
        self._reported: set = set()  # (kite, reason) refusals logged already
        #: Hooks the Backend sets: kites started flying (with the SSL-OK ones), and
        #: ``failure`` was set.
        self.on_flying: Callable[[list, set], None] = lambda kites, ssl_ok: None
        self.on_failure: Callable[[], None] = lambda: None
        #: "auto": in-band towards kite relays, re-connect towards pagekite.py (bug §13.2);
        #: "inband" / "reconnect" force one variant (tests use it to show why).
        self.registration = "auto"
        self._stop = False
        self.access_log: Optional[AccessLog] = None  # the Backend's, shared by its connectors
        self.busy: Optional[BusyPoll] = None  # the Backend's busy poller, shared likewise
        self._attempt_result: Optional[asyncio.Future] = None
        self.tls = None
        if not spec.plain:
            self.tls = ClientTLS(ca=spec.ca, fingerprint=spec.fingerprint, insecure=spec.insecure,
                                 server_name=spec.server_name)
        self._ssl_ctx = self.tls.context() if self.tls else None
        #: Kites with basic auth (kite.backend.basicauth), by KiteSpec.name.
        self.basic_auth = {k.name: BasicAuth(k.basic_auth, k.domain)
                           for k in spec.kites if k.basic_auth}

    # -- kites ----------------------------------------------------------------------------------
    def bsalt(self, spec: KiteSpec) -> str:
        return signing.make_bsalt(self.global_secret, self.spec.address, spec.secret)

    def round1_lines(self) -> list:
        return [handshake.KiteLine.signed(k.proto, k.domain, self.bsalt(k), k.secret, "")
                for k in self.spec.kites]

    def find_kite(self, proto: str, host: str, port: int) -> Optional[KiteSpec]:
        best, best_score = None, 0
        for k in self.spec.kites:
            s = _kite_matches(k, proto, host, port)
            if s > best_score:
                best, best_score = k, s
        return best

    def _kite_by_what(self, what: str) -> Optional[KiteSpec]:
        parts = what.split(":")
        if len(parts) < 2:
            return None
        for k in self.spec.kites:
            if k.proto == parts[0].lower() and k.domain == parts[1].lower():
                return k
        return None

    def _signed_lines(self, challenges) -> list:
        lines = []
        for ch in challenges:
            k = self._kite_by_what(ch.what)
            if k is not None:
                lines.append(handshake.KiteLine.signed(k.proto, k.domain, self.bsalt(k), k.secret,
                                                       ch.fsalt))
        return lines

    # -- handshake results ----------------------------------------------------------------------
    def handle_response(self, tunnel: BackendTunnel, resp, leftover: bytes) -> None:
        if resp.session_id:
            self.session_id = resp.session_id
        if resp.ports:
            self.relay_ports = resp.ports
        self._log_refusals(resp)
        kite_relay = KITE_FLOW_FEATURE in resp.features
        if resp.ok:
            tunnel.start_chunks(leftover, kite_peer=kite_relay, inflate=self.config.zchunks)
            self._flying(tunnel, resp.ok, resp.ssl_ok)
            if resp.sign_this and "AddKites" in resp.features:
                self._send_inband(tunnel, resp.sign_this)
            return
        if resp.sign_this:
            inband = kite_relay if self.registration == "auto" else self.registration == "inband"
            if inband and "AddKites" in resp.features:
                tunnel.start_chunks(leftover, kite_peer=kite_relay, inflate=self.config.zchunks)
                self._send_inband(tunnel, resp.sign_this)
            else:
                # Re-connect variant (§2.4): safe with pagekite.py 1.5.2 (bug §13.2).
                self._resolve(("reconnect", self._signed_lines(resp.sign_this)))
                tunnel.close("re-connecting with signed kites")
            return
        self._refused(resp)
        self._resolve(("refused", None))
        tunnel.close("relay accepted none of our kites")

    def _refused(self, reply) -> None:
        """No kite flies: note whether the reasons are permanent (kite.backend.failures)."""
        if reply.status is not None:
            self._permanent = failures.explain_not_a_relay(
                self.spec, reply.status, reply.reason_phrase, reply.headers)
        if self._permanent is None and not reply.duplicate:
            self._permanent = failures.explain_refusal(
                self.spec, [(ref.kite, reason) for ref, reason in reply.invalid])

    def _send_inband(self, tunnel: BackendTunnel, challenges) -> None:
        lines = self._signed_lines(challenges)
        tunnel.write_chunk(*handshake.build_inband_request(lines, version=VERSION))

    def handle_inband_reply(self, tunnel: BackendTunnel, reply) -> None:
        if reply.session_id:
            self.session_id = reply.session_id
        self._log_refusals(reply)
        if reply.ok:
            self._flying(tunnel, reply.ok, reply.ssl_ok)
        elif not tunnel.flying:
            self._refused(reply)
            self._resolve(("refused", None))
            tunnel.close("relay accepted none of our kites")

    def _log_refusals(self, reply) -> None:
        for ref, reason in reply.invalid:
            first = (ref.kite, reason) not in self._reported
            self._reported.add((ref.kite, reason))
            log.log(logging.ERROR if first else logging.INFO, "relay %s refused kite %s: %s",
                    self.spec.address, ref.kite, reason)
        for ref in reply.duplicate:
            log.error("relay %s: kite %s is already flown by another backend",
                      self.spec.address, ref.kite)

    def _flying(self, tunnel: BackendTunnel, refs, ssl_ok=()) -> None:
        new = []
        for ref in refs:
            k = self._kite_by_what(ref.what)
            name = k.name if k else ref.kite
            if name not in tunnel.flying:
                tunnel.flying.append(name)
                log.info("kite flying: %s on relay %s", name, self.spec.address)
                if self.access_log is not None:
                    self.access_log.event("kite-flying", kite=name, relay=self.spec.address)
                if k is not None:
                    new.append(k)
        if new:
            tls_terminated = {k.name for k in (self._kite_by_what(r.what) for r in ssl_ok) if k}
            self.on_flying(new, tls_terminated)
        self.flying.set()
        self._resolve(("flying", None))

    def _resolve(self, value) -> None:
        fut = self._attempt_result
        if fut is not None and not fut.done():
            fut.set_result(value)

    def tunnel_closed(self, tunnel: BackendTunnel, reason: str) -> None:
        if tunnel.flying:
            # Our own shutdown is no news; a tunnel lost while running is.
            (log.info if self._stop else log.warning)("tunnel to %s closed: %s",
                                                      self.spec.address, reason)
            if self.access_log is not None:
                self.access_log.event("tunnel-down", relay=self.spec.address, reason=reason)
        self._resolve(("closed", reason))
        if self.tunnel is tunnel:
            self.tunnel = None
            self.flying.clear()

    # -- the connect loop -----------------------------------------------------------------------
    async def _open(self, signed) -> BackendTunnel:
        """Dial the relay (kite.net.dial: TCP, CONNECT NAME:443 if ``connect_name``, TLS with
        the pin checked before the tunnel request is written) and start a tunnel on it."""
        spec = self.spec
        _transport, proto = await dial(
            spec.host, spec.port, lambda: BackendTunnel(self, signed), tls=self.tls,
            ssl_context=self._ssl_ctx,
            connect_name=spec.connect_name if self.tls is not None else None,
            timeout=HANDSHAKE_TIMEOUT, tls_timeout=TLS_HANDSHAKE_TIMEOUT)
        return proto

    async def run_once(self) -> str:
        """One connect + register attempt; returns "flying" after the tunnel closes again,
        or why it failed."""
        signed = None
        for _round in range(2):
            self._attempt_result = self.loop.create_future()
            tunnel = await self._open(signed)
            self.tunnel = tunnel
            try:
                kind, value = await asyncio.wait_for(
                    asyncio.shield(self._attempt_result), HANDSHAKE_TIMEOUT)
            except asyncio.TimeoutError:
                tunnel.abort("no answer to the tunnel request")
                return "timeout"
            if kind == "reconnect":
                signed = value
                await tunnel.closed_future
                continue
            if kind == "flying":
                reason = await tunnel.closed_future
                return f"closed: {reason}"
            return kind
        return "refused"

    async def run(self) -> None:
        delay = BACKOFF_MIN
        strikes = 0  # consecutive permanent failures
        while not self._stop:
            started = time.monotonic()
            self._permanent = None
            try:
                outcome = await self.run_once()
            except asyncio.CancelledError:
                raise
            except ssl.SSLError as exc:
                self._permanent = failures.explain_ssl_error(self.spec, exc)
                outcome = f"TLS: {getattr(exc, 'verify_message', None) or exc}"
                if self._permanent is None:
                    log.warning("relay %s: cannot connect: %s", self.spec.address, outcome)
            except (OSError, asyncio.TimeoutError, KiteError) as exc:
                outcome = f"{type(exc).__name__}: {exc}"
                log.warning("relay %s: cannot connect: %s", self.spec.address, exc)
            except Exception as exc:  # a bug must not silently end this relay's connector
                outcome = f"internal error: {type(exc).__name__}: {exc}"
                log.exception("relay %s: internal error; reconnecting", self.spec.address)
            if self._stop:
                break
            if self._permanent is not None:
                strikes += 1
                if strikes >= failures.PERMANENT_ATTEMPTS:
                    self.failure = self._permanent
                    self.on_failure()
                    return
                wait = failures.PERMANENT_RETRY * 2 ** (strikes - 1)
                log.info("relay %s: %s; attempt %d of %d (this does not fix itself); again in %g s",
                         self.spec.address, outcome, strikes, failures.PERMANENT_ATTEMPTS, wait)
                await asyncio.sleep(wait)
                continue
            strikes = 0
            if time.monotonic() - started > 10.0:
                delay = BACKOFF_MIN  # it flew for a while: start the backoff afresh
            cap = BACKOFF_REFUSED if outcome == "refused" else BACKOFF_MAX
            # Jitter keeps a fleet of backends from reconnecting in lock-step.
            wait = random.uniform(delay / 2, delay)
            log.info("relay %s: %s; reconnecting in %.2f s", self.spec.address, outcome, wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, cap)

    async def close(self) -> None:
        self._stop = True
        if self.tunnel is not None:
            self.tunnel.close("backend shutting down")
        for t in list(self.tasks):
            t.cancel()


class Backend:
    """All connectors of one ``kite expose``.

    When a kite starts flying, the addresses visitors reach it by (kite.backend.urls) go to
    ``announce`` (``kite expose``: one line each on stdout), each line once per run: a
    reconnect announces nothing new.  A connector's permanent failure sets ``failed``.
    """

    def __init__(self, config: BackendConfig, *, inspector=None,
                 announce: Optional[Callable[[str], None]] = None) -> None:
        self.config = config
        self.connectors = [RelayConnector(config, r) for r in config.relays if r.kites]
        self.access_log = open_access_log(config.access_log or "off", config.log_format,
                                          inbound="received")
        busy = BusyPoll(config.busy_poll) if config.busy_poll else None
        for c in self.connectors:
            c.access_log = self.access_log
            c.busy = busy
        self._tasks: list = []
        self.trimmer = MemoryTrimmer()  # freed stream buffers go back to the OS
        self.announce = announce
        self.announced: set = set()
        self.failed = asyncio.Event()
        for c in self.connectors:
            c.inspector = inspector
            c.on_flying = self._announcer(c)
            c.on_failure = self.failed.set

    def _announcer(self, connector: RelayConnector) -> Callable[[list, set], None]:
        def flying(kites: list, ssl_ok: set) -> None:
            for k in kites:
                for line in visitor_urls(k, connector.spec, ports=connector.relay_ports,
                                         ssl_ok=k.name in ssl_ok):
                    if line not in self.announced:
                        self.announced.add(line)
                        if self.announce is not None:
                            self.announce(line)
        return flying

    def failures(self) -> list:
        """The reports of the connectors that gave up (kite.backend.failures)."""
        return [c.failure for c in self.connectors if c.failure]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(c.run()) for c in self.connectors]
        self.trimmer.start()

    async def wait_flying(self, timeout: Optional[float] = None) -> None:
        await asyncio.wait_for(asyncio.gather(*(c.flying.wait() for c in self.connectors)), timeout)

    def open_streams(self) -> int:
        return sum(len(c.tunnel.streams) for c in self.connectors
                   if c.tunnel is not None and not c.tunnel.closed)

    async def drain(self, timeout: float) -> None:
        """Let open streams finish (up to ``timeout`` s); the relay keeps routing new
        visitors to us meanwhile only if no other backend flies the kite."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.open_streams() and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        self.trimmer.stop()
        for c in self.connectors:
            await c.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.access_log is not None:
            self.access_log.flush()
