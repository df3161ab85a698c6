"""Micro-benchmark: the X-Forwarded-* rewriter (kite.proto.forwarded) per request head.

``kite expose`` passes every request head of an HTTP kite through ``ForwardedRewriter.feed``
(validate with llhttp, add X-Forwarded-For/-Proto/-Host, rename client-supplied forwarding
headers).  This measures the time per request for three request shapes, fed the way a
keep-alive stream arrives (one whole head per feed, one rewriter for the stream), beside
the rewriter's Python path alone (``python path``: without the compiled rewrite of a head
that has no body, ``kite._forwarded``; what runs where kite has no compiled modules) and
two baselines on the same heads:

* ``llhttp+on_header``: only parsing the head with a reused ``httptools.HttpRequestParser``
  whose protocol has an ``on_header`` callback (what reading the fields through llhttp
  costs, without any rewriting);
* ``llhttp``: the same parser without ``on_header`` (validation alone).

Usage::

    python bench/bench_forwarded.py            # table on stdout, JSON in bench/results/forwarded.json
    python bench/bench_forwarded.py --runs 9 --number 50000
    git show 7784fca:src/kite/proto/forwarded.py > /tmp/forwarded_old.py
    python bench/bench_forwarded.py --baseline /tmp/forwarded_old.py   # plus that version's rewriter
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

import httptools

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from kite.proto.forwarded import ForwardedRewriter  # noqa: E402 - after the path above

HEADS = {
    # What wrk sends in the relay benchmark's c50 workload.
    "wrk GET": b"GET /1k.bin HTTP/1.1\r\nHost: app.bench.kite\r\n\r\n",
    # A browser's sub-resource request (Firefox 128): 13 field lines.
    "browser GET": (
        b"GET /static/app.js?v=3 HTTP/1.1\r\nHost: app.example.com\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
        b"Accept: */*\r\nAccept-Language: en-US,en;q=0.5\r\n"
        b"Accept-Encoding: gzip, deflate, br, zstd\r\nReferer: https://app.example.com/\r\n"
        b"Connection: keep-alive\r\nCookie: session=abcdef0123456789; theme=dark\r\n"
        b"Sec-Fetch-Dest: script\r\nSec-Fetch-Mode: no-cors\r\nSec-Fetch-Site: same-origin\r\n"
        b"Priority: u=2\r\n\r\n"
    ),
    # A client behind another proxy: its own X-Forwarded-For is renamed X-Old-...
    "proxied GET": (
        b"GET /api/v1/items HTTP/1.1\r\nHost: app.example.com\r\nAccept: application/json\r\n"
        b"X-Forwarded-For: 198.51.100.7\r\nX-Forwarded-Proto: https\r\n\r\n"
    ),
}


class PythonPath(ForwardedRewriter):
    """The rewriter without its compiled one-head path (kite._forwarded)."""

    __slots__ = ()
    _one_head = None


class _Fields:
    def __init__(self) -> None:
        self.n = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self.n += 1


class _Bare:
    pass


def per_call_us(fn, number: int, runs: int) -> list:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        out.append((time.perf_counter() - t0) / number * 1e6)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7, help="runs per case (median, min..max)")
    ap.add_argument("--number", type=int, default=20000, help="heads per run")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "forwarded.json"),
                    help="where to write every run ('' for none)")
    ap.add_argument("--baseline", default="",
                    help="another version of kite/proto/forwarded.py to measure beside this one")
    args = ap.parse_args(argv)
    versions = {"rewriter": ForwardedRewriter}
    if ForwardedRewriter._one_head is not None:
        versions["python path"] = PythonPath  # the compiled path off: what the twin runs
    if args.baseline:
        spec = importlib.util.spec_from_file_location("forwarded_baseline", args.baseline)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        versions["baseline"] = mod.ForwardedRewriter
    columns = list(versions) + ["llhttp+on_header", "llhttp"]

    cases = {}
    for name, head in HEADS.items():
        for label, cls in versions.items():
            rw = cls(client_ip="203.0.113.7", proto="https", host="app.example.com")
            assert rw.feed(head).startswith(head.split(b"\r\n", 1)[0] + b"\r\nX-Forwarded-For: ")
            cases[name, label] = lambda rw=rw, head=head: rw.feed(head)
        p_fields = httptools.HttpRequestParser(_Fields())
        p_bare = httptools.HttpRequestParser(_Bare())
        cases[name, "llhttp+on_header"] = lambda p=p_fields, head=head: p.feed_data(head)
        cases[name, "llhttp"] = lambda p=p_bare, head=head: p.feed_data(head)
    # Interleave every case run by run, so a slow phase of the machine hits all of them.
    times = {k: [] for k in cases}
    for _ in range(args.runs):
        for k, fn in cases.items():
            times[k] += per_call_us(fn, args.number, 1)
    rows = []
    print(f"X-Forwarded rewriter, one whole head per feed; us per request head; "
          f"median of {args.runs} runs of {args.number} (min..max)")
    print(f"{'head':<12} {'bytes':>5}  " + "  ".join(f"{c:>22}" for c in columns))
    for name, head in HEADS.items():
        cells = []
        for what in columns:
            v = times[name, what]
            cells.append(f"{statistics.median(v):6.2f} ({min(v):.2f}..{max(v):.2f})")
            rows.append({"head": name, "bytes": len(head), "case": what, "us": v})
        print(f"{name:<12} {len(head):>5}  " + "  ".join(f"{c:>22}" for c in cells))
    if args.json:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"python": platform.python_version(), "httptools": httptools.__version__,
                       "runs": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
