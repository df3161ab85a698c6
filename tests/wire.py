"""Reference encoders and decoders that kite itself never needs: the test suite's side of
the wire (a ZChunk compressor as pagekite.py compresses, a PROXY header parser as a local
server reads one, the backend's judgement of a relay's ping reply)."""

from __future__ import annotations

import ipaddress
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple, Union

from kite.errors import HandshakeError, LocalProtocolError, RemoteProtocolError
from kite.proto.control import _block, _check_sid
from kite.proto.proxyproto import PROXY_V1_MAX, PROXY_V2_SIGNATURE
from kite.proto.zchunks import MAX_BODY, MIN_COMPRESS

Buffer = Union[bytes, bytearray, memoryview]

# -- ZChunks: the sending side (kite never compresses) -----------------------------------------

def _is_uncompressible(header_block: bytes) -> bool:
    # NOOP (every control chunk) and EOF chunks are always sent plain.
    for line in header_block.split(b"\r\n"):
        name = line.split(b":", 1)[0].strip().lower()
        if name in (b"noop", b"eof"):
            return True
    return False


class ZDeflater:
    """One tunnel direction's compressor: frames chunks, compressed where the rules allow.

    ``frame()`` returns a complete chunk (size line + body) for ``ChunkWriter.write_raw``.
    Use it only once the peer advertised ``ZChunks``.  ``level`` 1 is what pagekite.py's
    relay uses (its backend uses 9).
    """

    __slots__ = ("level", "_z", "_reset_pending", "_history")

    def __init__(self, level: int = 1) -> None:
        if not (isinstance(level, int) and 0 <= level <= 9):
            raise LocalProtocolError(f"zlib level must be 0..9: {level!r}")
        self.level = level
        self._z = zlib.compressobj(level)
        self._reset_pending = False
        self._history: dict[int, tuple[int, int]] = {}  # sid -> (plain, compressed) sizes

    def reset(self) -> None:
        """The peer sent ZRST: start a new zlib stream and mark the next chunk with ``R``."""
        self._z = zlib.compressobj(self.level)
        self._reset_pending = True

    def forget(self, sid: int) -> None:
        """Drop the size history of a closed stream."""
        self._history.pop(sid, None)

    def stream_compresses(self, sid: int) -> bool:
        """False once a chunk of ``sid`` grew when compressed."""
        plain, packed = self._history.get(sid, (0, 0))
        return not plain < packed

    def frame(
        self,
        header_block: Buffer,
        payload: Buffer = b"",
        *,
        sid: Optional[int] = None,
        compress: bool = True,
    ) -> bytes:
        """Frame one chunk: ``header_block`` (``Name: value\\r\\n`` lines, no blank line) and
        ``payload``.  ``sid`` names the stream whose size history applies (data and stream
        open chunks); ``compress=False`` forces a plain chunk.  Either way the chunk carries
        ``R`` if it is the first after :meth:`reset`."""
        block = bytes(header_block)
        if (
            not block.endswith(b"\r\n")
            or block.startswith(b"\r\n")
            or b"\r\n\r\n" in block
        ):  # the same refusals as ChunkWriter.write_chunk (an empty block ends in no CRLF)
            raise LocalProtocolError(f"bad chunk header block: {block[:80]!r}")
        body = b"".join((block, b"\r\n", payload))
        if len(body) > MAX_BODY:
            raise LocalProtocolError(f"chunk body of {len(body)} bytes exceeds {MAX_BODY}")
        rst = b"R" if self._reset_pending else b""
        self._reset_pending = False
        if (
            compress
            and len(body) > MIN_COMPRESS
            and (sid is None or self.stream_compresses(sid))
            and not _is_uncompressible(block)
        ):
            packed = self._z.compress(body) + self._z.flush(zlib.Z_SYNC_FLUSH)
            if sid is not None:
                self._history[sid] = (len(body), len(packed))
            return b"%xZ%x%s\r\n" % (len(body), len(packed), rst) + packed
        return b"%x%s\r\n" % (len(body), rst) + body

    def frame_data(self, sid: int, payload: Buffer) -> bytes:
        """Frame a data chunk (``SID: n``) for stream ``sid``."""
        return self.frame(b"SID: %d\r\n" % sid, payload, sid=sid)


def build_data(sid: int, payload: Buffer) -> tuple[bytes, Buffer]:
    """A data chunk ``SID: n`` (for ``ZDeflater.frame``; ``ChunkWriter.write_data`` is the
    uncompressed fast way)."""
    return _block(("SID", _check_sid(sid))), payload


# -- PROXY protocol: the receiving side (kite only sends PROXY headers) ----------------------

#: Default bound of a v2 header the parser accepts (16-byte prefix + addresses + TLVs).
DEFAULT_MAX_HEADER = 4096
_V2_PREFIX = struct.Struct("!12sBBH")
_V2_INET = struct.Struct("!4s4sHH")
_V2_INET6 = struct.Struct("!16s16sHH")
_V2_FAMILIES = frozenset((0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32))  # the spec's list
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
Address = Tuple[str, int]
ParseResult = Tuple[int, Optional[Address], Optional[Address]]


def parse_proxy_header(
    data: Union[bytes, bytearray, memoryview], *, max_len: int = DEFAULT_MAX_HEADER
) -> Optional[ParseResult]:
    """Parse a PROXY v1 or v2 header at the start of ``data``.

    Returns ``None`` when ``data`` is a valid beginning that needs more bytes, else
    ``(header_len, src, dst)``: ``data[header_len:]`` is the proxied stream, ``src`` and
    ``dst`` are ``(ip, port)`` tuples, or both ``None`` when the header carries no IP
    addresses (v1 ``UNKNOWN``, v2 ``LOCAL``, ``AF_UNSPEC`` or ``AF_UNIX``; the receiver then
    uses the connection's own addresses, as the spec says).  IPv4-mapped addresses come
    back as dotted IPv4.  TLVs are skipped (``header_len`` covers them).

    Raises :class:`RemoteProtocolError` when ``data`` does not start with a PROXY header,
    or the header is malformed or longer than ``max_len`` (v2) / 107 bytes (v1).
    """
    head = bytes(data[:PROXY_V1_MAX]) if len(data) > PROXY_V1_MAX else bytes(data)
    if not head:
        return None
    if head[:1] == b"P":
        return _parse_v1(head)
    if head[:1] == b"\r":
        return _parse_v2(data, head, max_len)
    raise RemoteProtocolError(f"not a PROXY protocol header: {head[:16]!r}")


def _parse_v1(head: bytes) -> Optional[ParseResult]:
    if not head.startswith(b"PROXY "):
        if b"PROXY "[: len(head)] == head:
            return None
        raise RemoteProtocolError(f"not a PROXY protocol header: {head[:16]!r}")
    end = head.find(b"\r\n")
    if end < 0:
        if len(head) >= PROXY_V1_MAX:
            raise RemoteProtocolError(
                f"PROXY v1 line without CRLF in {PROXY_V1_MAX} bytes: {head!r}"
            )
        if b"\n" in head:
            raise RemoteProtocolError(f"PROXY v1 line not ended by CRLF: {head!r}")
        return None
    line = head[:end]
    header_len = end + 2
    parts = line.split(b" ")
    if parts[1] == b"UNKNOWN":
        return header_len, None, None  # the rest of the line is to be ignored (spec 2.1)
    if parts[1] not in (b"TCP4", b"TCP6") or len(parts) != 6:
        raise RemoteProtocolError(f"malformed PROXY v1 line: {line!r}")
    cls = ipaddress.IPv4Address if parts[1] == b"TCP4" else ipaddress.IPv6Address
    try:
        src = cls(parts[2].decode("ascii"))
        dst = cls(parts[3].decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise RemoteProtocolError(f"bad address in PROXY v1 line: {line!r}") from None
    ports = []
    for raw in parts[4:6]:
        if not _V1_PORT.fullmatch(raw) or int(raw) > 65535:
            raise RemoteProtocolError(f"bad port {raw!r} in PROXY v1 line: {line!r}")
        ports.append(int(raw))
    return header_len, (_text(src), ports[0]), (_text(dst), ports[1])


def _parse_v2(data, head: bytes, max_len: int) -> Optional[ParseResult]:
    if len(head) < 16:
        if PROXY_V2_SIGNATURE[: len(head)] == head[:12]:
            return None
        raise RemoteProtocolError(f"not a PROXY protocol header: {head[:16]!r}")
    signature, ver_cmd, family, length = _V2_PREFIX.unpack_from(head)
    if signature != PROXY_V2_SIGNATURE:
        raise RemoteProtocolError(f"not a PROXY protocol header: {head[:16]!r}")
    if ver_cmd >> 4 != 2 or ver_cmd & 0x0F not in (0, 1):
        raise RemoteProtocolError(f"bad PROXY v2 version/command byte {ver_cmd:#04x}")
    if family not in _V2_FAMILIES:
        raise RemoteProtocolError(f"bad PROXY v2 family/transport byte {family:#04x}")
    header_len = 16 + length
    if header_len > max_len:
        raise RemoteProtocolError(f"PROXY v2 header of {header_len} bytes exceeds {max_len}")
    if len(data) < header_len:
        return None
    if ver_cmd & 0x0F == 0:  # LOCAL: ignore the address block
        return header_len, None, None
    af = family >> 4
    if af == 1:
        if length < _V2_INET.size:
            raise RemoteProtocolError(f"PROXY v2 AF_INET block of {length} bytes (< 12)")
        s, d, sport, dport = _V2_INET.unpack(bytes(data[16 : 16 + _V2_INET.size]))
        return header_len, (_text(ipaddress.IPv4Address(s)), sport), (
            _text(ipaddress.IPv4Address(d)),
            dport,
        )
    if af == 2:
        if length < _V2_INET6.size:
            raise RemoteProtocolError(f"PROXY v2 AF_INET6 block of {length} bytes (< 36)")
        s, d, sport, dport = _V2_INET6.unpack(bytes(data[16 : 16 + _V2_INET6.size]))
        return header_len, (_text(ipaddress.IPv6Address(s)), sport), (
            _text(ipaddress.IPv6Address(d)),
            dport,
        )
    if af == 3 and length < 216:
        raise RemoteProtocolError(f"PROXY v2 AF_UNIX block of {length} bytes (< 216)")
    return header_len, None, None  # AF_UNSPEC, AF_UNIX: no IP addresses


def _text(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


# -- the pre-flight ping: the backend's side -----------------------------------------------

@dataclass(frozen=True)
class PingReply:
    """What a backend learns from a relay's answer to :data:`PING_REQUEST`."""

    uuid: Optional[str]  # the relay's identity (X-PageKite-UUID), None if absent
    overloaded: bool  # X-PageKite-Overloaded present: the relay asks to be avoided


def parse_ping_reply(data: Union[bytes, str]) -> PingReply:
    """Judge a relay's answer to :data:`PING_REQUEST` as pagekite.py's ``Ping`` does: it must
    start with ``HTTP/1.1 503 Unavailable`` (else HandshakeError: never use that relay)."""
    text = data.decode("latin-1") if isinstance(data, (bytes, bytearray, memoryview)) else data
    if not text.startswith("HTTP/1.1 503 Unavailable"):
        raise HandshakeError(f"not a PageKite ping reply: {text[:40]!r}")
    _, sep, rest = text.partition("X-PageKite-UUID: ")
    words = rest.split()
    uuid = words[0] if sep and words else None
    return PingReply(uuid=uuid, overloaded="X-PageKite-Overloaded:" in text)
