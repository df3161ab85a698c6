"""Relay benchmark: kite against a direct connection, a stunnel pair and pagekite.py, on loopback.

Every system is started by this script on 127.0.0.1 in front of the same origin (nginx with
its own config and its files in /dev/shm, sendfile on; ``bench/origin.py`` when nginx is
missing), and visitors reach the origin through it:

  direct          client -> origin
  stunnel         client -> stunnel (client mode) -> TLS -> stunnel (server mode) -> origin
                  (the C reference: a TLS tunnel of the same shape as kite, one TLS connection
                  per visitor connection)
  pagekite        pagekite.py frontend + backend over a TLS tunnel (Debian package pagekite)
  pagekite-tuned  the same with --select_loop_min_ms=0 --max_read_bytes=262144
  kite            kite relay + kite expose over TLS, uvloop, compiled fast path
  kite-py         the same with KITE_NO_EXTENSIONS=1 (pure-Python fast path)
  kite-asyncio    kite on plain asyncio instead of uvloop (compiled fast path)

"relay" below means the process visitors connect to (kite relay, pagekite.py frontend,
stunnel in client mode) and "backend" the one that connects to the origin (kite expose,
pagekite.py backend, stunnel in server mode).  A system that is not installed is skipped
with a note.

Workloads (each started on a fresh instance of the system, after the check):

  check    a file of --check-size down and up: content intact (SHA-256), the visitor served by
           the relay process, the origin reached by the backend process, and at least that
           many bytes counted by the kernel on the tunnel connection(s) (ss -ti), the compiled
           fast path and uvloop mapped in (or not) as the system's name says
  bulk     --bulk-size down and up on one connection, MB/s (10^6 B/s); CPU seconds per GB
           (10^9 B) of the relay and of the backend; a transfer is cut at --bulk-cap seconds
           (then the bytes that arrived are counted: client side down, origin side up)
  c50      wrk, --wrk-conns keep-alive connections fetching a 1 KiB file: req/s, p50, p99
  seq      one keep-alive connection, sequential requests: req/s, p50, p99 per request
  newconn  wrk with "Connection: close": one request per connection, connections/s
  idle     --idle-conns visitor connections that each fetched the 1 KiB file and then stay
           open and idle: RSS per connection of relay + backend, and meanwhile one
           connection's sequential-request latency (p50, p99)

Each figure is the median of --rounds interleaved rounds (every system once per round, in a
rotated order), shown with min..max.  Output: a table on stdout (progress on stderr), JSON
lines (--json) and a PNG chart (--png, needs matplotlib).  Benchmarks are not tests: nothing
here asserts a speed.  Every process started here is stopped by its PID at the end, also on
Ctrl-C or an error.

    python bench/relay_bench.py                  # everything (full sizes; ~15 min on 2 cores)
    python bench/relay_bench.py --quick          # a smoke run: 1 round, 64 MiB, 3 s wrk, 200 idle
    python bench/relay_bench.py --systems kite,stunnel --workloads bulk,c50
    python bench/relay_bench.py --profile        # plus py-spy profiles of kite during c50
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

HOST = "127.0.0.1"
KITE_NAME = "app.bench.kite"
KITE_DOMAIN = "*.bench.kite"
PK_FE_NAME = "fe.bench.kite"  # pagekite.py's --tls_endpoint / --fe_certname
SECRET = "bench-s3cr3t"

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

SYSTEMS = ("direct", "stunnel", "pagekite", "pagekite-tuned", "kite", "kite-py", "kite-asyncio")
WORKLOADS = ("bulk", "c50", "seq", "newconn", "idle")
PAGEKITE_TUNING = ["--select_loop_min_ms=0", "--max_read_bytes=262144"]


class BenchError(Exception):
    """A system did not start or a check failed: reported, and the run goes on."""


# -- small helpers --------------------------------------------------------------------------
def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgKMG]?)(?:i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 64M, 1G, 4096)")
    mult = {"": 1, "k": KiB, "m": MiB, "g": GiB}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def human_size(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def fmt(v) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a == 0:
        return "0"
    return f"{v:.3g}"


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> Optional[float]:
    """utime + stime of the whole process (all its threads, live and exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def cpu_times(pid: int) -> Optional[tuple]:
    """(user, system) CPU seconds of the whole process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def machine_cpu() -> Dict[str, float]:
    """Machine-wide CPU seconds from /proc/stat: busy (user, nice, system, irq, softirq) and
    steal.  Interrupt time is included because the kernel charges part of the loopback TCP
    work done in a process's context to softirq here and to the process's stime there."""
    with open("/proc/stat") as f:
        v = [int(x) / CLK_TCK for x in f.readline().split()[1:9]]
    return {"busy": v[0] + v[1] + v[2] + v[5] + v[6], "steal": v[7] if len(v) > 7 else 0.0}


def own_cpu() -> float:
    """CPU seconds of this script and of its children that have been waited for (wrk, ...)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


class Interference:
    """CPU used during a workload by processes this script did not start (other users of a
    shared machine), and the hypervisor's steal time: so that a noisy round can be seen."""

    def __init__(self, pids):
        self.pids = [p for p in pids if p]
        self.t0 = time.monotonic()
        self.m0 = machine_cpu()
        self.p0 = sum(cpu_seconds(p) or 0.0 for p in self.pids)
        self.o0 = own_cpu()

    def result(self) -> dict:
        m1 = machine_cpu()
        ours = sum(cpu_seconds(p) or 0.0 for p in self.pids) - self.p0 + own_cpu() - self.o0
        return {"wall_s": time.monotonic() - self.t0,
                "foreign_cpu_s": max(0.0, m1["busy"] - self.m0["busy"] - ours),
                "steal_s": m1["steal"] - self.m0["steal"]}


def rss_kib(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def mapped_files(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return f.read()
    except OSError:
        return ""


def tool_version(argv: List[str], pattern: str = r"\d+\.\d+[\w.\-]*") -> Optional[str]:
    try:
        out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=10,
                             stdin=subprocess.DEVNULL).stdout.decode("latin-1")
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(pattern, out)
    return m.group(0) if m else None


# -- progress line --------------------------------------------------------------------------
class Progress:
    """One line on stderr, rewritten in place on a terminal, one line per step otherwise."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.prefix = ""
        self._last = ""
        self._last_time = 0.0
        self.notes: List[str] = []

    def _clock(self) -> str:
        s = int(time.monotonic() - self.t0)
        return f"{s // 60:02d}:{s % 60:02d}"

    def step(self, text: str) -> None:
        self._emit(f"[{self._clock()}] {self.prefix}{text}", force=True)

    def tick(self, text: str) -> None:
        """A transient update inside a step (only on a terminal, at most 4 times a second)."""
        if self.tty and time.monotonic() - self._last_time > 0.25:
            self._emit(f"[{self._clock()}] {self.prefix}{text}")

    def note(self, text: str) -> None:
        """Something the reader of the results must know: printed now and in the report."""
        self.clear()
        self.notes.append(text)
        print(f"# {text}", file=sys.stderr, flush=True)

    def _emit(self, line: str, force: bool = False) -> None:
        if not self.enabled:
            return
        self._last_time = time.monotonic()
        if self.tty:
            cols = shutil.get_terminal_size((120, 20)).columns
            sys.stderr.write("\r\x1b[K" + line[: cols - 1])
            sys.stderr.flush()
            self._last = line
        elif force:
            print(line, file=sys.stderr, flush=True)

    def clear(self) -> None:
        if self.enabled and self.tty and self._last:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._last = ""


# -- processes ------------------------------------------------------------------------------
class Procs:
    """Every process this script starts, stopped by PID (SIGTERM, then SIGKILL)."""

    def __init__(self):
        self.live: Dict[int, tuple] = {}

    def start(self, label: str, argv: List[str], *, env=None, log: Optional[str] = None,
              cpus=None, stdin=subprocess.DEVNULL, stdout=None, cwd=None) -> subprocess.Popen:
        logf = open(log, "ab") if log else subprocess.DEVNULL
        preexec = None
        if cpus:
            cpu_set = set(cpus)

            def preexec():
                os.sched_setaffinity(0, cpu_set)
        try:
            # A new session: Ctrl-C on the terminal reaches this script only, which then stops
            # each child itself, in order.
            p = subprocess.Popen(argv, stdin=stdin, stdout=logf if stdout is None else stdout,
                                 stderr=logf, env=env, cwd=cwd, start_new_session=True,
                                 preexec_fn=preexec)
        finally:
            if log:
                logf.close()
        self.live[p.pid] = (label, p)
        return p

    def stop(self, *procs: subprocess.Popen, timeout: float = 5.0) -> None:
        procs = [p for p in procs if p is not None]
        for p in procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
            self.live.pop(p.pid, None)

    def stop_all(self) -> None:
        self.stop(*[p for _, p in list(self.live.values())])


def tail(path: str, n: int = 12) -> str:
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join("    | " + line for line in lines[-n:])
    except OSError:
        return "    | (no log)"


def wait_for(what: str, predicate: Callable[[], bool], timeout: float,
             procs: List[subprocess.Popen] = (), logs: List[str] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for p in procs:
            if p.poll() is not None:
                raise BenchError(f"{what}: process {p.pid} exited with {p.returncode}\n"
                                 + "\n".join(tail(lg) for lg in logs))
        time.sleep(0.05)
    raise BenchError(f"{what}: not ready after {timeout:g} s\n" + "\n".join(tail(lg) for lg in logs))


def log_has(path: str, pattern: str) -> Callable[[], bool]:
    rx = re.compile(pattern)

    def check() -> bool:
        try:
            with open(path, "rb") as f:
                return rx.search(f.read().decode("utf-8", "replace")) is not None
        except OSError:
            return False
    return check


# -- TCP socket accounting (ss) -------------------------------------------------------------
def tcp_sockets() -> Optional[List[dict]]:
    """Established TCP sockets on 127.0.0.1 with owner PIDs and kernel byte counters."""
    if not shutil.which("ss"):
        return None
    out = subprocess.run(["ss", "-tinpH", "state", "established"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL).stdout.decode("latin-1")
    socks: List[dict] = []
    cur = None
    for line in out.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            parts = line.split()
            # Recv-Q Send-Q Local:Port Peer:Port [users:(...)]
            if len(parts) < 4:
                cur = None
                continue
            cur = {"local": parts[2], "peer": parts[3],
                   "local_port": int(parts[2].rsplit(":", 1)[1]),
                   "peer_port": int(parts[3].rsplit(":", 1)[1]),
                   "pids": {int(p) for p in re.findall(r"pid=(\d+)", line)},
                   "bytes": 0}
            socks.append(cur)
        elif cur is not None:
            sent = re.search(r"\bbytes_sent:(\d+)", line) or re.search(r"\bbytes_acked:(\d+)", line)
            recv = re.search(r"\bbytes_received:(\d+)", line)
            cur["bytes"] = (int(sent.group(1)) if sent else 0) + (int(recv.group(1)) if recv else 0)
            pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
            cur["pids"] |= pids
    return socks


# -- HTTP client pieces (blocking sockets; the harness is the client for bulk and checks) ----
def connect(port: int, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection((HOST, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
             tick: Optional[Callable[[int, int], None]] = None) -> dict:
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
        except socket.timeout:
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
                  deadline: float, tick: Optional[Callable[[int, int], None]] = None) -> dict:
    """PUT ``size`` bytes of ``file_path`` (sent with sendfile); stops at ``deadline``."""
    sock.sendall(b"PUT %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: kite-bench\r\n"
                 b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n"
                 % (path.encode(), host.encode(), size))
    sent = 0
    piece = 8 * MiB
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
    status, headers, _ = read_head(sock, bytearray(), deadline + 30.0)
    if status not in (200, 201, 204):
        raise BenchError(f"PUT {path}: status {status}")
    return {"status": status, "bytes_sent": sent, "complete": True}


def python_seq(port: int, host: str, path: str, duration: float) -> dict:
    """Sequential GETs on one connection for ``duration`` s (used when wrk is missing)."""
    lat = []
    sock = connect(port)
    req = b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path.encode(), host.encode())
    t_end = time.monotonic() + duration
    try:
        while time.monotonic() < t_end:
            t0 = time.perf_counter()
            sock.sendall(req)
            status, headers, rest = read_head(sock, bytearray(), time.monotonic() + 10)
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


# -- wrk ------------------------------------------------------------------------------------
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> Optional[float]:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    return float(m.group(1)) * _UNITS[m.group(2)] if m else None


def parse_wrk(out: str) -> dict:
    res: dict = {"tool": "wrk"}
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else None
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(r"^\s*%s(?:\.000)?%%\s+(\S+)" % pct, out, re.M)
        res[key] = _ms(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", out)
    res["requests"] = int(m.group(1)) if m else None
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
        res["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"),
                                        (int(x) for x in m.groups())))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
        res["non_2xx"] = int(m.group(1))
    res["errors"] = errors
    return res


# -- the run context ------------------------------------------------------------------------
class Ctx:
    def __init__(self, args, procs: Procs, progress: Progress):
        self.args = args
        self.procs = procs
        self.progress = progress
        self.nofile = raise_nofile()
        self.work = tempfile.mkdtemp(prefix="kite-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
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

    def logfile(self, name: str) -> str:
        return os.path.join(self.logs, name + ".log")

    # files ---------------------------------------------------------------------------------
    def make_files(self) -> None:
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

    # origin --------------------------------------------------------------------------------
    def start_origin(self) -> None:
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
        listen {HOST}:{port} backlog=4096;
        root {self.www};
        location /up/ {{
            dav_methods PUT;
            dav_access user:rw;
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
            "origin", [sys.executable, os.path.join(HERE, "origin.py"), "--port", str(port),
                       "--root", self.www], log=log, cpus=self.system_cpus)
        wait_for("bench/origin.py", log_has(log, "origin listening on"), 15, [self.origin_proc], [log])
        self.origin_port, self.origin_kind = port, "bench/origin.py (Python)"

    # kite ----------------------------------------------------------------------------------
    def locate_kite(self) -> Optional[str]:
        """Which kite the kite systems run: this checkout's src/ or the installed package.

        auto: the checkout when its compiled fast path is built in place (the code being
        worked on), else the installed kite if there is one (a fresh clone: CI, a wheel
        install), else the checkout's pure-Python code.  Returns why kite cannot run, or None.
        """
        import glob
        env = dict(os.environ)
        for k in ("KITE_NO_EXTENSIONS", "KITE_REQUIRE_EXTENSIONS", "KITE_LOOP"):
            env.pop(k, None)
        env.pop("PYTHONPATH", None)
        src = os.path.join(REPO, "src")
        env_src = dict(env, PYTHONPATH=src)
        probe = [sys.executable, "-c", "import kite, sys; sys.stdout.write(kite.__file__)"]

        def try_env(e):
            r = subprocess.run(probe, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
            return (r.stdout.decode(), None) if r.returncode == 0 else (None, r.stderr.decode()[-300:])

        where = self.args.kite_from
        built = glob.glob(os.path.join(src, "kite", "_fastpath*.so"))
        auto = where == "auto"
        if auto:
            where = "checkout" if built else "installed"
            if where == "installed" and try_env(env)[0] is None:
                where = "checkout"
        chosen = env_src if where == "checkout" else env
        path, err = try_env(chosen)
        if path is None:
            return f"cannot import kite ({where}): {err}"
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

    def kite_git(self) -> Optional[str]:
        """The checkout's commit, with '+dirty' when src/ has uncommitted changes."""
        try:
            head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout.decode().strip()
            dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "src"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout.decode().strip()
        except OSError:
            return None
        return (head + ("+dirty" if dirty else "")) or None

    def probe_kite(self, extra_env: dict, code: str) -> Optional[str]:
        env = dict(self.kite_env)
        env.update(extra_env)
        r = subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, cwd="/")
        if r.returncode != 0:
            return (r.stderr.decode().strip().splitlines() or ["?"])[-1]
        return None


# -- systems --------------------------------------------------------------------------------
class Running:
    """One started instance of a system: where visitors go and who does the work."""

    def __init__(self, system: "System", port: int, host: str, procs: Dict[str, subprocess.Popen],
                 dialer: Optional[str] = None, tunnel_port: Optional[int] = None,
                 fds_per_conn: int = 1):
        self.system = system
        self.port = port
        self.host = host
        self.procs = procs  # role ("relay", "backend") -> process
        self.dialer = dialer  # the role whose sockets to tunnel_port carry the tunnel
        self.tunnel_port = tunnel_port
        self.fds_per_conn = fds_per_conn  # per visitor connection, in the busiest process

    @property
    def pids(self) -> Dict[str, int]:
        return {role: p.pid for role, p in self.procs.items()}

    def dead(self) -> List[str]:
        return [f"{role} (pid {p.pid}) exited with {p.returncode}"
                for role, p in self.procs.items() if p.poll() is not None]


class System:
    name = ""
    title = ""
    #: role -> [(substring of /proc/PID/maps, expected present?)]
    maps: Dict[str, list] = {}

    def unavailable(self, ctx: Ctx) -> Optional[str]:
        return None

    def start(self, ctx: Ctx, tag: str) -> Running:
        raise NotImplementedError

    def version(self, ctx: Ctx) -> Optional[str]:
        return None


class Direct(System):
    name = "direct"
    title = "client -> origin"

    def start(self, ctx, tag):
        return Running(self, ctx.origin_port, "origin.bench", {})


class Stunnel(System):
    name = "stunnel"
    title = "stunnel client -> TLS -> stunnel server (C reference)"

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
        common = "foreground = yes\npid =\nsyslog = no\ndebug = 3\n"
        with open(server_conf, "w") as f:
            f.write(common + f"[tunnel]\naccept = {HOST}:{s_port}\nconnect = {HOST}:{ctx.origin_port}\n"
                    f"cert = {ctx.cert}\nkey = {ctx.key}\n")
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


class Pagekite(System):
    name = "pagekite"
    title = "pagekite.py frontend + backend, TLS tunnel (stock)"
    tuning: List[str] = []

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
            wait_for("pagekite.py backend", log_has(belog, r"FE=[\d.:]+; proto=http; domain=" + re.escape(KITE_NAME)),
                     30, [fe, be], [felog, belog])
            wait_until_served(run, 30)
        except BaseException:
            ctx.procs.stop(be, fe)
            raise
        return run


class PagekiteTuned(Pagekite):
    name = "pagekite-tuned"
    title = "pagekite.py, " + " ".join(PAGEKITE_TUNING)
    tuning = PAGEKITE_TUNING


class Kite(System):
    name = "kite"
    title = "kite relay + kite expose, TLS, uvloop, compiled fast path"
    loop = "uvloop"
    extra_env = {"KITE_REQUIRE_EXTENSIONS": "1"}
    maps = {"relay": [("_fastpath.cpython", True), ("uvloop", True)],
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
                           env=ctx.kite_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd="/")
        return r.stdout.decode().strip() or None

    def start(self, ctx, tag):
        port = free_port()
        env = dict(ctx.kite_env)
        env.update(self.extra_env)
        rlog, blog = ctx.logfile(f"{self.name}-relay-{tag}"), ctx.logfile(f"{self.name}-expose-{tag}")
        relay = ctx.procs.start("kite-relay", [
            sys.executable, "-m", "kite", "relay", "--listen", f"{HOST}:{port}",
            "--tls-cert", ctx.cert, "--tls-key", ctx.key, "--kite", f"*:{KITE_DOMAIN}:{SECRET}",
            "--drain-timeout", "1", "--loop", self.loop], env=env, log=rlog, cpus=ctx.system_cpus,
            cwd=ctx.work)
        try:
            wait_for("kite relay", log_has(rlog, r"relay listening on "), 20, [relay], [rlog])
            backend = ctx.procs.start("kite-expose", [
                sys.executable, "-m", "kite", "expose", f"http://{HOST}:{ctx.origin_port}", KITE_NAME,
                "--relay", f"{HOST}:{port}", "--ca", ctx.cert, "--secret", SECRET,
                "--loop", self.loop], env=env, log=blog, cpus=ctx.system_cpus, cwd=ctx.work)
        except BaseException:
            ctx.procs.stop(relay)
            raise
        run = Running(self, port, KITE_NAME, {"relay": relay, "backend": backend},
                      dialer="backend", tunnel_port=port)
        try:
            wait_for("kite expose", log_has(blog, r"kite flying"), 20, [relay, backend], [rlog, blog])
            wait_until_served(run, 20)
        except BaseException:
            ctx.procs.stop(backend, relay)
            raise
        return run


class KitePy(Kite):
    name = "kite-py"
    title = "kite, uvloop, KITE_NO_EXTENSIONS=1 (pure-Python fast path)"
    extra_env = {"KITE_NO_EXTENSIONS": "1"}
    maps = {"relay": [("_fastpath.cpython", False), ("uvloop", True)],
            "backend": [("_fastpath.cpython", False), ("uvloop", True)]}


class KiteAsyncio(Kite):
    name = "kite-asyncio"
    title = "kite, plain asyncio, compiled fast path"
    loop = "asyncio"
    maps = {"relay": [("_fastpath.cpython", True), ("uvloop/loop", False)],
            "backend": [("_fastpath.cpython", True), ("uvloop/loop", False)]}


ALL_SYSTEMS = {cls.name: cls for cls in (Direct, Stunnel, Pagekite, PagekiteTuned, Kite, KitePy,
                                          KiteAsyncio)}


def wait_until_served(run: Running, timeout: float) -> None:
    """Poll GET /1k.bin until it answers 200 (a relay answers 503 until its kite is up)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        dead = run.dead()
        if dead:
            raise BenchError(f"{run.system.name}: " + "; ".join(dead))
        try:
            with connect(run.port, timeout=5) as s:
                http_get(s, run.host, "/1k.bin", deadline=time.monotonic() + 5)
                return
        except (OSError, BenchError) as exc:
            last = exc
        time.sleep(0.2)
    raise BenchError(f"{run.system.name}: not serving after {timeout:g} s: {last}")


# -- the check ------------------------------------------------------------------------------
def tunnel_bytes(socks: List[dict], run: Running) -> int:
    pid = run.pids[run.dialer]
    return sum(s["bytes"] for s in socks if pid in s["pids"] and s["peer_port"] == run.tunnel_port)


def check_system(ctx: Ctx, run: Running) -> dict:
    """Content intact both ways, and the bytes really crossed the tunnel (see module doc)."""
    size = ctx.args.check_size
    res: dict = {"size": size, "notes": []}
    before = tcp_sockets() if run.dialer else None
    sock = connect(run.port, timeout=30)
    try:
        my_port = sock.getsockname()[1]
        t0 = time.monotonic()
        got = http_get(sock, run.host, "/check.bin", deadline=t0 + 120, want_hash=True)
        res["down_s"] = time.monotonic() - t0
        if not got["complete"] or got["sha256"] != ctx.check_sha:
            raise BenchError(f"download check: got {got['bytes']} of {size} bytes, sha256 "
                             f"{'matches' if got['sha256'] == ctx.check_sha else 'DIFFERS'}")
        res["down_intact"] = True
        # The visitor connection is still open (keep-alive): look at who holds what.
        after = tcp_sockets()
        if after is None:
            res["notes"].append("ss not installed: tunnel crossing not verified")
        else:
            visitor = [s for s in after if s["local_port"] == run.port and s["peer_port"] == my_port]
            to_origin = [s for s in after if s["peer_port"] == ctx.origin_port]
            if run.procs:
                relay_pid, backend_pid = run.pids["relay"], run.pids["backend"]
                if not any(relay_pid in s["pids"] for s in visitor):
                    raise BenchError(f"the visitor connection is not held by the relay (pid {relay_pid})")
                if not any(backend_pid in s["pids"] for s in to_origin):
                    raise BenchError(f"no connection from the backend (pid {backend_pid}) to the origin")
                delta = tunnel_bytes(after, run) - tunnel_bytes(before, run)
                # Sockets that closed in between would make this undercount, never overcount.
                res["tunnel_bytes_down"] = delta
                if delta < size:
                    raise BenchError(f"only {delta} bytes crossed the tunnel for a {size}-byte download")
            else:
                if not any(os.getpid() in s["pids"] for s in to_origin):
                    raise BenchError("direct: the origin connection is not ours")
                res["notes"].append("direct: no tunnel")
        # Upload the same content; the origin stores it; compare.
        name = f"/up/check-{run.system.name}.bin"
        stored = os.path.join(ctx.www, name.lstrip("/"))
        before_up = tcp_sockets() if run.dialer else None
        t0 = time.monotonic()
        put = http_put_file(sock, run.host, name, ctx.check_path, size, deadline=t0 + 120)
        res["up_s"] = time.monotonic() - t0
        if not put["complete"]:
            raise BenchError("upload check did not complete within 120 s")
        with open(stored, "rb") as f:
            up_sha = hashlib.sha256(f.read()).hexdigest()
        os.unlink(stored)
        if up_sha != ctx.check_sha:
            raise BenchError("upload check: the origin stored different content")
        res["up_intact"] = True
        if run.dialer and before_up is not None:
            delta = tunnel_bytes(tcp_sockets(), run) - tunnel_bytes(before_up, run)
            res["tunnel_bytes_up"] = delta
            if delta < size:
                raise BenchError(f"only {delta} bytes crossed the tunnel for a {size}-byte upload")
    finally:
        sock.close()
    # The variant really is what its name says (compiled fast path, event loop).
    for role, expectations in run.system.maps.items():
        maps = mapped_files(run.pids[role])
        for needle, present in expectations:
            if (needle in maps) != present:
                raise BenchError(f"{role}: {needle!r} is {'not ' if present else ''}mapped "
                                 f"but this system should {'' if present else 'not '}use it")
        so = re.search(r"(\S*_fastpath\.cpython\S*)", maps)
        res.setdefault("fastpath_so", {})[role] = so.group(1) if so else None
        res.setdefault("variant", []).append(
            f"{role}: " + ", ".join(f"{'+' if p else '-'}{n}" for n, p in expectations))
    res["ok"] = True
    return res


# -- workloads ------------------------------------------------------------------------------
def proc_cpu(run: Running) -> Dict[str, Optional[float]]:
    return {role: cpu_seconds(pid) for role, pid in run.pids.items()}


def w_bulk(ctx: Ctx, run: Running) -> dict:
    a = ctx.args
    size = a.bulk_size
    out: dict = {}
    prog = ctx.progress
    origin_pid = ctx.origin_proc.pid
    for direction in ("down", "up"):
        def tick(done, total, d=direction):
            prog.tick(f"bulk {d}: {done / MiB:.0f}/{total / MiB:.0f} MiB")
        cpu0 = proc_cpu(run)
        ocpu0 = cpu_seconds(origin_pid)
        sock = connect(run.port, timeout=30)
        try:
            t0 = time.monotonic()
            deadline = t0 + a.bulk_cap
            if direction == "down":
                r = http_get(sock, run.host, "/bulk.bin", deadline=deadline, tick=tick)
                nbytes, complete = r["bytes"], r["complete"]
                elapsed = time.monotonic() - t0
            else:
                name = f"/up/bulk-{run.system.name}.bin"
                r = http_put_file(sock, run.host, name, ctx.bulk_path, size, deadline=deadline, tick=tick)
                elapsed = time.monotonic() - t0
                complete = r["complete"]
                if r.get("error"):
                    out["note"] = f"bulk up: the connection was closed ({r['error']})"
                if complete:
                    nbytes = size
                    os.unlink(os.path.join(ctx.www, name.lstrip("/")))
                else:
                    nbytes = ctx.upload_arrived()  # what reached the origin by the deadline
        finally:
            sock.close()
        cpu1 = proc_cpu(run)
        ocpu1 = cpu_seconds(origin_pid)
        if not complete:
            time.sleep(0.5)  # let the system notice the cut before the next transfer
        gb = nbytes / 1e9
        out[f"{direction}_MBps"] = nbytes / 1e6 / elapsed
        out[f"{direction}_bytes"] = nbytes
        out[f"{direction}_complete"] = complete
        for role in run.pids:
            if cpu0[role] is not None and cpu1[role] is not None and gb:
                out[f"{role}_cpu_s_per_GB_{direction}"] = (cpu1[role] - cpu0[role]) / gb
        if ocpu0 is not None and ocpu1 is not None and gb:
            out[f"origin_cpu_s_per_GB_{direction}"] = (ocpu1 - ocpu0) / gb
    return out


def run_wrk(ctx: Ctx, run: Running, conns: int, duration: int, *, close: bool = False,
            label: str = "wrk") -> dict:
    url = f"http://{HOST}:{run.port}/1k.bin"
    argv = [ctx.wrk, "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "--timeout", "5s",
            "-H", f"Host: {run.host}"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    log = ctx.logfile("wrk")
    with open(log, "ab") as lf:
        lf.write(("\n$ " + " ".join(argv) + "\n").encode())
    out_path = os.path.join(ctx.work, "wrk.out")
    cpu0 = {role: cpu_times(pid) for role, pid in run.pids.items()}
    with open(out_path, "wb") as out:
        p = ctx.procs.start("wrk", argv, stdout=out, log=log, cpus=ctx.client_cpus)
        t0 = time.monotonic()
        try:
            while p.poll() is None:
                ctx.progress.tick(f"{label}: {time.monotonic() - t0:.0f}/{duration} s")
                try:
                    p.wait(0.25)
                except subprocess.TimeoutExpired:
                    pass
                if time.monotonic() - t0 > duration + 30:
                    raise BenchError("wrk did not finish")
        finally:
            ctx.procs.stop(p)
    with open(out_path) as f:
        text = f.read()
    with open(log, "a") as lf:
        lf.write(text)
    res = parse_wrk(text)
    if res["rps"] is None:
        raise BenchError("wrk printed no Requests/sec:\n" + text[-500:])
    # CPU per request of each process, split user/system (system = syscalls and the kernel's
    # TCP work, which on loopback includes delivering to the receiver).
    for role, pid in run.pids.items():
        c1 = cpu_times(pid)
        if cpu0[role] and c1 and res.get("requests"):
            res[f"{role}_user_us_per_req"] = 1e6 * (c1[0] - cpu0[role][0]) / res["requests"]
            res[f"{role}_sys_us_per_req"] = 1e6 * (c1[1] - cpu0[role][1]) / res["requests"]
    return res


def w_c50(ctx, run):
    return run_wrk(ctx, run, ctx.args.wrk_conns, ctx.args.wrk_duration,
                   label=f"c{ctx.args.wrk_conns} wrk")


def w_seq(ctx, run):
    if ctx.wrk:
        return run_wrk(ctx, run, 1, ctx.args.seq_duration, label="seq wrk -c1")
    return python_seq(run.port, run.host, "/1k.bin", ctx.args.seq_duration)


def w_newconn(ctx, run):
    r = run_wrk(ctx, run, ctx.args.newconn_conns, ctx.args.newconn_duration, close=True,
                label="newconn wrk")
    r["cps"] = r.pop("rps")
    return r


def idle_client_argv(run: Running, n: int, timeout: float) -> List[str]:
    return [sys.executable, os.path.abspath(__file__), "_idle-client", "--port", str(run.port),
            "--host", run.host, "--conns", str(n), "--timeout", str(timeout)]


def w_idle(ctx: Ctx, run: Running, n: int) -> dict:
    """``n`` idle keep-alive visitors (each fetched 1 KiB first): RSS growth, latency meanwhile."""
    a = ctx.args
    out: dict = {"requested": n}
    wait_until_served(run, 10)  # warm: the first stream's one-time allocations are baseline
    time.sleep(0.3)
    rss0 = {role: rss_kib(pid) for role, pid in run.pids.items()}
    log = ctx.logfile("idle-client")
    client = ctx.procs.start("idle-client", idle_client_argv(run, n, a.idle_timeout),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, log=log,
                             cpus=ctx.client_cpus)
    try:
        t0 = time.monotonic()
        line = b""
        while not line:
            ctx.progress.tick(f"idle {n}: opening ({time.monotonic() - t0:.0f} s)")
            r, _, _ = select.select([client.stdout], [], [], 0.25)
            if r:
                line = client.stdout.readline()
                if not line:
                    raise BenchError("idle client exited:\n" + tail(log))
            if time.monotonic() - t0 > a.idle_timeout + 30:
                raise BenchError("idle client hung")
        report = json.loads(line)
        out.update({"ok": report["ok"], "failed": report["failed"], "open_s": report["elapsed"],
                    "errors": report["errors"]})
        time.sleep(1.0)  # settle
        dead = run.dead()
        if dead:
            raise BenchError("; ".join(dead))
        rss1 = {role: rss_kib(pid) for role, pid in run.pids.items()}
        ok = max(1, report["ok"])
        total = 0.0
        for role in run.pids:
            if rss0[role] is not None and rss1[role] is not None:
                per = (rss1[role] - rss0[role]) / ok
                out[f"{role}_KiB_per_conn"] = per
                out[f"{role}_rss_KiB"] = rss1[role]
                total += per
        if run.pids:
            out["KiB_per_conn"] = total
        probe = (run_wrk(ctx, run, 1, a.idle_probe, label=f"idle {n}: latency probe")
                 if ctx.wrk else python_seq(run.port, run.host, "/1k.bin", a.idle_probe))
        out["probe_requests"], out["probe_errors"] = probe.get("requests"), probe.get("errors", 0)
        if probe.get("requests"):
            out["p50_ms"], out["p99_ms"], out["probe_rps"] = probe["p50_ms"], probe["p99_ms"], probe["rps"]
        else:
            out["note"] = f"the latency probe got no answer in {a.idle_probe} s"
    finally:
        try:
            client.stdin.close()
        except OSError:
            pass
        try:
            client.wait(30)
        except subprocess.TimeoutExpired:
            pass
        ctx.procs.stop(client)
    return out


async def _idle_client_main(port: int, host: str, n: int, timeout: float, concurrency: int) -> None:
    import asyncio
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(concurrency)
    keep = []
    errors: collections.Counter = collections.Counter()
    req = b"GET /1k.bin HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode()

    async def one():
        writer = None
        async with sem:
            try:
                reader, writer = await asyncio.open_connection(HOST, port)
                writer.write(req)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise ValueError("status " + head[:20].decode("latin-1"))
                m = re.search(rb"(?i)content-length:\s*(\d+)", head)
                await reader.readexactly(int(m.group(1)))
                keep.append(writer)
                return True
            except asyncio.CancelledError:
                if writer is not None:
                    writer.close()  # not connected in time: do not leave it queued
                raise
            except Exception as exc:  # noqa: BLE001 - counted and reported
                if writer is not None:
                    writer.close()
                errors[type(exc).__name__ + ": " + str(exc)[:60]] += 1
                return False

    t0 = time.monotonic()
    tasks = [loop.create_task(one()) for _ in range(n)]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending)
        errors["not connected within %gs" % timeout] += len(pending)
    ok = sum(1 for t in done if t.result())
    print(json.dumps({"ok": ok, "failed": n - ok, "elapsed": time.monotonic() - t0,
                      "errors": dict(errors)}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the harness closes our stdin
    for w in keep:
        w.close()


def idle_client(argv: List[str]) -> None:
    """Hidden subcommand: hold N idle visitor connections until stdin closes."""
    import asyncio
    p = argparse.ArgumentParser(prog="relay_bench.py _idle-client")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--conns", type=int, required=True)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--concurrency", type=int, default=100)
    a = p.parse_args(argv)
    raise_nofile()
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    asyncio.run(_idle_client_main(a.port, a.host, a.conns, a.timeout, a.concurrency))


# -- results --------------------------------------------------------------------------------
#: (workload, metric key, column title, higher is better)
COLUMNS = {
    "bulk": [("down_MBps", "down MB/s", True), ("up_MBps", "up MB/s", True)],
    "cpu": [("relay_cpu_s_per_GB_down", "relay s/GB down", False),
            ("backend_cpu_s_per_GB_down", "backend s/GB down", False),
            ("relay_cpu_s_per_GB_up", "relay s/GB up", False),
            ("backend_cpu_s_per_GB_up", "backend s/GB up", False)],
    "c50": [("rps", "req/s", True), ("p50_ms", "p50 ms", False), ("p99_ms", "p99 ms", False)],
    "c50cpu": [("relay_user_us_per_req", "relay user", False),
               ("relay_sys_us_per_req", "relay sys", False),
               ("backend_user_us_per_req", "backend user", False),
               ("backend_sys_us_per_req", "backend sys", False)],
    "seq": [("rps", "req/s", True), ("p50_ms", "p50 ms", False), ("p99_ms", "p99 ms", False)],
    "newconn": [("cps", "conns/s", True), ("p50_ms", "p50 ms", False), ("p99_ms", "p99 ms", False)],
    "idle": [("ok", "conns", True), ("KiB_per_conn", "KiB/conn r+b", False),
             ("relay_KiB_per_conn", "relay KiB/c", False),
             ("backend_KiB_per_conn", "backend KiB/c", False),
             ("p50_ms", "p50 ms", False), ("p99_ms", "p99 ms", False)],
}


class Results:
    def __init__(self, path: Optional[str]):
        self.samples: List[dict] = []
        self.path = path
        self.f = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.f = open(path, "w")

    def emit(self, record: dict) -> None:
        if self.f:
            self.f.write(json.dumps(record, sort_keys=True) + "\n")
            self.f.flush()

    def sample(self, rnd: int, system: str, workload: str, metrics: dict) -> None:
        rec = {"type": "sample", "round": rnd, "system": system, "workload": workload,
               "metrics": metrics}
        self.samples.append(rec)
        self.emit(rec)

    def values(self, system: str, workload: str, key: str) -> List[float]:
        return [s["metrics"][key] for s in self.samples
                if s["system"] == system and s["workload"] == workload
                and isinstance(s["metrics"].get(key), (int, float))
                and not isinstance(s["metrics"].get(key), bool)]

    def summary(self, system: str, workload: str, key: str) -> Optional[dict]:
        vals = self.values(system, workload, key)
        if not vals:
            return None
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}

    def median(self, system, workload, key):
        s = self.summary(system, workload, key)
        return s["median"] if s else None

    def close(self):
        if self.f:
            self.f.close()


def workload_sections(args) -> List[tuple]:
    """(section title, workload key in samples, column key) in table order."""
    secs = []
    if "bulk" in args.workloads:
        secs.append((f"bulk: {human_size(args.bulk_size)} down and up, one connection "
                     f"(cut at {args.bulk_cap:g} s)", "bulk", "bulk"))
        secs.append(("CPU seconds per GB (10^9 B) relayed, from the bulk transfers", "bulk", "cpu"))
    if "c50" in args.workloads:
        secs.append((f"c{args.wrk_conns}: wrk, {args.wrk_conns} keep-alive connections, 1 KiB file, "
                     f"{args.wrk_duration} s", "c50", "c50"))
        secs.append((f"c{args.wrk_conns}: CPU microseconds per request (user / system)", "c50", "c50cpu"))
    if "seq" in args.workloads:
        secs.append((f"seq: one connection, sequential 1 KiB requests, {args.seq_duration} s",
                     "seq", "seq"))
    if "newconn" in args.workloads:
        secs.append((f"newconn: one request per connection (Connection: close), "
                     f"{args.newconn_conns} at a time, {args.newconn_duration} s", "newconn", "newconn"))
    if "idle" in args.workloads:
        for n in args.idle_conns:
            secs.append((f"idle {n}: idle keep-alive visitors; RSS growth per connection of relay + "
                         f"backend, latency of one connection meanwhile", f"idle-{n}", "idle"))
    return secs


def print_table(res: Results, systems: List[str], args, out=sys.stdout) -> None:
    w_sys = max(14, max(len(s) for s in systems) + 1)
    for title, workload, colkey in workload_sections(args):
        cols = COLUMNS[colkey]
        rows = []
        for s in systems:
            cells = []
            for key, _, _ in cols:
                sm = res.summary(s, workload, key)
                if sm is None:
                    cells.append("-")
                elif sm["n"] == 1 or sm["min"] == sm["max"]:
                    cells.append(fmt(sm["median"]))
                else:
                    cells.append(f"{fmt(sm['median'])} ({fmt(sm['min'])}..{fmt(sm['max'])})")
            if any(c != "-" for c in cells):
                rows.append((s, cells))
        if not rows:
            continue
        widths = [max(len(c[1]), *(len(r[1][i]) for r in rows)) for i, c in enumerate(cols)]
        print(f"\n{title}", file=out)
        header = f"{'system':<{w_sys}}" + "".join(f"  {c[1]:>{w}}" for c, w in zip(cols, widths))
        print(header, file=out)
        print("-" * len(header), file=out)
        for s, cells in rows:
            print(f"{s:<{w_sys}}" + "".join(f"  {c:>{w}}" for c, w in zip(cells, widths)), file=out)


def targets(res: Results, args) -> List[dict]:
    """The issue's targets for kite (compiled, uvloop), from the medians of this run."""
    out = []

    def ratio(metric_sys, workload, key, ref_sys, need, title, higher=True):
        a, b = res.median(metric_sys, workload, key), res.median(ref_sys, workload, key)
        if a is None or b is None or b == 0:
            return
        r = a / b
        out.append({"target": title, "kite": a, "ref": b, "ratio": r, "need": need,
                    "met": r >= need if higher else r <= need})

    for d in ("down", "up"):
        ratio("kite", "bulk", f"{d}_MBps", "stunnel", 1.0, f"bulk {d} >= 1.0x stunnel")
        ratio("kite", "bulk", f"{d}_MBps", "pagekite-tuned", 10.0, f"bulk {d} >= 10x pagekite-tuned")
    ratio("kite", "c50", "rps", "stunnel", 1.5, f"c{args.wrk_conns} req/s >= 1.5x stunnel")
    ratio("kite", "c50", "rps", "pagekite-tuned", 10.0, f"c{args.wrk_conns} req/s >= 10x pagekite-tuned")
    p99 = res.median("kite", "c50", "p99_ms")
    if p99 is not None:
        out.append({"target": f"c{args.wrk_conns} p99 <= 5 ms", "kite": p99, "need": 5.0, "met": p99 <= 5.0})
    ratio("kite", "newconn", "cps", "stunnel", 2.0, "new conns/s >= 2x stunnel")
    for n in args.idle_conns if "idle" in args.workloads else ():
        kib = res.median("kite", f"idle-{n}", "KiB_per_conn")
        if kib is not None:
            out.append({"target": f"idle {n}: <= 8 KiB per connection (relay + backend)",
                        "kite": kib, "need": 8.0, "met": kib <= 8.0})
    for d in ("down", "up"):
        k = [res.median("kite", "bulk", f"{r}_cpu_s_per_GB_{d}") for r in ("relay", "backend")]
        s = [res.median("stunnel", "bulk", f"{r}_cpu_s_per_GB_{d}") for r in ("relay", "backend")]
        if None not in k and None not in s and sum(s):
            r = sum(k) / sum(s)
            out.append({"target": f"CPU per GB {d} (relay + backend) <= 2x stunnel", "kite": sum(k),
                        "ref": sum(s), "ratio": r, "need": 2.0, "met": r <= 2.0})
    return out


def print_targets(tg: List[dict], out=sys.stdout) -> None:
    if not tg:
        return
    print("\ntargets for kite (medians of this run)", file=out)
    for t in tg:
        detail = (f"kite {fmt(t['kite'])} vs {fmt(t['ref'])} = {t['ratio']:.2f}x (need {fmt(t['need'])}x)"
                  if "ratio" in t else f"kite {fmt(t['kite'])} (need {fmt(t['need'])})")
        print(f"  {'met   ' if t['met'] else 'MISSED'}  {t['target']:<52} {detail}", file=out)


def draw_png(res: Results, systems: List[str], args, path: str, meta: dict) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no chart (pip install matplotlib)"
    panels = []
    if "bulk" in args.workloads:
        panels.append(("bulk throughput, MB/s", "bulk", [("down_MBps", "download"), ("up_MBps", "upload")]))
    if "c50" in args.workloads:
        panels.append((f"requests/s, {args.wrk_conns} keep-alive conns, 1 KiB", "c50", [("rps", "req/s")]))
    if "newconn" in args.workloads:
        panels.append(("new connections/s, one request each", "newconn", [("cps", "conns/s")]))
    if not panels:
        return "no bulk/c50/newconn workload: no chart"
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.8), squeeze=False)
    colors = ["#4878d0", "#ee854a", "#6acc64"]
    for ax, (title, workload, series) in zip(axes[0], panels):
        shown = [s for s in systems if any(res.summary(s, workload, k) for k, _ in series)]
        width = 0.8 / len(series)
        for i, (key, label) in enumerate(series):
            xs, meds, lo, hi = [], [], [], []
            for j, s in enumerate(shown):
                sm = res.summary(s, workload, key)
                if not sm:
                    continue
                xs.append(j + (i - (len(series) - 1) / 2) * width)
                meds.append(sm["median"])
                lo.append(sm["median"] - sm["min"])
                hi.append(sm["max"] - sm["median"])
            bars = ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=label,
                          color=colors[i % len(colors)], error_kw={"elinewidth": 1})
            for b, m, h in zip(bars, meds, hi):
                ax.annotate(fmt(m), (b.get_x() + b.get_width() / 2, m + h), ha="center",
                            va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels(shown, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        bottom, top = ax.get_ylim()
        ax.set_ylim(bottom, top * 4)  # headroom: value labels and the legend stay apart
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8, loc="upper right", ncol=len(series))
    fig.suptitle(f"kite relay benchmark, loopback, {meta['cpus']} CPUs, origin {meta['origin']}: "
                 f"median of {args.rounds} rounds, bars min..max (log scale)", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# -- profiling (py-spy) ---------------------------------------------------------------------
IDLE_LEAVES = ("epoll_wait", "epoll_pwait", "select (", "poll (libc")


def top_frames(raw_path: str, n: int = 15) -> dict:
    """From py-spy's raw output (collapsed stacks, --native): where the busy samples went.

    Frames are merged per function (line numbers dropped).  Samples whose innermost frame is
    the event loop waiting in epoll count as idle and are left out of the percentages."""
    self_c: collections.Counter = collections.Counter()
    total_c: collections.Counter = collections.Counter()
    samples = idle = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            try:
                c = int(count)
            except ValueError:
                continue
            frames = [re.sub(r":\d+\)$", ")", fr) for fr in stack.split(";") if fr]
            if not frames:
                continue
            if frames[-1].startswith(IDLE_LEAVES):
                idle += c
                continue
            samples += c
            self_c[frames[-1]] += c
            for fr in set(frames):
                total_c[fr] += c
    pct = lambda c: round(100.0 * c / samples, 1) if samples else 0.0  # noqa: E731
    return {"busy_samples": samples, "idle_samples": idle,
            "self": [(fr, pct(c)) for fr, c in self_c.most_common(n)],
            # Frames on (nearly) every busy stack are the entry points (main, run_forever): noise.
            "total": [(fr, pct(c)) for fr, c in total_c.most_common()
                      if c < 0.98 * samples][:n]}


def profile_load(ctx: Ctx, run: Running, workload: str, seconds: float, label: str) -> str:
    """Drive ``workload`` for ``seconds`` while the profilers record; return the rate seen."""
    if workload == "c50":
        r = run_wrk(ctx, run, ctx.args.wrk_conns, int(seconds), label=label)
        return f"wrk {fmt(r['rps'])} req/s"
    t_end = time.monotonic() + seconds
    moved = 0
    t0 = time.monotonic()
    while time.monotonic() < t_end:
        ctx.progress.tick(f"{label}: {time.monotonic() - t0:.0f}/{seconds:g} s")
        with connect(run.port, timeout=30) as sock:
            if workload == "bulk-down":
                moved += http_get(sock, run.host, "/bulk.bin", deadline=t_end)["bytes"]
            else:
                name = f"/up/profile-{run.system.name}.bin"
                r = http_put_file(sock, run.host, name, ctx.bulk_path, ctx.args.bulk_size, deadline=t_end)
                if r["complete"]:
                    moved += ctx.args.bulk_size
                    os.unlink(os.path.join(ctx.www, name.lstrip("/")))
                else:
                    moved += ctx.upload_arrived()
    if workload == "bulk-up":
        time.sleep(0.3)  # the cut upload's temp file goes away with the connection
    return f"{moved / 1e6 / (time.monotonic() - t0):.0f} MB/s"


def profile_kite(ctx: Ctx, res: Results, systems: List[str]) -> None:
    """py-spy on relay and backend of each --profile-systems system under --profile-workload."""
    a = ctx.args
    pyspy = shutil.which("py-spy")
    if not pyspy:
        ctx.progress.note("--profile: py-spy not installed (pip install py-spy): skipped")
        return
    if a.profile_workload == "c50" and not ctx.wrk:
        ctx.progress.note("--profile: wrk not installed: skipped")
        return
    os.makedirs(a.profile_dir, exist_ok=True)
    wl = a.profile_workload
    for name in [s for s in a.profile_systems.split(",") if s in systems and s.startswith("kite")]:
        ctx.progress.prefix = f"profile {name} · "
        ctx.progress.step("starting")
        run = ALL_SYSTEMS[name]().start(ctx, "profile")
        try:
            d = a.profile_seconds
            for fmt_name, ext in (("raw", "txt"), ("flamegraph", "svg")):
                spies = {}
                for role, pid in run.pids.items():
                    path = os.path.join(a.profile_dir, f"{name}-{role}-{wl}.{ext}")
                    argv = [pyspy, "record", "--pid", str(pid), "--duration", str(d), "--rate", "250",
                            "--format", fmt_name, "-o", path]
                    if fmt_name == "raw":
                        argv.append("--native")
                    spies[role] = (ctx.procs.start(f"py-spy-{role}", argv,
                                                   log=ctx.logfile(f"py-spy-{role}"),
                                                   cpus=ctx.client_cpus), path)
                time.sleep(0.5)
                rate = profile_load(ctx, run, wl, d, f"{wl} + py-spy {fmt_name}")
                for role, (p, path) in spies.items():
                    try:
                        p.wait(30)
                    except subprocess.TimeoutExpired:
                        pass
                    ctx.procs.stop(p)
                    rec = {"type": "profile", "system": name, "role": role, "format": fmt_name,
                           "workload": wl, "path": path, "rate_under_profiler": rate}
                    if fmt_name == "raw" and os.path.exists(path):
                        rec.update(top_frames(path))
                    elif not os.path.exists(path):
                        rec["error"] = "py-spy wrote nothing:\n" + tail(ctx.logfile(f"py-spy-{role}"))
                    res.emit(rec)
                    if fmt_name == "raw":
                        print_profile(rec)
        finally:
            ctx.procs.stop(*run.procs.values())


def print_profile(rec: dict, out=sys.stdout) -> None:
    busy, idle = rec.get("busy_samples", 0), rec.get("idle_samples", 0)
    print(f"\npy-spy: {rec['system']} {rec['role']} during {rec['workload']}, {rec['path']}: {busy} busy "
          f"samples, {idle} waiting in epoll ({100 * idle / max(1, busy + idle):.0f} %); "
          f"{rec['rate_under_profiler']} under the profiler", file=out)
    if "error" in rec:
        print("  " + rec["error"], file=out)
        return
    print("  % of busy samples: self (innermost frame)        | total (anywhere on the stack; "
          "frames on every stack left out)", file=out)
    for (f1, p1), (f2, p2) in zip(rec["self"], rec["total"]):
        print(f"  {p1:5.1f}  {f1[:48]:<48} | {p2:5.1f}  {f2[:60]}", file=out)


# -- main -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="relay_bench.py", description=__doc__.split("\n\n")[0],
        epilog="Systems: " + ", ".join(SYSTEMS) + ".  Workloads: " + ", ".join(WORKLOADS)
               + " (the check always runs first).  Sizes take K, M, G suffixes (binary).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated (default: all)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round, 64 MiB bulk, 3 s wrk, 2 s seq/newconn, 200 idle conns")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick 1)")
    p.add_argument("--bulk-size", type=parse_size, help="bulk transfer size (default 1G; --quick 64M)")
    p.add_argument("--bulk-cap", type=float, help="max seconds per bulk transfer (default 10; --quick 8)")
    p.add_argument("--check-size", type=parse_size, help="size of the check file (default 1M; --quick 256K)")
    p.add_argument("--wrk-conns", type=int, default=50, help="connections for the c50 workload")
    p.add_argument("--wrk-duration", type=int, help="seconds of c50 (default 5; --quick 3)")
    p.add_argument("--seq-duration", type=int, help="seconds of seq (default 3; --quick 2)")
    p.add_argument("--newconn-duration", type=int, help="seconds of newconn (default 3; --quick 2)")
    p.add_argument("--newconn-conns", type=int, default=16, help="concurrent connections in newconn")
    p.add_argument("--idle-conns", help="comma-separated idle visitor counts (default 1000,10000; --quick 200)")
    p.add_argument("--idle-timeout", type=float, help="seconds to open the idle connections (default 30; --quick 20); a level that would take more than twice that at the rate of the previous level is skipped")
    p.add_argument("--idle-probe", type=int, help="seconds of the latency probe during idle (default 2)")
    p.add_argument("--origin", choices=["auto", "nginx", "python"], default="auto",
                   help="origin server (auto: nginx if installed, else bench/origin.py)")
    p.add_argument("--kite-from", choices=["auto", "installed", "checkout"], default="auto",
                   help="which kite to run: this checkout's src/ or the installed package (auto: "
                        "the checkout if its fast path is compiled in place, else the installed one)")
    p.add_argument("--pin", action="store_true",
                   help="pin the clients (wrk, this script) to the last CPU and the systems + origin "
                        "to the others (default: no pinning; all share all CPUs)")
    p.add_argument("--json", help="JSON lines output (default bench/results/relay.jsonl; '' = none)")
    p.add_argument("--png", help="chart (default bench/results/relay.png; '' = none)")
    p.add_argument("--profile", action="store_true",
                   help="after the rounds, py-spy profiles (--native raw stacks + flame graph SVG) of "
                        "relay and backend under --profile-workload")
    p.add_argument("--profile-workload", choices=["c50", "bulk-down", "bulk-up"], default="c50")
    p.add_argument("--profile-systems", default="kite", help="kite systems to profile (comma-separated)")
    p.add_argument("--profile-dir", default=os.path.join(RESULTS, "profile"))
    p.add_argument("--profile-seconds", type=int, default=8)
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return p


def resolve_args(args) -> None:
    q = args.quick
    defaults = {"rounds": (3, 1), "bulk_size": (1 * GiB, 64 * MiB), "bulk_cap": (10.0, 8.0),
                "check_size": (1 * MiB, 256 * KiB), "wrk_duration": (5, 3), "seq_duration": (3, 2),
                "newconn_duration": (3, 2), "idle_timeout": (30.0, 20.0), "idle_probe": (2, 2)}
    for k, (full, quick) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if q else full)
    args.idle_conns = [int(x) for x in (args.idle_conns or ("200" if q else "1000,10000")).split(",") if x]
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for s in args.systems:
        if s not in SYSTEMS:
            raise SystemExit(f"relay_bench.py: unknown system {s!r}; choose from {', '.join(SYSTEMS)}")
    for w in args.workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"relay_bench.py: unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    if args.json is None:
        args.json = os.path.join(RESULTS, "relay.jsonl")
    if args.png is None:
        args.png = os.path.join(RESULTS, "relay.png")


def run_rounds(ctx: Ctx, res: Results, systems: List[str]) -> None:
    a = ctx.args
    prog = ctx.progress
    plain = [w for w in ("bulk", "c50", "seq", "newconn") if w in a.workloads]
    funcs = {"bulk": w_bulk, "c50": w_c50, "seq": w_seq, "newconn": w_newconn}
    for rnd in range(1, a.rounds + 1):
        k = (rnd - 1) % len(systems)
        order = systems[k:] + systems[:k]  # rotated: no system always goes first
        for i, name in enumerate(order, 1):
            system = ALL_SYSTEMS[name]()
            prog.prefix = f"round {rnd}/{a.rounds} · {name} ({i}/{len(order)}) · "
            prog.step("starting")
            run = None
            try:
                run = system.start(ctx, f"r{rnd}")
                prog.step("check")
                chk = check_system(ctx, run)
                res.emit({"type": "check", "round": rnd, "system": name, **chk})
                for w in plain:
                    if w in ("c50", "newconn") and not ctx.wrk:
                        continue
                    prog.step(w)
                    watch = Interference(list(run.pids.values()) + [ctx.origin_proc.pid])
                    try:
                        m = funcs[w](ctx, run)
                        m.update(watch.result())
                    except (BenchError, OSError) as exc:
                        # OSError: the system reset or refused a connection mid-workload.
                        prog.note(f"{name} round {rnd} {w}: {exc}")
                        res.emit({"type": "error", "round": rnd, "system": name, "workload": w,
                                  "error": str(exc)})
                        continue
                    dead = run.dead()
                    if dead:
                        raise BenchError(f"during {w}: " + "; ".join(dead))
                    res.sample(rnd, name, w, m)
            except BenchError as exc:
                prog.note(f"{name} round {rnd}: {exc}")
                res.emit({"type": "error", "round": rnd, "system": name, "error": str(exc)})
                if run is not None:
                    ctx.procs.stop(*run.procs.values())
                continue
            finally:
                if run is not None:
                    ctx.procs.stop(*run.procs.values())
            if "idle" in a.workloads:
                open_rate = None  # connections/s reached at the previous level
                for n in a.idle_conns:
                    # A fresh instance per level: memory freed by earlier workloads is not
                    # available for reuse, so the RSS growth is what the connections cost.
                    if name == "stunnel":
                        # stunnel refuses clients beyond max_clients = 125/256 of its
                        # RLIMIT_NOFILE (2 descriptors per client, plus headroom); keep room
                        # for the latency probe.
                        limit = ctx.nofile * 125 // 256 - 50
                    else:
                        limit = ctx.nofile - 200
                    n_eff = min(n, limit)
                    if open_rate and n_eff / open_rate > 2 * a.idle_timeout:
                        msg = (f"skipped: {name} opened connections at {open_rate:.0f}/s at the "
                               f"previous level; {n_eff} would take {n_eff / open_rate:.0f} s")
                        prog.note(f"{name} round {rnd} idle {n}: {msg}")
                        res.emit({"type": "skip", "round": rnd, "system": name,
                                  "workload": f"idle-{n}", "reason": msg})
                        continue
                    prog.step(f"idle {n}: starting a fresh instance")
                    run = None
                    try:
                        run = system.start(ctx, f"r{rnd}-idle{n}")
                        watch = Interference(list(run.pids.values()) + [ctx.origin_proc.pid])
                        m = w_idle(ctx, run, n_eff)
                        m.update(watch.result())
                        if m.get("ok") and m.get("open_s"):
                            open_rate = m["ok"] / m["open_s"]
                        if n_eff < n:
                            m["note"] = (f"capped at {n_eff}: stunnel's max_clients is 125/256 of "
                                         f"RLIMIT_NOFILE ({ctx.nofile}, the hard limit here)"
                                         + ("; " + m["note"] if "note" in m else ""))
                        res.sample(rnd, name, f"idle-{n}", m)
                    except BenchError as exc:
                        prog.note(f"{name} round {rnd} idle {n}: {exc}")
                        res.emit({"type": "error", "round": rnd, "system": name,
                                  "workload": f"idle-{n}", "error": str(exc)})
                    finally:
                        if run is not None:
                            ctx.procs.stop(*run.procs.values())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_idle-client"]:
        idle_client(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    resolve_args(args)
    progress = Progress(not args.no_progress)
    procs = Procs()

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    ctx = None
    res = Results(args.json or None)
    t_start = time.monotonic()
    try:
        ctx = Ctx(args, procs, progress)
        progress.step("preparing files and certificates")
        ctx.make_files()
        ctx.kite_problem = ctx.locate_kite()
        ctx.cert, ctx.key = os.path.join(ctx.work, "relay.crt"), os.path.join(ctx.work, "relay.key")
        pk_crt, pk_key = os.path.join(ctx.work, "pk-fe.crt"), os.path.join(ctx.work, "pk-fe.key")
        ctx.pk_pem = os.path.join(ctx.work, "pk-fe.pem")
        gen = ("import sys; from kite.tls import generate_self_signed as g; "
               "g(sys.argv[1], sys.argv[2], ['localhost', '127.0.0.1']); "
               f"g(sys.argv[3], sys.argv[4], ['{PK_FE_NAME}'])")
        r = subprocess.run([sys.executable, "-c", gen, ctx.cert, ctx.key, pk_crt, pk_key],
                           env=ctx.kite_env or dict(os.environ), stderr=subprocess.PIPE, cwd="/")
        if r.returncode != 0:  # kite not importable: openssl makes the same kind of certificate
            for crt, key, cn, san in ((ctx.cert, ctx.key, "localhost", "DNS:localhost,IP:127.0.0.1"),
                                      (pk_crt, pk_key, PK_FE_NAME, f"DNS:{PK_FE_NAME}")):
                subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                                "ec_paramgen_curve:P-256", "-nodes", "-days", "30", "-subj", f"/CN={cn}",
                                "-addext", f"subjectAltName={san}", "-keyout", key, "-out", crt],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(ctx.pk_pem, "w") as out:  # pagekite.py wants key and certificate in one file
            for part in (pk_key, pk_crt):
                with open(part) as f:
                    out.write(f.read())

        systems = []
        skipped = {}
        for name in args.systems:
            why = ALL_SYSTEMS[name]().unavailable(ctx)
            if why:
                skipped[name] = why
                progress.note(f"skipping {name}: {why}")
            else:
                systems.append(name)
        if not ctx.wrk and any(w in args.workloads for w in ("c50", "newconn")):
            progress.note("wrk not installed (apt-get install wrk): c50 and newconn skipped; "
                          "seq and the idle probe use a Python client")
        progress.step("starting the origin")
        ctx.start_origin()
        meta = {
            "type": "meta", "time": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([os.path.relpath(sys.argv[0]) if sys.argv[0] else "relay_bench.py"] + argv),
            "cpus": os.cpu_count(), "cpu_model": cpu_model(), "kernel": platform.release(),
            "python": platform.python_version(), "origin": ctx.origin_kind,
            "kite": ctx.kite_where, "kite_from": ctx.kite_from,
            "kite_git": ctx.kite_git() if ctx.kite_from == "checkout" else None, "wrk": tool_version(["wrk", "-v"]) if ctx.wrk else None,
            "pinning": (f"clients on CPU {sorted(ctx.client_cpus)}, systems on {sorted(ctx.system_cpus)}"
                        if ctx.client_cpus else "none: clients, systems and origin share all CPUs"),
            "rlimit_nofile": ctx.nofile, "work_dir": ctx.work,
            "loadavg_at_start": open("/proc/loadavg").read().split()[:3], "systems": systems, "skipped": skipped,
            "titles": {s: ALL_SYSTEMS[s].title for s in systems},
            "versions": {s: ALL_SYSTEMS[s]().version(ctx) for s in systems},
            "workloads": args.workloads,
            "sizes": {"rounds": args.rounds, "bulk_size": args.bulk_size, "bulk_cap_s": args.bulk_cap,
                      "check_size": args.check_size, "wrk_conns": args.wrk_conns,
                      "wrk_duration_s": args.wrk_duration, "seq_duration_s": args.seq_duration,
                      "newconn_conns": args.newconn_conns, "newconn_duration_s": args.newconn_duration,
                      "idle_conns": args.idle_conns, "idle_probe_s": args.idle_probe},
            "units": {"MBps": "10^6 bytes/s", "s_per_GB": "CPU seconds (user+sys) per 10^9 bytes",
                      "KiB_per_conn": "VmRSS growth / connections", "ms": "milliseconds"},
        }
        res.emit(meta)
        run_rounds(ctx, res, systems)
        progress.prefix = ""
        progress.clear()
        print(f"kite relay benchmark: {meta['time']}, {meta['cpus']} CPUs ({meta['cpu_model']}), "
              f"Python {meta['python']}, origin {meta['origin']}")
        print(f"kite: {meta['kite']} ({meta['kite_from']}"
              + (f", git {meta['kite_git']}" if meta["kite_git"] else "") + f"); pinning: {meta['pinning']}")
        for s in systems:
            print(f"  {s:<15} {ALL_SYSTEMS[s].title}" + (f" [{meta['versions'][s]}]" if meta['versions'][s] else ""))
        for s, why in skipped.items():
            print(f"  {s:<15} skipped: {why}")
        print(f"median of {args.rounds} interleaved round(s), (min..max); MB = 10^6 bytes, GB = 10^9 bytes")
        print_table(res, systems, args)
        for s in res.samples:
            if s["workload"] == "bulk":
                for d in ("down", "up"):
                    if s["metrics"].get(f"{d}_complete") is False:
                        print(f"  note: {s['system']} round {s['round']}: bulk {d} cut at "
                              f"{args.bulk_cap:g} s after {s['metrics'][f'{d}_bytes'] / MiB:.1f} MiB")
            busy = s["metrics"].get("foreign_cpu_s", 0.0) + s["metrics"].get("steal_s", 0.0)
            if busy > 0.25 * s["metrics"].get("wall_s", 1e9):
                print(f"  note: {s['system']} round {s['round']} {s['workload']}: the machine was "
                      f"shared: other processes used {s['metrics']['foreign_cpu_s']:.1f} CPU-s and "
                      f"the hypervisor stole {s['metrics']['steal_s']:.1f} s in "
                      f"{s['metrics']['wall_s']:.1f} s")
            elif (s["workload"] in ("c50", "seq", "newconn") or s["workload"].startswith("idle")) \
                    and s["metrics"].get("steal_s", 0.0) > 0.02 * s["metrics"].get("wall_s", 1e9):
                # Steal comes in pauses of milliseconds: every connection waits them out, so a
                # few percent of stolen time shows in the p99 (seen: 2-3 % -> 9-17 ms at c50).
                print(f"  note: {s['system']} round {s['round']} {s['workload']}: the hypervisor "
                      f"stole {s['metrics']['steal_s']:.2f} s of {s['metrics']['wall_s']:.1f} s: "
                      f"its pauses are in the latency tail")
            if "note" in s["metrics"]:
                print(f"  note: {s['system']} round {s['round']} {s['workload']}: {s['metrics']['note']}")
            if s["metrics"].get("failed"):
                print(f"  note: {s['system']} round {s['round']} {s['workload']}: {s['metrics']['failed']} "
                      f"connections failed: {s['metrics'].get('errors')}")
            if s["metrics"].get("errors") and s["workload"] in ("c50", "seq", "newconn"):
                print(f"  note: {s['system']} round {s['round']} {s['workload']}: "
                      f"{s['metrics']['errors']} wrk errors {s['metrics'].get('socket_errors', '')}")
        for text in progress.notes:
            print(f"  note: {text.splitlines()[0]}")
        tg = targets(res, args)
        print_targets(tg)
        for sys_name in systems:
            for w, cols in (("bulk", COLUMNS["bulk"] + COLUMNS["cpu"]),
                            ("c50", COLUMNS["c50"] + COLUMNS["c50cpu"]),
                            ("seq", COLUMNS["seq"]), ("newconn", COLUMNS["newconn"])):
                for key, _, _ in cols:
                    sm = res.summary(sys_name, w, key)
                    if sm:
                        res.emit({"type": "summary", "system": sys_name, "workload": w, "metric": key, **sm})
            for n in args.idle_conns:
                for key, _, _ in COLUMNS["idle"]:
                    sm = res.summary(sys_name, f"idle-{n}", key)
                    if sm:
                        res.emit({"type": "summary", "system": sys_name, "workload": f"idle-{n}",
                                  "metric": key, **sm})
        for t in tg:
            res.emit({"type": "target", **t})
        if args.profile:
            profile_kite(ctx, res, systems)
            progress.clear()
        if args.png:
            why = draw_png(res, systems, args, args.png, meta)
            print(f"\nchart: {args.png}" if why is None else f"\nchart skipped: {why}")
        if args.json:
            print(f"JSON lines: {args.json}")
        print(f"total time {time.monotonic() - t_start:.0f} s")
        return 0
    except KeyboardInterrupt:
        progress.clear()
        print("interrupted: stopping everything", file=sys.stderr)
        return 130
    except BenchError as exc:
        progress.clear()
        print(f"relay_bench.py: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # cleanup must not be cut short
        procs.stop_all()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        res.close()
        if ctx is not None:
            if args.keep:
                print(f"work directory kept: {ctx.work}", file=sys.stderr)
            else:
                shutil.rmtree(ctx.work, ignore_errors=True)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


if __name__ == "__main__":
    sys.exit(main())
