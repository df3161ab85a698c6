"""Tell visitors apart by their first bytes on the relay's one public port.

Theory of operation (docs/protocol.md §1.3, §8.1).  :func:`sniff` is called with all bytes
received so far on a new connection (call again with more when it says :data:`NEED_MORE`) and
answers one of:

* :class:`PingProbe` - ``\\nHost: ping.pagekite`` occurs in the first 64 bytes (pagekite.py's
  FastPingHelper peeks exactly that much): answer ``handshake.build_ping_reply`` and close;
* :class:`TlsHello` - first byte 0x16: a TLS ClientHello, with its SNI host name (or None);
* :class:`TunnelConnect` - ``CONNECT PageKite:...`` (any case): a backend; the complete head is
  ``data[:head_length]``, parse it with ``handshake.parse_tunnel_request``;
* :class:`ProxyConnect` - ``CONNECT host:port``: a proxy-aware client wants a raw/TLS stream;
* :class:`HttpRequest` - any other HTTP/1.x request head, with its ``Host`` (lower-cased, port
  removed) and whether it asks for a websocket upgrade.

Each result also names itself in ``kind`` (``need_more``, ``ping``, ``tls``, ``tunnel``,
``connect``, ``http``) for dispatch tables.

Anything else, a head longer than its bound, a missing or malformed ``Host``, or a malformed
ClientHello is a :class:`~kite.errors.SniffError` quoting the first bytes.  Every length read
is bounded before bytes are waited for: need-more is only answered while the bound allows.
HTTP heads are parsed with httptools (llhttp); the TLS records are read by a small bounds-
checked reader that never raises anything but SniffError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import httptools

from ..errors import HeadTooLong, SniffError
from .http import MAX_HEAD, find_head_end

__all__ = [
    "MAX_TUNNEL_HEAD",
    "MAX_HELLO",
    "TLS_ALERT_UNRECOGNIZED_NAME",
    "TLS_ALERT_INTERNAL_ERROR",
    "TLS_ALERT_PROTOCOL_VERSION",
    "TLS_1_2",
    "PING_PEEK",
    "NeedMore",
    "NEED_MORE",
    "PingProbe",
    "TunnelConnect",
    "ProxyConnect",
    "HttpRequest",
    "TlsHello",
    "SniffResult",
    "sniff",
    "parse_host",
]

MAX_TUNNEL_HEAD = 65536  # bound on a CONNECT PageKite head (one ~130-byte line per kite)
MAX_HELLO = 65536  # bound on the TLS records that carry one ClientHello, headers included
MAX_RECORD = 16384  # TLSPlaintext.length limit, RFC 8446 §5.1
PING_PEEK = 64  # pagekite.py FastPingHelper: recv(64, MSG_PEEK)

# A fatal TLS alert record (RFC 8446 §6): level 2 (fatal), description 112 unrecognized_name
# for names the relay does not know, 80 internal_error for a known kite that is offline.
TLS_ALERT_UNRECOGNIZED_NAME = b"\x15\x03\x03\x00\x02\x02\x70"
TLS_ALERT_INTERNAL_ERROR = b"\x15\x03\x03\x00\x02\x02\x50"
# ... 70 protocol_version for a client that offers nothing newer than TLS 1.1 (in a TLS 1.0
# record, which such clients read; RFC 8446 §D.2).
TLS_ALERT_PROTOCOL_VERSION = b"\x15\x03\x01\x00\x02\x02\x46"
TLS_1_2 = 0x0303  # the wire value of TLS 1.2 (1.3 is 0x0304)

_PING_MARK = b"\nHost: ping.pagekite"
_TUNNEL_PREFIX = b"connect pagekite:"

Buffer = Union[bytes, bytearray, memoryview]


class NeedMore:
    """Not enough bytes yet to decide: read more and call :func:`sniff` again."""

    __slots__ = ()
    kind = "need_more"

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE = NeedMore()


@dataclass(frozen=True)
class PingProbe:
    """pagekite.py's pre-flight ``HEAD /ping`` with ``Host: ping.pagekite``."""

    kind: ClassVar[str] = "ping"


@dataclass(frozen=True)
class TunnelConnect:
    """A backend's ``CONNECT PageKite:...``; its head is ``data[:head_length]``."""

    kind: ClassVar[str] = "tunnel"

    head_length: int


@dataclass(frozen=True)
class ProxyConnect:
    """``CONNECT host:port``: ``host`` lower-cased (an IPv6 literal without its brackets);
    bytes after ``head_length`` already belong to the tunnelled stream."""

    kind: ClassVar[str] = "connect"

    host: str
    port: int
    head_length: int


@dataclass(frozen=True)
class HttpRequest:
    """An HTTP/1.x request head: route by ``host``; the head is ``data[:head_length]``."""

    kind: ClassVar[str] = "http"

    method: str
    path: str
    host: str
    websocket: bool
    head_length: int
    http_version: str
    #: the client asked for JSON (``Accept: application/json``): error pages come as JSON
    wants_json: bool = False


@dataclass(frozen=True)
class TlsHello:
    """A TLS ClientHello; ``sni`` is its server_name host_name (lower-case, no trailing dot)
    or None; ``length`` is the size of the records that carry it; ``max_version`` the
    newest protocol version it offers (supported_versions, else legacy_version; GREASE
    values ignored): 0x0303 TLS 1.2, 0x0304 TLS 1.3."""

    kind: ClassVar[str] = "tls"

    sni: Optional[str]
    length: int
    max_version: int = 0x0304


SniffResult = Union[NeedMore, PingProbe, TunnelConnect, ProxyConnect, HttpRequest, TlsHello]


def sniff(
    data: Buffer,
    *,
    max_head: int = MAX_HEAD,
    max_tunnel_head: int = MAX_TUNNEL_HEAD,
    max_hello: int = MAX_HELLO,
) -> SniffResult:
    """Classify a new connection by ``data``, everything it has sent so far."""
    data = bytes(data)
    if not data:
        return NEED_MORE
    if _PING_MARK in data[:PING_PEEK]:
        return PingProbe()
    if data[0] == 0x16:
        return _sniff_tls(data, max_hello)
    prefix = data[: len(_TUNNEL_PREFIX)].lower()
    if prefix == _TUNNEL_PREFIX:
        end = _head_end(data, max_tunnel_head)
        return NEED_MORE if end is None else TunnelConnect(end)
    if len(prefix) < len(_TUNNEL_PREFIX) and _TUNNEL_PREFIX.startswith(prefix):
        return NEED_MORE
    return _sniff_http(data, max_head)


def _first(data: bytes) -> str:
    return f"{data[:32]!r}"


def _head_end(data: bytes, limit: int) -> Optional[int]:
    """A visitor's head ends at ``\r\n\r\n`` only (no bare-LF heads from visitors)."""
    try:
        return find_head_end(data, limit, bare_lf=False)
    except HeadTooLong:
        raise SniffError(f"request head longer than {limit} bytes: {_first(data)}") from None


# --------------------------------------------------------------------------------------------
# HTTP


class _HeadCollector:
    __slots__ = ("url", "headers", "complete")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


def _sniff_http(data: bytes, max_head: int) -> SniffResult:
    end = _head_end(data, max_head)
    head = _HeadCollector()
    parser = httptools.HttpRequestParser(head)
    try:
        # Feed only the head; while it is incomplete, feeding what there is lets llhttp
        # reject junk at its first byte instead of after 16 KiB.
        parser.feed_data(data if end is None else data[:end])
    except httptools.HttpParserUpgrade:
        pass  # CONNECT and Upgrade requests stop the parser right after their head
    except httptools.HttpParserError as exc:
        raise SniffError(f"not an HTTP request ({exc}): {_first(data)}") from None
    if end is None:
        return NEED_MORE
    if not head.complete:
        raise SniffError(f"incomplete HTTP request head: {_first(data)}")
    method = parser.get_method().decode("ascii")
    version = parser.get_http_version()
    if version not in ("1.0", "1.1"):
        raise SniffError(f"unsupported HTTP version {version!r}: {_first(data)}")
    if method == "CONNECT":
        host, port = _parse_authority(head.url)
        return ProxyConnect(host=host, port=port, head_length=end)
    hosts = [v for n, v in head.headers if n.lower() == b"host"]
    if not hosts:
        raise SniffError(f"HTTP request without Host: {_first(data)}")
    if len(hosts) > 1 and len({h.strip().lower() for h in hosts}) > 1:
        raise SniffError(f"HTTP request with conflicting Host headers: {hosts[:2]!r}")
    host, _ = _split_host(hosts[0], port_required=False)
    websocket = any(
        token.strip() == b"websocket"
        for n, v in head.headers
        if n.lower() == b"upgrade"
        for token in v.lower().split(b",")
    )
    wants_json = any(
        b"application/json" in v.lower() for n, v in head.headers if n.lower() == b"accept"
    )
    return HttpRequest(
        method=method,
        path=head.url.decode("latin-1"),
        host=host,
        websocket=websocket,
        head_length=end,
        http_version=version,
        wants_json=wants_json,
    )


_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._*")
_IPV6_CHARS = frozenset("0123456789abcdef:.")


def _strip_encoded_ip(host: str) -> str:
    # parsers.py StripEncodedIP: a "0x<8 or 32 hex digits>--" prefix names the relay's own
    # address in some pagekite.net set-ups; it is not part of the kite name.
    if host.startswith("0x"):
        hexpart, sep, rest = host[2:].partition("--")
        if sep and len(hexpart) in (8, 32) and all(c in "0123456789abcdef" for c in hexpart):
            return rest
    return host


def _split_host(value: bytes, *, port_required: bool) -> tuple[str, Optional[int]]:
    """``host[:port]`` or ``[v6]:port`` -> (lower-case host, port or None); SniffError if bad."""
    try:
        text = value.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        raise SniffError(f"non-ASCII host: {value[:80]!r}") from None
    port_text: Optional[str] = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not host or not set(host) <= _IPV6_CHARS or ":" not in host:
            raise SniffError(f"bad IPv6 host: {value[:80]!r}")
        if rest:
            if not rest.startswith(":"):
                raise SniffError(f"bad host: {value[:80]!r}")
            port_text = rest[1:]
    else:
        host, sep, port_text = text.partition(":")
        if not sep:
            port_text = None
        host = _strip_encoded_ip(host)
        if host.endswith(".") and len(host) > 1:
            host = host[:-1]
        if not host or len(host) > 253 or not set(host) <= _HOST_CHARS:
            raise SniffError(f"bad host: {value[:80]!r}")
    port: Optional[int] = None
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit() and 0 < len(port_text) <= 5
                and 0 < int(port_text) <= 65535):
            raise SniffError(f"bad port in host: {value[:80]!r}")
        port = int(port_text)
    elif port_required:
        raise SniffError(f"CONNECT target without port: {value[:80]!r}")
    return host, port


def _parse_authority(value: bytes) -> tuple[str, int]:
    host, port = _split_host(value, port_required=True)
    assert port is not None
    return host, port


def parse_host(value: Union[str, bytes]) -> str:
    """Normalise a ``Host`` header value as the sniffer does (lower case, port and encoded-IP
    prefix removed, one trailing dot removed); SniffError if it is not a host name."""
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
    return _split_host(raw, port_required=False)[0]


# --------------------------------------------------------------------------------------------
# TLS


def _sniff_tls(data: bytes, max_hello: int) -> SniffResult:
    handshake = bytearray()
    pos = 0
    while True:
        header = data[pos : pos + 5]
        if not header:  # the hello continues in a record that has not arrived yet
            if pos + 5 > max_hello:
                raise SniffError(f"TLS ClientHello longer than {max_hello} bytes")
            return NEED_MORE
        # Judge the record header bytes we have before waiting for the rest.
        if header[:1] != b"\x16" or (len(header) > 1 and header[1] != 3) or (
            len(header) > 2 and header[2] > 4
        ):
            raise SniffError(f"not a TLS handshake record: {_first(data[pos:])}")
        if len(header) < 5:
            if pos + 5 > max_hello:
                raise SniffError(f"TLS ClientHello longer than {max_hello} bytes")
            return NEED_MORE
        length = int.from_bytes(header[3:5], "big")
        if not 0 < length <= MAX_RECORD:
            raise SniffError(f"TLS record length {length} out of range: {_first(data)}")
        if pos + 5 + length > max_hello:
            raise SniffError(f"TLS ClientHello longer than {max_hello} bytes")
        fragment = data[pos + 5 : pos + 5 + length]
        if not handshake and fragment[:1] not in (b"", b"\x01"):
            raise SniffError(f"TLS handshake is not a ClientHello: {_first(data)}")
        if len(fragment) < length:
            return NEED_MORE
        handshake += fragment
        pos += 5 + length
        if len(handshake) >= 4:
            body_len = int.from_bytes(handshake[1:4], "big")
            if 4 + body_len > max_hello:
                raise SniffError(f"TLS ClientHello of {body_len} bytes is longer than {max_hello}")
            if len(handshake) >= 4 + body_len:
                sni, version = _client_hello_fields(bytes(handshake[4 : 4 + body_len]))
                return TlsHello(sni=sni, length=pos, max_version=version)


def _truncated(body: bytes, what: str) -> SniffError:
    return SniffError(f"truncated TLS ClientHello ({what}): {_first(body)}")


def _client_hello_fields(body: bytes) -> tuple[Optional[str], int]:
    """The SNI host name and the newest version a ClientHello body offers.

    Plain indexing with a bounds check before each field (every new connection of the
    relay passes here: no reader object, no slice per field)."""
    end = len(body)
    if end < 35:
        raise _truncated(body, "version and random")
    version = (body[0] << 8) | body[1]
    session_id_len = body[34]
    if session_id_len > 32:
        raise SniffError(f"TLS ClientHello session id of {session_id_len} bytes")
    pos = 35 + session_id_len
    if pos + 2 > end:
        raise _truncated(body, "cipher suites length")
    suites_len = (body[pos] << 8) | body[pos + 1]
    if suites_len < 2 or suites_len % 2:
        raise SniffError(f"TLS ClientHello cipher suites length {suites_len}")
    pos += 2 + suites_len
    if pos + 1 > end:
        raise _truncated(body, "compression methods length")
    compression_len = body[pos]
    if compression_len < 1:
        raise SniffError("TLS ClientHello without compression methods")
    pos += 1 + compression_len
    if pos > end:
        raise _truncated(body, "compression methods")
    if pos == end:
        return None, version  # no extensions at all (old clients)
    if pos + 2 > end:
        raise _truncated(body, "extensions length")
    extensions_len = (body[pos] << 8) | body[pos + 1]
    pos += 2
    if extensions_len != end - pos:
        raise SniffError(f"TLS ClientHello extensions length {extensions_len} != {end - pos}")
    sni: Optional[str] = None
    seen: set[int] = set()
    while pos < end:
        if pos + 4 > end:
            raise _truncated(body, "extension header")
        ext_type = (body[pos] << 8) | body[pos + 1]
        ext = pos + 4
        ext_end = ext + ((body[pos + 2] << 8) | body[pos + 3])
        if ext_end > end:
            raise _truncated(body, "extension")
        pos = ext_end
        if ext_type in seen:
            raise SniffError(f"TLS ClientHello repeats extension {ext_type}")
        seen.add(ext_type)
        if ext_type == 0:  # server_name, RFC 6066 §3
            if ext + 2 > ext_end:
                raise _truncated(body, "server name list length")
            names = ext + 2
            names_end = names + ((body[ext] << 8) | body[ext + 1])
            if names_end > ext_end:
                raise _truncated(body, "server name list")
            if names_end != ext_end or names == names_end:
                raise SniffError("malformed TLS server_name extension")
            while names < names_end:
                if names + 3 > names_end:
                    raise _truncated(body, "server name")
                name_type = body[names]
                name_end = names + 3 + ((body[names + 1] << 8) | body[names + 2])
                if name_end > names_end:
                    raise _truncated(body, "server name")
                if name_type == 0 and sni is None:
                    sni = _sni_host(body[names + 3 : name_end])
                names = name_end
        elif ext_type == 43:  # supported_versions, RFC 8446 §4.2.1
            if ext + 1 > ext_end:
                raise _truncated(body, "supported versions length")
            versions_end = ext + 1 + body[ext]
            if versions_end > ext_end:
                raise _truncated(body, "supported versions")
            if versions_end != ext_end or body[ext] == 0 or body[ext] % 2:
                raise SniffError("malformed TLS supported_versions extension")
            # GREASE values (RFC 8701) are 0x?a?a: never a real version
            real = [v for v in ((body[i] << 8) | body[i + 1]
                                for i in range(ext + 1, versions_end, 2))
                    if v & 0x0F0F != 0x0A0A]
            version = max(real, default=version)
    return sni, version


def _sni_host(name: bytes) -> str:
    try:
        host = name.decode("ascii").lower()
    except UnicodeDecodeError:
        raise SniffError(f"non-ASCII TLS server name: {name[:80]!r}") from None
    if host.endswith(".") and len(host) > 1:
        host = host[:-1]
    if not host or len(host) > 253 or not set(host) <= _HOST_CHARS:
        raise SniffError(f"bad TLS server name: {name[:80]!r}")
    return host
