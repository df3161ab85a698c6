"""kite.certs.acme against Pebble, Let's Encrypt's test ACME server (Debian ``pebble``).

Pebble validates every DNS-01 challenge by asking the relay's own DNS (``-dnsserver``), so
each certificate here went through the real path: both TXT values published on
``_acme-challenge.ZONE`` at once, looked up by the CA, withdrawn.  In-process tests drive
:class:`AcmeManager` step by step with a clock they move; the others run ``kite relay``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from kite.certs.acme import RETRY_FIRST, AcmeManager, load_certificate
from kite.names import NameService
from kite.names.config import NamesConfig
from support import KITE, SECRET, Proc, free_port, make_certs, run, wait_until

ZONE = "acme.test"
NAMES = [ZONE, "*." + ZONE]
CHALLENGE = "_acme-challenge." + ZONE


# -- Pebble ----------------------------------------------------------------------------------
@dataclass
class Pebble:
    proc: Proc
    config: Path
    directory: str  # the ACME directory URL
    management: int  # port of the management API (roots, intermediates)
    ca: str  # the CA file for Pebble's own HTTPS listener

    def root(self, tmp_path: Path) -> str:
        """Pebble's issuing root (new at every start), written to a file; its path."""
        ctx = ssl.create_default_context(cafile=self.ca)
        with urllib.request.urlopen(f"https://127.0.0.1:{self.management}/roots/0",
                                    context=ctx, timeout=10) as r:
            pem = r.read()
        path = tmp_path / f"pebble-root-{self.proc.pid}.pem"
        path.write_bytes(pem)
        return str(path)


@pytest.fixture
def pebble(tmp_path, monkeypatch):
    """``start(dns_port, validity=None)``: a Pebble that validates through 127.0.0.1:dns_port
    (its config written here, its HTTPS certificate made with cryptography); every Pebble
    started is killed by PID at the end."""
    if shutil.which("pebble") is None:
        if os.environ.get("CI"):
            pytest.fail("pebble must be installed in CI (apt-get install pebble)")
        pytest.skip("Debian package pebble not installed")
    monkeypatch.delenv("PEBBLE_VA_ALWAYS_VALID", raising=False)  # validate for real
    tls = make_certs(tmp_path, names=("localhost", "127.0.0.1"), stem="pebble-https")
    started: list = []

    def start(dns_port: int, *, validity=None, config: Path | None = None) -> Pebble:
        if config is None:  # a new config; given one, the same ports again (a restart)
            n = len(started)
            cfg = {"listenAddress": f"127.0.0.1:{free_port()}",
                   "managementListenAddress": f"127.0.0.1:{free_port()}",
                   "certificate": tls.cert, "privateKey": tls.key,
                   "httpPort": free_port(), "tlsPort": free_port(),
                   "ocspResponderURL": "", "externalAccountBindingRequired": False}
            if validity is not None:
                cfg["certificateValidityPeriod"] = validity  # seconds
            config = tmp_path / f"pebble-{n}.json"
            config.write_text(json.dumps({"pebble": cfg}))
        cfg = json.loads(config.read_text())["pebble"]
        proc = Proc(["pebble", "-config", str(config), "-dnsserver", f"127.0.0.1:{dns_port}"],
                    tmp_path, f"pebble-{len(started)}",
                    env={"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0",
                         "PEBBLE_AUTHZREUSE": "0"})  # every order validates both names
        started.append(proc)
        proc.wait_for("ACME directory available at", timeout=30)
        # Pebble logs its management address before a goroutine binds it: wait for it.
        management = int(cfg["managementListenAddress"].rsplit(":", 1)[1])
        wait_until(lambda: _accepts(management), 30, f"pebble's management port {management}")
        return Pebble(proc, config, f"https://{cfg['listenAddress']}/dir",
                      int(cfg["managementListenAddress"].rsplit(":", 1)[1]), tls.cert)

    yield start
    for proc in started:
        proc.stop(signal.SIGKILL)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return False
    return True


# -- checks ----------------------------------------------------------------------------------
def verify_chain(chain_path: str, root_path: str) -> None:
    """The chain verifies against Pebble's root for the zone's names (cryptography's
    verifier: signatures, validity, SAN matching), and names exactly ZONE and *.ZONE."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.verification import PolicyBuilder, Store

    certs = x509.load_pem_x509_certificates(Path(chain_path).read_bytes())
    root = x509.load_pem_x509_certificate(Path(root_path).read_bytes())
    leaf, intermediates = certs[0], certs[1:]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == sorted(NAMES)
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert leaf.public_key().curve.name == "secp256r1"
    for name in (ZONE, "app." + ZONE):
        verifier = PolicyBuilder().store(Store([root])).build_server_verifier(x509.DNSName(name))
        verifier.verify(leaf, intermediates)


RELAY_NAME = "relay." + ZONE  # the relay's own name in the zone (its default NS name)


def served_serial(port: int, root_path: str, name: str = RELAY_NAME) -> int:
    """Shake hands with the relay as ``name`` (SNI), verifying against Pebble's root."""
    from cryptography import x509

    ctx = ssl.create_default_context(cafile=root_path)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def relay_args(dns_port: int, pebble: Pebble, state: Path, *extra: str) -> list:
    return [*KITE, "relay", "--listen", "127.0.0.1:0", "--kite", f"*:*.{ZONE}:{SECRET}",
            "--dns", f"127.0.0.1:{dns_port}", "--zone", ZONE, "--public-ip", "127.0.0.1",
            "--acme", pebble.directory, "--acme-email", "ops@" + ZONE,
            "--acme-ca", pebble.ca, "--state-dir", str(state), "-v", *extra]


def relay_port(out: str) -> int:
    return int(re.search(r"relay listening on 127\.0\.0\.1:(\d+)", out).group(1))


def dig_status(port: int, name: str, rdtype: str) -> str:
    out = subprocess.run(["dig", "+norec", "+time=2", "+tries=2", "-p", str(port), "@127.0.0.1",
                          name, rdtype], capture_output=True, text=True, timeout=20).stdout
    return re.search(r"status: (\w+)", out).group(1)


# -- a real relay process --------------------------------------------------------------------
def test_relay_gets_a_wildcard_certificate_through_its_own_dns_and_reuses_it(tmp_path, pebble):
    dns_port = free_port()  # Pebble must know it before the relay starts
    peb = pebble(dns_port)
    state = tmp_path / "state"
    relay = Proc(relay_args(dns_port, peb, state), tmp_path, "relay")
    try:
        out = relay.wait_for("acme: certificate for", timeout=90)
        # Both challenges (ZONE and *.ZONE) on the one name, published together.
        assert f"acme: dns-01: serving 2 TXT values at {CHALLENGE}" in out
        assert out.count("acme: ordering a certificate") == 1
        assert dig_status(dns_port, CHALLENGE, "TXT") == "NXDOMAIN"  # withdrawn afterwards
        port = relay_port(relay.wait_for("relay listening on"))
        (folder,) = glob.glob(str(state / "acme" / "*"))
        assert mode(str(state / "acme")) == 0o700 and mode(folder) == 0o700
        for name in ("account.key", "account.json", "cert.pem", "cert.key"):
            assert mode(os.path.join(folder, name)) == 0o600, name
        assert not glob.glob(os.path.join(folder, "*.tmp*")) and \
            not glob.glob(os.path.join(folder, "*.new"))
        root = peb.root(tmp_path)
        chain = os.path.join(folder, "cert.pem")
        verify_chain(chain, root)
        stored = load_certificate(chain, os.path.join(folder, "cert.key"))
        assert stored is not None
        assert served_serial(port, root) == stored.serial  # the relay serves it at once
        # No key material in the log.
        for name in ("account.key", "cert.key"):
            body = Path(folder, name).read_text().splitlines()[1]
            assert body not in relay.output()
        assert "PRIVATE KEY" not in relay.output()
        assert relay.stop(signal.SIGTERM) == 0

        # A restart uses the stored certificate: no order, the same certificate served.
        relay = Proc(relay_args(dns_port, peb, state), tmp_path, "relay-again")
        out = relay.wait_for("relay listening on", timeout=30)
        assert "acme: using the stored certificate" in out
        port = relay_port(out)
        assert served_serial(port, root) == stored.serial
        assert "acme: ordering" not in relay.output()
        assert load_certificate(chain, os.path.join(folder, "cert.key")).serial == stored.serial
    finally:
        relay.stop(signal.SIGKILL)


def test_short_lived_certificate_is_renewed_without_dropping_a_tunnel(tmp_path, pebble):
    """Pebble issues 20-second certificates: the relay renews at 13 s, again and again; a
    backend that verified the first one keeps its tunnel, and new handshakes get the new one."""
    dns_port = free_port()
    peb = pebble(dns_port, validity=20)
    root = peb.root(tmp_path)
    web = Proc([sys.executable, "-m", "http.server", str(free_port()), "--bind", "127.0.0.1"],
               tmp_path, "web", env={"PYTHONUNBUFFERED": "1"})
    procs = [web]
    try:
        web_port = int(re.search(r"port (\d+)", web.wait_for("Serving HTTP")).group(1))
        relay = Proc(relay_args(dns_port, peb, tmp_path / "state"), tmp_path, "relay")
        procs.append(relay)
        out = relay.wait_for("acme: certificate for", timeout=90)
        port = relay_port(relay.wait_for("relay listening on"))
        first = served_serial(port, root)
        backend = Proc([*KITE, "expose", f"http://127.0.0.1:{web_port}", "app." + ZONE,
                        "--relay", f"127.0.0.1:{port}", "--ca", root, "--server-name", RELAY_NAME, "-v"],
                       tmp_path, "expose", env={"KITE_SECRET": SECRET})
        procs.append(backend)
        backend.wait_for("flying", timeout=30)
        assert relay.output().count("tunnel up from") == 1
        # The next certificate (ordered at two thirds of 20 s).
        deadline = time.monotonic() + 60
        while relay.output().count("acme: certificate for") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        out = relay.output()
        assert out.count("acme: certificate for") >= 2, out
        assert served_serial(port, root) != first
        # The tunnel made with the first certificate still carries visitors.
        got = subprocess.run(["curl", "-sS", "--max-time", "10", "-H", f"Host: app.{ZONE}",
                              f"http://127.0.0.1:{port}/"], capture_output=True, text=True)
        assert got.returncode == 0 and "Directory listing" in got.stdout, got.stderr
        assert relay.output().count("tunnel up from") == 1
        assert backend.output().count("kite flying") == 1
    finally:
        for p in procs:
            p.stop(signal.SIGKILL)


def test_acme_options_are_checked(tmp_path):
    def kite_relay(*args):
        return subprocess.run([*KITE, "relay", "--listen", "127.0.0.1:0", "--kite",
                               f"*:*.{ZONE}:{SECRET}", *args], capture_output=True, text=True,
                              timeout=30)

    url = "https://127.0.0.1:1/dir"
    for args, key in (
        (["--acme", url, "--acme-email", "a@b.example"], "--acme: needs --dns and --zone"),
        (["--acme", url, "--acme-email", "a@b.example", "--dns", "127.0.0.1:0"], "--zone"),
        (["--acme", "http://ca.example/dir", "--acme-email", "a@b.example", "--dns",
          "127.0.0.1:0", "--zone", ZONE, "--public-ip", "127.0.0.1"], "--acme: 'http://"),
        (["--acme", url, "--dns", "127.0.0.1:0", "--zone", ZONE, "--public-ip", "127.0.0.1"],
         "--acme-email"),
        (["--acme", url, "--acme-email", "a@b.example", "--acme-ca", str(tmp_path / "no.pem"),
          "--dns", "127.0.0.1:0", "--zone", ZONE, "--public-ip", "127.0.0.1"], "--acme-ca"),
        (["--acme-email", "a@b.example"], "--acme-email: only means something with --acme"),
    ):
        r = kite_relay(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and key in lines[0], (args, r.stderr)
    # Without the extra: one line saying how to get it.
    r = subprocess.run([sys.executable, "-c", "import sys; sys.modules['acme'] = None; "
                        "from kite.cli import main; main()", "relay", "--listen", "127.0.0.1:0",
                        "--kite", f"*:*.{ZONE}:{SECRET}", "--acme", url, "--acme-email",
                        "a@b.example", "--dns", "127.0.0.1:0", "--zone", ZONE, "--public-ip",
                        "127.0.0.1"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.strip() == \
        "kite: error: --acme: the acme package is not installed (pip install 'kite-relay[acme]')"
    toml = tmp_path / "relay.toml"
    toml.write_text(f'acme = "{url}"\nacme_email = "a@b.example"\n')
    r = kite_relay("--config", str(toml))
    assert r.returncode == 2 and "--acme: needs --dns and --zone" in r.stderr


# -- the manager, step by step ---------------------------------------------------------------
class Clock:
    """The real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def move_to(self, t: float) -> None:
        self.offset = t - time.time()


def test_renewal_when_due_and_a_failing_ca_keeps_the_old_certificate(tmp_path, pebble, caplog):
    caplog.set_level(logging.INFO, logger="kite.certs")
    dns_port = free_port()
    peb = pebble(dns_port)
    clock = Clock()
    state = tmp_path / "state"

    async def main():
        names = NameService(NamesConfig(listen=[("127.0.0.1", dns_port)], zone=ZONE,
                                        public_ips=["127.0.0.1"]))
        await names.start()
        published, installed = [], []

        def publish(name, values):
            names.publish_txt(name, values)
            published.append((name, list(values), names.zone.txt(name)))

        def manager():
            return AcmeManager(peb.directory, "ops@" + ZONE, state_dir=str(state), names=NAMES,
                               publish_txt=publish, withdraw_txt=names.withdraw_txt,
                               on_certificate=lambda c, k: installed.append(c),
                               ca_file=peb.ca, clock=clock, retry_first=30, retry_max=100)

        try:
            m = manager()
            assert m.load_stored() is None and m.due() == 0
            before = clock()
            wait = await m.step()
            first = m.current
            assert first is not None and m.orders == 1 and installed == [m.cert_path]
            assert first.renew_at - clock() <= wait <= first.renew_at - before  # sleeps till 2/3
            # Both values, on the one name, served together; gone afterwards.
            ((name, values, served),) = published
            assert name == CHALLENGE and len(values) == 2 and sorted(served) == sorted(values)
            assert names.zone.txt(CHALLENGE) == []

            # Not due: nothing happens; a new manager (a restart) reuses what is stored.
            assert await m.step() > 0 and m.orders == 1
            again = manager()
            assert again.load_stored() == first and again.due() > 0 and again.orders == 0
            assert installed == [m.cert_path, m.cert_path]

            # Past two thirds of the lifetime: renewed.
            clock.move_to(first.renew_at + 1)
            assert m.due() == 0
            await m.step()
            second = m.current
            assert m.orders == 2 and second.serial != first.serial and len(installed) == 3

            # The CA is down when the next renewal is due: the old certificate stays, the
            # failure is logged in one line, and retried after 30, 60, 100, 100 s.
            peb.proc.stop(signal.SIGKILL)
            clock.move_to(second.renew_at + 1)
            caplog.clear()
            delays = [await m.step() for _ in range(4)]
            assert delays == [30, 60, 100, 100]
            assert m.current == second and len(installed) == 3
            assert load_certificate(m.cert_path, m.key_path).serial == second.serial
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 4
            assert all("\n" not in w and "still serving the certificate valid until" in w
                       and "Connection refused" in w for w in warnings), warnings

            # The CA is back (a new Pebble on the same ports: it never saw the stored account,
            # so the manager registers again): renewed, and the backoff starts over.
            pebble(dns_port, config=peb.config)
            caplog.clear()
            await m.step()
            assert m.current.serial != second.serial and m.failures == 0 and len(installed) == 4
            assert any("registered account" in r.getMessage() for r in caplog.records)
        finally:
            await names.close()

    run(main, "asyncio", timeout=180)


def test_no_ca_and_no_certificate_yet(tmp_path, caplog):
    """Nothing listens at the directory: no certificate, a one-line warning, a retry."""
    caplog.set_level(logging.INFO, logger="kite.certs")

    async def main():
        m = AcmeManager(f"https://127.0.0.1:{free_port()}/dir", "ops@" + ZONE,
                        state_dir=str(tmp_path / "state"), names=NAMES,
                        publish_txt=lambda n, v: None, withdraw_txt=lambda n, v: None,
                        on_certificate=lambda c, k: None)
        assert m.load_stored() is None
        assert await m.step() == RETRY_FIRST
        assert m.current is None

    run(main, "asyncio")
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "no certificate yet" in line and "retry 2 in 60 s" in line


def test_own_certificate_keeps_its_names_and_acme_answers_the_zone(tmp_path, pebble, loop_kind):
    """With --tls-cert the relay's own certificate still answers its names (pins hold); the
    ACME certificate answers relay.ZONE, which --acme makes one of the relay's names."""
    dns_port = free_port()
    peb = pebble(dns_port)
    own = make_certs(tmp_path)  # localhost, 127.0.0.1
    relay = Proc(relay_args(dns_port, peb, tmp_path / "state", "--tls-cert", own.cert,
                            "--tls-key", own.key, "--loop", loop_kind), tmp_path, "relay")
    try:
        relay.wait_for("acme: certificate for", timeout=90)
        port = relay_port(relay.wait_for("relay listening on"))
        root = peb.root(tmp_path)
        (folder,) = glob.glob(str(tmp_path / "state" / "acme" / "*"))
        acme_cert = load_certificate(os.path.join(folder, "cert.pem"), os.path.join(folder, "cert.key"))
        assert served_serial(port, root) == acme_cert.serial
        ctx = ssl.create_default_context(cafile=own.cert)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
        assert hashlib.sha256(der).hexdigest() == own.fingerprint
    finally:
        relay.stop(signal.SIGKILL)


def test_relay_starts_and_retries_while_the_ca_is_down(tmp_path):
    """No CA at the directory URL: the relay serves (DNS, tunnels) and logs when it retries."""
    dns_port = free_port()
    url = f"https://127.0.0.1:{free_port()}/dir"
    relay = Proc([*KITE, "relay", "--listen", "127.0.0.1:0", "--kite", f"*:*.{ZONE}:{SECRET}",
                  "--dns", f"127.0.0.1:{dns_port}", "--zone", ZONE, "--public-ip", "127.0.0.1",
                  "--acme", url, "--acme-email", "ops@" + ZONE, "--state-dir",
                  str(tmp_path / "state")], tmp_path, "relay")
    try:
        out = relay.wait_for("acme: no certificate from", timeout=60)
        line = [ln for ln in out.splitlines() if "acme: no certificate from" in ln][0]
        assert "Connection refused" in line and "no certificate yet; retry 2 in 60 s" in line
        assert "relay listening on" in out and relay.proc.poll() is None
        assert dig_status(dns_port, ZONE, "SOA") == "NOERROR"
        for rdtype, answer in (("NS", RELAY_NAME + "."), ("A", "127.0.0.1")):
            short = subprocess.run(["dig", "+short", "+norec", "-p", str(dns_port), "@127.0.0.1",
                                    ZONE if rdtype == "NS" else RELAY_NAME, rdtype],
                                   capture_output=True, text=True, timeout=20).stdout.split()
            assert short == [answer], (rdtype, short)
    finally:
        relay.stop(signal.SIGKILL)


def test_relay_toml_keys_and_the_default_state_dir(tmp_path, monkeypatch):
    from kite.relay.config import build_relay_config

    ca = make_certs(tmp_path, stem="ca")
    toml = tmp_path / "relay.toml"
    toml.write_text(f'kite = [{{domain = "*.{ZONE}", secret = "{SECRET}"}}]\n'
                    f'dns = ["127.0.0.1:0"]\nzone = "{ZONE}"\npublic_ips = ["127.0.0.1"]\n'
                    f'acme = "https://ca.example/dir"\nacme_email = "ops@{ZONE}"\n'
                    f'acme_ca = "{ca.cert}"\nstate_dir = "{tmp_path / "st"}"\n')
    cfg = build_relay_config(config_file=str(toml))
    assert cfg.acme is not None
    assert (cfg.acme.directory, cfg.acme.email, cfg.acme.zone, cfg.acme.ca_file, cfg.acme.state_dir) \
        == ("https://ca.example/dir", "ops@" + ZONE, ZONE, ca.cert, str(tmp_path / "st"))
    assert cfg.tls_names == [RELAY_NAME]  # the relay's NS name in the zone names it
    # Options win over keys; the state folder defaults to --db's, else $XDG_STATE_HOME/kite.
    cfg = build_relay_config(config_file=str(toml), db=str(tmp_path / "db" / "kite.db"),
                             acme_options={"acme_email": "other@" + ZONE, "state_dir": None})
    assert cfg.acme.email == "other@" + ZONE
    toml.write_text(toml.read_text().replace(f'state_dir = "{tmp_path / "st"}"\n', ""))
    cfg = build_relay_config(config_file=str(toml), db=str(tmp_path / "db" / "kite.db"))
    assert cfg.acme.state_dir == str(tmp_path / "db")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert build_relay_config(config_file=str(toml)).acme.state_dir == str(tmp_path / "xdg" / "kite")
    assert build_relay_config(kites=[f"*:*.{ZONE}:{SECRET}"]).acme is None


# -- a fleet: one relay orders, the fleet's DNS answers, every relay serves it ----------------
def test_fleet_orders_once_and_every_relay_serves_the_certificate(tmp_path, pebble):
    """Three relays on one redis-server.  Pebble asks relay B's DNS, but relay A orders: the
    TXT values reach B through the fleet (confirmed before A answers the challenge).  Relay
    C, started later with --acme too, places no order: it installs the fleet's certificate."""
    from redisd import RedisServer

    redis_server = RedisServer(tmp_path)
    url = redis_server.url(3)
    dns_a, dns_b, dns_c = free_port(), free_port(), free_port()
    peb = pebble(dns_b)
    root = peb.root(tmp_path)
    procs = []

    def relay(name: str, dns_port: int, *extra: str) -> Proc:
        args = [*KITE, "relay", "--listen", "127.0.0.1:0", "--kite", f"*:*.{ZONE}:{SECRET}",
                "--dns", f"127.0.0.1:{dns_port}", "--zone", ZONE, "--public-ip", "127.0.0.1",
                "--redis", url, "--relay-id", name, "-v", *extra]
        p = Proc(args, tmp_path, name)
        procs.append(p)
        return p

    acme = ("--acme", peb.directory, "--acme-email", "ops@" + ZONE, "--acme-ca", peb.ca)
    try:
        b = relay("b", dns_b)  # no --acme: it only answers the CA's questions
        b.wait_for("fleet: relay b")
        a = relay("a", dns_a, *acme, "--state-dir", str(tmp_path / "state-a"))
        out = a.wait_for("acme: certificate for", timeout=90)
        assert out.count("acme: ordering a certificate") == 1
        assert "relays confirmed" not in out  # B confirmed the TXT values in time
        assert f"TXT values at {CHALLENGE} not applied" not in b.output()
        serial = served_serial(relay_port(a.wait_for("relay listening on")), root)
        c = relay("c", dns_c, *acme, "--state-dir", str(tmp_path / "state-c"))
        out = c.wait_for("acme: installed the fleet's certificate", timeout=60)
        assert "acme: ordering" not in c.output()
        assert served_serial(relay_port(out), root) == serial
    finally:
        for p in procs:
            p.stop(signal.SIGKILL)
        redis_server.stop()
