"""The benchmark's own HTTP/1.1 client (blocking sockets): the client of the check and the
bulk transfers, and of the sequential requests when wrk is missing."""

from __future__ import annotations

import hashlib
import os
import select
import socket
import ssl
import time
from collections.abc import Callable

from .common import HOST, BenchError, MiB

_TLS_CLIENT: ssl.SSLContext | None = None


def _tls_client() -> ssl.SSLContext:
    """TLS 1.2+, no certificate check (wrk checks none either: the check compares content)."""
    global _TLS_CLIENT
    if _TLS_CLIENT is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["http/1.1"])
        _TLS_CLIENT = ctx
    return _TLS_CLIENT


def connect(port: int, timeout: float = 10.0, tls_name: str | None = None) -> socket.socket:
    """A blocking TCP connection to HOST:port, with TCP_NODELAY; with ``tls_name``, TLS to
    it (SNI ``tls_name``): an HTTPS visitor."""
    s = socket.create_connection((HOST, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls_name:
        try:
            return _tls_client().wrap_socket(s, server_hostname=tls_name)
        except BaseException:
            s.close()
            raise
    return s


def read_head(sock: socket.socket, buf: bytearray, deadline: float):
    """Read a response head; return (status, headers dict, leftover body bytes)."""
    while b"\r\n\r\n" not in buf:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(65536)
        if not data:
            raise BenchError(f"connection closed before a response head (got {bytes(buf[:80])!r})")
        buf += data
        if len(buf) > 65536:
            raise BenchError("response head longer than 64 KiB")
    head, rest = bytes(buf).split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise BenchError(f"bad status line {lines[0]!r}") from None
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, rest


def http_get(sock: socket.socket, host: str, path: str, *, deadline: float, want_hash: bool = False,
             tick: Callable[[int, int], None] | None = None) -> dict:
    """GET on an open keep-alive connection; the body is counted (and hashed), not kept.

    Stops at ``deadline`` (then ``complete`` is False and the connection is spent)."""
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: kite-bench\r\n\r\n"
                 % (path.encode(), host.encode()))
    status, headers, rest = read_head(sock, bytearray(), deadline)
    length = int(headers.get("content-length", "-1"))
    if status != 200 or length < 0:
        raise BenchError(f"GET {path}: status {status}, content-length {length}")
    h = hashlib.sha256() if want_hash else None
    got = len(rest)
    if h:
        h.update(rest)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    complete = True
    last_tick = time.monotonic()
    while got < length:
        now = time.monotonic()
        if now >= deadline:
            complete = False
            break
        sock.settimeout(deadline - now)
        try:
            n = sock.recv_into(view, min(len(buf), length - got))
        except TimeoutError:
            complete = False
            break
        if not n:
            raise BenchError(f"GET {path}: connection closed after {got} of {length} bytes")
        if h:
            h.update(view[:n])
        got += n
        if tick and now - last_tick > 0.25:
            tick(got, length)
            last_tick = now
    return {"status": status, "length": length, "bytes": got, "complete": complete,
            "sha256": h.hexdigest() if h else None}


def http_put_file(sock: socket.socket, host: str, path: str, file_path: str, size: int, *,
                  deadline: float, tick: Callable[[int, int], None] | None = None) -> dict:
    """PUT ``size`` bytes of ``file_path`` (sent with sendfile); stops at ``deadline``."""
    sock.sendall(b"PUT %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: kite-bench\r\n"
                 b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n"
                 % (path.encode(), host.encode(), size))
    sent = 0
    piece = 8 * MiB
    if isinstance(sock, ssl.SSLSocket):  # no sendfile through TLS: read and send
        return _put_tls(sock, path, file_path, size, deadline, tick)
    # os.sendfile on a non-blocking socket, so that the deadline is honoured to within one
    # select() (socket.sendfile's timeout is per wait, not for the whole transfer).
    sock.setblocking(False)
    try:
        with open(file_path, "rb") as f:
            while sent < size:
                now = time.monotonic()
                if now >= deadline:
                    return {"status": None, "bytes_sent": sent, "complete": False}
                _, writable, _ = select.select([], [sock], [], min(0.25, deadline - now))
                if not writable:
                    continue
                try:
                    n = os.sendfile(sock.fileno(), f.fileno(), sent, min(piece, size - sent))
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError) as exc:
                    # The system under test closed the upload: a result, not a crash.
                    return {"status": None, "bytes_sent": sent, "complete": False,
                            "error": f"{type(exc).__name__} after {sent} bytes sent"}
                if not n:
                    raise BenchError(f"PUT {path}: sendfile sent nothing at {sent} of {size}")
                sent += n
                if tick:
                    tick(sent, size)
    finally:
        sock.setblocking(True)
    status, _, _ = read_head(sock, bytearray(), deadline + 30.0)
    if status not in (200, 201, 204):
        raise BenchError(f"PUT {path}: status {status}")
    return {"status": status, "bytes_sent": sent, "complete": True}


def _put_tls(sock: ssl.SSLSocket, path: str, file_path: str, size: int, deadline: float,
             tick: Callable[[int, int], None] | None) -> dict:
    """The body of a PUT over TLS, 1 MiB at a time; stops at ``deadline``."""
    sent = 0
    with open(file_path, "rb") as f:
        while sent < size:
            now = time.monotonic()
            if now >= deadline:
                return {"status": None, "bytes_sent": sent, "complete": False}
            piece = f.read(min(MiB, size - sent))
            if not piece:
                raise BenchError(f"PUT {path}: {file_path} ended at {sent} of {size}")
            sock.settimeout(deadline - now)
            try:
                sock.sendall(piece)
            except TimeoutError:
                return {"status": None, "bytes_sent": sent, "complete": False}
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError) as exc:
                return {"status": None, "bytes_sent": sent, "complete": False,
                        "error": f"{type(exc).__name__} after {sent} bytes sent"}
            sent += len(piece)
            if tick:
                tick(sent, size)
    status, _, _ = read_head(sock, bytearray(), deadline + 30.0)
    if status not in (200, 201, 204):
        raise BenchError(f"PUT {path}: status {status}")
    return {"status": status, "bytes_sent": sent, "complete": True}


def python_seq(port: int, host: str, path: str, duration: float,
               tls_name: str | None = None) -> dict:
    """Sequential GETs on one connection for ``duration`` s (used when wrk is missing)."""
    lat = []
    sock = connect(port, tls_name=tls_name)
    req = b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path.encode(), host.encode())
    t_end = time.monotonic() + duration
    try:
        while time.monotonic() < t_end:
            t0 = time.perf_counter()
            sock.sendall(req)
            _, headers, rest = read_head(sock, bytearray(), time.monotonic() + 10)
            need = int(headers.get("content-length", "0")) - len(rest)
            while need > 0:
                chunk = sock.recv(min(65536, need))
                if not chunk:
                    raise BenchError("connection closed mid-body")
                need -= len(chunk)
            lat.append(time.perf_counter() - t0)
    finally:
        sock.close()
    lat.sort()
    total = sum(lat)
    return {"tool": "python", "requests": len(lat), "rps": len(lat) / total if total else None,
            "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
            "errors": 0}
