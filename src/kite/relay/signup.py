"""Sign-up on the relay's own name (``kite relay --signup ZONE``): ``POST /api/signup``.

pagekite.py's own sign-up (XML-RPC at ``POST /xmlrpc/``) is :mod:`kite.relay.xmlrpc`'s.
A visitor of the relay's own HTTP(S) name posts ``{"email": .., "kite": "NAME.ZONE"}`` and
gets ``{"secret": .., "kite": .., "quota_bytes": ..}``: a new account with the starter quota
and that one kite, written in one transaction (:meth:`kite.store.Store.signup`).  Every
problem is a 4xx with a JSON ``{"error": ..}`` naming it; bodies are capped at
:data:`MAX_BODY`, heads at ``MAX_HEAD``, and each client address may sign up
``per_hour`` times an hour.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Optional

from ..errors import HeadTooLong, StoreError
from ..proto.http import MAX_HEAD, find_head_end
from ..store import DEFAULT_PROTOS, check_email, check_name
from .xmlrpc import XMLRPC_PATHS, XmlRpcService

log = logging.getLogger("kite.relay")

__all__ = ["SignupService", "SignupProtocol", "MAX_BODY"]

MAX_BODY = 4096
#: Seconds a sign-up connection may take to send its request.
REQUEST_TIMEOUT = 10.0
_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 411: "Length Required",
            413: "Payload Too Large", 429: "Too Many Requests", 503: "Service Unavailable"}


def json_response(status: int, body: dict) -> bytes:
    data = (json.dumps(body) + "\n").encode()
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Cache-Control: no-store\r\nConnection: close\r\n\r\n"
            % (status, _REASONS.get(status, "Error").encode(), len(data))) + data


class SignupService:
    """Checks a sign-up and writes it through the relay's registry."""

    def __init__(self, registry, zone: str, quota: int, per_hour: int = 5) -> None:
        self.registry = registry
        self.zone = zone.lower().strip(".")
        self.quota = quota
        self.per_hour = per_hour
        self._recent: dict[str, list[float]] = {}  # client address -> sign-up times
        self.xmlrpc = XmlRpcService(self)  # pagekite.py's sign-up calls

    def _limited(self, ip: str, now: float) -> bool:
        if len(self._recent) > 100_000:  # bounded memory under a flood of addresses
            self._recent = {k: v for k, v in self._recent.items() if v and v[-1] > now - 3600}
        times = [t for t in self._recent.get(ip, ()) if t > now - 3600]
        self._recent[ip] = times
        return len(times) >= self.per_hour

    async def respond(self, head: bytes, body: bytes, ip: str) -> bytes:
        """The whole HTTP response: pagekite.py's XML-RPC at /xmlrpc/, else JSON."""
        line = head.split(b"\r\n", 1)[0].split(b" ")
        if len(line) >= 2 and line[0] == b"POST" and line[1].split(b"?")[0] in XMLRPC_PATHS:
            doc = await self.xmlrpc.answer(body, ip)
            return (b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n"
                    b"Cache-Control: no-store\r\nConnection: close\r\n\r\n" % len(doc)) + doc
        return json_response(*await self.handle(head, body, ip))

    async def handle(self, head: bytes, body: bytes, ip: str) -> tuple[int, dict]:
        line = head.split(b"\r\n", 1)[0].split(b" ")
        if len(line) < 2 or line[1].split(b"?")[0] != b"/api/signup":
            return 404, {"error": "not found: the relay answers POST /api/signup only"}
        if line[0] != b"POST":
            return 405, {"error": "use POST /api/signup"}
        try:
            req = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return 400, {"error": "malformed JSON: send {\"email\": .., \"kite\": ..}"}
        if not isinstance(req, dict) or not isinstance(req.get("email"), str) \
                or not isinstance(req.get("kite"), str):
            return 400, {"error": "email and kite (strings) are required"}
        try:
            email = check_email(req["email"])
            kite = check_name(req["kite"])
        except StoreError as exc:
            return 400, {"error": str(exc)}
        label, _, parent = kite.partition(".")
        if parent != self.zone or label == "*":
            return 403, {"error": f"kite {kite!r} is not a name in the zone {self.zone!r}: "
                                  f"use NAME.{self.zone}"}
        now = time.time()
        if self._limited(ip, now):
            return 429, {"error": f"at most {self.per_hour} sign-ups an hour from one address"}
        try:
            acct = await self.registry.db_call(self.registry.store.signup, email, kite,
                                               self.quota, frozenset(DEFAULT_PROTOS))
        except StoreError as exc:
            msg = str(exc)
            if "taken" in msg or "exists" in msg:
                return 409, {"error": msg}
            log.warning("sign-up failed: %s", msg)
            return 503, {"error": "the registry is not available, try again later"}
        self._recent[ip].append(now)
        await self.registry.reload()  # our own commit does not change data_version for us
        log.info("sign-up: %s with kite %s from %s", email, kite, ip)
        return 200, {"secret": acct.secret, "kite": kite, "quota_bytes": acct.quota_bytes}


class SignupProtocol(asyncio.Protocol):
    """Reads one bounded HTTP request, answers it with :class:`SignupService`, closes."""

    def __init__(self, service: SignupService, ip: str, data: bytes = b"") -> None:
        self.service = service
        self.ip = ip
        self.buf = bytearray(data)
        self.transport: Optional[asyncio.Transport] = None
        self.done = False
        self._timer: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._timer = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT, transport.abort)
        if self.buf:
            self._check()

    def data_received(self, data: bytes) -> None:
        if not self.done:
            self.buf += data
            self._check()

    def _answer(self, status: int, body: dict) -> None:
        self.done = True
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self.transport.write(json_response(status, body))
            self.transport.close()

    def _check(self) -> None:
        try:
            end = find_head_end(self.buf, bare_lf=False)
        except HeadTooLong:
            end = None
        if end is None:
            if len(self.buf) >= MAX_HEAD:
                self._answer(400, {"error": "request head too long"})
            return
        head = bytes(self.buf[:end])
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                value = value.strip()
                if not value.isdigit() or length is not None:
                    self._answer(400, {"error": "bad Content-Length"})
                    return
                length = int(value)
            elif name.strip().lower() == b"transfer-encoding":
                self._answer(411, {"error": "send a Content-Length, not a chunked body"})
                return
        if length is None:
            length = 0
        if length > MAX_BODY:
            self._answer(413, {"error": f"body over {MAX_BODY} bytes"})
            return
        if len(self.buf) - end < length:
            return
        body = bytes(self.buf[end:end + length])
        self.done = True
        task = asyncio.get_running_loop().create_task(self.service.respond(head, body, self.ip))
        task.add_done_callback(self._handled)

    def _handled(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:
            self._answer(503, {"error": "internal error"})
            return
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self.transport.write(task.result())
            self.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.transport = None
