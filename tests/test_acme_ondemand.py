"""Certificates on demand (kite.certs.ondemand): HTTP-01 for kites under their own names.

Pebble (tests/test_acme.py's fixture) resolves every name through a tiny DNS server of the
test that answers 127.0.0.1 for any A query, and checks each HTTP-01 challenge by asking
``http://NAME:httpPort/.well-known/acme-challenge/TOKEN``: the relay listens on that port,
so the CA's request reaches the relay's own answer, through the real path.
"""

from __future__ import annotations

import asyncio
import glob
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import threading
import time

import pytest

from kite.certs.ondemand import ACME_CHALLENGE_PATH, OnDemandCertificates
from kite.errors import ConfigError
from support import KITE, SECRET, Proc, free_port, make_certs, run
from test_acme import pebble  # noqa: F401  (the fixture)
from test_relay_https import origin  # noqa: F401  (the fixture)

OWN = "www.example.org"  # a kite under its user's own domain
SECOND = "shop.example.org"  # another kite flying here
THIRD = "blog.example.org"  # and a third
IDLE = "idle.example.org"  # granted, but no backend flies it
WILD = "*.wild.example.net"  # a wildcard kite: its names are never ordered


@pytest.fixture
def any_name_dns():
    """A DNS server on a thread (dnspython) that answers 127.0.0.1 to every A question and
    nothing to the others; yields its UDP port."""
    import dns.flags
    import dns.message
    import dns.rdatatype
    import dns.rrset

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue
            reply = dns.message.make_response(query)
            reply.flags |= dns.flags.AA
            for q in query.question:
                if q.rdtype == dns.rdatatype.A:
                    reply.answer.append(dns.rrset.from_text(q.name, 60, "IN", "A", "127.0.0.1"))
            sock.sendto(reply.to_wire(), addr)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join(5)
    sock.close()


def curl_plain(port: int, name: str, path: str = "/"):
    out = subprocess.run(["curl", "-sS", "-i", "--max-time", "30", "--resolve",
                          f"{name}:{port}:127.0.0.1", f"http://{name}:{port}{path}"],
                         capture_output=True, timeout=40)
    return out.returncode, out.stdout.decode(errors="replace"), out.stderr.decode(errors="replace")


def curl(port: int, name: str, cacert: str):
    out = subprocess.run(["curl", "-sS", "-i", "--max-time", "30", "--cacert", cacert,
                          "--resolve", f"{name}:{port}:127.0.0.1", f"https://{name}:{port}/"],
                         capture_output=True, timeout=40)
    return out.returncode, out.stdout.decode(errors="replace"), out.stderr.decode(errors="replace")


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- a real relay ------------------------------------------------------------------------------
def test_kite_under_its_own_domain_gets_a_certificate_on_demand(tmp_path, pebble,  # noqa: F811
                                                                 any_name_dns, origin):  # noqa: F811
    """The first TLS visitor of www.example.org waits for the order and is served with the
    new certificate (verified against Pebble's root); a plain visitor's Host starts an order
    too; names no kite of the relay flies, a wildcard kite's names and names over the hourly
    bound get no order; a restart serves the stored certificate without one."""
    peb = pebble(any_name_dns)
    port = json.loads(peb.config.read_text())["pebble"]["httpPort"]  # where the CA asks
    root = peb.root(tmp_path)
    own = make_certs(tmp_path)  # the relay's own certificate (tunnels)
    state = tmp_path / "state"
    argv = [*KITE, "relay", "--listen", f"127.0.0.1:{port}", "--tls-cert", own.cert,
            "--tls-key", own.key, "-v", "--acme", peb.directory, "--acme-email",
            "ops@example.org", "--acme-ca", peb.ca, "--acme-on-demand",
            "--acme-on-demand-per-hour", "2", "--state-dir", str(state)]
    for name in (OWN, SECOND, THIRD, IDLE, WILD):
        argv += ["--kite", f"http:{name}:{SECRET}"]
    procs: list[Proc] = []

    def start(name: str, args: list) -> Proc:
        p = Proc(args, tmp_path, name, env={"KITE_SECRET": SECRET})
        procs.append(p)
        return p

    try:
        relay = start("relay", argv)
        relay.wait_for("relay listening on", timeout=30)
        for i, name in enumerate((OWN, SECOND, THIRD, WILD)):
            start(f"expose{i}", [*KITE, "expose", f"http://127.0.0.1:{origin}", name,
                                 "--relay", f"127.0.0.1:{port}", "--fingerprint",
                                 own.fingerprint, "-v"]).wait_for("flying", timeout=30)

        # The first visitor starts the order, waits for it and is served over HTTPS.
        rc, out, err = curl(port, OWN, root)
        assert rc == 0, err + relay.output()
        assert out.startswith("HTTP/1.1 200") and "X-Forwarded-Proto: https" in out, out
        log = relay.output()
        assert f"acme: http-01: serving the key authorization at {OWN}{ACME_CHALLENGE_PATH}" in log
        assert "acme: http-01: answered" in log
        assert f"acme: certificate for {OWN} installed" in log
        (folder,) = glob.glob(str(state / "acme" / "*" / "on-demand" / OWN))
        for f in ("cert.pem", "cert.key"):
            assert mode(os.path.join(folder, f)) == 0o600, f
        assert mode(folder) == 0o700
        assert "PRIVATE KEY" not in log
        # Once the order is over, the challenge path is the kite's again.
        rc, out, _ = curl_plain(port, OWN, ACME_CHALLENGE_PATH + "abc")
        assert rc == 0 and f"GET {ACME_CHALLENGE_PATH}abc HTTP/1.1" in out, out

        # A plain visitor is served as ever, and its Host starts the order.
        rc, out, _ = curl_plain(port, SECOND)
        assert rc == 0 and out.startswith("HTTP/1.1 200"), out
        relay.wait_for(f"acme: certificate for {SECOND} installed", timeout=60)
        rc, out, err = curl(port, SECOND, root)
        assert rc == 0 and "X-Forwarded-Proto: https" in out, err

        # No order for names no kite of the relay flies, for a wildcard kite's names, nor
        # past the hourly bound (2): those visitors get the alert at once.
        for name in ("nokite.example.org", IDLE, "a.wild.example.net", THIRD):
            rc, _, err = curl(port, name, root)
            assert rc != 0 and "unrecognized name" in err.lower(), (name, err)
        log = relay.output()
        assert log.count("acme: ordering a certificate") == 2, log
        assert f"acme_on_demand_per_hour = 2): no order for {THIRD}" in log
        assert curl(port, OWN, root)[0] == 0  # the certificates stay in service

        # A restart installs the stored certificate: served at once, no order.
        relay.stop(signal.SIGTERM)
        relay = start("relay-again", argv)
        # (The stored certificates load just after the listening sockets open.)
        relay.wait_for("acme: using the stored certificate", timeout=30)
        deadline = time.monotonic() + 60  # until the backend has flown the kite again
        while (got := curl(port, OWN, root))[0] != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert got[0] == 0 and got[1].startswith("HTTP/1.1 200"), got[2] + relay.output()
        assert "acme: ordering" not in relay.output()
    finally:
        for p in procs:
            p.stop(signal.SIGKILL)


@pytest.mark.slow
def test_renewed_at_two_thirds_and_renewals_count_toward_the_bound(tmp_path, pebble,  # noqa: F811
                                                                   any_name_dns, origin):  # noqa: F811
    """Pebble issues 20-second certificates: the on-demand one is renewed at 13 s and new
    handshakes get the new one; the next renewal is the third order of the hour, over the
    bound (2): deferred, in one warning."""
    from test_acme import served_serial

    peb = pebble(any_name_dns, validity=20)
    port = json.loads(peb.config.read_text())["pebble"]["httpPort"]
    root = peb.root(tmp_path)
    own = make_certs(tmp_path)
    procs = [Proc([*KITE, "relay", "--listen", f"127.0.0.1:{port}", "--tls-cert", own.cert,
                   "--tls-key", own.key, "-v", "--acme", peb.directory, "--acme-email",
                   "ops@example.org", "--acme-ca", peb.ca, "--acme-on-demand",
                   "--acme-on-demand-per-hour", "2", "--state-dir", str(tmp_path / "state"),
                   "--kite", f"http:{OWN}:{SECRET}"], tmp_path, "relay")]
    try:
        relay = procs[0]
        relay.wait_for("relay listening on", timeout=30)
        procs.append(Proc([*KITE, "expose", f"http://127.0.0.1:{origin}", OWN, "--relay",
                           f"127.0.0.1:{port}", "--fingerprint", own.fingerprint, "-v"],
                          tmp_path, "expose", env={"KITE_SECRET": SECRET}))
        procs[1].wait_for("flying", timeout=30)
        assert curl(port, OWN, root)[0] == 0
        first = served_serial(port, root, OWN)
        installed = f"acme: certificate for {OWN} installed"
        deadline = time.monotonic() + 60
        while relay.output().count(installed) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert relay.output().count(installed) == 2, relay.output()
        assert served_serial(port, root, OWN) != first
        out = relay.wait_for(f"acme_on_demand_per_hour = 2): no order for {OWN}", timeout=60)
        assert out.count("acme: ordering a certificate") == 2
    finally:
        for p in procs:
            p.stop(signal.SIGKILL)


# -- the rules, in process (no CA: every order fails at once) ----------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def make(tmp_path, flying, *, per_hour=2, zone="kites.example.com", clock=None):
    return OnDemandCertificates(
        f"https://127.0.0.1:{free_port()}/dir", "ops@example.org", state_dir=str(tmp_path),
        flies=lambda n: n in flying, covered=lambda n: False,
        on_certificate=lambda c, k: None, per_hour=per_hour, zone=zone,
        clock=clock or Clock(), retry_first=3600, retry_max=3600)


def test_only_names_a_kite_flies_outside_the_zone_are_taken(tmp_path):
    flying = {"www.example.org", "app.kites.example.com", "10.0.0.1"}

    async def main():
        od = make(tmp_path, flying)
        await od.start()
        try:
            assert od.refusal("nokite.example.org") == "no kite of this relay flies it"
            assert od.refusal("app.kites.example.com").startswith("in the zone")
            assert od.refusal("10.0.0.1").startswith("not a host name")
            for bad in ("*.example.org", "a..b.org", "-a.example.org", "x" * 64 + ".org"):
                assert od.refusal(bad) is not None, bad
            assert od.request("nokite.example.org") is None and not od.names
            waiter = od.request("WWW.example.org.")  # SNI and Host, as visitors write them
            assert waiter is not None and list(od.names) == ["www.example.org"]
            assert od.request("www.example.org") is waiter  # one order per name at a time
            assert await asyncio.wait_for(waiter, 30) is False  # no CA: no certificate
            # Backing off after the failure: nothing to wait for, no second order.
            assert od.request("www.example.org") is None
            assert od.names["www.example.org"].manager.orders == 1
        finally:
            await od.close()

    run(main, "asyncio", timeout=60)


def test_the_hourly_bound_holds(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kite.certs")
    names = [f"n{i}.example.org" for i in range(5)]
    clock = Clock()

    async def main():
        od = make(tmp_path, set(names), per_hour=2, clock=clock)
        await od.start()
        try:
            assert od.request(names[0]) is not None and od.request(names[1]) is not None
            assert od.request(names[2]) is None and od.request(names[3]) is None
            assert sorted(od.names) == names[:2]
            lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                     and "acme_on_demand_per_hour" in r.getMessage()]
            assert len(lines) == 1 and "no order for n2.example.org" in lines[0]  # one line
            clock.now += 3600  # the window has moved on
            assert od.request(names[2]) is not None and od.request(names[3]) is not None
            assert od.request(names[4]) is None
            assert sorted(od.names) == names[:4]
        finally:
            await od.close()

    run(main, "asyncio", timeout=60)


def test_http01_answers_only_the_pending_token_of_its_name(tmp_path):
    od = make(tmp_path, set())
    path = ACME_CHALLENGE_PATH + "tok-EN_1"
    assert od.http01("www.example.org", path) is None
    od._publish("www.example.org" + path, ["tok-EN_1.thumbprint"])
    reply = od.http01("WWW.example.org", path)
    assert reply is not None and reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert reply.endswith(b"\r\n\r\ntok-EN_1.thumbprint") and b"Content-Length: 19\r\n" in reply
    assert od.http01("other.example.org", path) is None
    assert od.http01("www.example.org", ACME_CHALLENGE_PATH + "other") is None
    assert od.http01("www.example.org", "/index.html") is None
    od._withdraw("www.example.org" + path, ["tok-EN_1.thumbprint"])
    assert od.http01("www.example.org", path) is None


# -- options and keys ------------------------------------------------------------------------
def test_on_demand_options_and_keys(tmp_path):
    from kite.relay.config import build_relay_config

    ca = make_certs(tmp_path, stem="ca")
    base = (f'kite = [{{domain = "{OWN}", secret = "{SECRET}"}}]\n'
            f'acme = "https://ca.example/dir"\nacme_email = "ops@example.org"\n'
            f'acme_ca = "{ca.cert}"\nstate_dir = "{tmp_path / "st"}"\n')
    toml = tmp_path / "relay.toml"
    toml.write_text(base + "acme_on_demand = true\n")
    cfg = build_relay_config(config_file=str(toml))  # no --dns/--zone: on demand only
    assert cfg.acme is not None and cfg.acme.zone is None
    assert (cfg.acme.on_demand, cfg.acme.on_demand_per_hour) == (True, 10)
    toml.write_text(base + "acme_on_demand = true\nacme_on_demand_per_hour = 3\n")
    assert build_relay_config(config_file=str(toml)).acme.on_demand_per_hour == 3
    toml.write_text(base)  # off by default: the zone's DNS is needed again
    with pytest.raises(ConfigError) as info:
        build_relay_config(config_file=str(toml))
    assert info.value.key == "--acme"

    # Bad values: exit 2, one line naming the key and the fix.
    for extra, key in (('acme_on_demand = "yes"\n', "acme_on_demand: expected true or false"),
                       ("acme_on_demand = true\nacme_on_demand_per_hour = 0\n",
                        "acme_on_demand_per_hour: bad value 0"),
                       ('acme_on_demand = true\nacme_on_demand_per_hour = "10"\n',
                        "acme_on_demand_per_hour: bad value '10'"),
                       ("acme_on_demand_per_hour = 5\n",
                        "acme_on_demand_per_hour: only means something with acme_on_demand")):
        toml.write_text(base + extra)
        r = subprocess.run([*KITE, "relay", "--listen", "127.0.0.1:0", "--config", str(toml)],
                           capture_output=True, text=True, timeout=30)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and key in lines[0], (extra, r.stderr)
    r = subprocess.run([*KITE, "relay", "--listen", "127.0.0.1:0", "--kite",
                        f"http:{OWN}:{SECRET}", "--acme-on-demand"],
                       capture_output=True, text=True, timeout=30)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and \
        "--acme-on-demand: only means something with --acme" in lines[0], r.stderr


def test_an_on_demand_certificate_never_becomes_the_relays_own(tmp_path):
    """Installed ``kite_only``, a kite's certificate answers its name by SNI, but a relay
    without a certificate of its own stays without one (plain tunnels, no-SNI hellos)."""
    from kite.certs import CertStore

    kite = make_certs(tmp_path, names=(OWN,), stem="kite")
    relay = make_certs(tmp_path, names=("relay.example.net",), stem="relay")
    store = CertStore()
    store.install(kite.cert, kite.key, kite_only=True)
    assert store.default is None and store.covers(OWN) and store.context_for(OWN) is not None
    assert store.reload() == 1 and store.default is None  # still kite-only when reloaded
    store.install(relay.cert, relay.key)
    assert store.default is not None and store.default.cert_path == relay.cert
    assert store.pair_for(OWN).cert_path == kite.cert
