"""The systems under test: how each one is started in front of the origin, and what a
started instance is (where visitors connect, which process is relay and which backend)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import ClassVar

from .client import connect, http_get
from .common import (
    HOST,
    KITE_DOMAIN,
    KITE_NAME,
    PK_FE_NAME,
    SECRET,
    TLS13_SUITES,
    TLS_NAME,
    BenchError,
)
from .context import Ctx
from .measure import tool_version
from .procs import free_port, log_count, log_has, port_open, wait_for

PAGEKITE_TUNING = ["--select_loop_min_ms=0", "--max_read_bytes=262144"]
DEFAULT_MAX_STREAMS = 16384  # kite relay's --max-streams (visitors per tunnel)


class Running:
    """One started instance of a system: where visitors go and who does the work."""

    def __init__(self, system: System, port: int, host: str, procs: dict[str, subprocess.Popen],
                 dialer: str | None = None, tunnel_port: int | None = None,
                 fds_per_conn: int = 1, tls_name: str | None = None,
                 hosts: list[str] | None = None):
        self.system = system
        self.port = port
        self.host = host
        self.hosts = hosts or [host]  # idle visitors: Host of each in turn (one kite per origin address)
        self.procs = procs  # role ("relay", "backend") -> process
        self.dialer = dialer  # the role whose sockets to tunnel_port carry the tunnel
        self.tunnel_port = tunnel_port
        self.fds_per_conn = fds_per_conn  # per visitor connection, in the busiest process
        self.tls_name = tls_name  # HTTPS visitors: TLS with this SNI (None: plain HTTP)

    @property
    def pids(self) -> dict[str, int]:
        """role -> PID"""
        return {role: p.pid for role, p in self.procs.items()}

    def dead(self) -> list[str]:
        """What exited of the system's processes, for an error message."""
        return [f"{role} (pid {p.pid}) exited with {p.returncode}"
                for role, p in self.procs.items() if p.poll() is not None]


class System:
    """A system under test; ``start`` starts a fresh instance of it for each workload."""

    name = ""
    title = ""
    #: Visitors speak HTTPS to it (bulk, c50, seq, newconn over TLS; no idle workload).
    https = False
    #: role -> [(substring of /proc/PID/maps, expected present?)]
    maps: ClassVar[dict[str, list]] = {}
    #: Descriptors one idle visitor holds in the busiest process of the system.
    idle_fds_per_conn = 1
    #: The system's own connections to the origin all leave from HOST to one address and
    #: port, so they share one ephemeral port range (only ``direct``, whose client is the
    #: bench's, spreads over several source addresses).
    origin_from_one_address = True
    #: For an idle level beyond one port range, it can spread its origin connections over
    #: the origin's several addresses (ctx.origin_hosts) when ``ctx.idle_level`` asks.
    origin_spread = False

    def idle_fd_cap(self, nofile: int) -> tuple[int, str]:
        """The most idle visitors it can hold with RLIMIT_NOFILE ``nofile``, and why."""
        return ((nofile - 200) // self.idle_fds_per_conn,
                f"{self.idle_fds_per_conn} descriptor(s) per visitor, RLIMIT_NOFILE {nofile}")

    def unavailable(self, ctx: Ctx) -> str | None:
        """Why this system cannot run here (not installed, ...), or None."""
        return None

    def start(self, ctx: Ctx, tag: str) -> Running:
        """Start an instance (``tag`` names its logs); return it once it serves /1k.bin."""
        raise NotImplementedError

    def version(self, ctx: Ctx) -> str | None:
        return None


class Direct(System):
    name = "direct"
    title = "client -> origin"
    origin_from_one_address = False

    def start(self, ctx, tag):
        return Running(self, ctx.origin_port, "origin.bench", {})


#: A stunnel server follows its own cipher order, as kite's and nginx's do.
STUNNEL_SERVER_ORDER = "options = CIPHER_SERVER_PREFERENCE\noptions = PRIORITIZE_CHACHA\n"


class Stunnel(System):
    name = "stunnel"
    title = "stunnel client -> TLS -> stunnel server (C reference)"
    idle_fds_per_conn = 2

    def idle_fd_cap(self, nofile):
        # stunnel refuses clients beyond max_clients = 125/256 of its RLIMIT_NOFILE (2
        # descriptors per client, plus headroom); keep room for the latency probe.
        return (nofile * 125 // 256 - 50,
                f"stunnel's max_clients is 125/256 of RLIMIT_NOFILE ({nofile})")

    def _exe(self):
        return shutil.which("stunnel4") or shutil.which("stunnel")

    def unavailable(self, ctx):
        return None if self._exe() else "stunnel not installed (apt-get install stunnel4)"

    def version(self, ctx):
        return tool_version([self._exe(), "-version"], r"stunnel \S+")

    def start(self, ctx, tag):
        exe = self._exe()
        s_port, c_port = free_port(), free_port()
        server_conf = os.path.join(ctx.work, f"stunnel-server-{tag}.conf")
        client_conf = os.path.join(ctx.work, f"stunnel-client-{tag}.conf")
        common = f"foreground = yes\npid =\nsyslog = no\ndebug = 3\nciphersuites = {TLS13_SUITES}\n"
        with open(server_conf, "w") as f:
            f.write(common + f"[tunnel]\naccept = {HOST}:{s_port}\nconnect = {HOST}:{ctx.origin_port}\n"
                    f"cert = {ctx.cert}\nkey = {ctx.key}\n{STUNNEL_SERVER_ORDER}")
        with open(client_conf, "w") as f:
            f.write(common + f"[tunnel]\nclient = yes\naccept = {HOST}:{c_port}\n"
                    f"connect = {HOST}:{s_port}\nverifyChain = yes\nCAfile = {ctx.cert}\n"
                    f"checkHost = localhost\n")
        slog, clog = ctx.logfile(f"stunnel-server-{tag}"), ctx.logfile(f"stunnel-client-{tag}")
        server = ctx.procs.start("stunnel-server", [exe, server_conf], log=slog, cpus=ctx.system_cpus)
        client = ctx.procs.start("stunnel-client", [exe, client_conf], log=clog, cpus=ctx.system_cpus)
        run = Running(self, c_port, KITE_NAME, {"relay": client, "backend": server},
                      dialer="relay", tunnel_port=s_port, fds_per_conn=2)
        try:
            wait_for("stunnel", lambda: port_open(s_port) and port_open(c_port), 15,
                     [server, client], [slog, clog])
        except BaseException:
            ctx.procs.stop(client, server)
            raise
        return run


class Haproxy(System):
    """haproxy relaying plain TCP (``mode tcp``) to the origin: one process, one thread, no
    TLS; the C reference for a relay's cost per request without a tunnel."""

    name = "haproxy"
    title = "client -> haproxy (mode tcp, nbthread 1, no TLS) -> origin"
    idle_fds_per_conn = 2
    origin_spread = True

    def _exe(self):
        exe = "/usr/sbin/haproxy"  # not on a non-root user's PATH
        return shutil.which("haproxy") or (exe if os.path.exists(exe) else None)

    def unavailable(self, ctx):
        return None if self._exe() else "haproxy not installed (apt-get install haproxy)"

    def version(self, ctx):
        return tool_version([self._exe(), "-v"], r"HAProxy version \S+")

    def start(self, ctx, tag):
        port = free_port()
        conf = os.path.join(ctx.work, f"haproxy-{tag}.cfg")
        # Two descriptors per visitor (its socket and the one to the origin), plus headroom.
        maxconn = max(100, (ctx.nofile - 200) // 2)
        # One server per origin address the idle level needs (round robin), else one.
        servers = "\n".join(f"    server origin{i} {addr}:{ctx.origin_port} maxconn {maxconn}"
                             for i, addr in enumerate(ctx.origin_hosts_for_level(), 1))
        with open(conf, "w") as f:
            f.write(f"""# kite relay benchmark: haproxy relaying plain TCP to the origin
global
    nbthread 1
    maxconn {maxconn}

defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h

frontend visitors
    bind {HOST}:{port} backlog 4096
    maxconn {maxconn}
    default_backend origin

backend origin
    balance roundrobin
{servers}
""")
        log = ctx.logfile(f"haproxy-{tag}")
        proc = ctx.procs.start("haproxy", [self._exe(), "-db", "-f", conf], log=log,
                               cpus=ctx.system_cpus)
        run = Running(self, port, KITE_NAME, {"relay": proc}, fds_per_conn=2)
        try:
            wait_for("haproxy", lambda: port_open(port), 15, [proc], [log])
            wait_until_served(run, 15)
        except BaseException:
            ctx.procs.stop(proc)
            raise
        return run


class Pagekite(System):
    name = "pagekite"
    title = "pagekite.py frontend + backend, TLS tunnel (stock)"
    tuning: ClassVar[list[str]] = []

    def _exe(self):
        return shutil.which("pagekite")

    def unavailable(self, ctx):
        return None if self._exe() else "pagekite.py not installed (apt-get install pagekite)"

    def version(self, ctx):
        return tool_version(["dpkg-query", "-W", "-f", "${Version}", "pagekite"], r"\S+")

    def start(self, ctx, tag):
        exe = self._exe()
        port = free_port()
        felog, belog = ctx.logfile(f"{self.name}-fe-{tag}"), ctx.logfile(f"{self.name}-be-{tag}")
        base = [exe, "--clean", "--noproxy"]
        fe = ctx.procs.start("pagekite-fe", base + [
            "--isfrontend", f"--host={HOST}", f"--ports={port}", "--protos=http,https,raw",
            "--rawports=virtual", f"--tls_endpoint={PK_FE_NAME}:{ctx.pk_pem}",
            f"--domain=*:{KITE_NAME}:{SECRET}", f"--logfile={felog}"] + self.tuning,
            log=felog + ".out", cpus=ctx.system_cpus)
        try:
            wait_for("pagekite.py frontend", lambda: port_open(port), 20, [fe], [felog])
            be = ctx.procs.start("pagekite-be", base + [
                f"--frontend={HOST}:{port}", f"--fe_certname={PK_FE_NAME}", f"--ca_certs={ctx.pk_pem}",
                f"--service_on=http:{KITE_NAME}:{HOST}:{ctx.origin_port}:{SECRET}",
                f"--logfile={belog}"] + self.tuning, log=belog + ".out", cpus=ctx.system_cpus)
        except BaseException:
            ctx.procs.stop(fe)
            raise
        run = Running(self, port, KITE_NAME, {"relay": fe, "backend": be},
                      dialer="backend", tunnel_port=port)
        try:
            wait_for(
                "pagekite.py backend",
                log_has(belog, r"FE=[\d.:]+; proto=http; domain=" + re.escape(KITE_NAME)),
                30,
                [fe, be],
                [felog, belog],
            )
            wait_until_served(run, 30)
        except BaseException:
            ctx.procs.stop(be, fe)
            raise
        return run


class PagekiteTuned(Pagekite):
    name = "pagekite-tuned"
    title = "pagekite.py, " + " ".join(PAGEKITE_TUNING)
    tuning: ClassVar[list[str]] = PAGEKITE_TUNING


class Kite(System):
    name = "kite"
    title = "kite relay + kite expose, TLS, uvloop, compiled fast path"
    loop = "uvloop"
    origin_spread = True
    extra_env: ClassVar[dict[str, str]] = {"KITE_REQUIRE_EXTENSIONS": "1"}
    maps: ClassVar[dict[str, list]] = {
        "relay": [("_fastpath.cpython", True), ("uvloop", True)],
        "backend": [("_fastpath.cpython", True), ("uvloop", True)]}

    def unavailable(self, ctx):
        if ctx.kite_env is None:
            return ctx.kite_problem
        code = "import kite.fastpath"
        if self.loop == "uvloop":
            code += "; import uvloop"
        problem = ctx.probe_kite(self.extra_env, code)
        if problem:
            return problem
        return None

    def version(self, ctx):
        r = subprocess.run([sys.executable, "-c", "import kite; print(kite.__version__)"],
                           env=ctx.kite_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd="/",
                           check=False)
        return r.stdout.decode().strip() or None

    def grant(self, ctx, env, tag) -> tuple[list, str]:
        """The relay's options that let the backend fly KITE_NAME, and the backend's secret."""
        return ["--kite", f"*:{KITE_DOMAIN}:{SECRET}"], SECRET

    def observe(self, ctx, tag, role: str) -> list:
        """Options of ``role`` (relay, backend) for the access log and metrics: off here (the
        figures compare like with like across versions); kite-obs turns them on."""
        return ["--access-log", "off"]

    def start(self, ctx, tag):
        port = free_port()
        env = dict(ctx.kite_env)
        env.update(self.extra_env)
        rlog, blog = ctx.logfile(f"{self.name}-relay-{tag}"), ctx.logfile(f"{self.name}-expose-{tag}")
        grant, secret = self.grant(ctx, env, tag)
        relay_limits = []
        if ctx.idle_level and ctx.idle_level + 1000 > DEFAULT_MAX_STREAMS:
            relay_limits = ["--max-streams", str(ctx.idle_level + 1000)]  # one tunnel carries them all
        relay = ctx.procs.start("kite-relay", [
            sys.executable, "-m", "kite", "relay", "--listen", f"{HOST}:{port}",
            "--tls-cert", ctx.cert, "--tls-key", ctx.key, *grant, *relay_limits,
            *self.observe(ctx, tag, "relay"), "--drain-timeout", "1", "--loop", self.loop],
            env=env, log=rlog, cpus=ctx.system_cpus, cwd=ctx.work)
        origins = ctx.origin_hosts_for_level() if self.origin_spread else [HOST]
        names = [KITE_NAME] + [f"app{i}.{KITE_DOMAIN[2:]}" for i in range(2, len(origins) + 1)]
        if len(origins) == 1:
            kites = [f"http://{HOST}:{ctx.origin_port}", KITE_NAME, "--relay", f"{HOST}:{port}",
                     "--ca", ctx.cert, "--secret", secret]
        else:  # one kite per origin address: each has its own range of ports to the origin
            conf = os.path.join(ctx.work, f"{self.name}-expose-{tag}.toml")
            with open(conf, "w") as f:
                f.write(f'[defaults]\nsecret = "{secret}"\nca = "{ctx.cert}"\n\n'
                        f'[[relay]]\naddress = "{HOST}:{port}"\n')
                for name, addr in zip(names, origins, strict=True):
                    f.write(f'\n[[kite]]\nname = "{name}"\ntarget = "http://{addr}:{ctx.origin_port}"\n')
            kites = ["--config", conf]
        try:
            wait_for("kite relay", log_has(rlog, r"relay listening on "), 20, [relay], [rlog])
            backend = ctx.procs.start("kite-expose", [
                sys.executable, "-m", "kite", "expose", *kites,
                *self.observe(ctx, tag, "backend"), "--loop", self.loop],
                env=env, log=blog, cpus=ctx.system_cpus, cwd=ctx.work)
        except BaseException:
            ctx.procs.stop(relay)
            raise
        run = Running(self, port, KITE_NAME, {"relay": relay, "backend": backend},
                      dialer="backend", tunnel_port=port, hosts=names)
        try:
            wait_for("kite expose", log_count(blog, r"kite flying", len(names)), 20, [relay, backend],
                     [rlog, blog])
            wait_until_served(run, 20)
        except BaseException:
            ctx.procs.stop(backend, relay)
            raise
        return run


class KitePy(Kite):
    name = "kite-py"
    title = "kite, uvloop, KITE_NO_EXTENSIONS=1 (pure-Python fast path)"
    extra_env: ClassVar[dict[str, str]] = {"KITE_NO_EXTENSIONS": "1"}
    maps: ClassVar[dict[str, list]] = {
        "relay": [("_fastpath.cpython", False), ("uvloop", True)],
        "backend": [("_fastpath.cpython", False), ("uvloop", True)]}


class KiteAsyncio(Kite):
    name = "kite-asyncio"
    title = "kite, plain asyncio, compiled fast path"
    loop = "asyncio"
    maps: ClassVar[dict[str, list]] = {
        "relay": [("_fastpath.cpython", True), ("uvloop/loop", False)],
        "backend": [("_fastpath.cpython", True), ("uvloop/loop", False)]}


class KiteAccounts(Kite):
    """kite with its kite in an account registry (``--db``): the cost of byte accounting."""

    name = "kite-acct"
    title = "kite, compiled, uvloop, kite from an account (--db: accounting on)"
    origin_spread = False  # the account holds the one name

    def grant(self, ctx, env, tag):
        db = os.path.join(ctx.work, f"{self.name}-{tag}.db")
        for f in (db, db + "-wal", db + "-shm"):
            if os.path.exists(f):
                os.unlink(f)
        kite = [sys.executable, "-m", "kite", "accounts"]
        out = subprocess.run([*kite, "add", "bench@example.com", "--quota", "1000TB", "--json",
                              "--db", db], env=env, capture_output=True, check=True, cwd=ctx.work)
        subprocess.run([*kite, "kite", "bench@example.com", KITE_NAME, "--protos", "http,https",
                        "--db", db], env=env, capture_output=True, check=True, cwd=ctx.work)
        return ["--db", db], json.loads(out.stdout)["secret"]


class KiteObserved(Kite):
    """kite with its access logs on (relay and backend, to files, as text) and the relay's
    admin endpoint up (``--admin``): the cost of observability.  The metrics are read from
    the relay's state when scraped, so an endpoint nobody scrapes costs nothing per byte;
    the access log costs per visitor stream (not per chunk)."""

    name = "kite-obs"
    title = "kite, compiled, uvloop, access logs on and --admin (metrics, dashboard)"

    def observe(self, ctx, tag, role):
        log = ctx.logfile(f"{self.name}-{role}-access-{tag}")
        args = ["--access-log", log]
        if role == "relay":
            args += ["--admin", f"{HOST}:{free_port()}"]
        return args


class _FromBaseline:
    """Mixed into a kite system: run it from another source tree, for a before/after
    comparison in one interleaved run: ``KITE_BASELINE_SRC`` names that tree's ``src/`` (its
    compiled fast path built in place, e.g. a ``git worktree`` of an older commit after
    ``python setup.py build_ext --inplace``)."""

    extra_env: ClassVar[dict[str, str]] = {
        "KITE_REQUIRE_EXTENSIONS": "1", "PYTHONPATH": os.environ.get("KITE_BASELINE_SRC", "")}

    def observe(self, ctx, tag, role):
        return []  # older trees may not know --access-log (they have no access log)

    def unavailable(self, ctx):
        if not os.environ.get("KITE_BASELINE_SRC"):
            return "KITE_BASELINE_SRC is not set (the src/ folder of a baseline checkout)"
        return super().unavailable(ctx)  # type: ignore[misc]


class KiteBaseline(_FromBaseline, Kite):
    """kite from ``KITE_BASELINE_SRC``."""

    name = "kite-base"
    title = "kite from $KITE_BASELINE_SRC (a baseline checkout), compiled, uvloop"
    origin_spread = False  # older trees may read no --config


# -- HTTPS visitors: TLS terminated in front of the origin (ECDSA P-256 certificate for
#    TLS_NAME, ctx.site_cert) ------------------------------------------------------------------
class KiteTls(Kite):
    """kite relay terminating the visitors' TLS for its http kite TLS_NAME (its second
    certificate), the decrypted stream through the tunnel to kite expose."""

    name = "kite-tls"
    title = "HTTPS visitors: kite relay terminates TLS for an http kite, tunnel to kite expose"
    https = True

    def start(self, ctx, tag):
        port = free_port()
        env = dict(ctx.kite_env)
        env.update(self.extra_env)
        rlog, blog = ctx.logfile(f"{self.name}-relay-{tag}"), ctx.logfile(f"{self.name}-expose-{tag}")
        relay = ctx.procs.start("kite-relay", [
            sys.executable, "-m", "kite", "relay", "--listen", f"{HOST}:{port}",
            "--tls-cert", ctx.tls_relay_cert, "--tls-key", ctx.tls_relay_key,
            "--tls-cert", ctx.site_cert, "--tls-key", ctx.site_key,
            "--kite", f"*:{TLS_NAME}:{SECRET}", *self.observe(ctx, tag, "relay"),
            "--drain-timeout", "1", "--loop", self.loop],
            env=env, log=rlog, cpus=ctx.system_cpus, cwd=ctx.work)
        try:
            wait_for("kite relay", log_has(rlog, r"relay listening on "), 20, [relay], [rlog])
            backend = ctx.procs.start("kite-expose", [
                sys.executable, "-m", "kite", "expose", f"http://{HOST}:{ctx.origin_port}", TLS_NAME,
                "--relay", f"{HOST}:{port}", "--ca", ctx.tls_relay_cert, "--secret", SECRET,
                *self.observe(ctx, tag, "backend"), "--loop", self.loop],
                env=env, log=blog, cpus=ctx.system_cpus, cwd=ctx.work)
        except BaseException:
            ctx.procs.stop(relay)
            raise
        run = Running(self, port, TLS_NAME, {"relay": relay, "backend": backend},
                      dialer="backend", tunnel_port=port, tls_name=TLS_NAME)
        try:
            wait_for("kite expose", log_has(blog, r"kite flying"), 20, [relay, backend], [rlog, blog])
            wait_until_served(run, 20)
        except BaseException:
            ctx.procs.stop(backend, relay)
            raise
        return run


class KiteTlsBaseline(_FromBaseline, KiteTls):
    """kite-tls from ``KITE_BASELINE_SRC``: a before/after comparison of TLS termination."""

    name = "kite-tls-base"
    title = "HTTPS visitors: kite-tls from $KITE_BASELINE_SRC (a baseline checkout)"


class KiteTlsLoop(KiteTls):
    """kite-tls on the event loop's TLS (``KITE_NATIVE_TLS=0``): kite's own TLS transport
    (kite._tls) off, for its on/off cost in one run."""

    name = "kite-tls-loop"
    title = "HTTPS visitors: kite-tls with the event loop's TLS (KITE_NATIVE_TLS=0)"
    extra_env: ClassVar[dict[str, str]] = {"KITE_REQUIRE_EXTENSIONS": "1", "KITE_NATIVE_TLS": "0"}


#: How every nginx of the benchmarks proxies: streamed both ways, as kite streams (no temp
#: files, no whole-body buffering), with the buffers a throughput tuning gives.  With
#: buffering off nginx moves a response proxy_buffer_size at a time (default one page: 8 KiB
#: reads and TLS records, 4.4-5.4 s of CPU a GB down instead of 1.8-2.2) and a request body
#: client_body_buffer_size at a time (bench/README.md, "A fair nginx").
NGINX_STREAMING = ("proxy_buffering off; proxy_request_buffering off; proxy_buffer_size 256k; "
                   "proxy_buffers 8 256k; proxy_busy_buffers_size 512k; "
                   "client_body_buffer_size 256k;")


class NginxTls(System):
    """nginx terminating TLS and proxying to the origin over keep-alive connections."""

    name = "nginx-tls"
    title = "HTTPS visitors: nginx terminates TLS, proxy_pass to the origin (1 worker)"
    https = True

    def _exe(self):
        return shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)

    def unavailable(self, ctx):
        return None if self._exe() else "nginx not installed (apt-get install nginx-light)"

    def version(self, ctx):
        return tool_version([self._exe(), "-v"])

    def _conf(self, ctx, prefix: str, errlog: str, port: int, upstream: str, scheme: str,
              cert: str, key: str, proxy_ssl: str = "") -> str:
        """One nginx terminating TLS on ``port`` and proxying to ``upstream`` over keep-alive
        connections, ``scheme`` http or https (then ``proxy_ssl``: its client settings)."""
        return f"""# kite relay benchmark: nginx terminating HTTPS, proxy_pass to {scheme}://{upstream}
daemon off;
master_process off;
worker_rlimit_nofile {ctx.nofile};
error_log {errlog} warn;
pid {prefix}/nginx.pid;
events {{ worker_connections {max(1024, ctx.nofile - 200)}; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {prefix};
    proxy_temp_path {prefix};
    keepalive_timeout 3600s;
    keepalive_requests 100000000;
    client_max_body_size 0;
    upstream up {{ server {upstream}; keepalive 256; }}
    server {{
        listen {HOST}:{port} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets on;
        ssl_prefer_server_ciphers on;
        ssl_conf_command Ciphersuites {TLS13_SUITES};
        ssl_conf_command Options PrioritizeChaCha;
        location / {{
            proxy_pass {scheme}://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-Proto https;
            {NGINX_STREAMING}{proxy_ssl}
        }}
    }}
}}
"""

    def _start_one(self, ctx, tag: str, role: str, port: int, upstream: str, scheme: str,
                   cert: str, key: str, proxy_ssl: str = ""):
        prefix = os.path.join(ctx.work, f"{self.name}-{role}-{tag}")
        os.makedirs(prefix, exist_ok=True)
        conf = os.path.join(prefix, "nginx.conf")
        errlog = ctx.logfile(f"{self.name}-{role}-error-{tag}")
        with open(conf, "w") as f:
            f.write(self._conf(ctx, prefix, errlog, port, upstream, scheme, cert, key, proxy_ssl))
        log = ctx.logfile(f"{self.name}-{role}-{tag}")
        proc = ctx.procs.start(f"{self.name}-{role}", [self._exe(), "-p", prefix, "-e", errlog,
                                                       "-c", conf], log=log, cpus=ctx.system_cpus)
        try:
            wait_for(f"{self.name} {role}", lambda: port_open(port), 15, [proc], [log, errlog])
        except BaseException:
            ctx.procs.stop(proc)
            raise
        return proc

    def start(self, ctx, tag):
        port = free_port()
        proc = self._start_one(ctx, tag, "relay", port, f"{HOST}:{ctx.origin_port}", "http",
                               ctx.site_cert, ctx.site_key)
        run = Running(self, port, TLS_NAME, {"relay": proc}, tls_name=TLS_NAME, fds_per_conn=2)
        try:
            wait_until_served(run, 15)
        except BaseException:
            ctx.procs.stop(proc)
            raise
        return run


class NginxTlsTunnel(NginxTls):
    """nginx in kite-tls's shape, the C reference for what that shape costs: a "relay" nginx
    terminates the visitors' TLS and proxies over TLS (keep-alive upstream connections, the
    tunnel's AES-128-GCM) to a "backend" nginx, which terminates that TLS and proxies to the
    origin.  Three AES-GCM passes and three socket hops a byte, in two processes, as kite's
    relay, tunnel and kite expose; nginx-tls makes one pass and two hops in one process."""

    name = "nginx-tls-tunnel"
    title = "HTTPS visitors: nginx terminates TLS, TLS to a second nginx, to the origin"

    def start(self, ctx, tag):
        port, inner = free_port(), free_port()
        backend = self._start_one(ctx, tag, "backend", inner, f"{HOST}:{ctx.origin_port}",
                                  "http", ctx.tls_relay_cert, ctx.tls_relay_key)
        # The backend's certificate is verified as kite expose verifies its relay's; the
        # upstream connections are kept, so a handshake is rare and its cost does not count.
        proxy_ssl = f"""
            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_conf_command Ciphersuites {TLS13_SUITES};
            proxy_ssl_session_reuse on;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ctx.tls_relay_cert};
            proxy_ssl_name {HOST};"""
        try:
            relay = self._start_one(ctx, tag, "relay", port, f"{HOST}:{inner}", "https",
                                    ctx.site_cert, ctx.site_key, proxy_ssl)
        except BaseException:
            ctx.procs.stop(backend)
            raise
        run = Running(self, port, TLS_NAME, {"relay": relay, "backend": backend},
                      dialer="relay", tunnel_port=inner, tls_name=TLS_NAME, fds_per_conn=2)
        try:
            wait_until_served(run, 15)
        except BaseException:
            ctx.procs.stop(relay, backend)
            raise
        return run


class StunnelTls(Stunnel):
    """stunnel's server alone: TLS from the visitor, plain TCP to the origin."""

    name = "stunnel-tls"
    title = "HTTPS visitors: stunnel server terminates TLS, TCP to the origin"
    https = True

    def start(self, ctx, tag):
        port = free_port()
        conf = os.path.join(ctx.work, f"stunnel-tls-{tag}.conf")
        with open(conf, "w") as f:
            f.write("foreground = yes\npid =\nsyslog = no\ndebug = 3\n"
                    f"[https]\naccept = {HOST}:{port}\nconnect = {HOST}:{ctx.origin_port}\n"
                    f"cert = {ctx.site_cert}\nkey = {ctx.site_key}\nsslVersionMin = TLSv1.2\n"
                    f"ciphersuites = {TLS13_SUITES}\n{STUNNEL_SERVER_ORDER}")
        log = ctx.logfile(f"stunnel-tls-{tag}")
        proc = ctx.procs.start("stunnel-tls", [self._exe(), conf], log=log, cpus=ctx.system_cpus)
        run = Running(self, port, TLS_NAME, {"relay": proc}, tls_name=TLS_NAME, fds_per_conn=2)
        try:
            wait_for("stunnel-tls", lambda: port_open(port), 15, [proc], [log])
            wait_until_served(run, 15)
        except BaseException:
            ctx.procs.stop(proc)
            raise
        return run


ALL_SYSTEMS = {cls.name: cls for cls in (Direct, Haproxy, Stunnel, Pagekite, PagekiteTuned, Kite, KitePy,
                                          KiteAsyncio, KiteAccounts, KiteObserved, KiteBaseline,
                                          KiteTls, KiteTlsBaseline, KiteTlsLoop, NginxTls, NginxTlsTunnel,
                                          StunnelTls)}
SYSTEMS = tuple(ALL_SYSTEMS)
#: The HTTPS-visitor comparison: ``--systems https`` (a shorthand for these).
HTTPS_SYSTEMS = (KiteTls.name, NginxTls.name, NginxTlsTunnel.name, StunnelTls.name)
#: What a run compares unless --systems says otherwise (kite-base needs KITE_BASELINE_SRC;
#: the https systems are their own comparison).
DEFAULT_SYSTEMS = tuple(n for n in SYSTEMS if n not in (KiteBaseline.name, KiteAccounts.name,
                                                        KiteObserved.name, KiteTlsBaseline.name,
                                                        KiteTlsLoop.name, *HTTPS_SYSTEMS))


def wait_until_served(run: Running, timeout: float) -> None:
    """Poll GET /1k.bin until it answers 200 (a relay answers 503 until its kite is up)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        dead = run.dead()
        if dead:
            raise BenchError(f"{run.system.name}: " + "; ".join(dead))
        try:
            with connect(run.port, timeout=5, tls_name=run.tls_name) as s:
                http_get(s, run.host, "/1k.bin", deadline=time.monotonic() + 5)
                return
        except (OSError, BenchError) as exc:
            last = exc
        time.sleep(0.2)
    raise BenchError(f"{run.system.name}: not serving after {timeout:g} s: {last}")
