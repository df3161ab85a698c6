"""``kite relay``: one port for tunnels and visitors, told apart by their first bytes.

:class:`RelayServer` puts the parts together and shuts them down: the shared
:class:`~kite.relay.state.RelayState`, the :class:`~kite.relay.accept.Acceptor` (listening
sockets, first bytes) and the :class:`~kite.relay.dispatch.Dispatcher` (tunnel, stream or
refusal), and the name service (:mod:`kite.names`) when DNS is configured, fed with the
state's presence events.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from ..certs import CertStore
from ..names import NameService
from ..net.memory import MemoryTrimmer
from ..net.sockets import raise_nofile_limit
from .accept import Acceptor, default_max_connections, default_max_pending
from .config import RelayConfig
from .dispatch import Dispatcher
from .registry import Registry
from .signup import SignupService
from .state import RelayState

log = logging.getLogger("kite.relay")

__all__ = ["RelayConfig", "RelayServer"]

#: How often a draining relay looks whether its streams have finished.
DRAIN_POLL = 0.05


class RelayServer:
    """``kite relay``: accepts backend tunnels and visitors on the same port(s)."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.loop = asyncio.get_running_loop()
        self.state = RelayState(config)
        # the relay's certificates, chosen by SNI (kite.certs); empty: no TLS until a pair
        # is installed (CertStore.install)
        pairs = config.tls_pairs or ([(config.tls_cert, config.tls_key)] if config.tls_cert
                                     else [])
        self.certs = CertStore(pairs)
        self.state.certs = self.certs  # expiries for metrics; install() for ACME
        self.dispatcher = Dispatcher(self.state, self.certs)
        self.acceptor = Acceptor(self.dispatcher)
        self.dispatcher.note_silent = self.acceptor.note_silent
        self.names: Optional[NameService] = None  # DNS for the kites (kite.names), if configured
        if config.names is not None:
            self.names = NameService(config.names, self.state.tls_names)
            self.state.subscribe(self.names.on_presence)
        self.addresses: list = []
        self.closing = False
        self.trimmer = MemoryTrimmer()  # freed visitor buffers go back to the OS

    async def start(self) -> list:
        cfg = self.config
        nofile = raise_nofile_limit()
        acceptor = self.acceptor
        acceptor.max_connections = cfg.max_connections or default_max_connections(nofile)
        acceptor.max_pending = cfg.max_pending or default_max_pending(acceptor.max_connections)
        limits = self.state.limits
        log.info("descriptor limit %d: at most %d connections, %d pending; %d streams per "
                 "tunnel; idle streams closed after %s; visitor buffers %s", nofile,
                 acceptor.max_connections, acceptor.max_pending, limits.max_streams,
                 f"{limits.idle_timeout:g} s" if limits.idle_timeout else "never",
                 f"up to {limits.buffer_budget // (1 << 20)} MiB" if limits.buffer_budget
                 else "unlimited")
        self.trimmer.start()
        self.certs.start()  # reloads changed certificate files
        if self.names is not None:
            await self.names.start()
        if self.config.db:
            from ..store.sqlite import open_store

            self.state.registry = Registry(self.state, open_store(self.config.db))
            await self.state.registry.start()
            if self.config.signup_zone:
                self.state.signup = SignupService(self.state.registry, self.config.signup_zone,
                                                  self.config.signup_quota,
                                                  self.config.signup_per_hour)
        for host, port in self.config.listen:
            bound = self.acceptor.listen(host, port)
            self.addresses.append(bound)
            self.state.public_ports.append(bound[1])
        return self.addresses

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
        if self.names is not None:
            await self.names.close()
        if self.state.registry is not None:
            await self.state.registry.close()  # the last counts, on SIGTERM too
