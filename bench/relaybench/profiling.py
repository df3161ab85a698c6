"""--profile: py-spy on relay and backend of kite systems under one workload, and where
the busy samples went."""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
import time

from .client import connect, http_get, http_put_file
from .context import Ctx
from .procs import tail
from .report import Results, fmt
from .systems import ALL_SYSTEMS, Running
from .wrk import run_wrk

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

    def pct(c):
        return round(100.0 * c / samples, 1) if samples else 0.0

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
        with connect(run.port, timeout=30, tls_name=run.tls_name) as sock:
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


def profile_kite(ctx: Ctx, res: Results, systems: list[str]) -> None:
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
    for (f1, p1), (f2, p2) in zip(rec["self"], rec["total"], strict=False):
        print(f"  {p1:5.1f}  {f1[:48]:<48} | {p2:5.1f}  {f2[:60]}", file=out)
