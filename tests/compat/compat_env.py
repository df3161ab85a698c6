"""Helpers of the interoperability suite (tests/compat): pagekite.py 1.5.2 processes,
in-process kite relays and backends, local servers, visitors and bulk transfers.

The fixtures that use them are in tests/compat/conftest.py; tests import helpers from
here (a module name of its own: ``conftest`` is ambiguous between tests/ and tests/compat).
"""


from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import ssl
import subprocess
import time
from dataclasses import dataclass
from typing import Optional

from kite.backend.connector import Backend
from kite.config import BackendConfig, KiteSpec, RelaySpec, Target
from kite.relay.grants import GrantTable, parse_grant
from kite.relay.server import RelayConfig, RelayServer
from support import free_port

#: Every kite of this suite lives under this domain; one shared secret.
ZONE = "testkite.local"
SECRET = "s3cr3t-compat"
#: The relay's own TLS name (pagekite.py --tls_endpoint / --fe_certname; kite --tls-name).
FE_NAME = "fe.testkite.local"

#: Marks pagekite.py prints when it is broken (crash-restarts, protocol errors, bug §13).
TROUBLE = ("Traceback", "Too much data", "BugFoundError", "Corrupt chunk", "crashed",
           "Unprocessed data")


def pagekite_path() -> Optional[str]:
    return shutil.which("pagekite") or ("/usr/bin/pagekite" if os.path.exists("/usr/bin/pagekite")
                                        else None)



def burst_size(wanted: int) -> int:
    """How many simultaneous visitors a burst test may open: each costs this process about
    three descriptors (visitor, relay side, local server).  Raises the soft limit if it can."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * wanted + 512
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return wanted if soft == resource.RLIM_INFINITY else min(wanted, (soft - 512) // 4)


def kite_name(stem: str) -> str:
    return f"{stem}.{ZONE}"


# -- certificates -------------------------------------------------------------------------------
@dataclass
class CompatCerts:
    fe_cert: str  # the relay's certificate (CN/SAN fe.testkite.local); also the CA to trust
    fe_key: str
    fe_pem: str  # key + certificate in one file: pagekite.py's --tls_endpoint format
    site_cert: str  # the https kite's local server (end-to-end TLS through the relay)
    site_key: str
    site_name: str


# -- pagekite.py processes ----------------------------------------------------------------------
class PageKite:
    """One pagekite.py process: its log file, waits on log lines, kill by process group."""

    def __init__(self, args, directory, name):
        self.name = name
        self.log_path = directory / f"{name}.log"
        self.out_path = directory / f"{name}.out"
        self.log_path.write_text("")
        self.args = [pagekite_path(), "--clean", "--noproxy", f"--logfile={self.log_path}",
                     "--loglevel=mach", *args]
        self._out = open(self.out_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.proc.pid

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace")
        try:
            text += self.out_path.read_text(errors="replace")
        except OSError:
            pass
        return text

    def count(self, text: str) -> int:
        return self.log().count(text)

    def _check_running(self, text):
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before logging "
                                 f"{text!r}:\n{self.tail()}")

    def tail(self, n=40) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def wait(self, text: str, timeout: float = 30.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.count(text) < count:
            self._check_running(text)
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: {text!r} not logged within {timeout} s:\n"
                                     f"{self.tail()}")
            time.sleep(0.02)

    async def await_log(self, text: str, timeout: float = 30.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.count(text) < count:
            self._check_running(text)
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: {text!r} not logged within {timeout} s:\n"
                                     f"{self.tail()}")
            await asyncio.sleep(0.02)

    def assert_healthy(self) -> None:
        """No crash-restart, no protocol error, still running."""
        log = self.log()
        bad = [t for t in TROUBLE if t in log]
        assert not bad, f"{self.name} logged {bad}:\n{self.tail(60)}"
        assert self.proc.poll() is None, f"{self.name} exited:\n{self.tail()}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass
        self._out.close()


class PageKiteFrontend(PageKite):
    port: int


class PageKiteFactory:
    def __init__(self, directory, certs: CompatCerts):
        self.dir = directory
        self.certs = certs
        self.procs: list = []
        self._n = 0

    def _name(self, kind):
        self._n += 1
        return f"pk-{kind}{self._n}"

    def frontend(self, *, tls: bool = True, zchunks: bool = True, keepalive: Optional[int] = None,
                 domains=(f"*:*.{ZONE}:{SECRET}",), port: Optional[int] = None,
                 extra=()) -> PageKiteFrontend:
        """``pagekite --isfrontend`` on 127.0.0.1 (§14.3/14.4); with ``tls`` it holds the
        certificate for FE_NAME, so tunnels may come as ``CONNECT fe.testkite.local:443``."""
        port = port or free_port()
        args = ["--isfrontend", "--host=127.0.0.1", f"--ports={port}",
                "--protos=http,https,raw", "--rawports=virtual"]
        if tls:
            args.append(f"--tls_endpoint={FE_NAME}:{self.certs.fe_pem}")
        for d in domains:
            args.append(f"--domain={d}")
        if not zchunks:
            args.append("--nozchunks")
        if keepalive:
            args.append(f"--keepalive={keepalive}")
        fe = PageKiteFrontend([*args, *extra], self.dir, self._name("fe"))
        fe.port = port
        self.procs.append(fe)
        fe.wait(f"listen=127.0.0.1:{port}", timeout=30)
        return fe

    def backend(self, frontend_port: int, services, *, tls: bool = False, zchunks: bool = True,
                keepalive: Optional[int] = None, frontends=(), extra=()) -> PageKite:
        """A pagekite.py backend; ``services`` are (proto, domain, port[, secret]) tuples.

        ``tls``: the encrypted tunnel of §1.2 variant 2 (``--fe_certname``, CONNECT then
        TLS); ``zchunks=False`` adds ``--nozchunks``, which also makes it register with the
        re-connect variant (§13.3).  Returns at once: ``await be.await_flying(...)``.
        """
        args = [f"--frontend=127.0.0.1:{frontend_port}"]
        args += [f"--frontend=127.0.0.1:{p}" for p in frontends]
        if tls:
            args += [f"--fe_certname={FE_NAME}", f"--ca_certs={self.certs.fe_pem}"]
        if not zchunks:
            args.append("--nozchunks")
        if keepalive:
            args.append(f"--keepalive={keepalive}")
        for svc in services:
            proto, domain, port = svc[:3]
            secret = svc[3] if len(svc) > 3 else SECRET
            args.append(f"--service_on={proto}:{domain}:127.0.0.1:{port}:{secret}")
        be = PageKite([*args, *extra], self.dir, self._name("be"))
        self.procs.append(be)
        return be

    def stop_all(self):
        for p in self.procs:
            p.stop()


def be_flying_marker(fe_port: int, proto: str, domain: str) -> str:
    """What a pagekite.py backend logs once a frontend accepted the kite (§14.1)."""
    return f"FE=127.0.0.1:{fe_port}; proto={proto}; domain={domain};"


def fe_live_marker(proto: str, domain: str) -> str:
    """What a pagekite.py frontend logs when a kite goes live (--loglevel=mach)."""
    return f"BE=Live; proto={proto}; domain={domain}"


# -- kite, in-process ---------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def kite_relay(certs: CompatCerts, *, zchunks: bool = False, keepalive: float = 30.0,
                     ping_timeout: float = 10.0, grants=(f"*:*.{ZONE}:{SECRET}",),
                     port: int = 0):
    """``kite relay`` with the same certificate and name as the pagekite.py frontends."""
    cfg = RelayConfig(listen=[("127.0.0.1", port)],
                      grants=GrantTable([parse_grant(g) for g in grants]),
                      tls_cert=certs.fe_cert, tls_key=certs.fe_key, tls_names=[FE_NAME],
                      keepalive=keepalive, ping_timeout=ping_timeout, zchunks=zchunks,
                      drain_timeout=1.0, allow_plain=True)  # pagekite.py's plain tunnels
    relay = RelayServer(cfg)
    (_host, relay.port), = await relay.start()
    try:
        yield relay
    finally:
        await relay.close(drain_timeout=0.2)


def relay_spec(port: int, kites, certs: CompatCerts, mode: str) -> RelaySpec:
    """How kite expose reaches a relay: ``plain`` TCP, or ``connect`` (CONNECT FE_NAME:443,
    then TLS checked against FE_NAME: the only TLS a pagekite.py 1.5.2 frontend takes)."""
    if mode == "plain":
        return RelaySpec(host="127.0.0.1", port=port, plain=True, kites=list(kites))
    if mode == "connect":
        return RelaySpec(host="127.0.0.1", port=port, ca=certs.fe_cert, connect_name=FE_NAME,
                         kites=list(kites))
    raise ValueError(mode)


def kite_backend(relays, *, keepalive: float = 30.0, ping_timeout: float = 10.0,
                 zchunks: bool = False) -> Backend:
    return Backend(BackendConfig(relays=list(relays), keepalive=keepalive,
                                 ping_timeout=ping_timeout, zchunks=zchunks))


def http_kite(domain, port, **kw) -> KiteSpec:
    return KiteSpec(domain=domain, proto="http", secret=kw.pop("secret", SECRET),
                    target=Target("http", "127.0.0.1", port), **kw)


def https_kite(domain, port, **kw) -> KiteSpec:
    return KiteSpec(domain=domain, proto="https", secret=kw.pop("secret", SECRET),
                    target=Target("https", "127.0.0.1", port), **kw)


def raw_kite(domain, port, public_port, **kw) -> KiteSpec:
    return KiteSpec(domain=domain, proto=f"raw-{public_port}", secret=kw.pop("secret", SECRET),
                    target=Target("raw", "127.0.0.1", port), **kw)


# -- local servers and visitors (in the test's loop) --------------------------------------------
async def start_https_server(certs: CompatCerts):
    """The https kite's local server: TLS end to end; says which kite the visitor reached."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs.site_cert, certs.site_key)

    async def handle(reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            body = b"secure hello: %s\n" % head.split(b" ")[1]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % len(body) + body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1]


async def connect_via(port: int, target: str):
    """An HTTP CONNECT proxy visitor (``nc -X connect``, ssh ProxyCommand): reader, writer
    after the relay's 200."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    if b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
        writer.close()
        raise AssertionError(f"CONNECT {target}: {head!r}")
    return reader, writer


async def https_get_via_connect(port: int, certs: CompatCerts, path: str = "/") -> bytes:
    """``curl -x http://relay https://secure.testkite.local/``: CONNECT :443, then TLS to the
    *local* server, verified against the site's own certificate."""
    reader, writer = await connect_via(port, f"{certs.site_name}:443")
    ctx = ssl.create_default_context(cafile=certs.site_cert)
    await writer.start_tls(ctx, server_hostname=certs.site_name)
    writer.write(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path.encode(), certs.site_name.encode()))
    data = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    return data


async def raw_roundtrip(port: int, domain: str, public_port: int = 22) -> tuple:
    """A raw kite through CONNECT: the server's banner (before we send), then an echo."""
    reader, writer = await connect_via(port, f"{domain}:{public_port}")
    banner = await asyncio.wait_for(reader.readline(), 20)
    writer.write(b"hello raw\n")
    echo = await asyncio.wait_for(reader.readline(), 20)
    writer.write_eof()
    rest = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    return banner, echo, rest


async def http_get(port: int, host: str, path: str = "/", timeout: float = 20.0):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                 % (path.encode(), host.encode()))
    data = await asyncio.wait_for(reader.read(), timeout)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


@dataclass
class LocalServices:
    """The servers behind the kites of one test: web (echoes the request head it got),
    https (end-to-end TLS), raw (speaks first, then echoes upper-cased), bulk (GET/POST)."""

    web: int
    https: int
    raw: int
    bulk: int
    servers: list

    def close(self):
        for s in self.servers:
            s.close()


RAW_BANNER = b"SSH-2.0-KiteCompat\r\n"


async def start_services(certs: CompatCerts) -> LocalServices:
    from support import start_banner_server, start_http_server

    web, web_port = await start_http_server(echo_headers=True)
    tls, tls_port = await start_https_server(certs)
    raw, raw_port = await start_banner_server(RAW_BANNER)
    bulk, bulk_port = await start_bulk_server()
    return LocalServices(web_port, tls_port, raw_port, bulk_port, [web, tls, raw, bulk])


async def check_kites(port: int, certs: CompatCerts, *, web: str, raw: Optional[str] = None,
                      https: bool = True, extra_web=()) -> None:
    """Visit every kite of a tunnel through the relay on ``port`` like real clients do
    (all at once: a pagekite.py frontend takes up to a second per new connection)."""

    async def visit_web(name):
        head, body = await http_get(port, name, "/compat?x=1")
        assert head.startswith(b"HTTP/1.1 200"), (name, head)
        # The local server got the visitor's request, with the visitor's address added by
        # the backend (pagekite.py and kite both add X-Forwarded-For).
        assert body.startswith(b"GET /compat?x=1 HTTP/1.1\r\n"), body
        assert b"X-Forwarded-For: 127.0.0.1\r\n" in body, body

    async def visit_https():
        data = await https_get_via_connect(port, certs, "/tls")
        assert data.startswith(b"HTTP/1.1 200"), data
        assert data.endswith(b"secure hello: /tls\n"), data

    async def visit_raw():
        banner, echo, rest = await raw_roundtrip(port, raw, 22)
        assert banner == RAW_BANNER
        assert echo == b"HELLO RAW\n"
        assert rest == b""

    visits = [visit_web(name) for name in (web, *extra_web)]
    if https:
        visits.append(visit_https())
    if raw:
        visits.append(visit_raw())
    await asyncio.gather(*visits)


class ZCounter:
    """Counts ZChunks kite inflates (patches kite.net.tunnel.ZInflater for one test)."""

    def __init__(self, monkeypatch):
        import kite.net.tunnel
        from kite.proto.zchunks import ZInflater

        self.count = 0
        counter = self

        class CountingInflater(ZInflater):
            __slots__ = ()

            def inflate(self, data, ulen):
                counter.count += 1
                return super().inflate(data, ulen)

        monkeypatch.setattr(kite.net.tunnel, "ZInflater", CountingInflater)


# -- bulk ---------------------------------------------------------------------------------------
MiB = 1024 * 1024
_PATTERN = os.urandom(MiB)  # incompressible: ZChunks cannot shrink it


def blob(size: int) -> memoryview:
    reps = -(-size // MiB)
    return memoryview(_PATTERN * reps)[:size]


def sha(data) -> str:
    return hashlib.sha256(data).hexdigest()


async def start_bulk_server(*, send_delay_event: Optional[asyncio.Event] = None):
    """``GET /blob/N`` returns N bytes of the pattern; ``POST`` answers the body's sha256."""

    async def handle(reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"POST"):
                clen = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                h = hashlib.sha256()
                left = clen
                while left:
                    chunk = await reader.read(min(left, MiB))
                    if not chunk:
                        return
                    h.update(chunk)
                    left -= len(chunk)
                out = h.hexdigest().encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                             % len(out) + out)
            else:
                size = int(head.split(b" ")[1].rsplit(b"/", 1)[1])
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                             % size)
                data = blob(size)
                for i in range(0, size, 256 * 1024):
                    writer.write(data[i:i + 256 * 1024])
                    await writer.drain()
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def download(port: int, host: str, size: int, *, read_size: int = MiB,
                   pace: Optional[float] = None, gate: Optional[asyncio.Event] = None) -> tuple:
    """GET /blob/size through the relay; returns (bytes received, sha256, seconds).
    ``pace``: bytes per second the visitor reads at most (a slow visitor); ``gate``: after
    the first read the visitor stops reading until the event is set (a stalled visitor)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    writer.write(b"GET /blob/%d HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                 % (size, host.encode()))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 200"), head
    h = hashlib.sha256()
    got = 0
    while got < size:
        chunk = await asyncio.wait_for(reader.read(read_size), 60)
        if not chunk:
            break
        h.update(chunk)
        got += len(chunk)
        if gate is not None:
            await gate.wait()
        if pace:
            await asyncio.sleep(len(chunk) / pace)
    elapsed = time.monotonic() - t0
    writer.close()
    return got, h.hexdigest(), elapsed


async def upload(port: int, host: str, size: int) -> tuple:
    """POST size bytes of the pattern; returns (sha256 the server computed, seconds)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    writer.write(b"POST /up HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n"
                 % (host.encode(), size))
    data = blob(size)
    for i in range(0, size, 256 * 1024):
        writer.write(data[i:i + 256 * 1024])
        await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
    assert head.startswith(b"HTTP/1.1 200"), head
    body = await asyncio.wait_for(reader.read(), 30)
    elapsed = time.monotonic() - t0
    writer.close()
    return body.decode(errors="replace"), elapsed


MEASUREMENTS: list = []


def report(line: str) -> None:
    """A measurement (throughput...): printed in the terminal summary of the run."""
    MEASUREMENTS.append(line)
