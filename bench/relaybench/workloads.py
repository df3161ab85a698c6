"""The check and the workloads, each run on a started system: check, bulk, c50, seq,
newconn, idle, and the scaling curves scale-conns, scale-downloads and scale-uploads."""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import subprocess
import sys
import time

from .client import connect, http_get, http_put_file, python_seq
from .common import ENTRY_SCRIPT, HOST, BenchError, MiB
from .context import Ctx
from .downloads import concurrent_downloads, concurrent_uploads
from .limits import source_addresses
from .measure import cpu_seconds, mapped_files, rss_kib, tcp_sockets
from .procs import tail
from .systems import Running, wait_until_served
from .wrk import run_wrk, wrk_threads

#: The default set, in the order they run (the check always runs first).
WORKLOADS = ("bulk", "c50", "seq", "newconn", "idle")
#: The scaling curves: selected by name or by --curves, never by default.
CURVES = ("scale-conns", "scale-downloads", "scale-uploads")
ALL_WORKLOADS = WORKLOADS + CURVES


def tunnel_bytes(socks: list[dict], run: Running) -> int:
    """Bytes the kernel counted on the dialer's sockets to the tunnel port."""
    pid = run.pids[run.dialer]
    return sum(s["bytes"] for s in socks if pid in s["pids"] and s["peer_port"] == run.tunnel_port)


def check_system(ctx: Ctx, run: Running) -> dict:
    """Content intact both ways, the visitor held by the relay and the origin connection by
    the backend, at least the file's size crossed the tunnel, and the processes mapped the
    compiled fast path and uvloop (or not) as the system's name says."""
    size = ctx.args.check_size
    res: dict = {"size": size, "notes": []}
    before = tcp_sockets() if run.dialer else None
    sock = connect(run.port, timeout=30, tls_name=run.tls_name)
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
            if run.procs and "backend" not in run.procs:
                # one process terminates the visitor's TLS in front of the origin
                pid = run.pids["relay"]
                if not any(pid in s["pids"] for s in visitor):
                    raise BenchError(f"the visitor connection is not held by pid {pid}")
                if not any(pid in s["pids"] for s in to_origin):
                    raise BenchError(f"no connection from pid {pid} to the origin")
                res["notes"].append(f"{run.system.name}: no tunnel")
            elif run.procs:
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


def proc_cpu(run: Running) -> dict[str, float | None]:
    """role -> CPU seconds so far"""
    return {role: cpu_seconds(pid) for role, pid in run.pids.items()}


def w_bulk(ctx: Ctx, run: Running) -> dict:
    """--bulk-size down, then up, on one connection each, cut at --bulk-cap: MB/s and CPU
    seconds per GB of relay, backend and origin."""
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
        sock = connect(run.port, timeout=30, tls_name=run.tls_name)
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


def w_c50(ctx, run):
    """wrk with --wrk-conns keep-alive connections."""
    return run_wrk(ctx, run, ctx.args.wrk_conns, ctx.args.wrk_duration,
                   label=f"c{ctx.args.wrk_conns} wrk")


def w_seq(ctx, run):
    """One connection, sequential requests (wrk -c1, or the Python client without wrk)."""
    if ctx.wrk:
        return run_wrk(ctx, run, 1, ctx.args.seq_duration, label="seq wrk -c1")
    return python_seq(run.port, run.host, "/1k.bin", ctx.args.seq_duration, run.tls_name)


def w_newconn(ctx, run):
    """wrk with Connection: close: connections per second (https systems: each one a full
    TLS handshake, wrk resumes no sessions)."""
    r = run_wrk(ctx, run, ctx.args.newconn_conns, ctx.args.newconn_duration, close=True,
                label="newconn wrk")
    r["cps"] = r.pop("rps")
    return r


def w_scale_conns(ctx: Ctx, run: Running, n: int) -> dict:
    """wrk with ``n`` keep-alive connections (threads by wrk_threads) for --wrk-duration s,
    1 KiB file: req/s, p50, p99, and CPU per request."""
    threads = wrk_threads(n, os.cpu_count() or 1)
    wait_until_served(run, 30)  # done with the previous level's connections
    r = run_wrk(ctx, run, n, ctx.args.wrk_duration, label=f"scale-conns {n}", threads=threads)
    r["conns"], r["wrk_threads"] = n, threads
    return r


def _add_cpu_per_gb(r: dict, run: Running, cpu0: dict) -> None:
    """The CPU seconds per GB of ``r["bytes"]`` of each process since ``cpu0``, into ``r``."""
    cpu1 = proc_cpu(run)
    gb = r["bytes"] / 1e9
    for role in run.pids:
        if cpu0.get(role) is not None and cpu1[role] is not None and gb:
            r[f"{role}_cpu_s_per_GB"] = (cpu1[role] - cpu0[role]) / gb


def w_scale_downloads(ctx: Ctx, run: Running, n: int) -> dict:
    """``n`` concurrent downloads of the bulk file (again and again, keep-alive) for
    --download-duration s: aggregate MB/s, Jain's index over the bytes per download, and
    the CPU seconds per GB of relay and backend."""
    wait_until_served(run, 30)  # done with the previous level's connections
    ctx.progress.tick(f"scale-downloads {n}: {ctx.args.download_duration:g} s")
    cpu0 = proc_cpu(run)
    r = concurrent_downloads(run.port, run.host, "/bulk.bin", n, ctx.args.download_duration)
    _add_cpu_per_gb(r, run, cpu0)
    time.sleep(0.3)  # the cut downloads' buffers drain before the next level
    return r


def w_scale_uploads(ctx: Ctx, run: Running, n: int) -> dict:
    """``n`` concurrent endless uploads (PUT /sink, dropped by the origin) counted for
    --download-duration s after a warm-up: aggregate MB/s, Jain's index over the bytes per
    upload, and the CPU seconds per GB of relay and backend."""
    wait_until_served(run, 30)  # done with the previous level's connections
    ctx.progress.tick(f"scale-uploads {n}: {ctx.args.download_duration:g} s")
    cpu0: dict = {}
    r = concurrent_uploads(run.port, run.host, n, ctx.args.download_duration,
                           on_count=lambda: cpu0.update(proc_cpu(run)))
    _add_cpu_per_gb(r, run, cpu0)
    time.sleep(0.3)  # the cut uploads' buffers drain before the next level
    return r


def idle_client_argv(run: Running, n: int, timeout: float, sources: list[str]) -> list[str]:
    """The helper process that holds the idle connections (relaybench.idleclient)."""
    argv = [sys.executable, ENTRY_SCRIPT, "_idle-client", "--port", str(run.port),
            "--host", ",".join(run.hosts), "--conns", str(n), "--timeout", str(timeout)]
    if sources:
        argv += ["--sources", ",".join(sources)]
    return argv


def w_idle(ctx: Ctx, run: Running, n: int) -> dict:
    """``n`` idle keep-alive visitors (each fetched 1 KiB first): RSS growth, latency meanwhile.
    Beyond one port range of visitors they connect from several loopback addresses."""
    a = ctx.args
    out: dict = {"requested": n}
    sources = source_addresses(n, ctx.per_address)
    if sources != [HOST]:
        out["sources"] = sources
    if len(run.hosts) > 1:
        out["kites"] = run.hosts  # one per origin address: the origin connections' port ranges
    wait_until_served(run, 10)  # warm: the first stream's one-time allocations are baseline
    time.sleep(0.3)
    rss0 = {role: rss_kib(pid) for role, pid in run.pids.items()}
    log = ctx.logfile("idle-client")
    client = ctx.procs.start("idle-client", idle_client_argv(run, n, a.idle_timeout,
                                                              sources if sources != [HOST] else []),
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
