"""``kite relay``: one port for tunnels and visitors, told apart by their first bytes.

:class:`RelayServer` puts the parts together and shuts them down: the shared
:class:`~kite.relay.state.RelayState`, the :class:`~kite.relay.accept.Acceptor` (listening
sockets, first bytes) and the :class:`~kite.relay.dispatch.Dispatcher` (tunnel, stream or
refusal).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from ..net.tls import server_context
from .accept import Acceptor
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
        ssl_context = None
        if config.tls_cert:
            ssl_context = server_context(config.tls_cert, config.tls_key or config.tls_cert)
        self.dispatcher = Dispatcher(self.state, ssl_context)
        self.acceptor = Acceptor(self.dispatcher)
        self.addresses: list = []
        self.closing = False

    async def start(self) -> list:
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
        self.acceptor.close()
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        deadline = self.loop.time() + timeout
        tunnels = self.state.tunnels
        while any(t.streams for t in tunnels) and self.loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL)
        for tunnel in list(tunnels):
            tunnel.close("relay shutting down")
        await self.dispatcher.close()
        if self.state.registry is not None:
            await self.state.registry.close()  # the last counts, on SIGTERM too
