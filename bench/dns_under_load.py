#!/usr/bin/env python3
"""The relay's tunnel throughput while its DNS answers a steady load, against the same relay
with its DNS idle: is it unchanged (within 3 %) at 5,000 queries per second?

Modes, each a fresh kite relay + kite expose (relay_bench.py's ``kite`` system: TLS, uvloop,
compiled fast path) in front of the same origin:

  off     DNS off (relay_bench.py's ``kite``)
  idle    DNS on (``--dns --zone --public-ip``, no rate limit), no queries
  load    DNS on, and a background load of --qps queries per second at it for the whole
          instance (``dnsperf -Q``, or a paced Python UDP loop with --load python or without
          dnsperf); --mix: half hits (cached answers) and half random misses (NXDOMAIN)

Per round each mode runs the check and then --workloads (bulk, c50 by default; the same
workloads, sizes and options as relay_bench.py), modes in an order rotated every round.  The
report is the median over rounds per mode with min..max, the ratio of each mode's median to
the first mode's, and the DNS load actually answered (queries per second, per round).

    python bench/dns_under_load.py                        # 5 rounds, idle vs load, 5,000 q/s
    python bench/dns_under_load.py --quick                # a smoke run: 1 round, small sizes
    python bench/dns_under_load.py --modes off,idle,load --rounds 7 --pin

It measures, it does not assert (bench/README.md).  Every process it starts is stopped by PID.
"""

from __future__ import annotations

import os
import signal
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

from relaybench.cli import build_parser, clean_up, resolve_args  # noqa: E402
from relaybench.common import RESULTS, BenchError  # noqa: E402
from relaybench.context import Ctx  # noqa: E402
from relaybench.dnsload import (  # noqa: E402
    MIXES,
    DnsLoad,
    KiteDns,
    KiteDnsPy,
    load_kind,
    udp_load_main,
)
from relaybench.measure import Interference  # noqa: E402
from relaybench.procs import Procs  # noqa: E402
from relaybench.progress import Progress  # noqa: E402
from relaybench.report import Results  # noqa: E402
from relaybench.systems import Kite, KitePy  # noqa: E402
from relaybench.workloads import check_system, w_bulk, w_c50, w_newconn, w_seq  # noqa: E402

MODES = ("off", "idle", "load")
WORKLOADS = {"bulk": w_bulk, "c50": w_c50, "seq": w_seq, "newconn": w_newconn}
#: (workload, metric, title) of the throughput figures compared between the modes.
FIGURES = [("bulk", "down_MBps", "bulk down MB/s"), ("bulk", "up_MBps", "bulk up MB/s"),
           ("c50", "rps", "c50 req/s"), ("seq", "rps", "seq req/s"), ("newconn", "cps", "newconn conn/s")]
TOLERANCE = 0.03


def parser():
    p = build_parser()
    p.prog = "dns_under_load.py"
    p.description = __doc__.split("\n\n")[0]
    p.epilog = None
    p.add_argument("--modes", default="idle,load",
                   help="comma-separated, of off, idle, load (default idle,load; the first is "
                        "the reference of the ratios)")
    p.add_argument("--qps", type=int, default=5000, help="the background DNS load (queries/s)")
    p.add_argument("--load", choices=["auto", "dnsperf", "python"], default="auto",
                   help="the load generator (auto: dnsperf when installed)")
    p.add_argument("--mix", choices=MIXES, default="mixed", help="the queries of the load")
    p.add_argument("--fastpath", choices=["compiled", "python"], default="compiled",
                   help="kite's fast path: compiled (relay_bench.py's kite) or the pure-Python "
                        "twin (kite-py, KITE_NO_EXTENSIONS=1)")
    p.set_defaults(workloads="bulk,c50", rounds=None, png="",
                   json=os.path.join(RESULTS, "dns_under_load.jsonl"))
    return p


def mode_system(mode: str, fastpath: str):
    if fastpath == "python":
        return KitePy() if mode == "off" else KiteDnsPy()
    return Kite() if mode == "off" else KiteDns()


def label(mode: str) -> str:
    return {"off": "kite (DNS off)", "idle": "kite-dns (idle)", "load": "kite-dns (+load)"}[mode]


def run_mode(ctx: Ctx, res: Results, mode: str, rnd: int, kind: str) -> None:
    a = ctx.args
    prog = ctx.progress
    system = mode_system(mode, a.fastpath)
    run = load = None
    prog.step("starting")
    try:
        run = system.start(ctx, f"{mode}-r{rnd}")
        prog.step("check")
        chk = check_system(ctx, run)
        res.emit({"type": "check", "round": rnd, "system": mode, **chk})
        if mode == "load":
            load = DnsLoad(ctx, run.dns_port, a.qps, a.mix, kind, f"r{rnd}")
            time.sleep(1.0)  # the load is steady before the workloads start
            if not load.alive():
                raise BenchError("the DNS load exited at once (see its log)")
        for w in a.workloads:
            if w in ("c50", "newconn") and not ctx.wrk:
                continue
            prog.step(w)
            watch = Interference([*run.pids.values(), ctx.origin_proc.pid])
            m = WORKLOADS[w](ctx, run)
            m.update(watch.result())
            dead = run.dead()
            if dead:
                raise BenchError(f"during {w}: " + "; ".join(dead))
            res.sample(rnd, mode, w, m)
        if load is not None:
            stats = load.stop()
            load = None
            res.emit({"type": "dnsload", "round": rnd, **stats})
            res.samples.append({"type": "dnsload", "round": rnd, "system": mode,
                                "workload": "dnsload", "metrics": stats})
    except (BenchError, OSError) as exc:
        prog.note(f"{mode} round {rnd}: {exc}")
        res.emit({"type": "error", "round": rnd, "system": mode, "error": str(exc)})
    finally:
        if load is not None:
            load.stop()
        if run is not None:
            ctx.procs.stop(*run.procs.values())


def report(res: Results, modes: list[str], args, out=sys.stdout) -> list[dict]:
    """The table: per figure and mode the median (min..max), and its ratio to the first mode."""
    ref = modes[0]
    rows = []
    print(f"\nthroughput by mode (median of {args.rounds} rounds, min..max); ratio to {ref}", file=out)
    head = f"{'':<18}" + "".join(f"{label(m):>32}" for m in modes)
    print(head, file=out)
    for w, key, title in FIGURES:
        if w not in args.workloads:
            continue
        cells = []
        base = res.median(ref, w, key)
        for m in modes:
            s = res.summary(m, w, key)
            if s is None:
                cells.append(f"{'-':>32}")
                continue
            ratio = s["median"] / base if base else None
            cells.append((f"{s['median']:.1f} ({s['min']:.0f}..{s['max']:.0f})"
                          f"{'' if ratio is None else f' x{ratio:.3f}'}").rjust(32))
            if m != ref and ratio is not None:
                rows.append({"figure": title, "mode": m, "ref": ref, "ratio": ratio,
                             "within": abs(1 - ratio) <= TOLERANCE})
        print(f"{title:<18}" + "".join(cells), file=out)
    loads = [s["metrics"] for s in res.samples if s.get("workload") == "dnsload"]
    if loads:
        qps = ", ".join(f"{x['answered_qps']:.0f}" for x in loads)
        lost = sum(x["sent"] - x["answered"] for x in loads)
        print(f"\nDNS load ({loads[0]['kind']}, --qps {args.qps}, --mix {args.mix}): answered "
              f"q/s per round: {qps}; not answered: {lost} of {sum(x['sent'] for x in loads)}; "
              f"codes (last round): {loads[-1].get('codes', '')}", file=out)
        if any(x["answered_qps"] < 0.95 * args.qps for x in loads):
            print(f"note: a round answered less than 95 % of {args.qps} q/s", file=out)
    if rows:
        ok = all(r["within"] for r in rows if r["mode"] == "load")
        print(f"\ntarget: throughput with DNS load within {TOLERANCE:.0%} of {ref}: "
              f"{'met' if ok else 'NOT met'} ("
              + ", ".join(f"{r['figure']} x{r['ratio']:.3f}" for r in rows if r["mode"] == "load")
              + ")", file=out)
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_udp-load"]:
        udp_load_main(argv[1:])
        return 0
    args = parser().parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"dns_under_load.py: unknown mode {m!r}; choose from {', '.join(MODES)}")
    resolve_args(args)
    for w in args.workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"dns_under_load.py: workload {w!r} is not one of {', '.join(WORKLOADS)}")
    progress = Progress(not args.no_progress)
    procs = Procs()

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    ctx = None
    res = Results(args.json or None)
    t_start = time.monotonic()
    try:
        kind = load_kind(args.load) if "load" in modes else "-"
        ctx = Ctx(args, procs, progress)
        progress.step("preparing files and certificates")
        ctx.make_files()
        ctx.kite_problem = ctx.locate_kite()
        ctx.make_certs()
        why = mode_system("idle", args.fastpath).unavailable(ctx)
        if why:
            raise BenchError(f"kite cannot run: {why}")
        progress.step("starting the origin")
        ctx.start_origin()
        res.emit({"type": "meta", "argv": argv, "modes": modes, "qps": args.qps, "load": kind,
                  "mix": args.mix, "kite": ctx.kite_where, "workloads": args.workloads,
                  "rounds": args.rounds, "cpus": os.cpu_count(), "fastpath": args.fastpath,
                  "work_dir": ctx.work, "wrk": bool(ctx.wrk)})
        for rnd in range(1, args.rounds + 1):
            k = (rnd - 1) % len(modes)
            for i, mode in enumerate(modes[k:] + modes[:k], 1):
                progress.prefix = f"round {rnd}/{args.rounds} · {mode} ({i}/{len(modes)}) · "
                run_mode(ctx, res, mode, rnd, kind)
        progress.prefix = ""
        progress.clear()
        print(f"kite: {ctx.kite_where}; workloads {', '.join(args.workloads)}; "
              f"{os.cpu_count()} CPUs{'; pinned' if args.pin else ''}")
        for n in progress.notes:
            print(f"note: {n}")
        for row in report(res, modes, args):
            res.emit({"type": "ratio", **row})
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
        print(f"dns_under_load.py: {exc}", file=sys.stderr)
        return 1
    finally:
        clean_up(procs, res, ctx, args.keep)


if __name__ == "__main__":
    sys.exit(main())
