#!/usr/bin/env python3
"""Queries per second of the relay's DNS (kite.names) against Knot DNS, in one run.

Both serve the same zone: kite a relay with ``--dns`` and one kite flying (``kite expose``),
Knot (Debian ``knot``, one UDP worker) the zone file with the same records.  The load is
``dnsperf`` (Debian ``dnsperf``) over UDP, on another CPU than the server when the machine
has two or more; each server is pinned to one CPU (``--no-pin``: nothing pinned).

Cases (each query file is cycled by dnsperf):

* ``hit``: ``app.bench.kite A``, a flying kite: NOERROR with one A.
* ``miss``: ``nope.bench.kite A``: NXDOMAIN with the SOA.
* ``miss-random``: 100,000 different names that do not exist: NXDOMAIN; no answer repeats, so
  kite's answer cache never hits (the "random subdomain" load).

Per round every system runs every case (systems in an order rotated per round); the figure
is the median over ``--rounds`` with min..max, and the server's CPU use while it ran.

    python bench/dns_bench.py                       # kite, kite-asyncio, knot; 3 rounds of 10 s
    python bench/dns_bench.py --quick               # 1 round of 3 s
    python bench/dns_bench.py --systems kite,knot --cases hit --seconds 20

It measures, it does not assert (bench/README.md).  Loopback only; every process it starts
is stopped by PID.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
HOST = "127.0.0.1"
ZONE = "bench.kite"
KITE = f"app.{ZONE}"
IP = "192.0.2.10"
SECRET = "dns-bench-s3cr3t"
SYSTEMS = ("kite", "kite-asyncio", "knot")
CASES = ("hit", "miss", "miss-random")
RANDOM_NAMES = 100_000

KNOT_CONF = """server:
    rundir: {dir}
    listen: {host}@{port}
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
database:
    storage: {dir}
zone:
  - domain: {zone}
    file: {dir}/{zone}.zone
log:
  - target: stderr
    any: warning
"""
ZONE_FILE = """$ORIGIN {zone}.
$TTL 60
@ 30 IN SOA relay.{zone}. hostmaster.{zone}. 1 3600 600 86400 30
@ 3600 IN NS relay.{zone}.
relay IN A {ip}
app IN A {ip}
"""


class BenchError(Exception):
    pass


def free_port() -> int:
    """A port free for both UDP and TCP on HOST a moment ago."""
    for _ in range(50):
        with socket.socket() as t:
            t.bind((HOST, 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((HOST, port))
                except OSError:
                    continue
                return port
    raise BenchError("no free port")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Procs:
    def __init__(self) -> None:
        self.live: list[subprocess.Popen] = []

    def start(self, argv, log, *, cpus=None, env=None) -> subprocess.Popen:
        preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        with open(log, "ab") as logf:
            p = subprocess.Popen(argv, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL,
                                 env=env, start_new_session=True, preexec_fn=preexec)
        self.live.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.live):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    if p.poll() is None:
                        os.killpg(p.pid, signal.SIGKILL)
                        p.wait(5)
        self.live.clear()


def wait_log(path: str, pattern: str, proc: subprocess.Popen, timeout: float = 30.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, errors="replace") as f:
            text = f.read()
        m = re.search(pattern, text)
        if m:
            return m
        if proc.poll() is not None:
            raise BenchError(f"{path}: exited before {pattern!r}:\n{text[-2000:]}")
        time.sleep(0.05)
    raise BenchError(f"{path}: {pattern!r} not seen within {timeout} s")


def kite_env() -> dict:
    """This checkout's kite when its compiled fast path is built in place, else the installed
    one (a fresh clone: CI runs the wheel it installed)."""
    env = dict(os.environ)
    src = os.path.join(REPO, "src")
    if glob.glob(os.path.join(src, "kite", "_fastpath*.so")):
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_kite(procs: Procs, work: str, loop: str, server_cpus, other_cpus) -> tuple:
    """kite relay --dns with app.bench.kite flying; returns (pid, port)."""
    run = len(os.listdir(work))  # fresh log files for every start
    log = os.path.join(work, f"relay-{loop}-{run}.log")
    relay = procs.start([sys.executable, "-m", "kite", "relay", "--listen", f"{HOST}:0",
                         "--kite", f"*:*.{ZONE}:{SECRET}", "--dns", f"{HOST}:0", "--zone", ZONE,
                         "--public-ip", IP, "--dns-name", f"relay.{ZONE}", "--dns-rate-limit", "0",
                         "--loop", loop], log, cpus=server_cpus, env=kite_env())
    m = wait_log(log, r"relay listening on [\d.]+:(\d+)", relay)
    dport = int(wait_log(log, r"dns listening on [\d.]+:(\d+)", relay).group(1))
    env = kite_env()
    env["KITE_SECRET"] = SECRET
    elog = os.path.join(work, f"expose-{loop}-{run}.log")
    expose = procs.start([sys.executable, "-m", "kite", "expose", "8080", KITE, "--relay",
                          f"{HOST}:{m.group(1)}", "--plain"], elog, cpus=other_cpus, env=env)
    wait_log(elog, "flying", expose)
    return relay.pid, dport


def start_knot(procs: Procs, work: str, server_cpus) -> tuple:
    knotd = shutil.which("knotd") or "/usr/sbin/knotd"
    if not os.path.exists(knotd):
        raise BenchError("knotd not installed (apt-get install knot)")
    d = os.path.join(work, "knot")
    os.makedirs(d, exist_ok=True)
    port = free_port()
    with open(os.path.join(d, f"{ZONE}.zone"), "w") as f:
        f.write(ZONE_FILE.format(zone=ZONE, ip=IP))
    conf = os.path.join(d, "knot.conf")
    with open(conf, "w") as f:
        f.write(KNOT_CONF.format(dir=d, host=HOST, port=port, zone=ZONE))
    p = procs.start([knotd, "-c", conf], os.path.join(d, "knot.log"), cpus=server_cpus)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if dig_status(port, KITE) == "NOERROR":
            return p.pid, port
        if p.poll() is not None:
            break
        time.sleep(0.1)
    raise BenchError(f"knotd did not start (see {d}/knot.log)")


def dig_status(port: int, name: str) -> str:
    out = subprocess.run(["dig", f"@{HOST}", "-p", str(port), name, "A", "+tries=1", "+time=1"],
                         capture_output=True, text=True).stdout
    m = re.search(r"status: (\w+)", out)
    return m.group(1) if m else "no answer"


def query_files(work: str) -> dict:
    files = {}
    for case, lines in (("hit", [f"{KITE} A"]), ("miss", [f"nope.{ZONE} A"]),
                        ("miss-random", [f"n{i}-{os.urandom(3).hex()}.{ZONE} A"
                                         for i in range(RANDOM_NAMES)])):
        path = os.path.join(work, f"{case}.txt")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        files[case] = path
    return files


def dnsperf(port: int, datafile: str, seconds: float, cpus, outstanding: int) -> dict:
    argv = ["dnsperf", "-s", HOST, "-p", str(port), "-d", datafile, "-l", str(seconds),
            "-c", "4", "-q", str(outstanding), "-t", "1"]
    if cpus:
        argv = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout
    qps = re.search(r"Queries per second:\s+([\d.]+)", out)
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    codes = re.search(r"Response codes:\s+(.*)", out)
    if not qps:
        raise BenchError(f"dnsperf said:\n{out}")
    return {"qps": float(qps.group(1)), "lost": int(lost.group(1)) if lost else 0,
            "codes": codes.group(1).strip() if codes else ""}


def fmt(values: list) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):9.0f} ({min(values):.0f}..{max(values):.0f})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--outstanding", type=int, default=100, help="dnsperf -q per run")
    ap.add_argument("--quick", action="store_true", help="1 round of 3 s")
    ap.add_argument("--no-pin", action="store_true", help="pin nothing")
    ap.add_argument("--json", default=os.path.join(RESULTS, "dns.jsonl"))
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, 3.0
    systems = [s for s in args.systems.split(",") if s]
    cases = [c for c in args.cases.split(",") if c]
    for s in systems:
        if s not in SYSTEMS:
            ap.error(f"unknown system {s!r}: {', '.join(SYSTEMS)}")
    for c in cases:
        if c not in CASES:
            ap.error(f"unknown case {c!r}: {', '.join(CASES)}")
    for tool in ("dnsperf", "dig"):
        if shutil.which(tool) is None:
            print(f"dns_bench: {tool} is needed (apt-get install dnsperf dnsutils)", file=sys.stderr)
            return 2
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus = other_cpus = None
    if not args.no_pin and len(cpus) >= 2:
        server_cpus, other_cpus = {cpus[0]}, set(cpus[1:])
    os.makedirs(RESULTS, exist_ok=True)
    results: dict = {(s, c): [] for s in systems for c in cases}
    cpu_use: dict = {(s, c): [] for s in systems for c in cases}
    procs = Procs()
    records = []
    with tempfile.TemporaryDirectory(prefix="kite-dns-bench.") as work:
        files = query_files(work)
        try:
            for rnd in range(args.rounds):
                order = systems[rnd % len(systems):] + systems[:rnd % len(systems)]
                for system in order:
                    try:
                        if system == "knot":
                            pid, port = start_knot(procs, work, server_cpus)
                        else:
                            loop = "asyncio" if system == "kite-asyncio" else "uvloop"
                            pid, port = start_kite(procs, work, loop, server_cpus, other_cpus)
                        if dig_status(port, KITE) != "NOERROR" or \
                                dig_status(port, f"nope.{ZONE}") != "NXDOMAIN":
                            raise BenchError(f"{system}: wrong answers before the run")
                        for case in cases:
                            c0, t0 = cpu_seconds(pid), time.monotonic()
                            r = dnsperf(port, files[case], args.seconds, other_cpus, args.outstanding)
                            cpu = (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
                            results[(system, case)].append(r["qps"])
                            cpu_use[(system, case)].append(cpu)
                            rec = {"round": rnd, "system": system, "case": case, "cpu": cpu, **r}
                            records.append(rec)
                            print(f"round {rnd + 1} {system:13s} {case:12s} {r['qps']:9.0f} q/s "
                                  f"cpu {cpu:4.2f} lost {r['lost']} [{r['codes']}]",
                                  file=sys.stderr)
                    except BenchError as exc:
                        print(f"dns_bench: {system}: {exc}", file=sys.stderr)
                    finally:
                        procs.stop_all()
        finally:
            procs.stop_all()
    with open(args.json, "a") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    pin = f"servers on CPU {sorted(server_cpus)}, dnsperf on {sorted(other_cpus)}" \
        if server_cpus and other_cpus else "nothing pinned"
    print(f"\nmedian (min..max) of {args.rounds} round(s) of {args.seconds:g} s; "
          f"dnsperf -c 4 -q {args.outstanding} over UDP; {pin}")
    # per CPU-second of the server: what one core would answer (a server the load generator
    # cannot saturate, or that shares its CPU with a neighbour, still shows its cost)
    per_cpu = {k: [q / c for q, c in zip(results[k], cpu_use[k], strict=True) if c > 0.01] for k in results}
    for title, table in (("q/s", results), ("q/s per CPU-second of the server", per_cpu)):
        print(f"\n{title}")
        print(f"{'system':14s}" + "".join(f"{c:>30s}" for c in cases) + "   server CPU")
        for s in systems:
            cpu = [v for c in cases for v in cpu_use[(s, c)]]
            print(f"{s:14s}" + "".join(f"{fmt(table[(s, c)]):>30s}" for c in cases)
                  + (f"   {statistics.median(cpu):.2f}" if cpu else ""))
        if "knot" in systems:
            for s in systems:
                med = {c: statistics.median(table[(s, c)]) / statistics.median(table[("knot", c)])
                       for c in cases if s != "knot" and table[(s, c)] and table[("knot", c)]}
                ratios = [f"{c} {r:.0%}" for c, r in med.items()]
                if ratios:
                    print(f"  {s} / knot: " + ", ".join(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
