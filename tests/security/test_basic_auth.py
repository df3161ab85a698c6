"""Per-kite HTTP basic auth (``kite expose --basic-auth``, ``basic_auth`` in the expose TOML)
against real relay and backend processes, with curl: without, wrong and right credentials,
and a second request on a kept-alive connection.  A refused request never reaches the local
server, and the credentials appear in no log.  (issue 13)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from support import KITE, SECRET, Proc

NAME = "auth.test.kite"
PASSWORD = "pw-Zq8u1-very-secret"

# A keep-alive HTTP/1.1 server that prints one line per request it gets: path, and whether
# an Authorization field came with it (never its value).
_SERVER = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        print("GOT", self.path, "auth" if self.headers.get("Authorization") else "noauth",
              flush=True)
        body = b"page " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print("PORT", s.server_address[1], flush=True)
s.serve_forever()
"""


@pytest.fixture
def site(tmp_path):
    proc = Proc([sys.executable, "-c", _SERVER], tmp_path, "site")
    out = proc.wait_for("PORT ", timeout=20)
    yield proc, int(re.search(r"PORT (\d+)", out).group(1))
    proc.stop(signal.SIGKILL)


def curl(port: int, *args: str) -> list[tuple[int, int]]:
    """(HTTP status, new connections) per URL of one curl run."""
    common = ["-s", "-w", "%{http_code} %{num_connects}\n", "--max-time", "20",
              "--resolve", f"{NAME}:{port}:127.0.0.1"]
    argv = ["curl", *common]
    for a in args:
        if a.startswith("http://"):
            argv += ["-o", "/dev/null", a]
        else:
            argv += [a, *common] if a == "--next" else [a]  # --next resets the options
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return [tuple(map(int, line.split())) for line in out.stdout.splitlines()]  # type: ignore


def test_basic_auth_with_curl(tmp_path, site, relay_process, expose_process):
    server, port = site
    relay = relay_process()
    backend = expose_process(str(port), NAME, relay, "--basic-auth", f"bob:{PASSWORD}",
                             "--basic-auth", "carol:other-password")
    url = f"http://{NAME}:{relay.port}"

    # Without, and with wrong, credentials: 401 with the challenge; nothing reaches the server.
    out = subprocess.run(["curl", "-s", "-i", "--max-time", "20", "--resolve",
                          f"{NAME}:{relay.port}:127.0.0.1", f"{url}/open"],
                         capture_output=True, text=True, timeout=60).stdout
    assert out.startswith("HTTP/1.1 401 Unauthorized\n"), out
    assert f'WWW-Authenticate: Basic realm="{NAME}"' in out
    assert curl(relay.port, "-u", "bob:wrong", f"{url}/wrong") == [(401, 1)]
    assert curl(relay.port, "-u", f"mallory:{PASSWORD}", f"{url}/wrong-user") == [(401, 1)]
    assert "GOT" not in server.output()

    # Right credentials (either pair): the page.
    assert curl(relay.port, "-u", f"bob:{PASSWORD}", f"{url}/one") == [(200, 1)]
    assert curl(relay.port, "-u", "carol:other-password", f"{url}/two") == [(200, 1)]

    # Kept alive: a second request with credentials on the same connection passes; one
    # without is refused although the first of the connection was let through.
    assert curl(relay.port, "-u", f"bob:{PASSWORD}", f"{url}/three", f"{url}/four") == [
        (200, 1), (200, 0)]
    assert curl(relay.port, "-u", f"bob:{PASSWORD}", f"{url}/five", "--next",
                f"{url}/six") == [(200, 1), (401, 0)]

    got = [line for line in server.output().splitlines() if line.startswith("GOT")]
    assert got == [f"GOT /{p} auth" for p in ("one", "two", "three", "four", "five")]

    # No credential in any log (both processes run with -v).
    for text in (relay.log(), backend.output()):
        assert PASSWORD not in text and "other-password" not in text
        assert "Traceback" not in text
    assert "no valid credentials; answered 401" in backend.output()


def test_basic_auth_in_the_expose_config(tmp_path, site, relay_process):
    server, port = site
    relay = relay_process()
    cfg = tmp_path / "expose.toml"
    cfg.write_text(f"""
[defaults]
secret = "{SECRET}"
fingerprint = "{relay.fingerprint}"
[[relay]]
address = "127.0.0.1:{relay.port}"
[[kite]]
name = "{NAME}"
target = "http://127.0.0.1:{port}"
forwarded = false
basic_auth = "bob:{PASSWORD}"
""")
    backend = Proc([*KITE, "expose", "--config", str(cfg)], tmp_path, "expose-cfg")
    try:
        backend.wait_for("flying", timeout=30)
        url = f"http://{NAME}:{relay.port}"
        assert curl(relay.port, f"{url}/a") == [(401, 1)]
        assert curl(relay.port, "-u", f"bob:{PASSWORD}", f"{url}/b") == [(200, 1)]
        got = [line for line in server.output().splitlines() if line.startswith("GOT")]
        assert got == ["GOT /b auth"]
    finally:
        backend.stop(signal.SIGKILL)


@pytest.mark.parametrize("args,key", [
    (["8080", NAME, "--basic-auth", "no-colon-here"], "--basic-auth"),
    (["8080", NAME, "--basic-auth", ":pw-only"], "--basic-auth"),
    (["tcp://127.0.0.1:22", NAME, "--public-port", "22", "--basic-auth", "a:b"], "--basic-auth"),
])
def test_bad_basic_auth_exits_2_with_one_line(args, key):
    out = subprocess.run([*KITE, "expose", *args, "--relay", "127.0.0.1:1", "--plain"],
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, KITE_SECRET=SECRET))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], out.stderr
    assert "no-colon-here" not in out.stderr and "pw-only" not in out.stderr

