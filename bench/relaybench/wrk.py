"""wrk: run it against a system (with the CPU per request of relay and backend) and parse
its output."""

from __future__ import annotations

import os
import re
import subprocess
import time
from typing import TYPE_CHECKING

from .common import HOST, BenchError
from .measure import cpu_times

if TYPE_CHECKING:
    from .context import Ctx
    from .systems import Running

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float | None:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    return float(m.group(1)) * _UNITS[m.group(2)] if m else None


def parse_wrk(out: str) -> dict:
    """req/s, p50 and p99 (ms), requests and errors from the output of ``wrk --latency``."""
    res: dict = {"tool": "wrk"}
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else None
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s*{pct}(?:\.000)?%\s+(\S+)", out, re.MULTILINE)
        res[key] = _ms(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", out)
    res["requests"] = int(m.group(1)) if m else None
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
        res["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"),
                                        (int(x) for x in m.groups()), strict=True))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
        res["non_2xx"] = int(m.group(1))
    res["errors"] = errors
    return res


def wrk_threads(conns: int, cpus: int) -> int:
    """wrk threads for ``conns`` connections: one per full thousand, at least one, at most
    one per CPU (on a small machine more client threads only take CPU from the systems)."""
    return max(1, min(cpus, conns // 1000, conns))


def run_wrk(ctx: Ctx, run: Running, conns: int, duration: int, *, close: bool = False,
            label: str = "wrk", threads: int = 1) -> dict:
    """wrk -t``threads`` with ``conns`` connections for ``duration`` s fetching /1k.bin from
    ``run`` (``close``: one request per connection), pinned to the client CPUs if any."""
    # https: wrk sends its URL's host as SNI (and does a full handshake per connection)
    url = (f"https://{run.tls_name}:{run.port}/1k.bin" if run.tls_name
           else f"http://{HOST}:{run.port}/1k.bin")
    argv = [ctx.wrk, f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--latency", "--timeout", "5s",
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
                if time.monotonic() - t0 > duration + 30 + conns / 500:
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
