"""Every parser of wire and config input, under random and mutated input (Hypothesis).

The property, parser by parser: an input either parses, or raises only the error class the
module documents (a subclass of ``kite.errors.RemoteProtocolError`` for the wire,
``ConfigError`` for configuration): never ValueError, IndexError, UnicodeError, ... -- and
what parsed can be answered: the builders that echo parsed values (the relay's reply, PONG,
the backend's signed answer, PROXY headers, X-Forwarded-For) accept them.

Inputs start from valid vectors and are mutated byte by byte (flip, cut, insert interesting
bytes, delete, duplicate).  Each test is bounded (``FUZZ``); the file runs in seconds.  Bugs
found here are fixed and kept as ``@example``s.  fuzz/ holds the same targets for atheris.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kite.config import parse_hostport, parse_target, tomllib
from kite.errors import (
    BadRelayReply,
    CompressionError,
    ConfigError,
    FramingError,
    HandshakeError,
    HeadTooLong,
    RemoteProtocolError,
    SniffError,
)
from kite.pagekiterc import convert
from kite.proto import control, handshake, names, signing
from kite.proto.forwarded import ForwardedRewriter
from kite.proto.http import find_head_end, parse_connect_reply
from kite.proto.sniff import parse_host, sniff
from kite.proto.zchunks import ZInflater
from kite.relay.grants import parse_grant

# The fuzz targets are the one home of the answer builders and framing helpers the
# properties share with the atheris runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
from targets import (
    AUTHORIZER,
    SECRET,
    answer_events,
    answer_reply,
    answer_request,
    frame,
    split_headers,
    zframe,
)

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Bytes that break parsers: line ends, separators, control and latin-1 "digits" (² ³ ¹).
INTERESTING = [b"\r", b"\n", b"\r\n", b":", b"\x00", b"\x7f", b"\x85", b"\xa0", b"\xad", b"\xb2",
               b"\xb3", b"\xb9", b" ", b"\t", b"-", b"9", b"0", b";", b"/", b",", b"[", b"]",
               b"%", b".", b"e", b"nan", b"inf", b"_", b"\xff", b"\xc3\xa9"]


@st.composite
def mutated(draw, seeds):
    """A seed with 1-6 byte-level mutations."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "dup"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.one_of(st.sampled_from(INTERESTING),
                                           st.binary(min_size=1, max_size=8)))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        elif op == "dup":
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 40))]
    return bytes(data)


def mutated_text(seeds):
    """Mutated latin-1 text (what the demux and the handshake hand up)."""
    return mutated([s.encode("latin-1") for s in seeds]).map(lambda b: b.decode("latin-1"))


def mutated_utf8(seeds):
    """Mutated text as read from a command line or a TOML file (any Unicode)."""
    return mutated([s.encode() for s in seeds]).map(lambda b: b.decode("utf-8", "replace"))


# -- handshake --------------------------------------------------------------------------------

KITES = [handshake.KiteLine.signed("http", "app.example.com", "0123abcd", SECRET, salt="aa11bb22"),
         handshake.KiteLine("raw-22", "box.example.com", "deadbeef", "t1234567abcdef", "ffff0000"),
         handshake.KiteLine("https", "*.example.com", "b5", "", "")]
TUNNEL_REQUESTS = [
    handshake.build_tunnel_request(KITES[:1]),
    handshake.build_tunnel_request(KITES, replace="6b0564c1:b40729de", tls=True),
    b"CONNECT PageKite:1 HTTP/1.1\nX-Beanstalk: http:a.b:c::\n\n",
]
_AUTH = AUTHORIZER.authorize(KITES, now=1_700_000_000)
TUNNEL_RESPONSES = [
    handshake.build_tunnel_response(_AUTH.headers, ports=(80, 443), raw_ports=("virtual",)),
    b"HTTP/1.1 200 OK\r\nX-PageKite-Quota: 1024.5\r\nX-PageKite-QConns: 5\r\n"
    b"X-PageKite-IPsPerSec: 3/60\r\nX-PageKite-Invalid: http:a.b:c\r\n"
    b"X-PageKite-Invalid-Why: http:a.b:c;signature\r\nX-PageKite-Misc: motd=hi%20there\r\n\r\n",
    handshake.TUNNEL_UNAVAILABLE,
]


@FUZZ
@given(mutated(TUNNEL_REQUESTS))
@example(b"CONNECT PageKite:1 HTTP/1.0\r\nX-PageKite: http:a\rb:c::\r\n\r\n")  # lone CR
@example(b"CONNECT PageKite:1 HTTP/1.0\r\nX-PageKite: http:a\x1bb:c::\r\n\r\n")  # ESC
@example(b"CONNECT PageKite:1 HTTP/1.0\r\nX-PageKite: http:a\xadb:c::\r\n\r\n")  # soft hyphen
@example(b"CONNECT PageKite:1 HTTP/1.0\r\nX-PageKite: :a.b:c::\r\n\r\n")  # empty PROTO
def test_tunnel_request(data):
    try:
        request = handshake.parse_tunnel_request(data)
    except HandshakeError:
        return
    answer_request(request)


@FUZZ
@given(mutated(TUNNEL_RESPONSES))
@example(b"HTTP/1.1 2\xb20 OK\r\n\r\n")  # '²'.isdigit()
@example(b"HTTP/1.1 000\r\n\r\n")  # atheris: status 000 parsed
@example(b"HTTP/1.1 200 OK\r\nX-PageKite-IPsPerSec: \xb9/60\r\n\r\n")
@example(b"HTTP/1.1 200 OK\r\nX-PageKite-Quota: nan\r\n\r\n")
@example(b"HTTP/1.1 200 OK\r\nX-PageKite-SignThis: http:a.b:c:\r\n\r\n")  # empty FSALT
@example(b"HTTP/1.1 200 OK\r\nX-PageKite-SignThis: http:a\x85b:c:t1\r\n\r\n")
def test_tunnel_response(data):
    try:
        reply = handshake.parse_tunnel_response(data)
    except HandshakeError:
        return
    assert reply.status is not None and 100 <= reply.status <= 999
    answer_reply(reply)


INBAND_REQUESTS = [handshake.build_inband_request(KITES)[0].decode("latin-1")]
INBAND_REPLIES = [handshake.build_inband_reply(_AUTH.headers)[0].decode("latin-1"),
                  "NOOP: 1\r\nX-PageKite-SignThis: raw-22:box.example.com:deadbeef:t0000000"]


@FUZZ
@given(mutated_text(INBAND_REQUESTS))
@example("NOOP: 1\r\nX-PageKite: http:a\nb:c::")  # lone LF: the demux splits at CRLF only
def test_inband_request(block):
    try:
        request = handshake.parse_inband_request(split_headers(block))
    except HandshakeError:
        return
    answer_request(request)


@FUZZ
@given(mutated_text(INBAND_REPLIES))
@example("NOOP: 1\r\nX-PageKite-SignThis: http:a\rb:c:t1")
def test_inband_reply(block):
    try:
        reply = handshake.parse_inband_reply(split_headers(block))
    except HandshakeError:
        return
    answer_reply(reply)


@FUZZ
@given(mutated_text([k.value for k in KITES] + ["http:a.b:c:d", "a:b:c"]))
def test_kite_values(value):
    for parse in (handshake.KiteLine.parse, handshake.KiteRef.parse, handshake.Challenge.parse):
        try:
            parsed = parse(value)
        except HandshakeError:
            continue
        handshake.build_inband_reply([("X-PageKite-OK", parsed.what)])
        if isinstance(parsed, handshake.KiteLine):
            answer_request(handshake.TunnelRequest(kites=[parsed]))
        if isinstance(parsed, handshake.Challenge):
            parsed.answer(SECRET)


# -- control chunks ---------------------------------------------------------------------------

CHUNKS = [control.build_ping(1795516026.4960)[0], control.build_pong("1795516026.4960")[0],
          control.build_skb(7, 1024)[0], control.build_eof(3)[0], control.build_zrst()[0],
          control.build_quota(1024, days=3, conns=5, pong="1.5")[0],
          control.build_stream_open(9, "http", "app.example.com", 443, "::ffff:1.2.3.4", 5555,
                                    rtls=True)[0],
          b"SID: 12", b"NOOP: 1\r\nSPD: 5"] + [INBAND_REQUESTS[0].encode("latin-1"),
                                             INBAND_REPLIES[0].encode("latin-1")]


@FUZZ
@given(mutated(CHUNKS), st.binary(max_size=8))
@example(b"NOOP: 1\r\nPING: 1\r2", b"!")  # lone CR reached build_pong
@example(b"NOOP: 1\r\nPING: \xad", b"!")  # latin-1, not printable
@example(b"NOOP: 1\r\nQuota: inf", b"!")
@example(b"SID: 1\r\nProto: raw\r\nHost: a\r\nRIP: not-an-ip", b"")
def test_parse_chunk(block, payload):
    try:
        events = control.parse_chunk(split_headers(block.decode("latin-1")), payload)
    except RemoteProtocolError:
        return
    answer_events(events)


@FUZZ
@given(st.text(max_size=12))
@example("²")
@example("1²")
def test_parse_sid(value):
    try:
        sid = control.parse_sid(value)
    except RemoteProtocolError:
        return
    assert 0 <= sid <= control.MAX_SID and value.isascii()


# -- the fast path's Demux (both implementations) ---------------------------------------------

STREAMS = [
    frame(b"SID: 1\r\n\r\nhello") + frame(b"NOOP: 1\r\nPING: 1.0\r\n\r\n!"),
    zframe(b"SID: 2\r\nProto: http\r\nHost: a.b\r\n\r\n" + b"x" * 80) + frame(b"SID: 2\r\n\r\n"),
    frame(b"SID: 3\r\nEOF: 1WR\r\n\r\nBye!") + zframe(b"NOOP: 1\r\nSKB: 4\r\nSID: 3\r\n\r\n"),
]


@FUZZ
@given(data=mutated(STREAMS), cut=st.integers(0, 400))
def test_demux(fastpath, data, cut):
    events = []
    corrupt = []
    demux = fastpath.Demux(lambda h, p: events.append((h, p)), on_corrupt_chunk=corrupt.append,
                           inflater=ZInflater())
    sinks = []
    demux.attach(fastpath.StreamSlot(1, sinks.append))
    try:
        demux.feed_data(data[:cut])
        demux.feed_data(data[cut:])
    except FramingError:
        return
    assert all(isinstance(exc, CompressionError) for exc in corrupt)
    for headers, payload in events:
        assert all(isinstance(n, str) and isinstance(v, str) for n, v in headers)
        try:
            answer_events(control.parse_chunk(headers, payload))
        except RemoteProtocolError:
            pass


# -- ZChunks ----------------------------------------------------------------------------------

_ZSTREAM = zlib.compressobj()
ZDATA = [_ZSTREAM.compress(b"SID: 1\r\n\r\n" + b"a" * 100) + _ZSTREAM.flush(zlib.Z_SYNC_FLUSH)]


@FUZZ
@given(mutated(ZDATA), st.integers(-2, 200))
def test_zinflater(data, ulen):
    z = ZInflater()
    for _ in range(2):
        try:
            out = z.inflate(data, ulen)
        except CompressionError:
            z.reset()
            continue
        assert len(out) == ulen


# -- sniffing and HTTP heads ------------------------------------------------------------------

VISITOR_HEADS = [
    b"GET / HTTP/1.1\r\nHost: app.example.com\r\nAccept: */*\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a.b:8080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"CONNECT box.example.com:22 HTTP/1.1\r\nHost: box.example.com:22\r\n\r\n",
    b"CONNECT [2001:db8::1]:22 HTTP/1.1\r\n\r\n",
    handshake.PING_REQUEST,
    TUNNEL_REQUESTS[0],
    # A ClientHello with SNI "a.example" (hand-made, minimal).
    bytes.fromhex("16030100") + bytes([0x3c]) + bytes.fromhex("010000380303") + b"\x00" * 32
    + bytes.fromhex("000002130101000011") + bytes.fromhex("0000000d000b000008")
    + b"a.exampl" + b"",
]


@FUZZ
@given(mutated(VISITOR_HEADS))
@example(b"GET / HTTP/1.1\r\nHost: a.b:\xb2\r\n\r\n")
@example(b"CONNECT a.b:\xb2\xb2 HTTP/1.1\r\n\r\n")
def test_sniff(data):
    try:
        result = sniff(data)
    except SniffError:
        return
    host = getattr(result, "host", None)
    if host is not None:
        assert host.isascii() and host.isprintable()


@FUZZ
@given(st.one_of(st.text(max_size=40), mutated_text(["a.example.com:80", "[::1]:22", "x"])))
def test_parse_host(value):
    try:
        parse_host(value)
    except SniffError:
        pass


CONNECT_REPLIES = [b"HTTP/1.1 200 Connection Established\r\n\r\n",
                   b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 12\r\n\r\nkite offline",
                   b"HTTP/1.0 403 Forbidden\n\n"]


@FUZZ
@given(mutated(CONNECT_REPLIES + VISITOR_HEADS[:1]))
@example(b"HTTP/1.1 2\xb20 OK\r\n\r\n")
@example(b"HTTP/1.1 200 OK\r\nContent-Length: \xb9\r\n\r\n")
@example(b"HTTP/1.1 006 S1\n\n")  # atheris: status 006 parsed
def test_connect_reply(data):
    try:
        reply = parse_connect_reply(data)
    except BadRelayReply:
        return
    if reply is not None:
        assert 0 < reply.head_length <= len(data) and 100 <= reply.status <= 999
    try:
        find_head_end(data, 64)
    except HeadTooLong:
        pass


# -- the X-Forwarded rewriter -----------------------------------------------------------------

REQUEST_STREAMS = [
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\n"
    b"T: 1\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05",
]


@FUZZ
@given(mutated(REQUEST_STREAMS), st.lists(st.integers(0, 300), max_size=4),
       st.sampled_from([None, "app.example"]))
def test_forwarded(data, cuts, host):
    rw = ForwardedRewriter(client_ip="203.0.113.7", proto="https", host=host, max_head=256)
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    try:
        for a, b in zip(bounds, bounds[1:], strict=False):
            rw.feed(data[a:b])
        rw.eof()
    except RemoteProtocolError:
        assert rw.state == "closed"


@FUZZ
@given(st.one_of(st.text(max_size=50), mutated_text(["1.2.3.4", "::ffff:1.2.3.4", "fe80::1%eth0"])))
def test_forwarded_client_ip(value):
    try:
        ForwardedRewriter(client_ip=value, proto="http")
    except RemoteProtocolError:
        pass


# -- names and signatures ---------------------------------------------------------------------

@FUZZ
@given(st.one_of(st.text(max_size=30), mutated_text(["raw-22", "http", "*.example.com", "a.b"])))
@example("raw-²")
@example("raw-2²")
def test_names(value):
    assert isinstance(names.valid_proto(value), bool)
    assert isinstance(names.valid_domain(value), bool)
    port = names.proto_port(value)
    assert port is None or 0 <= port <= 99999
    assert names.domain_candidates(value)[0] == value
    assert names.domain_matches(value, "a.example.com") in (0, 1, 2)


@FUZZ
@given(st.text(max_size=40), st.text(max_size=40), st.text(max_size=40))
def test_signatures(secret, payload, token):
    assert isinstance(signing.check_signature(secret, payload, token, now=1e9), bool)
    assert isinstance(signing.check_challenge(secret, payload, token, now=1e9), bool)


# -- configuration ----------------------------------------------------------------------------

HOSTPORTS = ["127.0.0.1:443", "relay.example.com", "[::1]:22", "8080", ":80", "a:b:c"]


@FUZZ
@given(st.one_of(st.text(max_size=30), mutated_utf8(HOSTPORTS)))
@example("127.0.0.1:²")
@example("²")
@example("[::1]:³")
@example("[::1")
def test_parse_hostport(value):
    for kw in ({}, {"default_host": "0.0.0.0"}, {"default_port": 443}):
        try:
            host, port = parse_hostport(value, key="--listen", **kw)
        except ConfigError as err:
            assert err.key == "--listen"
            continue
        assert isinstance(port, int) and 0 <= port <= 65535
        assert isinstance(host, str)


@FUZZ
@given(st.one_of(st.text(max_size=30),
                 mutated_utf8(["http://127.0.0.1:8080", "tcp://[::1]:22", "8080", "ssh://b"])))
@example("http://[::1")
@example("http://a:²")
@example("tcp://a:-1")
def test_parse_target(value):
    try:
        target = parse_target(value)
    except ConfigError:
        return
    assert 0 <= target.port <= 65535 and target.host


@FUZZ
@given(st.one_of(st.text(max_size=40),
                 mutated_utf8(["http:app.example.com:s3cret", "*:*.example.com:x",
                               "raw-22,http:a.b:c"])))
@example("raw-²:a.b:secret")
def test_parse_grant(value):
    try:
        grant = parse_grant(value)
    except ConfigError:
        return
    assert names.valid_domain(grant.domain)


RCFILES = [
    "frontend = relay.example.com:443\nkitename = app.example.com\nkitesecret = s3cret\n"
    "service_on = http:@kitename:localhost:8080:@kitesecret\n"
    "service_on = raw-22:@kitename:localhost:22:@kitesecret\nservice_cfg = *:keepalive:30\n",
    "isfrontend\nports = 80,443\nprotos = http,https,raw\ndomain = http:*.example.com:s3cret\n",
]


@FUZZ
@given(mutated_utf8(RCFILES))
@example("service_on = raw-²:a.b:localhost:22:s\n")
@example("service_on = http:a.b:localhost:²:s\n")
@example("frontend = a.b:443\nservice_cfg =\x01 *:keepalive:30\n")  # atheris: raw \x01 in a comment
@example("frontend = a.b:443\nkitesecret = s\x7f\nservice_on = http:a.b:localhost:80:@kitesecret\n")
@example("frontend = a.b:443\nfe_certname = x\x14y\n")  # atheris: raw \x14 in a comment
@example("frontend = a.b:443\nfe_certname = a.b\nca_certs\n")  # atheris: wrote ca = null
def test_pagekiterc(text):
    try:
        _kind, toml_text, _report = convert(text)
    except ConfigError:
        return
    tomllib.loads(toml_text)  # whatever it wrote is TOML


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
