"""A new user's first steps, with no dead end: ``kite init relay`` prints commands that work
when pasted, ``kite init backend`` writes a config that flies on that relay, ``--check-config``
validates without starting; and what a visitor sees when something is wrong (a 504 for a
local server that never answers, a 400 page for a request without Host, a relay's own error
pages), plain tunnels only with ``--allow-plain``, a second backend of a kite logged."""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
import signal
import socket
import subprocess

import pytest

from kite.backend.main import build_backend_config
from kite.config import check_response_timeout
from kite.errors import ConfigError
from support import (
    KITE,
    Proc,
    http_get,
    http_kite,
    kite_env,
    make_backend,
    run,
    start_http_server,
)


def kite(*args, timeout=60):
    return subprocess.run(KITE + list(args), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def site(tmp_path):
    """A local web server (python -m http.server) serving index.html; yields its port."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "index.html").write_text("hello from the onboarding site\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = Proc(["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
              str(root)], tmp_path, "site")
    try:
        p.wait_for("Serving HTTP", timeout=20)
        yield port
    finally:
        p.stop(signal.SIGKILL)


def _listening(proc: Proc, count: int) -> list:
    """The ports of the relay's first ``count`` 'relay listening on' lines, in order."""
    out = proc.wait_for("relay listening on")
    for _ in range(200):
        ports = [int(p) for p in re.findall(r"relay listening on 127\.0\.0\.1:(\d+)", out)]
        if len(ports) >= count:
            return ports[:count]
        out = proc.wait_for("relay listening on")
    raise AssertionError(out)


def _curl(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True,
                          text=True)


# -- kite init relay: the printed commands ------------------------------------------------------
def test_init_relay_prints_commands_that_work(tmp_path, site):
    conf = tmp_path / "conf"
    r = kite("init", "relay", "--dir", str(conf), "--domain", "*.first.kite")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    toml = (conf / "relay.toml").read_text()
    assert 'listen = ["0.0.0.0:80", "0.0.0.0:443"]' in toml  # visitors: http:// and https://
    assert f"the kite secret is in {conf / 'relay.toml'}" in out
    assert "CAP_NET_BIND_SERVICE" in out
    commands = [line.strip() for line in out.splitlines() if line.startswith("       ")]
    start, expose, curl = commands
    assert start == f"kite relay --config {conf / 'relay.toml'}"
    secret = re.search(r'secret = "([^"]+)"', toml).group(1)
    assert f"--secret {secret}" in expose and "--fingerprint " in expose
    assert curl == "curl http://app.first.kite/"

    # The same commands, with the relay's ports 80 and 443 replaced by free ones.
    argv = shlex.split(start)
    relay = Proc(KITE + argv[1:] + ["--listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"],
                 tmp_path, "relay")
    try:
        web, tls = _listening(relay, 2)
        argv = shlex.split(expose)
        assert argv[:3] == ["kite", "expose", "8080"]
        argv[2] = str(site)
        argv[argv.index("--relay") + 1] = f"localhost:{tls}"
        backend = Proc(KITE + argv[1:], tmp_path, "expose")
        try:
            backend.wait_for("kite flying: http:app.first.kite")
            url = shlex.split(curl)[1]
            res = _curl("--resolve", f"app.first.kite:{web}:127.0.0.1",
                        url.replace("app.first.kite/", f"app.first.kite:{web}/"))
            assert res.returncode == 0, res.stderr
            assert res.stdout == "hello from the onboarding site\n"
        finally:
            backend.stop()
    finally:
        relay.stop()


def test_init_backend_config_flies_on_the_init_relay(tmp_path, site):
    r = kite("init", "relay", "--dir", str(tmp_path / "relay"), "--domain", "*.first.kite")
    assert r.returncode == 0, r.stderr
    fingerprint = re.search(r"fingerprint: ([0-9a-f]{64})", r.stdout).group(1)
    secret = re.search(r'secret = "([^"]+)"', (tmp_path / "relay" / "relay.toml").read_text())[1]
    relay = Proc(KITE + ["relay", "--config", str(tmp_path / "relay" / "relay.toml"),
                         "--listen", "127.0.0.1:0"], tmp_path, "relay")
    try:
        port, = _listening(relay, 1)
        r = kite("init", "backend", "--dir", str(tmp_path / "backend"), "--relay",
                 f"127.0.0.1:{port}", "--secret", secret, "--fingerprint", fingerprint,
                 "--name", "b.first.kite", "--target", f"http://127.0.0.1:{site}")
        assert r.returncode == 0, r.stderr
        conf = tmp_path / "backend" / "backend.toml"
        assert conf.stat().st_mode & 0o077 == 0
        check = kite("expose", "--check-config", str(conf))
        assert check.returncode == 0 and check.stdout.startswith("ok: 1 kite on 1 relay"), check
        backend = Proc(KITE + ["expose", "--config", str(conf)], tmp_path, "expose")
        try:
            backend.wait_for("kite flying: http:b.first.kite")
            res = _curl("-H", "Host: b.first.kite", f"http://127.0.0.1:{port}/")
            assert res.stdout == "hello from the onboarding site\n", res.stderr
        finally:
            backend.stop()
    finally:
        relay.stop()


def test_init_backend_refuses_relay_options_for_a_relay(tmp_path):
    r = kite("init", "relay", "--dir", str(tmp_path), "--secret", "x" * 20)
    assert r.returncode == 2 and r.stderr.startswith("kite: error: --secret:")
    r = kite("init", "backend", "--dir", str(tmp_path), "--relay", "a b:1")
    assert r.returncode == 2 and "--relay" in r.stderr and len(r.stderr.splitlines()) == 1


# -- --check-config -----------------------------------------------------------------------------
def test_check_config_validates_without_starting(tmp_path):
    good = tmp_path / "relay.toml"
    good.write_text('listen = ["127.0.0.1:0"]\n[[kite]]\ndomain = "*.x.kite"\n'
                    'secret = "0123456789abcdef-secret"\n')
    r = kite("relay", "--check-config", str(good), timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ok: 1 kite granted; listening on 127.0.0.1:0; no TLS (plain tunnels)\n"
    bad = tmp_path / "bad.toml"
    bad.write_text('listn = ["127.0.0.1:0"]\n[[kite]]\ndomain = "*.x.kite"\nsecret = "s"\n')
    r = kite("relay", "--check-config", str(bad), timeout=30)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        r.stderr.strip()] and r.stderr.startswith("kite: error: listn: unknown key (did you mean "
                                                  "'listen'?")
    backend = tmp_path / "backend.toml"
    backend.write_text('[defaults]\nsecret = "0123456789abcdef-secret"\nplain = true\n'
                       '[[relay]]\nadress = "127.0.0.1:1"\n')
    r = kite("expose", "--check-config", str(backend), timeout=30)
    assert r.returncode == 2
    assert "relay[0].adress: unknown key (did you mean 'address'?" in r.stderr


def test_relay_option_beside_config_is_an_error(tmp_path):
    conf = tmp_path / "backend.toml"
    conf.write_text('[defaults]\nsecret = "0123456789abcdef-secret"\nplain = true\n'
                    '[[relay]]\naddress = "127.0.0.1:1"\n[[kite]]\nname = "a.x.kite"\n'
                    'target = "8080"\n')
    r = kite("expose", "--config", str(conf), "--relay", "127.0.0.1:2", timeout=30)
    assert r.returncode == 2
    assert r.stderr.startswith("kite: error: --relay: not used with --config")


# -- 504: a local server that accepts and never answers ----------------------------------------
def test_silent_local_server_gives_the_visitor_a_504(tmp_path, loop_kind):
    async def main():
        held = []

        async def silent(reader, writer):
            held.append(writer)  # reads nothing, answers nothing, never closes

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        kite_spec = http_kite("slow.test.kite", port, response_timeout=0.3)
        async with kite_env(tmp_path, [kite_spec]) as env:
            head, body = await http_get(env.port, "slow.test.kite")
            assert head.startswith(b"HTTP/1.1 504 Gateway Timeout"), head
            assert b"took too long to answer" in body
        for w in held:
            w.close()
        server.close()

    run(main, loop_kind)


def test_response_timeout_applies_until_the_first_byte_only(tmp_path, loop_kind):
    async def main():
        async def slow_body(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
            await writer.drain()
            await asyncio.sleep(0.8)  # longer than the timeout, after the first byte
            writer.write(b"cd")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(slow_body, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with kite_env(tmp_path, [http_kite("ok.test.kite", port,
                                                 response_timeout=0.3)]) as env:
            head, body = await http_get(env.port, "ok.test.kite")
            assert head.startswith(b"HTTP/1.1 200 OK") and body == b"abcd"
        server.close()

    run(main, loop_kind)


def test_response_timeout_option_and_key():
    assert check_response_timeout(0) is None and check_response_timeout(2) == 2.0
    with pytest.raises(ConfigError, match="--response-timeout"):
        check_response_timeout(-1)
    cfg = build_backend_config(target="8080", name="a.x.kite", relays=["r:1"], plain=True,
                               secret="0123456789abcdef-secret", response_timeout=0)
    assert cfg.relays[0].kites[0].response_timeout is None
    cfg = build_backend_config(target="8080", name="a.x.kite", relays=["r:1"], plain=True,
                               secret="0123456789abcdef-secret")
    assert cfg.relays[0].kites[0].response_timeout == 60.0


# -- the relay's refusal pages -----------------------------------------------------------------
async def _raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    data = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    return data


def test_http10_without_host_gets_a_400_page(tmp_path, loop_kind):
    async def main():
        async with kite_env(tmp_path) as env:
            data = await _raw(env.port, b"GET / HTTP/1.0\r\n\r\n")
            assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n"), data
            assert b"no Host header" in data
            # not HTTP at all: closed without an answer, as before
            assert await _raw(env.port, b"\x00\x01junk\r\n\r\n") == b""

    run(main, loop_kind)


def test_error_pages_from_a_template_folder(tmp_path, loop_kind):
    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "404.html").write_text("<p>nothing at {kite} ({status} {reason})</p>\n"
                                    "<style>p { color: red }</style>\n")
    from kite.relay.config import load_error_pages

    loaded = load_error_pages(str(pages))
    assert set(loaded) == {"404"}

    async def main():
        async with kite_env(tmp_path, error_pages=loaded) as env:
            head, body = await http_get(env.port, "nope.elsewhere.kite")
            assert head.startswith(b"HTTP/1.1 404 Not Found\r\n")
            assert body == (b"<p>nothing at nope.elsewhere.kite (404 Not Found)</p>\n"
                            b"<style>p { color: red }</style>\n")
            # no 400.html in the folder: the built-in page
            data = await _raw(env.port, b"GET / HTTP/1.0\r\n\r\n")
            assert b"<h1>400 Bad Request</h1>" in data
            # JSON clients keep JSON
            head, body = await http_get(env.port, "nope.test.kite",
                                        headers=b"Accept: application/json\r\n")
            assert body.startswith(b"{")

    run(main, loop_kind)


# -- plain tunnels and shared kites -------------------------------------------------------------
def test_relay_with_a_certificate_takes_plain_tunnels_only_when_told(tmp_path, loop_kind):
    async def main():
        server, port = await start_http_server(b"plain\n")
        async with kite_env(tmp_path) as env:
            backend = make_backend(env.port, [http_kite("p.test.kite", port)])  # plain
            outcome = await backend.connectors[0].run_once()
            assert outcome == "refused"
        async with kite_env(tmp_path, allow_plain=True) as env:
            backend = await env.add_backend([http_kite("p.test.kite", port)], tls=False)
            await backend.wait_flying(10)
            head, body = await http_get(env.port, "p.test.kite")
            assert body == b"plain\n"
        server.close()

    run(main, loop_kind)


def test_second_backend_of_a_kite_is_logged_and_shown(tmp_path, loop_kind, caplog):
    async def main():
        server, port = await start_http_server(b"shared\n")
        async with kite_env(tmp_path, [http_kite("two.test.kite", port)]) as env:
            assert env.relay.state.shared_kites() == {}
            with caplog.at_level(logging.WARNING, "kite.relay"):
                second = await env.add_backend([http_kite("two.test.kite", port)])
                await second.wait_flying(10)
            shared = env.relay.state.shared_kites()
            assert list(shared) == ["http:two.test.kite"] and len(shared["http:two.test.kite"]) == 2
            assert any("another backend joined" in r.getMessage() for r in caplog.records)
        server.close()

    run(main, loop_kind)


def test_relay_502_page_from_the_template_folder(tmp_path, loop_kind):
    """The tunnel goes away before the kite answered: the relay's own 502.html."""
    async def main():
        held = []

        async def silent(reader, writer):
            held.append(writer)

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pages = {"502": "<p>{kite}: {status} {reason}</p>"}
        async with kite_env(tmp_path, [http_kite("gone.test.kite", port, response_timeout=None)],
                            error_pages=pages) as env:
            visit = asyncio.ensure_future(http_get(env.port, "gone.test.kite"))
            while not held:  # the request reached the local server
                await asyncio.sleep(0.01)
            await env.backends[0].close()
            head, body = await visit
            assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
            assert body == b"<p>gone.test.kite: 502 Bad Gateway</p>"
        for w in held:
            w.close()
        server.close()

    run(main, loop_kind)
