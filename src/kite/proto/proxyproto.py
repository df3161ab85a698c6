"""HAProxy PROXY protocol, versions 1 and 2: build the header a local server reads.

For raw and https kites the backend cannot add an HTTP header (the bytes are opaque or
encrypted end to end), so a local server that wants the visitor's address gets a PROXY
protocol header in front of the stream instead (pagekite.py's ``+proxyproto``, which only
writes v1 with a ``0.0.0.0`` destination).

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
TCP4 / AF_INET for it.  When one side is IPv4 and the
other IPv6 (both are needed in one family), the IPv4 one is written mapped, as TCP6.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Iterable, Tuple, Union

from ..errors import LocalProtocolError

__all__ = [
    "PROXY_V2_SIGNATURE",
    "PROXY_V1_MAX",
    "PROXY_V1_UNKNOWN",
    "PROXY_V2_LOCAL",
    "proxy_v1",
    "proxy_v2",
]

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Longest v1 line, CRLF included (the spec's own worst case, TCP6 with long addresses).
PROXY_V1_MAX = 107
#: v1 header for a connection whose addresses are unknown (or not IP).
PROXY_V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
#: v2 LOCAL command (health checks; the receiver uses the real connection addresses).
PROXY_V2_LOCAL = PROXY_V2_SIGNATURE + b"\x20\x00\x00\x00"

_V2_PREFIX = struct.Struct("!12sBBH")
_V2_INET = struct.Struct("!4s4sHH")
_V2_INET6 = struct.Struct("!16s16sHH")
_V2_PROXY = 0x21  # version 2, command PROXY

IPLike = Union[str, ipaddress.IPv4Address, ipaddress.IPv6Address]


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
