"""kite expose --inspect (kite.backend.inspect): requests through a real relay with curl are
recorded, shown as JSON with credentials masked and bodies cut at 10 KiB, and replayed to
the local server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from kite.backend.inspect import BODY_LIMIT, mask_header
from support import KITE, SECRET, Proc, free_port


def _get(url: str, token: str | None = None):
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=20) as r:
        return r.status, json.loads(r.read())


def _post(url: str):
    req = urllib.request.Request(url, method="POST", data=b"")
    try:
        with urllib.request.urlopen(req, timeout=40) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _curl(relay_port: int, path: str, *args: str) -> bytes:
    host = "app.test.kite"
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "--resolve", f"{host}:{relay_port}:127.0.0.1",
         f"http://{host}:{relay_port}{path}", *args], capture_output=True, timeout=30)
    assert out.returncode == 0, out
    return out.stdout


def _wait_for(api: str, pred, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        _, data = _get(api)
        found = [r for r in data["requests"] if pred(r)]
        if found or time.monotonic() > deadline:
            assert found, data
            return found


@pytest.fixture
def inspected(relay_process, expose_process, http_origin, loop_kind):
    """A relay, and kite expose --inspect on uvloop and on asyncio."""
    relay = relay_process()
    port = free_port()
    expose = expose_process(str(http_origin.port), "app.test.kite", relay,
                            f"--inspect=127.0.0.1:{port}", "--loop", loop_kind)
    expose.wait_for(f"inspector: http://127.0.0.1:{port}/")
    return relay, f"http://127.0.0.1:{port}", http_origin, expose


def test_requests_are_recorded_masked_and_replayed(inspected):
    relay, base, origin, _expose = inspected
    body = _curl(relay.port, "/hello?x=1", "-H", "Authorization: Bearer visitor-token-123",
                 "-H", "Cookie: session=visitor-cookie; theme=dark")
    assert body == b"hello from the origin /hello?x=1\n"
    api = f"{base}/api/requests"
    first, = _wait_for(api, lambda r: r["path"] == "/hello?x=1" and r["state"] == "complete")
    assert first["method"] == "GET" and first["status"] == 200 and first["replayable"]

    _, ex = _get(f"{api}/{first['id']}")
    req_headers = {n.lower(): v for n, v in ex["request"]["headers"]}
    assert req_headers["authorization"] == "Bearer ***"
    assert req_headers["cookie"] == "session=***; theme=***"
    resp_headers = {n.lower(): v for n, v in ex["response"]["headers"]}
    assert resp_headers["set-cookie"] == "session=***; Path=/; HttpOnly"
    assert ex["response"]["body"] == "hello from the origin /hello?x=1\n"
    dump = json.dumps(ex)
    for secret in ("visitor-token-123", "visitor-cookie", "origin-secret-cookie"):
        assert secret not in dump

    # Replay: the recorded request reaches the local server again, credentials and all,
    # and the new exchange is recorded.
    hits = len(origin.hits)
    status, replayed = _post(f"{api}/{first['id']}/replay")
    assert status == 201, replayed
    assert replayed["replay_of"] == first["id"] and replayed["status"] == 200
    assert replayed["response"]["body"] == "hello from the origin /hello?x=1\n"
    assert len(origin.hits) == hits + 1
    method, path, headers = origin.hits[-1]
    assert (method, path) == ("GET", "/hello?x=1")
    assert headers["Authorization"] == "Bearer visitor-token-123"
    _, listed = _get(api)
    assert listed["requests"][0]["id"] == replayed["id"]  # newest first


def test_bodies_are_cut_at_10_kib_and_cut_ones_are_not_replayed(inspected, tmp_path):
    relay, base, _origin, _expose = inspected
    payload = bytes(range(256)) * 80  # 20 KiB, binary
    small = b"name=kite&value=" + b"x" * 100
    (tmp_path / "big").write_bytes(payload)
    assert _curl(relay.port, "/upload", "--data-binary", f"@{tmp_path / 'big'}") == payload
    assert _curl(relay.port, "/form", "--data-binary", small.decode()) == small
    api = f"{base}/api/requests"
    big, = _wait_for(api, lambda r: r["path"] == "/upload" and r["state"] == "complete")
    _, ex = _get(f"{api}/{big['id']}")
    for side in ("request", "response"):
        assert ex[side]["size"] == len(payload) and ex[side]["truncated"]
        assert ex[side]["encoding"] == "base64"
        import base64
        assert base64.b64decode(ex[side]["body"]) == payload[:BODY_LIMIT]
    assert not ex["replayable"]
    status, answer = _post(f"{api}/{big['id']}/replay")
    assert status == 409 and "body" in answer["error"]

    form, = _wait_for(api, lambda r: r["path"] == "/form" and r["state"] == "complete")
    _, ex = _get(f"{api}/{form['id']}")
    assert ex["request"]["body"] == small.decode() and not ex["request"]["truncated"]
    status, replayed = _post(f"{api}/{form['id']}/replay")
    assert status == 201 and replayed["response"]["body"] == small.decode()
    status, _ = _post(f"{api}/999999/replay")
    assert status == 404


def test_only_the_last_n_are_kept(relay_process, expose_process, http_origin):
    relay = relay_process()
    port = free_port()
    expose_process(str(http_origin.port), "app.test.kite", relay,
                   f"--inspect=127.0.0.1:{port}", "--inspect-keep", "3")
    for i in range(5):
        _curl(relay.port, f"/n{i}")
    api = f"http://127.0.0.1:{port}/api/requests"
    _wait_for(api, lambda r: r["path"] == "/n4" and r["state"] == "complete")
    _, data = _get(api)
    assert [r["path"] for r in data["requests"]] == ["/n4", "/n3", "/n2"]


def test_a_token_guards_the_inspector(relay_process, expose_process, http_origin, tmp_path):
    relay = relay_process()
    port = free_port()
    token_file = tmp_path / "inspect.token"
    token_file.write_text("inspector-token-0123456789\n")
    token_file.chmod(0o600)
    expose = expose_process(str(http_origin.port), "app.test.kite", relay,
                            f"--inspect=127.0.0.1:{port}", "--inspect-token-file",
                            str(token_file))
    api = f"http://127.0.0.1:{port}/api/requests"
    with pytest.raises(urllib.error.HTTPError) as err:
        _get(api)
    assert err.value.code == 401
    assert _get(api, token="inspector-token-0123456789")[0] == 200
    with urllib.request.urlopen(f"{api}?token=inspector-token-0123456789", timeout=20) as r:
        assert r.status == 200
    assert "inspector-token-0123456789" not in expose.output()


def _expose_exit(tmp_path, *args, env=None) -> subprocess.CompletedProcess:
    e = dict(os.environ, KITE_SECRET=SECRET)
    e.update(env or {})
    return subprocess.run([*KITE, "expose", "8080", "app.test.kite", "--relay",
                           "127.0.0.1:1", "--insecure", *args], capture_output=True,
                          text=True, env=e, timeout=60)


def test_non_loopback_without_token_is_exit_2(tmp_path):
    out = _expose_exit(tmp_path, "--inspect=0.0.0.0:4040")
    assert out.returncode == 2, out
    assert "--inspect" in out.stderr and "token" in out.stderr


def test_missing_aiohttp_is_exit_2_naming_the_extra(tmp_path):
    fake = tmp_path / "fake" / "aiohttp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no aiohttp here')\n")
    path = os.pathsep.join([str(tmp_path / "fake"), *sys.path])
    out = _expose_exit(tmp_path, "--inspect", env={"PYTHONPATH": path})
    assert out.returncode == 2, out
    assert "pip install 'kite-relay[admin]'" in out.stderr


def test_inspector_port_taken_is_exit_1(relay_process, tmp_path, http_origin):
    import socket
    relay = relay_process()
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        proc = Proc([*KITE, "expose", str(http_origin.port), "app.test.kite", "--relay",
                     f"127.0.0.1:{relay.port}", "--fingerprint", relay.fingerprint,
                     f"--inspect=127.0.0.1:{taken.getsockname()[1]}"], tmp_path, "taken",
                    env={"KITE_SECRET": SECRET})
        assert proc.proc.wait(30) == 1
        assert "cannot listen on" in proc.output()
    finally:
        taken.close()


@pytest.mark.parametrize("name,value,shown", [
    ("Authorization", "Basic dXNlcjpwYXNz", "Basic ***"),
    ("authorization", "token", "***"),
    ("Proxy-Authorization", "Bearer x", "Bearer ***"),
    ("Cookie", "a=1; b=2", "a=***; b=***"),
    ("Set-Cookie", "id=abc; Secure", "id=***; Secure"),
    ("Content-Type", "text/plain", "text/plain"),
])
def test_mask_header(name, value, shown):
    assert mask_header(name, value) == shown


def test_head_requests_are_recorded(inspected):
    relay, base, _origin, _expose = inspected
    subprocess.run(["curl", "-sS", "-I", "--max-time", "20", "--resolve",
                    f"app.test.kite:{relay.port}:127.0.0.1",
                    f"http://app.test.kite:{relay.port}/head"], check=True,
                   capture_output=True, timeout=30)
    head, = _wait_for(f"{base}/api/requests",
                      lambda r: r["path"] == "/head" and r["state"] == "complete")
    assert head["method"] == "HEAD"


def test_a_chunked_upload_is_replayed_with_a_content_length(inspected):
    relay, base, origin, _expose = inspected
    assert _curl(relay.port, "/chunked", "-H", "Transfer-Encoding: chunked",
                 "--data-binary", "piece by piece") == b"piece by piece"
    api = f"{base}/api/requests"
    rec, = _wait_for(api, lambda r: r["path"] == "/chunked" and r["state"] == "complete")
    _, ex = _get(f"{api}/{rec['id']}")
    assert ex["request"]["body"] == "piece by piece"
    status, replayed = _post(f"{api}/{rec['id']}/replay")
    assert status == 201 and replayed["response"]["body"] == "piece by piece"
    method, path, headers, body = origin.hits[-1]
    assert (method, path, body) == ("POST", "/chunked", b"piece by piece")
    assert headers["Content-Length"] == "14" and "Transfer-Encoding" not in headers


def test_inspect_before_target_says_where_to_put_it(tmp_path):
    e = dict(os.environ, KITE_SECRET=SECRET)
    out = subprocess.run([*KITE, "expose", "--inspect", "8080", "app.test.kite", "--relay",
                          "127.0.0.1:1", "--insecure"], capture_output=True, text=True,
                         env=e, timeout=60)
    assert out.returncode == 2, out
    assert "put --inspect after TARGET NAME" in out.stderr


REQS = (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /b HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello")
RESPS = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
         b"HTTP/1.1 100 Continue\r\n\r\n"
         b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nyes\r\n0\r\n\r\n")


@pytest.mark.parametrize("step", [None, 1, 7])
def test_pipelined_exchanges_pair_up_in_any_cut(step):
    """Both directions fed whole, a byte at a time and in odd pieces: two exchanges, paired
    in order, the interim 100 skipped."""
    from kite.backend.inspect import InspectConfig, Inspector, StreamTap

    tap = StreamTap(Inspector(InspectConfig()), "http:x", "192.0.2.1:1234", ("127.0.0.1", 1))

    def feed(side, data):
        n = step or len(data)
        for i in range(0, len(data), n):
            tap.feed(side, memoryview(data)[i:i + n])

    feed(True, REQS)
    feed(False, RESPS)
    a, b = tap.inspector.recorder.exchanges.values()
    assert (a.summary()["path"], a.summary()["status"], a.state) == ("/a", 200, "complete")
    assert (b.summary()["method"], b.summary()["status"], b.state) == ("POST", 201, "complete")
    assert bytes(b.request.body) == b"hello" and bytes(b.response.body) == b"yes"
    assert b.to_json()["response"]["reason"] == "Created"
    assert b.request_bytes().endswith(b"Content-Length: 5\r\n\r\nhello")


def test_other_sites_cannot_use_the_inspector(inspected):
    """DNS rebinding (a foreign Host) and cross-site POSTs (a foreign Origin) get 403."""
    relay, base, _origin, _expose = inspected
    _curl(relay.port, "/x")
    rec, = _wait_for(f"{base}/api/requests", lambda r: r["path"] == "/x")

    def status(method, path, **headers):
        req = urllib.request.Request(base + path, method=method, headers=headers,
                                     data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(req, timeout=20) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status("GET", "/api/requests", Host="evil.example:4040") == 403
    assert status("GET", "/", Host="attacker.example") == 403
    replay = f"/api/requests/{rec['id']}/replay"
    assert status("POST", replay, Origin="http://evil.example") == 403
    assert status("GET", "/api/requests", Host="localhost:4040") == 200
    assert status("POST", replay, Origin=base) == 201
