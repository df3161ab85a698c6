"""``kite relay``: run a relay from a :class:`~kite.relay.config.RelayConfig` until told to stop."""

from __future__ import annotations

import asyncio
import logging

from .config import RelayConfig, build_relay_config
from .server import RelayServer

log = logging.getLogger("kite.relay")

__all__ = ["build_relay_config", "serve_relay"]


async def serve_relay(cfg: RelayConfig, stop: asyncio.Event) -> int:
    server = RelayServer(cfg)
    await server.start()
    admin = None
    if cfg.admin is not None:
        from .admin import start_admin

        host, port = cfg.admin
        # cert_expiries: a RelayServer with a certificate store sets this attribute
        admin = await start_admin(server, host=host, port=port, token=cfg.admin_token,
                                  cert_expiries=getattr(server, "cert_expiries", None))
    await stop.wait()
    log.info("relay stopping: draining streams (up to %g s)", cfg.drain_timeout)
    await server.close()
    if admin is not None:
        await admin.close()
    if server.state.access_log is not None:
        server.state.access_log.flush()
    return 0
