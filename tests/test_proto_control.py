"""kite.proto.control: control chunks byte for byte with pagekite.py, and the chunk parser."""

import types

import pytest

from kite.errors import LocalProtocolError, RemoteProtocolError
from kite.proto.control import (
    MAX_SID,
    Data,
    Eof,
    KiteReply,
    KiteRequest,
    Noop,
    Ping,
    Pong,
    Quota,
    Skb,
    StreamOpen,
    ZReset,
    build_eof,
    build_ping,
    build_pong,
    build_quota,
    build_skb,
    build_stream_open,
    build_zrst,
    parse_chunk,
    parse_sid,
)
from kite.proto.handshake import KiteLine, KiteRef, build_inband_reply, build_inband_request
from wire import build_data


def frame(chunk) -> bytes:
    """What ChunkWriter.write_chunk puts on the wire (fast path contract)."""
    header_block, payload = chunk
    body = header_block + b"\r\n" + bytes(payload)
    return b"%x\r\n" % len(body) + body


def split_body(body: bytes):
    """A chunk body as the Demux hands it up: (headers, payload)."""
    head, _, payload = body.partition(b"\r\n\r\n")
    headers = []
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        headers.append((name, value.strip(" \t")))
    return headers, payload


def events_of(chunk):
    header_block, payload = chunk
    return parse_chunk(*split_body(header_block + b"\r\n" + bytes(payload)))


@pytest.fixture
def pk_tunnel(pagekite_mod):
    """A pagekite.py Tunnel whose SendChunked records what it would frame."""
    from pagekite.proto import conns

    tunnel = conns.Tunnel.__new__(conns.Tunnel)
    tunnel.sent = []

    def send_chunked(data, **_):
        tunnel.sent.append((data if isinstance(data, str) else "".join(data)).encode("latin-1"))
        return True

    tunnel.SendChunked = send_chunked
    tunnel.conns = types.SimpleNamespace(config=types.SimpleNamespace(isfrontend=True))
    tunnel.quota = None
    tunnel.users, tunnel.zhistory, tunnel.filters = {}, {}, []
    return tunnel


def body(chunk) -> bytes:
    header_block, payload = chunk
    return header_block + b"\r\n" + bytes(payload)


# ---------------------------------------------------------------------------------------------
# Builders: the observed frames of §6 / §15, and pagekite.py's own strings


def test_observed_control_frames():
    assert frame(build_ping(1795516026.496)) == b"23\r\nNOOP: 1\r\nPING: 1795516026.4960\r\n\r\n!"
    assert frame(build_pong("1795516026.4960")) == b"23\r\nNOOP: 1\r\nPONG: 1795516026.4960\r\n\r\n!"
    assert frame(build_skb(19, 0)) == b"1c\r\nNOOP: 1\r\nSID: 19\r\nSKB: 0\r\n\r\n"
    assert build_skb(15, 0) == (b"NOOP: 1\r\nSID: 15\r\nSKB: 0\r\n", b"")
    assert frame(build_eof(33, write_closed=False)) == b"18\r\nSID: 33\r\nEOF: 1R\r\n\r\nBye!"
    assert frame(build_eof(33)) == b"19\r\nSID: 33\r\nEOF: 1WR\r\n\r\nBye!"
    assert build_eof(33, read_closed=False) == (b"SID: 33\r\nEOF: 1W\r\n", b"Bye!")
    assert body(build_zrst()) == b"NOOP: 1\r\nZRST: 1\r\n\r\n!"
    assert frame(build_data(33, b"")) == b"b\r\nSID: 33\r\n\r\n"


def test_observed_stream_open_frames():
    https = build_stream_open(43, "https", "foo.testkite.local", 443, "127.0.0.1", 45920)
    assert frame(https) == bytes.fromhex(
        "35630d0a5349443a2034330d0a50726f"
        "746f3a2068747470730d0a486f73743a"
        "20666f6f2e746573746b6974652e6c6f"
        "63616c0d0a506f72743a203434330d0a"
        "5249503a203132372e302e302e310d0a"
        "52506f72743a2034353932300d0a0d0a"
    )
    raw = build_stream_open(45, "raw", "foo.testkite.local", 22, "127.0.0.1", 45930)
    assert frame(raw) == (
        b"59\r\nSID: 45\r\nProto: raw\r\nHost: foo.testkite.local\r\nPort: 22\r\n"
        b"RIP: 127.0.0.1\r\nRPort: 45930\r\n\r\n"
    )
    request = b"GET / HTTP/1.1\r\nHost: foo.testkite.local\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
    http = build_stream_open(33, "http", "foo.testkite.local", 20080, "127.0.0.1", 54886, payload=request)
    assert len(body(http)) == 0xAF  # the "afZ8c" frame of §4.4, 175 bytes before compression


def test_builders_match_pagekite(pk_tunnel):
    t = pk_tunnel
    t.SendStreamEof(33, read_eof=True)
    t.SendStreamEof(33, write_eof=True)
    t.SendStreamEof(33)
    t.SendStreamEof(33, write_eof=True, read_eof=True)
    t.ResetRemoteZChunks()
    t.SendPong("1795516026.4960" + "x" * 80)
    t.SendProgress(19, types.SimpleNamespace(all_out=150000, wrote_bytes=900))
    t.quota, t.q_days, t.q_conns = [5, None, None], None, None
    t.SendQuota(pong="123.5")
    t.q_days, t.q_conns = 30, 7
    t.SendQuota()
    t.conns = None
    t.SendData(None, "hello", sid=43, host="foo.testkite.local", proto="https", port=443,
               chunk_headers=[("RIP", "::ffff:10.1.2.3"), ("RPort", 45920), ("RTLS", 1)])
    t.SendData(None, "more", sid=43)
    assert t.sent == [
        body(build_eof(33, write_closed=False)),
        body(build_eof(33, read_closed=False)),
        body(build_eof(33)),
        body(build_eof(33)),
        body(build_zrst()),
        body(build_pong("1795516026.4960" + "x" * 80)),
        body(build_skb(19, (150000 + 900) // 1024)),
        body(build_quota(5, pong="123.5")),
        body(build_quota(5, days=30, conns=7)),
        body(build_stream_open(43, "https", "foo.testkite.local", 443, "::ffff:10.1.2.3", 45920,
                               rtls=True, payload=b"hello")),
        body(build_data(43, b"more")),
    ]


def test_ping_defaults_to_now_and_pong_truncates():
    block, payload = build_ping()
    value = block.split(b"PING: ")[1].split(b"\r\n")[0]
    assert float(value) > 1.6e9 and len(value.split(b".")[1]) == 4 and payload == b"!"
    assert build_pong("9" * 100)[0] == b"NOOP: 1\r\nPONG: " + b"9" * 64 + b"\r\n"


@pytest.mark.parametrize(
    "call",
    [
        lambda: build_skb(-1, 0),
        lambda: build_skb(MAX_SID + 1, 0),
        lambda: build_skb(1, -5),
        lambda: build_skb("1", 0),
        lambda: build_eof(1, read_closed=False, write_closed=False),
        lambda: build_pong("a\r\nEOF: 1"),
        lambda: build_stream_open(1, "http", "evil\r\nSID: 2", 80, "1.2.3.4", 5),
        lambda: build_stream_open(1, "http", "host:80", 80, "1.2.3.4", 5),
        lambda: build_stream_open(1, "", "host", 80, "1.2.3.4", 5),
        lambda: build_stream_open(1, "http", "h\u20ac", 80, "1.2.3.4", 5),
    ],
)
def test_builders_refuse_bad_values(call):
    with pytest.raises(LocalProtocolError):
        call()


# ---------------------------------------------------------------------------------------------
# Parsing


def test_parse_builders_round_trip():
    assert events_of(build_ping(12.5)) == [Ping("12.5000")]
    assert events_of(build_pong("12.5000")) == [Pong("12.5000")]
    assert events_of(build_skb(19, 47)) == [Skb(19, 47)]
    assert events_of(build_eof(33, write_closed=False)) == [Eof(33, read_closed=True, write_closed=False)]
    assert events_of(build_eof(33, read_closed=False)) == [Eof(33, read_closed=False, write_closed=True)]
    assert events_of(build_eof(33)) == [Eof(33, True, True)]
    assert events_of(build_zrst()) == [ZReset()]
    assert events_of(build_quota(5.5, days=30, conns=7, pong="1.0")) == [Pong("1.0"), Quota(5.5, 30.0, 7.0)]
    assert events_of(build_data(7, b"payload\r\n\r\nmore")) == [Data(7, b"payload\r\n\r\nmore")]
    opened = events_of(
        build_stream_open(43, "https", "foo.testkite.local", 443, "::ffff:10.1.2.3", 45920,
                          rtls=True, payload=b"\x16\x03")
    )
    assert opened == [
        StreamOpen(43, "https", "foo.testkite.local", 443, "10.1.2.3", 45920, True, b"\x16\x03")
    ]


def test_parse_captured_frames_section_15_3():
    stream = bytes.fromhex(
        "32330d0a5349443a2034330d0a0d0a17030300139 1c94ff3b306edb31e6518461 94c024e116a03620d0a5349443a2034"
        "330d0a0d0a31380d0a5349443a2034330d0a454f463a2031520d0a0d0a4279652131390d0a5349443a2034330d0a454f"
        "463a203157520d0a0d0a42796521".replace(" ", "")
    )
    events, rest = [], stream
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        events += parse_chunk(*split_body(rest[:n]))
        rest = rest[n:]
    # the last TLS record (5 + 0x13 bytes); the "62" after it is the next frame's size line "b"
    assert events[0] == Data(43, bytes.fromhex("170303001391c94ff3b306edb31e651846194c024e116a03"))
    assert events[1:] == [Data(43, b""), Eof(43, True, False), Eof(43, True, True)]


def test_parse_order_like_pagekite():
    # PONG first, then PING; a PING chunk ignores ZRST and SKB (pagekite returns after PONGing)
    headers = [("NOOP", "1"), ("ZRST", "1"), ("SID", "3"), ("SKB", "4"), ("PING", "7.0"), ("PONG", "6.0")]
    assert parse_chunk(headers, b"!") == [Pong("6.0"), Ping("7.0")]
    # without PING: ZRST, then SKB
    assert parse_chunk([("NOOP", "1"), ("SKB", "4"), ("SID", "3"), ("ZRST", "1")], b"") == [
        ZReset(),
        Skb(3, 4),
    ]
    # a PING is a control chunk even without NOOP
    assert parse_chunk([("PING", "1.0")], b"!") == [Ping("1.0")]
    # SKB without NOOP: acted on, then the chunk goes on as data for its SID
    assert parse_chunk([("SID", "3"), ("SKB", "4")], b"xy") == [Skb(3, 4), Data(3, b"xy")]
    # SPD (flow control v1) is ignored
    assert parse_chunk([("NOOP", "1"), ("SID", "3"), ("SPD", "100")], b"") == [Noop()]
    assert parse_chunk([("NOOP", "1")], b"!") == [Noop()]
    # EOF wins over Proto/Host, payload ignored
    assert parse_chunk([("SID", "3"), ("EOF", "1WR"), ("Proto", "http"), ("Host", "a")], b"Bye!") == [
        Eof(3, True, True)
    ]


def test_parse_is_case_insensitive_and_first_value_wins():
    headers = [("sid", "5"), ("PROTO", "HTTP"), ("host", "Foo.Example"), ("port", "80"), ("Sid", "6"),
               ("rip", "2001:DB8::1"), ("rport", "1234"), ("rtls", "")]
    assert parse_chunk(headers, b"GET") == [
        StreamOpen(5, "http", "foo.example", 80, "2001:db8::1", 1234, False, b"GET")
    ]


def test_stream_open_details():
    base = [("SID", "9"), ("Proto", "raw"), ("Host", "h.example")]
    assert parse_chunk(base, b"") == [StreamOpen(9, "raw", "h.example", None, None, None, False, b"")]
    assert parse_chunk(base + [("RIP", "::ffff:1.2.3.4")], b"")[0].rip == "1.2.3.4"
    assert parse_chunk(base + [("RIP", "::ffff:1:2")], b"")[0].rip == "::ffff:1:2"  # not IPv4-mapped
    assert parse_chunk(base + [("RTLS", "1")], b"")[0].rtls is True
    # Proto without Host (or the reverse) is plain data, as in pagekite.py
    assert parse_chunk([("SID", "9"), ("Proto", "raw")], b"x") == [Data(9, b"x")]
    assert parse_chunk([("SID", "9"), ("Host", "h")], b"x") == [Data(9, b"x")]


@pytest.mark.parametrize("value,flags", [("1", (True, True)), ("1R", (True, False)), ("1W", (False, True)),
                                         ("1WR", (True, True)), ("1RW", (True, True)), ("R", (True, False))])
def test_eof_flags(value, flags):
    assert parse_chunk([("SID", "1"), ("EOF", value)], b"Bye!") == [Eof(1, *flags)]


@pytest.mark.parametrize(
    "headers,quoted",
    [
        ([("SID", "x1")], "'x1'"),
        ([("SID", "-1")], "'-1'"),
        ([("SID", "")], "''"),
        ([("SID", "2147483648")], "'2147483648'"),
        ([("SID", "\u0663")], "'\u0663'"),
        ([("SID", "99999999999")], "'99999999999'"),
        ([("Proto", "http"), ("Host", "a")], "chunk without SID"),
        ([("PONG", "1.0")], "chunk without SID"),
        ([("SID", "1"), ("EOF", "1X")], "'1X'"),
        ([("SID", "1"), ("EOF", "")], "''"),
        ([("SID", "1"), ("EOF", "1RR")], "'1RR'"),
        ([("SID", "1"), ("EOF", "1wr")], "'1wr'"),
        ([("NOOP", "1"), ("SKB", "3")], "SKB without SID"),
        ([("NOOP", "1"), ("SID", "1"), ("SKB", "lots")], "'lots'"),
        ([("SID", "1"), ("Proto", "http"), ("Host", "a"), ("Port", "http")], "'http'"),
        ([("SID", "1"), ("Proto", "http"), ("Host", "a"), ("RPort", "70000")], "'70000'"),
        ([("NOOP", "1"), ("Quota", "much")], "'much'"),
    ],
)
def test_parse_refuses_bad_values(headers, quoted):
    with pytest.raises(RemoteProtocolError) as info:
        parse_chunk(headers, b"")
    assert quoted in str(info.value)


def test_parse_sid_bounds():
    assert parse_sid("0") == 0 and parse_sid("0012") == 12 and parse_sid(str(MAX_SID)) == MAX_SID


def test_inband_kite_request_and_reply_events():
    kites = [KiteLine("http", "foo.testkite.local", "bs", "t" + "1" * 35, "2" * 36),
             KiteLine("raw-22", "foo.testkite.local", "bs", "t" + "1" * 35, "3" * 36)]
    (event,) = events_of(build_inband_request(kites))
    assert isinstance(event, KiteRequest)
    assert event.request.kites == kites and event.request.versions == ["1.5.2.201011"]
    results = [
        ("X-PageKite-OK", "http:foo.testkite.local:bs"),
        ("X-PageKite-Duplicate", "raw-22:foo.testkite.local:bs"),
        ("X-PageKite-SessionID", "1:2"),
        ("X-PageKite-Misc", "motd="),
    ]
    (event,) = events_of(build_inband_reply(results))
    assert isinstance(event, KiteReply)
    assert event.reply.ok == [KiteRef("http", "foo.testkite.local", "bs")]
    assert event.reply.duplicate == [KiteRef("raw-22", "foo.testkite.local", "bs")]
    assert event.reply.session_id == "1:2"
    # websocket-style first reply: features alongside results belong to the reply
    (event,) = parse_chunk(
        [("NOOP", "1"), ("X-PageKite-Features", "AddKites"), ("X-PageKite-OK", "a:b:c")], b"!"
    )
    assert isinstance(event, KiteReply) and event.reply.add_kites
    # features alone are a (feature-only) request
    (event,) = parse_chunk([("NOOP", "1"), ("X-PageKite-Features", "ZChunks")], b"!")
    assert isinstance(event, KiteRequest) and event.request.zchunks and not event.request.kites
    # a PING chunk may carry quota and kite headers too
    assert parse_chunk([("PING", "1.0"), ("Quota", "3")], b"!") == [Ping("1.0"), Quota(3.0, None, None)]


def test_inband_request_from_pagekite(pk_tunnel, pagekite_mod):
    from pagekite.proto import proto

    backends = {"http:foo.testkite.local": ["http", "", "foo.testkite.local", "127.0.0.1", "80", "s", 0]}
    request = "".join(proto.PageKiteRequestHeaders("fe:443", backends, {"http:foo.testkite.local": "tX"}))
    (event,) = parse_chunk(*split_body(("NOOP: 1\r\n%s\r\n\r\n!" % request).encode()))
    assert isinstance(event, KiteRequest)
    (kite,) = event.request.kites
    assert kite.kite == "http:foo.testkite.local" and kite.fsalt == "tX"


def test_with_fast_path_demux():
    """The captured stream of §15.2/§15.3 through the real Demux and parse_chunk."""
    fastpath = pytest.importorskip("kite.fastpath")
    events = []
    demux = fastpath.Demux(lambda headers, payload: events.extend(parse_chunk(headers, payload)))
    wire = b"".join(
        frame(c)
        for c in [
            build_stream_open(45, "raw", "foo.testkite.local", 22, "127.0.0.1", 45930),
            build_data(45, b"SSH-2.0-client\r\n"),
            build_skb(45, 0),
            build_ping(1795515982.4895),
            build_eof(45, write_closed=False),
        ]
    )
    for i in range(len(wire)):  # one byte at a time
        demux.feed_data(wire[i : i + 1])
    assert events == [
        StreamOpen(45, "raw", "foo.testkite.local", 22, "127.0.0.1", 45930, False, b""),
        Data(45, b"SSH-2.0-client\r\n"),
        Skb(45, 0),
        Ping("1795515982.4895"),
        Eof(45, True, False),
    ]
