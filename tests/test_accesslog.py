"""The access log (kite.net.accesslog): its formats, and the lines a real relay and a real
backend write for curl's visits, refusals and cut streams - with no secret, Authorization
or Cookie value in them."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time

import pytest

from kite.backend.connector import Backend
from kite.config import BackendConfig, RelaySpec
from kite.net.accesslog import (
    AccessLog,
    AccessRecord,
    clean,
    format_json,
    format_text,
    request_fields,
    response_status,
)
from support import SECRET, Proc, free_port, http_kite, kite_env, make_certs, run, start_http_server

SECRETS = (SECRET, "Bearer-TOKEN-42", "sid=COOKIE-99", "q=QUERY-7")


# -- formats ----------------------------------------------------------------------------------
def test_request_fields_and_status():
    head = (b"GET /a/b?x=1 HTTP/1.1\r\nHost: a\r\nuser-agent:  curl/8\r\n"
            b"Authorization: Basic Zm9v\r\n\r\n")
    assert request_fields(head) == ("GET", "/a/b?x=1", "curl/8")
    assert request_fields(b"\x16\x03\x01 hello") == ("", "", "")
    assert request_fields(b"GET / HTTP/1.1\r\n\r\n") == ("GET", "/", "")
    assert response_status(memoryview(b"HTTP/1.1 404 Not Found\r\n")) == 404
    assert response_status(b"HTTP/1.1 2") is None
    assert response_status(b"SSH-2.0-OpenSSH_9.2\r\n") is None


def test_text_and_json_lines():
    rec = AccessRecord(1_700_000_000.25, "app.example.com", "http", "192.0.2.7:5555",
                       method="GET", path="/x", status=200, user_agent='evil"\nagent',
                       bytes_in=120, bytes_out=4567, duration=0.0123)
    line = format_text(rec)
    assert line == ('2023-11-14T22:13:20.250Z app.example.com http 192.0.2.7:5555 "GET /x" 200 '
                    'in=120 out=4567 0.012s ok "evil\\x22\\x0aagent"')
    assert "\n" not in line
    d = json.loads(format_json(rec))
    assert d["kite"] == "app.example.com" and d["status"] == 200 and d["bytes_out"] == 4567
    assert d["time"] == "2023-11-14T22:13:20.250Z" and d["result"] == "ok"
    refused = AccessRecord(0, "x.example.com", "https", "192.0.2.7:1", result="offline",
                           reason="kite https:x.example.com is offline")
    assert format_text(refused).endswith(
        'x.example.com https 192.0.2.7:1 - - in=0 out=0 0.000s offline '
        '"kite https:x.example.com is offline" -')


def test_clean_bounds_and_escapes():
    assert clean("a" * 600).endswith("...") and len(clean("a" * 600)) == 515
    assert clean("\x1b[31m\\") == "\\x1b[31m\\x5c"


def test_bad_format_and_unwritable_file(tmp_path):
    from kite.errors import ConfigError
    from kite.net.accesslog import open_access_log

    with pytest.raises(ValueError):
        AccessLog(io.StringIO(), "xml")
    assert open_access_log("off") is None
    with pytest.raises(ConfigError, match="--access-log"):
        open_access_log(str(tmp_path / "no" / "such" / "dir.log"))


# -- a real relay and backend -------------------------------------------------------------------
def _lines(path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


async def _wait_lines(path, pred, timeout=10.0) -> list:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        found = [ln for ln in _lines(path) if pred(ln)]
        if found:
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"no matching line in {path}:\n" + "\n".join(_lines(path)))


async def _curl(*args) -> bytes:
    proc = await asyncio.create_subprocess_exec("curl", "-sS", "--max-time", "20", *args,
                                                stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    return out


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_relay_and_backend_log_a_curl_visit(tmp_path, loop_kind, fmt):
    rlog, blog = tmp_path / "relay.log", tmp_path / "backend.log"

    async def main():
        server, port = await start_http_server(b"x" * 5000)
        async with kite_env(tmp_path, access_log=str(rlog), log_format=fmt) as env:
            backend = Backend(BackendConfig(
                relays=[RelaySpec(host="127.0.0.1", port=env.port, ca=env.certs.cert,
                                  kites=[http_kite("app.test.kite", port)])],
                access_log=str(blog), log_format=fmt))
            await backend.start()
            env.backends.append(backend)
            await backend.wait_flying(timeout=20)
            out = await _curl("-H", "Host: app.test.kite", "-A", "kite-test/1.0",
                              "-H", "Authorization: Bearer-TOKEN-42", "-H", "Cookie: sid=COOKIE-99",
                              f"http://127.0.0.1:{env.port}/file.bin?q=QUERY-7")
            assert out == b"x" * 5000
            await _curl("-H", "Host: nothing.test.kite", f"http://127.0.0.1:{env.port}/")
            await _curl("-H", "Host: app.other", f"http://127.0.0.1:{env.port}/")
            relay_hit = await _wait_lines(rlog, lambda ln: "file.bin" in ln)
            backend_hit = await _wait_lines(blog, lambda ln: "file.bin" in ln)
            offline = await _wait_lines(rlog, lambda ln: "nothing.test.kite" in ln)
            missing = await _wait_lines(rlog, lambda ln: "app.other" in ln)
        server.close()
        return relay_hit[0], backend_hit[0], offline[0], missing[0]

    relay_hit, backend_hit, offline, missing = run(main, loop_kind)
    if fmt == "json":
        r, b = json.loads(relay_hit), json.loads(backend_hit)
        assert (r["kite"], r["proto"], r["method"], r["path"], r["status"], r["user_agent"],
                r["result"]) == ("app.test.kite", "http", "GET", "/file.bin", 200,
                                 "kite-test/1.0", "ok")
        assert r["visitor"].startswith("127.0.0.1:") and r["visitor"] == b["visitor"]
        # Both ends count the same bytes: the request in, the 5000-byte answer and its head out.
        assert r["bytes_in"] == b["bytes_in"] > 0
        assert r["bytes_out"] == b["bytes_out"] > 5000
        assert b["status"] == 200 and b["path"] == "/file.bin"
        o = json.loads(offline)
        assert o["result"] == "offline" and "offline" in o["reason"]
        assert json.loads(missing)["result"] == "refused"
    else:
        assert '"GET /file.bin" 200 in=' in relay_hit and relay_hit.endswith(' ok "kite-test/1.0"')
        assert '"GET /file.bin" 200 in=' in backend_hit
        assert " offline " in offline and " refused " in missing
    everything = rlog.read_text() + blog.read_text()
    for secret in SECRETS:
        assert secret not in everything
    assert "tunnel-up" in rlog.read_text() and "kite-flying" in rlog.read_text()
    assert "kite-flying" in blog.read_text()


def test_cut_stream_is_a_reset(tmp_path, loop_kind):
    """The backend goes away while a visitor is connected: the relay logs ``reset`` with the
    tunnel's reason, and the tunnel's end on its own line."""
    rlog = tmp_path / "relay.log"

    async def main():
        server, port = await start_http_server()
        async with kite_env(tmp_path, [http_kite("app.test.kite", port)],
                            access_log=str(rlog)) as env:
            reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
            writer.write(b"GET /slow HTTP/1.1\r\nHost: app.test.kite\r\n\r\n")
            await reader.readuntil(b"\r\n\r\n")  # the first answer: the stream is up
            backend = env.backends.pop()
            await backend.close()
            line = (await _wait_lines(rlog, lambda ln: "/slow" in ln))[0]
            down = await _wait_lines(rlog, lambda ln: "tunnel-down" in ln)
            writer.close()
        server.close()
        return line, down

    line, down = run(main, loop_kind)
    assert ' reset "tunnel closed: ' in line
    assert "reason=" in down[0]


def test_cli_relay_writes_access_log_to_stdout(tmp_path):
    """``kite relay`` writes its access log to standard output by default."""
    certs = make_certs(tmp_path)
    port = free_port()
    relay = Proc([sys.executable, "-m", "kite", "relay", "--listen", f"127.0.0.1:{port}",
                  "--tls-cert", certs.cert, "--tls-key", certs.key, "--kite",
                  f"*:*.test.kite:{SECRET}", "--log-format", "json"], tmp_path, "relay")
    try:
        relay.wait_for("relay listening on")
        subprocess.run(["curl", "-sS", "--max-time", "10", "-H", "Host: app.test.kite",
                        f"http://127.0.0.1:{port}/?q=QUERY-7"], capture_output=True, check=False)
        end = time.monotonic() + 10
        while time.monotonic() < end and "app.test.kite" not in relay.out_path.read_text():
            time.sleep(0.02)
        line = [ln for ln in relay.out_path.read_text().splitlines() if "app.test.kite" in ln][0]
        d = json.loads(line)
        assert d["result"] == "offline" and d["path"] == "/" and d["method"] == "GET"
        assert SECRET not in relay.output() and "QUERY-7" not in relay.output()
    finally:
        relay.stop()


def test_quota_cut_and_refusal(tmp_path):
    """An account runs out of quota during a download: the stream's line says ``quota``, and
    the next visitor's line says ``quota`` with the 403's reason."""
    rlog = tmp_path / "relay.log"
    db = str(tmp_path / "kite.db")
    kite = [sys.executable, "-m", "kite", "accounts"]
    added = subprocess.run([*kite, "add", "bob@example.com", "--quota", "300KB", "--json",
                            "--db", db], capture_output=True, text=True, check=True)
    secret = json.loads(added.stdout)["secret"]
    subprocess.run([*kite, "kite", "bob@example.com", "app.test.kite", "--db", db],
                   capture_output=True, check=True)

    async def main():
        server, port = await start_http_server(b"q" * 20_000_000)
        async with kite_env(tmp_path, [http_kite("app.test.kite", port, secret=secret)],
                            grants=(), db=db, access_log=str(rlog)) as env:
            await _curl("--limit-rate", "500k", "-o", "/dev/null", "-H", "Host: app.test.kite",
                        f"http://127.0.0.1:{env.port}/big")
            cut = await _wait_lines(rlog, lambda ln: "/big" in ln)
            await _curl("-o", "/dev/null", "-H", "Host: app.test.kite",
                        f"http://127.0.0.1:{env.port}/after")
            refused = await _wait_lines(rlog, lambda ln: "/after" in ln)
        server.close()
        return cut[0], refused[0]

    cut, refused = run(main, "uvloop")
    assert " quota" in cut and '"GET /big" 200' in cut
    assert ' quota "The kite app.test.kite is not available' in refused
    assert secret not in rlog.read_text()


def test_totals_stay_bounded(monkeypatch):
    """Visitors choose the names they ask for: past MAX_NAMES the totals say ``other``."""
    from kite.net import accesslog

    monkeypatch.setattr(accesslog, "MAX_NAMES", 3)
    log = AccessLog(None)
    for i in range(10):
        log.refused(f"192.0.2.1:{i}", f"n{i}.example", "http", "no kite")
    assert len(log.totals) == 4
    assert log.totals[("other", "http", "refused")] == 7
