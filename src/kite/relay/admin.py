"""``kite relay --admin HOST:PORT``: ``/metrics`` (Prometheus), ``/api/status`` (JSON) and the
dashboard at ``/``, served by aiohttp on the relay's own event loop.

Everything is read from the relay's state when asked (:mod:`kite.relay.observe`); serving it
adds nothing to the paths bytes take.  With a token (required off loopback: the relay's
config refuses to start otherwise) ``/metrics`` and ``/api/*`` want ``Authorization: Bearer
TOKEN``, compared in constant time; the dashboard page itself holds no data and is served
to anyone, and its script sends the token it finds after ``#token=`` in the page's address
(the fragment never leaves the browser).

aiohttp and prometheus_client are the ``admin`` extra (``pip install 'kite-relay[admin]'``);
this module is imported only when ``--admin`` is given.
"""

from __future__ import annotations

import hmac
import json
import logging
from importlib import resources
from typing import Callable, Optional

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

log = logging.getLogger("kite.relay")

__all__ = ["AdminServer", "start_admin", "dashboard_html"]


def dashboard_html() -> bytes:
    """The dashboard page (package data: kite/relay/static/dashboard.html)."""
    return resources.files("kite.relay").joinpath("static/dashboard.html").read_bytes()


class AdminServer:
    """The admin HTTP server: ``status()`` gives /api/status, ``collector`` /metrics."""

    def __init__(self, status: Callable[[], dict], collector: Optional[Collector], *,
                 host: str = "127.0.0.1", port: int = 0, token: Optional[str] = None) -> None:
        self.status = status
        self.host = host
        self.port = port
        self._token = token.encode() if token else None
        self.registry = CollectorRegistry(auto_describe=False)
        if collector is not None:
            self.registry.register(collector)
        self._page = dashboard_html()
        self._runner: Optional[web.AppRunner] = None
        self.address: Optional[tuple] = None

    def _authorized(self, request: web.Request) -> bool:
        if self._token is None:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                                  self._token)

    def _guard(self, request: web.Request) -> Optional[web.Response]:
        if self._authorized(request):
            return None
        return web.json_response({"error": "unauthorized: send Authorization: Bearer TOKEN"},
                                 status=401, headers={"WWW-Authenticate": "Bearer"})

    async def _metrics(self, request: web.Request) -> web.Response:
        denied = self._guard(request)
        if denied is not None:
            return denied
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _api_status(self, request: web.Request) -> web.Response:
        denied = self._guard(request)
        if denied is not None:
            return denied
        return web.Response(body=json.dumps(self.status()).encode(),
                            content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def _page_handler(self, _request: web.Request) -> web.Response:
        return web.Response(body=self._page, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-store",
                                     "Content-Security-Policy": "default-src 'self'; "
                                     "script-src 'unsafe-inline'; style-src 'unsafe-inline'"})

    async def start(self) -> tuple:
        """Listen; returns the bound ``(host, port)``."""
        app = web.Application()
        app.router.add_get("/", self._page_handler)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/status", self._api_status)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.address = sockets[0].getsockname()[:2] if sockets else (self.host, self.port)
        log.info("admin listening on http://%s:%s/ (/metrics, /api/status)%s",
                 *self.address, "; Bearer token required" if self._token else "")
        return self.address

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def start_admin(server, *, host: str = "127.0.0.1", port: int = 0,
                      token: Optional[str] = None, top: int = 50,
                      cert_expiries: Optional[Callable[[], dict[str, float]]] = None) -> AdminServer:
    """The admin endpoint of a started :class:`~kite.relay.server.RelayServer`.

    ``cert_expiries``: ``{certificate name: notAfter}`` for the expiry metric (default:
    the relay's ``--tls-cert``); a certificate store plugs its own in here.  ``top``: kites
    and accounts with labels of their own in /metrics (the rest are ``other``)."""
    import prometheus_client

    from .observe import RelayCollector, RelayView

    prometheus_client.disable_created_metrics()
    view = RelayView(server, top=top, cert_expiries=cert_expiries)
    admin = AdminServer(view.status, RelayCollector(view), host=host, port=port, token=token)
    await admin.start()
    return admin
