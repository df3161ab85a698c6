"""RFC 2136 push against a real Knot DNS: a real ``kite relay --dns-update`` and real
``kite expose`` processes; the kite's A/AAAA appear in Knot's zone when it flies and go when
it stops; a wrong TSIG key is refused and logged; the relay resyncs after Knot was down and
at its own start (stale names of a killed relay).  The TXT values a NameService publishes
(ACME DNS-01 challenges) are pushed, withdrawn value by value and resynced the same way."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import time
from pathlib import Path

import dns.exception
import pytest

from kite.errors import LocalProtocolError
from kite.names.config import NamesConfig, parse_tsig
from kite.names.service import NameService
from knotd import Knot
from support import KITE, SECRET, Proc, make_certs, run

IPS = ["192.0.2.7", "2001:db8::7"]
REGISTRY = "_kite-relay.test.kite"


@pytest.fixture
def knot(tmp_path):
    k = Knot(tmp_path)
    k.start()
    yield k
    k.stop()


class Kites:
    """Relay and backend processes of one test, killed by PID at its end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.certs = make_certs(tmp_path)
        self.procs: list[Proc] = []

    def relay(self, *args: str, loop: str = "auto") -> tuple[Proc, int]:
        proc = Proc([*KITE, "relay", "--listen", "127.0.0.1:0", "--tls-cert", self.certs.cert,
                     "--tls-key", self.certs.key, "--kite", f"*:*.test.kite:{SECRET}",
                     "--kite", f"*:*.other.kite:{SECRET}", "-v", "--loop", loop,
                     *[a for ip in IPS for a in ("--public-ip", ip)], *args],
                    self.tmp_path, f"relay{len(self.procs)}")
        self.procs.append(proc)
        out = proc.wait_for("relay listening on", timeout=30)
        return proc, int(re.search(r"relay listening on 127\.0\.0\.1:(\d+)", out).group(1))

    def expose(self, name: str, port: int, loop: str = "auto") -> Proc:
        proc = Proc([*KITE, "expose", "8080", name, "--relay", f"127.0.0.1:{port}",
                     "--fingerprint", self.certs.fingerprint, "-v", "--loop", loop],
                    self.tmp_path, f"expose{len(self.procs)}", env={"KITE_SECRET": SECRET})
        self.procs.append(proc)
        proc.wait_for("flying", timeout=30)
        return proc

    def close(self) -> None:
        for p in self.procs:
            p.stop(signal.SIGKILL)


@pytest.fixture
def kites(tmp_path):
    k = Kites(tmp_path)
    yield k
    k.close()


def update_args(knot: Knot, key_file: str) -> list:
    return ["--dns-update", f"127.0.0.1:{knot.port}", "--dns-update-zone", "test.kite",
            "--tsig-file", key_file]


def test_records_follow_the_kite(knot, kites, loop_kind):
    relay, port = kites.relay(*update_args(knot, knot.key_file()), loop=loop_kind)
    relay.wait_for("resynced the zone test.kite", timeout=20)
    assert knot.query("app.test.kite") == []
    app = kites.expose("app.test.kite", port, loop=loop_kind)
    knot.wait_for("app.test.kite", "A", ["192.0.2.7"])
    assert knot.query("app.test.kite", "AAAA") == ["2001:db8::7"]
    assert knot.query(REGISTRY, "TXT") == ['"app.test.kite"']
    wild = kites.expose("*.w.test.kite", port, loop=loop_kind)
    knot.wait_for("x.y.w.test.kite", "A", ["192.0.2.7"])  # Knot's own wildcard answers it
    kites.expose("app.other.kite", port, loop=loop_kind)  # outside the zone: not pushed
    app.stop(signal.SIGTERM)
    knot.wait_for("app.test.kite", "A", [])
    assert knot.query("app.test.kite", "AAAA") == []
    wild.stop(signal.SIGTERM)
    knot.wait_for("x.y.w.test.kite", "A", [])
    knot.wait_for(REGISTRY, "TXT", [])
    assert knot.query("app.other.kite.test.kite") == []
    # the secret is neither in the relay's log nor on its command line (ps)
    cmdline = Path(f"/proc/{relay.pid}/cmdline").read_bytes().decode()
    assert knot.secret not in relay.output() and knot.secret not in cmdline
    assert "rejected" not in relay.output() and "unreachable" not in relay.output()
    # a relay stopping (SIGTERM) takes its kites' names with it
    kites.expose("last.test.kite", port, loop=loop_kind)
    knot.wait_for("last.test.kite", "A", ["192.0.2.7"])
    assert relay.stop(signal.SIGTERM) == 0
    assert knot.query("last.test.kite") == [] and knot.query(REGISTRY, "TXT") == []


def test_a_wrong_key_is_refused_and_logged(knot, kites):
    wrong = knot.key_file(secret="d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktMDAwMDA=")
    relay, port = kites.relay(*update_args(knot, wrong))
    out = relay.wait_for("dns update rejected", timeout=20)
    line = next(ln for ln in out.splitlines() if "dns update rejected" in ln)
    assert "BADSIG" in line and "NOTAUTH" in line and f"127.0.0.1:{knot.port}" in line
    kites.expose("app.test.kite", port)
    time.sleep(1.5)
    assert knot.query("app.test.kite") == []
    assert relay.proc.poll() is None  # the relay carries on
    unsigned, uport = kites.relay("--dns-update", f"127.0.0.1:{knot.port}",
                                  "--dns-update-zone", "test.kite")
    kites.expose("app.test.kite", uport)
    line = unsigned.wait_for("dns update rejected", timeout=20)
    assert re.search(r"dns update rejected .*\(rcode (NOTAUTH|REFUSED)\)", line)


def test_resync_after_knot_was_down(knot, kites):
    relay, port = kites.relay(*update_args(knot, knot.key_file()))
    one = kites.expose("one.test.kite", port)
    knot.wait_for("one.test.kite", "A", ["192.0.2.7"])
    knot.stop()
    one.stop(signal.SIGTERM)
    kites.expose("two.test.kite", port)
    relay.wait_for("unreachable", timeout=20)
    knot.start()  # its zone still has one.test.kite (journal and zone file)
    knot.wait_for("two.test.kite", "A", ["192.0.2.7"], timeout=45)
    knot.wait_for("one.test.kite", "A", [])
    assert knot.query(REGISTRY, "TXT") == ['"two.test.kite"']
    assert relay.proc.poll() is None


def test_resync_at_start_removes_what_a_killed_relay_left(knot, kites):
    key = knot.key_file()
    first, port = kites.relay(*update_args(knot, key))
    kites.expose("stale.test.kite", port)
    knot.wait_for("stale.test.kite", "A", ["192.0.2.7"])
    first.stop(signal.SIGKILL)  # no chance to clean up
    assert knot.query("stale.test.kite") == ["192.0.2.7"]
    second, _ = kites.relay(*update_args(knot, key))
    second.wait_for("1 stale removed", timeout=20)
    assert knot.query("stale.test.kite") == [] and knot.query(REGISTRY, "TXT") == []


# -- TXT values (ACME DNS-01 challenges) pushed by an in-process NameService -----------------
CHALLENGE = "_acme-challenge.app.test.kite"


def updater_service(knot: Knot, **kw) -> NameService:
    cfg = NamesConfig(public_ips=list(IPS), update_server=("127.0.0.1", knot.port),
                      update_zone="test.kite", tsig=parse_tsig(knot.tsig), **kw)
    return NameService(cfg)


async def knot_has(knot: Knot, name: str, rdtype: str, want: list, timeout: float = 20.0) -> None:
    """Poll Knot (in a thread: the loop keeps pushing) until ``name rdtype`` is ``want``."""
    deadline = time.monotonic() + timeout
    got: list = []
    while time.monotonic() < deadline:
        try:
            got = await asyncio.to_thread(knot.query, name, rdtype)
        except (OSError, dns.exception.DNSException) as exc:
            got = [repr(exc)]
        if got == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"knot: {name} {rdtype} is {got}, not {want} after {timeout} s")


def registry_txt(knot: Knot) -> list:
    return knot.query(REGISTRY, "TXT")


@pytest.fixture
def knot_manual_txt(tmp_path):
    """Knot whose zone has a TXT value at CHALLENGE that the relay did not publish."""
    k = Knot(tmp_path, extra='_acme-challenge.app IN TXT "by-hand"')
    k.start()
    yield k
    k.stop()


def test_txt_values_are_pushed_added_and_removed(knot_manual_txt, loop_kind):
    knot = knot_manual_txt

    async def main():
        svc = updater_service(knot)
        await svc.start()
        try:
            svc.publish_txt(CHALLENGE, ["token-a", "token-b"])  # several values on one name
            await knot_has(knot, CHALLENGE, "TXT", ['"by-hand"', '"token-a"', '"token-b"'])
            assert '"txt" "_acme-challenge.app.test.kite" "token-a"' in registry_txt(knot)
            svc.withdraw_txt(CHALLENGE, ["token-a"])
            await knot_has(knot, CHALLENGE, "TXT", ['"by-hand"', '"token-b"'])
            svc.publish_txt("Other.Test.Kite.", ["x y \"z\""])  # spaces and quotes survive
            await knot_has(knot, "other.test.kite", "TXT", ['"x y \\"z\\""'])
            svc.withdraw_txt(CHALLENGE)
            svc.withdraw_txt("other.test.kite")
            await knot_has(knot, CHALLENGE, "TXT", ['"by-hand"'])  # not ours: left alone
            await knot_has(knot, "other.test.kite", "TXT", [])
            assert registry_txt(knot) == []
            with pytest.raises(LocalProtocolError):
                svc.publish_txt("app.elsewhere.kite", ["v"])  # outside the update zone
            with pytest.raises(LocalProtocolError):
                svc.publish_txt(CHALLENGE, ["x" * 256])
            assert svc.updater is not None and svc.updater.failures == 0
            svc.publish_txt(CHALLENGE, ["at-close"])
            await knot_has(knot, CHALLENGE, "TXT", ['"at-close"', '"by-hand"'])
            await svc.close()  # a relay stopping takes its TXT values with it
            assert await asyncio.to_thread(knot.query, CHALLENGE, "TXT") == ['"by-hand"']
            assert registry_txt(knot) == []
        finally:
            await svc.close()

    run(main, loop_kind)


def test_txt_resync_after_knot_was_down_and_at_start(knot, caplog):
    async def main():
        svc = updater_service(knot)
        await svc.start()
        try:
            svc.publish_txt(CHALLENGE, ["one", "two"])
            await knot_has(knot, CHALLENGE, "TXT", ['"one"', '"two"'])
            await asyncio.to_thread(knot.stop)
            svc.withdraw_txt(CHALLENGE, ["one"])
            svc.publish_txt(CHALLENGE, ["three"])
            svc.publish_txt("_acme-challenge.b.test.kite", ["four"])
            updater = svc.updater
            assert updater is not None
            deadline = time.monotonic() + 20
            while not updater.failures and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert updater.failures  # the update server is unreachable: it failed, it goes on
            await asyncio.to_thread(knot.start)  # its zone still has "one" and "two"
            await knot_has(knot, CHALLENGE, "TXT", ['"three"', '"two"'], timeout=45)
            await knot_has(knot, "_acme-challenge.b.test.kite", "TXT", ['"four"'])
        finally:
            updater_task = svc.updater._task if svc.updater else None
            if updater_task is not None:  # as if the relay was killed: nothing withdrawn
                updater_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await updater_task
        # a new relay publishing nothing: its resync at start removes what the last one left
        fresh = updater_service(knot)
        await fresh.start()
        try:
            fresh.publish_txt(CHALLENGE, ["five"])
            await knot_has(knot, CHALLENGE, "TXT", ['"five"'])
            await knot_has(knot, "_acme-challenge.b.test.kite", "TXT", [])
            assert registry_txt(knot) == ['"txt" "_acme-challenge.app.test.kite" "five"']
        finally:
            await fresh.close()

    with caplog.at_level(logging.INFO, logger="kite.names"):
        run(main, "asyncio")
    text = caplog.text
    assert "unreachable" in text and "1 stale TXT values removed" in text  # "one"
    assert "3 stale TXT values removed" in text  # "two", "three", "four" of the killed one
    for secret in (knot.secret, "one", "three", "four", "five"):
        assert f'"{secret}"' not in text and f" {secret} " not in text  # values are not logged
