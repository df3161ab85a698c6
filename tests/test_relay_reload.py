"""SIGHUP reloads a running ``kite relay --config``: new kites and secrets take effect, removed
ones stop flying, nothing else drops (the tunnel of an unchanged kite keeps its TCP
connection), and a broken file is logged in one line while the running config stays."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from support import KITE, Proc, make_certs

KEEP = "keep-secret-0123456789"
GONE = "gone-secret-0123456789"
NEW = "new-secret-01234567890"


def _toml(certs, grants) -> str:
    text = (f'listen = ["127.0.0.1:0"]\ntls_cert = "{os.path.basename(certs.cert)}"\n'
            f'tls_key = "{os.path.basename(certs.key)}"\n')
    for domain, secret in grants:
        text += f'[[kite]]\ndomain = "{domain}"\nsecret = "{secret}"\n'
    return text


def _poll(check, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not seen within {timeout} s: {what}")


def _curl(port: int, host: str) -> str:
    r = subprocess.run(["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w",
                        "%{http_code}", "-H", f"Host: {host}", f"http://127.0.0.1:{port}/"],
                       capture_output=True, text=True)
    return r.stdout


@pytest.fixture
def procs():
    owned: list[Proc] = []
    yield owned
    for p in owned:
        p.stop(signal.SIGKILL)


def test_sighup_reloads_kites_and_keeps_the_rest(tmp_path, procs):
    site = Proc(["python3", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory",
                 str(tmp_path)], tmp_path, "site")
    procs.append(site)
    site_port = int(re.search(r"port (\d+)", site.wait_for("Serving HTTP")).group(1))
    certs = make_certs(tmp_path)
    conf = tmp_path / "relay.toml"
    conf.write_text(_toml(certs, [("*.keep.kite", KEEP), ("*.gone.kite", GONE)]))
    relay = Proc([*KITE, "relay", "--config", str(conf)], tmp_path, "relay")
    procs.append(relay)
    port = int(re.search(r"relay listening on 127\.0\.0\.1:(\d+)",
                         relay.wait_for("relay listening on")).group(1))

    def expose(name, secret):
        p = Proc([*KITE, "expose", str(site_port), name, "--relay", f"127.0.0.1:{port}",
                  "--fingerprint", certs.fingerprint, "--secret", secret], tmp_path, name)
        procs.append(p)
        return p

    keep = expose("a.keep.kite", KEEP)
    gone = expose("b.gone.kite", GONE)
    keep.wait_for("kite flying: http:a.keep.kite")
    gone.wait_for("kite flying: http:b.gone.kite")
    online = re.search(r"kite online: http:a\.keep\.kite via (\S+)", relay.output()).group(1)
    assert _curl(port, "a.keep.kite") == "200" and _curl(port, "b.gone.kite") == "200"

    # Remove *.gone.kite, add *.new.kite, then SIGHUP.
    conf.write_text(_toml(certs, [("*.keep.kite", KEEP), ("*.new.kite", NEW)]))
    os.kill(relay.pid, signal.SIGHUP)
    _poll(lambda: "kite offline: http:b.gone.kite" in relay.output(), "gone kite offline")
    # The reload's own line follows the offline line (read from the pipe as it comes).
    _poll(lambda: "stopped flying: http:b.gone.kite" in relay.output(), "reload logged")
    _poll(lambda: _curl(port, "b.gone.kite") == "404", "gone kite answers 404")
    gone.stop()  # refused now; its retries would count as failed signatures from 127.0.0.1
    new = expose("c.new.kite", NEW)
    new.wait_for("kite flying: http:c.new.kite")
    assert _curl(port, "c.new.kite") == "200"
    # The unchanged kite never left its first tunnel: one "online" line, from the same peer.
    assert _curl(port, "a.keep.kite") == "200"
    assert re.findall(r"kite online: http:a\.keep\.kite via (\S+)", relay.output()) == [online]
    assert "closed" not in keep.output()

    # A broken file: one line in the log, and the running config stays.
    conf.write_text('listen = ["127.0.0.1:0"\n')
    os.kill(relay.pid, signal.SIGHUP)
    line = _poll(lambda: re.search(r".*reload refused.*", relay.output()), "reload refused")
    assert "not valid TOML" in line.group(0)
    conf.write_text(_toml(certs, [("*.keep.kite", KEEP)]) + "[[kite]]\ndomian = \"x\"\n")
    os.kill(relay.pid, signal.SIGHUP)
    _poll(lambda: "did you mean 'domain'" in relay.output(), "unknown key refused")
    assert _curl(port, "c.new.kite") == "200" and _curl(port, "a.keep.kite") == "200"
    assert relay.proc.poll() is None
    assert "Traceback" not in relay.output()
    for secret in (KEEP, GONE, NEW):
        assert secret not in relay.output()


def _https(port: int, host: str, ca: str) -> str:
    """The status of https://HOST/ through the relay, or curl's exit code as "exit N"."""
    r = subprocess.run(["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w",
                        "%{http_code}", "--cacert", ca, "--resolve", f"{host}:{port}:127.0.0.1",
                        f"https://{host}:{port}/"], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else f"exit {r.returncode}"


def test_sighup_adds_and_drops_tls_pairs(tmp_path, procs):
    """A [[tls]] pair added to the config serves its names after SIGHUP (the relay then
    terminates TLS for the http kite it covers), and serves them no more once removed."""
    site = Proc(["python3", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory",
                 str(tmp_path)], tmp_path, "site")
    procs.append(site)
    site_port = int(re.search(r"port (\d+)", site.wait_for("Serving HTTP")).group(1))
    certs = make_certs(tmp_path)
    site_certs = make_certs(tmp_path, names=("*.keep.kite",), stem="site")
    conf = tmp_path / "relay.toml"
    base = _toml(certs, [("*.keep.kite", KEEP)])
    conf.write_text(base)
    relay = Proc([*KITE, "relay", "--config", str(conf)], tmp_path, "relay")
    procs.append(relay)
    port = int(re.search(r"relay listening on 127\.0\.0\.1:(\d+)",
                         relay.wait_for("relay listening on")).group(1))
    backend = Proc([*KITE, "expose", str(site_port), "a.keep.kite", "--relay",
                    f"127.0.0.1:{port}", "--fingerprint", certs.fingerprint, "--secret", KEEP],
                   tmp_path, "backend")
    procs.append(backend)
    backend.wait_for("kite flying: http:a.keep.kite")
    assert _https(port, "a.keep.kite", site_certs.cert).startswith("exit ")  # no certificate

    with_tls = (f'{base}[[tls]]\ncert = "{os.path.basename(site_certs.cert)}"\n'
                f'key = "{os.path.basename(site_certs.key)}"\n')
    conf.write_text(with_tls)
    os.kill(relay.pid, signal.SIGHUP)
    _poll(lambda: "certificate " + site_certs.cert + " added" in relay.output(), "pair added")
    assert _https(port, "a.keep.kite", site_certs.cert) == "200"

    conf.write_text(base)
    os.kill(relay.pid, signal.SIGHUP)
    _poll(lambda: "certificate " + site_certs.cert + " dropped" in relay.output(),
          "pair dropped")
    assert _https(port, "a.keep.kite", site_certs.cert).startswith("exit ")
    assert _curl(port, "a.keep.kite") == "200"  # plain HTTP as before
    assert relay.proc.poll() is None and "Traceback" not in relay.output()
