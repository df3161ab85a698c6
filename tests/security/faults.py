"""Helpers of the fault tests: local servers in threads (big downloads, uploads that record
how they ended) and visitors that say how their connection ended (complete, reset, error
page, or a clean end after a prefix - the one outcome that must never happen)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

#: Bytes of the big body: far more than a test ever lets through before it kills something.
BIG = 200 * 1024 * 1024
_CHUNK = 64 * 1024


def reset_socket(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@dataclass
class LocalServer:
    """A threaded local server on 127.0.0.1.

    ``mode="http"``: GET answers ``200`` with ``Content-Length: size`` and streams zeros;
    POST reads the body and records how the upload ended (``uploads``: "complete",
    "reset", "eof" = a clean end before Content-Length) and answers 200.
    ``mode="raw"``: streams ``size`` zeros as soon as a connection comes, then closes.
    """

    mode: str = "http"
    size: int = BIG
    port: int = 0
    uploads: list = field(default_factory=list)
    downloads: list = field(default_factory=list)  # "complete" / "reset" / "error: ..."
    upload_progress: int = 0  # body bytes received by uploads so far
    _sock: Optional[socket.socket] = None
    _stop: bool = False

    def start(self) -> LocalServer:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def close(self) -> None:
        self._stop = True
        if self._sock is not None:
            self._sock.close()

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _stream(self, conn: socket.socket, head: bytes = b"") -> None:
        zeros = bytes(_CHUNK)
        try:
            if head:
                conn.sendall(head)
            left = self.size
            while left:
                n = conn.send(zeros[:min(left, _CHUNK)])
                left -= n
            self.downloads.append("complete")
        except (ConnectionResetError, BrokenPipeError) as exc:
            self.downloads.append(f"reset: {exc}")
        except OSError as exc:
            self.downloads.append(f"error: {exc}")

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            if self.mode == "raw":
                self._stream(conn)
                return
            buf = b""
            try:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
            except OSError:
                return
            head, _, rest = buf.partition(b"\r\n\r\n")
            if head.startswith(b"GET"):
                self._stream(conn, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.size)
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            got = len(rest)
            try:
                while got < length:
                    data = conn.recv(1 << 20)
                    if not data:
                        self.uploads.append(f"eof after {got} of {length}")
                        return
                    got += len(data)
                    self.upload_progress += len(data)
            except ConnectionResetError:
                self.uploads.append("reset")
                return
            except OSError as exc:
                self.uploads.append(f"error: {exc}")
                return
            self.uploads.append("complete")
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            except OSError:
                pass


@dataclass
class Outcome:
    """How a visitor's transfer ended."""

    received: int = 0  # body bytes (download) or bytes sent (upload)
    end: str = ""  # "complete", "reset", "error page", "eof" (a clean end: truncated)
    detail: str = ""

    @property
    def honest(self) -> bool:
        """Complete data, or an error the visitor cannot miss (an upload without an answer
        counts: the visitor knows its request failed)."""
        return self.end in ("complete", "reset", "error page", "no answer")


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise EOFError(buf)
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


class _Visitor:
    """A visitor working in a thread; ``progress`` counts the bytes it moved so far and
    ``outcome`` is set when it is done.  A subclass's ``_transfer`` does the work."""

    doing = "working"

    def __init__(self, relay_port: int, host: str, timeout: float = 30.0) -> None:
        self.relay_port = relay_port
        self.host = host
        self.timeout = timeout
        self.progress = 0
        self.outcome: Optional[Outcome] = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.relay_port), timeout=self.timeout)
        except OSError as exc:
            self.outcome = Outcome(0, "connect failed", str(exc))
            return
        self._transfer(sock)

    def _transfer(self, sock: socket.socket) -> None:
        raise NotImplementedError

    def wait(self, timeout: float = 30.0) -> Outcome:
        self.thread.join(timeout)
        assert self.outcome is not None, f"the visitor is still {self.doing}"
        return self.outcome


class Download(_Visitor):
    """A visitor downloading in a thread; ``progress`` counts body bytes so far."""

    doing = "reading"

    def __init__(self, relay_port: int, host: str, *, connect_port: Optional[int] = None,
                 bare: bool = False, timeout: float = 30.0) -> None:
        super().__init__(relay_port, host, timeout)
        self.connect_port = connect_port  # raw kite: CONNECT host:port first
        self.bare = bare  # raw kite through `kite forward`: the bytes come at once
        self.thread.start()

    def _transfer(self, sock: socket.socket) -> None:
        out = Outcome()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # stay mid-transfer
        expected = None
        try:
            with sock:
                rest = b""
                if self.bare:
                    expected = BIG
                elif self.connect_port is not None:
                    sock.sendall(b"CONNECT %s:%d HTTP/1.1\r\n\r\n"
                                 % (self.host.encode(), self.connect_port))
                    head, rest = _read_head(sock)
                    if b" 200 " not in head.split(b"\r\n")[0] + b" ":
                        self.outcome = Outcome(0, "refused", head.decode(errors="replace"))
                        return
                    expected = BIG
                else:
                    sock.sendall(b"GET /big HTTP/1.1\r\nHost: %s\r\n\r\n" % self.host.encode())
                    head, rest = _read_head(sock)
                    status = head.split(b"\r\n")[0]
                    if b" 200 " not in status + b" ":
                        self.outcome = Outcome(0, "error page", status.decode(errors="replace"))
                        return
                    for line in head.split(b"\r\n")[1:]:
                        if line.lower().startswith(b"content-length:"):
                            expected = int(line.split(b":", 1)[1])
                out.received = len(rest)
                self.progress = out.received
                while True:
                    data = sock.recv(65536)
                    if not data:
                        break
                    out.received += len(data)
                    self.progress = out.received
                    time.sleep(0.0005)  # a modest reader: the transfer lasts
            out.end = "complete" if out.received == expected else "eof"
        except (ConnectionResetError, BrokenPipeError) as exc:
            out.end, out.detail = "reset", str(exc)
        except (TimeoutError, EOFError, OSError) as exc:
            out.end, out.detail = "eof" if isinstance(exc, EOFError) else "error", repr(exc)
        self.outcome = out


class Upload(_Visitor):
    """A visitor POSTing a big body in a thread; ``progress`` counts bytes sent."""

    doing = "sending"

    def __init__(self, relay_port: int, host: str, timeout: float = 30.0) -> None:
        super().__init__(relay_port, host, timeout)
        self.thread.start()

    def _transfer(self, sock: socket.socket) -> None:
        out = Outcome()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        zeros = bytes(_CHUNK)
        try:
            with sock:
                sock.sendall(b"POST /up HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n"
                             % (self.host.encode(), BIG))
                left = BIG
                while left:
                    n = sock.send(zeros[:min(left, _CHUNK)])
                    left -= n
                    out.received += n
                    self.progress = out.received
                    time.sleep(0.0005)
                head, _ = _read_head(sock)
                status = head.split(b"\r\n")[0]
                out.end = "complete" if b" 200 " in status + b" " else "error page"
                out.detail = status.decode(errors="replace")
        except (ConnectionResetError, BrokenPipeError) as exc:
            out.end, out.detail = "reset", str(exc)
        except EOFError as exc:
            # The connection ended without an answer: the request failed, visibly.
            out.end, out.detail = "no answer", repr(exc)
        except (TimeoutError, OSError) as exc:
            out.end, out.detail = "error", repr(exc)
        self.outcome = out


def http_get(port: int, host: str, timeout: float = 5.0) -> tuple[bytes, bytes]:
    """One ``GET /`` with ``Connection: close``: (status line, body); raises OSError."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host.encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body
