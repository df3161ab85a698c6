"""kite.proto.http: head ends and their bound, the CONNECT request and its answer, the relay's
refusal pages."""

from __future__ import annotations

import importlib
import inspect
import json

import pytest

from kite.errors import BadRelayReply, HeadTooLong, RemoteProtocolError
from kite.proto.http import (
    MAX_HEAD,
    TUNNEL_CONNECT_OK,
    VISITOR_CONNECT_OK,
    ConnectReply,
    authority,
    build_connect_request,
    connect_refused,
    find_head_end,
    http_error,
    parse_connect_reply,
)


# -- find_head_end -----------------------------------------------------------------------------
def test_find_head_end():
    assert find_head_end(b"") is None
    assert find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n") is None
    assert find_head_end(b"GET / HTTP/1.1\r\n\r\nbody") == 18
    assert find_head_end(b"HTTP/1.1 200 OK\n\nrest") == 17  # pagekite.py accepts \n\n too
    assert find_head_end(b"HTTP/1.1 200 OK\n\r\nrest") == 18  # and a bare LF before CRLF
    assert find_head_end(b"HTTP/1.1 200 OK\r\nA: b\n\nrest") == 23
    assert find_head_end(bytearray(b"a\r\n\r\n")) == 5
    assert find_head_end(memoryview(b"x" * 10 + b"\r\n\r\n"), limit=14) == 14
    with pytest.raises(HeadTooLong):
        find_head_end(b"x" * 11 + b"\r\n\r\n", limit=14)
    with pytest.raises(HeadTooLong):
        find_head_end(b"x" * 14, limit=14)
    with pytest.raises(HeadTooLong):
        find_head_end(memoryview(b"x" * 14), limit=14)
    assert find_head_end(b"x" * 13, limit=14) is None
    with pytest.raises(HeadTooLong, match="longer than 16384"):
        find_head_end(b"GET /" + b"a" * 20000)
    assert issubclass(HeadTooLong, RemoteProtocolError)


def test_find_head_end_crlf_only():
    """The sniffer's rule: towards visitors only ``\\r\\n\\r\\n`` ends a head."""
    assert find_head_end(b"GET / HTTP/1.1\r\n\r\nbody", bare_lf=False) == 18
    assert find_head_end(b"GET / HTTP/1.1\n\nbody", bare_lf=False) is None
    assert find_head_end(b"GET / HTTP/1.1\n\r\nbody", bare_lf=False) is None
    assert find_head_end(b"x" * 10 + b"\r\n\r\n", limit=14, bare_lf=False) == 14
    with pytest.raises(HeadTooLong):
        find_head_end(b"x" * 11 + b"\r\n\r\n", limit=14, bare_lf=False)
    with pytest.raises(HeadTooLong):
        find_head_end(b"x\n\n" + b"x" * 11, limit=14, bare_lf=False)


@pytest.mark.parametrize("bare_lf", [True, False])
def test_find_head_end_byte_by_byte(bare_lf):
    head = b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n"
    data = head + b"trailing body\r\n\r\n"
    for i in range(len(head)):
        assert find_head_end(data[:i], bare_lf=bare_lf) is None
    for i in range(len(head), len(data) + 1):
        assert find_head_end(data[:i], bare_lf=bare_lf) == len(head)


def test_max_head_is_the_one_bound():
    from kite.proto import forwarded

    sniff = importlib.import_module("kite.proto.sniff")
    assert MAX_HEAD == 16384
    assert sniff.MAX_HEAD is MAX_HEAD
    for fn in (sniff.sniff, forwarded.ForwardedRewriter):
        defaults = [p.default for p in inspect.signature(fn).parameters.values()
                    if p.name.startswith("max_head")]
        assert defaults == [MAX_HEAD], fn
    head = b"GET /" + b"a" * (MAX_HEAD - 9) + b"\r\n\r\n"
    assert len(head) == MAX_HEAD and find_head_end(head) == MAX_HEAD
    with pytest.raises(HeadTooLong):
        find_head_end(b"GET /" + b"a" * (MAX_HEAD - 8) + b"\r\n\r\n")


# -- the CONNECT request -----------------------------------------------------------------------
def test_authority():
    assert authority("box.example.com", 22) == "box.example.com:22"
    assert authority("::1", 22) == "[::1]:22"


def test_connect_request_bytes():
    assert build_connect_request("box.example.com", 22) == (
        b"CONNECT box.example.com:22 HTTP/1.1\r\nHost: box.example.com:22\r\n\r\n")
    assert build_connect_request("::1", 5432).startswith(b"CONNECT [::1]:5432 HTTP/1.1\r\n")
    assert build_connect_request("bücher.example", 22).startswith(
        b"CONNECT xn--bcher-kva.example:22 ")
    assert build_connect_request("fe.example.com", 443) == (
        b"CONNECT fe.example.com:443 HTTP/1.1\r\nHost: fe.example.com:443\r\n\r\n")
    for bad in ("", "a b", "a\r\nX: y", "x" * 300, "a\x00b"):
        with pytest.raises(ValueError):
            build_connect_request(bad, 22)
    for port in (0, 65536, -1):
        with pytest.raises(ValueError):
            build_connect_request("box", port)


def test_connect_request_is_what_the_sniffer_routes():
    from kite.proto.sniff import sniff

    data = build_connect_request("Box.Example.com", 2222)
    result = sniff(data)
    assert result.kind == "connect" and (result.host, result.port) == ("box.example.com", 2222)
    assert result.head_length == len(data)


# -- the answer --------------------------------------------------------------------------------
OK_HEAD = b"HTTP/1.1 200 Connection Established\r\n\r\n"
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
           b"Content-Length: 35\r\nConnection: close\r\n\r\n")
ANSWERS = [
    (OK_HEAD, 200, "Connection Established", None),
    (REFUSAL, 503, "Service Unavailable", 35),
    (b"HTTP/1.0 200 OK\n\n", 200, "OK", None),  # bare LF
    (b"HTTP/1.0 403 Forbidden\nContent-Length: 7\n\n", 403, "Forbidden", 7),
    (b"HTTP/1.1 200\r\n\r\n", 200, "", None),  # no reason phrase
    (TUNNEL_CONNECT_OK, 200, "Connection Established", None),
]


@pytest.mark.parametrize("feed", ["whole", "bytewise", "trailing", "bytearray", "memoryview"])
def test_parse_reply_in_every_feeding_mode(feed):
    for head, status, reason, clen in ANSWERS:
        data = head + (b"SSH-2.0-banner\r\n\r\n" if feed == "trailing" else b"")
        if feed == "bytewise":
            for i in range(len(head)):
                assert parse_connect_reply(head[:i]) is None
        if feed == "bytearray":
            data = bytearray(data)
        elif feed == "memoryview":
            data = memoryview(data)
        reply = parse_connect_reply(data)
        assert reply == ConnectReply(status, reason, len(head), clen)
        assert bytes(data[reply.head_length:]) == bytes(data[len(head):])


@pytest.mark.parametrize("bad", [
    b"SSH-2.0-OpenSSH_9.2\r\n",  # --relay points at the ssh server itself
    b"\x15\x03\x03\x00\x02\x02\x70",  # a TLS alert: a TLS-only port
    b"S",  # decided from the first byte
    b"HTTP/2 200\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"HTTP/1.1\r\n\r\n",
    b"HTTP/1.2 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1234567890123\r\n\r\n",
])
def test_parse_reply_rejects_what_is_not_http(bad):
    with pytest.raises(BadRelayReply):
        parse_connect_reply(bad)


def test_parse_reply_bounds_the_head():
    long_head = b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * (MAX_HEAD // 6)
    with pytest.raises(BadRelayReply, match="longer than"):
        parse_connect_reply(long_head)
    assert parse_connect_reply(long_head[:MAX_HEAD - 100]) is None
    fits = b"HTTP/1.1 200 OK\r\nX: " + b"y" * (MAX_HEAD - 24) + b"\r\n\r\n"
    assert len(fits) == MAX_HEAD and parse_connect_reply(fits).head_length == MAX_HEAD
    with pytest.raises(BadRelayReply, match="longer than"):
        parse_connect_reply(fits[:-4] + b"y\r\n\r\n")


# -- what the relay sends ----------------------------------------------------------------------
def test_connect_ok_replies():
    assert VISITOR_CONNECT_OK == b"HTTP/1.1 200 Connection Established\r\n\r\n"
    assert TUNNEL_CONNECT_OK == b"HTTP/1.0 200 Connection Established\r\n\r\n"
    for ok in (VISITOR_CONNECT_OK, TUNNEL_CONNECT_OK):
        assert parse_connect_reply(ok).status == 200


def test_tunnel_connect_ok_is_pagekites(pagekite_mod):
    from pagekite.proto import proto

    assert TUNNEL_CONNECT_OK == proto.HTTP_ConnectOK().encode()


def test_http_error_html():
    page = http_error(404, "a<b>.example")
    head, _, body = page.partition(b"\r\n\r\n")
    assert head == (b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html; charset=utf-8\r\n"
                    b"Content-Length: %d\r\nCache-Control: no-store\r\nConnection: close"
                    % len(body))
    assert body == (b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>"
                    b"<h1>404 Not Found</h1><p>There is no kite called a&lt;b&gt;.example on "
                    b"this relay.</p><hr><p>kite relay</p></body></html>\n")


def test_http_error_json_and_extra_headers():
    page = http_error(503, "app.example", json_wanted=True, extra_headers=b"Retry-After: 5\r\n")
    head, _, body = page.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n")
    assert head.endswith(b"Connection: close\r\nRetry-After: 5")
    assert b"Content-Length: %d\r\n" % len(body) in head
    assert json.loads(body) == {
        "error": 503, "reason": "Service Unavailable", "kite": "app.example",
        "message": "The kite app.example is offline: its backend is not connected to this "
                   "relay right now."}
    assert http_error(418, "x").startswith(b"HTTP/1.1 418 Error\r\n")
    for status in (400, 403, 404, 502, 503):
        reply = parse_connect_reply(http_error(status, "x"))
        assert reply.status == status and reply.content_length == len(
            http_error(status, "x")) - reply.head_length


def test_connect_refused():
    answer = connect_refused(403, "box:22 is not a kite on this relay")
    assert answer == (b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n"
                      b"Content-Length: 35\r\nConnection: close\r\n\r\n"
                      b"box:22 is not a kite on this relay\n")
    reply = parse_connect_reply(answer)
    assert (reply.status, reply.reason, reply.content_length) == (403, "Forbidden", 35)
    assert connect_refused(503, "x").startswith(b"HTTP/1.1 503 Service Unavailable\r\n")


def test_tls_alert_records():
    sniff = importlib.import_module("kite.proto.sniff")

    assert sniff.TLS_ALERT_UNRECOGNIZED_NAME == b"\x15\x03\x03\x00\x02\x02\x70"
    assert sniff.TLS_ALERT_INTERNAL_ERROR == b"\x15\x03\x03\x00\x02\x02\x50"


def test_error_page_template_fills_in_escaped_fields():
    from kite.proto.http import render_template

    out = render_template("<h1>{status} {reason}</h1><p>{message}</p>{kite}<style>a{}</style>",
                          503, "Service Unavailable", "<i>a</i>.x", "it's \"off\"")
    assert out == ("<h1>503 Service Unavailable</h1><p>it&#x27;s &quot;off&quot;</p>"
                   "&lt;i&gt;a&lt;/i&gt;.x<style>a{}</style>")
    page = http_error(404, "a.x", template="<p>{kite}</p>")
    assert page.endswith(b"\r\n\r\n<p>a.x</p>") and b"Content-Length: 10\r\n" in page
def test_https_redirect():
    from kite.proto.http import https_redirect

    r = https_redirect("app.example.com", 80, "/a/b?c=1")
    assert r.startswith(b"HTTP/1.1 308 Permanent Redirect\r\n")
    assert b"\r\nLocation: https://app.example.com/a/b?c=1\r\n" in r
    assert b"Location: https://app.example.com:8080/\r\n" in https_redirect(
        "app.example.com", 8080, "http://elsewhere.example/x")  # absolute form: the root
    assert b"Location: https://app.example.com/\r\n" in https_redirect("app.example.com", 443, "*")


def test_add_response_header():
    from kite.proto.http import add_response_header

    name, value = b"Strict-Transport-Security", b"max-age=60"
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi" + b"HTTP/1.1 200 OK\r\n"
    end = find_head_end(data)
    out = add_response_header(data, end, name, value)
    assert out == (b"HTTP/1.1 200 OK\r\nStrict-Transport-Security: max-age=60\r\n"
                   b"Content-Length: 2\r\n\r\nhi" + b"HTTP/1.1 200 OK\r\n")
    own = b"HTTP/1.1 200 OK\r\nstrict-transport-security: max-age=1\r\n\r\n"
    assert add_response_header(own, len(own), name, value) == own  # the server's wins
    bare = b"HTTP/1.0 204 No Content\n\n"
    assert add_response_header(bare, len(bare), name, value) == (
        b"HTTP/1.0 204 No Content\nStrict-Transport-Security: max-age=60\r\n\n")
    junk = b"SSH-2.0-x\r\n\r\n"
    assert add_response_header(junk, len(junk), name, value) == junk
