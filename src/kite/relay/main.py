"""``kite relay``: run a relay from a :class:`~kite.relay.config.RelayConfig` until told to stop.

SIGHUP reloads: ``reload()`` builds the config again (the same options, the file re-read);
the running relay takes it (:meth:`RelayServer.reload`), or, if it is bad, logs why in one
line and keeps the old one.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Callable, Optional

from .config import RelayConfig, build_relay_config
from .server import RelayServer

log = logging.getLogger("kite.relay")

__all__ = ["build_relay_config", "serve_relay"]


async def serve_relay(cfg: RelayConfig, stop: asyncio.Event,
                      reload: Optional[Callable[[], RelayConfig]] = None) -> int:
    server = RelayServer(cfg)
    await server.start()
    admin = None
    if cfg.admin is not None:
        from .admin import start_admin

        host, port = cfg.admin
        admin = await start_admin(server, host=host, port=port, token=cfg.admin_token,
                                  cert_expiries=server.certs.expiries)
    loop = asyncio.get_running_loop()

    def on_hup() -> None:
        """SIGHUP: the config anew (grants, secrets, pages) and every certificate file."""
        if reload is None:
            server.certs.reload()
            return
        try:
            new = reload()
        except Exception as err:  # ConfigError, or a file that vanished meanwhile
            log.error("reload refused, keeping the running config: %s", err)
            server.certs.reload()
            return
        server.reload(new)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    except (NotImplementedError, RuntimeError, ValueError, AttributeError):  # pragma: no cover
        pass  # not the main thread, or no signals here: the certificate files are still polled
    await stop.wait()
    try:
        loop.remove_signal_handler(signal.SIGHUP)
    except (NotImplementedError, RuntimeError, ValueError, AttributeError):  # pragma: no cover
        pass
    log.info("relay stopping: draining streams (up to %g s)", cfg.drain_timeout)
    await server.close()
    if admin is not None:
        await admin.close()
    if server.state.access_log is not None:
        server.state.access_log.flush()
    return 0
