"""``kite relay``: run a relay from a :class:`~kite.relay.config.RelayConfig` until told to stop."""

from __future__ import annotations

import asyncio
import logging
import signal

from .config import RelayConfig, build_relay_config
from .server import RelayServer

log = logging.getLogger("kite.relay")

__all__ = ["build_relay_config", "serve_relay"]


async def serve_relay(cfg: RelayConfig, stop: asyncio.Event) -> int:
    server = RelayServer(cfg)
    await server.start()
    loop = asyncio.get_running_loop()
    try:  # SIGHUP: load every certificate file again
        loop.add_signal_handler(signal.SIGHUP, server.certs.reload)
    except (NotImplementedError, RuntimeError, ValueError):
        pass  # not the main thread, or no signals here: the files are still polled
    await stop.wait()
    loop.remove_signal_handler(signal.SIGHUP)
    log.info("relay stopping: draining streams (up to %g s)", cfg.drain_timeout)
    await server.close()
    return 0
