"""The inspector's web side (aiohttp, on the backend's event loop).

Routes:

* ``GET /``: the page (``static/inspector.html``, package data; no CDN);
* ``GET /api/requests``: ``{"requests": [summary, ...]}``, newest first;
* ``GET /api/requests/ID``: one exchange with heads and bodies (credentials masked);
* ``POST /api/requests/ID/replay``: send it again to the local server; answers the new
  exchange (201), 404 for an unknown id, 409 for one that cannot be replayed, 502 when the
  local server failed.

With a token (required off loopback) every route wants ``Authorization: Bearer TOKEN`` or
``?token=TOKEN`` (the page passes the latter on to its own requests); else 401.

Other web pages open in the same browser must not reach it (403): without a token the
``Host`` must be a loopback name or address (no DNS rebinding), and a POST that carries an
``Origin`` must come from the inspector's own origin (no cross-site replay).
"""

from __future__ import annotations

import hmac
import importlib.resources
import ipaddress
import logging
from urllib.parse import urlsplit

from aiohttp import web

from ..errors import InspectorError, KiteError

log = logging.getLogger("kite.backend.inspect")

__all__ = ["InspectorWeb"]


def _page() -> bytes:
    return importlib.resources.files("kite.backend").joinpath("static/inspector.html").read_bytes()


def _loopback_host(host: str) -> bool:
    """``host`` (a Host header: name or address, maybe with a port) is a loopback one."""
    name = urlsplit(f"//{host}").hostname or ""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class InspectorWeb:
    def __init__(self, inspector) -> None:
        self.inspector = inspector
        self.token = inspector.config.token
        self.runner: web.AppRunner | None = None
        self.page = _page()

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/", self._index)
        app.router.add_get("/api/requests", self._list)
        app.router.add_get("/api/requests/{id:[0-9]+}", self._one)
        app.router.add_post("/api/requests/{id:[0-9]+}/replay", self._replay)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        host = request.host
        if not self.token and not _loopback_host(host):
            return web.json_response({"error": f"Host {host!r} is not this inspector"},
                                     status=403)
        origin = request.headers.get("Origin")
        if request.method != "GET" and origin is not None and urlsplit(origin).netloc != host:
            return web.json_response({"error": "requests from other sites are refused"},
                                     status=403)
        if self.token:
            given = request.query.get("token", "")
            auth = request.headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                given = auth[7:]
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return web.json_response({"error": "a token is required"}, status=401)
        return await handler(request)

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(body=self.page, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-store"})

    async def _list(self, request: web.Request) -> web.Response:
        rec = self.inspector.recorder
        return web.json_response({"requests": [ex.summary() for ex in rec.newest_first()],
                                  "keep": rec.keep})

    def _find(self, request: web.Request):
        ex = self.inspector.recorder.get(int(request.match_info["id"]))
        if ex is None:
            raise web.HTTPNotFound(text='{"error": "no such request"}',
                                   content_type="application/json")
        return ex

    async def _one(self, request: web.Request) -> web.Response:
        return web.json_response(self._find(request).to_json())

    async def _replay(self, request: web.Request) -> web.Response:
        old = self._find(request)
        if not old.replayable:
            return web.json_response({"error": "this request cannot be replayed (its body "
                                      "was not kept whole, or has not come whole yet)"},
                                     status=409)
        try:
            ex = await self.inspector.replay(old.id)
        except InspectorError as exc:
            return web.json_response({"error": str(exc)}, status=502)
        return web.json_response(ex.to_json(), status=201)

    async def start(self, host: str, port: int) -> tuple:
        self.runner = web.AppRunner(self._app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            raise KiteError(f"--inspect: cannot listen on {host}:{port}: "
                            f"{exc.strerror or exc}") from None
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname()[:2] if sockets else (host, port)
        log.info("inspector on http://%s:%d/", *bound)
        return bound

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
