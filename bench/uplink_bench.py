#!/usr/bin/env python3
"""Latency under load on a slow uplink: kite against pagekite.py, in one run.

The case a home server meets every day: the backend's uplink is slow (10 Mbit/s here), one
visitor downloads a big file, and another visitor asks for a small page meanwhile.  Both
share the one tunnel, so the page's response queues behind whatever the download has in
flight: the flow-control window decides how long the page waits.

Two ways to make the uplink (``--link``):

``netns`` (the default where ``ip netns`` works, i.e. as root): the backend and its origin
run in a network namespace of their own, joined by a veth pair to a second namespace; the
backend's egress on that veth is an ``htb`` class at ``--rate`` with a short ``pfifo`` queue
(``--queue`` packets; GSO capped at one MTU so the queue counts real packets) - a real
kernel bottleneck, so the backend's tunnel socket meets what a slow uplink does to it
(its send queue, TCP_NOTSENT_LOWAT, ``ss -tinm``).  This kernel has no netem, so the delay
stays in user space: a delay proxy holds a listening socket in the second namespace and
forwards to the relay on 127.0.0.1, each piece ``--delay`` late, both ways.  The proxy
ends the backend's TCP connection, so the kernel sees the veth's round trip and the delay
shows in kite's acknowledgements (and pagekite.py's), not in TCP's.  Private addresses
(10.237.N.1-2/30) exist only on that veth, inside the two namespaces; both are deleted by
name on exit, and stale ones of dead runs at start.

``shaper``: all in user space on loopback: the backend dials a shaper that forwards to the
relay, passing backend->relay bytes at ``--rate`` with ``--delay`` each way (relay->backend
bytes are only delayed).  One shared FIFO per connection, like a modem's buffer.

Per system and round: a probe does sequential 1 KiB GETs on one keep-alive connection for
``--seconds`` with the link idle, then again while a second visitor downloads; medians over
``--rounds`` interleaved rounds.

    python bench/uplink_bench.py                      # kite, pagekite, pagekite-tuned
    python bench/uplink_bench.py --rate 100 --delay 50 --systems kite,pagekite
    python bench/uplink_bench.py --link shaper        # no namespaces (not root)
    python bench/uplink_bench.py --ss ss.log          # the backend's sockets, every 0.5 s
    python bench/uplink_bench.py --base /tmp/old/src  # and kite from another commit's src/

It measures, it does not assert (bench/README.md).  Loopback and its own namespaces only.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from relaybench.common import HOST, REPO, BenchError  # noqa: E402 - after the path above
from relaybench.procs import Procs, free_port, log_has, wait_for  # noqa: E402

KITE = "app.uplink.kite"
SECRET = "uplink-s3cr3t"
PK_FE = "fe.uplink.kite"
PK_TUNING = ["--select_loop_min_ms=0", "--max_read_bytes=262144"]


# -- the shaper (run as a subprocess: python uplink_bench.py --shaper PORT TARGET RATE DELAY) --
async def _shape(reader, writer, rate, delay, pieces=64):
    """Copy reader -> writer, at ``rate`` bytes/s if rate, each piece ``delay`` s late, with
    at most ``pieces`` pieces on their way (they must cover ``delay`` of the link: a
    smaller bound makes the proxy a bottleneck of its own, queueing in its socket)."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=pieces)

    async def sender():
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    task = asyncio.ensure_future(sender())
    next_free = time.monotonic()
    try:
        while True:
            data = await reader.read(16384 if rate else 65536)
            if not data:
                break
            if rate:
                next_free = max(next_free, time.monotonic()) + len(data) / rate
                wait = next_free - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            await queue.put((time.monotonic() + delay, data))
    except ConnectionError:
        pass
    await queue.put((0.0, None))
    await task


def shaper_main(port, target, rate, delay):
    async def handle(r1, w1):
        try:
            r2, w2 = await asyncio.open_connection(HOST, target)
        except OSError:
            w1.close()
            return
        await asyncio.gather(_shape(r1, w2, rate, delay), _shape(r2, w1, 0.0, delay),
                             return_exceptions=True)

    async def main():
        server = await asyncio.start_server(handle, HOST, port)
        print("shaper listening", file=sys.stderr, flush=True)
        await server.serve_forever()

    asyncio.run(main())


# -- the delay proxy of --link netns (python uplink_bench.py --delayer NS ADDR PORT TARGET DELAY)
CLONE_NEWNET = 0x40000000


def _setns(fd):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def listen_in(ns, addr, port):
    """A listening socket on ``addr:port`` in namespace ``ns``; this thread returns to its own
    namespace afterwards (a socket keeps the namespace it was made in)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(there)
        try:
            sock = socket.create_server((addr, port))
        finally:
            _setns(own)
    finally:
        os.close(there)
        os.close(own)
    return sock


def delayer_main(ns, addr, port, target, delay):
    """Forward ``ns``'s ``addr:port`` to the relay on HOST:target, ``delay`` s late each way."""
    async def handle(r1, w1):
        try:
            r2, w2 = await asyncio.open_connection(HOST, target)
        except OSError:
            w1.close()
            return
        # Pieces are whatever one read returns (a few segments at 100 Mbit/s): room for
        # far more than a delay's worth, which the htb upstream bounds anyway.
        await asyncio.gather(_shape(r1, w2, 0.0, delay, 8192), _shape(r2, w1, 0.0, delay, 8192),
                             return_exceptions=True)

    async def main():
        server = await asyncio.start_server(handle, sock=listen_in(ns, addr, port))
        print("delayer listening", file=sys.stderr, flush=True)
        await server.serve_forever()

    asyncio.run(main())


# -- --link netns: two namespaces, a veth pair, htb + pfifo on the backend's egress -----------
NS_PREFIX = "kub"  # namespaces kub<PID>b (backend) and kub<PID>g (gateway), veth ends alike


def ip(*argv, check=True):
    return subprocess.run(["ip", *argv], check=check, capture_output=True, text=True)


class Netns:
    """The backend's namespace, the gateway's, the veth between them and the qdiscs.

    Names carry this process's PID: :meth:`clean_stale` deletes those of dead runs only, so
    two runs never delete each other's namespaces."""

    def __init__(self, rate_bytes, queue):
        pid = os.getpid()
        self.be, self.gw = f"{NS_PREFIX}{pid}b", f"{NS_PREFIX}{pid}g"
        n = pid % 250 + 1
        self.gw_addr, self.be_addr = f"10.237.{n}.1", f"10.237.{n}.2"
        self.rate_bits = int(rate_bytes * 8)
        self.queue = queue
        self.made = False

    @staticmethod
    def clean_stale():
        out = ip("netns", "list", check=False).stdout
        for line in out.splitlines():
            m = re.match(rf"({NS_PREFIX}(\d+)[bg])\b", line)
            if m and not os.path.exists(f"/proc/{m.group(2)}"):
                ip("netns", "delete", m.group(1), check=False)

    def up(self):
        """Make the namespaces (BenchError if this machine does not allow it)."""
        self.clean_stale()
        be, gw = self.be, self.gw
        self.made = True
        try:
            ip("netns", "add", be)
            ip("netns", "add", gw)
            ip("link", "add", be, "netns", be, "type", "veth", "peer", "name", gw, "netns", gw)
            ip("-n", be, "addr", "add", f"{self.be_addr}/30", "dev", be)
            ip("-n", gw, "addr", "add", f"{self.gw_addr}/30", "dev", gw)
            # One MTU per GSO packet: the pfifo's limit counts packets of the wire's size.
            ip("-n", be, "link", "set", "dev", be, "gso_max_size", "1500", check=False)
            for ns, dev in ((be, "lo"), (be, be), (gw, "lo"), (gw, gw)):
                ip("-n", ns, "link", "set", dev, "up")
            tc = ["tc", "-n", be]
            for argv in (["qdisc", "add", "dev", be, "root", "handle", "1:", "htb", "default", "1"],
                         ["class", "add", "dev", be, "parent", "1:", "classid", "1:1", "htb",
                          "rate", f"{self.rate_bits}bit", "ceil", f"{self.rate_bits}bit"],
                         ["qdisc", "add", "dev", be, "parent", "1:1", "handle", "10:", "pfifo",
                          "limit", str(self.queue)]):
                subprocess.run(tc + argv, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            self.down()
            detail = getattr(exc, "stderr", "") or str(exc)
            raise BenchError(f"--link netns: {detail.strip()}") from None

    def down(self):
        if self.made:
            self.made = False
            for ns in (self.be, self.gw):
                ip("netns", "delete", ns, check=False)

    def run_in(self, argv):
        """``argv`` run in the backend's namespace (ip netns exec keeps the PID)."""
        return ["ip", "netns", "exec", self.be, *argv]

    def qdisc_stats(self):
        return subprocess.run(["tc", "-n", self.be, "-s", "qdisc", "show", "dev", self.be],
                              capture_output=True, text=True).stdout


# -- processes (relaybench.procs; killed with SIGKILL, nothing to drain) -----------------------
def start(procs, ctx, name, argv, env=None):
    """Start ``argv`` in the work directory, its output in WORK/NAME.log (``p.log``)."""
    log = os.path.join(ctx["work"], name + ".log")
    p = procs.start(name, argv, env=env, log=log, cwd=ctx["work"])
    p.log = log
    return p


def wait_log(p, pattern, timeout=30.0):
    """Until ``pattern`` is in the log of ``p``; BenchError if ``p`` exits or time runs out."""
    wait_for(os.path.basename(p.log), log_has(p.log, pattern), timeout, [p], [p.log])


def start_system(name, procs, ctx):
    """Start relay + shaper (or delayer) + backend of ``name``; returns (processes, relay port)."""
    relay_port, shaper_port = free_port(), free_port()
    net = ctx["netns"]
    wrap = net.run_in if net else list
    relay_addr = net.gw_addr if net else HOST
    kite = name in ("kite", "kite-base")
    if kite:
        src = ctx["base_src"] if name == "kite-base" else os.path.join(REPO, "src")
        env = dict(os.environ, PYTHONPATH=src)
        relay = start(procs, ctx, "kite-relay", [
            sys.executable, "-m", "kite", "relay", "--listen", f"{HOST}:{relay_port}",
            "--tls-cert", ctx["cert"], "--tls-key", ctx["key"], "--kite", f"*:*.uplink.kite:{SECRET}"],
            env=env)
        wait_log(relay, "relay listening on ")
    else:
        tuning = PK_TUNING if name == "pagekite-tuned" else []
        relay = start(procs, ctx, "pagekite-fe", [
            ctx["pagekite"], "--clean", "--noproxy", "--isfrontend", f"--host={HOST}",
            f"--ports={relay_port}", "--protos=http", f"--tls_endpoint={PK_FE}:{ctx['pk_pem']}",
            f"--domain=*:{KITE}:{SECRET}", "--logfile=stdio"] + tuning)
        wait_log(relay, "listen=")
    if net:
        shaper = start(procs, ctx, "delayer", [
            sys.executable, os.path.abspath(__file__), "--delayer", net.gw, net.gw_addr,
            str(shaper_port), str(relay_port), str(ctx["delay"])])
        wait_log(shaper, "delayer listening")
    else:
        shaper = start(procs, ctx, "shaper", [
            sys.executable, os.path.abspath(__file__), "--shaper", str(shaper_port),
            str(relay_port), str(ctx["rate"]), str(ctx["delay"])])
        wait_log(shaper, "shaper listening")
    if kite:
        backend = start(procs, ctx, "kite-expose", wrap([
            sys.executable, "-m", "kite", "expose", f"http://{HOST}:{ctx['origin_port']}", KITE,
            "--relay", f"{relay_addr}:{shaper_port}", "--ca", ctx["cert"], "--secret", SECRET]),
            env=env)
        wait_log(backend, "kite flying")
    else:
        backend = start(procs, ctx, "pagekite-be", wrap([
            ctx["pagekite"], "--clean", "--noproxy", f"--frontend={relay_addr}:{shaper_port}",
            f"--fe_certname={PK_FE}", f"--ca_certs={ctx['pk_pem']}",
            f"--service_on=http:{KITE}:{HOST}:{ctx['origin_port']}:{SECRET}",
            "--logfile=stdio"] + tuning))
        wait_log(backend, re.escape(f"domain={KITE}"))
    deadline = time.monotonic() + 60
    while True:  # served end to end?
        try:
            with socket.create_connection((HOST, relay_port), timeout=5) as s:
                if get(s, "/s.bin")[0] == 200:
                    break
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{name}: the kite is not served")
        time.sleep(0.2)
    return [relay, shaper, backend], relay_port


# -- clients -----------------------------------------------------------------------------------
def get(sock, path):
    """One keep-alive GET; returns (status, body bytes)."""
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path.encode(), KITE.encode()))
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ValueError("connection closed")
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    n = int(m.group(1)) if m else 0
    while len(body) < n:
        data = sock.recv(65536)
        if not data:
            raise ValueError("connection closed")
        body += data
    return status, len(body)


def probe(port, seconds, gap=0.05):
    """Sequential small GETs on one connection for ``seconds``; latencies in ms."""
    lat = []
    with socket.create_connection((HOST, port), timeout=30) as s:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            status, n = get(s, "/s.bin")
            lat.append((time.perf_counter() - t0) * 1000.0)
            if status != 200 or n != 1024:
                raise RuntimeError(f"probe: status {status}, {n} bytes")
            time.sleep(gap)
    return lat


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def sample_sockets(ctx, label, stop):
    """``ss -tinm`` of the backend's sockets every 0.5 s into ``--ss`` until ``stop``."""
    net = ctx["netns"]
    argv = net.run_in(["ss", "-tinm"]) if net else ["ss", "-tinm", "state", "established"]
    with open(ctx["ss"], "a") as f:
        while not stop.wait(0.5):
            out = subprocess.run(argv, capture_output=True, text=True).stdout
            f.write(f"=== {label} t={time.monotonic():.2f}\n{out}")
        if net:
            f.write(f"=== {label} qdisc\n{net.qdisc_stats()}")


def measure(port, seconds, ctx, label):
    idle = probe(port, min(seconds, 2.0))
    moved, stop = [0], threading.Event()

    def download():
        try:
            with socket.create_connection((HOST, port), timeout=30) as s:
                s.sendall(b"GET /big.bin HTTP/1.1\r\nHost: %s\r\n\r\n" % KITE.encode())
                while not stop.is_set():
                    data = s.recv(1 << 20)
                    if not data:
                        break
                    moved[0] += len(data)
        except OSError:
            pass

    th = threading.Thread(target=download, daemon=True)
    th.start()
    time.sleep(1.5)  # past the download's start-up: its window has grown
    m0, t0 = moved[0], time.monotonic()
    sampler_stop = threading.Event()
    sampler = None
    if ctx["ss"]:
        sampler = threading.Thread(target=sample_sockets, args=(ctx, label, sampler_stop))
        sampler.start()
    try:
        busy = probe(port, seconds)
    finally:
        sampler_stop.set()
        if sampler is not None:
            sampler.join()
    rate = (moved[0] - m0) / (time.monotonic() - t0)
    stop.set()
    return {"idle_p50_ms": pct(idle, 0.5), "p50_ms": pct(busy, 0.5), "p90_ms": pct(busy, 0.9),
            "max_ms": max(busy), "probes": len(busy), "download_MBps": rate / 1e6}


# -- main --------------------------------------------------------------------------------------
def run(args, procs, ctx, out):
    """Files, certificates and the origin in ctx["work"], then the rounds and the table."""
    systems = [s for s in args.systems.split(",") if s]
    work = ctx["work"]
    www = os.path.join(work, "www")
    os.makedirs(os.path.join(www, "up"))
    with open(os.path.join(www, "big.bin"), "wb") as f:
        f.write(os.urandom(64 << 20))  # random: pagekite.py compresses what it can
    with open(os.path.join(www, "s.bin"), "wb") as f:
        f.write(os.urandom(1024))
    ctx["cert"], ctx["key"] = os.path.join(work, "relay.crt"), os.path.join(work, "relay.key")
    pk_crt, pk_key = os.path.join(work, "pk.crt"), os.path.join(work, "pk.key")
    net = ctx["netns"]
    relay_san = "DNS:localhost,IP:127.0.0.1" + (f",IP:{net.gw_addr}" if net else "")
    for crt, key, cn, san in ((ctx["cert"], ctx["key"], "localhost", relay_san),
                              (pk_crt, pk_key, PK_FE, f"DNS:{PK_FE}")):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", f"/CN={cn}",
                        "-addext", f"subjectAltName={san}", "-keyout", key, "-out", crt],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ctx["pk_pem"] = os.path.join(work, "pk.pem")
    with open(ctx["pk_pem"], "w") as pem:  # pagekite.py wants key and certificate in one file
        for part in (pk_key, pk_crt):
            with open(part) as f:
                pem.write(f.read())
    # The origin is the backend's local server: in its namespace with --link netns.
    origin = start(procs, ctx, "origin", (net.run_in if net else list)([
        sys.executable, os.path.join(HERE, "origin.py"), "--port", "0", "--root", www]))
    wait_log(origin, r"origin listening on [\d.]+:\d+")
    with open(origin.log) as f:
        ctx["origin_port"] = int(re.search(r"origin listening on [\d.]+:(\d+)", f.read()).group(1))
    if not ctx["pagekite"]:
        systems = [s for s in systems if not s.startswith("pagekite")]
        print("pagekite.py not installed (apt-get install pagekite): skipped")
    results = {s: [] for s in systems}
    link = (f"netns: htb + pfifo of {args.queue} packets, delay in user space" if net
            else "user-space shaper")
    print(f"uplink {args.rate:g} Mbit/s ({link}), {args.delay:g} ms each way; "
          f"{args.rounds} interleaved rounds of {args.seconds:g} s; 1 KiB GETs on one "
          f"connection, 50 ms apart, while another visitor downloads 64 MiB", flush=True)
    for rnd in range(1, args.rounds + 1):
        for name in systems[rnd - 1:] + systems[:rnd - 1]:
            try:
                started, port = start_system(name, procs, ctx)
            except BenchError as exc:
                print(f"  round {rnd} {name}: did not start: {str(exc).splitlines()[0]}")
                procs.kill(*[p for p in procs.started() if p is not origin])
                continue
            try:
                r = measure(port, args.seconds, ctx, f"round {rnd} {name}")
            finally:
                procs.kill(*started)
            results[name].append(r)
            if out:
                out.write(json.dumps({"system": name, "round": rnd, "link": "netns" if net else "shaper",
                                      "rate_mbit": args.rate,
                                      "delay_ms": args.delay, **r}) + "\n")
                out.flush()
            print(f"  round {rnd} {name}: p50 {r['p50_ms']:.0f} ms while downloading "
                  f"{r['download_MBps']:.2f} MB/s", flush=True)
    cols = ("idle_p50_ms", "p50_ms", "p90_ms", "max_ms", "download_MBps")
    print(f"\n{'system':<16}" + "".join(f"{c:>16}" for c in cols))
    for name in systems:
        if not results[name]:
            continue
        row = [statistics.median(r[c] for r in results[name]) for c in cols]
        print(f"{name:<16}" + "".join(f"{v:>16.2f}" if c == "download_MBps" else f"{v:>16.1f}"
                                      for c, v in zip(cols, row, strict=True)))
    print("(ms: a 1 KiB GET's time; idle = with the link idle; the rest during the download)")


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--shaper":
        port, target, rate, delay = sys.argv[2:6]
        return shaper_main(int(port), int(target), float(rate), float(delay))
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--delayer":
        ns, addr, port, target, delay = sys.argv[2:7]
        return delayer_main(ns, addr, int(port), int(target), float(delay))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--systems", default="kite,pagekite,pagekite-tuned")
    ap.add_argument("--rate", type=float, default=10.0, help="uplink, Mbit/s (default 10)")
    ap.add_argument("--delay", type=float, default=10.0, help="one-way delay, ms (default 10)")
    ap.add_argument("--seconds", type=float, default=6.0, help="probing time under load")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--link", choices=("auto", "netns", "shaper"), default="auto",
                    help="netns: htb on a veth (root; the default when it works); shaper: "
                         "user space on loopback")
    ap.add_argument("--queue", type=int, default=20,
                    help="--link netns: the bottleneck's pfifo limit, packets (default 20)")
    ap.add_argument("--ss", default="", help="append ss -tinm of the backend's sockets, every "
                                             "0.5 s under load, to this file")
    ap.add_argument("--base", default="", metavar="SRC",
                    help="also run system kite-base: kite from this src directory (another "
                         "commit's src/, with its built fast path), for before/after in one run")
    ap.add_argument("--json", default="", help="JSON lines to this file")
    args = ap.parse_args(argv)
    if args.base and "kite-base" not in args.systems.split(","):
        args.systems = "kite-base," + args.systems
    work = tempfile.mkdtemp(prefix="kite-uplink-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    procs = Procs()
    ctx = {"work": work, "rate": args.rate * 1e6 / 8, "delay": args.delay / 1000.0,
           "pagekite": shutil.which("pagekite"), "netns": None, "ss": args.ss,
           "base_src": os.path.abspath(args.base) if args.base else ""}
    net = None
    if args.link != "shaper":
        net = Netns(ctx["rate"], args.queue)
        atexit.register(net.down)
        try:
            net.up()
            ctx["netns"] = net
        except BenchError as exc:
            if args.link == "netns":
                raise SystemExit(str(exc)) from None
            print(f"{exc}; using --link shaper")
            net = None
    try:
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(open(args.json, "w")) if args.json else None
            run(args, procs, ctx, out)
    finally:
        procs.kill(*procs.started())
        if net is not None:
            net.down()
        if os.environ.get("UPLINK_KEEP"):
            print("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
