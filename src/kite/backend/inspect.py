"""``kite expose --inspect``: record the HTTP exchanges of http kites, and replay them.

Theory of operation
-------------------
With ``--inspect`` the backend taps each stream of an http kite where it meets the local
server (:meth:`Inspector.tap`): the visitor's bytes as they come out of the tunnel (the
stream's sink, wrapped; before kite adds X-Forwarded-*), and the local server's bytes as
they are read into the tunnel writer (:class:`TappedStreamProtocol`).  Without
``--inspect`` nothing of this runs: no call is added to the data path.

Each direction goes through httptools; every request and its response make one
:class:`Exchange` (pipelined requests are paired in order; after an answer to HEAD,
whose body length httptools cannot know, the rest of that stream is not recorded).  An
exchange keeps the heads
and the first :data:`BODY_LIMIT` bytes of each body; the last ``keep`` exchanges are kept
(:class:`Recorder`).  Authorization, Proxy-Authorization, Cookie and Set-Cookie values are
masked in everything shown (:func:`mask_header`); the request as it came is kept in memory
only, for a replay.  A stream whose bytes stop parsing as HTTP (an upgrade to WebSocket,
garbage) is no longer recorded; its bytes pass as before.

Replay (:meth:`Inspector.replay`) sends a recorded request again to the kite's local
server on a new connection, with its body as received (a chunked one with a
Content-Length), reads the answer, and records that exchange too (``replay_of``).  A
request whose body passed BODY_LIMIT was not kept whole and is not replayed.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import httptools

from ..config import KiteSpec, is_loopback
from ..errors import ConfigError, InspectorError
from ..net.tunnel import Stream, StreamProtocol, TunnelProtocol
from ..proto.http import MAX_HEAD
from ..proto.names import HTTP_PROTOS, bare_proto

log = logging.getLogger("kite.backend.inspect")

__all__ = ["BODY_LIMIT", "DEFAULT_ADDRESS", "DEFAULT_KEEP", "Exchange", "InspectConfig",
           "Inspector", "Recorder", "TappedStreamProtocol", "check_inspect_config",
           "mask_header"]

#: Bytes of each body an exchange keeps.
BODY_LIMIT = 10 * 1024
#: Exchanges kept by default (``--inspect-keep``).
DEFAULT_KEEP = 50
#: Where the inspector listens by default (ngrok's choice).
DEFAULT_ADDRESS = ("127.0.0.1", 4040)
#: Seconds a replay may take (connect, send, the whole answer).
REPLAY_TIMEOUT = 30.0
#: Requests of one stream recorded ahead of their answers (pipelining) before the stream
#: is no longer recorded: the recording's memory stays bounded whatever a visitor sends.
MAX_PIPELINED = 64
#: Headers whose values are never shown.
MASKED = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
MASK = "***"


@dataclass
class InspectConfig:
    """``--inspect HOST:PORT``, ``--inspect-keep N``, ``--inspect-token``."""

    host: str = DEFAULT_ADDRESS[0]
    port: int = DEFAULT_ADDRESS[1]
    keep: int = DEFAULT_KEEP
    token: Optional[str] = field(default=None, repr=False)



def check_inspect_config(cfg: InspectConfig) -> InspectConfig:
    """The rules of ``--inspect``: aiohttp installed, a token for a non-loopback address,
    ``keep`` at least 1 (ConfigError otherwise)."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise ConfigError("--inspect", "needs aiohttp, which is not installed",
                          "pip install 'kite-relay[admin]'") from None
    if not is_loopback(cfg.host) and not cfg.token:
        raise ConfigError("--inspect", f"{cfg.host} is not a loopback address and no token "
                          "guards it", "add --inspect-token-file FILE (or KITE_INSPECT_TOKEN), "
                          "or listen on 127.0.0.1")
    if cfg.keep < 1 or cfg.keep > 100_000:
        raise ConfigError("--inspect-keep", f"{cfg.keep} is out of range", "give 1 to 100000")
    return cfg


def mask_header(name: str, value: str) -> str:
    """``value`` as shown: credentials and cookie values replaced by ``***`` (the scheme of
    an Authorization, cookie names and Set-Cookie attributes stay)."""
    lname = name.lower()
    if lname not in MASKED:
        return value
    if lname in ("authorization", "proxy-authorization"):
        scheme, _, rest = value.partition(" ")
        return f"{scheme} {MASK}" if rest else MASK
    if lname == "cookie":
        return "; ".join(f"{part.split('=', 1)[0].strip()}={MASK}" if "=" in part else MASK
                         for part in value.split(";"))
    first, sep, attrs = value.partition(";")
    cookie = f"{first.split('=', 1)[0].strip()}={MASK}" if "=" in first else MASK
    return cookie + sep + attrs


def _body_json(data: bytes, size: int) -> dict:
    cut = size > len(data)
    try:
        text = data.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError as exc:
        if cut and exc.start >= len(data) - 3:  # a character cut in two at the limit
            text, encoding = data[: exc.start].decode("utf-8", "replace"), "utf-8"
        else:
            text, encoding = base64.b64encode(data).decode("ascii"), "base64"
    return {"body": text, "encoding": encoding, "size": size, "truncated": cut}


class _Message:
    """One HTTP message as seen: its head, and the first BODY_LIMIT bytes of its body."""

    __slots__ = ("first", "headers", "body", "size")

    def __init__(self) -> None:
        self.first: tuple = ()  # (method, target, version) or (version, status, reason)
        self.headers: list = []  # (name, value) as received
        self.body = bytearray()
        self.size = 0  # body bytes seen in all

    def add_body(self, data: bytes) -> None:
        self.size += len(data)
        room = BODY_LIMIT - len(self.body)
        if room > 0:
            self.body += data[:room]

    def headers_json(self) -> list:
        return [[n, mask_header(n, v)] for n, v in self.headers]


class Exchange:
    """A request and (once it came) its response."""

    def __init__(self, ident: int, kite: str, visitor: str, target: tuple,
                 replay_of: Optional[int] = None) -> None:
        self.id = ident
        self.kite = kite
        self.visitor = visitor
        self.target = target  # the local server (host, port), for a replay
        self.replay_of = replay_of
        self.started = time.time()
        self.request = _Message()
        self.response: Optional[_Message] = None
        self.duration: Optional[float] = None
        self.state = "open"  # open -> complete | incomplete (stream ended first)
        self.request_done = False  # the whole request came (its body to the end)

    def summary(self) -> dict:
        method, path, _version = self.request.first or ("", "", "")
        resp = self.response
        return {
            "id": self.id, "time": self.started, "kite": self.kite, "visitor": self.visitor,
            "method": method, "path": path,
            "status": resp.first[1] if resp is not None and resp.first else None,
            "duration_ms": round(self.duration * 1000, 3) if self.duration is not None else None,
            "request_size": self.request.size,
            "response_size": resp.size if resp is not None else None,
            "replay_of": self.replay_of, "state": self.state,
            "replayable": self.replayable,
        }

    def to_json(self) -> dict:
        out = self.summary()
        req = self.request
        out["request"] = {"method": req.first[0] if req.first else "",
                          "target": req.first[1] if req.first else "",
                          "version": req.first[2] if req.first else "",
                          "headers": req.headers_json(), **_body_json(bytes(req.body), req.size)}
        resp = self.response
        out["response"] = None if resp is None or not resp.first else {
            "version": resp.first[0], "status": resp.first[1], "reason": resp.first[2],
            "headers": resp.headers_json(), **_body_json(bytes(resp.body), resp.size)}
        return out

    @property
    def replayable(self) -> bool:
        return (self.request_done and bool(self.request.first)
                and self.request.size <= len(self.request.body))

    def request_bytes(self) -> bytes:
        """The request for a replay: as received, its body with a Content-Length."""
        method, target, version = self.request.first
        lines = [f"{method} {target} HTTP/{version}"]
        for name, value in self.request.headers:
            if name.lower() not in ("content-length", "transfer-encoding"):
                lines.append(f"{name}: {value}")
        body = bytes(self.request.body)
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Recorder:
    """The last ``keep`` exchanges, by id (ids grow from 1)."""

    def __init__(self, keep: int = DEFAULT_KEEP) -> None:
        self.keep = keep
        self.exchanges: collections.OrderedDict = collections.OrderedDict()
        self._next = 1

    def new(self, kite: str, visitor: str, target: tuple,
            replay_of: Optional[int] = None) -> Exchange:
        ex = Exchange(self._next, kite, visitor, target, replay_of)
        self._next += 1
        self.exchanges[ex.id] = ex
        while len(self.exchanges) > self.keep:
            self.exchanges.popitem(last=False)
        return ex

    def get(self, ident: int) -> Optional[Exchange]:
        return self.exchanges.get(ident)

    def newest_first(self) -> list:
        return list(reversed(self.exchanges.values()))


class _Parsing:
    """httptools callbacks for one direction: builds ``_Message`` objects."""

    def __init__(self, on_head, on_complete) -> None:
        self.msg = _Message()
        self._url = b""
        self._on_head = on_head  # called with the message once its head is complete
        self._on_complete = on_complete  # ... and once it is whole
        self.parser: Any = None  # the httptools parser that calls us

    def on_message_begin(self) -> None:
        self.msg = _Message()
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.msg.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        p = self.parser
        if isinstance(p, httptools.HttpRequestParser):
            self.msg.first = (p.get_method().decode("latin-1"), self._url.decode("latin-1"),
                              p.get_http_version())
        else:
            self.msg.first = (p.get_http_version(), p.get_status_code(), "")
        self._on_head(self.msg)

    def on_status(self, status: bytes) -> None:
        self._url += status  # the reason phrase

    def on_body(self, body: bytes) -> None:
        self.msg.add_body(body)

    def on_message_complete(self) -> None:
        if isinstance(self.parser, httptools.HttpResponseParser) and self.msg.first:
            self.msg.first = (self.msg.first[0], self.msg.first[1],
                              self._url.decode("latin-1"))
        self._on_complete(self.msg)


class StreamTap:
    """The recording of one stream: both directions parsed, exchanges paired in order."""

    def __init__(self, inspector: Inspector, kite: str, visitor: str, target: tuple) -> None:
        self.inspector = inspector
        self.kite = kite
        self.visitor = visitor
        self.target = target
        self.waiting: collections.deque = collections.deque()  # exchanges awaiting responses
        self.active = True
        self._req = _Parsing(self._request_head, self._request_done)
        self._req.parser = httptools.HttpRequestParser(self._req)
        self._resp = _Parsing(self._response_head, self._response_done)
        self._resp.parser = httptools.HttpResponseParser(self._resp)
        self._current: Optional[Exchange] = None  # the request being received

    # -- requests (visitor -> local) -------------------------------------------------------
    def _request_head(self, msg: _Message) -> None:
        if len(self.waiting) >= MAX_PIPELINED:
            self.active = False  # a visitor far ahead of its answers: stop recording
            return
        ex = self.inspector.recorder.new(self.kite, self.visitor, self.target)
        ex.request = msg
        self._current = ex
        self.waiting.append(ex)

    def _request_done(self, msg: _Message) -> None:
        if self._current is not None:
            self._current.request_done = True
        self._current = None

    # -- responses (local -> visitor) ------------------------------------------------------
    def _response_head(self, msg: _Message) -> None:
        if not self.waiting:
            return
        ex = self.waiting[0]
        ex.response = msg
        if ex.request.first and ex.request.first[0] == "HEAD":
            # The answer to HEAD has no body whatever its Content-Length says, which
            # httptools cannot be told: this exchange is whole, and the stream is no
            # longer recorded (its next answers would not parse).
            self._response_done(msg)
            self.closed()

    def _response_done(self, msg: _Message) -> None:
        status = msg.first[1] if msg.first else 0
        if 100 <= status < 200 and status != 101:
            return  # an interim answer (100 Continue): the real one follows
        if self.waiting:
            ex = self.waiting.popleft()
            ex.duration = time.time() - ex.started
            ex.state = "complete"

    # -- feeding ---------------------------------------------------------------------------
    def feed(self, request_side: bool, data) -> None:
        if not self.active:
            return
        parser = self._req.parser if request_side else self._resp.parser
        try:
            parser.feed_data(data)  # httptools takes any buffer: no copy of a view
        except httptools.HttpParserUpgrade:
            self.active = False  # WebSocket & co: not HTTP from here on
        except httptools.HttpParserError as exc:
            log.debug("inspector: stream of %s from %s: stops recording: %s", self.kite,
                      self.visitor, exc)
            self.active = False
        except Exception:  # the recording must never break the stream
            log.exception("inspector: stream of %s stops recording", self.kite)
            self.active = False

    def closed(self) -> None:
        """The stream ended: answers still awaited end as they are."""
        self.active = False
        for ex in self.waiting:
            if ex.response is not None and ex.response.first:
                ex.state = "complete"  # a body delimited by the close
            else:
                ex.state = "incomplete"
            ex.duration = time.time() - ex.started
        self.waiting.clear()

    def sink(self, inner):
        """The tunnel -> local sink wrapped: record, then pass on."""
        def tapped(view: memoryview) -> None:
            self.feed(True, view)
            inner(view)
        return tapped

    def protocol_factory(self, tunnel: TunnelProtocol, stream: Stream):
        return lambda: TappedStreamProtocol(tunnel, stream, self)


class TappedStreamProtocol(StreamProtocol):
    """The local side of an inspected stream: what the local server sends is recorded as
    it lands in the tunnel writer's buffer."""

    __slots__ = ("tap", "_view")

    def __init__(self, tunnel: TunnelProtocol, stream: Stream, tap: StreamTap) -> None:
        super().__init__(tunnel, stream)
        self.tap = tap
        self._view: Optional[memoryview] = None

    def get_buffer(self, sizehint: int) -> memoryview:
        view = super().get_buffer(sizehint)
        self._view = view
        return view

    def buffer_updated(self, nbytes: int) -> None:
        view = self._view
        if view is not None and self.tap.active:
            self.tap.feed(False, view[:nbytes])
        super().buffer_updated(nbytes)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.tap.closed()
        super().connection_lost(exc)


class Inspector:
    """The recorder, the taps and the web page of one ``kite expose --inspect``."""

    def __init__(self, config: InspectConfig) -> None:
        self.config = config
        self.recorder = Recorder(config.keep)
        self.web: Any = None  # kite.backend.inspect_web.InspectorWeb once started
        self.address: Optional[tuple] = None

    def tap(self, stream: Stream, spec: KiteSpec, event) -> Optional[StreamTap]:
        """Record ``stream`` if it belongs to an http kite (None otherwise): the opening
        payload now, every later chunk through its sink."""
        if bare_proto(spec.proto) not in HTTP_PROTOS or event.proto not in HTTP_PROTOS:
            return None
        target = (spec.target.host, spec.target.port)
        t = StreamTap(self, f"{spec.proto}:{event.host}", stream.peer, target)
        if event.payload:
            t.feed(True, event.payload)
        stream.slot.sink = t.sink(stream.slot.sink)
        return t

    async def replay(self, ident: int) -> Exchange:
        """Send recorded request ``ident`` again to its local server; the new exchange."""
        old = self.recorder.get(ident)
        if old is None:
            raise InspectorError(f"no request {ident} (only the last {self.recorder.keep} "
                                 "are kept)")
        if not old.replayable:
            raise InspectorError(f"request {ident} cannot be replayed: its body passed "
                                 f"{BODY_LIMIT} bytes and was not kept whole"
                                 if old.request.size > len(old.request.body)
                                 else f"request {ident} has not come whole yet")
        ex = self.recorder.new(old.kite, "replay", old.target, replay_of=ident)
        ex.request = old.request
        ex.request_done = True
        done = False

        def complete(msg: _Message) -> None:
            nonlocal done
            if msg.first and not (100 <= msg.first[1] < 200):
                done = True

        parsing = _Parsing(lambda msg: setattr(ex, "response", msg), complete)
        parser = httptools.HttpResponseParser(parsing)
        parsing.parser = parser
        host, port = old.target
        try:
            await asyncio.wait_for(self._exchange(host, port, old.request_bytes(), parser,
                                                  lambda: done), REPLAY_TIMEOUT)
        except (OSError, asyncio.TimeoutError, httptools.HttpParserError) as exc:
            ex.state = "incomplete"
            ex.duration = time.time() - ex.started
            raise InspectorError(f"replay of request {ident} to {host}:{port} failed: "
                                 f"{exc or type(exc).__name__}") from None
        ex.state = "complete" if ex.response is not None else "incomplete"
        ex.duration = time.time() - ex.started
        return ex

    @staticmethod
    async def _exchange(host: str, port: int, request: bytes, parser, done) -> None:
        reader, writer = await asyncio.open_connection(host, port, limit=MAX_HEAD)
        try:
            writer.write(request)
            await writer.drain()
            while not done():
                data = await reader.read(65536)
                if not data:
                    break
                parser.feed_data(data)
        finally:
            writer.close()

    async def start(self) -> tuple:
        from .inspect_web import InspectorWeb

        self.web = InspectorWeb(self)
        self.address = await self.web.start(self.config.host, self.config.port)
        return self.address

    async def close(self) -> None:
        if self.web is not None:
            await self.web.close()
