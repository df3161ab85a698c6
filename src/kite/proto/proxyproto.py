"""HAProxy PROXY protocol, versions 1 and 2: build a header, or parse one.

For raw and https kites the backend cannot add an HTTP header (the bytes are opaque or
encrypted end to end), so a local server that wants the visitor's address gets a PROXY
protocol header in front of the stream instead (pagekite.py's ``+proxyproto``, which only
writes v1 with a ``0.0.0.0`` destination).  The parser is for tests and for a relay that
sits behind a load balancer which speaks it.

Reference: "The PROXY protocol, Versions 1 & 2", haproxy/doc/proxy-protocol.txt.

v1 (text, at most 107 bytes)::

    PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\\r\\n
    PROXY TCP6 <src> <dst> <sport> <dport>\\r\\n
    PROXY UNKNOWN[ anything]\\r\\n

v2 (binary)::

    12-byte signature  \\r\\n\\r\\n\\x00\\r\\nQUIT\\n
    1 byte  version (high nibble, 2) | command (low nibble: 0 LOCAL, 1 PROXY)
    1 byte  address family (high: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX)
            | transport (low: 0 UNSPEC, 1 STREAM, 2 DGRAM)
    2 bytes length of what follows, network order
    INET:  src(4) dst(4) sport(2) dport(2)         = 12 bytes
    INET6: src(16) dst(16) sport(2) dport(2)       = 36 bytes
    UNIX:  src(108) dst(108)                        = 216 bytes
    then TLVs: type(1) length(2) value, up to the end of the block

Addresses: an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, what a dual-stack socket
reports for an IPv4 peer) is an IPv4 address here, in both directions: the builders emit
TCP4 / AF_INET for it, the parser returns it as ``a.b.c.d``.  When one side is IPv4 and the
other IPv6 (both are needed in one family), the IPv4 one is written mapped, as TCP6.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from typing import Iterable, Optional, Tuple, Union

from kite.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "PROXY_V2_SIGNATURE",
    "PROXY_V1_MAX",
    "PROXY_V1_UNKNOWN",
    "PROXY_V2_LOCAL",
    "DEFAULT_MAX_HEADER",
    "proxy_v1",
    "proxy_v2",
    "parse_proxy_header",
]

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Longest v1 line, CRLF included (the spec's own worst case, TCP6 with long addresses).
PROXY_V1_MAX = 107
#: v1 header for a connection whose addresses are unknown (or not IP).
PROXY_V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
#: v2 LOCAL command (health checks; the receiver uses the real connection addresses).
PROXY_V2_LOCAL = PROXY_V2_SIGNATURE + b"\x20\x00\x00\x00"
#: Default bound of a v2 header the parser accepts (16-byte prefix + addresses + TLVs).
#: The format allows 16 + 65535; nothing kite or a load balancer sends comes near 4 KiB.
DEFAULT_MAX_HEADER = 4096

_V2_PREFIX = struct.Struct("!12sBBH")
_V2_INET = struct.Struct("!4s4sHH")
_V2_INET6 = struct.Struct("!16s16sHH")
_V2_PROXY = 0x21  # version 2, command PROXY
_V2_FAMILIES = frozenset((0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32))  # the spec's list
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")

Address = Tuple[str, int]
IPLike = Union[str, ipaddress.IPv4Address, ipaddress.IPv6Address]
ParseResult = Tuple[int, Optional[Address], Optional[Address]]


def _ip(value: IPLike, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise LocalProtocolError(f"{what} is not an IP address: {value!r}") from None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        return ipaddress.IPv6Address(addr.packed)  # drop a scope id ("%eth0")
    return addr


def _port(value: int, what: str) -> int:
    if type(value) is not int or not 0 <= value <= 65535:
        raise LocalProtocolError(f"{what} must be an int in 0..65535, not {value!r}")
    return value


def _pair(src_ip: IPLike, dst_ip: IPLike):
    src = _ip(src_ip, "src_ip")
    dst = _ip(dst_ip, "dst_ip")
    if src.version != dst.version:
        # One family for both: write the IPv4 one as ::ffff:a.b.c.d.
        if src.version == 4:
            src = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + src.packed)
        else:
            dst = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + dst.packed)
    return src, dst


def _v1_text(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if addr.version == 6 and addr.ipv4_mapped is not None:
        # str() gives "::ffff:102:304" on Python < 3.13; the dotted form is what
        # inet_pton-based receivers and humans expect.
        return f"::ffff:{addr.ipv4_mapped}"
    return str(addr)


def proxy_v1(src_ip: IPLike, src_port: int, dst_ip: IPLike, dst_port: int) -> bytes:
    """``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n`` for one TCP connection.

    ``src`` is the visitor, ``dst`` the address it connected to (the relay's public
    address and port; pagekite.py writes ``0.0.0.0`` when it does not know it).
    """
    src, dst = _pair(src_ip, dst_ip)
    sport = _port(src_port, "src_port")
    dport = _port(dst_port, "dst_port")
    family = "TCP4" if src.version == 4 else "TCP6"
    line = f"PROXY {family} {_v1_text(src)} {_v1_text(dst)} {sport} {dport}\r\n"
    return line.encode("ascii")


def proxy_v2(
    src_ip: IPLike,
    src_port: int,
    dst_ip: IPLike,
    dst_port: int,
    *,
    tlvs: Iterable[Tuple[int, bytes]] = (),
) -> bytes:
    """The binary v2 header (command PROXY, transport STREAM) for one TCP connection.

    ``tlvs`` are appended as given, e.g. ``[(0x02, b"app.example.com")]``
    (PP2_TYPE_AUTHORITY, the host name the visitor asked for: the SNI of an https kite).
    """
    src, dst = _pair(src_ip, dst_ip)
    sport = _port(src_port, "src_port")
    dport = _port(dst_port, "dst_port")
    if src.version == 4:
        family = 0x11
        block = _V2_INET.pack(src.packed, dst.packed, sport, dport)
    else:
        family = 0x21
        block = _V2_INET6.pack(src.packed, dst.packed, sport, dport)
    extra = []
    for tlv_type, value in tlvs:
        value = bytes(value)
        if type(tlv_type) is not int or not 0 <= tlv_type <= 255 or len(value) > 65535:
            raise LocalProtocolError(f"bad PROXY v2 TLV ({tlv_type!r}, {len(value)} bytes)")
        extra.append(struct.pack("!BH", tlv_type, len(value)) + value)
    body = block + b"".join(extra)
    if len(body) > 65535:
        raise LocalProtocolError(f"PROXY v2 header too long ({len(body)} bytes after the prefix)")
    return _V2_PREFIX.pack(PROXY_V2_SIGNATURE, _V2_PROXY, family, len(body)) + body


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
