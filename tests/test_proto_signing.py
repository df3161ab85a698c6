"""kite.proto.signing: bit-exact with pagekite.py's signToken/checkSignature (§3)."""

import random
import string
import types

import pytest

from kite.errors import LocalProtocolError
from kite.proto.signing import (
    TOKEN_LENGTH,
    check_challenge,
    check_signature,
    make_bsalt,
    make_challenge,
    new_salt,
    new_secret,
    sha1hex,
    sign,
)

# A worked example of the algorithm of docs/protocol.md §3, as literal strings computed with
# pagekite.py's own signToken (the test below checks them against it again).
BE_GLOBAL = "be-global-secret-example"
KITE_SECRET = "kitesecret123"
FE_ADDR = "127.0.0.1:20080"
FE_GLOBAL = "fe-global-secret-example"
T0 = 1700000000
BSALT = "b2350d00c67cc5b4a3c007fc8aac53624dba"
WHAT = "http:foo.testkite.local:" + BSALT
ROUND1 = "http:foo.testkite.local:b2350d00c67cc5b4a3c007fc8aac53624dba::0123abcda3afb7d6d8bc321a1ca3c5a2cdc7"
FSALT = "t876fedc0eff1ae0a99c2fef13367d9f7b18"
SIG2 = "0123abcd2ffbafce270e9e40b9a044237049"
ROUND2 = (
    "http:foo.testkite.local:b2350d00c67cc5b4a3c007fc8aac53624dba:"
    "t876fedc0eff1ae0a99c2fef13367d9f7b18:0123abcd2ffbafce270e9e40b9a044237049"
)


@pytest.fixture
def pk_proto(pagekite_mod, monkeypatch):
    """pagekite.proto.proto with its clock under the test's control (``pk_proto.now``)."""
    from pagekite.proto import proto

    clock = types.SimpleNamespace(now=T0)
    monkeypatch.setattr(proto, "time", types.SimpleNamespace(time=lambda: clock.now))
    proto.clock = clock
    yield proto
    del proto.clock


def test_worked_example_literals():
    assert make_bsalt(BE_GLOBAL, FE_ADDR, KITE_SECRET) == BSALT
    assert f"{WHAT}::" + sign(KITE_SECRET, WHAT + ":", "0123abcd") == ROUND1
    assert "%x" % (T0 // 600) == "2b3bb5"
    assert make_challenge(FE_GLOBAL, WHAT, now=T0, token="t876fedc") == FSALT
    # signToken forces the 't' and keeps characters 1..7 of any token
    assert make_challenge(FE_GLOBAL, WHAT, now=T0, token="9876fedcba") == FSALT
    assert sign(KITE_SECRET, f"{WHAT}:{FSALT}", "0123abcd") == SIG2
    assert f"{WHAT}:{FSALT}:{SIG2}" == ROUND2


def test_worked_example_windows():
    assert check_challenge(FE_GLOBAL, WHAT, FSALT, now=T0)
    assert check_challenge(FE_GLOBAL, WHAT, FSALT, now=T0 + 700)  # previous window
    assert not check_challenge(FE_GLOBAL, WHAT, FSALT, now=T0 + 1300)
    assert not check_challenge(FE_GLOBAL, WHAT, FSALT, now=T0 - 600)  # not issued yet
    assert check_signature(FE_GLOBAL, WHAT, FSALT, now=T0 + 700)  # 't' -> timestamped
    assert check_signature(KITE_SECRET, f"{WHAT}:{FSALT}", SIG2)
    assert not check_signature(KITE_SECRET + "x", f"{WHAT}:{FSALT}", SIG2)


def test_worked_example_against_pagekite(pk_proto):
    assert pk_proto.signToken(token="0123abcd", secret=KITE_SECRET, payload=WHAT + ":") == ROUND1[-36:]
    assert pk_proto.signToken(token="9876fedc", secret=FE_GLOBAL, payload=WHAT, timestamp=T0) == FSALT
    # T0 lies 400 s before the end of its window: valid until T0 + 999, then refused
    for delta, valid in ((0, True), (400, True), (700, True), (999, True), (1000, False), (1300, False)):
        pk_proto.clock.now = T0 + delta
        assert pk_proto.checkSignature(sign=FSALT, secret=FE_GLOBAL, payload=WHAT) is valid
        assert check_challenge(FE_GLOBAL, WHAT, FSALT, now=T0 + delta) is valid


def _rand_text(rng, n):
    return "".join(rng.choice(string.printable[:94]) for _ in range(n))


def test_sign_matches_signToken(pk_proto):
    rng = random.Random(1234)
    for _ in range(200):
        secret, payload = _rand_text(rng, rng.randint(1, 40)), _rand_text(rng, rng.randint(0, 120))
        salt = "%08x" % rng.getrandbits(32)
        ours = sign(secret, payload, salt)
        assert ours == pk_proto.signToken(token=salt, secret=secret, payload=payload)
        assert len(ours) == TOKEN_LENGTH
        assert pk_proto.checkSignature(sign=ours, secret=secret, payload=payload)
        assert check_signature(secret, payload, ours)
        # pagekite's own random-salted signatures verify with ours
        theirs = pk_proto.signToken(secret=secret, payload=payload)
        assert check_signature(secret, payload, theirs)


def test_latin1_text_matches_signToken(pk_proto):
    secret, payload = "s\xe9cr\xe8t\xff", "http:caf\xe9.example:x:"
    assert sign(secret, payload, "abcdef01") == pk_proto.signToken(
        token="abcdef01", secret=secret, payload=payload
    )


def test_check_signature_rejects_tampering(pk_proto):
    good = sign("s3cr3t", "http:a.b:c:d", "00112233")
    variants = [
        good[:-1] + ("0" if good[-1] != "0" else "1"),
        "10112233" + good[8:],
        good + "0",
        good[:-1],
        good.upper(),
    ]
    for bad in variants:
        assert not check_signature("s3cr3t", "http:a.b:c:d", bad)
        assert not pk_proto.checkSignature(sign=bad, secret="s3cr3t", payload="http:a.b:c:d")
    assert not check_signature("s3cr3t", "http:a.b:c:D", good)


@pytest.mark.parametrize("junk", ["", "t", "short", "\xe9" * 36, "t" + "\u20ac" * 35, "0" * 36])
def test_check_signature_never_raises(junk):
    assert check_signature("s", "p", junk) is False


def test_challenges_interoperate(pk_proto):
    rng = random.Random(99)
    for _ in range(50):
        fe_secret, payload = "%040x" % rng.getrandbits(160), _rand_text(rng, 60)
        now = rng.randint(1_600_000_000, 1_900_000_000)
        pk_proto.clock.now = now
        ours = make_challenge(fe_secret, payload, now=now)
        assert ours[0] == "t" and len(ours) == TOKEN_LENGTH
        assert pk_proto.checkSignature(sign=ours, secret=fe_secret, payload=payload)
        theirs = pk_proto.signToken(secret=fe_secret, payload=payload, timestamp=now)
        assert check_challenge(fe_secret, payload, theirs, now=now)
        assert check_challenge(fe_secret, payload, theirs, now=now + 600)
        assert not check_challenge(fe_secret, payload, theirs, now=now + 1200)
        assert not check_challenge(fe_secret + "x", payload, theirs, now=now)


def test_check_challenge_wants_timestamped_tokens():
    untimed = sign(FE_GLOBAL, WHAT, "01234567")
    assert check_signature(FE_GLOBAL, WHAT, untimed)
    assert not check_challenge(FE_GLOBAL, WHAT, untimed, now=T0)
    assert not check_challenge(FE_GLOBAL, WHAT, FSALT[:-1], now=T0)
    assert not check_challenge(FE_GLOBAL, WHAT, "", now=T0)


def test_default_clock_is_used():
    token = make_challenge("fe", "payload")
    assert check_challenge("fe", "payload", token)
    assert check_signature("fe", "payload", token)


def test_sign_salt_rules():
    with pytest.raises(LocalProtocolError, match="'tabcdef0'"):
        sign("s", "p", "tabcdef0")
    with pytest.raises(LocalProtocolError, match="'abc'"):
        sign("s", "p", "abc")
    assert sign("s", "p", "0123456789")[:8] == "01234567"  # like signToken: first 8 characters
    assert check_signature("s", "p", sign("s", "p"))
    with pytest.raises(LocalProtocolError):
        make_challenge("s", "p", token="t12")


def test_new_salt_and_secret():
    salts = {new_salt() for _ in range(500)}
    assert len(salts) == 500
    for salt in salts:
        assert len(salt) == 8 and salt[0] != "t"
        int(salt, 16)
    secret = new_secret()
    assert len(secret) == 40 and int(secret, 16) >= 0 and secret != new_secret()


def test_bsalt_matches_pagekite_request_headers(pk_proto, monkeypatch):
    monkeypatch.setattr(pk_proto, "gSecret", BE_GLOBAL)
    backends = {
        "http:foo.testkite.local": ["http", "", "foo.testkite.local", "127.0.0.1", "80", KITE_SECRET, 0]
    }
    (line,) = pk_proto.PageKiteRequestHeaders(FE_ADDR, backends, testtoken="0123abcd")[1:]
    assert line == f"X-PageKite: {ROUND1}\r\n"
    assert sha1hex(BE_GLOBAL + FE_ADDR + KITE_SECRET)[:36] == BSALT
