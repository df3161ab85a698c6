"""Real ``kite relay`` and ``kite expose`` processes and a local HTTP server, as fixtures
(tests/conftest.py and tests/security/ use them): each on an ephemeral loopback port, owned
by the test and killed by PID at its end."""

from __future__ import annotations

import http.server
import os
import re
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from support import KITE, SECRET, Proc, make_certs

#: The relay logs the address it bound (``--listen 127.0.0.1:0``).
_LISTENING = re.compile(r"relay listening on (127\.\d+\.\d+\.\d+):(\d+)")


def _proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@dataclass
class RelayProcess:
    proc: Proc
    port: int
    cert: str
    fingerprint: str
    host: str = "127.0.0.1"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        return _proc_status(self.pid, "VmRSS")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log(self) -> str:
        return self.proc.output()

    def alive(self) -> bool:
        return self.proc.proc.poll() is None


@pytest.fixture
def relay_process(tmp_path):
    """``relay_process(*args, grants=..., env=..., preexec=..., listen=...)`` starts a kite
    relay with TLS (names localhost, 127.0.0.1) and returns a :class:`RelayProcess` once it
    listens (``listen="127.0.0.1:PORT"`` restarts one on the port of an earlier run;
    ``preexec`` runs in the child before exec, e.g. to lower its descriptor limit)."""
    procs: list[Proc] = []
    certs = make_certs(tmp_path)

    def start(*args: str, grants=("*:*.test.kite:" + SECRET,), env: Optional[dict] = None,
              preexec=None, name: str = "relay", listen: str = "127.0.0.1:0") -> RelayProcess:
        # --allow-plain: pkpeer's Peer speaks the tunnel protocol over plain TCP
        argv = [*KITE, "relay", "--listen", listen, "--tls-cert", certs.cert,
                "--tls-key", certs.key, "--allow-plain", "-v"]
        for g in grants:
            argv += ["--kite", g]
        proc = Proc([*argv, *args], tmp_path, f"{name}{len(procs)}", env=env, preexec_fn=preexec)
        procs.append(proc)
        out = proc.wait_for("relay listening on", timeout=30)
        m = _LISTENING.search(out)
        assert m, out
        return RelayProcess(proc, int(m.group(2)), certs.cert, certs.fingerprint, m.group(1))

    yield start
    for p in procs:
        p.stop(signal.SIGKILL)


@pytest.fixture
def expose_process(tmp_path):
    """``expose_process(target, name, relay, *args)`` starts ``kite expose`` against a
    :class:`RelayProcess` (pinned by fingerprint) and waits until the kite flies."""
    procs: list[Proc] = []

    def start(target: str, name: str, relay: RelayProcess, *args: str, wait: bool = True,
              secret: str = SECRET, pin: bool = True) -> Proc:
        argv = [*KITE, "expose", target, name, "--relay", f"{relay.host}:{relay.port}",
                *(("--fingerprint", relay.fingerprint) if pin else ()), "-v", *args]
        proc = Proc(argv, tmp_path, f"expose{len(procs)}", env={"KITE_SECRET": secret})
        procs.append(proc)
        if wait:
            proc.wait_for("flying", timeout=30)
        return proc

    yield start
    for p in procs:
        p.stop(signal.SIGKILL)


class _OriginHandler(http.server.BaseHTTPRequestHandler):
    """GET: a small page with a cookie; POST: echoes the body (chunked or not); every
    request is noted in ``hits``."""

    protocol_version = "HTTP/1.1"
    hits: list = []

    def _answer(self, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Set-Cookie", "session=origin-secret-cookie; Path=/; HttpOnly")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.hits.append(("GET", self.path, dict(self.headers)))
        self._answer(b"hello from the origin " + self.path.encode() + b"\n")

    def do_HEAD(self) -> None:
        self.hits.append(("HEAD", self.path, dict(self.headers)))
        self.send_response(200)
        self.send_header("Content-Length", "1234")
        self.end_headers()

    def do_POST(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.hits.append(("POST", self.path, dict(self.headers), body))
        self._answer(body, "application/octet-stream")

    def log_message(self, *args) -> None:
        pass


@dataclass
class Origin:
    port: int
    hits: list


@pytest.fixture
def http_origin():
    """A real HTTP/1.1 server (http.server, a thread) on 127.0.0.1: the kites' local server."""
    handler = type("Handler", (_OriginHandler,), {"hits": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Origin(server.server_address[1], handler.hits)
    server.shutdown()
    server.server_close()
