"""Per-kite HTTP basic auth (``kite expose --basic-auth USER:PASS``), checked in the backend.

Theory of operation
-------------------
A kite with basic auth passes its visitor streams through :class:`AuthGate`, the
X-Forwarded-* rewriter (:class:`kite.proto.forwarded.ForwardedRewriter`) with one more step:
every request head it has framed and validated - the first and each later one on a kept-alive
connection - is checked by :meth:`BasicAuth.allows` before any byte of it is released.  A
head without valid credentials is dropped, and so is everything the visitor sends after it:
no byte of that request reaches the local server.  The visitor gets ``401`` with
``WWW-Authenticate: Basic realm="NAME"`` and the connection closes:

* at once when no earlier request of the stream went to the local server;
* otherwise after the local server has answered what it got: its socket is half-closed
  (as if the visitor had ended its input), and the 401 follows the last byte it sends, so a
  pipelining client sees every answer in order.

Kites without basic auth never meet this module: their streams keep the plain rewriter (or
none), so the option costs nothing when it is off.

Credentials are compared with :func:`hmac.compare_digest` against every configured pair
(the time taken does not depend on which pair, or how much of one, matched); no credential,
and no Authorization value, is ever logged.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import re
from typing import Callable, Optional, Sequence

from ..errors import KiteError
from ..net.tunnel import Stream, StreamProtocol, StreamState, TunnelProtocol
from ..proto import forwarded
from ..proto.forwarded import ForwardedRewriter

log = logging.getLogger("kite.backend")

__all__ = ["BasicAuth", "AuthGate", "AuthGuard", "AuthStreamProtocol"]

# Authorization fields of a head that llhttp validated (every LF ends a field line, each
# ``name ":" value`` with the value up to the CR; see ForwardedRewriter.scan_fields).
_AUTHORIZATION = re.compile(rb"\nauthorization:[ \t]*([^\r]*)", re.IGNORECASE)
_BASIC = re.compile(rb"basic[ \t]+([A-Za-z0-9+/]+=*)[ \t]*", re.IGNORECASE)
# A realm we write into a quoted-string: visible ASCII without '"' and '\'.
_REALM_SAFE = re.compile(r"[!#-\[\]-~]+")


class BasicAuth:
    """The credentials of one kite and its realm; :meth:`allows` checks one request head."""

    __slots__ = ("realm", "_pairs")

    def __init__(self, credentials: Sequence[str], realm: str) -> None:
        if not credentials:
            raise ValueError("no credentials")
        self._pairs = [c.encode("utf-8") for c in credentials]
        self.realm = realm if _REALM_SAFE.fullmatch(realm) else "kite"

    def allows(self, head: bytes) -> bool:
        """True when ``head`` (a complete request head llhttp accepted) carries exactly one
        ``Authorization: Basic ...`` field whose credentials are one of the configured pairs."""
        fields = _AUTHORIZATION.findall(head)
        if len(fields) != 1:
            return False  # none, or two (which one would the server believe?)
        match = _BASIC.fullmatch(fields[0])
        if match is None:
            return False
        try:
            given = base64.b64decode(match.group(1), validate=True)
        except (binascii.Error, ValueError):
            return False
        ok = False
        for pair in self._pairs:
            ok |= hmac.compare_digest(given, pair)
        return ok

    def challenge(self) -> bytes:
        """The complete ``401`` response (``Connection: close``)."""
        body = (f"<!DOCTYPE html><html><head><title>401 Unauthorized</title></head><body>"
                f"<h1>401 Unauthorized</h1><p>{self.realm} needs a user name and password."
                f"</p></body></html>\n").encode()
        return (b"HTTP/1.1 401 Unauthorized\r\n"
                b"WWW-Authenticate: Basic realm=\"%s\", charset=\"UTF-8\"\r\n"
                b"Content-Type: text/html; charset=utf-8\r\nContent-Length: %d\r\n"
                b"Cache-Control: no-store\r\nConnection: close\r\n\r\n"
                % (self.realm.encode("ascii"), len(body))) + body


class AuthGate(ForwardedRewriter):
    """A :class:`ForwardedRewriter` that also checks every request head with ``auth``.

    With ``add_headers=False`` heads pass unchanged (a kite with ``forwarded = false``).
    The first head without valid credentials is dropped, every later byte is discarded, and
    ``on_refused`` is called (once, from inside ``feed``).  :attr:`passed` counts the heads
    that went through.
    """

    __slots__ = ("_auth", "_add_headers", "_on_refused", "refused", "passed")

    def __init__(self, auth: BasicAuth, *, on_refused: Callable[[], None],
                 add_headers: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self._auth = auth
        self._add_headers = add_headers
        self._on_refused = on_refused
        self.refused = False
        self.passed = 0

    def _rewrite_head(self, head: bytes, line_end: int, ev) -> bytes:
        if self._add_headers:
            return super()._rewrite_head(head, line_end, ev)
        return head

    def _finish_head(self, head: bytes) -> bytes:
        out = super()._finish_head(head)  # llhttp validated it; the framing is known
        if self._auth.allows(head):
            self.passed += 1
            return out
        # Drop the head and whatever follows it.  A parser still held (a chunked body was
        # next) is let go; one that went back to the shared pool is not ours any more.
        if self._events is not None:
            self._drop_parser()
            self._events = None
        self._held.clear()
        self._state = forwarded._DISCARD
        self.refused = True
        self._on_refused()
        return b""


class AuthGuard:
    """Basic auth on one visitor stream of the backend: the gate, and the 401 answer."""

    __slots__ = ("tunnel", "stream", "auth", "gate", "answer_at_eof", "_scheduled")

    def __init__(self, tunnel: TunnelProtocol, stream: Stream, auth: BasicAuth, *,
                 client_ip: Optional[str], proto: str, host: str, add_headers: bool) -> None:
        self.tunnel = tunnel
        self.stream = stream
        self.auth = auth
        self.answer_at_eof = False
        self._scheduled = False
        try:
            self.gate = AuthGate(auth, on_refused=self._refused, add_headers=add_headers,
                                 client_ip=client_ip or "unknown", proto=proto, host=host)
        except KiteError:  # a relay-supplied address or host we cannot write: no forwarding
            self.gate = AuthGate(auth, on_refused=self._refused, add_headers=False,
                                 client_ip="unknown", proto=proto, host=None)

    def start(self) -> bool:
        """Put the gate on the stream (its first bytes are checked now); False when the
        first request was refused already, so the local server need not be dialed."""
        self.stream.enable_rewriter(self.gate)
        return not (self.gate.refused and self.gate.passed == 0)

    def protocol(self) -> StreamProtocol:
        """The local connection's protocol (for ``create_connection``)."""
        return AuthStreamProtocol(self.tunnel, self.stream, self)

    def _refused(self) -> None:
        # Called from inside the gate's feed: act once the sink has finished its call.
        if not self._scheduled:
            self._scheduled = True
            self.tunnel.loop.call_soon(self._answer)

    def _answer(self) -> None:
        stream = self.stream
        if stream.closed:
            return
        log.info("%s: stream %d: visitor %s to %s: no valid credentials; answered 401",
                 self.tunnel.name, stream.sid, stream.peer, stream.host)
        if self.gate.passed == 0 or stream.state is StreamState.LOCAL_DONE:
            # Nothing of this stream is left for the local server to answer.
            if stream.state is not StreamState.LOCAL_DONE and not self.tunnel.closed:
                self.write_challenge()
            stream.finish()
            return
        # Earlier requests went through: the 401 goes after their answers.  The local
        # socket is half-closed after what is queued; AuthStreamProtocol sends the 401 when
        # the server has finished (its EOF).
        self.answer_at_eof = True
        stream.on_peer_eof(True, False)

    def write_challenge(self) -> None:
        writer = self.tunnel.writer
        writer.cancel_data_buffer()
        writer.write_data(self.stream.slot, self.auth.challenge())
        self.tunnel.schedule_flush()


class AuthStreamProtocol(StreamProtocol):
    """The local side of a basic-auth stream: sends the pending 401 after the server's EOF."""

    __slots__ = ("guard",)

    def __init__(self, tunnel: TunnelProtocol, stream: Stream, guard: AuthGuard) -> None:
        super().__init__(tunnel, stream)
        self.guard = guard

    def eof_received(self) -> bool:
        guard = self.guard
        if guard.answer_at_eof and not self.stream.closed and not self.tunnel.closed:
            guard.answer_at_eof = False
            guard.write_challenge()
        return super().eof_received()

