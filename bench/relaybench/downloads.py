"""The scale-downloads and scale-uploads clients: N concurrent downloads of one big file, or
N concurrent uploads of an endless body, for a fixed time, in one thread (a ``selectors``
loop over non-blocking sockets), counting the bytes each connection received or sent; and
Jain's fairness index over those counts."""

from __future__ import annotations

import re
import selectors
import socket
import time
from collections.abc import Callable

from .common import HOST, BenchError

_LENGTH = re.compile(rb"(?im)^content-length:\s*(\d+)\s*$")


def jain_index(values: list[float]) -> float | None:
    """Jain's fairness index (sum x)^2 / (n * sum x^2): 1.0 when all are equal, 1/n when one
    connection got everything; None for no values or all zero."""
    n = len(values)
    sq = sum(v * v for v in values)
    if not n or not sq:
        return None
    return sum(values) ** 2 / (n * sq)


def _figures(per: list[int], elapsed: float) -> dict:
    """What a level reports from the bytes each connection moved in ``elapsed`` s."""
    total = sum(per)
    return {"conns": len(per), "elapsed_s": elapsed, "bytes": total,
            "MBps": total / 1e6 / elapsed, "jain": jain_index(per),
            "min_conn_MBps": min(per) / 1e6 / elapsed, "max_conn_MBps": max(per) / 1e6 / elapsed,
            "per_conn_bytes": per}


class _Download:
    """One keep-alive connection that GETs ``path`` again whenever a response ends."""

    def __init__(self, sock: socket.socket, request: bytes):
        self.sock = sock
        self.request = request
        self.head = bytearray()
        self.left = -1  # body bytes still due; -1 while reading a head
        self.bytes = 0  # body bytes received in the window
        self.responses = 0

    def send_request(self) -> None:
        # A GET is far smaller than the socket buffer: it goes out at once.
        self.sock.sendall(self.request)
        self.head.clear()
        self.left = -1

    def received(self, view: memoryview, n: int) -> None:
        """``n`` new bytes in ``view``: count body bytes, parse heads, ask again at an end."""
        i = 0
        while i < n:
            if self.left < 0:
                self.head += view[i:n]
                end = self.head.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.head) > 65536:
                        raise BenchError("response head longer than 64 KiB")
                    return
                head = bytes(self.head[:end])
                if not head.startswith(b"HTTP/1.1 200"):
                    raise BenchError(f"download: {head[:40]!r}")
                m = _LENGTH.search(head)
                if not m:
                    raise BenchError("download: no Content-Length")
                consumed = end + 4 - (len(self.head) - (n - i))
                i += consumed
                self.head.clear()
                self.left = int(m.group(1))
            take = min(self.left, n - i)
            self.bytes += take
            self.left -= take
            i += take
            if self.left == 0:
                self.responses += 1
                if i < n:
                    raise BenchError("download: bytes after the end of a response")
                self.send_request()


def concurrent_downloads(port: int, host: str, path: str, conns: int, duration: float) -> dict:
    """``conns`` connections each download ``path`` over and over (keep-alive) for
    ``duration`` s from the moment the first request goes out; return the bytes each
    received in that window, their sum, the aggregate MB/s and Jain's index."""
    sel = selectors.DefaultSelector()
    request = (b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: kite-bench\r\n\r\n"
               % (path.encode(), host.encode()))
    downloads: list[_Download] = []
    try:
        for _ in range(conns):
            s = socket.create_connection((HOST, port), timeout=30)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            d = _Download(s, request)
            downloads.append(d)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        t0 = time.monotonic()
        for d in downloads:
            d.send_request()
            d.sock.setblocking(False)
            sel.register(d.sock, selectors.EVENT_READ, d)
        t_end = t0 + duration
        while True:
            now = time.monotonic()
            if now >= t_end:
                break
            for key, _ in sel.select(t_end - now):
                d = key.data
                try:
                    n = d.sock.recv_into(view)
                except BlockingIOError:
                    continue
                if not n:
                    raise BenchError(f"download: connection closed after {d.bytes} bytes")
                d.received(view, n)
        elapsed = time.monotonic() - t0
    finally:
        sel.close()
        for d in downloads:
            d.sock.close()
    return {**_figures([d.bytes for d in downloads], elapsed),
            "responses": sum(d.responses for d in downloads)}


#: What an upload announces: more than any run sends (the origin drops it: PUT /sink).
UPLOAD_LENGTH = 10**12
#: Seconds of uploading before the counting starts: every buffer on the way fills first,
#: so what a connection sends in the window is what went through.
UPLOAD_WARMUP = 1.0


def concurrent_uploads(port: int, host: str, conns: int, duration: float,
                       on_count: Callable[[], None] | None = None) -> dict:
    """``conns`` connections each PUT an endless body to ``/sink`` (the origin reads and
    drops it); after UPLOAD_WARMUP s (then ``on_count()`` is called), count for ``duration``
    s the bytes each sent; return them, their sum, the aggregate MB/s and Jain's index."""
    sel = selectors.DefaultSelector()
    head = (b"PUT /sink HTTP/1.1\r\nHost: %s\r\nUser-Agent: kite-bench\r\n"
            b"Content-Length: %d\r\n\r\n" % (host.encode(), UPLOAD_LENGTH))
    body = memoryview(bytes(256 * 1024))
    socks: list[socket.socket] = []
    sent: dict[socket.socket, int] = {}
    try:
        for _ in range(conns):
            s = socket.create_connection((HOST, port), timeout=30)
            s.sendall(head)
            s.setblocking(False)
            socks.append(s)
            sent[s] = 0
            sel.register(s, selectors.EVENT_WRITE)
        t_count = time.monotonic() + UPLOAD_WARMUP
        t_end = t_count + duration
        counting = False
        while True:
            now = time.monotonic()
            if now >= t_end:
                break
            if not counting and now >= t_count:
                counting = True
                if on_count is not None:
                    on_count()
                t0 = time.monotonic()
                for s in socks:
                    sent[s] = 0
            for key, _ in sel.select(min(t_end, t_count) - now if not counting else t_end - now):
                s = key.fileobj  # type: ignore[assignment]
                try:
                    sent[s] += s.send(body)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise BenchError(f"upload: connection lost after {sent[s]} bytes: {exc}") from exc
        elapsed = time.monotonic() - t0
    finally:
        sel.close()
        for s in socks:
            s.close()
    return _figures([sent[s] for s in socks], elapsed)
