"""The run context: work directory on tmpfs, the files served, certificates, the origin
(nginx, or bench/origin.py), and which kite the kite systems run."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

from .common import BENCH, HOST, PK_FE_NAME, REPO, TLS_NAME, BenchError, MiB
from .limits import MAX_SOURCES, PORT_MARGIN, ports_per_destination, source_addresses
from .measure import tool_version
from .procs import Procs, free_port, log_has, port_open, raise_nofile, wait_for
from .progress import Progress


def choose_kite(where: str = "auto") -> tuple[dict | None, str, str]:
    """Which kite a benchmark's kite processes run: this checkout's src/ ("checkout") or
    the installed package ("installed"), and the environment that runs it.

    auto: the checkout when its compiled fast path is built in place (the code being worked
    on), else the installed kite if there is one (a fresh clone: CI, a wheel install), else
    the checkout's pure-Python code.  Returns (environment, kite's __file__, where), or
    (None, why kite cannot be imported, where).  The environment drops the caller's
    PYTHONPATH and KITE_NO_EXTENSIONS / KITE_REQUIRE_EXTENSIONS / KITE_LOOP: each system
    sets what it runs with.
    """
    env = dict(os.environ)
    for k in ("KITE_NO_EXTENSIONS", "KITE_REQUIRE_EXTENSIONS", "KITE_LOOP"):
        env.pop(k, None)
    env.pop("PYTHONPATH", None)
    src = os.path.join(REPO, "src")
    env_src = dict(env, PYTHONPATH=src)
    probe = [sys.executable, "-c", "import kite, sys; sys.stdout.write(kite.__file__)"]

    def try_env(e):
        r = subprocess.run(probe, env=e, capture_output=True, cwd="/", check=False)
        return (r.stdout.decode(), None) if r.returncode == 0 else (None, r.stderr.decode()[-300:])

    if where == "auto":
        where = "checkout" if glob.glob(os.path.join(src, "kite", "_fastpath*.so")) else "installed"
        if where == "installed" and try_env(env)[0] is None:
            where = "checkout"
    chosen = env_src if where == "checkout" else env
    path, err = try_env(chosen)
    if path is None:
        return None, f"cannot import kite ({where}): {err}", where
    return chosen, path, where


class Ctx:
    """What every system and workload of one run shares: the options, the processes, the
    work directory with the served files and certificates, the origin, and kite's location."""

    def __init__(self, args, procs: Procs, progress: Progress):
        self.args = args
        self.procs = procs
        self.progress = progress
        self.nofile = raise_nofile(getattr(args, "want_nofile", 0))
        self.ports_per_destination = ports_per_destination()
        #: Connections one source address opens to one destination (--ports-per-address).
        self.per_address = (getattr(args, "ports_per_address", None)
                            or self.ports_per_destination - PORT_MARGIN)
        #: Where the origin listens (one port): HOST, and 127.0.0.2, ... when an idle level
        #: needs more connections to it than one port range holds (--idle-levels).
        self.origin_hosts = [HOST]
        self.idle_level: int | None = None  # set while an idle level's instance starts
        self.work = tempfile.mkdtemp(
            prefix="kite-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        )
        self.www = os.path.join(self.work, "www")
        self.logs = os.path.join(self.work, "logs")
        self.upload_tmp = os.path.join(self.www, ".tmp")
        for d in (self.www, self.logs, self.upload_tmp, os.path.join(self.www, "up")):
            os.makedirs(d, exist_ok=True)
        ncpu = os.cpu_count() or 1
        if args.pin and ncpu >= 2:
            self.client_cpus = {ncpu - 1}
            self.system_cpus = set(range(ncpu - 1))
            os.sched_setaffinity(0, self.client_cpus)
        else:
            self.client_cpus = self.system_cpus = None
        self.wrk = shutil.which("wrk")
        self.origin_port = None
        self.origin_kind = None
        self.origin_proc = None
        self.kite_env = None
        self.kite_where = None
        self.kite_from = None
        self.kite_problem = None  # why the kite systems cannot run (locate_kite)

    def logfile(self, name: str) -> str:
        """The log file of the process or tool ``name`` in the work directory."""
        return os.path.join(self.logs, name + ".log")

    # files ---------------------------------------------------------------------------------
    def make_files(self) -> None:
        """The files the origin serves: 1k.bin, check.bin (--check-size), bulk.bin (--bulk-size)."""
        a = self.args
        with open(os.path.join(self.www, "1k.bin"), "wb") as f:
            f.write(os.urandom(1024))
        check = os.urandom(a.check_size)
        self.check_sha = hashlib.sha256(check).hexdigest()
        self.check_path = os.path.join(self.www, "check.bin")
        with open(self.check_path, "wb") as f:
            f.write(check)
        # The bulk file: a 16 MiB random block repeated; nothing on the path can compress it
        # (zlib's window is 32 KiB, and pagekite.py compresses with zlib when ZChunks are on).
        block = os.urandom(min(16 * MiB, a.bulk_size))
        self.bulk_path = os.path.join(self.www, "bulk.bin")
        with open(self.bulk_path, "wb") as f:
            left = a.bulk_size
            while left:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n

    def upload_arrived(self) -> int:
        """Bytes of unfinished uploads the origin has written so far (its body temp files)."""
        total = 0
        for root, _, files in os.walk(self.upload_tmp):
            for name in files:
                try:
                    total += os.path.getsize(os.path.join(root, name))
                except OSError:
                    pass
        return total

    # certificates --------------------------------------------------------------------------
    def make_certs(self) -> None:
        """Self-signed certificates: ``cert``/``key`` for kite's relay and stunnel's server
        (localhost, 127.0.0.1), and ``pk_pem`` (key and certificate in one file) for the
        pagekite.py frontend (PK_FE_NAME).  Made by kite's own code, else by openssl."""
        self.cert, self.key = os.path.join(self.work, "relay.crt"), os.path.join(self.work, "relay.key")
        self._make_https_certs()
        pk_crt, pk_key = os.path.join(self.work, "pk-fe.crt"), os.path.join(self.work, "pk-fe.key")
        self.pk_pem = os.path.join(self.work, "pk-fe.pem")
        gen = ("import sys; from kite.net.tls import generate_self_signed as g; "
               "g(sys.argv[1], sys.argv[2], ['localhost', '127.0.0.1']); "
               f"g(sys.argv[3], sys.argv[4], ['{PK_FE_NAME}'])")
        r = subprocess.run([sys.executable, "-c", gen, self.cert, self.key, pk_crt, pk_key],
                           env=self.kite_env or dict(os.environ), stderr=subprocess.PIPE, cwd="/",
                           check=False)
        if r.returncode != 0:  # kite not importable: openssl makes the same kind of certificate
            for crt, key, cn, san in ((self.cert, self.key, "localhost", "DNS:localhost,IP:127.0.0.1"),
                                      (pk_crt, pk_key, PK_FE_NAME, f"DNS:{PK_FE_NAME}")):
                subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                                "ec_paramgen_curve:P-256", "-nodes", "-days", "30", "-subj", f"/CN={cn}",
                                "-addext", f"subjectAltName={san}", "-keyout", key, "-out", crt],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(self.pk_pem, "w") as out:  # pagekite.py wants key and certificate in one file
            for part in (pk_key, pk_crt):
                with open(part) as f:
                    out.write(f.read())

    def _make_https_certs(self) -> None:
        """For the https systems: ``site_cert``/``site_key``, ECDSA P-256 for TLS_NAME (what
        visitors see from every terminator), and ``tls_relay_cert``/``tls_relay_key`` for the
        kite relay's own name (127.0.0.1 only, so that TLS_NAME is a kite name)."""
        w = self.work
        self.site_cert, self.site_key = os.path.join(w, "site.crt"), os.path.join(w, "site.key")
        self.tls_relay_cert = os.path.join(w, "tls-relay.crt")
        self.tls_relay_key = os.path.join(w, "tls-relay.key")
        for crt, key, cn, san in ((self.site_cert, self.site_key, TLS_NAME, f"DNS:{TLS_NAME}"),
                                  (self.tls_relay_cert, self.tls_relay_key, HOST, f"IP:{HOST}")):
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                            "ec_paramgen_curve:P-256", "-nodes", "-days", "30", "-subj", f"/CN={cn}",
                            "-addext", f"subjectAltName={san}", "-keyout", key, "-out", crt],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    # origin --------------------------------------------------------------------------------
    def origin_hosts_for_level(self) -> list[str]:
        """The origin addresses a system that can spread its origin connections uses for
        the idle level starting now (``idle_level``): as many as its ports need, else HOST."""
        if not self.idle_level:
            return [HOST]
        need = len(source_addresses(self.idle_level, self.per_address))
        return [HOST] if need <= 1 else self.origin_hosts[:need]

    def start_origin(self) -> None:
        """nginx with its own config (--origin auto/nginx), else bench/origin.py."""
        kind = self.args.origin
        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
        if kind in ("auto", "nginx") and nginx:
            self._start_nginx(nginx)
        elif kind == "nginx":
            raise BenchError("--origin nginx: nginx is not installed (apt-get install nginx-light)")
        else:
            if kind == "auto":
                self.progress.note("nginx not installed: using the built-in origin bench/origin.py "
                                   "(Python; it takes CPU from the systems under test)")
            self._start_python_origin()

    def _start_nginx(self, nginx: str) -> None:
        port = free_port()
        conf = os.path.join(self.work, "nginx.conf")
        conns = max(1024, self.nofile - 200)
        a = self.args
        most = min(max(a.idle_conns) if "idle" in a.workloads else 0, MAX_SOURCES * self.per_address)
        need = source_addresses(most, self.per_address)
        self.origin_hosts = [HOST] if need == [HOST] else [HOST, *need]
        listens = "".join(f"        listen {addr}:{port} backlog=4096;\n" for addr in self.origin_hosts)
        with open(conf, "w") as f:
            f.write(f"""# kite relay benchmark origin: one process, files in {self.www}
daemon off;
master_process off;
worker_rlimit_nofile {self.nofile};
error_log {self.logfile('nginx-error')} warn;
pid {self.work}/nginx.pid;
events {{ worker_connections {conns}; multi_accept on; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 3600s;
    keepalive_requests 100000000;
    client_max_body_size 0;
    client_body_buffer_size 1m;
    client_body_temp_path {self.upload_tmp};
    server {{
{listens}        root {self.www};
        location /up/ {{
            dav_methods PUT;
            dav_access user:rw;
        }}
        location = /sink {{
            return 204;
        }}
    }}
}}
""")
        log = self.logfile("nginx")
        self.origin_proc = self.procs.start(
            "origin", [nginx, "-p", self.work, "-e", self.logfile("nginx-error"), "-c", conf],
            log=log, cpus=self.system_cpus)
        wait_for("nginx", lambda: port_open(port), 10, [self.origin_proc], [log, self.logfile("nginx-error")])
        self.origin_port, self.origin_kind = port, "nginx " + (tool_version([nginx, "-v"]) or "?")

    def _start_python_origin(self) -> None:
        port = free_port()
        log = self.logfile("origin")
        self.origin_proc = self.procs.start(
            "origin", [sys.executable, os.path.join(BENCH, "origin.py"), "--port", str(port),
                       "--root", self.www], log=log, cpus=self.system_cpus)
        wait_for("bench/origin.py", log_has(log, "origin listening on"), 15, [self.origin_proc], [log])
        self.origin_port, self.origin_kind = port, "bench/origin.py (Python)"

    # kite ----------------------------------------------------------------------------------
    def locate_kite(self) -> str | None:
        """Which kite the kite systems run (``choose_kite``); returns why kite cannot run,
        or None."""
        src = os.path.join(REPO, "src")
        where = self.args.kite_from
        auto = where == "auto"
        built = glob.glob(os.path.join(src, "kite", "_fastpath*.so"))
        chosen, path, where = choose_kite(where)
        if chosen is None:
            return path
        self.kite_env, self.kite_where = chosen, path
        self.kite_from = where
        if where == "installed" and auto and os.path.isdir(os.path.join(src, "kite")):
            self.progress.note(f"benchmarking the installed kite ({os.path.dirname(path)}), not this "
                               f"checkout's src/, which has no compiled fast path built in place "
                               f"(pip install -e . builds it; or --kite-from checkout)")
        if where == "checkout" and built:
            pyx = os.path.join(src, "kite", "_fastpath.pyx")
            if os.path.exists(pyx) and os.path.getmtime(pyx) > min(os.path.getmtime(b) for b in built):
                self.progress.note("src/kite/_fastpath.pyx is newer than the compiled module: the "
                                   "kite systems run a stale build (pip install -e . rebuilds it)")
        return None

    def kite_git(self) -> str | None:
        """The checkout's commit, with '+dirty' when src/ has uncommitted changes."""
        try:
            head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  check=False).stdout.decode().strip()
            dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "src"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   check=False).stdout.decode().strip()
        except OSError:
            return None
        return (head + ("+dirty" if dirty else "")) or None

    def probe_kite(self, extra_env: dict, code: str) -> str | None:
        """Run ``code`` with the kite systems' Python and environment; its last error line, or None."""
        env = dict(self.kite_env)
        env.update(extra_env)
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, cwd="/",
                           check=False)
        if r.returncode != 0:
            return (r.stderr.decode().strip().splitlines() or ["?"])[-1]
        return None
