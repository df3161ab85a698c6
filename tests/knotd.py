"""A real Knot DNS server (Debian ``knot``) for the tests: its own config, rundir, storage,
zone file and TSIG key in a temporary directory, on a loopback port, started and killed by
PID by the test (the packaged service, if any, is never touched)."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Optional

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from support import Proc, free_port

ZONE_FILE = """$ORIGIN {zone}.
$TTL 60
@ 30 IN SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 30
@ 3600 IN NS ns.{zone}.
ns IN A 127.0.0.1
{extra}
"""

CONFIG = """server:
    rundir: {dir}
    listen: 127.0.0.1@{port}
    udp-workers: {workers}
    tcp-workers: 1
    background-workers: 1
database:
    storage: {dir}
key:
  - id: {key_name}
    algorithm: hmac-sha256
    secret: {secret}
acl:
  - id: kite-update
    key: {key_name}
    action: update
zone:
  - domain: {zone}
    file: {dir}/{zone}.zone
    acl: kite-update
log:
  - target: stderr
    any: info
"""


def knotd_path() -> str:
    exe = shutil.which("knotd") or ("/usr/sbin/knotd" if os.path.exists("/usr/sbin/knotd") else None)
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("knotd must be installed in CI (apt-get install knot)")
        pytest.skip("knotd (Debian knot) not installed")
    return exe


class Knot:
    """``knotd -c CONF`` for ``zone`` with a TSIG key allowed to update it."""

    def __init__(self, tmp_path: Path, zone: str = "test.kite", key_name: str = "kite-update",
                 extra: str = "", workers: int = 1) -> None:
        self.exe = knotd_path()
        self.dir = tmp_path / "knot"
        self.dir.mkdir(exist_ok=True)
        self.tmp_path = tmp_path
        self.zone = zone
        self.key_name = key_name
        self.secret = base64.b64encode(os.urandom(32)).decode()
        self.port = free_port()
        (self.dir / f"{zone}.zone").write_text(ZONE_FILE.format(zone=zone, extra=extra))
        self.conf = self.dir / "knot.conf"
        self.conf.write_text(CONFIG.format(dir=self.dir, port=self.port, zone=zone, workers=workers,
                                           key_name=key_name, secret=self.secret))
        self.proc: Optional[Proc] = None
        self.starts = 0

    @property
    def tsig(self) -> str:
        return f"{self.key_name}:hmac-sha256:{self.secret}"

    def key_file(self, secret: Optional[str] = None) -> str:
        path = self.tmp_path / f"tsig-{self.starts}-{secret is None}.key"
        path.write_text(f"{self.key_name}:hmac-sha256:{secret or self.secret}\n")
        path.chmod(0o600)
        return str(path)

    def start(self, timeout: float = 20.0) -> None:
        self.starts += 1
        self.proc = Proc([self.exe, "-c", str(self.conf)], self.tmp_path, f"knotd{self.starts}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.proc.poll() is not None:
                raise AssertionError(f"knotd exited:\n{self.proc.output()}")
            try:
                self.query(self.zone, "SOA")
                return
            except (OSError, dns.exception.DNSException):
                time.sleep(0.05)
        raise AssertionError(f"knotd does not answer:\n{self.proc.output()}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(signal.SIGTERM)
            self.proc = None

    def query(self, name: str, rdtype: str = "A") -> list:
        """The values of ``name``'s RRset (sorted; [] for NXDOMAIN or NODATA), over TCP."""
        q = dns.message.make_query(name, rdtype)
        r = dns.query.tcp(q, "127.0.0.1", port=self.port, timeout=2)
        if r.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            raise AssertionError(f"knot answered {dns.rcode.to_text(r.rcode())} for {name}")
        return sorted(rd.to_text() for rrset in r.answer for rd in rrset)

    def wait_for(self, name: str, rdtype: str, want: list, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        got: list = []
        while time.monotonic() < deadline:
            got = self.query(name, rdtype)
            if got == want:
                return
            time.sleep(0.05)
        raise AssertionError(f"knot: {name} {rdtype} is {got}, not {want} after {timeout} s")

    def log(self) -> str:
        return self.proc.output() if self.proc else ""
