"""ForwardedRewriter (kite.proto.forwarded): X-Forwarded-* on every request head, bodies untouched.

Every stream is fed whole, one byte at a time, and cut at random points (Hypothesis); the
output must not depend on the cuts.  Expected outputs come from a small independent oracle
(`rewrite_head` below), applied to the heads of a stream that the test itself lays out.
"""

import http.client
import itertools
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kite.errors import LocalProtocolError, RemoteProtocolError
from kite.proto.forwarded import ForwardedRewriter

CLIENT_IP = "203.0.113.7"
HOST = "app.example"
XFF = b"X-Forwarded-For: 203.0.113.7\r\n"
XFP = b"X-Forwarded-Proto: https\r\n"
XFH = b"X-Forwarded-Host: app.example\r\n"
ADDED = XFF + XFP + XFH

_UNTRUSTED = {
    b"forwarded", b"x-real-ip", b"x-pagekite-for", b"x-pagekite-proto", b"x-pagekite-port"
}


def rewrite_head(head, added=ADDED, copy_host=False):
    """The oracle: insert `added` after the request line, rename untrusted fields."""
    request_line, rest = head.split(b"\r\n", 1)
    lines = rest.split(b"\r\n")
    out = []
    hosts = []
    for line in lines:
        name = line.split(b":", 1)[0].lower().replace(b"_", b"-")
        if line and (
            (name.startswith(b"x-forwarded-") and len(name) > 12) or name in _UNTRUSTED
        ):
            line = b"X-Old-" + line
        if name == b"host":
            hosts.append(line.split(b":", 1)[1].strip())
        out.append(line)
    if copy_host and hosts:
        added += b"X-Forwarded-Host: " + hosts[0] + b"\r\n"
    return request_line + b"\r\n" + added + b"\r\n".join(out)


def make(**kw):
    kw.setdefault("client_ip", CLIENT_IP)
    kw.setdefault("proto", "https")
    kw.setdefault("host", HOST)
    return ForwardedRewriter(**kw)


def run(pieces, **kw):
    rw = make(**kw)
    out = [rw.feed(p) for p in pieces]
    out.append(rw.eof())
    return b"".join(out)


def cuts(data, points):
    points = sorted({p for p in points if 0 < p < len(data)})
    bounds = [0] + points + [len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def assert_all_modes(data, expected, **kw):
    """h11's tr(): whole, one byte at a time, with trailing junk kept separate, and halves."""
    assert run([data], **kw) == expected
    assert run([data[i : i + 1] for i in range(len(data))], **kw) == expected
    assert run([memoryview(data)], **kw) == expected
    assert run([bytearray(data)], **kw) == expected
    for i in range(0, len(data), max(1, len(data) // 23)):
        assert run([data[:i], data[i:]], **kw) == expected, i


# -- real-world request heads --------------------------------------------------------------

CURL_GET = (
    b"GET /index.html?q=1&r=%20 HTTP/1.1\r\n"
    b"Host: app.example\r\n"
    b"User-Agent: curl/7.88.1\r\n"
    b"Accept: */*\r\n"
    b"\r\n"
)
FIREFOX_GET = (
    b"GET /static/app.js HTTP/1.1\r\n"
    b"Host: app.example\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    b"Accept: */*\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Referer: http://app.example/\r\n"
    b"Connection: keep-alive\r\n"
    b"Cookie: session=abc123; theme=dark\r\n"
    b"Sec-Fetch-Dest: script\r\n"
    b"Sec-Fetch-Mode: no-cors\r\n"
    b"Sec-Fetch-Site: same-origin\r\n"
    b"Priority: u=2\r\n"
    b"\r\n"
)
CHROME_GET = (
    b"GET / HTTP/1.1\r\n"
    b"Host: app.example:8080\r\n"
    b"Connection: keep-alive\r\n"
    b"Cache-Control: max-age=0\r\n"
    b'sec-ch-ua: "Chromium";v="124", "Google Chrome";v="124", "Not-A.Brand";v="99"\r\n'
    b"sec-ch-ua-mobile: ?0\r\n"
    b'sec-ch-ua-platform: "Linux"\r\n'
    b"Upgrade-Insecure-Requests: 1\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    b"Chrome/124.0.0.0 Safari/537.36\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,"
    b"image/webp,image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Accept-Language: en-GB,en;q=0.9\r\n"
    b"\r\n"
)
SPOOFED_GET = (
    b"GET /whoami HTTP/1.1\r\n"
    b"Host: app.example\r\n"
    b"X-Forwarded-For: 6.6.6.6\r\n"
    b"x-forwarded-proto: http\r\n"
    b"X_Forwarded_For: 6.6.6.7\r\n"
    b"X-Forwarded-Host: evil.example\r\n"
    b"X-Forwarded-Port: 1\r\n"
    b"Forwarded: for=6.6.6.8\r\n"
    b"X-Real-IP: 6.6.6.9\r\n"
    b"X-PageKite-Port: 2\r\n"
    b"X-Forwarded: not-a-prefix-match\r\n"
    b"X-Old-X-Forwarded-For: already-old\r\n"
    b"Referer: http://x/?X-Forwarded-For: 1.1.1.1\r\n"
    b"\r\n"
)
WS_UPGRADE = (
    b"GET /chat HTTP/1.1\r\n"
    b"Host: app.example\r\n"
    b"User-Agent: Python/3.11 websockets/12.0\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    b"\r\n"
)
# A masked text frame, then bytes that look exactly like a request: after the Upgrade the
# client stream is opaque, so none of this may be touched.
WS_FRAMES = (
    b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"
    b"GET /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n"
)
FAKE_REQUEST = b"GET /admin HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n"
POST_HEAD = (
    b"POST /form HTTP/1.1\r\n"
    b"Host: app.example\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: %d\r\n"
    b"\r\n" % (len(FAKE_REQUEST) + 8)
)
POST_BODY = b"body:\r\n\r\n" [:8] + FAKE_REQUEST
CHUNKED_HEAD = (
    b"POST /upload HTTP/1.1\r\n"
    b"Host: app.example\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"Trailer: X-Checksum\r\n"
    b"\r\n"
)
CHUNKED_BODY = (
    b"%x;name=value;flag\r\n" % len(FAKE_REQUEST)
    + FAKE_REQUEST
    + b"\r\n"
    + b"4\r\n\r\n\r\n\r\n"  # chunk data that is itself CRLFCRLF
    + b"0000A\r\n0123456789\r\n"
    + b'0;last="yes"\r\n'
    + b"X-Checksum: 42\r\n"
    + b"X-Forwarded-For: 9.9.9.9\r\n"  # a trailer: body framing, passed untouched
    + b"\r\n"
)
HTTP10_GET = b"GET / HTTP/1.0\r\nUser-Agent: Wget/1.21\r\nAccept: */*\r\n\r\n"
HTTP10_KEEPALIVE = b"GET /a HTTP/1.0\r\nHost: app.example\r\nConnection: keep-alive\r\n\r\n"
EXPECT_HEAD = (
    b"PUT /big HTTP/1.1\r\n"
    b"Host: app.example\r\n"
    b"Content-Length: 11\r\n"
    b"Expect: 100-continue\r\n"
    b"\r\n"
)
CONNECT_HEAD = b"CONNECT app.example:443 HTTP/1.1\r\nHost: app.example:443\r\n\r\n"
TLS_HELLO = b"\x16\x03\x01\x00\x05hello" + FAKE_REQUEST

# Each case lays out a stream as ("head", bytes) pieces (rewritten by the oracle) and
# ("raw", bytes) pieces (must pass untouched), and ("drop", bytes) (must disappear).
CASES = {
    "curl": [("head", CURL_GET)],
    "firefox": [("head", FIREFOX_GET)],
    "chrome": [("head", CHROME_GET)],
    "spoofed": [("head", SPOOFED_GET)],
    "pipelined-gets": [("head", CURL_GET), ("head", FIREFOX_GET), ("head", CHROME_GET)],
    "post-fake-request-in-body": [("head", POST_HEAD), ("raw", POST_BODY), ("head", CURL_GET)],
    "chunked-fake-request-in-chunks": [
        ("head", CHUNKED_HEAD),
        ("raw", CHUNKED_BODY),
        ("head", CURL_GET),
    ],
    "websocket": [("head", WS_UPGRADE), ("raw", WS_FRAMES)],
    "connect": [("head", CONNECT_HEAD), ("raw", TLS_HELLO)],
    "http10-close": [("head", HTTP10_GET), ("drop", CURL_GET + b"garbage \x00\xff")],
    "http10-keepalive": [("head", HTTP10_KEEPALIVE), ("head", HTTP10_KEEPALIVE)],
    "connection-close": [
        ("head", CURL_GET),
        ("head", b"GET /last HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n"),
        ("drop", CURL_GET),
    ],
    "expect-100": [("head", EXPECT_HEAD), ("raw", b"hello world"), ("head", CURL_GET)],
    "empty-lines-between": [
        ("raw", b"\r\n"),
        ("head", CURL_GET),
        ("head", POST_HEAD),
        ("raw", POST_BODY),
        ("raw", b"\r\n"),  # old browsers add CRLF after a POST body (RFC 9112 §2.2)
        ("head", CURL_GET),
    ],
    "zero-length-body": [
        ("head", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"),
        ("head", CURL_GET),
    ],
    "gzip-then-chunked": [
        ("head", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
        ("raw", b"3\r\n\x1f\x8b\x08\r\n0\r\n\r\n"),
        ("head", CURL_GET),
    ],
    "chunked-upgrade": [  # opaque right after the Upgrade head; the body passes anyway
        ("head", b"POST /h2c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                 b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                 b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"),
        ("raw", b"5\r\nhello\r\n0\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ],
}


def layout(case, added=ADDED):
    data = b"".join(b for _, b in case)
    expected = b"".join(
        rewrite_head(b, added) if kind == "head" else (b if kind == "raw" else b"")
        for kind, b in case
    )
    return data, expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_real_world_streams_in_all_feeding_modes(name):
    data, expected = layout(CASES[name])
    assert_all_modes(data, expected)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(CASES)), points=st.lists(st.integers(0, 2000), max_size=12))
def test_output_does_not_depend_on_cuts(name, points):
    data, expected = layout(CASES[name])
    assert run(cuts(data, points)) == expected


def run_verbatim(pieces, **kw):
    """What the backend's sink does: verbatim() bytes leave as they are, feed() the rest."""
    rw = make(**kw)
    out = []
    for p in pieces:
        mv = memoryview(p)
        take = rw.verbatim(len(mv))
        out.append(bytes(mv[:take]))
        if take < len(mv):
            out.append(rw.feed(mv[take:]))
    out.append(rw.eof())
    return b"".join(out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(CASES)), points=st.lists(st.integers(0, 2000), max_size=12))
def test_verbatim_fast_path_gives_the_same_stream(name, points):
    data, expected = layout(CASES[name])
    assert run_verbatim(cuts(data, points)) == expected


def test_verbatim_covers_a_content_length_body_and_nothing_else():
    rw = make()
    assert rw.verbatim(10) == 0  # a head: must be looked at
    rw.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
    assert rw.verbatim(4) == 4
    assert rw.verbatim(100) == 6  # only the rest of the body
    assert rw.verbatim(100) == 0  # the next request's head
    out = rw.feed(CURL_GET)
    assert b"X-Forwarded-For" in out


def test_exact_bytes_of_one_rewrite():
    # Spelled out once, so the oracle itself is pinned down.
    out = run([SPOOFED_GET])
    assert out == (
        b"GET /whoami HTTP/1.1\r\n"
        b"X-Forwarded-For: 203.0.113.7\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: app.example\r\n"
        b"Host: app.example\r\n"
        b"X-Old-X-Forwarded-For: 6.6.6.6\r\n"
        b"X-Old-x-forwarded-proto: http\r\n"
        b"X-Old-X_Forwarded_For: 6.6.6.7\r\n"
        b"X-Old-X-Forwarded-Host: evil.example\r\n"
        b"X-Old-X-Forwarded-Port: 1\r\n"
        b"X-Old-Forwarded: for=6.6.6.8\r\n"
        b"X-Old-X-Real-IP: 6.6.6.9\r\n"
        b"X-Old-X-PageKite-Port: 2\r\n"
        b"X-Forwarded: not-a-prefix-match\r\n"
        b"X-Old-X-Forwarded-For: already-old\r\n"
        b"Referer: http://x/?X-Forwarded-For: 1.1.1.1\r\n"
        b"\r\n"
    )
    assert out.count(b"\nX-Forwarded-For:") == 1


def test_post_body_that_looks_like_a_request_is_not_rewritten():
    out = run([POST_HEAD + POST_BODY])
    assert out == rewrite_head(POST_HEAD) + POST_BODY
    assert out.count(b"X-Forwarded-Proto") == 1
    assert b"X-Old-" not in out  # the fake X-Forwarded-For in the body keeps its name


def test_chunked_body_and_trailers_are_byte_exact():
    out = run([CHUNKED_HEAD + CHUNKED_BODY])
    assert out == rewrite_head(CHUNKED_HEAD) + CHUNKED_BODY
    assert b"X-Forwarded-For: 9.9.9.9\r\n" in out  # trailer not renamed


def test_streams_are_not_buffered():
    rw = make()
    assert rw.feed(EXPECT_HEAD) == rewrite_head(EXPECT_HEAD)  # sent before any body byte
    assert rw.state == "body"
    assert rw.feed(b"hello") == b"hello"
    assert rw.feed(b" world") == b" world"
    assert rw.state == "head"
    rw = make()
    assert rw.feed(CHUNKED_HEAD) == rewrite_head(CHUNKED_HEAD)
    assert rw.feed(b"10\r\n") == b"10\r\n"
    assert rw.feed(b"0123") == b"0123"  # chunk data leaves as it arrives
    assert rw.feed(b"456789abcdef\r") == b"456789abcdef"  # the CR waits for its LF
    assert rw.feed(b"\n0\r\n") == b"\r\n0\r\n"
    assert rw.feed(b"\r\n") == b"\r\n"
    assert rw.requests == 1 and rw.state == "head"


def test_large_body_passes_without_copy():
    body = bytes(range(256)) * 4096
    rw = make()
    head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (2 * len(body))
    assert rw.feed(head) == rewrite_head(head)
    assert rw.feed(body) is body  # a whole-body feed comes back as the same object
    assert rw.feed(memoryview(body)) == body


def test_partial_head_is_held_back():
    rw = make()
    assert rw.feed(CURL_GET[:-1]) == b""
    assert rw.state == "head"
    assert rw.feed(CURL_GET[-1:]) == rewrite_head(CURL_GET)


def test_opaque_after_upgrade_and_connect():
    rw = make()
    assert rw.feed(WS_UPGRADE) == rewrite_head(WS_UPGRADE)
    assert rw.opaque
    frame = bytearray(WS_FRAMES)
    assert rw.feed(frame) == WS_FRAMES
    rw = make()
    assert rw.feed(CONNECT_HEAD + TLS_HELLO) == rewrite_head(CONNECT_HEAD) + TLS_HELLO
    assert rw.opaque and rw.requests == 1


def test_upgrade_without_connection_token_is_not_an_upgrade():
    # RFC 9110 §7.8: Upgrade only counts when listed in Connection; the stream stays HTTP.
    head = b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n"
    assert run([head + CURL_GET]) == rewrite_head(head) + rewrite_head(CURL_GET)


def test_http10_upgrade_is_ignored():
    # RFC 9110 §7.8: a server MUST ignore Upgrade in an HTTP/1.0 request.
    head = (
        b"GET / HTTP/1.0\r\nHost: a\r\nUpgrade: websocket\r\n"
        b"Connection: keep-alive, Upgrade\r\n\r\n"
    )
    rw = make()
    assert rw.feed(head + HTTP10_KEEPALIVE) == rewrite_head(head) + rewrite_head(HTTP10_KEEPALIVE)
    assert not rw.opaque


def test_host_none_copies_each_requests_host():
    added = XFF + XFP
    one = b"GET / HTTP/1.1\r\nHost:  one.example \r\n\r\n"
    two = b"GET / HTTP/1.1\r\nhost: two.example:8080\r\n\r\n"
    none = b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    data = none + one + two
    expected = (
        rewrite_head(none, added, copy_host=True)
        + rewrite_head(one, added, copy_host=True)
        + rewrite_head(two, added, copy_host=True)
    )
    assert b"X-Forwarded-Host: one.example\r\n" in expected
    assert b"X-Forwarded-Host: two.example:8080\r\n" in expected
    assert_all_modes(data, expected, host=None)


def test_proto_and_client_ip_forms():
    head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    out = run([head], proto="http", client_ip="::ffff:192.0.2.1", host=None)
    assert out.startswith(
        b"GET / HTTP/1.1\r\nX-Forwarded-For: 192.0.2.1\r\nX-Forwarded-Proto: http\r\n"
    )
    out = run([head], client_ip="2001:db8::1%eth0")
    assert b"X-Forwarded-For: 2001:db8::1\r\n" in out
    out = run([head], host="b\u00fccher.example")
    assert b"X-Forwarded-Host: xn--bcher-kva.example\r\n" in out
    out = run([head], client_ip="unknown")
    assert b"X-Forwarded-For: unknown\r\n" in out
    import ipaddress

    out = run([head], client_ip=ipaddress.ip_address("192.0.2.9"))
    assert b"X-Forwarded-For: 192.0.2.9\r\n" in out


@pytest.mark.parametrize(
    "kw, exc",
    [
        ({"client_ip": "1.2.3.4\r\nX-Evil: 1"}, RemoteProtocolError),
        ({"client_ip": "fe80::1%a\r\nX: y"}, None),  # scope dropped, no injection
        ({"client_ip": "example.com"}, RemoteProtocolError),
        ({"proto": "ftp"}, LocalProtocolError),
        ({"host": "a b"}, LocalProtocolError),
        ({"host": "a\r\nX: y"}, LocalProtocolError),
        ({"host": "\u00e9" * 70}, LocalProtocolError),  # not encodable as IDNA
        ({"max_head": 10}, LocalProtocolError),
    ],
)
def test_constructor_validation(kw, exc):
    if exc is None:
        assert b"X: y" not in run([CURL_GET], **kw)
    else:
        with pytest.raises(exc):
            make(**kw)


# -- errors ---------------------------------------------------------------------------------

MALFORMED = {
    "tls-to-http-kite": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    "bare-lf": b"GET / HTTP/1.1\nHost: a\n\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n",
    "space-before-first-field": b"GET / HTTP/1.1\r\n X-Forwarded-For: 1\r\nHost: a\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    "te-and-cl": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 5\r\n\r\n",
    "te-in-http10": b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-not-chunked": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
    "two-cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    "cl-list": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\nx",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "http09": b"GET /\r\n\r\n",
    "http2-version": b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    "h2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "unknown-method": b"FROB / HTTP/1.1\r\nHost: a\r\n\r\n",
    "nul-in-value": b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
    "bad-chunk-size": CHUNKED_HEAD + b"zz\r\n",
    "chunk-size-space": CHUNKED_HEAD + b"5 \r\nhello\r\n0\r\n\r\n",
    "chunk-data-too-long": CHUNKED_HEAD + b"5\r\nhelloX\r\n0\r\n\r\n",
    "chunk-bare-lf": CHUNKED_HEAD + b"5\nhello\r\n0\r\n\r\n",
    "chunk-overflow": CHUNKED_HEAD + b"10000000000000000\r\n",
    "bad-trailer": CHUNKED_HEAD + b"0\r\nX: a\r\n b\r\n\r\n",
    "second-request-bad": CURL_GET + b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n",
    # The parser of a bodyless request is reused for the next head: it must judge it afresh.
    "second-request-two-hosts": CURL_GET + b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
    "second-request-cl-and-te": CURL_GET
    + b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    "second-request-http2": CURL_GET + b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    "rtsp": b"GET / RTSP/1.0\r\nHost: a\r\n\r\n",  # llhttp takes it; it is not HTTP
    "ice": b"GET / ICE/1.0\r\nHost: a\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_streams_raise_in_every_feeding_mode(name):
    data = MALFORMED[name]
    for pieces in ([data], [data[i : i + 1] for i in range(len(data))], [data[:7], data[7:]]):
        rw = make()
        with pytest.raises(RemoteProtocolError):
            for p in pieces:
                rw.feed(p)
            rw.eof()
        assert rw.state == "closed"
        with pytest.raises(LocalProtocolError):
            rw.feed(b"GET")


def test_garbage_is_refused_at_once_not_after_max_head():
    rw = make()
    with pytest.raises(RemoteProtocolError, match="malformed HTTP request"):
        rw.feed(b"\x16\x03\x01")


def test_head_size_limit():
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"p" * 200 + b"\r\n\r\n"
    assert run([head], max_head=len(head)) == rewrite_head(head)
    for pieces in ([head], [head[:100], head[100:]], [bytes([b]) for b in head]):
        rw = make(max_head=len(head) - 1)
        with pytest.raises(RemoteProtocolError, match="longer than"):
            for p in pieces:
                rw.feed(p)


def test_trailer_and_chunk_line_limits():
    rw = make(max_head=100)
    rw.feed(CHUNKED_HEAD + b"0\r\n")
    with pytest.raises(RemoteProtocolError, match="trailer"):
        rw.feed(b"X-T: " + b"t" * 200 + b"\r\n\r\n")
    rw = make()
    rw.feed(CHUNKED_HEAD)
    with pytest.raises(RemoteProtocolError):
        rw.feed(b"5;" + b"e" * 5000)


def test_eof_inside_head_drops_it():
    rw = make()
    assert rw.feed(CURL_GET + b"GET / HTTP/1.1\r\nX-Forwarded-For: 6.6.6.6\r\n") == rewrite_head(
        CURL_GET
    )
    with pytest.raises(RemoteProtocolError, match="inside a request head"):
        rw.eof()
    assert rw.eof() == b""  # idempotent
    rw = make()
    rw.feed(b"GET / HT")
    assert rw.close() == b""  # close() never raises
    with pytest.raises(LocalProtocolError):
        rw.feed(b"x")


def test_eof_flushes_held_body_framing():
    rw = make()
    rw.feed(CHUNKED_HEAD + b"5;ext")
    assert rw.eof() == b"5;ext"
    rw = make()
    rw.feed(CHUNKED_HEAD + b"0\r\nX-T: 1\r\n")
    assert rw.close() == b"X-T: 1\r\n"
    rw = make()
    rw.feed(CHUNKED_HEAD + b"1\r\na\r")
    assert rw.eof() == b"\r"
    rw = make()
    rw.feed(b"\r\n" + CURL_GET)  # only empty lines and complete heads: nothing held
    assert rw.eof() == b""


# -- property tests over arbitrary bodies ------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(max_size=300),
    chunk_sizes=st.lists(st.integers(1, 64), max_size=10),
    points=st.lists(st.integers(0, 800), max_size=8),
    ext=st.sampled_from([b"", b";a=b", b';q="x y"']),
)
def test_arbitrary_bodies_pass_untouched(body, chunk_sizes, points, ext):
    cl_head = b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)
    chunked = b""
    rest = body
    for size in chunk_sizes:
        piece, rest = rest[:size], rest[size:]
        if piece:
            chunked += b"%X%s\r\n%s\r\n" % (len(piece), ext, piece)
    if rest:
        chunked += b"%x\r\n%s\r\n" % (len(rest), rest)
    chunked += b"0" + ext + b"\r\n\r\n"
    data = cl_head + body + CHUNKED_HEAD + chunked + CURL_GET
    expected = b"".join(
        (rewrite_head(cl_head), body, rewrite_head(CHUNKED_HEAD), chunked, rewrite_head(CURL_GET))
    )
    assert run(cuts(data, points)) == expected


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), points=st.lists(st.integers(0, 200), max_size=5))
def test_arbitrary_bytes_never_crash(data, points):
    # Either a RemoteProtocolError, or output; and the outcome does not depend on cuts.
    def outcome(pieces):
        try:
            return run(pieces)
        except RemoteProtocolError:
            return "error"

    assert outcome([data]) == outcome(cuts(data, points))


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.sampled_from([b"GET / HTTP/1.1\r\nHost: a\r\n", b"POST /x HTTP/1.0\r\n"]),
    names=st.lists(
        st.sampled_from(
            [b"X-Forwarded-For", b"x-forwarded-for", b"X_FORWARDED_FOR", b"Forwarded",
             b"X-Real-Ip", b"X-Forwarded-Whatever", b"X-PageKite-Proto", b"Accept",
             b"X-Forwarded", b"Forwarded-For", b"X-Old-Forwarded"]
        ),
        max_size=8,
    ),
)
def test_every_forwarding_header_is_renamed_and_ours_appear_once(prefix, names):
    head = prefix + b"".join(n + b": v\r\n" for n in names) + b"\r\n"
    out = run([head])
    assert out == rewrite_head(head)
    lines = out.split(b"\r\n")
    assert lines.count(XFF[:-2]) == 1 and lines.count(XFP[:-2]) == 1
    for line in lines[1:]:
        name = line.split(b":")[0].lower().replace(b"_", b"-")
        if name.startswith(b"x-forwarded-") or name in (b"forwarded", b"x-real-ip"):
            assert line in (XFF[:-2], XFP[:-2], XFH[:-2])


# -- a real HTTP server behind the rewriter ---------------------------------------------------


class EchoHandler(BaseHTTPRequestHandler):
    """Answers each request with the header fields and body it received, as JSON."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return body
                body += self.rfile.read(size)
                self.rfile.read(2)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _echo(self):
        body = self._read_body()
        payload = json.dumps(
            {
                "path": self.path,
                "headers": [[k, v] for k, v in self.headers.items()],
                "body": body.decode("latin-1"),
                "peer": list(self.client_address),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = _echo


def _pump(src, dst, rewriter=None):
    """Copy src -> dst, through the rewriter if given; small reads split the heads."""
    try:
        while True:
            data = src.recv(13 if rewriter else 65536)
            if not data:
                break
            out = rewriter.feed(data) if rewriter else data
            if out:
                dst.sendall(out)
        if rewriter:
            dst.sendall(rewriter.eof())
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


@pytest.fixture
def echo_relay():
    """An echo server on 127.0.0.1:0 and, in front of it, a one-connection relay whose
    client->server direction goes through a ForwardedRewriter (what `kite expose` does)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    threads = []

    def relay():
        client, _ = listener.accept()
        upstream = socket.create_connection(server.server_address, timeout=10)
        client.settimeout(10)
        rw = ForwardedRewriter(client_ip=CLIENT_IP, proto="https", host=HOST)
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream, rw)
        back.join(10)
        client.close()
        upstream.close()

    t = threading.Thread(target=relay, daemon=True)
    t.start()
    threads.append(t)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        server.shutdown()
        server.server_close()
        for t in threads:
            t.join(10)


def test_real_server_sees_forwarded_headers_once_per_keepalive_request(echo_relay):
    conn = http.client.HTTPConnection("127.0.0.1", echo_relay, timeout=10)
    results = []

    conn.request("GET", "/one", headers={"X-Forwarded-For": "6.6.6.6", "Host": "app.example"})
    results.append(json.loads(conn.getresponse().read()))
    sock = conn.sock

    conn.request("POST", "/two", body=FAKE_REQUEST, headers={"Content-Type": "text/plain"})
    results.append(json.loads(conn.getresponse().read()))
    assert conn.sock is sock  # still the same keep-alive connection

    conn.request("PUT", "/three", body=iter([FAKE_REQUEST, b"tail"]), encode_chunked=True)
    results.append(json.loads(conn.getresponse().read()))
    assert conn.sock is sock
    conn.close()

    assert [r["path"] for r in results] == ["/one", "/two", "/three"]
    assert len({tuple(r["peer"]) for r in results}) == 1  # one upstream connection
    for r in results:
        headers = r["headers"]
        names = [k.lower() for k, _ in headers]
        assert names[:3] == ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"]
        for name, value in (("X-Forwarded-For", CLIENT_IP), ("X-Forwarded-Proto", "https"),
                            ("X-Forwarded-Host", HOST)):
            assert [v for k, v in headers if k.lower() == name.lower()] == [value]
    assert ["X-Old-X-Forwarded-For", "6.6.6.6"] in results[0]["headers"]
    assert results[1]["body"] == FAKE_REQUEST.decode()  # the body's fake head untouched
    assert results[2]["body"] == (FAKE_REQUEST + b"tail").decode()


def test_fields_are_found_by_whole_name_in_any_case():
    # Lookalike names are not Host / Content-Length / forwarding fields; real ones are
    # found in any case, also after a reused parser (second and third request).
    head = (b"POST /x HTTP/1.1\r\nHostname: evil\r\nX-Host: evil\r\nHOST: a.example\r\n"
            b"Content-Lengthy: 99\r\ncOnTeNt-LeNgTh: 3\r\nX-Forwarded: keep\r\n"
            b"X_Forwarded_Port: 1\r\n\r\n")
    get = b"GET / HTTP/1.1\r\nHost: a.example\r\nXForwarded-For: keep\r\n\r\n"
    data = get + head + b"abc" + get
    expected = rewrite_head(get) + rewrite_head(head) + b"abc" + rewrite_head(get)
    assert b"X-Old-X_Forwarded_Port: 1" in expected and b"X-Old-X-Forwarded: keep" not in expected
    assert_all_modes(data, expected)
    out = run([data], host=None)
    assert out.count(b"X-Forwarded-Host: a.example\r\n") == 3


def test_parsers_are_shared_between_streams_and_idle_streams_hold_none():
    # A parser whose request ended with its head goes back to a shared pool: an idle
    # keep-alive stream holds no parser (memory per idle visitor), and the next head of any
    # stream is judged by a pooled parser exactly as by a fresh one.
    from kite.proto import forwarded

    get = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    one, two = make(), make()
    assert one.feed(get) == rewrite_head(get)
    assert one._parser is None and one._events is None
    assert 0 < len(forwarded._IDLE_PARSERS) <= forwarded._IDLE_PARSERS_MAX
    with pytest.raises(RemoteProtocolError):
        two.feed(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n")
    post = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n"
    assert one.feed(post + b"ok" + get) == rewrite_head(post) + b"ok" + rewrite_head(get)
    three = make()
    for _ in range(3 * forwarded._IDLE_PARSERS_MAX):
        assert three.feed(get) == rewrite_head(get)
    assert len(forwarded._IDLE_PARSERS) <= forwarded._IDLE_PARSERS_MAX
