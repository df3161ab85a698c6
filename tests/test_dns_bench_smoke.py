"""Smoke tests of the DNS benchmarks with tiny sizes: bench/dns_bench.py (kite and Knot under
dnsperf), bench/dns_under_load.py (the relay's tunnel throughput with its DNS idle and under
a steady load) and bench/dns_handler_bench.py (the query path's CPU cost).  Each starts what
it needs, reports, and stops what it started.  They never assert on a speed (bench/README.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _have(*tools: str) -> bool:
    return all(shutil.which(t) or Path(f"/usr/sbin/{t}").exists() for t in tools)


@pytest.mark.skipif(not _have("dnsperf", "knotd", "dig"),
                    reason="needs dnsperf, knotd and dig (apt-get install dnsperf knot dnsutils)")
def test_dns_bench_runs(tmp_path):
    jsonl = tmp_path / "dns.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "dns_bench.py"), "--rounds", "1",
                           "--seconds", "1", "--systems", "kite,knot", "--cases", "hit,miss",
                           "--json", str(jsonl)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kite / knot: hit" in proc.stdout and "wrong answers" not in proc.stderr
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert {(r["system"], r["case"]) for r in records} == {
        ("kite", "hit"), ("kite", "miss"), ("knot", "hit"), ("knot", "miss")}
    assert all(r["qps"] > 0 for r in records)
    codes = {(r["system"], r["case"]): r["codes"] for r in records}
    assert codes[("kite", "hit")].startswith("NOERROR") and codes[("kite", "miss")].startswith("NXDOMAIN")
    out = subprocess.run(["pgrep", "-f", "kite-dns-bench"], capture_output=True, text=True).stdout
    assert not out.strip()  # nothing of the run is left behind


def _fastpath() -> str:
    try:
        import kite._fastpath  # noqa: F401
    except ImportError:
        return "python"
    return "compiled"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the harness reads /proc")
@pytest.mark.parametrize("load", ["python", "dnsperf"])
def test_dns_under_load_runs(tmp_path, load):
    if load == "dnsperf" and not _have("dnsperf"):
        pytest.skip("dnsperf not installed")
    jsonl = tmp_path / "dul.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "dns_under_load.py"), "--rounds", "1",
                           "--modes", "off,idle,load", "--load", load, "--qps", "300",
                           "--bulk-size", "4M", "--check-size", "256K", "--wrk-duration", "1",
                           "--fastpath", _fastpath(), "--json", str(jsonl), "--no-progress"],
                          capture_output=True, text=True, timeout=180, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    by_type: dict = {}
    for rec in records:
        by_type.setdefault(rec["type"], []).append(rec)
    assert not by_type.get("error"), by_type.get("error")
    meta = by_type["meta"][0]
    assert {c["system"] for c in by_type["check"]} == {"off", "idle", "load"}
    assert all(c["ok"] for c in by_type["check"])
    samples = {(s["system"], s["workload"]): s["metrics"] for s in by_type["sample"]}
    for mode in ("off", "idle", "load"):
        assert samples[(mode, "bulk")]["down_MBps"] > 0 and samples[(mode, "bulk")]["up_MBps"] > 0
        if meta["wrk"]:
            assert samples[(mode, "c50")]["rps"] > 0
    (dnsload,) = by_type["dnsload"]
    assert dnsload["kind"] == load and dnsload["answered"] > 0 and dnsload["sent"] >= dnsload["answered"]
    assert "NOERROR" in dnsload["codes"] and "NXDOMAIN" in dnsload["codes"]  # hits and misses
    assert {(r["figure"], r["mode"]) for r in by_type["ratio"]} >= {("bulk down MB/s", "load")}
    assert "throughput by mode" in proc.stdout and "DNS load (" in proc.stdout
    # everything it started is gone, and so is its work directory
    out = subprocess.run(["pgrep", "-f", meta["work_dir"]], capture_output=True, text=True).stdout
    assert not out.strip() and not os.path.exists(meta["work_dir"])


def test_dns_handler_bench_runs(tmp_path):
    jsonl = tmp_path / "h.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "dns_handler_bench.py"),
                           "--queries", "200", "--repeats", "1", "--json", str(jsonl)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert {(r["case"], r["mode"]) for r in records} == {
        (c, m) for c in ("miss-random", "miss-random-edns", "outside", "hit", "hit-uncached")
        for m in ("templates", "dnspython")}
    assert all(r["best_us"] > 0 for r in records)
