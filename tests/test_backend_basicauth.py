"""Per-kite HTTP basic auth in the backend: the checker, the gate over a visitor stream, and a
relay + backend in this process with pipelined requests on one connection."""

from __future__ import annotations

import asyncio
import base64

import pytest

from kite.backend.basicauth import AuthGate, BasicAuth
from kite.config import check_basic_auth
from kite.errors import ConfigError
from support import http_kite, kite_env, run

PAIRS = ("bob:hunter2:with-colon", "carol:pässwörd")


def _auth(pair: str) -> bytes:
    return b"Authorization: Basic " + base64.b64encode(pair.encode()) + b"\r\n"


def _head(path: bytes = b"/", extra: bytes = b"") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: a.test.kite\r\n" + extra + b"\r\n"


@pytest.mark.parametrize("extra,ok", [
    (_auth("bob:hunter2:with-colon"), True),
    (_auth("carol:pässwörd"), True),  # UTF-8 (RFC 7617 charset="UTF-8")
    (b"authorization:  basic " + base64.b64encode(b"bob:hunter2:with-colon") + b"  \r\n", True),
    (b"", False),
    (_auth("bob:hunter2"), False),
    (_auth("bob:hunter2:with-colon "), False),
    (_auth("carol:hunter2:with-colon"), False),
    (_auth("bob:hunter2:with-colon") + _auth("bob:hunter2:with-colon"), False),  # two fields
    (b"Authorization: Bearer " + base64.b64encode(b"bob:hunter2:with-colon") + b"\r\n", False),
    (b"Authorization: Basic !!!notbase64\r\n", False),
    (b"Authorization: Basic Ym9iOmh1bnRlcjI6d2l0aC1jb2xvbg\r\n", False),  # missing padding
    (b"Authorization: Basic\r\n", False),
    (b"X-Authorization: Basic " + base64.b64encode(b"bob:hunter2:with-colon") + b"\r\n", False),
])
def test_checker(extra, ok):
    auth = BasicAuth(PAIRS, "a.test.kite")
    assert auth.allows(_head(extra=extra)) is ok


def test_challenge_names_the_realm():
    answer = BasicAuth(PAIRS, "a.test.kite").challenge()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b'\r\nWWW-Authenticate: Basic realm="a.test.kite", charset="UTF-8"' in head
    assert b"Connection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert b"hunter2" not in answer
    # A realm that could break the quoted string is replaced.
    assert b'realm="kite"' in BasicAuth(PAIRS, 'x"y').challenge()


def _gate(**kw):
    refused = []
    gate = AuthGate(BasicAuth(PAIRS, "a.test.kite"), on_refused=lambda: refused.append(1),
                    client_ip="10.1.2.3", proto="http", host="a.test.kite", **kw)
    return gate, refused


def test_gate_checks_every_head_and_drops_everything_after_a_refusal():
    gate, refused = _gate()
    ok = _head(b"/one", _auth("bob:hunter2:with-colon"))
    post = (b"POST /up HTTP/1.1\r\nHost: a.test.kite\r\n" + _auth("carol:pässwörd")
            + b"Content-Length: 5\r\n\r\nhello")
    bad = _head(b"/two")
    after = _head(b"/three", _auth("bob:hunter2:with-colon"))
    out = gate.feed(ok + post)
    assert b"GET /one" in out and b"X-Forwarded-For: 10.1.2.3\r\n" in out and out.endswith(b"hello")
    assert gate.passed == 2 and not refused
    # Cut anywhere: the refused head and everything behind it, even a valid request, is dropped.
    data = bad + after
    assert gate.feed(data[:7]) == b""
    assert gate.feed(data[7:]) == b""
    assert refused == [1] and gate.refused and gate.passed == 2
    assert gate.feed(after) == b""
    assert refused == [1]


def test_gate_refuses_a_chunked_upload_without_forwarding_its_body():
    gate, refused = _gate(add_headers=False)
    out = gate.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n0\r\n\r\n")
    assert out == b"" and refused == [1]


def test_gate_without_forwarded_headers_passes_heads_unchanged():
    gate, refused = _gate(add_headers=False)
    head = _head(b"/", _auth("bob:hunter2:with-colon") + b"X-Forwarded-For: 6.6.6.6\r\n")
    assert gate.feed(head) == head and not refused


@pytest.mark.parametrize("value", [
    "nocolon", ":pass", "user:", "us\ter:pass", ["a:b", 3], 17,
])
def test_bad_credentials_are_config_errors_that_do_not_echo_them(value):
    with pytest.raises(ConfigError) as exc:
        check_basic_auth(value, "kite[0].basic_auth", "http")
    assert "kite[0].basic_auth" in str(exc.value)
    if isinstance(value, str) and ":" in value:
        assert value not in str(exc.value)


def test_import_pagekiterc_maps_password_to_basic_auth():
    """pagekite.py's ``+password/USER=PASS`` (after a service line) and ``service_cfg =
    KITE/PORT:password/USER:PASS`` (``user/`` is its alias) become basic_auth; the passwords
    are masked in the report."""
    import tomllib

    from kite.pagekiterc import convert

    rc = """frontend = relay.example.com:443
service_on = http:app.example.com:localhost:8080:SECRETSECRETSECRET1
+password/Bob=hunter2
service_on = raw/22:app.example.com:localhost:22:SECRETSECRETSECRET1
+password/eve=on-raw-kite
service_cfg = app.example.com/80 : user/carol : pw:3
"""
    kind, text, report = convert(rc)
    kites = tomllib.loads(text)["kite"]
    assert kind == "backend"
    assert kites[0]["basic_auth"] == ["Bob:hunter2", "carol:pw:3"]
    assert "basic_auth" not in kites[1]
    lines = report.lines()
    assert any("only http kites" in line for line in lines)
    assert not any("on-raw-kite" in line or "hunter2" in line for line in lines)


def test_basic_auth_needs_an_http_kite():
    with pytest.raises(ConfigError, match="needs an http kite"):
        check_basic_auth("a:b", "--basic-auth", "raw-22")
    assert check_basic_auth(["a:b", "c:d:e"], "k", "http") == ("a:b", "c:d:e")


async def _recording_server(seen: list):
    """A keep-alive HTTP/1.1 server that records every request head it gets."""

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                seen.append(head)
                path = head.split(b" ")[1]
                await asyncio.sleep(0.05 if path == b"/slow" else 0)
                body = b"page " + path
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    return out


def test_pipelined_requests_get_their_answers_in_order_then_401(tmp_path, loop_kind):
    """Two authorised requests and an unauthorised one in one write: the local server answers
    the two (the slow one first), the visitor gets both answers, then the 401, then the end;
    the third request never reaches the local server."""

    async def main():
        seen: list = []
        server, port = await _recording_server(seen)
        kite = http_kite("auth.test.kite", port, basic_auth=("bob:hunter2:with-colon",))
        async with kite_env(tmp_path, [kite], tls=False) as env:
            ok = _auth("bob:hunter2:with-colon")
            out = await _exchange(env.port, (
                b"GET /slow HTTP/1.1\r\nHost: auth.test.kite\r\n" + ok + b"\r\n"
                + b"GET /fast HTTP/1.1\r\nHost: auth.test.kite\r\n" + ok + b"\r\n"
                + b"GET /secret HTTP/1.1\r\nHost: auth.test.kite\r\n\r\n"))
            first = out.index(b"page /slow")
            second = out.index(b"page /fast")
            third = out.index(b"HTTP/1.1 401 Unauthorized")
            assert first < second < third
            assert b'WWW-Authenticate: Basic realm="auth.test.kite"' in out
            assert [h.split(b" ")[1] for h in seen] == [b"/slow", b"/fast"]
            # Refused at once: the first request without credentials; no local dial at all.
            seen.clear()
            out = await _exchange(env.port, b"GET / HTTP/1.1\r\nHost: auth.test.kite\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 401 Unauthorized\r\n") and seen == []
        server.close()

    run(main, loop_kind)


def test_answer_back_before_the_relay_attached_the_visitor(tmp_path, loop_kind, monkeypatch):
    """The backend's 401 and its end reach the relay before the relay has attached the
    visitor's socket (slow on a fresh relay): the visitor still gets the answer, not a
    reset (kite.net.tunnel StreamProtocol: a stream that ended well delivers late)."""
    from kite.relay.dispatch import Dispatcher

    original = Dispatcher._connect_visitor
    attached = []

    async def slow_attach(self, sock, tunnel, stream, skip):
        for _ in range(100):  # until the stream is over on the relay's side
            if stream.closed:
                break
            await asyncio.sleep(0.01)
        attached.append(stream.closed)
        await original(self, sock, tunnel, stream, skip)

    monkeypatch.setattr(Dispatcher, "_connect_visitor", slow_attach)

    async def main():
        seen: list = []
        server, port = await _recording_server(seen)
        kite = http_kite("auth.test.kite", port, basic_auth=("bob:hunter2:with-colon",))
        async with kite_env(tmp_path, [kite], tls=False) as env:
            out = await _exchange(env.port, b"GET / HTTP/1.1\r\nHost: auth.test.kite\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 401 Unauthorized\r\n") and seen == []
            assert attached == [True]
        server.close()

    run(main, loop_kind)
