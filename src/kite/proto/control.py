"""Control chunks of a live tunnel: builders and the parser that turns a chunk into events.

Theory of operation (docs/protocol.md §4.3, §5, §6; pagekite.py ``Tunnel.ProcessChunk``
and ``ProcessChunkDirectives``).  The fast path's Demux delivers plain data chunks to stream
sinks itself and hands every other chunk up as ``(headers, payload)``; :func:`parse_chunk`
turns that into a list of events, in the order pagekite.py acts on them:

1. ``PONG`` -> :class:`Pong`;
2. ``PING`` -> :class:`Ping`, and the chunk is a control chunk (``ZRST``/``SKB`` in the same
   chunk are ignored, as pagekite.py returns right after answering);
   otherwise ``ZRST`` -> :class:`ZReset`, ``SKB`` (with ``SID``) -> :class:`Skb`, and the
   chunk is a control chunk if it has ``NOOP``;
3. control chunk: ``Quota``/``QDays``/``QConns`` -> :class:`Quota`, kite headers ->
   :class:`KiteRequest` / :class:`KiteReply`; a control chunk that said nothing else ->
   :class:`Noop`.  Done.
4. otherwise ``SID`` is required: ``EOF`` -> :class:`Eof` (payload ignored); ``Proto`` and
   ``Host`` -> :class:`StreamOpen`; else :class:`Data` (a sid the demux had no sink for).
   pagekite.py treats ``Proto``/``Host`` on a sid it already knows as plain data: the caller,
   who knows its streams, does the same.

Each builder returns ``(header_block, payload)`` for ``ChunkWriter.write_chunk``:
``Name: value\\r\\n`` lines without the blank line.  Header names are
matched case-insensitively; malformed values raise RemoteProtocolError quoting them.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from ..errors import LocalProtocolError, RemoteProtocolError
from .handshake import RelayReply, TunnelRequest, parse_inband_reply, parse_inband_request
from .http import has_control

__all__ = [
    "MAX_SID",
    "MAX_PONG",
    "build_ping",
    "build_pong",
    "build_quota",
    "build_skb",
    "build_eof",
    "build_zrst",
    "build_stream_open",
    "parse_chunk",
    "parse_sid",
    "Event",
    "Ping",
    "Pong",
    "Skb",
    "Eof",
    "ZReset",
    "Quota",
    "KiteRequest",
    "KiteReply",
    "StreamOpen",
    "Data",
    "Noop",
]

MAX_SID = 2**31 - 1  # the fast path's StreamSlot bound; pagekite.py wraps its sids at 0x20000
MAX_PONG = 64  # pagekite.py echoes at most 64 characters of a PING value

Chunk = tuple[bytes, bytes]
Buffer = Union[bytes, bytearray, memoryview]


# --------------------------------------------------------------------------------------------
# Builders


def _block(*lines: tuple[str, object]) -> bytes:
    out = []
    for name, value in lines:
        text = f"{value}"
        if "\r" in text or "\n" in text or not text.isprintable():
            raise LocalProtocolError(f"invalid {name} value for a chunk header: {text!r}")
        out.append(f"{name}: {text}\r\n")
    try:
        return "".join(out).encode("latin-1")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"chunk header is not latin-1: {out!r}") from None


def _check_sid(sid: int) -> int:
    if not isinstance(sid, int) or not 0 <= sid <= MAX_SID:
        raise LocalProtocolError(f"stream id out of range 0..{MAX_SID}: {sid!r}")
    return sid


def build_ping(timestamp: Optional[float] = None) -> Chunk:
    """``NOOP: 1\\r\\nPING: <time.time() as %.4f>\\r\\n`` with payload ``!``."""
    if timestamp is None:
        timestamp = time.time()
    return _block(("NOOP", 1), ("PING", "%.4f" % timestamp)), b"!"


def build_pong(value: str) -> Chunk:
    """The answer to a PING: its value, truncated to 64 characters, payload ``!``."""
    return _block(("NOOP", 1), ("PONG", value[:MAX_PONG])), b"!"


def build_quota(
    quota: object, *, days: object = None, conns: object = None, pong: Optional[str] = None
) -> Chunk:
    """A relay's quota update (remote auth only), optionally answering a PING in the same
    chunk: ``NOOP``, [``PONG``], ``Quota``, [``QDays``, ``QConns``] (pagekite.py SendQuota)."""
    lines: list[tuple[str, object]] = [("NOOP", 1)]
    if pong:
        lines.append(("PONG", pong[:MAX_PONG]))
    lines.append(("Quota", quota))
    if days is not None:
        lines += [("QDays", days), ("QConns", conns)]
    return _block(*lines), b"!"


def build_skb(sid: int, kib: int) -> Chunk:
    """Flow-control ack: ``NOOP: 1\\r\\nSID: n\\r\\nSKB: k\\r\\n``, no payload; ``kib`` =
    KiB written to the stream's far socket so far (floor of bytes / 1024)."""
    if not isinstance(kib, int) or kib < 0:
        raise LocalProtocolError(f"SKB must be a non-negative int: {kib!r}")
    return _block(("NOOP", 1), ("SID", _check_sid(sid)), ("SKB", kib)), b""


def build_eof(sid: int, *, read_closed: bool = True, write_closed: bool = True) -> Chunk:
    """Stream close: ``SID: n\\r\\nEOF: 1R|1W|1WR\\r\\n`` with payload ``Bye!``.

    Flags from the sender's point of view: ``read_closed`` (R) = my side hit EOF reading, no
    more data will come; ``write_closed`` (W) = I can no longer deliver data.  Both (WR) =
    I forgot the stream.  Send uncompressed.
    """
    if not (read_closed or write_closed):
        raise LocalProtocolError("EOF needs read_closed, write_closed or both")
    flags = ("W" if write_closed else "") + ("R" if read_closed else "")
    return _block(("SID", _check_sid(sid)), ("EOF", "1" + flags)), b"Bye!"


def build_zrst() -> Chunk:
    """"I could not inflate your ZChunk, reset your compressor": ``NOOP: 1\\r\\nZRST: 1``.

    Beware: pagekite.py 1.5.2 resets its compressor on ZRST and then tears the tunnel down
    (``ProcessChunkDirectives`` returns the None of ``ResetZChunks``).
    """
    return _block(("NOOP", 1), ("ZRST", 1)), b"!"


def build_stream_open(
    sid: int,
    proto: str,
    host: str,
    port: int,
    rip: str,
    rport: int,
    *,
    rtls: bool = False,
    payload: Buffer = b"",
) -> tuple[bytes, Buffer]:
    """The relay's first chunk of a stream: ``SID``, ``Proto``, ``Host``, ``Port``, ``RIP``,
    ``RPort`` and ``RTLS: 1`` if the relay terminated TLS, in that order; the payload is what
    the visitor sent so far (may be empty: the backend connects at once anyway)."""
    lines: list[tuple[str, object]] = [
        ("SID", _check_sid(sid)),
        ("Proto", proto),
        ("Host", host),
        ("Port", port),
        ("RIP", rip),
        ("RPort", rport),
    ]
    if rtls:
        lines.append(("RTLS", 1))
    if not proto or not host or ":" in host:
        raise LocalProtocolError(f"invalid stream open: proto {proto!r}, host {host!r}")
    return _block(*lines), payload


# --------------------------------------------------------------------------------------------
# Events


class Event:
    """Base class of what :func:`parse_chunk` returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Ping(Event):
    """Keepalive request: answer ``build_pong(value)`` within ~5 s."""

    value: str


@dataclass(frozen=True, slots=True)
class Pong(Event):
    """Answer to our PING; ``value`` is the time we sent (``%.4f``), for the RTT."""

    value: str


@dataclass(frozen=True, slots=True)
class Skb(Event):
    """Flow-control ack: the peer has written ``kib`` KiB of stream ``sid`` to its socket."""

    sid: int
    kib: int


@dataclass(frozen=True, slots=True)
class Eof(Event):
    """The peer closed stream ``sid``, flags from its point of view: ``read_closed`` (R) - it
    will send no more data: flush, then half-close our socket's write side; ``write_closed``
    (W) - it cannot deliver more: stop reading our socket.  Both: it forgot the stream."""

    sid: int
    read_closed: bool
    write_closed: bool


@dataclass(frozen=True, slots=True)
class ZReset(Event):
    """The peer failed to inflate our ZChunks: reset our deflater (``ZDeflater.reset``)."""


@dataclass(frozen=True, slots=True)
class Quota(Event):
    """Quota update from a relay with remote auth (values as numbers, None if absent)."""

    quota: Optional[float]
    days: Optional[float]
    conns: Optional[float]


@dataclass(frozen=True, slots=True)
class KiteRequest(Event):
    """In-band kite (re)registration from a backend (relay side): authorise ``request.kites``."""

    request: TunnelRequest


@dataclass(frozen=True, slots=True)
class KiteReply(Event):
    """The relay's in-band answer (backend side): SignThis / OK / Invalid / Duplicate ..."""

    reply: RelayReply


@dataclass(frozen=True, slots=True)
class StreamOpen(Event):
    """A new stream from the relay (backend side).  ``rip`` has an IPv4-mapped ``::ffff:``
    prefix removed; ``port``/``rport`` are None when absent; ``payload`` is the first data."""

    sid: int
    proto: str
    host: str
    port: Optional[int]
    rip: Optional[str]
    rport: Optional[int]
    rtls: bool
    payload: bytes


@dataclass(frozen=True, slots=True)
class Data(Event):
    """Data for a sid the demux had no sink for (unknown or closed stream: answer EOF WR)."""

    sid: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Noop(Event):
    """A control chunk that asked for nothing (a bare ``NOOP``, or only ``SPD``)."""


# --------------------------------------------------------------------------------------------
# Parsing

_REQUEST_NAMES = frozenset(
    p + s for p in ("x-pagekite", "x-beanstalk") for s in ("", "-version", "-replace")
)
_FEATURE_NAMES = frozenset(("x-pagekite-features", "x-beanstalk-features"))
_REPLY_NAMES = frozenset(
    p + s
    for p in ("x-pagekite", "x-beanstalk")
    for s in (
        "-ok", "-invalid", "-invalid-why", "-duplicate", "-signthis", "-ssl-ok", "-sessionid",
        "-misc", "-quota", "-qconns", "-qdays", "-ipspersec", "-upgrade", "-protos", "-ports",
        "-raw-ports",
    )
)


def parse_sid(value: str) -> int:
    """A stream id: 1 to 10 ASCII decimal digits, at most MAX_SID; else RemoteProtocolError."""
    if not (0 < len(value) <= 10 and value.isascii() and value.isdigit()) or int(value) > MAX_SID:
        raise RemoteProtocolError(f"invalid SID in chunk: {value!r}")
    return int(value)


def _number(name: str, value: str, maximum: int) -> int:
    if not (0 < len(value) <= 10 and value.isascii() and value.isdigit()) or int(value) > maximum:
        raise RemoteProtocolError(f"invalid {name} in chunk: {value!r}")
    return int(value)


# Quota values: ASCII decimal, optionally with a fraction (no sign, exponent, nan or inf).
_DECIMAL = re.compile(r"[0-9]{1,15}(?:\.[0-9]{1,15})?")
# PING/PONG values: printable ASCII, echoed in our PONG (docs/protocol.md §4.3).
_PING_VALUE = re.compile(r"[ -~]*")


def _quota_number(name: str, value: Optional[str]) -> Optional[float]:
    if value is None:
        return None
    if not _DECIMAL.fullmatch(value):
        raise RemoteProtocolError(f"invalid {name} in chunk: {value[:80]!r}")
    return float(value)


def _ping_value(name: str, value: str) -> str:
    if not _PING_VALUE.fullmatch(value):
        raise RemoteProtocolError(f"invalid {name} value in chunk: {value[:80]!r}")
    return value


@functools.lru_cache(maxsize=4096)
def _rip(value: str) -> str:
    # An IP address (scope id and IPv4-mapped prefix allowed), as the relay saw the visitor.
    # Cached: visitors come back, and parsing an address costs 3-11 us a stream open.
    ip = _strip_mapped(value.lower())
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise RemoteProtocolError(f"invalid RIP in chunk: {value[:80]!r}") from None
    return ip


def _eof_flags(value: str) -> tuple[bool, bool]:
    # pagekite.py: "1" plus W and/or R; "1" alone (or no letter) means both.
    flags = value[1:] if value.startswith("1") else value
    if not value or not set(flags) <= {"R", "W"} or len(set(flags)) != len(flags):
        raise RemoteProtocolError(f"invalid EOF flags in chunk: {value!r}")
    read, write = "R" in flags, "W" in flags
    return (read or not write), (write or not read)


def _strip_mapped(ip: str) -> str:
    # conns.py UserConn._BackEnd: drop the IPv4-mapped prefix, only for a dotted IPv4 rest.
    if ip.startswith("::ffff:") and ":" not in ip[7:]:
        return ip[7:]
    return ip


def parse_chunk(headers: Sequence[tuple[str, str]], payload: Buffer) -> list[Event]:
    """Turn one non-data chunk (the Demux's ``on_chunk(headers, payload)``) into events, in
    pagekite.py's processing order (see the module docstring)."""
    first: dict[str, str] = {}
    for name, value in headers:
        if has_control(value):  # the Demux splits at CRLF only (docs/protocol.md §4.3)
            raise RemoteProtocolError(
                f"control character in chunk header {name[:40]!r}: {value[:80]!r}"
            )
        first.setdefault(name.strip().lower(), value)
    get = first.get
    events: list[Event] = []

    if "pong" in first:
        events.append(Pong(_ping_value("PONG", first["pong"])))
    if "ping" in first:
        events.append(Ping(_ping_value("PING", first["ping"])))
        control = True
    else:
        if "zrst" in first:
            events.append(ZReset())
        if "skb" in first:
            skb_sid = get("sid")
            if skb_sid is None:
                raise RemoteProtocolError(f"SKB without SID in chunk: {headers!r}")
            events.append(Skb(parse_sid(skb_sid), _number("SKB", first["skb"], 2**63 - 1)))
        control = "noop" in first

    if control:
        if "quota" in first or "qdays" in first or "qconns" in first:
            events.append(
                Quota(
                    _quota_number("Quota", get("quota")),
                    _quota_number("QDays", get("qdays")),
                    _quota_number("QConns", get("qconns")),
                )
            )
        names = first.keys()
        is_reply = not _REPLY_NAMES.isdisjoint(names)
        is_request = not _REQUEST_NAMES.isdisjoint(names) or (
            not is_reply and not _FEATURE_NAMES.isdisjoint(names)
        )
        if is_request:
            events.append(KiteRequest(parse_inband_request(headers)))
        if is_reply:
            events.append(KiteReply(parse_inband_reply(headers)))
        if not events:
            events.append(Noop())
        return events

    sid_value = get("sid")
    if sid_value is None:
        raise RemoteProtocolError(f"chunk without SID or NOOP: {list(headers)[:8]!r}")
    sid = parse_sid(sid_value)
    if "eof" in first:
        read_closed, write_closed = _eof_flags(first["eof"])
        events.append(Eof(sid, read_closed, write_closed))
        return events

    proto, host = get("proto", "").lower(), get("host", "").lower()
    if proto and host:
        port, rport, rip = get("port"), get("rport"), get("rip")
        events.append(
            StreamOpen(
                sid=sid,
                proto=proto,
                host=host,
                port=None if not port else _number("Port", port, 65535),
                rip=_rip(rip) if rip else None,
                rport=None if not rport else _number("RPort", rport, 65535),
                rtls=bool(get("rtls")),
                payload=bytes(payload),
            )
        )
    else:
        events.append(Data(sid, bytes(payload)))
    return events
