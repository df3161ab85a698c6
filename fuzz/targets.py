"""The fuzz targets: one ``check_<name>(data)`` per parser, and valid seed inputs for each.

A check feeds ``data`` to its parser and lets only the error classes the module documents
pass (``RemoteProtocolError`` subclasses for the wire, ``ConfigError`` for configuration);
anything else propagates and is a crash.  What parsed is handed to the builders that echo
it (the relay's reply, PONG, the backend's signed answer, PROXY headers, X-Forwarded-For),
which must accept it.  ``fuzz_<name>.py`` runs one check under atheris; ``seeds.py`` writes
:data:`SEEDS` as starting corpora.  tests/test_fuzz_properties.py checks the same
properties with Hypothesis in CI.
"""

from __future__ import annotations

import zlib

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
from kite.proto.proxyproto import proxy_v1, proxy_v2
from kite.proto.sniff import sniff
from kite.proto.zchunks import ZInflater
from kite.relay.grants import parse_grant

SECRET = "fuzz-kite-secret-0123456789"
NOW = 1_700_000_000
AUTHORIZER = handshake.KiteAuthorizer(lookup_secret=lambda p, d: SECRET, challenge_secret="fe",
                                      ports=(80, 443), raw_ports=("virtual",))


def _text(data: bytes) -> str:
    return data.decode("latin-1")


def split_headers(block: str) -> list:
    """A header block split as the Demux splits it: at CRLF, name before the first ':'."""
    out = []
    for line in block.split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            out.append((name, value.strip(" \t")))
    return out


def answer_request(request: handshake.TunnelRequest) -> None:
    auth = AUTHORIZER.authorize(request.kites, now=NOW)
    handshake.build_tunnel_response(auth.headers)
    handshake.build_inband_reply(auth.headers)
    auth = AUTHORIZER.authorize(request.kites, now=NOW, check_fsalt=False)
    handshake.build_inband_reply(auth.headers)


def answer_reply(reply: handshake.RelayReply) -> None:
    lines = [c.answer(SECRET, salt="0badcafe") for c in reply.sign_this]
    handshake.build_inband_request(lines)
    handshake.build_tunnel_request(lines, replace=reply.session_id)


def answer_events(events: list) -> None:
    for event in events:
        if isinstance(event, control.Ping):
            control.build_pong(event.value)
            control.build_quota(1, pong=event.value)
        elif isinstance(event, control.StreamOpen) and event.rip is not None:
            proxy_v1(event.rip, event.rport or 0, "127.0.0.1", event.port or 0)
            proxy_v2(event.rip, event.rport or 0, "127.0.0.1", event.port or 0)
            ForwardedRewriter(client_ip=event.rip, proto="http")
        elif isinstance(event, control.KiteRequest):
            answer_request(event.request)
        elif isinstance(event, control.KiteReply):
            answer_reply(event.reply)


# -- the checks ---------------------------------------------------------------------------------

def check_tunnel_request(data: bytes) -> None:
    try:
        request = handshake.parse_tunnel_request(data)
    except HandshakeError:
        return
    answer_request(request)


def check_tunnel_response(data: bytes) -> None:
    try:
        reply = handshake.parse_tunnel_response(data)
    except HandshakeError:
        return
    assert reply.status is not None and 100 <= reply.status <= 999
    answer_reply(reply)


def check_inband(data: bytes) -> None:
    headers = split_headers(_text(data))
    try:
        request = handshake.parse_inband_request(headers)
    except HandshakeError:
        pass
    else:
        answer_request(request)
    try:
        reply = handshake.parse_inband_reply(headers)
    except HandshakeError:
        pass
    else:
        answer_reply(reply)


def check_kite_values(data: bytes) -> None:
    value = _text(data)
    for parse in (handshake.KiteLine.parse, handshake.KiteRef.parse, handshake.Challenge.parse):
        try:
            parsed = parse(value)
        except HandshakeError:
            continue
        handshake.build_inband_reply([("X-PageKite-OK", parsed.what)])
        if isinstance(parsed, handshake.KiteLine):
            answer_request(handshake.TunnelRequest(kites=[parsed]))
        elif isinstance(parsed, handshake.Challenge):
            parsed.answer(SECRET)


def check_chunk(data: bytes) -> None:
    block, _, payload = data.partition(b"\r\n\r\n")
    try:
        events = control.parse_chunk(split_headers(_text(block)), payload)
    except RemoteProtocolError:
        return
    answer_events(events)


def _demux_run(module, data: bytes, cut: int) -> tuple:
    events: list = []
    sunk: list = []
    corrupt: list = []
    demux = module.Demux(lambda h, p: events.append((h, p)), on_corrupt_chunk=corrupt.append,
                         inflater=ZInflater())
    demux.attach(module.StreamSlot(1, lambda view: sunk.append(bytes(view))))
    error = None
    try:
        demux.feed_data(data[:cut])
        demux.feed_data(data[cut:])
    except FramingError as exc:
        error = type(exc)
    assert all(isinstance(exc, CompressionError) for exc in corrupt)
    for headers, payload in events:
        assert all(isinstance(n, str) and isinstance(v, str) for n, v in headers)
        try:
            answer_events(control.parse_chunk(headers, payload))
        except RemoteProtocolError:
            pass
    return error, events, sunk, len(corrupt)


def check_demux(data: bytes) -> None:
    """Both implementations, the same answer (the first byte picks where the input is cut)."""
    from kite import _fastpath_py

    try:
        from kite import _fastpath
    except ImportError:  # not built: the pure-Python twin alone
        _fastpath = None
    cut = data[0] if data else 0
    body = data[1:]
    py = _demux_run(_fastpath_py, body, cut)
    if _fastpath is not None:
        c = _demux_run(_fastpath, body, cut)
        assert c == py, (c, py)


def check_zchunks(data: bytes) -> None:
    ulen = int.from_bytes(data[:2], "big") - 2 if len(data) >= 2 else 0
    z = ZInflater()
    for _ in range(2):
        try:
            out = z.inflate(data[2:], ulen)
        except CompressionError:
            z.reset()
            continue
        assert len(out) == ulen


def check_sniff(data: bytes) -> None:
    try:
        result = sniff(data)
    except SniffError:
        return
    host = getattr(result, "host", None)
    if host is not None:
        assert host.isascii() and host.isprintable(), host
    length = getattr(result, "head_length", getattr(result, "length", None))
    if length is not None:
        assert 0 < length <= len(data)


def check_http(data: bytes) -> None:
    try:
        reply = parse_connect_reply(data)
    except BadRelayReply:
        reply = None
    if reply is not None:
        assert 0 < reply.head_length <= len(data) and 100 <= reply.status <= 999
    try:
        find_head_end(data, 256)
        find_head_end(data, 256, bare_lf=False)
    except HeadTooLong:
        pass


def check_forwarded(data: bytes) -> None:
    """The first byte picks the cuts and the Host mode; the rest is the visitor's stream."""
    flags = data[0] if data else 0
    stream = data[1:]
    rw = ForwardedRewriter(client_ip="203.0.113.7", proto="https",
                           host=None if flags & 1 else "app.example", max_head=256)
    step = (flags >> 1) or len(stream) or 1
    try:
        for i in range(0, len(stream), step):
            rw.feed(stream[i:i + step])
        rw.eof()
    except RemoteProtocolError:
        assert rw.state == "closed"


def check_names(data: bytes) -> None:
    value = data.decode("utf-8", "replace")
    assert isinstance(names.valid_proto(value), bool)
    assert isinstance(names.valid_domain(value), bool)
    port = names.proto_port(value)
    assert port is None or 0 <= port <= 99999
    assert names.domain_candidates(value)[0] == value
    assert names.domain_matches(value, "a.example.com") in (0, 1, 2)


def check_signing(data: bytes) -> None:
    parts = data.decode("utf-8", "replace").split("\x00", 2) + ["", ""]
    secret, payload, token = parts[:3]
    assert isinstance(signing.check_signature(secret, payload, token, now=NOW), bool)
    assert isinstance(signing.check_challenge(secret, payload, token, now=NOW), bool)


def check_config(data: bytes) -> None:
    """parse_hostport (three ways), parse_target and parse_grant on one command-line value."""
    value = data.decode("utf-8", "replace")
    for kw in ({}, {"default_host": "0.0.0.0"}, {"default_port": 443, "min_port": 1}):
        try:
            host, port = parse_hostport(value, key="--listen", **kw)  # type: ignore[arg-type]
        except ConfigError:
            continue
        assert isinstance(host, str) and host and 0 <= port <= 65535
    try:
        target = parse_target(value)
    except ConfigError:
        pass
    else:
        assert target.host and 1 <= target.port <= 65535
    try:
        grant = parse_grant(value, default_secret="fuzz-default-secret-1234")
    except ConfigError:
        pass
    else:
        assert names.valid_domain(grant.domain) and grant.secret


def check_pagekiterc(data: bytes) -> None:
    try:
        _kind, toml_text, _report = convert(data.decode("utf-8", "replace"))
    except ConfigError:
        return
    tomllib.loads(toml_text)  # whatever it wrote is TOML


CHECKS = {
    "tunnel_request": check_tunnel_request,
    "tunnel_response": check_tunnel_response,
    "inband": check_inband,
    "kite_values": check_kite_values,
    "chunk": check_chunk,
    "demux": check_demux,
    "zchunks": check_zchunks,
    "sniff": check_sniff,
    "http": check_http,
    "forwarded": check_forwarded,
    "names": check_names,
    "signing": check_signing,
    "config": check_config,
    "pagekiterc": check_pagekiterc,
}


# -- seeds ------------------------------------------------------------------------------------

def frame(body: bytes) -> bytes:
    return b"%x\r\n" % len(body) + body


def zframe(body: bytes, reset: bool = True) -> bytes:
    z = zlib.compressobj()
    data = z.compress(body) + z.flush(zlib.Z_SYNC_FLUSH)
    return b"%xZ%x%s\r\n" % (len(body), len(data), b"R" if reset else b"") + data


def _seeds() -> dict:
    kites = [handshake.KiteLine.signed("http", "app.example.com", "0123abcd", SECRET,
                                       salt="aa11bb22"),
             handshake.KiteLine("raw-22", "box.example.com", "deadbeef", "t1234567", "ffff0000"),
             handshake.KiteLine("https", "*.example.com", "b5", "", "")]
    auth = AUTHORIZER.authorize(kites, now=NOW)
    zbody = b"SID: 1\r\n\r\n" + b"a" * 100
    z = zlib.compressobj()
    zdata = z.compress(zbody) + z.flush(zlib.Z_SYNC_FLUSH)
    stream_open = control.build_stream_open(9, "http", "app.example.com", 443, "::ffff:1.2.3.4",
                                            5555, rtls=True)[0]
    return {
        "tunnel_request": [handshake.build_tunnel_request(kites[:1]),
                           handshake.build_tunnel_request(kites, replace="6b05:b407", tls=True)],
        "tunnel_response": [
            handshake.build_tunnel_response(auth.headers, ports=(80,), raw_ports=("virtual",)),
            b"HTTP/1.1 200 OK\r\nX-PageKite-Quota: 1024.5\r\nX-PageKite-IPsPerSec: 3/60\r\n"
            b"X-PageKite-Invalid: http:a.b:c\r\nX-PageKite-Invalid-Why: http:a.b:c;port\r\n\r\n"],
        "inband": [handshake.build_inband_request(kites)[0],
                   handshake.build_inband_reply(auth.headers)[0]],
        "kite_values": [k.value.encode() for k in kites] + [b"http:a.b:c:t1234567"],
        "chunk": [control.build_ping(1795516026.496)[0] + b"\r\n\r\n!",
                  control.build_skb(7, 1024)[0], control.build_eof(3)[0],
                  control.build_quota(1024, days=3, conns=5, pong="1.5")[0],
                  stream_open + b"\r\n\r\nGET / HTTP/1.1\r\n"],
        "demux": [b"\x05" + frame(b"SID: 1\r\n\r\nhello") + frame(b"NOOP: 1\r\nPING: 1\r\n\r\n!"),
                  b"\x00" + zframe(stream_open + b"\r\n\r\n" + b"x" * 80)
                  + frame(b"SID: 3\r\nEOF: 1WR\r\n\r\nBye!")],
        "zchunks": [len(zbody).to_bytes(2, "big") + zdata],
        "sniff": [b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n",
                  b"CONNECT box.example.com:22 HTTP/1.1\r\n\r\n", handshake.PING_REQUEST,
                  handshake.build_tunnel_request(kites[:1]),
                  bytes.fromhex("16030100" "3c" "010000380303") + b"\x00" * 32
                  + bytes.fromhex("000002130101000011" "0000000d000b000008") + b"a.exampl"],
        "http": [b"HTTP/1.1 200 Connection Established\r\n\r\n",
                 b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 12\r\n\r\nkite offline"],
        "forwarded": [
            b"\x00GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n",
            b"\x07POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\n",
            b"\x01POST /p HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.0\r\n\r\n"],
        "names": [b"raw-22", b"*.example.com", b"http-8080"],
        "signing": [b"secret\x00http:a.b:c:d\x00" + kites[0].signature.encode()],
        "config": [b"127.0.0.1:443", b"[::1]:22", b"http://127.0.0.1:8080",
                   b"http:app.example.com:s3cret", b"raw-22,http:*.a.b"],
        "pagekiterc": [
            b"frontend = relay.example.com:443\nkitename = app.example.com\nkitesecret = s3\n"
            b"service_on = http:@kitename:localhost:8080:@kitesecret\n"
            b"service_on = raw-22:@kitename:localhost:22:@kitesecret\n"
            b"service_cfg = *:keepalive:30\nkeepalive = 60\n",
            b"isfrontend\nports = 80,443\nprotos = http,https,raw\n"
            b"domain = http:*.example.com:s3cret\n"],
    }


SEEDS = _seeds()
