#!/usr/bin/env python3
"""CPU cost of one DNS query in the relay's query path (``DnsServer.handle``), without sockets.

A tight loop hands prepared query messages to the handler of a ``DnsServer`` whose zone has
one kite flying, with the template negative answers (kite.names.negative) on and off, so one
run shows the cost before and after them:

* ``miss-random``: different names that do not exist (the answer cache never hits), no EDNS.
* ``miss-random-edns``: the same with EDNS and a client COOKIE (what resolvers send).
* ``outside``: different names outside the zone (REFUSED).
* ``hit``: ``app.ZONE A`` again and again (the answer cache).
* ``hit-uncached``: ``app.ZONE A`` with the cache emptied before each query (dnspython).

Per case and mode: the best and the median of ``--repeats`` passes over ``--queries``
messages, in microseconds of process CPU time per query.  The figure is only comparable on
one machine; it measures, it does not assert (bench/README.md).

    python bench/dns_handler_bench.py
    python bench/dns_handler_bench.py --queries 5000 --repeats 3 --json out.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
if os.path.isdir(os.path.join(SRC, "kite")) and SRC not in sys.path:
    sys.path.insert(0, SRC)

import dns.edns  # noqa: E402
import dns.message  # noqa: E402

from kite.names.server import DnsServer  # noqa: E402
from kite.names.zone import Zone  # noqa: E402

ZONE = "bench.kite"
CASES = ("miss-random", "miss-random-edns", "outside", "hit", "hit-uncached")
MODES = ("templates", "dnspython")


def queries(case: str, n: int, seed: int = 1) -> list:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
        kw: dict = {}
        if case == "miss-random":
            name = f"{label}.{ZONE}"
        elif case == "miss-random-edns":
            name = f"{label}.{ZONE}"
            kw = {"use_edns": 0, "payload": 1232,
                  "options": [dns.edns.CookieOption(rng.randbytes(8), b"")]}
        elif case == "outside":
            name = f"{label}.example.com"
        else:
            name = f"app.{ZONE}"
        q = dns.message.make_query(name, "A", **kw)
        q.id = i & 0xFFFF
        out.append(q.to_wire())
    return out


def server(mode: str) -> DnsServer:
    zone = Zone(ZONE, ["192.0.2.10"], ns_names=[f"relay.{ZONE}"], own_names=[f"relay.{ZONE}"])
    zone.presence("http", f"app.{ZONE}", True)
    return DnsServer(zone, [], rate_limit=100_000_000, fast_negative=(mode == "templates"))


def one_pass(s: DnsServer, msgs: list, uncached: bool) -> float:
    """CPU seconds per query of one pass over ``msgs``."""
    handle = s.handle
    caches = s._caches
    for c in caches:
        c.clear()
    t = time.process_time()
    if uncached:
        for m in msgs:
            caches[0].clear()
            handle(m, "198.51.100.1", False)
    else:
        for m in msgs:
            handle(m, "198.51.100.1", False)
    return (time.process_time() - t) / len(msgs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=20_000, help="messages per pass")
    ap.add_argument("--repeats", type=int, default=5, help="passes per case and mode")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", help="JSON lines output")
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    for c in cases:
        if c not in CASES:
            ap.error(f"unknown case {c!r}; choose from {', '.join(CASES)}")
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    records = []
    print(f"{'case':<18}{'mode':<11}{'best us/q':>10}{'median':>9}")
    for case in cases:
        msgs = queries(case, args.queries)
        row = {}
        for mode in modes:
            s = server(mode)
            one_pass(s, msgs[:200], case == "hit-uncached")  # warm up
            times = [one_pass(s, msgs, case == "hit-uncached") * 1e6 for _ in range(args.repeats)]
            assert s.stats["failed"] == 0
            rec = {"case": case, "mode": mode, "best_us": round(min(times), 2),
                   "median_us": round(statistics.median(times), 2), "queries": args.queries,
                   "repeats": args.repeats}
            records.append(rec)
            row[mode] = rec["best_us"]
            print(f"{case:<18}{mode:<11}{rec['best_us']:>10.1f}{rec['median_us']:>9.1f}")
        if len(row) == 2 and row["templates"]:
            print(f"{'':<18}{'dnspython / templates':<21}{row['dnspython'] / row['templates']:>7.1f}x")
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
