"""The command line: options, the interleaved rounds, and the run from start to report."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import signal
import sys
import time

from . import __doc__ as PACKAGE_DOC
from .common import RESULTS, BenchError, GiB, KiB, MiB
from .context import Ctx
from .idleclient import idle_client
from .limits import MAX_SOURCES, PORT_MARGIN, kernel_limits, level_plan, port_range
from .measure import Interference, cpu_model, loadavg, tool_version
from .procs import Procs
from .profiling import profile_kite
from .progress import Progress
from .report import (
    Results,
    draw_curves_png,
    draw_png,
    emit_summaries,
    print_curves,
    print_header,
    print_notes,
    print_table,
    print_targets,
    targets,
)
from .systems import ALL_SYSTEMS, DEFAULT_SYSTEMS, HTTPS_SYSTEMS, SYSTEMS, System
from .workloads import (
    ALL_WORKLOADS,
    CURVES,
    WORKLOADS,
    check_system,
    w_bulk,
    w_c50,
    w_idle,
    w_newconn,
    w_scale_conns,
    w_scale_downloads,
    w_scale_uploads,
    w_seq,
)

CONN_LEVELS = "1,10,50,200,1000,5000"
DOWNLOAD_LEVELS = "1,4,16,64"
IDLE_LEVELS = "1000,10000"
CURVE_IDLE_LEVELS = "1000,10000,100000"


def parse_size(text: str) -> int:
    """64M, 1G, 256K, 4096 -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgKMG]?)(?:i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 64M, 1G, 4096)")
    mult = {"": 1, "k": KiB, "m": MiB, "g": GiB}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="relay_bench.py", description=PACKAGE_DOC.split("\n\n")[0],
        epilog="Systems: " + ", ".join(SYSTEMS) + ".  Workloads: " + ", ".join(WORKLOADS)
               + " (the check always runs first); the scaling curves, not run by default: "
               + ", ".join(CURVES) + " (and idle at --idle-levels).  Sizes take K, M, G "
               "suffixes (binary).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help="comma-separated (default: all but kite-base, kite-acct and the https "
                        "systems; 'https' = " + ",".join(HTTPS_SYSTEMS) + ": HTTPS visitors)")
    p.add_argument("--workloads", help="comma-separated (default: " + ",".join(WORKLOADS)
                   + "; the curves " + ",".join(CURVES) + " only when named or with --curves)")
    p.add_argument("--curves", action="store_true",
                   help="the scaling curves: adds scale-conns, scale-downloads, scale-uploads "
                        "and idle to "
                        "--workloads (alone: only those), idle levels " + CURVE_IDLE_LEVELS
                        + " unless --idle-levels says otherwise")
    p.add_argument("--conn-levels", help="scale-conns: keep-alive connections per level "
                   f"(default {CONN_LEVELS}; --quick 1,50,1000)")
    p.add_argument("--download-levels", help="scale-downloads and scale-uploads: concurrent "
                   "transfers per level "
                   f"(default {DOWNLOAD_LEVELS}; --quick 1,16)")
    p.add_argument("--download-duration", type=float,
                   help="seconds of each scale-downloads and scale-uploads level (default 5; "
                        "--quick 2)")
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
    p.add_argument("--idle-levels", "--idle-conns", dest="idle_conns",
                   help=f"comma-separated idle visitor counts (default {IDLE_LEVELS}; --curves "
                        f"{CURVE_IDLE_LEVELS}; --quick 200); a level beyond the descriptor or "
                        "port limits is skipped with a note (bench/README.md)")
    p.add_argument("--ports-per-address", type=int,
                   help="idle levels: connections one source address opens to one destination "
                        f"before the next address is used (default: the ephemeral port range less "
                        f"{PORT_MARGIN}; lower it to try the spreading on a small level)")
    p.add_argument("--idle-timeout", type=float,
                   help="seconds to open the idle connections (default 30; --curves 120; --quick "
                        "20); a level that would take more than twice that at the rate of the "
                        "previous level is skipped")
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
    """Fill in the defaults (full or --quick), split the comma-separated lists, check names."""
    q = args.quick
    if args.curves and args.idle_timeout is None and not q:
        args.idle_timeout = 120.0  # 100,000 visitors open at some thousands per second
    defaults = {"rounds": (3, 1), "bulk_size": (1 * GiB, 64 * MiB), "bulk_cap": (10.0, 8.0),
                "check_size": (1 * MiB, 256 * KiB), "wrk_duration": (5, 3), "seq_duration": (3, 2),
                "newconn_duration": (3, 2), "idle_timeout": (30.0, 20.0), "idle_probe": (2, 2),
                "download_duration": (5.0, 2.0)}
    for k, (full, quick) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if q else full)
    idle_default = "200" if q else (CURVE_IDLE_LEVELS if args.curves else IDLE_LEVELS)
    args.idle_conns = levels("--idle-levels", args.idle_conns or idle_default)
    args.conn_levels = levels("--conn-levels", args.conn_levels or ("1,50,1000" if q else CONN_LEVELS))
    args.download_levels = levels("--download-levels",
                                  args.download_levels or ("1,16" if q else DOWNLOAD_LEVELS))
    args.systems = [x for s in args.systems.split(",") if s.strip()
                    for x in (HTTPS_SYSTEMS if s.strip() == "https" else (s.strip(),))]
    if args.workloads is None:
        args.workloads = "" if args.curves else ",".join(WORKLOADS)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if args.curves:
        args.workloads += [w for w in (*CURVES, "idle") if w not in args.workloads]
    for s in args.systems:
        if s not in SYSTEMS:
            raise SystemExit(f"relay_bench.py: unknown system {s!r}; choose from {', '.join(SYSTEMS)}")
    for w in args.workloads:
        if w not in ALL_WORKLOADS:
            raise SystemExit(f"relay_bench.py: unknown workload {w!r}; "
                             f"choose from {', '.join(ALL_WORKLOADS)}")
    # Descriptors for the largest level: haproxy and stunnel hold two per visitor.
    counts = ([*args.idle_conns] if "idle" in args.workloads else []) + (
        [*args.conn_levels] if "scale-conns" in args.workloads else [])
    args.want_nofile = 2 * max(counts, default=0) + 1000
    if args.json is None:
        args.json = os.path.join(RESULTS, "relay.jsonl")
    if args.png is None:
        args.png = os.path.join(RESULTS, "relay.png")


def levels(option: str, text: str) -> list[int]:
    """'1,10,1000' -> [1, 10, 1000]; exit 2 naming ``option`` on anything else."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        print(f"relay_bench.py: {option} wants positive integers separated by commas, "
              f"e.g. 1,10,100 (got {text!r})", file=sys.stderr)
        raise SystemExit(2)
    return out


def run_rounds(ctx: Ctx, res: Results, systems: list[str]) -> None:
    """--rounds rounds, each system once per round in an order rotated every round."""
    a = ctx.args
    prog = ctx.progress
    for rnd in range(1, a.rounds + 1):
        k = (rnd - 1) % len(systems)
        order = systems[k:] + systems[:k]  # rotated: no system always goes first
        for i, name in enumerate(order, 1):
            system = ALL_SYSTEMS[name]()
            prog.prefix = f"round {rnd}/{a.rounds} · {name} ({i}/{len(order)}) · "
            if run_checked(ctx, res, system, rnd) and "idle" in a.workloads and not system.https:
                run_idle_levels(ctx, res, system, rnd)


def run_checked(ctx: Ctx, res: Results, system: System, rnd: int) -> bool:
    """One instance of ``system``: the check, then bulk, c50, seq, newconn and the levels
    of scale-conns and scale-downloads as selected.
    False when it did not start, failed the check or died: then it is not measured further
    in this round."""
    a = ctx.args
    prog = ctx.progress
    name = system.name
    plain = [(w, w, f) for w, f in (("bulk", w_bulk), ("c50", w_c50), ("seq", w_seq),
                                    ("newconn", w_newconn)) if w in a.workloads]
    if "scale-conns" in a.workloads and ctx.wrk:
        plain += [(f"scale-conns-{n}", "scale-conns",
                   lambda c, r, n=n: w_scale_conns(c, r, n)) for n in a.conn_levels]
    if "scale-downloads" in a.workloads and not system.https:
        plain += [(f"scale-downloads-{n}", "scale-downloads",
                   lambda c, r, n=n: w_scale_downloads(c, r, n)) for n in a.download_levels]
    if "scale-uploads" in a.workloads and not system.https:
        plain += [(f"scale-uploads-{n}", "scale-uploads",
                   lambda c, r, n=n: w_scale_uploads(c, r, n)) for n in a.download_levels]
    prog.step("starting")
    run = None
    try:
        run = system.start(ctx, f"r{rnd}")
        prog.step("check")
        chk = check_system(ctx, run)
        res.emit({"type": "check", "round": rnd, "system": name, **chk})
        for w, kind, func in plain:
            if kind in ("c50", "newconn") and not ctx.wrk:
                continue
            prog.step(w)
            watch = Interference([*run.pids.values(), ctx.origin_proc.pid])
            try:
                m = func(ctx, run)
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
        return False
    finally:
        if run is not None:
            ctx.procs.stop(*run.procs.values())
    return True


def run_idle_levels(ctx: Ctx, res: Results, system: System, rnd: int) -> None:
    """The idle workload at each --idle-conns level, each on a fresh instance: memory freed
    by earlier workloads is not available for reuse, so the RSS growth is what the
    connections cost."""
    a = ctx.args
    prog = ctx.progress
    name = system.name
    open_rate = None  # connections/s reached at the previous level
    for n in a.idle_conns:
        n_eff, why, skip = level_plan(n, idle_caps(ctx, system))
        if skip:
            msg = f"skipped: {n:,} visitors are more than this machine allows: {why}"
            prog.note(f"{name} round {rnd} idle {n}: {msg}")
            res.emit({"type": "skip", "round": rnd, "system": name,
                      "workload": f"idle-{n}", "reason": msg})
            continue
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
            ctx.idle_level = n_eff
            try:
                run = system.start(ctx, f"r{rnd}-idle{n}")
            finally:
                ctx.idle_level = None
            watch = Interference([*run.pids.values(), ctx.origin_proc.pid])
            m = w_idle(ctx, run, n_eff)
            m.update(watch.result())
            if m.get("ok") and m.get("open_s"):
                open_rate = m["ok"] / m["open_s"]
            if n_eff < n:
                m["note"] = f"capped at {n_eff:,}: {why}" + ("; " + m["note"] if "note" in m else "")
            res.sample(rnd, name, f"idle-{n}", m)
        except BenchError as exc:
            prog.note(f"{name} round {rnd} idle {n}: {exc}")
            res.emit({"type": "error", "round": rnd, "system": name,
                      "workload": f"idle-{n}", "error": str(exc)})
        finally:
            if run is not None:
                ctx.procs.stop(*run.procs.values())


def idle_caps(ctx: Ctx, system: System) -> list[tuple[int, str]]:
    """How many idle visitors ``system`` can hold here, and why: the descriptors of its
    busiest process (the origin and the idle client need one per visitor, never more), and
    the ephemeral ports of its connections to the origin when they all leave from one
    address (the idle client spreads the visitors over 127.0.0.x itself)."""
    fd_cap, fd_why = system.idle_fd_cap(ctx.nofile)
    if system.name != "stunnel":
        fd_why += (" (raise the hard limit: ulimit -Hn, systemd LimitNOFILE=, limits.conf; or "
                   "run with CAP_SYS_RESOURCE and the script raises it, up to fs.nr_open)")
    caps = [(fd_cap, fd_why),
            (MAX_SOURCES * ctx.per_address, f"the visitors' {MAX_SOURCES} source addresses "
                                            f"127.0.0.2-254, {ctx.per_address:,} each")]
    if system.origin_from_one_address:
        lo, hi = port_range()
        per = ctx.per_address
        ranges = (f"{per:,} connections per source address and destination (of "
                  f"{ctx.ports_per_destination:,} ephemeral ports: net.ipv4.ip_local_port_range "
                  f"{lo} {hi}, the widest 1024 65535 gives 64,512; {PORT_MARGIN:,} kept free, "
                  f"or --ports-per-address)")
        if system.origin_spread and len(ctx.origin_hosts) > 1:
            caps.append((per * len(ctx.origin_hosts),
                         f"{system.name}'s connections to the origin leave from one address, spread "
                         f"over the origin's {len(ctx.origin_hosts)} addresses: {ranges}"))
        elif system.origin_spread:
            caps.append((per, f"{system.name}'s connections to the origin leave from one address "
                              f"for the origin's one address and port: {ranges} (the nginx origin "
                              f"listens on more addresses when a level needs them)"))
        else:
            caps.append((per, f"{system.name}'s connections to the origin all leave from one "
                              f"address for one address and port: {ranges}"))
    return caps


def describe_run(ctx: Ctx, argv: list[str], systems: list[str], skipped: dict) -> dict:
    """The ``meta`` record: the machine, the tools, which kite, the options."""
    args = ctx.args
    return {
        "type": "meta", "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.argv[0]) if sys.argv[0] else "relay_bench.py", *argv]),
        "cpus": os.cpu_count(), "cpu_model": cpu_model(), "kernel": platform.release(),
        "python": platform.python_version(), "origin": ctx.origin_kind,
        "kite": ctx.kite_where, "kite_from": ctx.kite_from,
        "kite_git": ctx.kite_git() if ctx.kite_from == "checkout" else None,
        "wrk": tool_version(["wrk", "-v"]) if ctx.wrk else None,
        "pinning": (f"clients on CPU {sorted(ctx.client_cpus)}, systems on {sorted(ctx.system_cpus)}"
                    if ctx.client_cpus else "none: clients, systems and origin share all CPUs"),
        "rlimit_nofile": ctx.nofile, "limits": kernel_limits(), "work_dir": ctx.work,
        "loadavg_at_start": loadavg(), "systems": systems, "skipped": skipped,
        "titles": {s: ALL_SYSTEMS[s].title for s in systems},
        "versions": {s: ALL_SYSTEMS[s]().version(ctx) for s in systems},
        "workloads": args.workloads,
        "sizes": {"rounds": args.rounds, "bulk_size": args.bulk_size, "bulk_cap_s": args.bulk_cap,
                  "check_size": args.check_size, "wrk_conns": args.wrk_conns,
                  "wrk_duration_s": args.wrk_duration, "seq_duration_s": args.seq_duration,
                  "newconn_conns": args.newconn_conns, "newconn_duration_s": args.newconn_duration,
                  "idle_conns": args.idle_conns, "idle_probe_s": args.idle_probe,
                  "conn_levels": args.conn_levels, "download_levels": args.download_levels,
                  "download_duration_s": args.download_duration},
        "units": {"MBps": "10^6 bytes/s", "s_per_GB": "CPU seconds (user+sys) per 10^9 bytes",
                  "KiB_per_conn": "VmRSS growth / connections", "ms": "milliseconds"},
    }


def clean_up(procs: Procs, res: Results, ctx, keep: bool) -> None:
    """After a run, whatever happened: stop every process (SIGINT cannot cut this short),
    close the results, and remove the work directory unless ``keep``."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    procs.stop_all()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    res.close()
    if ctx is not None:
        if keep:
            print(f"work directory kept: {ctx.work}", file=sys.stderr)
        else:
            shutil.rmtree(ctx.work, ignore_errors=True)


def main(argv=None) -> int:
    """The whole run; every process started is stopped at the end, also on Ctrl-C or SIGTERM."""
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
        ctx.make_certs()

        systems = []
        skipped = {}
        for name in args.systems:
            why = ALL_SYSTEMS[name]().unavailable(ctx)
            if why:
                skipped[name] = why
                progress.note(f"skipping {name}: {why}")
            else:
                systems.append(name)
        if not ctx.wrk and any(w in args.workloads for w in ("c50", "newconn", "scale-conns")):
            progress.note("wrk not installed (apt-get install wrk): c50, newconn and scale-conns "
                          "skipped; seq and the idle probe use a Python client")
        if any(w in args.workloads for w in ("scale-downloads", "scale-uploads")) and \
                any(ALL_SYSTEMS[s].https for s in systems):
            progress.note("scale-downloads, scale-uploads: skipped for the https systems (their "
                          "client speaks plain HTTP only)")
        progress.step("starting the origin")
        ctx.start_origin()
        meta = describe_run(ctx, argv, systems, skipped)
        res.emit(meta)
        run_rounds(ctx, res, systems)
        progress.prefix = ""
        progress.clear()
        print_header(meta)
        print_table(res, systems, args)
        print_curves(res, systems, args)
        print_notes(res, args, progress.notes)
        tg = targets(res, args)
        print_targets(tg)
        emit_summaries(res, systems, args)
        for t in tg:
            res.emit({"type": "target", **t})
        if args.profile:
            profile_kite(ctx, res, systems)
            progress.clear()
        if args.png:
            why = draw_png(res, systems, args, args.png, meta)
            print(f"\nchart: {args.png}" if why is None else f"\nchart skipped: {why}")
            if any(w in args.workloads for w in (*CURVES, "idle")):
                curves_png = os.path.splitext(args.png)[0] + "-curves.png"
                why = draw_curves_png(res, systems, args, curves_png, meta)
                print(f"curves: {curves_png}" if why is None else f"curves chart skipped: {why}")
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
        clean_up(procs, res, ctx, args.keep)
