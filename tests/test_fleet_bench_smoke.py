"""Smoke test of the fleet benchmark's hand-over phase (bench/fleet_bench.py) with tiny sizes.

It checks that the benchmark starts its fleet (a redis-server of its own, relays A and B, a
backend, and with ``--nginx`` nginx in the same shape), measures every path, writes its JSON
line and stops what it started.  It never asserts on a speed: benchmarks are not tests
(bench/README.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import support

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "fleet_bench.py"
NEEDED = ("redis-server", "redis-cli", "wrk", "curl")

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in NEEDED),
                       reason="needs " + ", ".join(NEEDED)),
]


@pytest.mark.skipif(not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")),
                    reason="needs nginx (apt-get install nginx-light)")
def test_handover_phase_beside_nginx_in_the_same_shape(tmp_path):
    before = support.processes_mentioning("kite-fleet-bench-")  # its work directory
    jsonl = tmp_path / "fleet.jsonl"
    argv = [sys.executable, str(BENCH), "--only", "handover", "--rounds", "1",
            "--seconds", "1", "--conns", "4", "--bulk-mb", "4", "--nginx",
            "--json", str(jsonl)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "hand-over:" in proc.stdout and "nginx in that shape:" in proc.stdout
    record = json.loads(jsonl.read_text().splitlines()[-1])
    handover = record["handover"]
    for path in ("a", "b", "na", "nb"):  # kite direct and via B, nginx direct and via B
        assert len(handover["rps"][path]) == 1 and handover["rps"][path][0] > 0, path
        assert handover["cps"][path][0] > 0, path
        assert handover["mbs"][path][0] > 0, path
    for key in ("handover", "handover_nginx"):
        assert {"rps_ratio", "cps_ratio", "mbs_ratio"} <= set(record[key]), key
    assert support.processes_mentioning("kite-fleet-bench-") - before == set()
