"""Test helpers: run coroutines on a chosen loop, start relay + backend in-process, local
servers, and owned subprocesses.  Everything binds 127.0.0.1 port 0."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from kite.backend.connector import Backend
from kite.config import BackendConfig, KiteSpec, RelaySpec, Target
from kite.net.aio import new_event_loop
from kite.net.tls import generate_self_signed
from kite.relay.grants import GrantTable, parse_grant
from kite.relay.server import RelayConfig, RelayServer

SECRET = "s3cr3t-for-tests"


def wait_until(cond, timeout: float, what: str, step: float = 0.02):
    """Poll ``cond()`` until it is true and return its value; fail after ``timeout`` s
    naming ``what`` (a bound on waiting, never a measurement)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(step)


def processes_mentioning(needle: str) -> set:
    """PIDs of live processes whose command line contains ``needle`` (a work directory)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if needle.encode() in cmdline:
            found.add(int(entry))
    return found


def free_port() -> int:
    """A loopback port that was free a moment ago, for programs that need an explicit port
    (pagekite.py, ssh, socat); kite's own servers bind port 0 instead."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(coro_fn, loop_kind: str, timeout: float = 120.0):
    """Run ``coro_fn()`` on a new loop of ``loop_kind``; fail on timeout or loop errors."""
    loop = new_event_loop(loop_kind)
    errors = []

    def handler(loop, ctx):
        errors.append(ctx)
        loop.default_exception_handler(ctx)

    loop.set_exception_handler(handler)
    try:
        asyncio.set_event_loop(loop)
        result = loop.run_until_complete(asyncio.wait_for(coro_fn(), timeout))
        tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    bad = [e for e in errors if "exception" in e and not isinstance(
        e["exception"], (ConnectionError, asyncio.CancelledError))]
    assert not bad, f"unhandled exceptions in the loop: {bad}"
    return result


@dataclass
class Certs:
    cert: str
    key: str
    fingerprint: str


def make_certs(tmp_path, names=("localhost", "127.0.0.1"), stem="relay") -> Certs:
    cert = str(tmp_path / f"{stem}.crt")
    key = str(tmp_path / f"{stem}.key")
    fp = generate_self_signed(cert, key, list(names))
    return Certs(cert, key, fp)


@dataclass
class KiteEnv:
    relay: RelayServer
    backends: list
    host: str
    port: int
    certs: Optional[Certs] = None
    extra: dict = field(default_factory=dict)

    async def add_backend(self, kites, *, tls=True, secret=SECRET, **relay_kw) -> Backend:
        backend = make_backend(self.port, kites, certs=self.certs if tls else None, **relay_kw)
        await backend.start()
        self.backends.append(backend)
        return backend


def make_backend(relay_port, kites, *, certs=None, keepalive=30.0, ping_timeout=10.0,
                 **relay_kw) -> Backend:
    spec = RelaySpec(host="127.0.0.1", port=relay_port, plain=certs is None,
                     ca=certs.cert if certs else None, kites=list(kites), **relay_kw)
    return Backend(BackendConfig(relays=[spec], keepalive=keepalive, ping_timeout=ping_timeout))


def http_kite(domain, port, secret=SECRET, host="127.0.0.1", **kw) -> KiteSpec:
    return KiteSpec(domain=domain, proto="http", secret=secret, target=Target("http", host, port), **kw)


def https_kite(domain, port, secret=SECRET) -> KiteSpec:
    return KiteSpec(domain=domain, proto="https", secret=secret, target=Target("https", "127.0.0.1", port))


def raw_kite(domain, port, public_port, secret=SECRET, **kw) -> KiteSpec:
    return KiteSpec(domain=domain, proto=f"raw-{public_port}", secret=secret,
                    target=Target("raw", "127.0.0.1", port), **kw)


@contextlib.asynccontextmanager
async def kite_env(tmp_path, kites=(), *, tls=True, grants=("*:*.test.kite:" + SECRET,),
                   keepalive=30.0, ping_timeout=10.0, relay_keepalive=30.0, wait=True,
                   **relay_kw):
    """A relay and (with ``kites``) a backend in this process; ``relay_kw`` go to the
    RelayConfig (limits: max_streams=..., idle_timeout=...)."""
    certs = make_certs(tmp_path) if tls else None
    cfg = RelayConfig(
        listen=[("127.0.0.1", 0)], grants=GrantTable([parse_grant(g) for g in grants]),
        tls_cert=certs.cert if certs else None, tls_key=certs.key if certs else None,
        tls_names=["localhost"], keepalive=relay_keepalive, drain_timeout=2.0, **relay_kw)
    relay = RelayServer(cfg)
    (host, port), = await relay.start()
    env = KiteEnv(relay=relay, backends=[], host=host, port=port, certs=certs)
    try:
        if kites:
            b = make_backend(port, kites, certs=certs, keepalive=keepalive, ping_timeout=ping_timeout)
            await b.start()
            env.backends.append(b)
            if wait:
                await b.wait_flying(timeout=20)
        yield env
    finally:
        for b in env.backends:
            await b.close()
        await relay.close(drain_timeout=0.5)


# -- local servers -----------------------------------------------------------------------------
async def start_http_server(body: bytes = b"hello from the local server\n", *, echo_headers=False):
    """A keep-alive HTTP/1.1 server: GET returns ``body`` (or the request head); POST echoes
    the sha256 of its body.  Returns (server, port)."""

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                method = lines[0].split(b" ")[0]
                clen = 0
                for ln in lines[1:]:
                    if ln.lower().startswith(b"content-length:"):
                        clen = int(ln.split(b":", 1)[1])
                if method == b"POST":
                    h = hashlib.sha256()
                    left = clen
                    while left:
                        chunk = await reader.read(min(left, 1 << 20))
                        if not chunk:
                            return
                        h.update(chunk)
                        left -= len(chunk)
                    out = h.hexdigest().encode()
                elif echo_headers:
                    out = head
                else:
                    out = body
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(out) + out)
                await writer.drain()
                if b"connection: close" in head.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def start_banner_server(banner=b"SSH-2.0-KiteTest\r\n"):
    """A server that speaks first, then echoes upper-cased lines (like the protocol doc's)."""

    async def handle(reader, writer):
        writer.write(banner)
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data.upper())
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def http_get(port, host, path="/", *, headers=b"", timeout=20.0):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n%s\r\n"
                 % (path.encode(), host.encode(), headers))
    data = await asyncio.wait_for(reader.read(), timeout)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


# -- subprocesses ------------------------------------------------------------------------------
#: Every Proc not yet stopped, by PID (each leads its own process group): killed at once when
#: the test process itself is told to stop (SIGTERM, SIGINT, exit), so that a run cut short
#: leaves nothing behind (conftest.py installs the handlers).
LIVE_PROCS: dict = {}


def kill_live_procs() -> None:
    """SIGKILL the process group of every Proc still running."""
    for pid in list(LIVE_PROCS):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        LIVE_PROCS.pop(pid, None)


class Proc:
    """A background process owned by a test: output to files, killed by PID at the end."""

    def __init__(self, args, tmp_path, name, env=None, preexec_fn=None):
        self.name = name
        self.out_path = tmp_path / f"{name}.out"
        self.err_path = tmp_path / f"{name}.err"
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        e = dict(os.environ)
        e.update(env or {})
        self.proc = subprocess.Popen(args, stdout=self._out, stderr=self._err, env=e,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=preexec_fn)
        self.pid = self.proc.pid
        LIVE_PROCS[self.pid] = self

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 30.0) -> str:
        """Wait until ``text`` appears in the process output (polls the files)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.output()
            if text in out:
                return out
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before "
                                     f"printing {text!r}:\n{out}")
            time.sleep(0.02)
        raise AssertionError(f"{self.name}: {text!r} not seen within {timeout} s:\n{self.output()}")

    def stop(self, sig=signal.SIGTERM, timeout=10.0) -> Optional[int]:
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        LIVE_PROCS.pop(self.pid, None)
        self._out.close()
        self._err.close()
        return self.proc.returncode


KITE = [sys.executable, "-m", "kite"]
