"""The relay's DNS against real clients on loopback: ``dig`` (dnsutils) and dnspython's
resolver, over UDP and TCP, with EDNS and without, on uvloop and plain asyncio; and the
presence of a real ``kite expose`` seen by ``dig`` on a real ``kite relay --dns``."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import socket
import subprocess

import dns.asyncresolver
import dns.flags
import dns.message
import dns.rcode
import dns.resolver
import pytest

from kite.names import server as dns_server
from kite.names.config import NamesConfig
from kite.names.service import NameService
from support import KITE, SECRET, Proc, make_certs, run

V4, V6 = "192.0.2.1", "2001:db8::1"
BIG = "big.test.kite"  # TXT values that need more than any UDP answer may carry

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="dig (dnsutils) not installed")


@contextlib.asynccontextmanager
async def name_service(ips=(V4, V6), listen=(("127.0.0.1", 0), ("::1", 0)), **kw):
    kw.setdefault("rate_limit", 0)
    cfg = NamesConfig(listen=list(listen), zone="test.kite", public_ips=list(ips),
                      ns_names=["ns1.test.kite"], **kw)
    svc = NameService(cfg)
    bound = await svc.start()
    svc.presence("http", "app.test.kite", True)
    svc.presence("raw-22", "*.w.test.kite", True)
    svc.publish_txt(BIG, [f"{i:02d}" + "x" * 198 for i in range(20)])
    try:
        yield svc, bound
    finally:
        await svc.close()


class Dig:
    """One dig run, parsed."""

    def __init__(self, out: str) -> None:
        self.out = out
        m = re.search(r"status: (\w+)", out)
        self.status = m.group(1) if m else None
        m = re.search(r";; flags: ([a-z ]*);", out)
        self.flags = set(m.group(1).split()) if m else set()
        self.edns = "OPT PSEUDOSECTION" in out
        self.udp = re.search(r"udp: (\d+)", out)
        self.answer = self._section("ANSWER")
        self.authority = self._section("AUTHORITY")

    def _section(self, name: str) -> list:
        m = re.search(rf";; {name} SECTION:\n(.*?)(?:\n\n|\Z)", self.out, re.S)
        return [line.split() for line in m.group(1).splitlines()] if m else []

    def values(self) -> list:
        return sorted(rr[4] for rr in self.answer)


def dig_args(server, port, *args):
    return ["dig", f"@{server}", "-p", str(port), "+tries=1", "+time=3", *args]


async def dig(port, *args, server="127.0.0.1") -> Dig:
    proc = await asyncio.create_subprocess_exec(*dig_args(server, port, *args),
                                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await proc.communicate()
    return Dig(out.decode())


def test_dig_every_case_udp_tcp_edns(loop_kind):
    async def main():
        async with name_service() as (_svc, bound):
            port = bound[0][1]
            for transport in ("+notcp", "+tcp"):
                for edns in ("+edns=0", "+noedns"):
                    opts = (transport, edns, "+norec")
                    a = await dig(port, "app.test.kite", "A", *opts)
                    assert a.status == "NOERROR" and a.values() == [V4], a.out
                    assert "aa" in a.flags and "ra" not in a.flags and "rd" not in a.flags
                    assert a.edns == (edns == "+edns=0"), a.out
                    if a.edns:
                        assert a.udp.group(1) == "1232"
                    assert (await dig(port, "App.Test.Kite", "AAAA", *opts)).values() == [V6]
                    deep = await dig(port, "a.b.w.test.kite", "A", *opts)
                    assert deep.values() == [V4] and deep.answer[0][0] == "a.b.w.test.kite."
                    miss = await dig(port, "nope.test.kite", "A", *opts)
                    assert miss.status == "NXDOMAIN" and "aa" in miss.flags
                    assert [rr[3] for rr in miss.authority] == ["SOA"] and miss.authority[0][1] == "30"
                    nodata = await dig(port, "app.test.kite", "MX", *opts)
                    assert nodata.status == "NOERROR" and not nodata.answer
                    assert [rr[3] for rr in nodata.authority] == ["SOA"]
                    ent = await dig(port, "w.test.kite", "A", *opts)
                    assert ent.status == "NOERROR" and not ent.answer
                    out = await dig(port, "example.com", "A", *opts)
                    assert out.status == "REFUSED" and "aa" not in out.flags
                    anyq = await dig(port, "app.test.kite", "ANY", *opts)
                    assert len(anyq.answer) == 1 and anyq.answer[0][3] == "A"
                    ns = await dig(port, "test.kite", "NS", *opts)
                    assert ns.values() == ["ns1.test.kite."]
                    rec = await dig(port, "app.test.kite", "A", transport, edns, "+rec")
                    assert "rd" in rec.flags and "ra" not in rec.flags
            six = await dig(bound[1][1], "app.test.kite", "AAAA", server="::1")
            assert six.values() == [V6]
            assert (await dig(bound[1][1], "app.test.kite", "A", "+tcp", server="::1")).values() == [V4]

    run(main, loop_kind)


def test_truncated_answer_is_retried_over_tcp(loop_kind):
    async def main():
        async with name_service() as (_svc, bound):
            port = bound[0][1]
            for edns in ("+noedns", "+edns=0"):
                cut = await dig(port, BIG, "TXT", edns, "+ignore")
                assert "tc" in cut.flags and not cut.answer, cut.out
                full = await dig(port, BIG, "TXT", edns)
                assert "Truncated, retrying in TCP mode" in full.out
                assert "tc" not in full.flags and len(full.answer) == 20
            small = await dig(port, "app.test.kite", "A", "+noedns", "+ignore")
            assert "tc" not in small.flags

    run(main, loop_kind)


def test_dnspython_resolver(loop_kind):
    async def main():
        async with name_service() as (svc, bound), \
                name_service(ips=(V4,), listen=(("127.0.0.1", 0),)) as (_v4only, bound4):
            res = dns.asyncresolver.Resolver(configure=False)
            res.nameservers = ["127.0.0.1"]
            res.port = bound[0][1]
            res.lifetime = 5
            for tcp in (False, True):
                got = await res.resolve("app.test.kite", "A", tcp=tcp)
                assert [r.to_text() for r in got] == [V4] and got.rrset.ttl == 60
                assert got.response.flags & dns.flags.AA
                with pytest.raises(dns.resolver.NXDOMAIN):
                    await res.resolve("gone.test.kite", "A", tcp=tcp)
                big = await res.resolve(BIG, "TXT", tcp=tcp)  # UDP: TC, then TCP
                assert len(big) == 20
            svc.presence("http", "app.test.kite", False)
            with pytest.raises(dns.resolver.NXDOMAIN):
                await res.resolve("app.test.kite", "A")
            res.port = bound4[0][1]
            with pytest.raises(dns.resolver.NoAnswer):  # NODATA: v4-only, AAAA asked
                await res.resolve("app.test.kite", "AAAA")
            assert [r.to_text() for r in await res.resolve("app.test.kite", "A")] == [V4]

    run(main, loop_kind)


def test_presence_and_txt_reach_dns_at_once(loop_kind):
    async def main():
        async with name_service() as (svc, bound):
            port = bound[0][1]
            soa = (await dig(port, "test.kite", "SOA", "+short")).out.split()
            assert (await dig(port, "new.test.kite", "A")).status == "NXDOMAIN"
            svc.presence("https", "new.test.kite", True)
            assert (await dig(port, "new.test.kite", "A")).values() == [V4]
            svc.presence("https", "new.test.kite", False)
            assert (await dig(port, "new.test.kite", "A")).status == "NXDOMAIN"
            later = (await dig(port, "test.kite", "SOA", "+short")).out.split()
            assert int(later[2]) >= int(soa[2]) + 2
            name = "_acme-challenge.app.test.kite"
            svc.publish_txt(name, ["challenge-a", "challenge-b"])
            got = await dig(port, name, "TXT", "+tcp")
            assert got.values() == ['"challenge-a"', '"challenge-b"']
            svc.withdraw_txt(name, ["challenge-a"])
            assert (await dig(port, name, "TXT")).values() == ['"challenge-b"']

    run(main, loop_kind)


def test_bad_input_never_stops_the_server(loop_kind, monkeypatch):
    monkeypatch.setattr(dns_server, "TCP_IDLE", 0.3)

    async def main():
        async with name_service() as (svc, bound):
            host, port = bound[0]
            loop = asyncio.get_running_loop()
            good = dns.message.make_query("app.test.kite", "A").to_wire()
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.setblocking(False)
            udp.connect((host, port))
            for junk in (b"", b"\x00" * 11, b"\xff" * 5000, good[:20], b"\x12\x34" + b"\x00" * 40,
                         bytes([good[0], good[1], good[2] | 0x80]) + good[3:]):
                udp.send(junk)
            udp.send(good)
            answers = []
            deadline = loop.time() + 3
            while loop.time() < deadline and not any(a[:2] == good[:2] and len(a) > 40 for a in answers):
                try:
                    answers.append(udp.recv(4096))
                except BlockingIOError:
                    await asyncio.sleep(0.01)
            assert any(dns.message.from_wire(a).answer for a in answers if a[:2] == good[:2])
            udp.close()
            # TCP: a length past the bound closes the connection
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"\xff\xff" + b"x" * 100)
            assert await asyncio.wait_for(reader.read(), 3) == b""
            writer.close()
            # TCP: pipelined queries, one split byte by byte, answered in order
            reader, writer = await asyncio.open_connection(host, port)
            q1 = dns.message.make_query("app.test.kite", "A")
            q2 = dns.message.make_query("nope.test.kite", "A")
            writer.write(q1.to_wire(prepend_length=True) + q2.to_wire(prepend_length=True)[:3])
            for b in q2.to_wire(prepend_length=True)[3:]:
                writer.write(bytes([b]))
                await writer.drain()
            for q, rcode in ((q1, dns.rcode.NOERROR), (q2, dns.rcode.NXDOMAIN)):
                size = int.from_bytes(await reader.readexactly(2), "big")
                a = dns.message.from_wire(await reader.readexactly(size))
                assert a.id == q.id and a.rcode() == rcode
            assert await asyncio.wait_for(reader.read(), 3) == b""  # idle: closed
            writer.close()
            assert svc.server.stats["failed"] == 0 and svc.server.stats["formerr"] >= 1
            assert (await dig(port, "app.test.kite", "A")).values() == [V4]

    run(main, loop_kind)


def test_rate_limit_ignores_a_flooding_address(loop_kind):
    async def main():
        async with name_service(rate_limit=5) as (svc, bound):
            host, port = bound[0]
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.setblocking(False)
            udp.connect((host, port))
            for i in range(30):
                q = dns.message.make_query("app.test.kite", "A")
                q.id = i
                udp.send(q.to_wire())
            got = 0
            await asyncio.sleep(0.3)
            while True:
                try:
                    udp.recv(4096)
                    got += 1
                except BlockingIOError:
                    break
            udp.close()
            assert got <= 10 and svc.server.stats["limited"] >= 20  # 5 per second (and the next)

    run(main, loop_kind)


# -- a real relay and a real backend -----------------------------------------------------------
def dig_sync(port, *args) -> Dig:
    out = subprocess.run(dig_args("127.0.0.1", port, *args), capture_output=True, text=True,
                         timeout=20)
    return Dig(out.stdout + out.stderr)


def test_presence_with_real_kite_expose(tmp_path, loop_kind):
    certs = make_certs(tmp_path)
    procs = []
    try:
        relay = Proc([*KITE, "relay", "--listen", "127.0.0.1:0", "--tls-cert", certs.cert,
                      "--tls-key", certs.key, "--kite", f"*:*.test.kite:{SECRET}", "-v",
                      "--loop", loop_kind, "--dns", "127.0.0.1:0", "--zone", "test.kite",
                      "--public-ip", "192.0.2.7", "--public-ip", "2001:db8::7",
                      "--tls-name", "relay.test.kite"], tmp_path, "relay")
        procs.append(relay)
        out = relay.wait_for("relay listening on", timeout=30)
        dport = int(re.search(r"dns listening on 127\.0\.0\.1:(\d+)", out).group(1))
        rport = int(re.search(r"relay listening on 127\.0\.0\.1:(\d+)", out).group(1))
        assert dig_sync(dport, "relay.test.kite", "A").values() == ["192.0.2.7"]
        assert dig_sync(dport, "test.kite", "NS", "+short").out.split() == ["relay.test.kite."]
        for name, probe in (("app.test.kite", "app.test.kite"), ("*.w.test.kite", "x.y.w.test.kite")):
            assert dig_sync(dport, probe, "A").status == "NXDOMAIN"
            expose = Proc([*KITE, "expose", "8080", name, "--relay", f"127.0.0.1:{rport}",
                           "--fingerprint", certs.fingerprint, "-v", "--loop", loop_kind],
                          tmp_path, f"expose-{len(procs)}", env={"KITE_SECRET": SECRET})
            procs.append(expose)
            expose.wait_for("flying", timeout=30)
            assert dig_sync(dport, probe, "A").values() == ["192.0.2.7"]  # at once
            assert dig_sync(dport, probe, "AAAA", "+tcp").values() == ["2001:db8::7"]
            offline = relay.output().count("kite offline")
            expose.stop(signal.SIGTERM)
            deadline = 100
            while relay.output().count("kite offline") == offline and deadline:
                subprocess.run(["sleep", "0.05"])
                deadline -= 1
            assert dig_sync(dport, probe, "A").status == "NXDOMAIN"  # at once, no timer
        assert relay.proc.poll() is None
    finally:
        for p in procs:
            p.stop(signal.SIGKILL)


def test_init_relay_with_a_zone_serves_it(tmp_path):
    conf = tmp_path / "conf"
    r = subprocess.run([*KITE, "init", "relay", "--dir", str(conf), "--zone", "init.kite",
                        "--public-ip", "192.0.2.9", "--public-ip", "2001:db8::9"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = (conf / "relay.toml").read_text()
    assert 'zone = "init.kite"' in text and 'domain = "*.init.kite"' in text
    relay = Proc([*KITE, "relay", "--config", str(conf / "relay.toml"), "--listen", "127.0.0.1:0",
                  "--dns", "127.0.0.1:0"], tmp_path, "relay")
    try:
        out = relay.wait_for("relay listening on", timeout=30)
        dport = int(re.search(r"dns listening on 127\.0\.0\.1:(\d+)", out).group(1))
        assert dig_sync(dport, "init.kite", "NS", "+short").out.split() == ["relay.init.kite."]
        assert dig_sync(dport, "relay.init.kite", "A").values() == ["192.0.2.9"]
        assert dig_sync(dport, "relay.init.kite", "AAAA").values() == ["2001:db8::9"]
        assert dig_sync(dport, "app.init.kite", "A").status == "NXDOMAIN"
    finally:
        relay.stop(signal.SIGKILL)
    bad = subprocess.run([*KITE, "init", "relay", "--dir", str(tmp_path / "c2"), "--public-ip",
                          "192.0.2.9"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--public-ip" in bad.stderr
