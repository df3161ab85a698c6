"""Results: the samples and JSON lines, medians with min..max, the table, the curves'
tables, the notes under them, kite's targets, and the PNG charts."""

from __future__ import annotations

import json
import os
import statistics
import sys

from .common import GiB, KiB, MiB


def human_size(n: int) -> str:
    """64 MiB, 1 GiB: the largest binary unit that divides ``n``."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def fmt(v) -> str:
    """A figure with three significant digits or so; "-" for None."""
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


#: (workload, metric key, column title, higher is better)
COLUMNS = {
    "bulk": [("down_MBps", "down MB/s", True), ("up_MBps", "up MB/s", True)],
    "cpu": [("relay_cpu_s_per_GB_down", "relay s/GB down", False),
            ("backend_cpu_s_per_GB_down", "backend s/GB down", False),
            ("relay_cpu_s_per_GB_up", "relay s/GB up", False),
            ("backend_cpu_s_per_GB_up", "backend s/GB up", False)],
    "c50": [("rps", "req/s", True), ("p50_ms", "p50 ms", False), ("p99_ms", "p99 ms", False),
            ("idle_pct", "CPU idle %", False)],
    "c50cpu": [("relay_user_us_per_req", "relay user", False),
               ("relay_sys_us_per_req", "relay sys", False),
               ("backend_user_us_per_req", "backend user", False),
               ("backend_sys_us_per_req", "backend sys", False)],
    "seq": [("rps", "req/s", True), ("p50_ms", "p50 ms", False), ("p99_ms", "p99 ms", False)],
    "newconn": [("cps", "conns/s", True), ("p50_ms", "p50 ms", False), ("p99_ms", "p99 ms", False),
                ("idle_pct", "CPU idle %", False)],
    "scale-conns": [("rps", "req/s", True), ("p50_ms", "p50 ms", False), ("p99_ms", "p99 ms", False),
                    ("errors", "wrk errors", False)],
    "scale-downloads": [("MBps", "MB/s", True), ("jain", "Jain's index", True),
                        ("min_conn_MBps", "slowest MB/s", True),
                        ("relay_cpu_s_per_GB", "relay s/GB", False),
                        ("backend_cpu_s_per_GB", "backend s/GB", False)],
    "scale-uploads": [("MBps", "MB/s", True), ("jain", "Jain's index", True),
                      ("min_conn_MBps", "slowest MB/s", True),
                      ("relay_cpu_s_per_GB", "relay s/GB", False),
                      ("backend_cpu_s_per_GB", "backend s/GB", False)],
    "idle": [("ok", "conns", True), ("KiB_per_conn", "KiB/conn r+b", False),
             ("relay_KiB_per_conn", "relay KiB/c", False),
             ("backend_KiB_per_conn", "backend KiB/c", False),
             ("p50_ms", "p50 ms", False), ("p99_ms", "p99 ms", False)],
}


class Results:
    """Every sample of the run, and the JSON lines file (``path``) every record goes to."""

    def __init__(self, path: str | None):
        self.samples: list[dict] = []
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

    def values(self, system: str, workload: str, key: str) -> list[float]:
        return [s["metrics"][key] for s in self.samples
                if s["system"] == system and s["workload"] == workload
                and isinstance(s["metrics"].get(key), (int, float))
                and not isinstance(s["metrics"].get(key), bool)]

    def summary(self, system: str, workload: str, key: str) -> dict | None:
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


def workload_sections(args) -> list[tuple]:
    """(section title, workload key in samples, column key) in table order."""
    secs = []
    if "bulk" in args.workloads:
        secs.append(((f"bulk: {human_size(args.bulk_size)} down and up, one connection "
                      f"(cut at {args.bulk_cap:g} s)"), "bulk", "bulk"))
        secs.append(("CPU seconds per GB (10^9 B) relayed, from the bulk transfers", "bulk", "cpu"))
    if "c50" in args.workloads:
        secs.append(((f"c{args.wrk_conns}: wrk, {args.wrk_conns} keep-alive connections, 1 KiB file, "
                      f"{args.wrk_duration} s"), "c50", "c50"))
        secs.append((f"c{args.wrk_conns}: CPU microseconds per request (user / system)", "c50", "c50cpu"))
    if "seq" in args.workloads:
        secs.append((f"seq: one connection, sequential 1 KiB requests, {args.seq_duration} s",
                     "seq", "seq"))
    if "newconn" in args.workloads:
        secs.append(((f"newconn: one request per connection (Connection: close), "
                      f"{args.newconn_conns} at a time, {args.newconn_duration} s"), "newconn", "newconn"))
    if "scale-conns" in args.workloads:
        for n in args.conn_levels:
            secs.append(((f"scale-conns {n}: wrk, {n} keep-alive connections, 1 KiB file, "
                          f"{args.wrk_duration} s"), f"scale-conns-{n}", "scale-conns"))
    if "scale-downloads" in args.workloads:
        for n in args.download_levels:
            secs.append(((f"scale-downloads {n}: {n} concurrent downloads of the bulk file for "
                          f"{args.download_duration:g} s"), f"scale-downloads-{n}", "scale-downloads"))
    if "scale-uploads" in args.workloads:
        for n in args.download_levels:
            secs.append(((f"scale-uploads {n}: {n} concurrent endless uploads, counted for "
                          f"{args.download_duration:g} s after 1 s"), f"scale-uploads-{n}",
                         "scale-uploads"))
    if "idle" in args.workloads:
        for n in args.idle_conns:
            secs.append(((f"idle {n}: idle keep-alive visitors; RSS growth per connection of relay + "
                          f"backend, latency of one connection meanwhile"), f"idle-{n}", "idle"))
    return secs


def cell(sm: dict | None) -> str:
    """A table cell: the median, with (min..max) when the rounds differ; "-" for none."""
    if sm is None:
        return "-"
    if sm["n"] == 1 or sm["min"] == sm["max"]:
        return fmt(sm["median"])
    return f"{fmt(sm['median'])} ({fmt(sm['min'])}..{fmt(sm['max'])})"


def print_table(res: Results, systems: list[str], args, out=sys.stdout) -> None:
    w_sys = max(14, max(len(s) for s in systems) + 1)
    for title, workload, colkey in workload_sections(args):
        cols = COLUMNS[colkey]
        rows = []
        for s in systems:
            cells = []
            for key, _, _ in cols:
                cells.append(cell(res.summary(s, workload, key)))
            if any(c != "-" for c in cells):
                rows.append((s, cells))
        if not rows:
            continue
        widths = [max(len(c[1]), *(len(r[1][i]) for r in rows)) for i, c in enumerate(cols)]
        print(f"\n{title}", file=out)
        header = f"{'system':<{w_sys}}" + "".join(f"  {c[1]:>{w}}" for c, w in zip(cols, widths, strict=True))
        print(header, file=out)
        print("-" * len(header), file=out)
        for s, cells in rows:
            print(
                f"{s:<{w_sys}}" + "".join(f"  {c:>{w}}" for c, w in zip(cells, widths, strict=True)), file=out
            )


def curve_levels(args) -> list[tuple[str, list[int], str]]:
    """(curve, its levels, what a level counts) for each curve of the run."""
    out = []
    if "scale-conns" in args.workloads:
        out.append(("scale-conns", args.conn_levels, "keep-alive connections"))
    if "scale-downloads" in args.workloads:
        out.append(("scale-downloads", args.download_levels, "concurrent downloads"))
    if "scale-uploads" in args.workloads:
        out.append(("scale-uploads", args.download_levels, "concurrent uploads"))
    if "idle" in args.workloads:
        out.append(("idle", args.idle_conns, "idle visitors"))
    return out


#: (curve, metric, title) of the curves' tables and the panels of their chart.
CURVE_METRICS = [
    ("scale-conns", "rps", "requests/s, 1 KiB file, keep-alive"),
    ("scale-conns", "p99_ms", "p99 latency, ms"),
    ("scale-downloads", "MBps", "aggregate download MB/s"),
    ("scale-downloads", "jain", "fairness: Jain's index over bytes per download"),
    ("scale-uploads", "MBps", "aggregate upload MB/s"),
    ("scale-uploads", "jain", "fairness: Jain's index over bytes per upload"),
    ("idle", "KiB_per_conn", "RSS KiB per visitor, relay + backend"),
]


def print_curves(res: Results, systems: list[str], args, out=sys.stdout) -> None:
    """One table per curve and metric: a row per system, a column per level, each cell the
    median (min..max) of the rounds."""
    sizes = {c: n for c, _, n in curve_levels(args)}
    for curve, lv, _ in curve_levels(args):
        for c, key, title in CURVE_METRICS:
            if c != curve:
                continue
            rows = []
            for s in systems:
                cells = []
                for n in lv:
                    cells.append(cell(res.summary(s, f"{curve}-{n}", key)))
                if any(x != "-" for x in cells):
                    rows.append((s, cells))
            if not rows:
                continue
            heads = [f"{n:,}" for n in lv]
            widths = [max(len(h), *(len(r[1][i]) for r in rows)) for i, h in enumerate(heads)]
            w_sys = max(14, max(len(s) for s in systems) + 1)
            print(f"\n{curve}: {title}, by {sizes[curve]}", file=out)
            header = f"{'system':<{w_sys}}" + "".join(
                f"  {h:>{w}}" for h, w in zip(heads, widths, strict=True)
            )
            print(header, file=out)
            print("-" * len(header), file=out)
            for s, cells in rows:
                print(
                    f"{s:<{w_sys}}" + "".join(f"  {x:>{w}}" for x, w in zip(cells, widths, strict=True)),
                    file=out,
                )


def targets(res: Results, args) -> list[dict]:
    """The issues' targets for kite (compiled, uvloop; kite-tls for HTTPS visitors), from the
    medians of this run."""
    out = []

    def ratio(metric_sys, workload, key, ref_sys, need, title, higher=True):
        a, b = res.median(metric_sys, workload, key), res.median(ref_sys, workload, key)
        if a is None or b is None or b == 0:
            return
        r = a / b
        out.append({"target": title, "kite": a, "ref": b, "ratio": r, "need": need,
                    "met": r >= need if higher else r <= need})

    # The bar of issue 19 (the first bar, met earlier: bulk 1.0x, c50 1.5x stunnel).
    for d in ("down", "up"):
        ratio("kite", "bulk", f"{d}_MBps", "stunnel", 1.5, f"bulk {d} >= 1.5x stunnel")
        ratio("kite", "bulk", f"{d}_MBps", "pagekite-tuned", 10.0, f"bulk {d} >= 10x pagekite-tuned")
    ratio("kite", "c50", "rps", "stunnel", 2.5, f"c{args.wrk_conns} req/s >= 2.5x stunnel")
    ratio("kite", "c50", "rps", "haproxy", 1.0, f"c{args.wrk_conns} req/s >= haproxy (moonshot)")
    ratio("kite", "c50", "rps", "pagekite-tuned", 10.0, f"c{args.wrk_conns} req/s >= 10x pagekite-tuned")
    p99 = res.median("kite", "c50", "p99_ms")
    if p99 is not None:
        out.append({"target": f"c{args.wrk_conns} p99 <= 3 ms", "kite": p99, "need": 3.0, "met": p99 <= 3.0})
    ratio("kite", "seq", "rps", "stunnel", 1.0, "seq (c1) req/s >= 1.0x stunnel")
    ratio("kite", "seq", "p50_ms", "stunnel", 1.0, "seq (c1) p50 <= stunnel's", higher=False)
    ratio("kite", "newconn", "cps", "stunnel", 2.0, "new conns/s >= 2x stunnel")
    for n in args.idle_conns if "idle" in args.workloads else ():
        kib = res.median("kite", f"idle-{n}", "KiB_per_conn")
        if kib is not None:
            out.append({"target": f"idle {n}: <= 8 KiB per connection (relay + backend)",
                        "kite": kib, "need": 8.0, "met": kib <= 8.0})
    # HTTPS visitors (issue 14): kite terminating TLS against nginx terminating TLS
    ratio("kite-tls", "bulk", "down_MBps", "nginx-tls", 0.8, "https bulk down >= 0.8x nginx-tls")
    ratio("kite-tls", "c50", "rps", "nginx-tls", 0.8, f"https c{args.wrk_conns} req/s >= 0.8x nginx-tls")
    for d in ("down", "up"):
        k = [res.median("kite", "bulk", f"{r}_cpu_s_per_GB_{d}") for r in ("relay", "backend")]
        s = [res.median("stunnel", "bulk", f"{r}_cpu_s_per_GB_{d}") for r in ("relay", "backend")]
        if None not in k and None not in s and sum(s):
            r = sum(k) / sum(s)
            out.append({"target": f"CPU per GB {d} (relay + backend) <= 0.6x stunnel", "kite": sum(k),
                        "ref": sum(s), "ratio": r, "need": 0.6, "met": r <= 0.6})
    return out


def print_targets(tg: list[dict], out=sys.stdout) -> None:
    if not tg:
        return
    print("\ntargets for kite (medians of this run)", file=out)
    for t in tg:
        detail = (f"kite {fmt(t['kite'])} vs {fmt(t['ref'])} = {t['ratio']:.2f}x (need {fmt(t['need'])}x)"
                  if "ratio" in t else f"kite {fmt(t['kite'])} (need {fmt(t['need'])})")
        print(f"  {'met   ' if t['met'] else 'MISSED'}  {t['target']:<52} {detail}", file=out)


def save_figure(plt, fig, path: str) -> None:
    """Lay ``fig`` out, write it to ``path`` (its folder made if needed) and free it."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_png(res: Results, systems: list[str], args, path: str, meta: dict) -> str | None:
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
    for ax, (title, workload, series) in zip(axes[0], panels, strict=True):
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
            for b, m, h in zip(bars, meds, hi, strict=True):
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
    save_figure(plt, fig, path)
    return None


def _tick(v: float) -> str:
    """An axis label: 20,000 or 0.5."""
    return f"{v:,.0f}" if v >= 1 else f"{v:g}"


def draw_curves_png(res: Results, systems: list[str], args, path: str, meta: dict) -> str | None:
    """The curves: one panel per curve and metric, a line per system through the medians,
    bars min..max, levels on a log x axis."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib not installed: no chart (pip install matplotlib)"
    lv = {c: (levels, what) for c, levels, what in curve_levels(args)}
    panels = [(c, key, title) for c, key, title in CURVE_METRICS if c in lv
              and any(res.summary(s, f"{c}-{n}", key) for s in systems for n in lv[c][0])]
    if not panels:
        return "no curve has a result"
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (curve, key, title) in zip(axes.flat, panels, strict=False):
        levels, what = lv[curve]
        for s in systems:
            xs, meds, lo, hi = [], [], [], []
            for n in levels:
                sm = res.summary(s, f"{curve}-{n}", key)
                if sm:
                    xs.append(n)
                    meds.append(sm["median"])
                    lo.append(sm["median"] - sm["min"])
                    hi.append(sm["max"] - sm["median"])
            if xs:
                ax.errorbar(xs, meds, yerr=[lo, hi], marker="o", markersize=4, capsize=3,
                            linewidth=1.2, label=s)
        ax.set_xscale("log")
        ax.set_xticks(levels)
        ax.set_xticklabels([f"{n:,}" for n in levels], fontsize=7)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if key == "jain":
            ax.set_ylim(0, 1.05)
        else:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: _tick(v)))

            def minor(v, _, ax=ax):  # every one within a decade, else 2x and 5x only
                lo, hi = ax.get_ylim()
                return _tick(v) if hi < 10 * lo or f"{v:e}"[0] in "25" else ""
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(minor))
            ax.tick_params(axis="y", which="both", labelsize=7)
        ax.set_xlabel(what, fontsize=8)
        ax.set_title(f"{curve}: {title}", fontsize=9)
        ax.grid(which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"kite relay benchmark, scaling curves, loopback, {meta['cpus']} CPUs, origin "
                 f"{meta['origin']}: median of {args.rounds} rounds, bars min..max", fontsize=9)
    save_figure(plt, fig, path)
    return None


def print_header(meta: dict, out=sys.stdout) -> None:
    """What ran where: machine, origin, kite, the systems run and skipped."""
    print(f"kite relay benchmark: {meta['time']}, {meta['cpus']} CPUs ({meta['cpu_model']}), "
          f"Python {meta['python']}, origin {meta['origin']}", file=out)
    print(f"kite: {meta['kite']} ({meta['kite_from']}"
          + (f", git {meta['kite_git']}" if meta["kite_git"] else "") + f"); pinning: {meta['pinning']}",
          file=out)
    for s in meta["systems"]:
        print(f"  {s:<15} {meta['titles'][s]}" + (f" [{meta['versions'][s]}]" if meta['versions'][s] else ""),
              file=out)
    for s, why in meta["skipped"].items():
        print(f"  {s:<15} skipped: {why}", file=out)
    print(f"median of {meta['sizes']['rounds']} interleaved round(s), (min..max); "
          f"MB = 10^6 bytes, GB = 10^9 bytes", file=out)


def print_notes(res: Results, args, notes: list[str], out=sys.stdout) -> None:
    """Under the table: cut transfers, a shared machine or the hypervisor's steal, failed
    connections, wrk errors, then the run's notes (first lines)."""
    for s in res.samples:
        m = s["metrics"]
        where = f"{s['system']} round {s['round']} {s['workload']}"
        if s["workload"] == "bulk":
            for d in ("down", "up"):
                if m.get(f"{d}_complete") is False:
                    print(f"  note: {s['system']} round {s['round']}: bulk {d} cut at "
                          f"{args.bulk_cap:g} s after {m[f'{d}_bytes'] / MiB:.1f} MiB", file=out)
        busy = m.get("foreign_cpu_s", 0.0) + m.get("steal_s", 0.0)
        if busy > 0.25 * m.get("wall_s", 1e9):
            print(f"  note: {where}: the machine was shared: other processes used "
                  f"{m['foreign_cpu_s']:.1f} CPU-s and the hypervisor stole {m['steal_s']:.1f} s in "
                  f"{m['wall_s']:.1f} s", file=out)
        elif (s["workload"] in ("c50", "seq", "newconn")
              or s["workload"].startswith(("idle", "scale-conns"))) \
                and m.get("steal_s", 0.0) > 0.02 * m.get("wall_s", 1e9):
            # Steal comes in pauses of milliseconds that every connection waits out, so a few
            # percent of stolen time shows in the p99.
            print(f"  note: {where}: the hypervisor stole {m['steal_s']:.2f} s of "
                  f"{m['wall_s']:.1f} s: its pauses are in the latency tail", file=out)
        if "note" in m:
            print(f"  note: {where}: {m['note']}", file=out)
        if m.get("failed"):
            print(f"  note: {where}: {m['failed']} connections failed: {m.get('errors')}", file=out)
        if m.get("errors") and (s["workload"] in ("c50", "seq", "newconn")
                                or s["workload"].startswith("scale-conns")):
            print(f"  note: {where}: {m['errors']} wrk errors {m.get('socket_errors', '')}", file=out)
    for text in notes:
        print(f"  note: {text.splitlines()[0]}", file=out)


def emit_summaries(res: Results, systems: list[str], args) -> None:
    """A ``summary`` record (median, min, max, n) per system, workload and metric."""
    for sys_name in systems:
        for w, cols in (("bulk", COLUMNS["bulk"] + COLUMNS["cpu"]),
                        ("c50", COLUMNS["c50"] + COLUMNS["c50cpu"]),
                        ("seq", COLUMNS["seq"]), ("newconn", COLUMNS["newconn"])):
            for key, _, _ in cols:
                sm = res.summary(sys_name, w, key)
                if sm:
                    res.emit({"type": "summary", "system": sys_name, "workload": w, "metric": key, **sm})
        levels = [("idle", n) for n in args.idle_conns]
        levels += [("scale-conns", n) for n in args.conn_levels]
        levels += [("scale-downloads", n) for n in args.download_levels]
        levels += [("scale-uploads", n) for n in args.download_levels]
        for kind, n in levels:
            for key, _, _ in COLUMNS[kind]:
                sm = res.summary(sys_name, f"{kind}-{n}", key)
                if sm:
                    res.emit({"type": "summary", "system": sys_name, "workload": f"{kind}-{n}",
                              "metric": key, "level": n, **sm})
