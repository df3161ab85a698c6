"""RFC 2136 push against a real Knot DNS: a real ``kite relay --dns-update`` and real
``kite expose`` processes; the kite's A/AAAA appear in Knot's zone when it flies and go when
it stops; a wrong TSIG key is refused and logged; the relay resyncs after Knot was down and
at its own start (stale names of a killed relay)."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from knotd import Knot
from support import KITE, SECRET, Proc, make_certs

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
