"""X-Forwarded-* headers for HTTP kites: a sans-IO rewriter of one visitor's request stream.

``kite expose`` relays each visitor stream of an HTTP kite to a local server.  The local
server sees a connection from the backend, not from the visitor, so the backend tells it who
the visitor was by adding to *every* request head of the stream::

    X-Forwarded-For: <client ip>      (the relay's RIP; ``::ffff:a.b.c.d`` written a.b.c.d)
    X-Forwarded-Proto: http|https     (https when the relay terminated TLS, RTLS)
    X-Forwarded-Host: <host>          (the kite name, or each request's own Host)

Theory of operation
-------------------
pagekite.py does this with a regular expression over each raw data frame (protocol notes
§9 and §13.11): whatever looks like a request line is rewritten, in a POST body as well as
in a head, and a head cut in two by the frame boundary is missed.  kite follows the HTTP/1.1
framing (RFC 9112) instead, so it knows at every byte whether it is in a head, in a body or
past an Upgrade, and it only ever edits heads:

1. HEAD: bytes are held back (at most ``max_head``) until the blank line that ends the head.
   Every byte is also fed, as it arrives, to a strict ``httptools.HttpRequestParser``
   (llhttp; a new one per request, or the previous request's when that one ended with its
   head, as a GET does), which validates the head and rejects garbage at the first bad byte
   rather than after ``max_head`` bytes.  CR/LF bytes between two messages are passed through
   (RFC 9112 §2.2 lets servers skip them; llhttp does).
2. The complete head is rewritten (see :meth:`ForwardedRewriter._rewrite_head`) and sent.
   The body framing is read off the head llhttp accepted: ``Content-Length`` -> BODY,
   ``Transfer-Encoding`` (chunked last; llhttp enforces it) -> CHUNKED, neither -> no body.
3. BODY: the next *n* bytes are sliced off and sent; no parser sees them.
4. CHUNKED: kite's own framer finds the message end (size line -> data -> CRLF -> ... ->
   last chunk -> trailer section), holding back at most one size line or the trailer
   section (both bounded).  The chunk data is sliced and sent as it arrives.  Every byte
   of the chunked body is *also* fed to the head's llhttp parser (which has no body
   callbacks, so it only scans): llhttp validates the chunk grammar (extensions, trailers),
   and must report the end of the message exactly where kite's framer does.  httptools does
   not expose byte offsets of its events, which is why kite frames by itself and uses
   llhttp as the cross-check.
5. After the message: back to HEAD if the request keeps the connection alive, else DISCARD
   (RFC 9112 §9.6: a server "MUST NOT process any further requests received on that
   connection" after ``Connection: close``; dropping them is what a correct server does
   anyway, and nothing unrewritten can reach a sloppy one).
6. OPAQUE after a CONNECT or an Upgrade request (see the comment in ``_finish_head``).

Where kite's compiled modules are built, a feed that is exactly one whole head without a
body (a keep-alive GET) takes steps 1, 2 and 5 in one call to ``kite._forwarded``; this
class is its specification, and runs whatever that call leaves (``_one_head``).

Nothing is ever rewritten in a body, in chunk extensions or in trailers: those bytes leave
exactly as they came.  The output of a stream does not depend on how it was cut into feeds
(tested with Hypothesis).

Untrusted client headers
------------------------
A visitor can send its own ``X-Forwarded-For: 6.6.6.6``.  kite *renames* such headers
``X-Old-<name>`` (as pagekite.py does, observed ``X-Old-X-Forwarded-For: 6.6.6.6``) rather
than dropping them: the server can no longer mistake them for kite's, the value stays
visible for logging and for chains where a trusted proxy sits in front of the relay, and
only the name changes (no header is removed, the order and the rest of the head stay
byte-exact).  Renamed: every ``X-Forwarded-*`` (For, Proto, Host, Port, Prefix, Ssl... as
used by e.g. Werkzeug's ProxyFix), ``Forwarded`` (RFC 7239, which several frameworks prefer
to X-Forwarded-*), ``X-Real-IP`` (nginx realip setups) and pagekite.py's
``X-PageKite-For/-Proto/-Port``.  Names are matched case-insensitively with ``_`` equal to
``-``: CGI/WSGI servers map both ``X-Forwarded-For`` and ``X_Forwarded_For`` to
``HTTP_X_FORWARDED_FOR``, a classic way to smuggle a forged value past a proxy that only
renames the hyphenated spelling.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import re
from typing import Union

import httptools

from ..errors import LocalProtocolError, RemoteProtocolError
from ..fastpath import rewrite_one_head
from .http import MAX_HEAD

__all__ = ["ForwardedRewriter", "UNTRUSTED_PREFIX"]

#: Bound of one chunk-size line (size + extensions + CRLF).  h11 lets extensions grow up to
#: its whole buffer limit; 4 KiB is far above anything real clients send.
MAX_CHUNK_LINE = 4096

#: What client-supplied forwarding headers are renamed to (``X-Old-X-Forwarded-For``).
UNTRUSTED_PREFIX = b"X-Old-"

# Forwarding headers a visitor must not be able to set (see the module docstring).  The
# regex runs over the field lines of one validated head only (never over a body); it is
# anchored at line starts and requires the ':' so it matches whole field names.
_UNTRUSTED_FIELD = re.compile(
    rb"^(?=(?:x[-_]forwarded[-_][!#$%&'*+.^_`|~0-9a-z-]+"
    rb"|x[-_]pagekite[-_](?:for|proto|port)"
    rb"|forwarded"
    rb"|x[-_]real[-_]ip):)",
    re.IGNORECASE | re.MULTILINE,
)
# The fields the rewriter reads, in a lowered head that llhttp validated (see
# _MessageEvents.scan_fields): name and raw value of each.
_FIELD_SCAN = re.compile(
    rb"\n(host|content-length|transfer-encoding"
    rb"|x[-_]forwarded[-_][!#$%&'*+.^_`|~0-9a-z-]+"
    rb"|x[-_]pagekite[-_](?:for|proto|port)"
    rb"|forwarded"
    rb"|x[-_]real[-_]ip):([^\r]*)"
)
_HOST_VALUE = re.compile(rb"\nhost:([^\r]*)", re.IGNORECASE)
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")

# Parsers (with their _MessageEvents) of requests that ended with their head, shared by all
# rewriters for their next heads.  A deque: append and pop are atomic, so rewriters on event
# loops in other threads may share it too (a popped pair belongs to one rewriter alone).
_IDLE_PARSERS: collections.deque = collections.deque()
_IDLE_PARSERS_MAX = 64
# A value we put in a header ourselves: visible ASCII, no spaces, no CR/LF.
_SAFE_VALUE = re.compile(rb"[!-~]+")

BytesLike = Union[bytes, bytearray, memoryview]

# The methods of a head's path that the compiled rewrite of a whole head does in one call:
# a subclass that overrides one of them does not get the compiled call.
_HEAD_STEPS = ("feed", "_start_message", "_validate", "_finish_head", "_rewrite_head",
               "_end_message")

# States of the client->server stream.
_HEAD = 0  # between messages or inside a head (bytes held in _held)
_BODY = 1  # inside a Content-Length body; _remaining bytes to go
_CHUNK_SIZE_LINE = 2  # expecting a chunk-size line (held in _held until LF)
_CHUNK_DATA = 3  # inside chunk data; _remaining bytes to go
_CHUNK_DATA_END = 4  # expecting the CRLF after chunk data (held in _held)
_TRAILERS = 5  # inside the trailer section (held in _held, which starts with b"\r\n")
_OPAQUE = 6  # after CONNECT / Upgrade: everything passes untouched
_DISCARD = 7  # after a request that closes the connection: everything is dropped
_CLOSED = 8  # eof() or close() was called

_STATE_NAMES = {
    _HEAD: "head",
    _BODY: "body",
    _CHUNK_SIZE_LINE: "chunk-size",
    _CHUNK_DATA: "chunk-data",
    _CHUNK_DATA_END: "chunk-data-end",
    _TRAILERS: "trailers",
    _OPAQUE: "opaque",
    _DISCARD: "discard",
    _CLOSED: "closed",
}


class _MessageEvents:
    """The llhttp callbacks for one request, and what the rewriter needs from its head.

    Owned by the rewriter together with its parser; reused (with the parser) for the next
    request of a keep-alive connection when a request ends with its head, as GETs do.
    httptools registers only the callbacks defined here, once, at parser construction:
    there is deliberately no ``on_header``, which would cost a Python call and two
    ``bytes`` per field line.  llhttp validates the head; the few fields the rewriter needs
    are then read off the validated bytes by :meth:`scan_fields`.
    """

    __slots__ = (
        "parser",
        "begun",
        "headers_complete",
        "message_complete",
        "method",
        "version",
        "keep_alive",
        "upgrade",
        "content_length",
        "transfer_encoding",
        "hosts",
        "untrusted",
    )

    def __init__(self) -> None:
        self.parser: httptools.HttpRequestParser | None = None
        self.reset()

    def reset(self) -> None:
        self.begun = 0  # messages llhttp has started; a second one means it saw an end first
        self.headers_complete = False
        self.message_complete = False
        self.method = b""
        self.version = ""
        self.keep_alive = False
        self.upgrade = False
        self.content_length: bytes | None = None  # llhttp rejects duplicates
        self.transfer_encoding = False
        self.hosts: list[bytes] = []
        self.untrusted = False  # the head holds client forwarding headers

    def scan_fields(self, head: bytes, start: int, copy_host: bool) -> None:
        """Read Host, Content-Length, Transfer-Encoding and forwarding fields off a head
        that llhttp accepted; ``start`` is the index of the LF that ends the request line.

        llhttp (strict, as httptools builds it) has rejected bare CR or LF, whitespace
        before a colon and line folding, so in an accepted head every LF ends a line and
        every field line is ``name ":" value``, the name right after the LF and the value
        up to the next CR: one search of the lowered head finds exactly these fields.
        """
        for name, value in _FIELD_SCAN.findall(head.lower(), start):
            if name == b"host":
                self.hosts.append(value.strip(b" \t"))
            elif name == b"content-length":
                self.content_length = value
            elif name == b"transfer-encoding":
                self.transfer_encoding = True
            else:
                self.untrusted = True
        if copy_host and self.hosts:  # the Host values as sent, not lowered
            self.hosts = [v.strip(b" \t") for v in _HOST_VALUE.findall(head, start)]

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_headers_complete(self) -> None:
        # llhttp resets its flags once the message is complete, so keep-alive and upgrade
        # must be read here (they are set "just before on_headers_complete").
        p = self.parser
        assert p is not None
        self.headers_complete = True
        self.method = p.get_method()
        self.keep_alive = p.should_keep_alive()
        self.upgrade = p.should_upgrade()

    def on_message_complete(self) -> None:
        self.message_complete = True


class ForwardedRewriter:
    """Adds X-Forwarded-For/-Proto/-Host to every request head of one client->server stream.

    Sans-IO: ``feed()`` takes the visitor's bytes as they arrive from the tunnel and returns
    the bytes to write to the local server (possibly ``b""`` while a head is incomplete).
    One instance per stream, used from one thread.

    :param client_ip: the visitor's address (the relay's ``RIP``), an IPv4/IPv6 address
        string or ``ipaddress`` object; IPv4-mapped IPv6 is written as dotted IPv4, an IPv6
        scope is dropped.  ``"unknown"`` (RFC 7239's word; pagekite.py's fallback) is
        accepted.  Anything else raises :class:`RemoteProtocolError` (it came off the wire).
    :param proto: ``"http"`` or ``"https"`` (https when the relay terminated TLS).
    :param host: the ``X-Forwarded-Host`` value, usually the kite name; ``None`` copies each
        request's own ``Host`` (no X-Forwarded-Host when the request has none).
    :param max_head: bound of one request head and of a chunked trailer section.

    Errors: a malformed or oversized head, ambiguous framing (Content-Length with
    Transfer-Encoding, Transfer-Encoding in HTTP/1.0, two Host fields), a bad chunked body,
    or an HTTP version other than 1.0/1.1 raise :class:`RemoteProtocolError`; the caller
    closes the stream.  Bytes returned by earlier feeds were valid and may be flushed.
    """

    #: The compiled rewrite of one whole head without a body (kite._forwarded), tried
    #: before this class's own path; None on the pure-Python twin, and in a subclass that
    #: overrides a step of the head path (``_HEAD_STEPS``): it runs this class's Python
    #: path, its overrides included (see ``__init_subclass__``).
    _one_head = None if rewrite_one_head is None else staticmethod(rewrite_one_head)

    __slots__ = (
        "_state",  # one of the _STATE constants above
        "_held",  # bytearray: bytes of an incomplete head / size line / CRLF / trailers
        "_remaining",  # bytes left in a Content-Length body or in the current chunk
        "_events",  # _MessageEvents of the message being parsed, or None
        "_parser",  # its HttpRequestParser while a head or a chunked body is fed to it
        "_fixed_lines",  # b"X-Forwarded-For: ..\r\nX-Forwarded-Proto: ..\r\n[X-Forwarded-Host..]"
        "_copy_host",  # True when host=None: X-Forwarded-Host copies each request's Host
        "_max_head",
        "_requests",  # number of heads rewritten so far
    )

    def __init__(
        self,
        *,
        client_ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
        proto: str,
        host: str | bytes | None = None,
        max_head: int = MAX_HEAD,  # a request head, and a chunked body's trailers
    ) -> None:
        if proto not in ("http", "https"):
            raise LocalProtocolError(f"proto must be 'http' or 'https', not {proto!r}")
        if not isinstance(max_head, int) or max_head < 64:
            raise LocalProtocolError(f"max_head must be an int >= 64, not {max_head!r}")
        lines = [
            b"X-Forwarded-For: " + _format_client_ip(client_ip) + b"\r\n",
            b"X-Forwarded-Proto: " + proto.encode("ascii") + b"\r\n",
        ]
        if host is not None:
            raw = _host_bytes(host)
            if raw is None or not _SAFE_VALUE.fullmatch(raw):
                raise LocalProtocolError(f"host is not a valid header value: {host!r}")
            lines.append(b"X-Forwarded-Host: " + raw + b"\r\n")
        self._fixed_lines = b"".join(lines)
        self._copy_host = host is None
        self._max_head = max_head
        self._state = _HEAD
        self._held = bytearray()
        self._remaining = 0
        self._events: _MessageEvents | None = None
        self._parser: httptools.HttpRequestParser | None = None
        self._requests = 0

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "_one_head" not in cls.__dict__ and any(step in cls.__dict__ for step in _HEAD_STEPS):
            cls._one_head = None  # the compiled path would skip the override

    # -- public API ---------------------------------------------------------------------

    @property
    def opaque(self) -> bool:
        """True once the stream passes untouched (after CONNECT or an Upgrade request).

        From then on ``feed(data)`` returns ``bytes(data)``; the caller may bypass it.
        """
        return self._state == _OPAQUE

    @property
    def discarding(self) -> bool:
        """True after a request that closed the connection: further bytes are dropped."""
        return self._state == _DISCARD

    @property
    def requests(self) -> int:
        """Number of request heads rewritten so far."""
        return self._requests

    @property
    def state(self) -> str:
        """Where the stream is: head, body, chunk-size, ..., opaque, discard, closed."""
        return _STATE_NAMES[self._state]

    def verbatim(self, n: int) -> int:
        """How many of the next ``n`` bytes pass unchanged and unseen (a Content-Length body,
        or opaque bytes after an Upgrade): they are consumed here, so the caller sends that
        many leading bytes as they are and :meth:`feed` only the rest.  0 when the next byte
        needs looking at.  Lets a bulk upload skip the copy and the parser entirely.
        """
        state = self._state
        if state == _BODY:
            take = self._remaining if self._remaining < n else n
            self._remaining -= take
            if not self._remaining:
                self._end_message()
            return take
        if state == _OPAQUE:
            return n
        return 0

    def feed(self, data: BytesLike) -> bytes:
        """Take the visitor's next bytes; return the bytes for the local server.

        ``data`` is borrowed for the duration of the call only (a memoryview into a reused
        buffer is fine): what is held back is a copy, and the result is immutable ``bytes``
        (``data`` itself when it is ``bytes`` that pass through unchanged, e.g. a body).
        """
        state = self._state
        if state == _OPAQUE:
            return bytes(data)
        if state == _CLOSED:
            raise LocalProtocolError("feed() after eof()/close()")
        if state == _DISCARD:
            return b""
        buf = data if type(data) is bytes else bytes(data)
        n = len(buf)
        if (state == _HEAD and not self._held and 4 < n <= self._max_head
                and buf[0] not in b"\r\n" and buf.find(b"\r\n\r\n") == n - 4):
            # Exactly one whole head (the usual GET on a keep-alive connection): the same
            # parser, checks and result as below, without holding and slicing.  The
            # compiled rewrite does it all in one call when the head has no body, and
            # answers None, having changed nothing, for anything else.
            one_head = self._one_head
            if one_head is not None:
                done = one_head(buf, self._fixed_lines, self._copy_host)
                if done is not None:
                    self._requests += 1
                    if not done[1]:
                        self._state = _DISCARD  # as _end_message does
                    return done[0]
            try:
                self._start_message()
                self._validate(buf)
                return self._finish_head(buf)
            except RemoteProtocolError:
                self._fail()
                raise
        mv = memoryview(buf)
        out: list[BytesLike] = []
        pos = 0
        try:
            while pos < n:
                state = self._state
                if state == _BODY:
                    take = min(self._remaining, n - pos)
                    out.append(mv[pos : pos + take])
                    pos += take
                    self._remaining -= take
                    if not self._remaining:
                        self._end_message()
                elif state == _HEAD:
                    pos = self._feed_head(buf, mv, pos, out)
                elif state == _CHUNK_DATA:
                    take = min(self._remaining, n - pos)
                    piece = mv[pos : pos + take]
                    self._validate(piece)
                    out.append(piece)
                    pos += take
                    self._remaining -= take
                    if not self._remaining:
                        self._state = _CHUNK_DATA_END
                elif state == _CHUNK_SIZE_LINE:
                    pos = self._feed_chunk_size(mv, pos, out)
                elif state == _CHUNK_DATA_END:
                    pos = self._feed_chunk_data_end(mv, pos, out)
                elif state == _TRAILERS:
                    pos = self._feed_trailers(mv, pos, out)
                elif state == _OPAQUE:
                    out.append(mv[pos:])
                    pos = n
                else:  # _DISCARD
                    pos = n
        except RemoteProtocolError:
            self._fail()
            raise
        if len(out) == 1:
            only = out[0]
            if type(only) is memoryview and len(only) == n:
                return buf  # the whole input passes unchanged (a body, or opaque bytes)
            return bytes(only)
        return b"".join(out)

    def eof(self) -> bytes:
        """The visitor finished sending: return what is still held back, and stop.

        A partial chunk-size line or trailer section is returned (it is body framing; the
        server will see a truncated body either way).  A partial request head is *never*
        forwarded: unrewritten it could carry a forged X-Forwarded-For, and some servers
        (Python's http.server, for one) accept a head cut short by EOF as complete.  It is
        dropped and :class:`RemoteProtocolError` is raised.  Idempotent.
        """
        state = self._state
        held = bytes(self._held)
        self._fail()
        if state == _HEAD and held:
            raise RemoteProtocolError(
                f"stream ended inside a request head ({len(held)} bytes dropped): "
                f"{held[:64]!r}"
            )
        if state == _TRAILERS:
            return held[2:]  # _held starts with the CRLF of the last-chunk line
        if state in (_CHUNK_SIZE_LINE, _CHUNK_DATA_END):
            return held
        return b""

    def close(self) -> bytes:
        """Like :meth:`eof`, but never raises: a partial head is dropped silently."""
        try:
            return self.eof()
        except RemoteProtocolError:
            return b""

    # -- heads ----------------------------------------------------------------------------

    def _feed_head(self, buf: bytes, mv: memoryview, pos: int, out: list) -> int:
        held = self._held
        if not held:
            # Empty lines before a request line are passed through (RFC 9112 §2.2).
            start = pos
            n = len(buf)
            while pos < n and buf[pos] in b"\r\n":
                pos += 1
            if pos > start:
                out.append(mv[start:pos])
                if pos == n:
                    return pos
            self._start_message()
        new_pos, done = self._hold_until(mv, pos, b"\r\n\r\n", self._max_head, "request head")
        self._validate(mv[pos:new_pos])
        if done:
            head = bytes(held)
            held.clear()
            out.append(self._finish_head(head))
        return new_pos

    def _finish_head(self, head: bytes) -> bytes:
        ev = self._events
        assert ev is not None
        if not ev.headers_complete:  # llhttp and the CRLFCRLF search disagree
            raise RemoteProtocolError(f"llhttp did not complete the request head {head[:64]!r}")
        line_end = head.index(b"\r\n") + 2
        # llhttp accepted the request line, so it ends in "<proto>/<digit>.<digit>"; it also
        # takes RTSP/ and ICE/, which are not HTTP (and would not get X-Forwarded-* sense).
        protocol = head[line_end - 10 : line_end - 2]
        if protocol == b"HTTP/1.1":
            ev.version = "1.1"
        elif protocol == b"HTTP/1.0":
            ev.version = "1.0"
        else:
            raise RemoteProtocolError(f"unsupported protocol {protocol!r} in {head[:64]!r}")
        ev.scan_fields(head, line_end - 1, self._copy_host)
        if len(ev.hosts) > 1:
            # RFC 9112 §3.2: a request with two Host fields is a 400.  The relay routed on
            # one of them; the local server might pick the other.
            raise RemoteProtocolError(f"request has {len(ev.hosts)} Host fields: {ev.hosts!r}")
        rewritten = self._rewrite_head(head, line_end, ev)
        self._requests += 1

        # Upgrade (RFC 9110 §7.8) and CONNECT (§9.3.6): llhttp sets `upgrade` for CONNECT, and
        # for a request with an Upgrade field that is also listed in Connection.
        #
        # Why the rest of the client stream is opaque: this rewriter sees only the
        # client->server direction; the 101 (or 2xx to CONNECT) that switches protocols
        # travels the other way.  A compliant client sends nothing after an Upgrade request
        # until it has that answer (RFC 6455 §4.1 "MUST wait for a response from the server
        # before sending any further data"; h2c sends its preface after the 101), and after
        # a switch the bytes are WebSocket frames, TLS or HTTP/2, which may contain anything
        # that looks like a request line.  Parsing them as HTTP would corrupt or kill a
        # working tunnel; passing them untouched cannot.  The request body, if any, comes
        # before the switch, but it passes untouched either way, so the output is the same
        # as if it had been framed.  (llhttp makes the same choice: it stops at the end of
        # an Upgrade head.)
        #
        # The price: if the server *refuses* the upgrade and keeps the connection open, a
        # misbehaving client's later requests reach it without X-Forwarded-* and with its
        # own forwarding headers intact.  Closing that hole needs the server's status line
        # from the server->client direction (hold the client's bytes after an Upgrade head
        # until the response says 101 or not); this class does not see that direction.
        # HTTP/1.0 is exempt: servers MUST ignore Upgrade there (RFC 9110 §7.8), so
        # the stream stays HTTP and a server that switched anyway gets its stream closed on
        # the first frame that does not parse, which fails safe.
        if ev.method == b"CONNECT" or (ev.upgrade and ev.version == "1.1"):
            self._state = _OPAQUE
            self._drop_parser()
            return rewritten

        if ev.transfer_encoding:
            if ev.version == "1.0":
                # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means faulty framing.
                raise RemoteProtocolError(
                    f"Transfer-Encoding in an HTTP/1.0 request {head[:64]!r}"
                )
            if ev.content_length is not None:  # llhttp rejects this already; belt and braces
                raise RemoteProtocolError("request has both Content-Length and Transfer-Encoding")
            # llhttp accepted it, so chunked is the final coding (RFC 9112 §6.3 rule 4).
            if ev.message_complete:
                raise RemoteProtocolError("llhttp ended a chunked request at its head")
            self._state = _CHUNK_SIZE_LINE
            return rewritten

        length = int(ev.content_length) if ev.content_length is not None else 0
        if ev.message_complete != (length == 0) and not ev.upgrade:
            raise RemoteProtocolError(
                f"framing disagreement with llhttp for Content-Length {ev.content_length!r}"
            )
        if length:
            self._drop_parser()  # a Content-Length body is sliced, never parsed
            self._state = _BODY
            self._remaining = length
        else:
            self._end_message()
        return rewritten

    def _rewrite_head(self, head: bytes, line_end: int, ev: _MessageEvents) -> bytes:
        # The new fields go right after the request line, as pagekite.py puts them, rather
        # than before the blank line: a server that silently ignores fields beyond a count
        # or size limit, or stops reading at a field it dislikes, still sees ours.  It is
        # safe against line folding: llhttp has rejected whitespace at the start of any
        # field line (obs-fold, RFC 9112 §5.2), so no client line can continue ours.
        fields = head[line_end:]
        if ev.untrusted:
            fields = _UNTRUSTED_FIELD.sub(UNTRUSTED_PREFIX, fields)
        extra = self._fixed_lines
        if self._copy_host and ev.hosts:
            extra += b"X-Forwarded-Host: " + ev.hosts[0] + b"\r\n"
        return b"".join((head[:line_end], extra, fields))

    # -- chunked bodies -------------------------------------------------------------------

    def _feed_chunk_size(self, mv: memoryview, pos: int, out: list) -> int:
        new_pos, done = self._hold_until(mv, pos, b"\n", MAX_CHUNK_LINE, "chunk-size line")
        self._validate(mv[pos:new_pos])  # llhttp checks the size, extensions and CRLF
        if done:
            line = bytes(self._held)
            self._held.clear()
            match = _CHUNK_SIZE.match(line)
            if match is None or not line.endswith(b"\r\n"):  # llhttp would have raised
                raise RemoteProtocolError(f"bad chunk-size line {line!r}")
            out.append(line)
            size = int(match.group(), 16)
            if size:
                self._state = _CHUNK_DATA
                self._remaining = size
            else:
                self._state = _TRAILERS
                # Seed with the CRLF that ended the last-chunk line, so that the end of the
                # trailer section is always the first CRLFCRLF (also when it is empty).
                self._held += b"\r\n"
        return new_pos

    def _feed_chunk_data_end(self, mv: memoryview, pos: int, out: list) -> int:
        held = self._held
        take = min(2 - len(held), len(mv) - pos)
        held += mv[pos : pos + take]
        self._validate(mv[pos : pos + take])
        if len(held) == 2:
            if held != b"\r\n":  # llhttp would have raised
                raise RemoteProtocolError(f"chunk data not followed by CRLF: {bytes(held)!r}")
            out.append(b"\r\n")
            held.clear()
            self._state = _CHUNK_SIZE_LINE
        return pos + take

    def _feed_trailers(self, mv: memoryview, pos: int, out: list) -> int:
        new_pos, done = self._hold_until(
            mv, pos, b"\r\n\r\n", self._max_head + 2, "chunked trailer section"
        )
        self._validate(mv[pos:new_pos])
        if done:
            out.append(bytes(self._held[2:]))
            self._held.clear()
            ev = self._events
            assert ev is not None
            if not ev.message_complete:
                raise RemoteProtocolError("llhttp did not end the chunked body where kite did")
            self._drop_parser()
            self._end_message()
        return new_pos

    # -- helpers --------------------------------------------------------------------------

    def _hold_until(
        self, mv: memoryview, pos: int, term: bytes, limit: int, what: str
    ) -> tuple[int, bool]:
        """Move bytes from ``mv[pos:]`` into ``_held`` up to and including ``term``.

        Returns ``(new_pos, found)``.  ``_held`` never grows beyond ``limit`` bytes.
        """
        held = self._held
        old = len(held)
        take = min(len(mv) - pos, limit - old)
        held += mv[pos : pos + take]
        i = held.find(term, max(0, old - len(term) + 1))
        if i < 0:
            if len(held) >= limit:
                raise RemoteProtocolError(
                    f"{what} longer than {limit} bytes: {bytes(held[:64])!r}..."
                )
            return pos + take, False
        end = i + len(term)
        del held[end:]
        return pos + (end - old), True

    def _validate(self, piece: BytesLike) -> None:
        """Feed ``piece`` to the current llhttp parser (heads and chunked bodies only)."""
        ev = self._events
        parser = self._parser
        assert ev is not None and parser is not None
        if ev.message_complete and len(piece):
            raise RemoteProtocolError("llhttp ended the message before kite's framer did")
        try:
            parser.feed_data(piece)
        except httptools.HttpParserUpgrade:
            # llhttp stops at the end of a CONNECT/Upgrade head; _finish_head decides.
            ev.message_complete = True
        except httptools.HttpParserError as exc:
            raise RemoteProtocolError(
                f"malformed HTTP request ({exc}) in {self.state} near {bytes(piece[:64])!r}"
            ) from exc
        if ev.begun > 1:
            raise RemoteProtocolError("llhttp ended the message before kite's framer did")

    def _start_message(self) -> None:
        """A new request head begins: take an idle parser, or make one."""
        try:
            events = _IDLE_PARSERS.pop()
        except IndexError:
            events = _MessageEvents()
            events.parser = httptools.HttpRequestParser(events)
        else:
            events.reset()
        self._events = events
        self._parser = events.parser

    def _end_message(self) -> None:
        ev = self._events
        keep_alive = ev is None or ev.keep_alive
        if (keep_alive and ev is not None and self._parser is not None
                and ev.message_complete and not ev.upgrade
                and len(_IDLE_PARSERS) < _IDLE_PARSERS_MAX):
            # llhttp ended this message itself and waits for the next one, as a fresh
            # parser would: it can take the next head of any stream (a GET costs no new
            # parser, and an idle keep-alive stream holds none).
            _IDLE_PARSERS.append(ev)
        else:
            self._drop_parser()
        self._events = None
        self._parser = None
        self._state = _HEAD if keep_alive else _DISCARD

    def _drop_parser(self) -> None:
        if self._events is not None:
            self._events.parser = None  # break the parser <-> callbacks cycle
        self._parser = None

    def _fail(self) -> None:
        self._drop_parser()
        self._events = None
        self._held.clear()
        self._state = _CLOSED


def _host_bytes(host: str | bytes) -> bytes | None:
    if not isinstance(host, str):
        return bytes(host)
    try:
        return host.encode("ascii")
    except UnicodeEncodeError:
        pass
    try:
        return host.encode("idna")  # an internationalised kite name, as the relay routes it
    except UnicodeError:
        return None


def _format_client_ip(client_ip: object) -> bytes:
    if type(client_ip) is str:
        return _format_client_text(client_ip)
    return _format_client_address(client_ip)


@functools.lru_cache(maxsize=4096)
def _format_client_text(client_ip: str) -> bytes:
    # Cached: one rewriter a visitor stream, and visitors come back (parsing an address
    # costs 3-11 us).
    return _format_client_address(client_ip)


def _format_client_address(client_ip: object) -> bytes:
    if client_ip == "unknown":
        return b"unknown"
    try:
        addr = ipaddress.ip_address(client_ip)  # type: ignore[arg-type]
    except ValueError:
        raise RemoteProtocolError(f"client address is not an IP address: {client_ip!r}") from None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        else:
            # Rebuild from the 16 bytes: drops a scope id ("fe80::1%eth0"), whose text
            # ipaddress does not validate (it would accept "%a\r\nX: y").
            addr = ipaddress.IPv6Address(addr.packed)
    return str(addr).encode("ascii")
