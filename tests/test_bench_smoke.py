"""Smoke test of the relay benchmark harness (bench/relay_bench.py, bench/relaybench/) with tiny sizes.

It checks that the harness starts the systems, runs its correctness check and every workload,
writes well-formed JSON lines and stops what it started.  It never asserts on a speed:
benchmarks are not tests (bench/README.md).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import support

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "bench" / "relay_bench.py"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the harness reads /proc and uses Linux sendfile")


def _relaybench(module: str):
    """A module of the harness's package, bench/relaybench/ (bench/ joins sys.path)."""
    bench = str(REPO / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module(f"relaybench.{module}")


def _kite_system() -> str:
    """`kite` needs the compiled fast path; without it the twin (`kite-py`) stands in."""
    try:
        import kite._fastpath  # noqa: F401
    except ImportError:
        return "kite-py"
    return "kite"


def _harness_processes(work_dir: str) -> list:
    """PIDs of live processes whose command line mentions the harness's work directory."""
    return sorted(support.processes_mentioning(work_dir))


def test_help_lists_systems_and_workloads():
    out = subprocess.run([sys.executable, str(HARNESS), "--help"], stdout=subprocess.PIPE,
                         timeout=30, check=True).stdout.decode()
    for word in ("--systems", "--workloads", "--quick", "stunnel", "pagekite-tuned", "kite-asyncio",
                 "newconn", "idle", "haproxy", "scale-conns", "scale-downloads", "--curves",
                 "--idle-levels", "--conn-levels", "--download-levels"):
        assert word in out


def test_parse_wrk_output():
    parse_wrk = _relaybench("wrk").parse_wrk
    parse_size = _relaybench("cli").parse_size
    out = """Running 3s test @ http://127.0.0.1:1234/1k.bin
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.20ms  300.00us   9.10ms   80.00%
    Req/Sec    41.00k     2.00k   44.00k    70.00%
  Latency Distribution
     50%  850.00us
     75%    1.30ms
     90%    1.60ms
     99%    2.25ms
  122700 requests in 3.00s, 137.45MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  40897.12
Transfer/sec:     45.81MB
"""
    r = parse_wrk(out)
    assert r["rps"] == pytest.approx(40897.12)
    assert r["p50_ms"] == pytest.approx(0.85)
    assert r["p99_ms"] == pytest.approx(2.25)
    assert r["requests"] == 122700
    assert r["errors"] == 7
    assert parse_size("64M") == 64 << 20 and parse_size("1G") == 1 << 30


def test_jain_index():
    jain = _relaybench("downloads").jain_index
    assert jain([5.0, 5.0, 5.0, 5.0]) == pytest.approx(1.0)
    assert jain([8.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)  # one got all: 1/n
    assert jain([3.0, 1.0]) == pytest.approx(16 / 20)
    assert jain([]) is None and jain([0, 0]) is None


def test_download_counts_body_bytes_across_chunks_and_asks_again():
    """The scale-downloads client: heads split across reads, a body that ends inside a read,
    the next GET sent at each end; only body bytes count."""
    import socket

    _Download = _relaybench("downloads")._Download
    a, b = socket.socketpair()
    try:
        d = _Download(a, b"GET /f HTTP/1.1\r\nHost: h\r\n\r\n")
        d.send_request()
        assert b.recv(100).startswith(b"GET /f ")
        stream = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789"
        for piece in (stream[:7], stream[7:40], stream[40:45], stream[45:]):
            d.received(memoryview(piece), len(piece))
        assert d.bytes == 10 and d.responses == 1
        assert b.recv(100).startswith(b"GET /f ")  # asked again at the end of the body
        d.received(memoryview(stream[:-3]), len(stream) - 3)
        assert d.bytes == 17 and d.responses == 1 and d.left == 3
        with pytest.raises(_relaybench("common").BenchError):
            bad = b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"
            d.left = -1
            d.received(memoryview(bad), len(bad))
    finally:
        a.close()
        b.close()


def test_limits_plan_idle_levels_and_sources():
    limits = _relaybench("limits")
    # within one port range: no binding; beyond: enough of 127.0.0.2, .3, ...
    assert limits.source_addresses(20_000, 27_232) == ["127.0.0.1"]
    assert limits.source_addresses(100_000, 27_232) == [f"127.0.0.{i}" for i in (2, 3, 4, 5)]
    with pytest.raises(ValueError):
        limits.source_addresses(10_000, 10)
    assert limits.level_plan(1000, [(19_800, "fds")]) == (1000, None, False)
    n, why, skip = limits.level_plan(10_000, [(9_715, "max_clients"), (27_232, "ports")])
    assert (n, skip) == (9_715, False) and "max_clients" in why and "ports" not in why
    n, why, skip = limits.level_plan(100_000, [(19_800, "fds"), (27_232, "ports")])
    assert (n, skip) == (19_800, True) and why.index("fds") < why.index("ports")
    wrk_threads = _relaybench("wrk").wrk_threads
    assert [wrk_threads(c, 2) for c in (1, 50, 1000, 5000)] == [1, 1, 1, 2]
    assert wrk_threads(5000, 8) == 5


def test_idle_client_spreads_visitors_over_source_addresses(tmp_path):
    """Beyond one port range the idle client binds 127.0.0.2, .3, ... in turn: every
    visitor is served, and the origin sees them from those addresses."""
    root = tmp_path / "www"
    (root / "up").mkdir(parents=True)
    (root / "1k.bin").write_bytes(os.urandom(1024))
    origin = subprocess.Popen([sys.executable, str(REPO / "bench" / "origin.py"), "--port", "0",
                               "--root", str(root)], stderr=subprocess.PIPE)
    client = None
    try:
        line = origin.stderr.readline().decode()
        port = int(line.rsplit(":", 1)[1])
        client = subprocess.Popen([sys.executable, str(HARNESS), "_idle-client", "--port", str(port),
                                   "--host", "o", "--conns", "40", "--timeout", "20",
                                   "--sources", "127.0.0.2,127.0.0.3"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        report = json.loads(client.stdout.readline())
        assert report["ok"] == 40 and report["failed"] == 0, report
        socks = _relaybench("measure").tcp_sockets()
        if socks is not None:  # ss installed: where the client's connections come from
            mine = [s["local"].rsplit(":", 1)[0] for s in socks
                    if s["peer_port"] == port and client.pid in s["pids"]]
            assert sorted(mine) == ["127.0.0.2"] * 20 + ["127.0.0.3"] * 20
    finally:
        if client is not None:
            client.stdin.close()
            client.wait(30)
            client.stdout.close()
        origin.kill()
        origin.wait(10)
        origin.stderr.close()


def test_harness_idle_level_beyond_one_port_range(tmp_path):
    """An idle level larger than --ports-per-address: the visitors come from 127.0.0.2, .3,
    and kite flies one kite per origin address, so every visitor is served."""
    kite_sys = _kite_system()
    jsonl = tmp_path / "relay.jsonl"
    argv = [sys.executable, str(HARNESS), "--systems", f"direct,{kite_sys}", "--rounds", "1",
            "--workloads", "idle", "--idle-levels", "50", "--ports-per-address", "20",
            "--idle-probe", "1", "--bulk-size", "4M", "--check-size", "256K",
            "--json", str(jsonl), "--png", "", "--no-progress"]
    proc = subprocess.run(argv, capture_output=True, timeout=120,
                          cwd=str(tmp_path))
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert not [r for r in records if r["type"] in ("error", "skip")]
    samples = {(r["system"], r["workload"]): r["metrics"] for r in records if r["type"] == "sample"}
    for system in ("direct", kite_sys):
        m = samples[(system, "idle-50")]
        assert m["ok"] == 50 and m["sources"] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert samples[(kite_sys, "idle-50")]["kites"] == ["app.bench.kite", "app2.bench.kite",
                                                        "app3.bench.kite"]


def test_harness_runs_the_curves(tmp_path):
    """scale-conns, scale-downloads and scale-uploads at small levels on direct and haproxy
    (skipped with a note where haproxy is not installed): a sample per level, the curve
    tables."""
    jsonl = tmp_path / "relay.jsonl"
    argv = [sys.executable, str(HARNESS), "--systems", "direct,haproxy", "--rounds", "1",
            "--workloads", "scale-conns,scale-downloads,scale-uploads", "--conn-levels", "1,20",
            "--download-levels", "1,3", "--download-duration", "1", "--wrk-duration", "1",
            "--bulk-size", "4M", "--check-size", "256K",
            "--json", str(jsonl), "--png", "", "--no-progress"]
    proc = subprocess.run(argv, capture_output=True, timeout=120,
                          cwd=str(tmp_path))
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert not [r for r in records if r["type"] == "error"]
    meta = next(r for r in records if r["type"] == "meta")
    assert "direct" in meta["systems"]
    assert "haproxy" in meta["systems"] or "haproxy" in meta["skipped"]
    assert meta["limits"]["ip_local_port_range"][0] > 0
    samples = {(r["system"], r["workload"]): r["metrics"] for r in records if r["type"] == "sample"}
    for system in meta["systems"]:
        for n in (1, 3):
            d = samples[(system, f"scale-downloads-{n}")]
            assert d["conns"] == n and len(d["per_conn_bytes"]) == n and d["bytes"] > 0
            assert 0 < d["jain"] <= 1.0 + 1e-9
            u = samples[(system, f"scale-uploads-{n}")]
            assert u["conns"] == n and len(u["per_conn_bytes"]) == n and u["bytes"] > 0
            assert 0 < u["jain"] <= 1.0 + 1e-9
        if meta["wrk"]:
            assert samples[(system, "scale-conns-20")]["rps"] > 0
    assert "scale-downloads: aggregate download MB/s, by concurrent downloads" in out
    assert "scale-uploads: aggregate upload MB/s, by concurrent uploads" in out
    summaries = {(r["system"], r["workload"], r["metric"]) for r in records if r["type"] == "summary"}
    assert ("direct", "scale-downloads-3", "jain") in summaries
    assert _harness_processes(meta["work_dir"]) == []


def test_harness_runs_direct_and_kite(tmp_path):
    kite_sys = _kite_system()
    jsonl = tmp_path / "relay.jsonl"
    png = tmp_path / "relay.png"
    argv = [sys.executable, str(HARNESS), "--systems", f"direct,{kite_sys}", "--rounds", "1",
            "--bulk-size", "4M", "--check-size", "256K", "--bulk-cap", "20",
            "--wrk-duration", "1", "--seq-duration", "1", "--newconn-duration", "1",
            "--idle-conns", "20", "--idle-probe", "1", "--idle-timeout", "20",
            "--json", str(jsonl), "--png", str(png), "--no-progress"]
    proc = subprocess.run(argv, capture_output=True, timeout=120,
                          cwd=str(tmp_path))
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"

    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    by_type = {}
    for rec in records:
        by_type.setdefault(rec["type"], []).append(rec)
    assert not by_type.get("error"), by_type.get("error")
    meta = by_type["meta"][0]
    assert meta["systems"] == ["direct", kite_sys]

    # The check ran first on each system: content intact both ways, and for kite the bytes
    # crossed the tunnel (unless ss is missing, which the check notes).
    checks = {c["system"]: c for c in by_type["check"]}
    assert set(checks) == {"direct", kite_sys}
    for c in checks.values():
        assert c["ok"] and c["down_intact"] and c["up_intact"]
    kc = checks[kite_sys]
    if "tunnel_bytes_down" in kc:
        assert kc["tunnel_bytes_down"] >= 256 * 1024 and kc["tunnel_bytes_up"] >= 256 * 1024
    else:
        assert any("ss not installed" in n for n in kc["notes"])

    samples = {(s["system"], s["workload"]): s["metrics"] for s in by_type["sample"]}
    for system in ("direct", kite_sys):
        bulk = samples[(system, "bulk")]
        for key in ("down_MBps", "up_MBps", "down_bytes", "up_bytes"):
            assert isinstance(bulk[key], (int, float)) and bulk[key] > 0
        seq = samples[(system, "seq")]
        assert seq["requests"] > 0 and seq["p50_ms"] is not None
        idle = samples[(system, "idle-20")]
        assert idle["ok"] + idle["failed"] == 20
    kb = samples[(kite_sys, "bulk")]
    for key in ("relay_cpu_s_per_GB_down", "backend_cpu_s_per_GB_up"):
        assert key in kb
    assert "KiB_per_conn" in samples[(kite_sys, "idle-20")]
    if meta["wrk"]:
        assert samples[(kite_sys, "c50")]["rps"] > 0
        assert samples[(kite_sys, "newconn")]["cps"] > 0

    summaries = {(s["system"], s["workload"], s["metric"]) for s in by_type["summary"]}
    assert ("direct", "bulk", "down_MBps") in summaries
    assert (kite_sys, "bulk", "up_MBps") in summaries

    # The table, and the chart or the note that says why not.
    assert "bulk: 4 MiB down and up" in out and kite_sys in out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "chart skipped" in out
    else:
        assert png.stat().st_size > 0

    # Everything the harness started is gone, and so is its work directory.
    assert _harness_processes(meta["work_dir"]) == []
    assert not os.path.exists(meta["work_dir"])


def test_harness_runs_the_https_systems(tmp_path):
    """``--systems https``: kite terminating TLS beside nginx and stunnel doing it (each
    that is installed), visitors over TLS, the check intact both ways."""
    jsonl = tmp_path / "relay.jsonl"
    argv = [sys.executable, str(HARNESS), "--systems", "https", "--rounds", "1",
            "--workloads", "bulk,c50,newconn", "--bulk-size", "4M", "--check-size", "256K",
            "--bulk-cap", "20", "--wrk-duration", "1", "--newconn-duration", "1",
            "--json", str(jsonl), "--png", "", "--no-progress"]
    proc = subprocess.run(argv, capture_output=True, timeout=120,
                          cwd=str(tmp_path))
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    errors = [r for r in records if r["type"] == "error"]
    assert not errors, errors
    meta = next(r for r in records if r["type"] == "meta")
    assert "kite-tls" in meta["systems"]
    checks = {r["system"]: r for r in records if r["type"] == "check"}
    assert set(checks) == set(meta["systems"])
    for c in checks.values():
        assert c["ok"] and c["down_intact"] and c["up_intact"]
    kc = checks["kite-tls"]
    if "tunnel_bytes_down" in kc:  # the decrypted bytes crossed the tunnel
        assert kc["tunnel_bytes_down"] >= 256 * 1024
    samples = {(r["system"], r["workload"]): r["metrics"] for r in records if r["type"] == "sample"}
    assert samples[("kite-tls", "bulk")]["down_MBps"] > 0
    if meta["wrk"]:
        assert samples[("kite-tls", "c50")]["rps"] > 0
        assert samples[("kite-tls", "newconn")]["cps"] > 0
    assert _harness_processes(meta["work_dir"]) == []


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_builtin_origin_serves_and_stores_files(tmp_path, loop):
    """bench/origin.py, the origin when nginx is missing: a file larger than one write
    (loop.sendfile, which uvloop lacks) arrives intact, and a PUT lands in up/."""
    import socket

    root = tmp_path / "www"
    (root / "up").mkdir(parents=True)
    body = os.urandom(3 << 20)
    (root / "big.bin").write_bytes(body)
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "origin.py"), "--port", "0",
                             "--root", str(root), "--loop", loop], stderr=subprocess.PIPE)
    try:
        line = proc.stderr.readline().decode()
        assert "origin listening on" in line, line
        port = int(line.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: o\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < len(body):
                piece = sock.recv(1 << 20)
                assert piece, f"closed after {len(data)} bytes"
                data += piece
            head, _, got = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and got == body
            up = body[: 1 << 20]
            sock.sendall(b"PUT /up/x.bin HTTP/1.1\r\nHost: o\r\nContent-Length: %d\r\n\r\n"
                         % len(up) + up)
            reply = b""
            while b"\r\n\r\n" not in reply:
                piece = sock.recv(65536)
                assert piece
                reply += piece
            assert reply.startswith(b"HTTP/1.1 201")
        assert (root / "up" / "x.bin").read_bytes() == up
    finally:
        proc.kill()
        proc.wait(10)
        proc.stderr.close()
