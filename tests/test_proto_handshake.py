"""kite.proto.handshake: byte for byte with pagekite.py 1.5.2 (§1.3, §2, §15)."""

import types

import pytest

from kite.errors import HandshakeError, LocalProtocolError
from kite.proto.handshake import (
    PING_REQUEST,
    TUNNEL_FORBIDDEN,
    TUNNEL_UNAVAILABLE,
    Challenge,
    KiteAuthorizer,
    KiteLine,
    KiteRef,
    build_inband_reply,
    build_inband_request,
    build_ping_reply,
    build_tunnel_request,
    build_tunnel_response,
    build_unavailable,
    new_relay_uuid,
    parse_inband_reply,
    parse_inband_request,
    parse_tunnel_request,
    parse_tunnel_response,
    session_id,
)
from kite.proto.http import find_head_end
from kite.proto.signing import check_challenge, make_bsalt, make_challenge, sign
from wire import parse_ping_reply

BE_GLOBAL = "be-global-secret-example"
FE_GLOBAL = "fe-global-secret-example"
FE_ADDR = "127.0.0.1:20080"
SECRET = "s3cr3t"
T0 = 1700000000
STD_HEAD = (
    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
    "Pragma: no-cache\r\nExpires: 0\r\nCache-Control: no-store\r\nConnection: close\r\n"
)


def frame(header_block: bytes, payload: bytes) -> bytes:
    """What ChunkWriter.write_chunk puts on the wire (fast path contract)."""
    body = header_block + b"\r\n" + payload
    return b"%x\r\n" % len(body) + body


def demux_headers(header_block: bytes):
    """The Demux's header list for a header block (names as sent, values stripped)."""
    out = []
    for line in header_block.decode("latin-1").split("\r\n"):
        if line:
            name, _, value = line.partition(":")
            out.append((name, value.strip(" \t")))
    return out


@pytest.fixture
def pk(pagekite_mod, monkeypatch):
    """pagekite.py's modules, with a fixed global secret and a clock the test controls."""
    from pagekite import pk as pk_main
    from pagekite.proto import conns, parsers, proto

    clock = types.SimpleNamespace(now=T0)
    fake_time = types.SimpleNamespace(time=lambda: clock.now)
    monkeypatch.setattr(proto, "time", fake_time)
    monkeypatch.setattr(pk_main, "time", fake_time)
    monkeypatch.setattr(proto, "gSecret", BE_GLOBAL)
    return types.SimpleNamespace(proto=proto, conns=conns, parsers=parsers, main=pk_main, clock=clock)


def be_backends(*kites):
    """pagekite.py's backend table for ``(bid, secret)`` pairs (as --service_on builds it)."""
    out = {}
    for bid, secret in kites:
        proto, domain = bid.split(":")
        out[bid] = [proto, "", domain, "127.0.0.1", "80", secret, 0]
    return out


def our_kites(kites, tokens=None, salt="0123abcd"):
    tokens = tokens or {}
    out = []
    for bid, secret in kites:
        proto, domain = bid.split(":")
        bsalt = make_bsalt(BE_GLOBAL, FE_ADDR, secret)
        out.append(KiteLine.signed(proto, domain, bsalt, secret, tokens.get(bid, ""), salt=salt))
    return out


KITES3 = [
    ("http:foo.testkite.local", SECRET),
    ("raw-22:foo.testkite.local", SECRET),
    ("https:foo.testkite.local", "other-secret"),
]


# ---------------------------------------------------------------------------------------------
# The request


@pytest.mark.parametrize("nozchunks", [False, True])
@pytest.mark.parametrize("replace", [None, "6b0564c1:b40729de9b4d8235d221b55a787c9aa55a7e6f6f"])
@pytest.mark.parametrize("tls", [False, True])
def test_request_matches_pagekite(pk, nozchunks, replace, tls):
    expected = pk.proto.HTTP_PageKiteRequest(
        FE_ADDR, be_backends(*KITES3), nozchunks=nozchunks, tls=tls, testtoken="0123abcd", replace=replace
    )
    ours = build_tunnel_request(our_kites(KITES3), zchunks=not nozchunks, replace=replace, tls=tls)
    assert ours == expected.encode("latin-1")


def test_request_round2_matches_pagekite(pk):
    tokens = {
        "http:foo.testkite.local": "t876fedc0eff1ae0a99c2fef13367d9f7b18",
        "raw-22:foo.testkite.local": "tabc",
    }
    expected = pk.proto.HTTP_PageKiteRequest(FE_ADDR, be_backends(*KITES3), tokens, testtoken="0123abcd")
    assert build_tunnel_request(our_kites(KITES3, tokens)) == expected.encode("latin-1")
    # and the in-band form (Tunnel._BackEnd: 'NOOP: 1\r\n%s\r\n\r\n!')
    request = pk.proto.PageKiteRequestHeaders(FE_ADDR, be_backends(*KITES3), tokens, testtoken="0123abcd")
    block, payload = build_inband_request(our_kites(KITES3, tokens))
    assert block + b"\r\n" + payload == ("NOOP: 1\r\n%s\r\n\r\n!" % "".join(request)).encode()


def test_request_layout_of_section_2_1():
    kites = our_kites(KITES3)
    text = build_tunnel_request(kites, replace="6b0564c1:b4").decode()
    assert text.split("\r\n")[:6] == [
        "CONNECT PageKite:1 HTTP/1.0",
        "X-PageKite-Features: AddKites",
        "X-PageKite-Version: 1.5.2.201011",
        "X-PageKite-Features: ZChunks",
        "X-PageKite-Version: 1.5.2.201011",
        "X-PageKite-Replace: 6b0564c1:b4",
    ]
    assert text.endswith(f"X-PageKite: {kites[2].value}\r\n\r\n")
    assert kites[0].value.split(":")[3] == "" and len(kites[0].signature) == 36


CAPTURED_REQUEST = (
    b"CONNECT PageKite:1 HTTP/1.0\r\n"
    b"X-PageKite-Features: AddKites\r\nX-PageKite-Version: 1.5.2.201011\r\n"
    b"X-PageKite-Features: ZChunks\r\nX-PageKite-Version: 1.5.2.201011\r\n"
    b"X-PageKite-Replace: 6b056485:a677d5b05978cfaddb7887ce3340058359fd149e\r\n"
    b"X-PageKite: http:foo.testkite.local:43e979f1df24164b5dc95b31f7998f0405c9::"
    b"3d4b4f0f6f0b594981127cc92842709ef6a9\r\n\r\n"
)


def test_parse_captured_request():
    assert find_head_end(CAPTURED_REQUEST) == len(CAPTURED_REQUEST)
    req = parse_tunnel_request(CAPTURED_REQUEST)
    assert req.target == "PageKite:1" and req.http_version == "HTTP/1.0"
    assert req.features == ["AddKites", "ZChunks"] and req.zchunks and req.add_kites and not req.mobile
    assert req.versions == ["1.5.2.201011", "1.5.2.201011"] and req.version == "1.5.2.201011"
    assert req.replace == ["6b056485:a677d5b05978cfaddb7887ce3340058359fd149e"]
    (kite,) = req.kites
    assert kite == KiteLine(
        "http",
        "foo.testkite.local",
        "43e979f1df24164b5dc95b31f7998f0405c9",
        "",
        "3d4b4f0f6f0b594981127cc92842709ef6a9",
    )
    assert kite.what == "http:foo.testkite.local:43e979f1df24164b5dc95b31f7998f0405c9"
    assert kite.prefix == "X-PageKite"


def test_parse_agrees_with_pagekite_GetKiteRequests(pk):
    head = build_tunnel_request(our_kites(KITES3), replace="r:1")
    parse = pk.parsers.HttpLineParser(lines=head.decode().splitlines())
    theirs = pk.conns.Tunnel.GetKiteRequests(None, parse)
    ours = parse_tunnel_request(head).kites
    assert [(k.proto, k.domain, k.bsalt, k.fsalt, k.signature, k.prefix) for k in ours] == theirs


def test_parse_is_lenient_like_pagekite():
    head = (
        b"connect pagekite:443 http/1.1\r\n"
        b"x-pagekite-features: Mobile\r\n"
        b"X-PAGEKITE:  HTTP:Foo.Example.COM:bs::sig  \r\n"
        b"X-Beanstalk: raw-22:b.example:s1:t1:g1\r\n"
        b"X-Beanstalk-Features: ZChunks\r\n"
        b"Some-Other: thing\n"
        b"\r\n"
    )
    req = parse_tunnel_request(head)
    assert req.http_version == "HTTP/1.1" and req.target == "pagekite:443"
    # pagekite.py lists X-Beanstalk before X-PageKite
    assert [k.kite for k in req.kites] == ["raw-22:b.example", "http:foo.example.com"]
    assert [k.prefix for k in req.kites] == ["X-Beanstalk", "X-PageKite"]
    assert req.features == ["ZChunks", "Mobile"] and req.mobile and req.version == "old"


@pytest.mark.parametrize(
    "value",
    ["http:foo.example:bs:sig", "http:foo.example:bs:fs:sig:extra", "", "http"],
)
def test_kite_line_needs_five_fields(value):
    with pytest.raises(HandshakeError, match="5 ':'-separated fields") as info:
        KiteLine.parse(value)
    assert repr(value) in str(info.value)
    with pytest.raises(HandshakeError):
        parse_tunnel_request(f"CONNECT PageKite:1 HTTP/1.0\r\nX-PageKite: {value}\r\n\r\n".encode())


@pytest.mark.parametrize(
    "first",
    [
        "GET / HTTP/1.1",
        "CONNECT foo.example:443 HTTP/1.1",
        "CONNECT PageKite:1 HTTP/2.0",
        "CONNECT PageKite:1",
        "CONNECT PageKite:1 HTTP/1.0 extra",
        "",
    ],
)
def test_parse_request_refuses_other_request_lines(first):
    with pytest.raises(HandshakeError):
        parse_tunnel_request(f"{first}\r\nX-PageKite: a:b:c:d:e\r\n\r\n".encode())


def test_parse_request_refuses_header_without_colon():
    with pytest.raises(HandshakeError, match="'no colon here'"):
        parse_tunnel_request(b"CONNECT PageKite:1 HTTP/1.0\r\nno colon here\r\n\r\n")


def test_kite_line_signed_validation():
    line = KiteLine.signed("HTTP", "Foo.Example", "bsalt", SECRET)
    assert line.kite == "http:foo.example" and line.fsalt == ""
    assert line.signature == sign(SECRET, "http:foo.example:bsalt:", line.signature[:8])
    for bad in [("http", "a:b", "bs"), ("", "a", "bs"), ("http", "a", "b:s"), ("http", "a\r\n", "bs")]:
        with pytest.raises(LocalProtocolError):
            KiteLine.signed(*bad, SECRET)


# ---------------------------------------------------------------------------------------------
# The relay's decision, against pagekite.py's own


def pk_config(pk, *, protos, ports, raw_ports, domains, tls_endpoints=()):
    config = pk.main.PageKite()
    config.server_protos, config.server_ports, config.server_raw_ports = (
        list(protos),
        list(ports),
        list(raw_ports),
    )
    for protolist, domain, secret in domains:  # as --domain=PROTOS:DOMAIN:SECRET does
        for proto in (config.server_protos if protolist == "*" else protolist.split(",")):
            config.backends[f"{proto}:{domain}"] = ["", "", domain, None, None, secret, 0]
            config.backends[f"{proto}:{domain}"][0] = proto
    for name in tls_endpoints:
        config.tls_endpoints[name] = (None, object())
    return config


def our_authorizer(config, duplicates=(), **kw):
    secrets = {bid: be[5] for bid, be in config.backends.items()}
    return KiteAuthorizer(
        lookup_secret=lambda proto, domain: secrets.get(f"{proto}:{domain}"),
        challenge_secret=FE_GLOBAL,
        protos=config.server_protos,
        ports=config.server_ports,
        raw_ports=config.server_raw_ports,
        is_duplicate=lambda kite: kite.kite in duplicates,
        has_tls_endpoint=lambda domain: config.GetTlsEndpointCtx(domain) is not None,
        **kw,
    )


def run_pagekite_auth(pk, config, head_or_requests, duplicates=(), quota=None):
    """Run pagekite.py's AuthThread on one request; return its result headers."""
    if isinstance(head_or_requests, (bytes, str)):
        text = head_or_requests.decode() if isinstance(head_or_requests, bytes) else head_or_requests
        parse = pk.parsers.HttpLineParser(lines=text.splitlines())
        requests = pk.conns.Tunnel.GetKiteRequests(None, parse)
    else:
        requests = head_or_requests
    conns = types.SimpleNamespace(
        config=config,
        Tunnel=lambda proto, domain: (
            # quota=None: pagekite.py rebinds ``conn`` to the duplicate tunnel (its loop
            # variable), so later kites of the request are checked with *its* quota.
            [types.SimpleNamespace(TriggerPing=lambda: None, quota=None)]
            if f"{proto}:{domain}" in duplicates
            else []
        ),
    )
    thread = pk.main.AuthThread(conns)
    results = []

    def callback(res, log_info):
        results.extend(res)
        thread.keep_running = False

    thread.jobs.append((requests, types.SimpleNamespace(quota=quota), callback))
    thread.keep_running = True
    thread._run()
    return results


def signed(kite_bid, secret, fsalt, *, salt="89abcdef", bsalt="bsalt0123"):
    proto, domain = kite_bid.split(":")
    return KiteLine.signed(proto, domain, bsalt, secret, fsalt, salt=salt)


def good_fsalt(kite_bid, bsalt="bsalt0123", now=T0):
    return make_challenge(FE_GLOBAL, f"{kite_bid}:{bsalt}", now=now)


DOMAINS = [
    ("*", "foo.testkite.local", SECRET),
    ("http", "*.wild.example", "wild-secret"),
    ("raw", "bare.example", "bare-secret"),
    ("raw-22", "exact.example", "exact-secret"),
    ("raw", "exact.example", "wrong-bare-secret"),
]


def decision_cases():
    f = good_fsalt
    yield "ok", signed("http:foo.testkite.local", SECRET, f("http:foo.testkite.local")), True
    yield "wrong secret", signed("http:foo.testkite.local", "nope", f("http:foo.testkite.local")), True
    yield "unknown domain", signed("http:bar.example", SECRET, f("http:bar.example")), True
    yield "wildcard", signed("http:a.b.wild.example", "wild-secret", f("http:a.b.wild.example")), True
    yield "wildcard proto", signed("https:x.wild.example", "wild-secret", f("https:x.wild.example")), True
    yield (
        "raw port virtual",
        signed("raw-22:foo.testkite.local", SECRET, f("raw-22:foo.testkite.local")),
        True,
    )
    yield (
        "raw port bare secret",
        signed("raw-2222:bare.example", "bare-secret", f("raw-2222:bare.example")),
        True,
    )
    yield "exact before bare", signed("raw-22:exact.example", "exact-secret", f("raw-22:exact.example")), True
    yield (
        "bare not used",
        signed("raw-22:exact.example", "wrong-bare-secret", f("raw-22:exact.example")),
        True,
    )
    yield (
        "http port ok",
        signed("http-20080:foo.testkite.local", SECRET, f("http-20080:foo.testkite.local")),
        True,
    )
    yield (
        "http port bad",
        signed("http-8080:foo.testkite.local", SECRET, f("http-8080:foo.testkite.local")),
        True,
    )
    yield "port junk", signed("http-x:foo.testkite.local", SECRET, f("http-x:foo.testkite.local")), True
    yield "proto bad", signed("xmpp:foo.testkite.local", SECRET, f("xmpp:foo.testkite.local")), True
    yield (
        "stale fsalt",
        signed("http:foo.testkite.local", SECRET, f("http:foo.testkite.local", now=T0 - 1300)),
        True,
    )
    yield "forged fsalt", signed("http:foo.testkite.local", SECRET, "t" + "0" * 35), True
    yield (
        "fsalt other bsalt",
        signed("http:foo.testkite.local", SECRET, f("http:foo.testkite.local", "zz")),
        True,
    )
    yield "skip fsalt", signed("http:foo.testkite.local", SECRET, "anything"), False
    yield "skip fsalt bad sig", signed("http:foo.testkite.local", "nope", "anything"), False
    ts_sig = KiteLine(
        "http",
        "foo.testkite.local",
        "bs",
        "fs",
        make_challenge(SECRET, "http:foo.testkite.local:bs:fs", now=T0),
    )
    yield "timestamped signature", ts_sig, False


@pytest.mark.parametrize("name,kite,check", list(decision_cases()), ids=[c[0] for c in decision_cases()])
def test_decision_matches_GetDomainQuota(pk, monkeypatch, name, kite, check):
    monkeypatch.setattr(pk.proto, "gSecret", FE_GLOBAL)
    config = pk_config(
        pk, protos=["http", "https", "raw"], ports=[20080], raw_ports=["virtual"], domains=DOMAINS
    )
    if name == "raw port bare secret":
        config.server_raw_ports = [2222]
    quota, _, _, _, _, reason = config.GetDomainQuota(
        kite.proto, kite.domain, kite.bsalt, kite.fsalt, kite.signature, check_token=check
    )
    theirs = ("ok", None) if quota == -1 else ("invalid", reason)
    auth = our_authorizer(config)
    decision = auth.decide(kite, now=T0, check_fsalt=check)
    assert (decision.outcome, decision.reason) == theirs


def test_round_one_results_match_pagekite(pk, monkeypatch):
    monkeypatch.setattr(pk.proto, "gSecret", FE_GLOBAL)
    config = pk_config(
        pk, protos=["http", "https", "raw"], ports=[20080], raw_ports=["virtual"], domains=DOMAINS
    )
    kites = our_kites(KITES3 + [("http:hdr.testkite.local", "x")])
    head = build_tunnel_request(kites)
    theirs = run_pagekite_auth(pk, config, head)
    ours = our_authorizer(config).authorize(parse_tunnel_request(head).kites, now=T0)
    assert [n for n, _ in ours.headers] == [n for n, _ in theirs]
    for (name, mine), (_, their) in zip(ours.headers, theirs, strict=True):
        if name.endswith("SignThis"):
            what, _, token = mine.rpartition(":")
            their_what, _, their_token = their.rpartition(":")
            assert what == their_what
            assert check_challenge(FE_GLOBAL, what, token, now=T0)
            assert check_challenge(FE_GLOBAL, what, their_token, now=T0)
        else:
            assert mine == their  # SessionID and Misc included
    assert ours.session_id == dict(theirs)["X-PageKite-SessionID"]
    assert ours.disposition(add_kites=True) == "idle"
    assert ours.disposition(add_kites=False) == "close"


def test_round_two_results_match_pagekite(pk, monkeypatch):
    """Invalid + Invalid-Why, Duplicate, OK + SSL-OK, X-Beanstalk prefix: same headers."""
    monkeypatch.setattr(pk.proto, "gSecret", FE_GLOBAL)
    config = pk_config(
        pk,
        protos=["http", "https", "raw"],
        ports=[20080],
        raw_ports=["virtual"],
        domains=DOMAINS + [("*", "dup.example", "d")],
        tls_endpoints=["*.testkite.local"],
    )
    kites = [
        signed("http:foo.testkite.local", SECRET, good_fsalt("http:foo.testkite.local")),
        signed("https:foo.testkite.local", "bad", good_fsalt("https:foo.testkite.local")),
        signed("http:dup.example", "d", good_fsalt("http:dup.example")),
        signed("xmpp:foo.testkite.local", SECRET, good_fsalt("xmpp:foo.testkite.local")),
        signed("raw-22:foo.testkite.local", SECRET, "", salt="01010101"),
    ]
    lines = "".join(f"X-PageKite: {k.value}\r\n" for k in kites)
    head = f"CONNECT PageKite:1 HTTP/1.0\r\nX-Beanstalk: {kites[0].value}\r\n{lines}\r\n"
    theirs = run_pagekite_auth(pk, config, head, duplicates={"http:dup.example"})
    request = parse_tunnel_request(head)
    reply = our_authorizer(config, duplicates={"http:dup.example"}).authorize(request.kites, now=T0)
    names = [n for n, _ in reply.headers]
    assert names == [n for n, _ in theirs]
    assert names[:2] == ["X-Beanstalk-OK", "X-Beanstalk-SSL-OK"]
    for (name, mine), (_, their) in zip(reply.headers, theirs, strict=True):
        if not name.endswith("SignThis"):
            assert mine == their
    assert [d.outcome for d in reply.decisions] == ["ok", "ok", "invalid", "duplicate", "invalid", "signthis"]
    assert [d.reason for d in reply.decisions if d.reason] == ["signature", "proto"]
    assert reply.disposition(add_kites=True) == "live"
    # the same results render to pagekite.py's 200 reply and in-band reply, byte for byte
    assert_response_matches(pk, theirs)


def assert_response_matches(pk, results, **kw):
    sent = []
    tunnel = pk.conns.Tunnel.__new__(pk.conns.Tunnel)
    tunnel.server_info = ["x", [], [], [], True, False, None, False]
    config = types.SimpleNamespace(
        disable_zchunks=not kw.get("zchunks", True),
        server_protos=["http", "https", "raw", "websocket"],
        server_portalias={},
        server_ports=[20080, 443],
        server_raw_ports=["virtual"],
    )
    tunnel.conns = types.SimpleNamespace(config=config, Add=lambda conn: None)
    tunnel.Send = lambda data, **_: sent.append("".join(data)) or True
    tunnel.SendChunked = lambda data, **_: sent.append(data) or True
    tunnel.ProcessAuthResults = lambda results: True
    tunnel.AuthCallback(types.SimpleNamespace(quota=None), results, [])
    tunnel.ChunkAuthCallback(results, [])
    ours = build_tunnel_response(results, ports=[20080, 443], raw_ports=["virtual"], **kw)
    assert ours == sent[0].encode()
    block, payload = build_inband_reply(results)
    assert block + b"\r\n" + payload == sent[1].encode()


@pytest.mark.parametrize("zchunks", [True, False])
def test_response_matches_AuthCallback(pk, zchunks):
    results = [
        ("X-PageKite-SignThis", "http:a.example:bs:t0123456789"),
        ("X-PageKite-OK", "raw-22:a.example:bs"),
        ("X-PageKite-Invalid", "http:b.example:bs"),
        ("X-PageKite-Invalid-Why", "http:b.example:bs;unauthorized"),
        ("X-PageKite-SessionID", "6b0564c1:b40729de9b4d8235d221b55a787c9aa55a7e6f6f"),
        ("X-PageKite-Misc", "motd=Hello+there%21"),
    ]
    assert_response_matches(pk, results, zchunks=zchunks)


def test_response_without_raw_ports():
    text = build_tunnel_response([], ports=[80], protos=["http"], zchunks=False).decode()
    assert "Raw-Ports" not in text and "ZChunks" not in text
    assert text.endswith("X-PageKite-Protos: http\r\nX-PageKite-Ports: 80\r\n\r\n")


def test_refusals_match_pagekite(pk):
    assert TUNNEL_FORBIDDEN == pk.proto.HTTP_ConnectBad(code=403, status="Forbidden").encode()
    assert TUNNEL_UNAVAILABLE == pk.proto.HTTP_ConnectBad().encode()
    for refusal in (TUNNEL_FORBIDDEN, TUNNEL_UNAVAILABLE):
        reply = parse_tunnel_response(refusal)
        assert reply.status in (403, 503) and not reply.ok and not reply.sign_this


def test_session_id_and_motd(pk, monkeypatch):
    monkeypatch.setattr(pk.proto, "gSecret", FE_GLOBAL)
    whats = ["http:a:b", "raw:c:d"]
    assert session_id(T0, FE_GLOBAL, whats) == "%x:%s" % (
        T0,
        pk.proto.sha1hex("%x:%s:" % (T0, FE_GLOBAL) + "".join(whats)),
    )
    config = pk_config(pk, protos=["http"], ports=[80], raw_ports=[], domains=[])
    config.motd_message = "Hello there & welcome!"
    kites = [KiteLine("http", "a.example", "bs", "", "")]
    theirs = run_pagekite_auth(pk, config, [("http", "a.example", "bs", "", "", "X-PageKite")])
    ours = our_authorizer(config, motd="Hello there & welcome!").authorize(kites, now=T0)
    assert ours.headers[1:] == theirs[1:]
    assert parse_inband_reply(ours.headers).motd == "Hello there & welcome!"


def test_duplicate_callback_only_for_valid_kites():
    asked = []
    auth = KiteAuthorizer(
        lookup_secret=lambda p, d: SECRET if d == "a.example" else None,
        challenge_secret=FE_GLOBAL,
        protos=["http"],
        ports=[80],
        is_duplicate=lambda kite: asked.append(kite.kite) or True,
        clock=lambda: T0,
    )
    good = signed("http:a.example", SECRET, good_fsalt("http:a.example"))
    bad = signed("http:b.example", SECRET, good_fsalt("http:b.example"))
    reply = auth.authorize([good, bad, KiteLine("http", "c.example", "bs", "", "")])
    assert asked == ["http:a.example"]
    assert [d.outcome for d in reply.decisions] == ["duplicate", "invalid", "signthis"]
    assert reply.disposition(add_kites=True) == "close"


def test_empty_request_gets_trailer_only():
    auth = KiteAuthorizer(lookup_secret=lambda p, d: None, challenge_secret="x", clock=lambda: T0)
    reply = auth.authorize([])
    assert [n for n, _ in reply.headers] == ["X-PageKite-SessionID", "X-PageKite-Misc"]
    assert reply.disposition(add_kites=True) == "idle"


def test_upgrade_info_header():
    auth = KiteAuthorizer(
        lookup_secret=lambda p, d: None, challenge_secret="x", upgrade_info=[("1.6", "tag", "md5", "h", "f")]
    )
    assert auth.authorize([]).headers[-1] == ("X-PageKite-Upgrade", "1.6;tag;md5;h;f")


# ---------------------------------------------------------------------------------------------
# The relay's reply, as a backend reads it

CAPTURED_200 = (
    STD_HEAD + "Transfer-Encoding: chunked\r\n"
    "X-PageKite-Features: ZChunks\r\nX-PageKite-Features: WebSockets\r\nX-PageKite-Features: AddKites\r\n"
    "X-PageKite-Protos: http, https, raw, websocket\r\nX-PageKite-Ports: 20080\r\n"
    "X-PageKite-Raw-Ports: virtual\r\n"
    "X-PageKite-SignThis: http:foo.testkite.local:43e979f1df24164b5dc95b31f7998f0405c9:"
    "t9715d7efa9bd4224149622f32ce9b7268b4\r\n"
    "X-PageKite-SessionID: 6b0564c1:b40729de9b4d8235d221b55a787c9aa55a7e6f6f\r\n"
    "X-PageKite-Misc: motd=\r\n\r\n"
).encode()
BSALT_15 = "43e979f1df24164b5dc95b31f7998f0405c9"


def test_parse_captured_200():
    assert find_head_end(CAPTURED_200 + b"1c\r\n") == len(CAPTURED_200)
    reply = parse_tunnel_response(CAPTURED_200)
    assert (reply.http_version, reply.status, reply.reason_phrase) == ("HTTP/1.1", 200, "OK")
    assert reply.features == ["ZChunks", "WebSockets", "AddKites"] and reply.zchunks and reply.add_kites
    assert reply.protos == ["http", "https", "raw", "websocket"]
    assert reply.ports == ["20080"] and reply.raw_ports == ["virtual"]
    assert reply.sign_this == [
        Challenge("http", "foo.testkite.local", BSALT_15, "t9715d7efa9bd4224149622f32ce9b7268b4")
    ]
    assert reply.session_id == "6b0564c1:b40729de9b4d8235d221b55a787c9aa55a7e6f6f"
    assert reply.misc == {} and reply.motd == ""
    assert not reply.ok and not reply.invalid and not reply.duplicate
    # the second round the captured backend sent next ([c4] in §15.2)
    line = KiteLine(
        "http",
        "foo.testkite.local",
        BSALT_15,
        reply.sign_this[0].fsalt,
        "a49a505bdec21f2663a1be80c802006c48d0",
    )
    block, payload = build_inband_request([line])
    assert frame(block, payload) == (
        b"c4\r\nNOOP: 1\r\nX-PageKite-Version: 1.5.2.201011\r\n"
        b"X-PageKite: http:foo.testkite.local:" + BSALT_15.encode() + b":t9715d7efa9bd4224149622f32ce9b7268b4"
        b":a49a505bdec21f2663a1be80c802006c48d0\r\n\r\n\r\n!"
    )
    assert parse_inband_request(demux_headers(block)).kites == [line]


def test_parse_captured_inband_replies():
    ok = frame(
        b"NOOP: 1\r\nX-PageKite-OK: http:foo.testkite.local:" + BSALT_15.encode() + b"\r\n"
        b"X-PageKite-SessionID: 6b0564c1:b40729de9b4d8235d221b55a787c9aa55a7e6f6f\r\n"
        b"X-PageKite-Misc: motd=\r\n",
        b"!",
    )
    assert ok.startswith(b"ba\r\n")  # [ba] in §15.2
    reply = parse_inband_reply(demux_headers(ok[4:].split(b"\r\n\r\n")[0] + b"\r\n"))
    assert reply.status is None and reply.ok == [KiteRef("http", "foo.testkite.local", BSALT_15)]
    dup = parse_inband_reply(
        [
            ("NOOP", "1"),
            ("X-PageKite-Duplicate", f"http:foo.testkite.local:{BSALT_15}"),
            ("X-PageKite-SessionID", "1:2"),
        ]
    )
    assert dup.duplicate == [KiteRef("http", "foo.testkite.local", BSALT_15)] and not dup.ok


def test_section_2_3_exchange_sizes():
    """The in-band round of §2.3/§15.1: 0x283 bytes out, 0x20c back (4 kites; the listing of
    the reply in §2.3 omits the https OK line that its size accounts for)."""
    bsalt = "66e56fd2fdf6a5a3cfad94e9dce114133024"
    fsalt, sig = "t" + "e" * 35, "5067ff819b2467df8b10ef6c7687525a0050"
    kites = [
        KiteLine(p, d, bsalt, fsalt, sig)
        for p, d in [("http", "foo"), ("raw-22", "foo"), ("https", "foo"), ("http", "hdr")]
        for d in [f"{d}.testkite.local"]
    ]
    out = frame(*build_inband_request(kites))
    assert out.startswith(b"283\r\nNOOP: 1\r\nX-PageKite-Version: 1.5.2.201011\r\nX-PageKite: http")
    results = [("X-PageKite-OK", k.what) for k in kites[:3]] + [
        ("X-PageKite-Invalid", kites[3].what),
        ("X-PageKite-Invalid-Why", kites[3].what + ";unauthorized"),
        ("X-PageKite-SessionID", "6b056441:e7f9c1b320500b6e45a016a16d5bd8c17796393c"),
        ("X-PageKite-Misc", "motd="),
    ]
    back = frame(*build_inband_reply(results))
    assert back.startswith(b"20c\r\nNOOP: 1\r\nX-PageKite-OK: http:foo.testkite.local:" + bsalt.encode())
    reply = parse_inband_reply(demux_headers(build_inband_reply(results)[0]))
    assert [r.kite for r in reply.ok] == [
        "http:foo.testkite.local",
        "raw-22:foo.testkite.local",
        "https:foo.testkite.local",
    ]
    assert reply.invalid == [(KiteRef("http", "hdr.testkite.local", bsalt), "unauthorized")]


def test_parse_reply_details():
    reply = parse_tunnel_response(
        b"HTTP/1.0 200 Whatever it says\r\n"
        b"x-pagekite-features: ZChunks, AddKites\r\n"
        b"X-PageKite-Invalid: http:a.example:bs\r\n"
        b"X-PageKite-Invalid: http:b.example:bs\r\n"
        b"X-PageKite-Invalid-Why: http:a.example:bs;signature;future\r\n"
        b"X-PageKite-SSL-OK: http:c.example:bs\r\nX-PageKite-OK: http:c.example:bs\r\n"
        b"X-PageKite-Quota: 1024.5\r\nX-PageKite-QConns: 5\r\nX-PageKite-QDays: 30\r\n"
        b"X-PageKite-IPsPerSec: 10/60\r\nX-PageKite-Upgrade: 2;t;m;h;f\r\n"
        b"X-Beanstalk-OK: raw:d.example:bs\r\n\r\n"
    )
    assert reply.features == ["ZChunks", "AddKites"] and reply.reason_phrase == "Whatever it says"
    assert reply.invalid == [
        (KiteRef("http", "a.example", "bs"), "signature"),
        (KiteRef("http", "b.example", "bs"), "unknown"),
    ]
    assert [r.kite for r in reply.ok] == ["raw:d.example", "http:c.example"]
    assert reply.ssl_ok == [KiteRef("http", "c.example", "bs")]
    assert (reply.quota, reply.q_conns, reply.q_days, reply.ips_per_sec) == (1024.5, 5.0, 30.0, (10, 60))
    assert reply.upgrade == ["2;t;m;h;f"]


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-PageKite-OK: a:b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-PageKite-SignThis: a:b:c\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-PageKite-Invalid-Why: a:b:c\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-PageKite-Quota: lots\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-PageKite-IPsPerSec: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbroken line\r\n\r\n",
    ],
)
def test_parse_reply_refuses_malformed(head):
    with pytest.raises(HandshakeError):
        parse_tunnel_response(head)


def test_pagekite_backend_reads_our_reply(pk):
    challenges = [
        ("X-PageKite-SignThis", "http:a.example:bs:" + make_challenge(FE_GLOBAL, "http:a.example:bs"))
    ]
    head = build_tunnel_response(challenges + [("X-PageKite-SessionID", "1:2")], ports=[443]).decode()
    parse = pk.parsers.HttpLineParser(lines=head.splitlines(), state=pk.parsers.HttpLineParser.IN_RESPONSE)
    count, tokens = pk.conns.Tunnel.CheckForTokens(None, parse)
    assert count == 1 and tokens == {"http:a.example": challenges[0][1].rsplit(":", 1)[1]}
    assert parse.Header("X-PageKite-Features") == ["ZChunks", "WebSockets", "AddKites"]


# ---------------------------------------------------------------------------------------------
# Both sides, end to end


def test_pagekite_backend_registers_with_our_relay(pk, monkeypatch):
    """pagekite.py's BE request -> our challenge -> its in-band answer -> our OK."""
    backends = be_backends(*KITES3)
    auth = KiteAuthorizer(
        lookup_secret=lambda p, d: dict(KITES3).get(f"{p}:{d}"),
        challenge_secret=FE_GLOBAL,
        ports=[20080],
        raw_ports=["virtual"],
        clock=lambda: T0,
    )
    request = parse_tunnel_request(pk.proto.HTTP_PageKiteRequest(FE_ADDR, backends))
    first = auth.authorize(request.kites)
    assert [d.outcome for d in first.decisions] == ["signthis"] * 3
    head = build_tunnel_response(first.headers, ports=[20080], raw_ports=["virtual"]).decode()
    parse = pk.parsers.HttpLineParser(lines=head.splitlines(), state=pk.parsers.HttpLineParser.IN_RESPONSE)
    _, tokens = pk.conns.Tunnel.CheckForTokens(None, parse)
    lines = pk.proto.PageKiteRequestHeaders(FE_ADDR, backends, tokens)
    chunk_headers = demux_headers(("NOOP: 1\r\n" + "".join(lines)).encode())
    second = auth.authorize(parse_inband_request(chunk_headers).kites, now=T0 + 700)
    assert [d.outcome for d in second.decisions] == ["ok"] * 3
    assert second.disposition(add_kites=True) == "live"
    # twenty minutes later the challenge is stale
    late = auth.authorize(parse_inband_request(chunk_headers).kites, now=T0 + 1300)
    assert {d.reason for d in late.decisions} == {"unauthorized"}
    # ... unless the tunnel already passed an in-band round (pagekite.py skips the check)
    lenient = auth.authorize(parse_inband_request(chunk_headers).kites, now=T0 + 1300, check_fsalt=False)
    assert all(d.outcome == "ok" for d in lenient.decisions)


def test_our_backend_registers_with_pagekite_relay(pk, monkeypatch):
    """Our request -> pagekite.py's AuthThread -> its 200 -> our answer -> its OK."""
    monkeypatch.setattr(pk.proto, "gSecret", FE_GLOBAL)
    config = pk_config(
        pk, protos=["http", "https", "raw"], ports=[20080], raw_ports=["virtual"], domains=DOMAINS
    )
    kites = [
        KiteLine.signed("http", "foo.testkite.local", "bsaltA", SECRET),
        KiteLine.signed("raw-22", "foo.testkite.local", "bsaltB", SECRET),
    ]
    results = run_pagekite_auth(pk, config, build_tunnel_request(kites))
    sent = []
    tunnel = pk.conns.Tunnel.__new__(pk.conns.Tunnel)
    tunnel.server_info = ["x", [], [], [], True, False, None, False]
    config.disable_zchunks = False
    tunnel.conns = types.SimpleNamespace(config=config, Add=lambda conn: None)
    tunnel.Send = lambda data, **_: sent.append("".join(data)) or True
    tunnel.ProcessAuthResults = lambda results: True
    tunnel.AuthCallback(types.SimpleNamespace(quota=None), results, [])
    reply = parse_tunnel_response(sent[0].encode())
    assert reply.add_kites and len(reply.sign_this) == 2
    secrets = {"http:foo.testkite.local": SECRET, "raw-22:foo.testkite.local": SECRET}
    answers = [c.answer(secrets[c.kite]) for c in reply.sign_this]
    block, payload = build_inband_request(answers)
    header_text = (block + b"\r\n" + payload).decode().split("\r\n\r\n", 1)[0]  # Tunnel.ProcessChunk
    parse = pk.parsers.HttpLineParser(
        lines=header_text.splitlines(), state=pk.parsers.HttpLineParser.IN_HEADERS
    )
    requests = pk.conns.Tunnel.GetKiteRequests(None, parse)
    final = run_pagekite_auth(pk, config, requests)
    assert [n for n, _ in final][:2] == ["X-PageKite-OK", "X-PageKite-OK"]
    parsed = parse_inband_reply(demux_headers(build_inband_reply(final)[0]))
    assert [r.kite for r in parsed.ok] == ["http:foo.testkite.local", "raw-22:foo.testkite.local"]


# ---------------------------------------------------------------------------------------------
# Ping


@pytest.mark.parametrize("overloaded", [False, True])
def test_ping_reply_matches_pagekite(pk, overloaded):
    uuid = pk.proto.MAGIC_UUID_SHA1
    theirs = pk.proto.HTTP_Unavailable("fe", "http", "ping.pagekite", overloaded=overloaded, advertise=False)
    ours = build_ping_reply(uuid, overloaded=overloaded)
    assert ours == theirs.encode("utf-8")
    if not overloaded:
        assert len(ours) == 368  # as observed (§1.3)
    assert ours.startswith(b"HTTP/1.1 503 Unavailable\r\n")
    assert parse_ping_reply(ours) == parse_ping_reply(ours.decode())
    assert parse_ping_reply(ours).uuid == uuid and parse_ping_reply(ours).overloaded is overloaded


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"code": 401, "status": "Unauthorized"},
        {"where": "be", "proto": "websocket", "comment": "x"},
        {"advertise": False},
    ],
)
def test_unavailable_page_matches_pagekite(pk, kwargs):
    uuid = pk.proto.MAGIC_UUID_SHA1
    kw = dict(kwargs)
    where, proto = kw.pop("where", "fe"), kw.pop("proto", "http")
    theirs = pk.proto.HTTP_Unavailable(where, proto, "foo.testkite.local", **kw)
    ours = build_unavailable("foo.testkite.local", uuid=uuid, where=where, proto=proto, **kw)
    assert ours == theirs.encode()


def test_ping_request_and_parsing(pk):
    assert PING_REQUEST == b"HEAD /ping HTTP/1.1\r\nHost: ping.pagekite\r\n\r\n"
    assert parse_ping_reply(b"HTTP/1.1 503 Unavailable\r\n\r\n") == parse_ping_reply(
        "HTTP/1.1 503 Unavailable"
    )
    assert parse_ping_reply(b"HTTP/1.1 503 Unavailable\r\n\r\n").uuid is None
    for bad in (b"", b"HTTP/1.1 200 OK\r\n\r\n", b"HTTP/1.0 503 Unavailable\r\n\r\n", b"SSH-2.0"):
        with pytest.raises(HandshakeError):
            parse_ping_reply(bad)
    uuid = new_relay_uuid()
    assert len(uuid) == 40 and int(uuid, 16) >= 0 and uuid != new_relay_uuid()
