"""``kite relay``: one port for tunnels and visitors, told apart by their first bytes.

:class:`RelayServer` puts the parts together and shuts them down: the shared
:class:`~kite.relay.state.RelayState`, the :class:`~kite.relay.accept.Acceptor` (listening
sockets, first bytes) and the :class:`~kite.relay.dispatch.Dispatcher` (tunnel, stream or
refusal), and the name service (:mod:`kite.names`) when DNS is configured, fed with the
state's presence events, and the ACME manager (:mod:`kite.certs.acme`, ``--acme``) that keeps
a certificate for the zone and hands each one to :attr:`RelayServer.certificate_hook`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Callable, Optional

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..certs import CertStore
from ..certs.acme import AcmeManager
from ..names import NameService
from ..net.memory import MemoryTrimmer
from ..net.sockets import raise_nofile_limit
from ..net.tls import cert_fingerprint
from ..store.opener import is_redis_url
from .accept import (
    Acceptor,
    default_max_connections,
    default_max_pending,
    default_tunnel_reserve,
)
from .config import RelayConfig
from .dispatch import Dispatcher
from .fleetlink import FleetLink
from .registry import Registry
from .signup import SignupService
from .state import RelayState

if TYPE_CHECKING:
    from ..certs.ondemand import OnDemandCertificates
    from ..store.presence import FleetPresence

log = logging.getLogger("kite.relay")

__all__ = ["RelayConfig", "RelayServer"]

#: How often a draining relay looks whether its streams have finished.
DRAIN_POLL = 0.05


def _tls_pairs(config: RelayConfig) -> list:
    """The configured (cert, key) pairs, the relay's own first; empty: no TLS."""
    return config.tls_pairs or ([(config.tls_cert, config.tls_key)] if config.tls_cert else [])


class RelayServer:
    """``kite relay``: accepts backend tunnels and visitors on the same port(s)."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.loop = asyncio.get_running_loop()
        self.state = RelayState(config)
        # the relay's certificates, chosen by SNI (kite.certs); empty: no TLS until a pair
        # is installed (CertStore.install)
        self.certs = CertStore(_tls_pairs(config))
        self.state.certs = self.certs  # expiries for metrics; install() for ACME
        self.dispatcher = Dispatcher(self.state, self.certs)
        self.acceptor = Acceptor(self.dispatcher)
        self.dispatcher.note_silent = self.acceptor.note_silent
        self.state.admit_visitor = self.acceptor.admit_visitor
        self.names: Optional[NameService] = None  # DNS for the kites (kite.names), if configured
        if config.names is not None:
            self.names = NameService(config.names, self.state.tls_names)
            self.state.subscribe(self.names.on_presence)
        self.acme: Optional[AcmeManager] = None  # automatic certificates (--acme), if configured
        self.on_demand: Optional[OnDemandCertificates] = None  # --acme-on-demand
        #: Where each new certificate goes, as ``hook(cert_path, key_path)`` (ACME calls it at
        #: start with a stored certificate and after each renewal): the store, where SNI
        #: picks it for the names it covers (the first pair stays the relay's own).
        self.certificate_hook: Callable[[str, str], object] = self.certs.install
        self.addresses: list = []
        self.closing = False
        self.state.on_reload.append(lambda config: self.certs.configure(_tls_pairs(config)))
        self.trimmer = MemoryTrimmer()  # freed visitor buffers go back to the OS
        self.fleet: Optional[FleetPresence] = None  # when the registry is in Redis

    async def start(self) -> list:
        cfg = self.config
        nofile = raise_nofile_limit()
        acceptor = self.acceptor
        acceptor.max_connections = cfg.max_connections or default_max_connections(nofile)
        acceptor.max_pending = cfg.max_pending or default_max_pending(acceptor.max_connections)
        reserve = cfg.tunnel_reserve
        if reserve is None:
            reserve = default_tunnel_reserve(acceptor.max_connections)
        elif reserve >= acceptor.max_connections:
            # only a derived max_connections gets here: an explicit one is checked with the
            # configuration (kite.relay.config)
            reserve = acceptor.max_connections // 2
            log.warning("tunnel_reserve %d is not below max_connections %d (from the "
                        "descriptor limit %d): %d kept for tunnels", cfg.tunnel_reserve,
                        acceptor.max_connections, nofile, reserve)
        acceptor.tunnel_reserve = reserve
        limits = self.state.limits
        log.info("descriptor limit %d: at most %d connections (the last %d for tunnels), %d "
                 "pending; %d streams per tunnel; idle streams closed after %s; visitor "
                 "buffers %s", nofile, acceptor.max_connections, acceptor.tunnel_reserve,
                 acceptor.max_pending, limits.max_streams,
                 f"{limits.idle_timeout:g} s" if limits.idle_timeout else "never",
                 f"up to {limits.buffer_budget // (1 << 20)} MiB" if limits.buffer_budget
                 else "unlimited")
        self.trimmer.start()
        self.certs.start()  # reloads changed certificate files
        if self.names is not None:
            await self.names.start()
        if self.config.db:
            from ..store.opener import open_registry

            self.state.registry = Registry(self.state, open_registry(self.config.db),
                                           relay_id=self.relay_id)
            await self.state.registry.start()
            if self.config.signup_zone:
                self.state.signup = SignupService(self.state.registry, self.config.signup_zone,
                                                  self.config.signup_quota,
                                                  self.config.signup_per_hour)
        for host, port in self.config.listen:
            bound = self.acceptor.listen(host, port)
            self.addresses.append(bound)
            self.state.public_ports.append(bound[1])
        if self.config.db and is_redis_url(self.config.db):
            await self._join_fleet()
        if cfg.acme is not None and cfg.acme.zone and self.names is not None:
            await self._start_acme(cfg.acme, self.names)
        if cfg.acme is not None and cfg.acme.on_demand:
            await self._start_on_demand(cfg.acme)
        return self.addresses

    async def _start_on_demand(self, a) -> None:
        """Certificates for the kites' own names, when visited (kite.certs.ondemand)."""
        from ..certs.ondemand import OnDemandCertificates

        self.on_demand = OnDemandCertificates(
            a.directory, a.email, state_dir=a.state_dir, ca_file=a.ca_file,
            per_hour=a.on_demand_per_hour, zone=a.zone, flies=self.dispatcher.flies_http,
            covered=self.certs.covers,
            on_certificate=lambda cert, key: self.certs.install(cert, key, kite_only=True))
        await self.on_demand.start()
        self.dispatcher.on_demand = self.on_demand

    async def _start_acme(self, a, names: NameService) -> None:
        """Keep the zone's certificate fresh (kite.certs.acme); in a fleet, one relay orders
        and every relay serves it (kite.store.fleetcerts)."""
        wanted = [a.zone, "*." + a.zone]
        share = None
        if self.fleet is not None:
            from ..store.fleetcerts import FleetCertificates

            share = FleetCertificates(self.fleet, wanted)
        self.acme = AcmeManager(
            a.directory, a.email, state_dir=a.state_dir, ca_file=a.ca_file, names=wanted,
            publish_txt=names.publish_txt, withdraw_txt=names.withdraw_txt,
            on_certificate=lambda cert, key: self.certificate_hook(cert, key), share=share)
        await self.acme.start()

    async def _join_fleet(self) -> None:
        """Share this relay's presence with the fleet on the registry's Redis."""
        from ..store.presence import FleetPresence

        assert self.config.db is not None
        names = self.config.names
        ips = list(names.public_ips) if names is not None else []
        # Where other relays hand visitors over: the first listening address, or when it
        # is a wildcard (0.0.0.0, ::), the first public address on its port.
        host, port = self.addresses[0][:2]
        if host in ("0.0.0.0", "::") and ips:
            host = ips[0]
        forward = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        fingerprint = None
        if self.config.tls_cert:
            with open(self.config.tls_cert, "rb") as f:
                fingerprint = cert_fingerprint(
                    x509.load_pem_x509_certificate(f.read()).public_bytes(Encoding.DER))
        self.fleet = FleetPresence(self.config.db, self.relay_id, ips, forward=forward,
                                   fingerprint=fingerprint)
        fleet = self.fleet
        service = self.names
        if service is not None:
            fleet.subscribe(
                lambda _proto, name: service.fleet(name, fleet.remote_addresses(name)))
        if service is not None:
            fleet.subscribe_txt(lambda name, values, add: (
                service.publish_txt if add else service.withdraw_txt)(name, values))
        await fleet.start()
        self.state.subscribe(fleet.on_presence)
        self.state.fleet_link = FleetLink(self.fleet, self.fleet.secret, self.state.busy)

    @property
    def relay_id(self) -> str:
        """This relay's name in a shared registry (its flushes and presence are keyed by it;
        stable across restarts, so a restarted relay continues its flush numbers)."""
        if self.config.relay_id:
            return self.config.relay_id
        return socket.gethostname() if self.config.db and is_redis_url(self.config.db) \
            else "relay"

    def reload(self, config: RelayConfig) -> None:
        """Take a new config (SIGHUP): grants, ``--single``, plain tunnels, error pages and
        the certificate (:meth:`RelayState.reload`); other keys need a restart."""
        old = self.config
        for key in ("listen", "db", "names", "signup_zone", "max_connections", "max_pending",
                    "tunnel_reserve", "max_streams", "idle_timeout", "buffer_budget",
                    "slow_reader_timeout", "keepalive", "zchunks", "busy_poll"):
            if getattr(old, key) != getattr(config, key):
                log.warning("reload: %s changed; it takes effect at the next restart", key)
        if bool(old.tls_cert) != bool(config.tls_cert):
            log.warning("reload: TLS turned on or off; it takes effect at the next restart")
        dropped = self.state.reload(config)
        log.info("reload: %d kite grants%s", len(config.grants),
                 f"; stopped flying: {', '.join(dropped)}" if dropped else "")

    async def close(self, drain_timeout: Optional[float] = None) -> None:
        """Stop accepting, let open streams finish (up to ``drain_timeout``), close tunnels."""
        if self.closing:
            return
        self.closing = True
        self.trimmer.stop()
        self.certs.stop()
        self.acceptor.close()
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        deadline = self.loop.time() + timeout
        tunnels = self.state.tunnels
        while any(t.streams for t in tunnels) and self.loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL)
        for tunnel in list(tunnels):
            tunnel.close("relay shutting down")
        await self.dispatcher.close()
        if self.acme is not None:
            await self.acme.close()
        if self.on_demand is not None:
            self.dispatcher.on_demand = None
            await self.on_demand.close()
        if self.names is not None:
            await self.names.close()
        if self.state.fleet_link is not None:
            await self.state.fleet_link.close()
        if self.fleet is not None:
            await self.fleet.close()  # other relays stop answering with this one at once
        if self.state.registry is not None:
            await self.state.registry.close()  # the last counts, on SIGTERM too
