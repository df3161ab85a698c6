"""The relay's admin endpoint (kite.relay.admin, kite.relay.observe): /metrics parsed by
prometheus_client's own parser, /api/status, the token, bounded labels, DNS rcodes seen by
dig, the checks of ``kite relay --admin``, and ``kite status`` against a real relay."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kite.errors import ConfigError
from kite.names.config import NamesConfig
from kite.relay.accept import default_tunnel_reserve
from kite.relay.admin import start_admin
from kite.relay.config import build_relay_config
from support import SECRET, Proc, free_port, http_kite, kite_env, make_certs, run, start_http_server

TOKEN = "admin-token-for-tests-123"


async def _get(port, path, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{port}{path}", headers=headers) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.read()


def _samples(text: str) -> dict:
    """``{(sample name, sorted labels): value}`` of a /metrics page."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def _poll(fn, timeout=10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await fn()
        if value or loop.time() > deadline:
            return value
        await asyncio.sleep(0.05)


def test_metrics_and_status(tmp_path, loop_kind):
    async def main():
        server, port = await start_http_server(b"y" * 20000)
        # --admin without an access log: the relay keeps the totals only
        async with kite_env(tmp_path, [http_kite("app.test.kite", port)],
                            admin=("127.0.0.1", 0)) as env:
            admin = await start_admin(env.relay)
            aport = admin.address[1]
            proc = await asyncio.create_subprocess_exec(
                "curl", "-sS", "-o", "/dev/null", "-H", "Host: app.test.kite",
                f"http://127.0.0.1:{env.port}/big", stdout=subprocess.PIPE)
            await proc.wait()

            async def served():
                status, ctype, body = await _get(aport, "/metrics")
                m = _samples(body.decode())
                return (m.get(("kite_visitor_streams_total", (("kite", "app.test.kite"),
                        ("proto", "http"), ("result", "ok"))), 0) >= 1) and (status, ctype, body)

            status, ctype, body = await _poll(served)
            text = body.decode()
            st, _, sbody = await _get(aport, "/api/status")
            pst, pctype, page = await _get(aport, "/")
            await admin.close()
        server.close()
        return status, ctype, text, st, json.loads(sbody), pst, pctype, page

    status, ctype, text, st, doc, pst, pctype, page = run(main, loop_kind)
    assert status == 200 and ctype.startswith("text/plain")
    m = _samples(text)
    assert m[("kite_tunnels_up", ())] == 1
    assert m[("kite_kites_online", ())] == 1
    assert m[("kite_visitor_bytes_total", (("direction", "out"), ("kite", "app.test.kite")))] > 20000
    assert m[("kite_visitor_bytes_total", (("direction", "in"), ("kite", "app.test.kite")))] > 0
    assert m[("kite_handshakes_total", (("result", "ok"),))] == 1
    assert m[("kite_connections", (("state", "tunnel"),))] == 1
    limits = {name: m[("kite_connection_limit", (("limit", name),))]
              for name in ("max_connections", "max_pending", "tunnel_reserve")}
    assert limits["tunnel_reserve"] == default_tunnel_reserve(int(limits["max_connections"]))
    assert m[("kite_connections_turned_away_total", (("reason", "tunnel_reserve"),))] == 0
    assert ("kite_certificate_expiry_timestamp_seconds", (("name", "localhost"),)) in m
    assert "_created" not in text
    assert st == 200
    assert doc["version"] and doc["uptime"] >= 0
    assert [t["kites"] for t in doc["tunnels"]] == [["http:app.test.kite"]]
    assert doc["tunnels"][0]["peer"].startswith("127.0.0.1:")
    kite = doc["kites"][0]
    assert kite["kite"] == "http:app.test.kite" and kite["bytes_out"] > 20000
    assert doc["streams"]["total"] >= 1
    assert pst == 200 and pctype.startswith("text/html") and b"api/status" in page


def test_token_is_required_and_checked(tmp_path):
    async def main():
        async with kite_env(tmp_path) as env:
            admin = await start_admin(env.relay, token=TOKEN)
            port = admin.address[1]
            out = [(await _get(port, p, tok))[0] for p, tok in [
                ("/metrics", None), ("/metrics", "wrong"), ("/api/status", None),
                ("/api/status", TOKEN[:-1]), ("/metrics", TOKEN), ("/api/status", TOKEN),
                ("/", None)]]
            await admin.close()
        return out

    assert run(main, "asyncio") == [401, 401, 401, 401, 200, 200, 200]


def test_labels_are_bounded(tmp_path):
    """Beyond the top N kites by bytes, the rest are summed under ``other``."""

    async def main():
        server, port = await start_http_server(b"z" * 1000)
        kites = [http_kite(f"k{i}.test.kite", port) for i in range(5)]
        async with kite_env(tmp_path, kites, admin=("127.0.0.1", 0)) as env:
            admin = await start_admin(env.relay, top=2)
            for i in range(5):
                for _ in range(i + 1):  # k4 moves the most bytes, k0 the fewest
                    proc = await asyncio.create_subprocess_exec(
                        "curl", "-sS", "-o", "/dev/null", "-H", f"Host: k{i}.test.kite",
                        f"http://127.0.0.1:{env.port}/")
                    await proc.wait()

            async def counted():
                m = _samples((await _get(admin.address[1], "/metrics"))[2].decode())
                n = sum(v for (name, _l), v in m.items() if name == "kite_visitor_streams_total")
                return n == 15 and m

            m = await _poll(counted)
            await admin.close()
        server.close()
        return m

    m = run(main, "asyncio")
    assert m, "the 15 streams were not all counted"
    kites = {dict(labels)["kite"] for (name, labels) in m if name == "kite_visitor_bytes_total"}
    assert kites == {"k4.test.kite", "k3.test.kite", "other"}
    assert m[("kite_visitor_streams_total",
              (("kite", "other"), ("proto", "http"), ("result", "ok")))] == 1 + 2 + 3


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig (dnsutils) not installed")
def test_dns_answers_by_rcode(tmp_path):
    async def main():
        names = NamesConfig(listen=[("127.0.0.1", 0)], zone="test.kite",
                            public_ips=["192.0.2.1"], ns_names=["ns1.test.kite"], rate_limit=0)
        async with kite_env(tmp_path, names=names, admin=("127.0.0.1", 0)) as env:
            admin = await start_admin(env.relay)
            dport = env.relay.names.server.bound[0][1]
            for name in ("test.kite", "nothing.test.kite", "nothing.test.kite", "example.org"):
                proc = await asyncio.create_subprocess_exec(
                    "dig", "+short", "+tries=1", "+time=5", "-p", str(dport), "@127.0.0.1", name,
                    "SOA", stdout=subprocess.PIPE)
                await proc.communicate()
            m = _samples((await _get(admin.address[1], "/metrics"))[2].decode())
            await admin.close()
        return m

    m = run(main, "asyncio")
    assert m[("kite_dns_queries_total", (("rcode", "NOERROR"),))] == 1
    assert m[("kite_dns_queries_total", (("rcode", "NXDOMAIN"),))] == 2
    assert m[("kite_dns_queries_total", (("rcode", "REFUSED"),))] == 1


# -- configuration --------------------------------------------------------------------------------
def _cfg(tmp_path, **observe):
    return build_relay_config(kites=[f"*:*.test.kite:{SECRET}"], observe=observe)


def test_admin_config_checks(tmp_path, monkeypatch):
    assert _cfg(tmp_path, admin="4041").admin == ("127.0.0.1", 4041)
    assert _cfg(tmp_path, admin=":4041").admin == ("127.0.0.1", 4041)
    assert _cfg(tmp_path).admin is None
    with pytest.raises(ConfigError, match="not a loopback address.*--admin-token-file"):
        _cfg(tmp_path, admin="0.0.0.0:4041")
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    cfg = _cfg(tmp_path, admin="0.0.0.0:4041", admin_token_file=str(token_file))
    assert cfg.admin == ("0.0.0.0", 4041) and cfg.admin_token == TOKEN
    with pytest.raises(ConfigError, match="--log-format"):
        _cfg(tmp_path, log_format="xml")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "aiohttp" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs aiohttp.*kite-relay\[admin\]"):
        _cfg(tmp_path, admin="127.0.0.1:4041")


def test_cli_non_loopback_admin_without_token_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kite", "relay", "--listen", "127.0.0.1:0",
                        "--kite", f"*:*.test.kite:{SECRET}", "--admin", "0.0.0.0:0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--admin" in r.stderr and "token" in r.stderr


# -- kite status against a real relay ---------------------------------------------------------
def test_kite_status_table_and_json(tmp_path):
    certs = make_certs(tmp_path)
    port, aport = free_port(), free_port()
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    kite = [sys.executable, "-m", "kite"]
    relay = Proc([*kite, "relay", "--listen", f"127.0.0.1:{port}", "--tls-cert", certs.cert,
                  "--tls-key", certs.key, "--kite", f"*:*.test.kite:{SECRET}",
                  "--admin", f"127.0.0.1:{aport}", "--admin-token-file", str(token_file)],
                 tmp_path, "relay")
    backend = None
    try:
        relay.wait_for("admin listening on")
        backend = Proc([*kite, "expose", f"127.0.0.1:{free_port()}", "app.test.kite",
                        "--relay", f"127.0.0.1:{port}", "--ca", certs.cert, "--secret", SECRET],
                       tmp_path, "backend")
        backend.wait_for("kite flying")
        status = [*kite, "status", "--admin", f"127.0.0.1:{aport}"]
        denied = subprocess.run(status, capture_output=True, text=True, timeout=60)
        assert denied.returncode == 1 and "token" in denied.stderr
        deadline = time.monotonic() + 10
        while True:
            r = subprocess.run([*status, "--token-file", str(token_file)], capture_output=True,
                               text=True, timeout=60)
            if "http:app.test.kite" in r.stdout or time.monotonic() > deadline:
                break
        assert r.returncode == 0, r.stderr
        assert "1 tunnels, 1 kites online" in r.stdout
        assert "Kites:" in r.stdout and "Tunnels:" in r.stdout
        j = subprocess.run([*status, "--json"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "KITE_ADMIN_TOKEN": TOKEN})
        doc = json.loads(j.stdout)
        assert [k["kite"] for k in doc["kites"]] == ["http:app.test.kite"]
    finally:
        if backend is not None:
            backend.stop()
        relay.stop()
    gone = subprocess.run([*kite, "status", "--admin", f"127.0.0.1:{aport}"],
                          capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1 and "cannot reach" in gone.stderr



def test_toml_keys(tmp_path):
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    conf = tmp_path / "relay.toml"
    conf.write_text(f'admin = "[::]:4041"\nadmin_token_file = "{token_file}"\n'
                    f'log_format = "json"\naccess_log = "{tmp_path / "access.log"}"\n'
                    f'[[kite]]\ndomain = "*.test.kite"\nsecret = "{SECRET}"\n')
    cfg = build_relay_config(config_file=str(conf))
    assert cfg.admin == ("::", 4041) and cfg.admin_token == TOKEN
    assert cfg.log_format == "json" and cfg.access_log == str(tmp_path / "access.log")
    # options win over the file
    cfg = build_relay_config(config_file=str(conf), observe={"access_log": "off",
                                                             "log_format": "text"})
    assert cfg.access_log is None and cfg.log_format == "text"
