"""kite expose prints where visitors reach each kite (kite.backend.urls): one line per URL on
stdout when the kite first flies, nothing more after a reconnect; the ssh line of a tcp kite
works as printed."""

from __future__ import annotations

import shlex
import signal
import socket
import subprocess
import threading
import time

import pytest

from kite.backend.urls import visitor_urls
from kite.config import KiteSpec, RelaySpec, Target
from support import KITE


def _stdout(proc) -> list:
    """What ``kite expose`` printed on stdout besides its access log (time-stamped lines)."""
    return [line for line in proc.out_path.read_text().splitlines()
            if not line[:4].isdigit()]


def _wait_lines(proc, n: int, timeout: float = 20.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = _stdout(proc)
        if len(lines) >= n:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"{n} lines not printed: {_stdout(proc)}\n{proc.output()}")


def test_http_kite_prints_its_url_once_across_a_relay_restart(relay_process, expose_process,
                                                              http_origin):
    relay = relay_process()
    expose = expose_process(str(http_origin.port), "app.test.kite", relay)
    assert _wait_lines(expose, 1) == [f"http://app.test.kite:{relay.port}/"]
    # The relay restarts on the same port: the kite flies again, the URL is not repeated.
    port = relay.port
    relay.proc.stop(signal.SIGKILL)
    relay2 = relay_process(listen=f"127.0.0.1:{port}")
    relay2.proc.wait_for("kite online: http:app.test.kite", timeout=30)
    assert _stdout(expose) == [f"http://app.test.kite:{port}/"]
    assert "kite flying" in expose.output().split("closed", 1)[-1]


def test_https_kite_prints_an_https_url(relay_process, expose_process):
    relay = relay_process()
    expose = expose_process("https://127.0.0.1:1", "web.test.kite", relay)
    assert _wait_lines(expose, 1) == [f"https://web.test.kite:{relay.port}/"]


@pytest.fixture
def banner_server():
    """A TCP server that sends a banner, like sshd, then echoes."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.sendall(b"SSH-2.0-KiteBanner\r\n")
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield srv.getsockname()[1]
    stop.set()
    srv.close()


def test_tcp_kite_prints_a_working_ssh_line(relay_process, expose_process, banner_server):
    relay = relay_process()
    expose = expose_process(f"tcp://127.0.0.1:{banner_server}", "box.test.kite", relay,
                            "--public-port", "22")
    line, = _wait_lines(expose, 1)
    argv = shlex.split(line)
    assert argv[0] == "ssh" and argv[1] == "-o" and argv[-1] == "user@box.test.kite", line
    proxy = argv[2].removeprefix("ProxyCommand=")
    assert f"--relay 127.0.0.1:{relay.port} --tls --fingerprint {relay.fingerprint}" in proxy
    # Run the ProxyCommand as ssh would (through the shell, %h %p filled in), with this
    # checkout's kite for "kite".
    command = proxy.replace("%h", "box.test.kite").replace("%p", "22")
    command = command.replace("kite ", " ".join(map(shlex.quote, KITE)) + " ", 1)
    out = subprocess.run(["sh", "-c", command], input=b"", capture_output=True, timeout=30)
    assert out.stdout.startswith(b"SSH-2.0-KiteBanner"), (out, expose.output())


def _spec(port=443, **kw) -> RelaySpec:
    return RelaySpec(host="relay.example.com", port=port, **kw)


@pytest.mark.parametrize("proto,ports,ssl_ok,relay_port,want", [
    ("http", ["80", "443"], False, 443, ["http://app.example.com/"]),
    ("http", ["80", "443"], True, 443, ["http://app.example.com/", "https://app.example.com/"]),
    ("http", ["8080"], True, 8080, ["http://app.example.com:8080/",
                                     "https://app.example.com:8080/"]),
    ("http", [], False, 443, ["http://app.example.com:443/"]),
    ("https", ["80", "443"], False, 443, ["https://app.example.com/"]),
    ("https", ["443", "8443"], False, 8443, ["https://app.example.com/"]),
    ("https", ["80", "8443"], False, 8443, ["https://app.example.com:8443/"]),
])
def test_visitor_urls(proto, ports, ssl_ok, relay_port, want):
    kite = KiteSpec(domain="app.example.com", proto=proto, secret="x",
                    target=Target("http", "127.0.0.1", 80))
    assert visitor_urls(kite, _spec(relay_port), ports=ports, ssl_ok=ssl_ok) == want


def test_raw_kite_lines_follow_the_tunnels_tls(tmp_path):
    kite = KiteSpec(domain="db.example.com", proto="raw-5432", secret="x",
                    target=Target("raw", "127.0.0.1", 5432))
    ca = tmp_path / "relay.crt"
    line, = visitor_urls(kite, _spec(ca=str(ca)))
    assert line == (f"kite forward 127.0.0.1:5432 db.example.com:5432 --relay "
                    f"relay.example.com:443 --tls --ca {ca}")
    ssh = KiteSpec(domain="box.example.com", proto="raw-22", secret="x",
                   target=Target("raw", "127.0.0.1", 22))
    line, = visitor_urls(ssh, _spec(plain=True))
    assert line == ("ssh -o ProxyCommand='kite connect %h %p --relay relay.example.com:443' "
                    "user@box.example.com")
