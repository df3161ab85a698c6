"""kite with its DNS on (``kite-dns``), and a background DNS load at a fixed rate against it:
``dnsperf -Q RATE`` (Debian dnsperf) or, without dnsperf, a Python UDP loop paced to RATE
(``dns_under_load.py _udp-load``).  Used by ``bench/dns_under_load.py``."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

from .common import BENCH, HOST, KITE_NAME, BenchError
from .context import Ctx
from .procs import tail
from .systems import Kite, KitePy, Running

ZONE = "bench.kite"  # the zone of KITE_DOMAIN (*.bench.kite)
PUBLIC_IP = "192.0.2.10"
ENTRY = os.path.join(BENCH, "dns_under_load.py")
#: Query mixes of the load: names cycled in order (hits are cached answers, misses are the
#: template NXDOMAIN path: every name different).
MIXES = ("mixed", "hit", "miss-random")


class KiteDns(Kite):
    """kite relay with ``--dns`` on for the zone of the bench kite (no rate limit)."""

    name = "kite-dns"
    title = "kite, uvloop, compiled fast path, relay DNS on (--dns, --zone)"

    def grant(self, ctx, env, tag):
        grant, secret = super().grant(ctx, env, tag)
        return [*grant, "--dns", f"{HOST}:0", "--zone", ZONE, "--public-ip", PUBLIC_IP,
                "--dns-rate-limit", "0"], secret

    def start(self, ctx: Ctx, tag: str) -> Running:
        run = super().start(ctx, tag)
        log = ctx.logfile(f"{self.name}-relay-{tag}")
        with open(log, encoding="utf-8", errors="replace") as f:
            m = re.search(r"dns listening on 127\.0\.0\.1:(\d+)", f.read())
        if not m:
            ctx.procs.stop(*run.procs.values())
            raise BenchError(f"{self.name}: no 'dns listening on' in the relay's log\n{tail(log)}")
        run.dns_port = int(m.group(1))  # type: ignore[attr-defined]
        status = udp_query(run.dns_port, KITE_NAME)  # type: ignore[attr-defined]
        if status != 0:
            ctx.procs.stop(*run.procs.values())
            raise BenchError(f"{self.name}: {KITE_NAME} A answered rcode {status}, not NOERROR")
        return run


class KiteDnsPy(KiteDns):
    """The same with KITE_NO_EXTENSIONS=1 (where the fast path is not compiled)."""

    name = "kite-dns-py"
    title = "kite, uvloop, pure-Python fast path, relay DNS on"
    extra_env = KitePy.extra_env
    maps = KitePy.maps


# -- one query, by hand (no dnspython needed here) -------------------------------------------
def query_wire(name: str, qid: int, qtype: int = 1) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", qtype, 1)


def udp_query(port: int, name: str, timeout: float = 3.0) -> int | None:
    """The rcode of ``name A`` asked of 127.0.0.1:``port``, or None without an answer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(query_wire(name, 0x4B54), (HOST, port))
        try:
            data = s.recv(4096)
        except OSError:
            return None
    return data[3] & 0x0F if len(data) >= 12 and data[:2] == b"\x4b\x54" else None


def names(mix: str, n: int = 20_000, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        miss = f"{rng.getrandbits(64):016x}.{ZONE}"
        if mix == "hit" or (mix == "mixed" and i % 2 == 0):
            out.append(KITE_NAME)
        else:
            out.append(miss)
    return out


# -- the background load -----------------------------------------------------------------------
class DnsLoad:
    """A process asking ``rate`` queries per second of 127.0.0.1:``port`` until stopped;
    :meth:`stop` ends it and returns what it saw (sent, answered, answered per second)."""

    def __init__(self, ctx: Ctx, port: int, rate: int, mix: str, kind: str, tag: str) -> None:
        self.ctx = ctx
        self.kind = kind
        self.log = ctx.logfile(f"dnsload-{tag}")
        self.t0 = time.monotonic()
        if kind == "dnsperf":
            data = os.path.join(ctx.work, f"dnsload-{mix}.txt")
            if not os.path.exists(data):
                with open(data, "w") as f:
                    f.writelines(f"{n} A\n" for n in names(mix))
            argv = ["dnsperf", "-s", HOST, "-p", str(port), "-d", data, "-Q", str(rate),
                    "-l", "86400", "-c", "1", "-q", "200", "-t", "2"]
        else:
            argv = [sys.executable, ENTRY, "_udp-load", "--port", str(port), "--rate", str(rate),
                    "--mix", mix]
        self.proc = ctx.procs.start(f"dnsload-{kind}", argv, log=self.log, cpus=ctx.client_cpus)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> dict:
        elapsed = time.monotonic() - self.t0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # both print their statistics on SIGINT
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.ctx.procs.stop(self.proc)
        with open(self.log, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if self.kind == "dnsperf":
            sent = re.search(r"Queries sent:\s+(\d+)", text)
            done = re.search(r"Queries completed:\s+(\d+)", text)
            run_s = re.search(r"Run time \(s\):\s+([\d.]+)", text)
            codes = re.search(r"Response codes:\s+(.*)", text)
            if not (sent and done and run_s):
                raise BenchError(f"dnsperf printed no statistics:\n{tail(self.log)}")
            stats = {"sent": int(sent.group(1)), "answered": int(done.group(1)),
                     "seconds": float(run_s.group(1)), "codes": codes.group(1).strip() if codes else ""}
        else:
            lines = [ln for ln in text.splitlines() if ln.startswith("{")]
            if not lines:
                raise BenchError(f"the UDP load printed no statistics:\n{tail(self.log)}")
            stats = json.loads(lines[-1])
        stats["seconds"] = stats.get("seconds") or elapsed
        stats["answered_qps"] = stats["answered"] / stats["seconds"] if stats["seconds"] else 0.0
        stats["kind"] = self.kind
        return stats


def load_kind(wanted: str) -> str:
    """``auto``: dnsperf when installed, else the Python loop."""
    if wanted == "auto":
        return "dnsperf" if shutil.which("dnsperf") else "python"
    if wanted == "dnsperf" and not shutil.which("dnsperf"):
        raise BenchError("dnsperf is not installed (apt-get install dnsperf); use --load python")
    return wanted


# -- the Python load generator (a process of its own) --------------------------------------------
def udp_load_main(argv: list[str]) -> None:
    """``_udp-load --port P --rate R --mix M``: ask R queries per second, paced every
    millisecond, until SIGINT or SIGTERM; then print one JSON line of statistics."""
    import argparse

    ap = argparse.ArgumentParser(prog="dns_under_load.py _udp-load")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rate", type=int, required=True)
    ap.add_argument("--mix", choices=MIXES, default="mixed")
    args = ap.parse_args(argv)
    stop = []
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    wires = [query_wire(n, i & 0xFFFF) for i, n in enumerate(names(args.mix))]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((HOST, args.port))
    sock.setblocking(False)
    sent = answered = 0
    codes: dict[int, int] = {}
    t0 = time.monotonic()
    while not stop:
        due = int((time.monotonic() - t0) * args.rate)
        while sent < due:
            try:
                sock.send(wires[sent % len(wires)])
            except BlockingIOError:
                break
            sent += 1
        while True:
            try:
                data = sock.recv(4096)
            except (BlockingIOError, ConnectionRefusedError):
                break
            answered += 1
            if len(data) >= 4:
                codes[data[3] & 0x0F] = codes.get(data[3] & 0x0F, 0) + 1
        time.sleep(0.001)
    elapsed = time.monotonic() - t0
    names_ = {0: "NOERROR", 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}
    print(json.dumps({"sent": sent, "answered": answered, "seconds": elapsed,
                      "codes": ", ".join(f"{names_.get(k, k)} {v}" for k, v in sorted(codes.items()))}),
          flush=True)
