"""kite.proto.sniff: a visitor's first bytes (§1.3, §8.1), with real heads and hellos, fuzzed."""

import ssl

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kite.errors import SniffError
from kite.proto.handshake import PING_REQUEST, KiteLine, build_tunnel_request
from kite.proto.sniff import (
    MAX_HEAD,
    NEED_MORE,
    HttpRequest,
    NeedMore,
    PingProbe,
    ProxyConnect,
    TlsHello,
    TunnelConnect,
    parse_host,
    sniff,
)

RESULT_TYPES = (NeedMore, PingProbe, TunnelConnect, ProxyConnect, HttpRequest, TlsHello)

CURL_GET = (
    b"GET / HTTP/1.1\r\nHost: foo.testkite.local:20210\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
)
WEBSOCKET = (
    b"GET /chat HTTP/1.1\r\nHost: Server.Example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://example.com\r\n"
    b"Sec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
CURL_PROXY = (
    b"CONNECT foo.testkite.local:443 HTTP/1.1\r\nHost: foo.testkite.local:443\r\n"
    b"User-Agent: curl/7.88.1\r\nProxy-Connection: Keep-Alive\r\n\r\n"
)
NC_PROXY = b"CONNECT foo.testkite.local:22 HTTP/1.0\r\n\r\n"  # nc -X connect
POST = b"POST /form?a=1 HTTP/1.0\r\nHost: foo.example\r\nContent-Length: 5\r\n\r\nhello"


def client_hello(server_hostname=None, *, maximum=None):
    """The first flight of a real TLS client (Python's ssl module over memory BIOs)."""
    context = ssl.create_default_context()
    if server_hostname is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        context.maximum_version = maximum
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


HELLO_SNI = client_hello("Foo.TestKite.Local")
HELLO_NO_SNI = client_hello()
HELLO_TLS12 = client_hello("app.example.com", maximum=ssl.TLSVersion.TLSv1_2)


def refragment(hello: bytes, cut: int) -> bytes:
    """The same handshake message split over two records after ``cut`` bytes."""
    message = hello[5 : 5 + int.from_bytes(hello[3:5], "big")]
    records = b""
    for part in (message[:cut], message[cut:]):
        records += hello[:3] + len(part).to_bytes(2, "big") + part
    return records


# ---------------------------------------------------------------------------------------------
# Ping and tunnels


def test_ping_probe():
    assert sniff(PING_REQUEST) == PingProbe()
    assert sniff(PING_REQUEST[:15]) is NEED_MORE
    assert sniff(PING_REQUEST[:40]) == PingProbe()  # the marker is enough, like FastPingHelper
    # beyond the 64 peeked bytes it is an ordinary request for ping.pagekite
    late = b"GET /" + b"x" * 60 + b" HTTP/1.1\r\nHost: ping.pagekite\r\n\r\n"
    assert sniff(late).host == "ping.pagekite"


def test_tunnel_connect():
    head = build_tunnel_request([KiteLine.signed("http", "foo.testkite.local", "b" * 36, "s3cr3t")])
    assert sniff(head) == TunnelConnect(len(head))
    assert sniff(head + b"23\r\nNOOP: 1\r\n") == TunnelConnect(len(head))
    for n in (1, 7, 16, 17, 30, len(head) - 1):
        assert sniff(head[:n]) is NEED_MORE
    lower = b"connect pagekite:443 HTTP/1.1\r\n\r\n"
    assert sniff(lower) == TunnelConnect(len(lower))
    # a backend with many kites may exceed the visitors' 16 KiB bound, but not 64 KiB
    many = b"CONNECT PageKite:1 HTTP/1.0\r\n" + b"X-PageKite: http:a.example:b::s\r\n" * 1000 + b"\r\n"
    assert sniff(many) == TunnelConnect(len(many))
    with pytest.raises(SniffError):
        sniff(b"CONNECT PageKite:1 HTTP/1.0\r\n" + b"X: y\r\n" * 20000)


# ---------------------------------------------------------------------------------------------
# HTTP


def test_curl_get():
    assert sniff(CURL_GET) == HttpRequest("GET", "/", "foo.testkite.local", False, len(CURL_GET), "1.1")
    for n in range(1, len(CURL_GET)):
        assert sniff(CURL_GET[:n]) is NEED_MORE


def test_websocket_upgrade():
    result = sniff(WEBSOCKET + b"\x81\x05hello")
    assert result == HttpRequest("GET", "/chat", "server.example.com", True, len(WEBSOCKET), "1.1")
    multi = WEBSOCKET.replace(b"Upgrade: websocket", b"Upgrade: h2c, WebSocket")
    assert sniff(multi).websocket
    assert not sniff(WEBSOCKET.replace(b"Upgrade: websocket", b"Upgrade: h2c")).websocket


def test_post_with_body():
    assert sniff(POST) == HttpRequest("POST", "/form?a=1", "foo.example", False, len(POST) - 5, "1.0")


@pytest.mark.parametrize(
    "host,expected",
    [
        (b"Foo.Example.COM", "foo.example.com"),
        (b"foo.example:8080", "foo.example"),
        (b"foo.example.", "foo.example"),
        (b"0x7f000001--foo.example", "foo.example"),  # pagekite StripEncodedIP
        (b"[2001:db8::1]:8080", "2001:db8::1"),
        (b"127.0.0.1", "127.0.0.1"),
        (b"*.wild.example", "*.wild.example"),
    ],
)
def test_host_normalisation(host, expected):
    head = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    assert sniff(head).host == expected
    assert parse_host(host) == expected


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nUser-Agent: x\r\n\r\n",  # no Host
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.example:http\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.example:99999\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: \xc3\xa9.example\r\n\r\n",
        b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\n",  # bare LF
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"get / HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
)
def test_bad_http_heads(head):
    with pytest.raises(SniffError):
        sniff(head)


def test_duplicate_identical_host_is_fine():
    head = b"GET / HTTP/1.1\r\nHost: a.example\r\nhost: A.example\r\n\r\n"
    assert sniff(head).host == "a.example"


def test_head_bound():
    big = b"GET /" + b"a" * (MAX_HEAD - 40) + b" HTTP/1.1\r\nHost: a.example\r\n\r\n"
    assert len(big) <= MAX_HEAD and sniff(big).host == "a.example"
    with pytest.raises(SniffError, match="longer than 16384"):
        sniff(b"GET /" + b"a" * MAX_HEAD)
    with pytest.raises(SniffError):
        sniff(b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: a.example\r\n\r\n", max_head=64)


# ---------------------------------------------------------------------------------------------
# CONNECT proxy


def test_proxy_connect():
    assert sniff(CURL_PROXY) == ProxyConnect("foo.testkite.local", 443, len(CURL_PROXY))
    hello = HELLO_SNI
    assert sniff(NC_PROXY + hello) == ProxyConnect("foo.testkite.local", 22, len(NC_PROXY))
    v6 = b"CONNECT [2001:DB8::1]:22 HTTP/1.1\r\nHost: [2001:db8::1]:22\r\n\r\n"
    assert sniff(v6) == ProxyConnect("2001:db8::1", 22, len(v6))
    upper = b"CONNECT Foo.TestKite.LOCAL:80 HTTP/1.1\r\n\r\n"
    assert sniff(upper).host == "foo.testkite.local"
    assert sniff(NC_PROXY[:20]) is NEED_MORE


@pytest.mark.parametrize(
    "target",
    [
        b"foo.example",
        b"foo.example:0",
        b"foo.example:65536",
        b"foo.example:",
        b"[::1]",
        b"[zz::1]:22",
        b":22",
    ],
)
def test_bad_proxy_targets(target):
    with pytest.raises(SniffError):
        sniff(b"CONNECT " + target + b" HTTP/1.1\r\n\r\n")


# ---------------------------------------------------------------------------------------------
# TLS


def test_tls_hello_with_sni():
    assert sniff(HELLO_SNI) == TlsHello("foo.testkite.local", len(HELLO_SNI))
    assert sniff(HELLO_TLS12) == TlsHello("app.example.com", len(HELLO_TLS12), 0x0303)
    # trailing bytes (e.g. early data) are not part of the hello
    assert sniff(HELLO_SNI + b"\x17\x03\x03\x00\x01x").length == len(HELLO_SNI)


def test_tls_hello_without_sni():
    # the BE's TLS client of §1.2 sends no SNI; neither does ssl without server_hostname
    assert sniff(HELLO_NO_SNI) == TlsHello(None, len(HELLO_NO_SNI))


def test_truncated_hello_needs_more():
    for n in range(1, len(HELLO_SNI)):
        assert sniff(HELLO_SNI[:n]) is NEED_MORE, n


@pytest.mark.parametrize("cut", [1, 3, 4, 40, 100])
def test_hello_over_two_records(cut):
    records = refragment(HELLO_SNI, cut)
    assert sniff(records) == TlsHello("foo.testkite.local", len(records))
    for n in range(1, len(records)):
        assert sniff(records[:n]) is NEED_MORE


def test_hello_without_extensions():
    body = b"\x03\x03" + b"r" * 32 + b"\x00" + b"\x00\x02\x00\x2f" + b"\x01\x00"
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    record = b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message
    assert sniff(record) == TlsHello(None, len(record), 0x0303)


def _hello_with_versions(legacy: bytes, ext: bytes = b"") -> bytes:
    body = legacy + b"r" * 32 + b"\x00" + b"\x00\x02\x00\x2f" + b"\x01\x00"
    if ext:
        body += len(ext).to_bytes(2, "big") + ext
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message


def test_hello_max_version():
    # legacy_version alone (TLS 1.0, 1.1 clients), then supported_versions over it
    assert sniff(_hello_with_versions(b"\x03\x01")).max_version == 0x0301
    assert sniff(_hello_with_versions(b"\x03\x02")).max_version == 0x0302
    sv = b"\x00\x2b\x00\x07\x06\x7a\x7a\x03\x04\x03\x03"  # GREASE, 1.3, 1.2
    assert sniff(_hello_with_versions(b"\x03\x03", sv)).max_version == 0x0304
    sv_old = b"\x00\x2b\x00\x05\x04\x03\x02\x03\x01"
    assert sniff(_hello_with_versions(b"\x03\x03", sv_old)).max_version == 0x0302
    for bad in (b"\x00\x2b\x00\x01\x00", b"\x00\x2b\x00\x02\x01\x03",
                b"\x00\x2b\x00\x04\x02\x03\x03\x00"):
        with pytest.raises(SniffError, match="supported_versions"):
            sniff(_hello_with_versions(b"\x03\x03", bad))


def _hello_with_sni_ext(ext: bytes) -> bytes:
    body = b"\x03\x03" + b"r" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    extensions = b"\x00\x00" + len(ext).to_bytes(2, "big") + ext
    body += len(extensions).to_bytes(2, "big") + extensions
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message


def _sni_ext(*entries):
    names = b"".join(bytes([t]) + len(n).to_bytes(2, "big") + n for t, n in entries)
    return len(names).to_bytes(2, "big") + names


def test_sni_extension_details():
    assert sniff(_hello_with_sni_ext(_sni_ext((0, b"A.Example.")))).sni == "a.example"
    assert sniff(_hello_with_sni_ext(_sni_ext((7, b"other"), (0, b"b.example")))).sni == "b.example"
    for bad in (
        _sni_ext((0, b"bad name")),
        _sni_ext((0, b"\xff.example")),
        _sni_ext((0, b"")),
        b"",
        b"\x00\x00",
        _sni_ext((0, b"a.example")) + b"x",
        b"\x00\x09\x00\x00\x05a.ex",
    ):
        with pytest.raises(SniffError):
            sniff(_hello_with_sni_ext(bad))


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x00",  # not version 3
        b"\x16\x03\x09",  # minor version beyond TLS 1.3
        b"\x16\x03\x01\x00\x00",  # empty record
        b"\x16\x03\x01\x40\x01",  # record longer than 2^14
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # ServerHello, not ClientHello
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",  # body too short for version+random
        b"\x16\x03\x01\x00\x04\x01\xff\xff\xff",  # declared length beyond the bound
        b"\x80\x2e\x01\x00\x02",  # SSLv2-compatible hello: not supported
    ],
)
def test_bad_tls(data):
    with pytest.raises(SniffError):
        sniff(data)


def test_tls_records_must_stay_handshake():
    records = refragment(HELLO_SNI, 50)
    second = 5 + 50
    broken = records[:second] + b"\x17" + records[second + 1 :]
    with pytest.raises(SniffError):
        sniff(broken)


def test_hello_bound():
    with pytest.raises(SniffError):
        sniff(HELLO_SNI, max_hello=100)


# ---------------------------------------------------------------------------------------------
# Anything else


@pytest.mark.parametrize(
    "data",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"\x00\x00\x00\x00",
        b"<?xml version='1.0'?>",
        b"NICK me@foo\r\n",
        b"PING /x HTTP/1.1\r\n\r\n",
    ],
)
def test_other_protocols(data):
    with pytest.raises(SniffError) as info:
        sniff(data)
    assert repr(data[:32]) in str(info.value)


def test_empty_needs_more_and_buffers_accepted():
    assert sniff(b"") is NEED_MORE
    assert sniff(bytearray(CURL_GET)).host == "foo.testkite.local"
    assert sniff(memoryview(HELLO_SNI)).sni == "foo.testkite.local"
    assert repr(NEED_MORE) == "NEED_MORE"
    tunnel = b"CONNECT PageKite:1 HTTP/1.0\r\n\r\n"
    kinds = [sniff(d).kind for d in (b"GE", PING_REQUEST, HELLO_SNI, NC_PROXY, CURL_GET, tunnel)]
    assert kinds == ["need_more", "ping", "tls", "connect", "http", "tunnel"]


# ---------------------------------------------------------------------------------------------
# Fuzzing: any input gives a result or a SniffError, never another exception

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check(data: bytes) -> None:
    try:
        result = sniff(data)
    except SniffError:
        return
    assert isinstance(result, RESULT_TYPES)
    if isinstance(result, (TunnelConnect, ProxyConnect, HttpRequest)):
        assert 0 < result.head_length <= len(data)
    if isinstance(result, TlsHello):
        assert 0 < result.length <= len(data)


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data):
    check(data)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_tls_prefixed(data):
    check(b"\x16\x03\x01" + data)
    check(b"\x16" + data)


@st.composite
def mutated(draw, seeds):
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete", "dup"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "dup":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 40))]
    return bytes(data)


@FUZZ
@given(mutated([HELLO_SNI, HELLO_NO_SNI, HELLO_TLS12, refragment(HELLO_SNI, 60)]))
def test_fuzz_mutated_hellos(data):
    check(data)


@FUZZ
@given(mutated([CURL_GET, WEBSOCKET, CURL_PROXY, NC_PROXY, POST, PING_REQUEST,
                b"CONNECT [2001:db8::1]:22 HTTP/1.1\r\n\r\n",
                b"CONNECT PageKite:1 HTTP/1.0\r\nX-PageKite: http:a:b::c\r\n\r\n"]))
def test_fuzz_mutated_heads(data):
    check(data)
