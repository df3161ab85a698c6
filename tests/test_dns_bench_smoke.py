"""Smoke test of bench/dns_bench.py with tiny sizes: it starts kite and Knot, checks their
answers, runs dnsperf and reports, and stops what it started.  It never asserts on a speed
(bench/README.md)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) or Path(f"/usr/sbin/{t}").exists() for t in ("dnsperf", "knotd", "dig")),
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
