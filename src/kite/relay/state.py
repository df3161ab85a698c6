"""The relay's shared state: what every part of a relay reads and changes, in one object.

Theory of operation
-------------------
:class:`RelayState` owns the grants (who may fly which kite), the routes (which tunnels fly
which kite now), the open tunnels, the session ids backends reconnect with, the kite
authorizer, the relay's own names and its certificates (:class:`~kite.certs.CertStore`).
The accept loop and the dispatcher read it to route visitors; each
:class:`~kite.relay.tunnel.RelayTunnel` is given it (never the server) and tells it when it
opens, registers kites and closes.  Later parts of the service (names,
accounts, usage, a fleet store) plug in here too, not into the accept loop.

Presence is an event: when a kite starts flying (its first tunnel registers it) or stops
(its last tunnel closes), every listener given to :meth:`RelayState.subscribe` is called
with a :class:`PresenceEvent`, synchronously, in the order of the changes.  Listeners must
not raise; one that does is logged and the others still run.

Reload (SIGHUP): :meth:`RelayState.reload` takes the grants, the ``--single`` kites, the
plain-tunnel rule and the error pages of a new config; kites it no longer grants with the
same secret stop flying (like an account's kite removed), nothing else drops.  Then every
hook in :attr:`RelayState.on_reload` is called (certificates reload there).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from ..certs import CertStore
from ..net.accesslog import AccessLog, open_access_log
from ..net.busypoll import BusyPoll
from ..net.limits import StreamLimits
from ..proto.handshake import (
    AuthReply,
    ChallengeBook,
    KiteAuthorizer,
    KiteDecision,
    KiteLine,
    new_relay_uuid,
)
from ..proto.names import KITE_PROTOS, domain_matches
from ..proto.signing import new_secret
from .authguard import AuthGuard
from .config import RelayConfig
from .registry import Registry
from .routes import Routes
from .signup import SignupService

if TYPE_CHECKING:
    from .fleetlink import FleetLink

log = logging.getLogger("kite.relay")

__all__ = ["RelayState", "PresenceEvent"]


def _admit_any() -> None:
    """No connection cap: every visitor is admitted (a state without a server)."""


@dataclass(frozen=True)
class PresenceEvent:
    """A kite started (``online``) or stopped flying on this relay."""

    proto: str
    domain: str
    online: bool


PresenceListener = Callable[[PresenceEvent], None]


class RelayState:
    """Grants, routes, tunnels, sessions and the authorizer of one relay."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.grants = config.grants
        self.routes = Routes()
        self.tunnels: set = set()  # every RelayTunnel with a live transport
        self.sessions: dict = {}  # X-PageKite-SessionID -> tunnel, for X-PageKite-Replace
        self.public_ports: list[int] = []  # the ports the relay listens on (X-PageKite-Ports)
        self.tls_names = {n.lower() for n in config.tls_names}  # SNI names meaning the relay
        # ... and with the relay's DNS names (the zone's NS), the names that are never kites
        ns_names = config.names.ns_names if config.names is not None else []
        self.reserved_names = self.tls_names | {n.lower() for n in ns_names}
        self.secret = new_secret()  # signs challenges; never leaves the process
        self.uuid = new_relay_uuid()  # X-PageKite-UUID of the ping probe's answer
        self.registry: Optional[Registry] = None  # accounts (kite relay --db), set by the server
        self.fleet_link: Optional[FleetLink] = None  # kites of other relays (--redis)
        self.signup: Optional[SignupService] = None  # --signup: set by the server
        self.certs: Optional[CertStore] = None  # the relay's certificates: set by the server
        self.authorizer = KiteAuthorizer(
            lookup_secret=self.exact_secret,
            challenge_secret=self.secret,
            protos=KITE_PROTOS,
            ports=("virtual",),
            raw_ports=("virtual",),
            is_duplicate=self._is_duplicate,
            is_reserved=self.is_reserved,
            challenges=ChallengeBook(),
        )
        self.guard = AuthGuard()  # failed signatures per source address
        self._listeners: list[PresenceListener] = []
        self._replacing: set = set()  # during authorize(): tunnels the requester replaces
        # -- observability: the access log (also the stream totals /metrics reads), handshake
        # outcomes by result; None when neither a log nor the admin endpoint wants them
        self.started = time.time()
        self.access_log: Optional[AccessLog] = open_access_log(
            config.access_log or "off", config.log_format, inbound="sent")
        if self.access_log is None and config.admin is not None:
            self.access_log = AccessLog(None, inbound="sent")
        self.handshakes: dict[str, int] = {}
        #: Asked before every new visitor stream; raises RelayFull when visitors may take no
        #: more connections (the server sets kite.relay.accept.Acceptor.admit_visitor).
        self.admit_visitor: Callable[[], None] = _admit_any
        # every visitor stream shares these (kite.net.limits)
        self.limits = StreamLimits(
            max_streams=config.max_streams, idle_timeout=config.idle_timeout,
            buffer_budget=config.buffer_budget, slow_reader_timeout=config.slow_reader_timeout)
        self.error_pages: dict = dict(config.error_pages)  # --error-pages: name -> template
        #: the process's busy poller, shared by its tunnels (kite.net.busypoll); None: off
        self.busy: Optional[BusyPoll] = BusyPoll(config.busy_poll) if config.busy_poll else None
        #: Called with the new RelayConfig after a reload took it (e.g. CertStore.reload);
        #: a hook that raises is logged, the others still run.
        self.on_reload: list[Callable[[RelayConfig], Any]] = []

    # -- presence -----------------------------------------------------------------------------
    def subscribe(self, listener: PresenceListener) -> Callable[[], None]:
        """Call ``listener`` on every presence change; returns a function that unsubscribes."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _emit(self, proto: str, domain: str, online: bool) -> None:
        event = PresenceEvent(proto, domain, online)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a listener's bug must not cost the tunnel
                log.exception("presence listener %r failed on %s", listener, event)

    def count_handshake(self, result: str) -> None:
        """One tunnel handshake (or kite request) ended with ``result``: ``ok``, a refusal
        reason (``signature``, ``unauthorized``, ``duplicate``, ``quota``...), ``tls``..."""
        self.handshakes[result] = self.handshakes.get(result, 0) + 1

    # -- tunnels ------------------------------------------------------------------------------
    def tunnel_opened(self, tunnel) -> None:
        self.tunnels.add(tunnel)

    def tunnel_detached(self, tunnel) -> None:
        """``tunnel`` gave its transport away before flying anything."""
        self.tunnels.discard(tunnel)

    def tunnel_closed(self, tunnel) -> None:
        """Forget ``tunnel``: its sessions, its routes; kites it flew alone go offline."""
        self.tunnels.discard(tunnel)
        for sid in [k for k, v in self.sessions.items() if v is tunnel]:
            del self.sessions[sid]
        for proto, domain in list(tunnel.kites):
            if self.routes.remove(proto, domain, tunnel):
                log.info("kite offline: %s:%s", proto, domain)
                if self.access_log is not None:
                    self.access_log.event("kite-offline", kite=f"{proto}:{domain}")
                self._emit(proto, domain, False)

    def replace_sessions(self, session_ids: Iterable[str], tunnel) -> list[str]:
        """A reconnecting backend names its old sessions (``X-PageKite-Replace``): close
        those tunnels so their kites move to ``tunnel`` at once - only those whose every
        kite ``tunnel`` has authenticated itself (knowing a session id is not enough).
        Returns the ids that could not be honoured yet (the tunnel may authenticate more
        kites in a later round)."""
        waiting = []
        flown = set(tunnel.kites)
        for old_id in session_ids:
            old = self.sessions.get(old_id)
            if old is None or old is tunnel:
                continue
            if not old.kites or not set(old.kites) <= flown:
                waiting.append(old_id)
                continue
            log.info("%s: replaces the stale tunnel %s", tunnel.name, old.peer)
            old.close("replaced by the reconnecting backend")
        return waiting

    # -- kites --------------------------------------------------------------------------------
    def authorize(self, kites: list[KiteLine], addr: str, replacing: Iterable[str] = ()) -> AuthReply:
        """Decide a kite request from source address ``addr``; failed signatures count
        against that address (:mod:`kite.relay.authguard`).  ``replacing``: the session ids
        the requester replaces (``X-PageKite-Replace``); their tunnels do not make a
        ``--single`` kite a duplicate (the backend reconnecting is not locked out)."""
        self._replacing = {self.sessions.get(i) for i in replacing} - {None}
        try:
            reply = self.authorizer.authorize(kites)
        finally:
            self._replacing = set()
        now = time.monotonic()
        for d in reply.refused:
            if d.reason in ("signature", "unauthorized"):
                self.guard.failed(addr, now, d.kite.kite, d.reason)
        if self.registry is not None:
            reply = self._account_checks(reply, self.registry)
        return reply

    # -- accounts (kite.relay.registry) --------------------------------------------------------
    def exact_secret(self, proto: str, domain: str) -> Optional[str]:
        """The authorizer's secret lookup: static grants, then the account registry."""
        secret = self.grants.exact_secret(proto, domain)
        if secret is None and self.registry is not None:
            secret = self.registry.secret(proto, domain)
        return secret

    def _account_checks(self, reply: AuthReply, registry: Registry) -> AuthReply:
        """Refuse the accepted kites of blocked accounts with pagekite's reason (``quota``,
        ``nodays``, ``unauthorized``); tell the others their quota (X-PageKite-Quota)."""
        decisions: list[KiteDecision] = []
        quota: list = []
        for d in reply.decisions:
            static = self.grants.find(d.kite.proto, d.kite.domain) is not None
            why = None if d.outcome != "ok" or static else registry.reason(d.kite.domain)
            if why:
                d = KiteDecision(d.kite, "invalid", reason=why)
            elif d.outcome == "ok" and not static and not quota:
                quota = registry.quota_headers(d.kite.prefix, d.kite.domain)
            decisions.append(d)
        trailer = reply.headers[sum(len(d.headers()) for d in reply.decisions):]
        headers = [h for d in decisions for h in d.headers()] + quota + trailer
        return AuthReply(decisions, reply.session_id, headers)

    def drop_kite(self, proto: str, domain: str, reason: str) -> None:
        """Stop flying ``proto:domain`` on every tunnel now; tunnels left with no kite close."""
        for tunnel in list(self.routes.tunnels(proto, domain)):
            if (proto, domain) in tunnel.kites:
                tunnel.kites.remove((proto, domain))
            for stream in list(tunnel.streams.values()):
                if domain_matches(domain, stream.host):
                    self.cut_stream(stream, "offline", reason)
            if self.routes.remove(proto, domain, tunnel):
                log.info("kite offline: %s:%s (%s)", proto, domain, reason)
                self._emit(proto, domain, False)
            if not tunnel.kites:
                tunnel.close(reason)

    def cut_stream(self, stream, result: str = "quota", reason: str = "") -> None:
        """End a visitor's stream now (RST to the visitor: a cut, not a clean end);
        ``result``: what the access log says (``quota``: its account is blocked)."""
        if self.access_log is not None:
            self.access_log.mark(stream, result, reason)
        transport = stream.transport
        stream.tunnel.discard(stream, close_local=False)
        if transport is not None and not transport.is_closing():
            transport.abort()

    def blocked(self, addr: str) -> float:
        """Seconds for which tunnels from ``addr`` are refused (too many failed signatures)."""
        return self.guard.blocked(addr, time.monotonic())

    def register(self, tunnel, reply: AuthReply, replace: Iterable[str] = ()) -> list[str]:
        """Route the kites ``reply`` accepted to ``tunnel``, then retire the tunnels of the
        sessions in ``replace`` whose kites it now flies (:meth:`replace_sessions`; returns
        the ids still waiting).  Once the tunnel flies a kite, the reply's session id names
        it (a backend names it in ``X-PageKite-Replace`` when it reconnects; ids of
        challenge-only replies would name nothing worth replacing, and pagekite's ids
        repeat for the same kites within a second)."""
        for kite in reply.ok:
            key = (kite.proto, kite.domain)
            if key in tunnel.kites:
                continue
            tunnel.kites.append(key)
            log.info("kite online: %s:%s via %s", kite.proto, kite.domain, tunnel.peer)
            if self.access_log is not None:
                self.access_log.event("kite-flying", kite=f"{kite.proto}:{kite.domain}",
                                      peer=tunnel.peer)
            if self.routes.add(kite.proto, kite.domain, tunnel):
                self._emit(kite.proto, kite.domain, True)
            else:
                log.warning("kite %s:%s: another backend joined from %s; %d backends share "
                            "its visitors (--single %s refuses the second)", kite.proto,
                            kite.domain, tunnel.peer,
                            len(self.routes.tunnels(kite.proto, kite.domain)), kite.domain)
        waiting = self.replace_sessions(replace, tunnel) if replace and tunnel.kites else list(replace)
        if reply.session_id and tunnel.kites:
            if tunnel.session_id:
                self.sessions.pop(tunnel.session_id, None)
            tunnel.session_id = reply.session_id
            self.sessions[reply.session_id] = tunnel
        return waiting

    def _is_duplicate(self, kite: KiteLine) -> bool:
        """Only for kites limited to one backend (``--single``): another tunnel flies it."""
        if kite.domain not in self.config.single_backend:
            return False
        others = [t for t in self.routes.tunnels(kite.proto, kite.domain)
                  if t not in self._replacing]
        for t in others:
            t.request_ping()  # a stale tunnel that does not answer is closed soon
        return bool(others)

    def shared_kites(self) -> dict[str, list[str]]:
        """Kites more than one backend flies now (balanced): ``proto:domain`` -> the peers."""
        return {f"{p}:{d}": [t.peer for t in self.routes.tunnels(p, d)]
                for p, d in self.routes.kites() if len(self.routes.tunnels(p, d)) > 1}

    # -- reload -------------------------------------------------------------------------------
    def reload(self, config: RelayConfig) -> list[str]:
        """Take ``config``'s grants, ``--single`` kites, plain-tunnel rule and error pages
        (listeners, limits, DNS and the registry stay as started).  A flying kite whose
        secret is gone or changed stops flying; returns the kites dropped."""
        before = {k: self.authorizer.find_secret(*k) for k in self.routes.kites()}
        cfg = self.config
        cfg.grants = self.grants = config.grants
        cfg.single_backend = set(config.single_backend)
        cfg.allow_plain = config.allow_plain
        cfg.error_pages = config.error_pages
        self.error_pages = dict(config.error_pages)
        dropped = []
        for (proto, domain), secret in before.items():
            if self.authorizer.find_secret(proto, domain) != secret:
                self.drop_kite(proto, domain, "kite removed from the relay config")
                dropped.append(f"{proto}:{domain}")
        for hook in list(self.on_reload):
            try:
                hook(config)
            except Exception:  # a hook's bug must not undo the reload
                log.exception("reload hook %r failed", hook)
        return dropped

    # -- names --------------------------------------------------------------------------------
    def is_relay_name(self, name: Optional[str]) -> bool:
        """``name`` (an SNI or CONNECT host) means the relay itself, not a kite."""
        return name is not None and name.lower() in self.tls_names

    def is_reserved(self, name: Optional[str]) -> bool:
        """``name`` is one of the relay's own names (TLS or DNS): never a kite."""
        return name is not None and name.lower() in self.reserved_names

    def has_grant(self, proto: str, domain: str) -> bool:
        if self.registry is not None and self.registry.owner(domain)[0] is not None:
            return True
        return self.grants.find(proto, domain) is not None
