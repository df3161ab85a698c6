"""The negative answers rendered from templates (kite.names.negative) against dnspython's: for
random names, types, classes, flags and EDNS, the template answer, when there is one, is byte
for byte the answer dnspython renders; and the plain cases do take the template path."""

from __future__ import annotations

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kite.names.negative import NegativeAnswers
from kite.names.server import DnsServer
from kite.names.zone import Zone

ZONE = "test.kite"


def make_zone(ns: str) -> Zone:
    zone = Zone(ZONE, ["192.0.2.1", "2001:db8::1"], ns_names=[ns], own_names=["relay.test.kite"])
    zone.presence("http", "app.test.kite", True)
    zone.presence("http", "*.w.test.kite", True)
    zone.publish_txt("_acme-challenge.app.test.kite", ["v"])
    return zone


#: NS names inside the zone, deeper in it, and outside it (the SOA's MNAME compresses
#: differently against the question in each case).
ZONES = [make_zone(ns) for ns in ("relay.test.kite", "a.b.ns.test.kite", "ns1.example.net",
                                  "ns.kite")]


def servers(zone: Zone) -> tuple:
    return (DnsServer(zone, [], rate_limit=0), DnsServer(zone, [], rate_limit=0, fast_negative=False))


SERVERS = [servers(z) for z in ZONES]

PLAIN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
label = st.one_of(
    st.text(PLAIN, min_size=1, max_size=20).map(str.encode),
    st.text(PLAIN, min_size=1, max_size=63).map(str.encode),
    st.sampled_from([b"relay", b"RELAY", b"hostmaster", b"ns", b"b", b"a", b"w", b"app", b"*",
                     b"_acme-challenge"]),
    st.binary(min_size=1, max_size=8),  # dots, backslashes, bytes past 127: dnspython's
)
suffix = st.sampled_from(["test.kite", "Test.KITE", "relay.test.kite", "hostmaster.test.kite",
                          "a.b.ns.test.kite", "b.ns.test.kite", "w.test.kite", "app.test.kite",
                          "kite", "example.com", "ns1.example.net", "test.kite.example", ""])
rdtype = st.one_of(st.sampled_from([1, 28, 16, 2, 6, 15, 33, 255, 252, 251, 41, 250, 0, 128]),
                   st.sampled_from([1, 28, 16, 65]), st.integers(0, 65535))
rdclass = st.sampled_from([1, 1, 1, 1, 3, 4, 254, 255, 0, 65535])
edns = st.one_of(
    st.none(),
    st.tuples(st.integers(0, 2).map(lambda v: 0 if v < 2 else 1),  # version (mostly 0)
              st.integers(0, 65535),  # payload
              st.booleans(),  # DO
              st.sampled_from(["none", "cookie", "cookie-server", "nsid", "padding"])),
)
flags = st.integers(0, 0xFFFF).map(lambda f: f & ~0x780F if f & 1 else f & (0x0130 | 0x8000 | 0x0400))


def build(labels: list, sfx: str, qtype: int, qclass: int, ed, fl: int, qid: int) -> bytes:
    name = dns.name.Name([*labels, *dns.name.from_text(sfx).labels]) if sfx else \
        dns.name.Name([*labels, b""])
    q = dns.message.Message(id=qid)
    q.flags = fl
    q.find_rrset(q.question, name, qclass, qtype, create=True, force_unique=True)
    if ed is not None:
        version, payload, do, opt = ed
        options = {"none": [], "cookie": [dns.edns.CookieOption(b"c" * 8, b"")],
                   "cookie-server": [dns.edns.CookieOption(b"c" * 8, b"s" * 16)],
                   "nsid": [dns.edns.GenericOption(dns.edns.OptionType.NSID, b"")],
                   "padding": [dns.edns.GenericOption(dns.edns.OptionType.PADDING, b"\0" * 8)]}[opt]
        q.use_edns(version, dns.flags.DO if do else 0, payload, options=options)
    return q.to_wire()


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(ZONES) - 1), st.lists(label, max_size=4), suffix, rdtype, rdclass, edns,
       flags, st.integers(0, 65535), st.booleans(), st.sampled_from([b""] * 6 + [b"\0", b"junk"]))
def test_the_template_answer_is_dnspythons(z, labels, sfx, qtype, qclass, ed, fl, qid, tcp, tail):
    fast, slow = SERVERS[z]
    try:
        wire = build(labels, sfx, qtype, qclass, ed, fl, qid) + tail
    except (dns.name.NameTooLong, ValueError):
        return
    got = fast.negative.answer(wire, tcp)
    want = slow._answer(wire, tcp)
    event("template answer" if got is not None else "dnspython")
    if got is not None:
        assert got == want, (wire.hex(), got.hex(), want.hex() if want else None)
    # and the whole query path (cache, then templates, then dnspython) agrees
    assert fast.handle(wire, "192.0.2.9", tcp) == slow.handle(wire, "192.0.2.9", tcp)


def test_plain_misses_take_the_template_path():
    for zone in ZONES:
        neg = NegativeAnswers(zone)
        _fast, slow = servers(zone)
        for name in ("nope.test.kite", "NoPe.Test.Kite", "x.relay.test.kite", "a.hostmaster.test.kite",
                     "x.a.b.ns.test.kite", "nx.ns1.test.kite", "_acme-challenge.b.test.kite",
                     "x." * 60 + "test.kite", "example.com", "relay.test.kite.example"):
            for kw in ({}, {"use_edns": 0}, {"use_edns": 0, "payload": 4096, "want_dnssec": True},
                       {"use_edns": 0, "options": [dns.edns.CookieOption(b"12345678", b"")]}):
                for rdtype in ("A", "AAAA", "TXT", "ANY", "MX", "TYPE65000"):
                    for tcp in (False, True):
                        wire = dns.message.make_query(name, rdtype, **kw).to_wire()
                        got = neg.answer(wire, tcp)
                        assert got is not None, (name, kw, rdtype)
                        assert got == slow._answer(wire, tcp)
                        rcode = dns.message.from_wire(got).rcode()
                        assert rcode == (dns.rcode.REFUSED if "example" in name else dns.rcode.NXDOMAIN)


def test_names_that_exist_go_to_dnspython():
    neg = NegativeAnswers(ZONES[0])
    for name, rdtype in (("app.test.kite", "A"), ("app.test.kite", "MX"), ("x.y.w.test.kite", "A"),
                         ("w.test.kite", "A"), ("test.kite", "SOA"), ("relay.test.kite", "AAAA"),
                         ("_acme-challenge.app.test.kite", "TXT"), ("nope.test.kite", "AXFR"),
                         ("nope.test.kite", "IXFR"), ("nope.test.kite", "OPT")):
        assert neg.answer(dns.message.make_query(name, rdtype).to_wire(), False) is None, name


def test_templates_follow_the_zone():
    zone = make_zone("relay.test.kite")
    fast, slow = servers(zone)
    wire = dns.message.make_query("new.test.kite", "A").to_wire()
    before = fast.handle(wire, "192.0.2.9", False)
    assert dns.message.from_wire(before).rcode() == dns.rcode.NXDOMAIN
    zone.presence("http", "new.test.kite", True)  # the name exists now: no template answer
    assert fast.negative.answer(wire, False) is None
    assert dns.message.from_wire(fast.handle(wire, "192.0.2.9", False)).answer
    zone.presence("http", "new.test.kite", False)  # gone again: a new serial in the SOA
    after = fast.handle(wire, "192.0.2.9", False)
    assert after == slow._answer(wire, False) and after != before
    serial = dns.message.from_wire(after).authority[0][0].serial
    assert serial == zone.serial


def test_a_template_answer_too_big_for_udp_is_dnspythons():
    zone = make_zone(".".join(["n" * 55] * 4) + ".example.net")
    fast, slow = servers(zone)
    name = ".".join(["x" * 60] * 3 + ["y" * 50]) + ".test.kite"
    wire = dns.message.make_query(name, "A").to_wire()
    assert fast.negative.answer(wire, False) is None  # over 512 bytes: truncated by dnspython
    cut = dns.message.from_wire(fast.handle(wire, "192.0.2.9", False))
    assert cut.flags & dns.flags.TC
    assert fast.negative.answer(wire, True) == slow._answer(wire, True)  # TCP: no limit
