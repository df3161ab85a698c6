"""kite expose against relays that will never take it (kite.backend.failures): a wrong
secret, a name the relay does not carry, a certificate that fails the check, an address
that is not a relay.  Each is reported once with the fix and ends the process with exit 1
after a short bounded retry; a relay that restarts is still waited for forever."""

from __future__ import annotations

import re
import signal
import time

from kite.backend.failures import PERMANENT_ATTEMPTS
from support import KITE, SECRET, Proc, make_certs


def _expose(tmp_path, name, port, *args, secret=SECRET, tag="expose") -> Proc:
    return Proc([*KITE, "expose", "8080", name, "--relay", f"127.0.0.1:{port}", *args],
                tmp_path, tag, env={"KITE_SECRET": secret})


def _exits_1(proc: Proc) -> str:
    try:
        assert proc.proc.wait(60) == 1, proc.output()
    finally:
        proc.stop(signal.SIGKILL)
    out = proc.output()
    assert out.count("kite: error:") == 1, out
    return out


def test_wrong_secret_exits_1_with_the_fix(relay_process, tmp_path):
    relay = relay_process()
    out = _exits_1(_expose(tmp_path, "app.test.kite", relay.port, "--fingerprint",
                           relay.fingerprint, secret="not-the-secret-at-all"))
    assert "the secret is wrong" in out and "--secret-file" in out
    assert out.count("--secret-file FILE or KITE_SECRET") == 1, out  # the fix, once
    assert "not-the-secret-at-all" not in out + relay.log()


def test_name_the_relay_does_not_carry_exits_1(relay_process, tmp_path):
    relay = relay_process()
    out = _exits_1(_expose(tmp_path, "app.elsewhere.example", relay.port, "--fingerprint",
                           relay.fingerprint))
    assert "does not allow this name" in out and "kite relay --kite" in out, out


def test_certificate_from_another_ca_exits_1_and_names_server_name(relay_process, tmp_path):
    relay = relay_process()
    other = make_certs(tmp_path, stem="other")
    out = _exits_1(_expose(tmp_path, "app.test.kite", relay.port, "--ca", other.cert))
    assert "the certificate check failed" in out and "--ca FILE" in out, out
    assert "--server-name NAME" in out, out  # the relay address is an IP
    # The relay says why those handshakes failed: never an empty reason.
    reasons = re.findall(r"TLS handshake failed: ?(.*)", relay.log())
    assert reasons and all(r.strip() for r in reasons), relay.log()


def test_wrong_pin_exits_1(relay_process, tmp_path):
    relay = relay_process()
    out = _exits_1(_expose(tmp_path, "app.test.kite", relay.port, "--fingerprint",
                           "00" * 32))
    assert "does not match the pinned" in out and "--fingerprint" in out, out
    assert "--server-name" not in out  # a pin does not check names


def test_a_plain_http_server_is_not_a_relay(http_origin, tmp_path):
    out = _exits_1(_expose(tmp_path, "app.test.kite", http_origin.port, "--insecure",
                           tag="tls"))
    assert "did not answer in TLS: it is not a kite relay" in out, out
    out = _exits_1(_expose(tmp_path, "app.test.kite", http_origin.port, "--plain",
                           tag="plain"))
    assert "to the tunnel request: it is not a kite relay" in out, out


def test_a_relay_restart_is_waited_for(relay_process, expose_process, http_origin):
    relay = relay_process()
    expose = expose_process(str(http_origin.port), "app.test.kite", relay)
    port = relay.port
    relay.proc.stop(signal.SIGKILL)
    # Far more failed attempts than a permanent failure gets: still trying.
    deadline = time.monotonic() + 60
    while expose.output().count("reconnecting in") < 2 * PERMANENT_ATTEMPTS:
        assert expose.proc.poll() is None, expose.output()
        assert time.monotonic() < deadline, expose.output()
        time.sleep(0.05)
    relay2 = relay_process(listen=f"127.0.0.1:{port}")
    relay2.proc.wait_for("kite online: http:app.test.kite", timeout=30)
    assert expose.proc.poll() is None
    assert "kite: error" not in expose.output()


def test_relay_by_ip_without_that_ip_in_its_certificate(tmp_path):
    """The certificate names only localhost; the backend dials 127.0.0.1 with the right CA:
    the hint is --server-name, and with it the kite flies."""
    certs = make_certs(tmp_path, names=("localhost",), stem="named")
    relay = Proc([*KITE, "relay", "--listen", "127.0.0.1:0", "--tls-cert", certs.cert,
                  "--tls-key", certs.key, "--kite", "*:*.test.kite:" + SECRET], tmp_path,
                 "relay")
    try:
        port = int(re.search(r"relay listening on 127\.0\.0\.1:(\d+)",
                             relay.wait_for("relay listening on")).group(1))
        out = _exits_1(_expose(tmp_path, "app.test.kite", port, "--ca", certs.cert))
        assert "IP address mismatch" in out and "--server-name NAME" in out, out
        ok = _expose(tmp_path, "app.test.kite", port, "--ca", certs.cert, "--server-name",
                     "localhost", tag="named")
        try:
            ok.wait_for("kite flying")
        finally:
            ok.stop(signal.SIGKILL)
    finally:
        relay.stop(signal.SIGKILL)


def test_what_counts_as_permanent():
    from kite.backend.failures import explain_not_a_relay, explain_refusal
    from kite.config import RelaySpec

    relay = RelaySpec(host="relay.example.com", port=443)
    # A relay's bare 503 (an address blocked for a while) is no proof of "not a relay".
    assert explain_not_a_relay(relay, 503, "Unavailable", []) is None
    assert explain_not_a_relay(relay, 200, "OK", []) is None
    assert explain_not_a_relay(relay, 403, "Forbidden", [("X-PageKite-Invalid", "x")]) is None
    assert "not a kite relay" in explain_not_a_relay(relay, 404, "Not Found", [])
    # Quota and days run out and come back: never permanent; one such reason is enough.
    assert explain_refusal(relay, [("http:a", "quota")]) is None
    assert explain_refusal(relay, [("http:a", "signature"), ("http:b", "nodays")]) is None
    assert explain_refusal(relay, []) is None
    assert "secret is wrong" in explain_refusal(relay, [("http:a", "signature")])
