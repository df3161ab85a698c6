"""The relay's DNS server: UDP and TCP on the same address, one asyncio protocol each.

Theory of operation
-------------------
:meth:`DnsServer.handle` is the whole query path, for both transports: bounds (a message of
fewer than 12 or more than :data:`MAX_QUERY` bytes is dropped), the per-address rate limit
(:class:`RateLimiter`: past N queries per second an address is ignored until the next
second), then the answer cache, then the negative answers rendered from templates
(:class:`~kite.names.negative.NegativeAnswers`: a plain query for a name that does not exist
or is outside the zone, answered byte for byte as dnspython would, without parsing), then
dnspython: :func:`dns.message.from_wire`, the zone's
:meth:`~kite.names.zone.Zone.respond`, ``to_wire`` (over UDP truncated to the client's limit
with TC set, so it retries over TCP).  A message dnspython cannot parse is answered FORMERR
with its header only; a response (QR set) is never answered.  Nothing raised inside leaves
``handle``: a bug costs that one query, logged.

The cache.  Every answer is a function of the query's bytes after its 2-byte ID (and the
transport), until the zone changes: so the rendered answer is kept under those bytes and a
repeated query (a resolver asking again, with a new ID) is answered by copying its ID in
front of the stored bytes, without parsing.  Any change of the zone (:attr:`Zone.version`)
empties the cache, so presence changes are visible at once.  It holds at most
:data:`CACHE_SIZE` answers and is emptied when full; the template negative answers are not
kept in it (a flood of random names would only push the useful answers out).

TCP (RFC 7766): two-byte length framing, several queries per connection answered in order,
:data:`TCP_IDLE` seconds of silence closes it, at most :data:`MAX_TCP` at once, and a
connection whose answers are not read stops being read.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
import time
from typing import Callable, Optional

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode

from ..errors import KiteError
from .negative import NegativeAnswers
from .zone import EDNS_PAYLOAD, Zone

log = logging.getLogger("kite.names")

__all__ = ["DnsServer", "RateLimiter", "MAX_QUERY", "CACHE_SIZE"]

#: The largest query accepted (a question, EDNS options and a TSIG fit easily).
MAX_QUERY = 1232
#: The DNS header: shorter messages are dropped.
HEADER = 12
#: Rendered answers kept for repeated queries (per transport).
CACHE_SIZE = 8192
#: Source addresses the rate limiter tracks in one second; past that, new ones share a slot.
RATE_ADDRESSES = 65536
#: TCP: seconds of silence before a connection is closed; connections at once.
TCP_IDLE = 10.0
MAX_TCP = 256
#: Seconds between two log lines about dropped queries or handler failures.
REPORT_EVERY = 10.0


class RateLimiter:
    """At most ``per_second`` queries per source address in each second (0: no limit).

    Memory is bounded: the table is emptied every second, and once it holds
    ``max_addresses`` addresses, further new ones count against one shared slot.
    """

    OVERFLOW = "*"

    def __init__(self, per_second: int, max_addresses: int = RATE_ADDRESSES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = per_second
        self.max_addresses = max_addresses
        self.clock = clock
        self._window = -1
        self._counts: dict[str, int] = {}
        self.refused = 0

    def allow(self, addr: str) -> bool:
        if not self.per_second:
            return True
        now = int(self.clock())
        counts = self._counts
        if now != self._window:
            self._window = now
            counts.clear()
        n = counts.get(addr)
        if n is None:
            if len(counts) >= self.max_addresses:
                addr = self.OVERFLOW
                n = counts.get(addr, 0)
            else:
                n = 0
        if n >= self.per_second:
            self.refused += 1
            return False
        counts[addr] = n + 1
        return True

    def __len__(self) -> int:
        return len(self._counts)


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: Optional[asyncio.DatagramTransport] = None
        self.paused = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        answer = self.server.handle(data, addr[0], False)
        if answer is not None and not self.paused and self.transport is not None:
            self.transport.sendto(answer, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable and the like
        pass

    def pause_writing(self) -> None:  # the socket buffer is full: drop answers, never queue
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False


class _Stream(asyncio.Protocol):
    """One DNS-over-TCP connection: length-prefixed queries in, answers out in order."""

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: Optional[asyncio.Transport] = None
        self.addr = ""
        self.buf = bytearray()
        self.timer: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        if len(self.server.streams) >= MAX_TCP:
            transport.abort()
            return
        self.server.streams.add(self)
        peer = transport.get_extra_info("peername")
        self.addr = peer[0] if peer else ""
        self._arm()

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(TCP_IDLE, self._idle)

    def _idle(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        buf = self.buf
        buf += data
        while len(buf) >= 2:
            size = (buf[0] << 8) | buf[1]
            if size > MAX_QUERY or size < HEADER:
                transport.abort()
                return
            if len(buf) < 2 + size:
                break
            msg = bytes(buf[2:2 + size])
            del buf[:2 + size]
            answer = self.server.handle(msg, self.addr, True)
            if answer is None:  # rate-limited or not a query: nothing more for this peer
                transport.close()
                return
            transport.write(len(answer).to_bytes(2, "big") + answer)
        self._arm()

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc) -> None:
        self.server.streams.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bound_socket(host: str, port: int, kind: int) -> socket.socket:
    """A socket bound to ``host:port`` (IPv6 ones IPv6 only, so that ``0.0.0.0`` and ``::``
    can both be served), listening if TCP; KiteError (its cause the OSError) if it cannot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        what = "tcp" if kind == socket.SOCK_STREAM else "udp"
        raise KiteError(f"cannot serve DNS on {_where(host, port)}/{what}: {exc.strerror or exc}") \
            from exc
    return sock


class DnsServer:
    """Answers queries for ``zone`` on every ``(host, port)`` of ``addresses``, UDP and TCP."""

    def __init__(self, zone: Zone, addresses: list, *, rate_limit: int = 100,
                 cache_size: int = CACHE_SIZE, fast_negative: bool = True) -> None:
        self.zone = zone
        self.addresses = list(addresses)
        self.limiter = RateLimiter(rate_limit)
        self.cache_size = cache_size
        self._caches: tuple[dict, dict] = ({}, {})  # UDP, TCP: query[2:] -> answer[2:]
        self._version = zone.version
        self.negative: Optional[NegativeAnswers] = NegativeAnswers(zone) if fast_negative else None
        self.streams: set = set()
        self._udp: list = []
        self._tcp: list = []
        self.bound: list = []
        self.stats = {"queries": 0, "limited": 0, "dropped": 0, "formerr": 0, "failed": 0}
        #: answers sent, by rcode (the header's 4 bits: 0 NOERROR, 3 NXDOMAIN, 5 REFUSED...)
        self.rcodes: dict[int, int] = {}
        self._reported = 0.0
        self._reported_stats: dict = dict(self.stats)

    # -- listening ----------------------------------------------------------------------------
    async def start(self) -> list:
        loop = asyncio.get_running_loop()
        for host, port in self.addresses:
            for _attempt in range(20):  # port 0: UDP picks, TCP must get the same port
                usock = _bound_socket(host, port, socket.SOCK_DGRAM)
                bound = usock.getsockname()[:2]
                try:
                    tsock = _bound_socket(host, bound[1], socket.SOCK_STREAM)
                except KiteError as exc:
                    usock.close()
                    if port == 0 and exc.__cause__ is not None and \
                            getattr(exc.__cause__, "errno", None) == errno.EADDRINUSE:
                        continue
                    raise
                break
            else:  # pragma: no cover
                raise KiteError(f"cannot serve DNS on {_where(host, port)}: no port for UDP and TCP")
            udp, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(self), sock=usock)
            tcp = await loop.create_server(lambda: _Stream(self), sock=tsock)
            self._udp.append(udp)
            self._tcp.append(tcp)
            self.bound.append(bound)
            log.info("dns listening on %s (udp, tcp) for the zone %s", _where(*bound), self.zone.name)
        return self.bound

    async def close(self) -> None:
        for udp in self._udp:
            udp.close()
        for tcp in self._tcp:
            tcp.close()
        for s in list(self.streams):
            if s.transport is not None:
                s.transport.abort()
        self._udp.clear()
        self._tcp.clear()

    # -- the query path -----------------------------------------------------------------------
    def handle(self, data: bytes, addr: str, tcp: bool) -> Optional[bytes]:
        """The answer to the message ``data`` from ``addr``, or None to drop it."""
        stats = self.stats
        stats["queries"] += 1
        if not HEADER <= len(data) <= MAX_QUERY:
            stats["dropped"] += 1
            return None
        if not self.limiter.allow(addr):
            stats["limited"] += 1
            self._report()
            return None
        if self._version != self.zone.version:
            self._version = self.zone.version
            self._caches[0].clear()
            self._caches[1].clear()
        cache = self._caches[tcp]
        key = data[2:]
        hit = cache.get(key)
        rcodes = self.rcodes
        if hit is not None:
            rcode = hit[1] & 15  # the answer without its 2-byte id: flags at [0:2]
            rcodes[rcode] = rcodes.get(rcode, 0) + 1
            return data[:2] + hit
        try:
            if self.negative is not None:
                answer = self.negative.answer(data, tcp)
                if answer is not None:  # not cached: random names would only churn the cache
                    rcode = answer[3] & 15
                    rcodes[rcode] = rcodes.get(rcode, 0) + 1
                    return answer
            answer = self._answer(data, tcp)
        except Exception:  # a bug: costs this query only
            stats["failed"] += 1
            if self._report():
                log.exception("dns: answering a query from %s failed", addr)
            return None
        if answer is None:
            stats["dropped"] += 1
            return None
        if len(answer) >= 4:
            rcode = answer[3] & 15
            rcodes[rcode] = rcodes.get(rcode, 0) + 1
        if len(cache) >= self.cache_size:
            cache.clear()
        cache[key] = answer[2:]
        return answer

    def _answer(self, data: bytes, tcp: bool) -> Optional[bytes]:
        try:
            query = dns.message.from_wire(data)
        except Exception:  # dnspython's FormError, ShortHeader, BadEDNS, UnknownTSIGKey...
            return self._formerr(data)
        if query.flags & dns.flags.QR:
            return None
        response = self.zone.respond(query)
        if tcp:
            limit = 65535
        else:
            limit = min(max(512, query.payload if query.edns >= 0 else 512), EDNS_PAYLOAD)
        return response.to_wire(max_size=limit, prefer_truncation=True)

    def _formerr(self, data: bytes) -> Optional[bytes]:
        """FORMERR, header only, for a message dnspython cannot parse (never for a response)."""
        qid, flags = struct.unpack_from("!HH", data)
        if flags & dns.flags.QR:
            return None
        self.stats["formerr"] += 1
        m = dns.message.Message(id=qid)
        m.flags = dns.flags.QR | (flags & dns.flags.RD)
        m.set_opcode(dns.opcode.from_flags(flags))
        m.set_rcode(dns.rcode.FORMERR)
        return m.to_wire()

    def _report(self) -> bool:
        """Log what was dropped since the last report, at most every REPORT_EVERY seconds;
        True when a line may be logged now."""
        now = time.monotonic()
        if now - self._reported < REPORT_EVERY:
            return False
        self._reported = now
        last, self._reported_stats = self._reported_stats, dict(self.stats)
        limited = self.stats["limited"] - last["limited"]
        if limited:
            log.warning("dns: %d queries over the rate limit of %d per second per address "
                        "ignored", limited, self.limiter.per_second)
        return True
