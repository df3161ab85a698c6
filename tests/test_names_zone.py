"""kite.names without sockets: the configuration, the zone's names and answers, and the
query path of the DNS server (bounds, FORMERR, cache, rate limit), fuzzed with Hypothesis."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kite.errors import ConfigError, LocalProtocolError
from kite.names.config import NamesConfig, build_names_config, parse_tsig, read_tsig_file
from kite.names.server import MAX_QUERY, DnsServer, RateLimiter
from kite.names.service import NameService
from kite.names.zone import EDNS_PAYLOAD, Zone
from kite.relay.config import build_relay_config

KEY = "a2l0ZS10ZXN0LWtleS1rZXB0LXNlY3JldC0xMjM0NTY="
V4, V6 = "192.0.2.1", "2001:db8::1"


# -- configuration ------------------------------------------------------------------------------
def test_no_dns_options_no_name_service():
    assert build_names_config({}, {}) is None
    cfg = build_relay_config(kites=["*:*.test.kite:s"])
    assert cfg.names is None


def test_cli_options_build_the_config():
    cfg = build_names_config({}, {"dns": ("127.0.0.1:5353", "[::1]", "53"), "zone": "Test.Kite.",
                                  "public_ip": ("192.0.2.1", "2001:DB8::1", "192.0.2.1"),
                                  "dns_ttl": 30, "dns_rate_limit": 0, "dns_name": ("ns1.test.kite",)})
    assert cfg.listen == [("127.0.0.1", 5353), ("::1", 53), ("0.0.0.0", 53)]
    assert cfg.zone == "test.kite" and cfg.public_ips == ["192.0.2.1", "2001:db8::1"]
    assert (cfg.ttl, cfg.negative_ttl, cfg.rate_limit) == (30, 30, 0)
    assert cfg.ns_names == ["ns1.test.kite"] and cfg.update_server is None


def test_toml_keys_and_options_over_them(tmp_path):
    conf = tmp_path / "relay.toml"
    conf.write_text('dns = ["127.0.0.1:5353"]\nzone = "test.kite"\npublic_ips = ["192.0.2.1"]\n'
                    'dns_ttl = 120\ndns_negative_ttl = 10\ndns_names = ["relay.test.kite"]\n'
                    'dns_update = "127.0.0.1:5300"\ntsig = "k:hmac-sha256:%s"\n'
                    '[[kite]]\ndomain = "*.test.kite"\nsecret = "s"\n' % KEY)
    cfg = build_relay_config(config_file=str(conf), dns_options={"dns_ttl": 5})
    n = cfg.names
    assert n is not None and n.listen == [("127.0.0.1", 5353)] and n.ttl == 5
    assert n.negative_ttl == 10 and n.ns_names == ["relay.test.kite"]
    assert n.update_server == ("127.0.0.1", 5300) and n.update_zone == "test.kite"
    assert n.tsig.name == "k" and n.tsig.algorithm == "hmac-sha256"
    assert KEY not in repr(cfg)  # the secret never shows in a repr (logs)


@pytest.mark.parametrize("cli, key", [
    ({"dns": ("127.0.0.1:53",), "public_ip": ("192.0.2.1",)}, "--zone"),
    ({"dns": ("127.0.0.1:53",), "zone": "test.kite"}, "--public-ip"),
    ({"dns": ("127.0.0.1:53",), "zone": "test.kite", "public_ip": ("300.1.1.1",)}, "--public-ip"),
    ({"dns": ("127.0.0.1:53",), "zone": "bad zone", "public_ip": (V4,)}, "--zone"),
    ({"dns": ("127.0.0.1:53",), "zone": "test.kite", "public_ip": (V4,), "dns_ttl": -1}, "--dns-ttl"),
    ({"zone": "test.kite"}, "--zone"),
    ({"dns_update": "127.0.0.1:53", "public_ip": (V4,)}, "--dns-update-zone"),
    ({"dns_update": "127.0.0.1", "zone": "t.k", "public_ip": (V4,), "tsig": "k:md6:" + KEY}, "--tsig"),
    ({"dns_update": "127.0.0.1", "zone": "t.k", "public_ip": (V4,), "tsig": "k:hmac-sha256:%%"}, "--tsig"),
    ({"dns_update": "127.0.0.1", "zone": "t.k", "public_ip": (V4,), "tsig": "k:hmac-sha256:" + KEY,
      "tsig_file": "/nonexistent"}, "--tsig"),
    ({"dns": ("127.0.0.1:53",), "zone": "t.k", "public_ip": (V4,), "tsig": "k:hmac-sha256:" + KEY},
     "--tsig"),
])
def test_config_errors_name_the_option(cli, key):
    with pytest.raises(ConfigError) as err:
        build_names_config({}, cli)
    assert err.value.key == key
    assert KEY not in str(err.value)


def test_unknown_toml_key_still_refused(tmp_path):
    conf = tmp_path / "relay.toml"
    conf.write_text('dns_zone = "test.kite"\n[[kite]]\ndomain = "*.test.kite"\nsecret = "s"\n')
    with pytest.raises(ConfigError, match="unknown key"):
        build_relay_config(config_file=str(conf))


def test_tsig_files_in_three_formats(tmp_path):
    want = parse_tsig(f"kite-update:hmac-sha256:{KEY}")
    files = {
        "line": f"# the key\nkite-update:hmac-sha256:{KEY}\n",
        "knot": f"# hmac-sha256:kite-update:{KEY}\nkey:\n  - id: kite-update\n"
                f"    algorithm: hmac-sha256\n    secret: {KEY}\n",
        "bind": f'key "kite-update" {{\n\talgorithm hmac-sha256;\n\tsecret "{KEY}";\n}};\n',
    }
    for name, text in files.items():
        p = tmp_path / name
        p.write_text(text)
        assert read_tsig_file(str(p)) == want, name
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="no TSIG key"):
        read_tsig_file(str(tmp_path / "empty"))


# -- the zone ----------------------------------------------------------------------------------
def make_zone(**kw) -> Zone:
    kw.setdefault("ns_names", ["ns1.test.kite"])
    return Zone("test.kite", [V4, V6], **kw)


def ask(zone: Zone, name: str, rdtype="A", **kw) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, **kw)
    return zone.respond(dns.message.from_wire(q.to_wire()))


def addresses(msg) -> list:
    return sorted(rd.to_text() for rrset in msg.answer for rd in rrset)


def test_presence_wildcards_and_empty_non_terminals():
    z = make_zone()
    r = ask(z, "app.test.kite")
    assert r.rcode() == dns.rcode.NXDOMAIN and r.authority[0].rdtype == dns.rdatatype.SOA
    assert r.flags & dns.flags.AA and not r.flags & dns.flags.RA
    serial = z.serial
    assert z.presence("http", "app.test.kite", True) and z.serial > serial
    assert not z.presence("https", "app.test.kite", True)  # a second protocol: no change
    assert addresses(ask(z, "APP.test.kite")) == [V4]
    assert ask(z, "APP.test.kite").answer[0].name == dns.name.from_text("APP.test.kite")
    assert addresses(ask(z, "app.test.kite", "AAAA")) == [V6]
    assert ask(z, "x.app.test.kite").rcode() == dns.rcode.NXDOMAIN
    z.presence("raw-22", "*.w.test.kite", True)
    assert addresses(ask(z, "a.b.w.test.kite")) == [V4]
    nodata = ask(z, "w.test.kite")  # the wildcard's parent exists: NODATA, not NXDOMAIN
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer and nodata.authority
    z.presence("http", "deep.sub.test.kite", True)
    assert ask(z, "sub.test.kite").rcode() == dns.rcode.NOERROR
    z.presence("http", "deep.sub.test.kite", False)
    assert ask(z, "sub.test.kite").rcode() == dns.rcode.NXDOMAIN
    assert not z.presence("http", "app.other.kite", True)  # not in the zone: no change
    serial = z.serial
    assert not z.presence("http", "app.test.kite", False)  # https still flies it
    assert z.presence("https", "app.test.kite", False) and z.serial > serial
    assert ask(z, "app.test.kite").rcode() == dns.rcode.NXDOMAIN
    assert z.flying() == ["*.w.test.kite"]


def test_fleet_addresses_of_other_relays():
    """A fleet: a name answers with the addresses of every relay flying its kite."""
    z = make_zone()
    assert z.fleet("app.test.kite", ["192.0.2.20", "2001:db8::20"])  # on another relay only
    assert addresses(ask(z, "app.test.kite")) == ["192.0.2.20"]
    assert addresses(ask(z, "app.test.kite", "AAAA")) == ["2001:db8::20"]
    assert not z.fleet("app.test.kite", ["2001:db8::20", "192.0.2.20"])  # same set
    z.presence("http", "app.test.kite", True)  # and here
    assert addresses(ask(z, "app.test.kite")) == sorted(["192.0.2.20", V4])
    serial = z.serial
    assert z.fleet("app.test.kite", []) and z.serial > serial  # the other relay is gone
    assert addresses(ask(z, "app.test.kite")) == [V4]
    z.presence("http", "app.test.kite", False)
    assert ask(z, "app.test.kite").rcode() == dns.rcode.NXDOMAIN
    z.fleet("*.w.test.kite", ["192.0.2.21"])  # wildcards and their parents, as for presence
    assert addresses(ask(z, "a.w.test.kite")) == ["192.0.2.21"]
    assert ask(z, "w.test.kite").rcode() == dns.rcode.NOERROR
    z.fleet("*.w.test.kite", [])
    assert ask(z, "w.test.kite").rcode() == dns.rcode.NXDOMAIN
    assert not z.fleet("app.other.kite", ["192.0.2.22"])  # not in the zone


def test_a_wildcard_above_the_zone_covers_it():
    z = make_zone()
    z.presence("http", "*.kite", True)
    assert addresses(ask(z, "anything.test.kite")) == [V4]
    assert addresses(ask(z, "test.kite")) == [V4]


def test_apex_relay_names_refused_and_odd_queries():
    z = Zone("test.kite", [V4], own_names=["relay.test.kite", "relay.elsewhere.example"],
             ns_names=["relay.test.kite", "ns.elsewhere.example"])
    assert addresses(ask(z, "relay.test.kite")) == [V4]
    nodata = ask(z, "relay.test.kite", "AAAA")  # v4 only: NODATA with the SOA
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert nodata.authority[0].rdtype == dns.rdatatype.SOA
    ns = ask(z, "test.kite", "NS")
    assert sorted(addresses(ns)) == ["ns.elsewhere.example.", "relay.test.kite."]
    assert [rr.name.to_text() for rr in ns.additional] == ["relay.test.kite."]  # glue, in zone
    soa = ask(z, "test.kite", "SOA").answer[0][0]
    assert soa.mname.to_text() == "relay.test.kite." and soa.minimum == 30
    assert ask(z, "test.kite").rcode() == dns.rcode.NOERROR and not ask(z, "test.kite").answer
    out = ask(z, "example.com")
    assert out.rcode() == dns.rcode.REFUSED and not out.flags & dns.flags.AA
    assert ask(z, "test.kite", "AXFR").rcode() == dns.rcode.REFUSED
    chaos = dns.message.make_query("version.bind", "TXT", "CH")
    assert z.respond(chaos).rcode() == dns.rcode.REFUSED
    badvers = ask(z, "relay.test.kite", use_edns=1)
    assert badvers.rcode() == dns.rcode.BADVERS and badvers.edns == 0
    edns = ask(z, "relay.test.kite", use_edns=0)
    assert edns.edns == 0 and edns.payload == EDNS_PAYLOAD
    assert ask(z, "relay.test.kite").edns == -1  # no OPT unless the query had one
    notify = dns.message.make_query("test.kite", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    assert z.respond(notify).rcode() == dns.rcode.NOTIMP


def test_any_is_one_rrset():
    z = make_zone()
    z.presence("http", "app.test.kite", True)
    z.publish_txt("app.test.kite", ["v=1"])
    r = ask(z, "app.test.kite", "ANY")
    assert len(r.answer) == 1 and r.answer[0].rdtype == dns.rdatatype.A
    assert ask(z, "test.kite", "ANY").answer[0].rdtype == dns.rdatatype.SOA


def test_txt_publish_and_withdraw():
    z = make_zone()
    name = "_acme-challenge.app.test.kite"
    assert ask(z, name, "TXT").rcode() == dns.rcode.NXDOMAIN
    z.publish_txt(name, ["token-one", "token-two"])
    z.publish_txt(name, ["token-three", "token-one"])
    assert z.txt(name) == ["token-one", "token-two", "token-three"]
    assert sorted(addresses(ask(z, name, "TXT"))) == ['"token-one"', '"token-three"', '"token-two"']
    assert ask(z, "app.test.kite").rcode() == dns.rcode.NOERROR  # empty non-terminal now
    assert ask(z, name, "A").answer == []
    serial = z.serial
    z.withdraw_txt(name, ["token-two"])
    assert z.txt(name) == ["token-one", "token-three"] and z.serial > serial
    z.withdraw_txt(name)
    assert ask(z, name, "TXT").rcode() == dns.rcode.NXDOMAIN
    assert ask(z, "app.test.kite").rcode() == dns.rcode.NXDOMAIN
    with pytest.raises(LocalProtocolError):
        z.publish_txt("_acme-challenge.example.com", ["x"])
    with pytest.raises(LocalProtocolError):
        z.publish_txt(name, ["x" * 256])
    with pytest.raises(LocalProtocolError):
        z.publish_txt(name, [f"v{i}" for i in range(33)])


def test_service_publishes_txt_and_takes_presence_events():
    svc = NameService(NamesConfig(zone="test.kite", public_ips=[V4]),
                      relay_names=["relay.test.kite", "localhost", "127.0.0.1"])
    assert svc.zone is not None and svc.zone.ns_names == ["relay.test.kite"]
    svc.publish_txt("_acme-challenge.test.kite", ["a", "b"])
    assert svc.zone.txt("_acme-challenge.test.kite") == ["a", "b"]
    svc.withdraw_txt("_acme-challenge.test.kite", ["a"])
    assert svc.zone.txt("_acme-challenge.test.kite") == ["b"]

    class Event:
        proto, domain, online = "http", "app.test.kite", True

    svc.on_presence(Event())
    assert svc.zone.flying() == ["app.test.kite"]
    default = NameService(NamesConfig(zone="test.kite", public_ips=[V4]), relay_names=["localhost"])
    assert default.zone.ns_names == ["relay.test.kite"] and "relay.test.kite" in default.zone.own


def test_txt_goes_to_the_zone_the_updater_or_both():
    both = NameService(NamesConfig(zone="test.kite", public_ips=[V4], update_server=("127.0.0.1", 53),
                                   update_zone="kites.test.kite"))
    both.publish_txt("_acme-challenge.app.kites.test.kite", ["t1", "t2"])  # in both zones
    both.publish_txt("_acme-challenge.test.kite", ["t3"])  # served only
    assert both.zone.txt("_acme-challenge.app.kites.test.kite") == ["t1", "t2"]
    assert both.updater.txt("_acme-challenge.app.kites.test.kite") == ["t1", "t2"]
    assert both.zone.txt("_acme-challenge.test.kite") == ["t3"]
    assert both.updater.txt("_acme-challenge.test.kite") == []
    both.withdraw_txt("_acme-challenge.app.kites.test.kite", ["t1"])
    assert both.updater.txt("_acme-challenge.app.kites.test.kite") == ["t2"]
    push = NameService(NamesConfig(public_ips=[V4], update_server=("127.0.0.1", 53),
                                   update_zone="test.kite"))  # --dns-update only: no zone served
    push.publish_txt("_Acme-Challenge.App.Test.Kite.", ["v"])
    assert push.zone is None and push.updater.txt("_acme-challenge.app.test.kite") == ["v"]
    for bad in ("_acme-challenge.example.com", "bad name.test.kite", "*.test.kite"):
        with pytest.raises(LocalProtocolError, match="not a name in the zone"):
            push.publish_txt(bad, ["v"])
    with pytest.raises(LocalProtocolError):
        push.publish_txt("x.test.kite", [f"v{i}" for i in range(33)])
    with pytest.raises(LocalProtocolError, match="no --zone"):
        NameService(NamesConfig()).publish_txt("x.test.kite", ["v"])


# -- the query path ----------------------------------------------------------------------------
def make_server(**kw) -> DnsServer:
    zone = make_zone()
    zone.presence("http", "app.test.kite", True)
    return DnsServer(zone, [], **kw)


def query(name="app.test.kite", rdtype="A", qid=1, **kw) -> bytes:
    q = dns.message.make_query(name, rdtype, **kw)
    q.id = qid
    return q.to_wire()


def test_handle_bounds_garbage_and_responses():
    s = make_server()
    assert s.handle(b"\x00" * 11, "192.0.2.9", False) is None  # shorter than a header
    assert s.handle(query() + b"\x00" * MAX_QUERY, "192.0.2.9", False) is None  # oversized
    garbage = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07"  # a name cut short
    out = dns.message.from_wire(s.handle(garbage, "192.0.2.9", False))
    assert out.id == 0x1234 and out.rcode() == dns.rcode.FORMERR and out.flags & dns.flags.QR
    response = bytearray(query())
    response[2] |= 0x80  # QR: never answer a response (no loops between servers)
    assert s.handle(bytes(response), "192.0.2.9", False) is None
    assert s.handle(b"\x12\x34\x81\x00" + b"\xff" * 20, "192.0.2.9", False) is None
    assert s.stats["failed"] == 0


def test_cache_copies_the_id_and_empties_on_changes():
    s = make_server()
    first = s.handle(query(qid=1), "192.0.2.9", False)
    second = s.handle(query(qid=2), "192.0.2.9", False)
    assert first[2:] == second[2:] and first[:2] == b"\x00\x01" and second[:2] == b"\x00\x02"
    assert len(s._caches[0]) == 1
    s.zone.presence("http", "app.test.kite", False)
    gone = dns.message.from_wire(s.handle(query(qid=3), "192.0.2.9", False))
    assert gone.rcode() == dns.rcode.NXDOMAIN and gone.id == 3
    small = DnsServer(make_zone(), [], cache_size=4)
    for i in range(10):
        small.handle(query(f"n{i}.test.kite"), "192.0.2.9", False)
    assert len(small._caches[0]) <= 4


def test_udp_truncates_to_the_clients_limit():
    s = make_server()
    values = [f"{i:02d}" + "x" * 198 for i in range(8)]
    s.zone.publish_txt("big.test.kite", values)
    for kw, limit in (({}, 512), ({"use_edns": 0, "payload": 4096}, EDNS_PAYLOAD),
                      ({"use_edns": 0, "payload": 1000}, 1000)):
        wire = s.handle(query("big.test.kite", "TXT", **kw), "192.0.2.9", False)
        assert len(wire) <= limit
        out = dns.message.from_wire(wire)
        assert out.flags & dns.flags.TC and out.edns == kw.get("use_edns", -1)
        full = dns.message.from_wire(s.handle(query("big.test.kite", "TXT", **kw), "192.0.2.9", True))
        assert not full.flags & dns.flags.TC and len(full.answer[0]) == 8


def test_rate_limit_per_address():
    s = make_server(rate_limit=5)
    answered = [s.handle(query(qid=i), "198.51.100.1", False) for i in range(8)]
    assert sum(a is not None for a in answered) == 5 and s.stats["limited"] == 3
    assert s.handle(query(), "198.51.100.2", False) is not None  # another address


def test_rate_limiter_memory_is_bounded():
    now = [100.0]
    lim = RateLimiter(2, max_addresses=100, clock=lambda: now[0])
    for i in range(10_000):
        lim.allow(f"10.0.{i // 256}.{i % 256}")
    assert len(lim) <= 101  # 100 addresses and the shared overflow slot
    assert not lim.allow("10.9.9.9")  # the overflow slot is spent
    assert lim.allow("10.0.0.0") and not lim.allow("10.0.0.0")
    now[0] = 101.0  # a new second: everything is forgotten
    assert lim.allow("10.9.9.9") and len(lim) == 1
    assert RateLimiter(0).allow("x")


# -- fuzzing ----------------------------------------------------------------------------------
def _base_queries() -> list:
    out = []
    for name, rdtype in (("app.test.kite", "A"), ("x.test.kite", "AAAA"), ("test.kite", "ANY"),
                         ("example.com", "TXT"), ("test.kite", "SOA")):
        out.append(query(name, rdtype))
        out.append(query(name, rdtype, use_edns=0, payload=1232))
    return out


BASE = _base_queries()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=600),
    st.tuples(st.sampled_from(BASE), st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)),
                                              max_size=6), st.integers(0, 600), st.binary(max_size=40)),
), st.booleans())
def test_fuzz_the_query_path_never_raises(data, tcp):
    s = make_server(rate_limit=0)
    if isinstance(data, tuple):  # a real query with bytes changed, cut and appended
        base, flips, cut, tail = data
        wire = bytearray(base)
        for pos, value in flips:
            if pos < len(wire):
                wire[pos] = value
        data = bytes(wire[:max(cut, 12)]) + tail
    out = s.handle(data, "192.0.2.9", tcp)
    assert s.stats["failed"] == 0
    if out is not None:
        answer = dns.message.from_wire(out)
        assert answer.flags & dns.flags.QR and answer.id == int.from_bytes(data[:2], "big")
        assert tcp or len(out) <= EDNS_PAYLOAD
