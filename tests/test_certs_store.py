"""kite.certs.store: choice by SNI, reload from disk, install, expiries (no network)."""

from __future__ import annotations

import os
import ssl
import time

import pytest

from kite.certs import CertStore
from kite.errors import ConfigError
from kite.net.tls import generate_self_signed


def pair(tmp_path, stem, names, key_type="ec"):
    cert, key = str(tmp_path / f"{stem}.crt"), str(tmp_path / f"{stem}.key")
    generate_self_signed(cert, key, list(names), key_type=key_type)
    return cert, key


def der(path):
    return ssl.PEM_cert_to_DER_cert(open(path).read())


def test_exact_then_wildcard_one_label_deep(tmp_path):
    relay = pair(tmp_path, "relay", ["relay.zone", "127.0.0.1"])
    wild = pair(tmp_path, "wild", ["*.zone", "zone"])
    other = pair(tmp_path, "other", ["other.zone"], key_type="rsa")
    store = CertStore([relay, wild, other])
    assert store.default.cert_path == relay[0]
    assert store.pair_for("relay.zone").cert_path == relay[0]
    assert store.pair_for("APP.zone").cert_path == wild[0]
    assert store.pair_for("zone").cert_path == wild[0]
    assert store.pair_for("other.zone").cert_path == other[0]  # exact before wildcard
    assert store.pair_for("a.b.zone") is None  # a wildcard covers one label only
    assert store.pair_for("elsewhere.org") is None
    assert store.pair_for(None) is None
    assert store.pair_for("127.0.0.1").cert_path == relay[0]
    assert not store.covers("a.b.zone")


def test_contexts_are_tls12_plus_with_alpn(tmp_path):
    store = CertStore([pair(tmp_path, "a", ["a.zone"])])
    ctx = store.context_for("a.zone")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert not ctx.options & ssl.OP_NO_TICKET


def test_first_pair_wins_a_shared_name(tmp_path):
    a = pair(tmp_path, "a", ["*.zone"])
    b = pair(tmp_path, "b", ["*.zone", "b.zone"])
    store = CertStore([a, b])
    assert store.pair_for("x.zone").cert_path == a[0]
    assert store.pair_for("b.zone").cert_path == b[0]


def test_bad_file_at_start_is_a_config_error(tmp_path):
    a = pair(tmp_path, "a", ["a.zone"])
    b = pair(tmp_path, "b", ["b.zone"])
    with pytest.raises(ConfigError, match="cannot load"):
        CertStore([(a[0], b[1])])  # key of another certificate
    (tmp_path / "junk.crt").write_text("not a certificate")
    with pytest.raises(ConfigError, match="junk.crt"):
        CertStore([(str(tmp_path / "junk.crt"), a[1])])


def test_reload_picks_up_changed_files_and_keeps_the_old_on_failure(tmp_path, caplog):
    a = pair(tmp_path, "a", ["a.zone"])
    store = CertStore([a], poll_interval=0)
    first = der(a[0])
    assert store.reload(changed_only=True) == 0  # nothing changed
    # a half-written replacement: the new certificate with the old key
    fresh = pair(tmp_path, "fresh", ["a.zone", "new.zone"])
    os.replace(fresh[0], a[0])
    assert store.reload(changed_only=True) == 0
    assert "reload failed, still serving the old one" in caplog.text
    assert store.pair_for("a.zone") is store.default
    assert not store.covers("new.zone")
    assert store.reload(changed_only=True) == 0  # the same failure is not tried again
    os.replace(fresh[1], a[1])  # now the key matches
    assert store.reload(changed_only=True) == 1
    assert store.covers("new.zone")
    assert der(a[0]) != first


def test_install_adds_and_replaces(tmp_path):
    a = pair(tmp_path, "a", ["relay.zone"])
    store = CertStore([a])
    w = pair(tmp_path, "w", ["*.zone"])
    store.install(*w)
    assert store.pair_for("x.zone").cert_path == w[0]
    w2 = pair(tmp_path, "w2", ["*.zone", "extra.org"])
    os.replace(w2[0], w[0])
    os.replace(w2[1], w[1])
    store.install(*w)
    assert len(store.pairs) == 2
    assert store.covers("extra.org")
    bad = pair(tmp_path, "bad", ["bad.org"])
    with pytest.raises(ConfigError):
        store.install(bad[0], a[1])
    assert not store.covers("bad.org")


def test_expiries(tmp_path):
    a = pair(tmp_path, "a", ["a.zone"])
    store = CertStore([a])
    exp = store.expiries()
    assert list(exp) == [a[0]]
    assert 800 * 86400 < exp[a[0]] - time.time() < 826 * 86400


def test_an_empty_store_serves_nothing_until_a_pair_is_installed(tmp_path):
    store = CertStore()
    assert store.default is None and not store.covers("a.zone") and store.expiries() == {}
    assert store.reload() == 0
    a = pair(tmp_path, "a", ["*.zone"])
    store.install(*a)
    assert store.default.cert_path == a[0] and store.covers("x.zone")


def test_an_encrypted_key_is_an_error_not_a_prompt(tmp_path):
    from cryptography.hazmat.primitives import serialization

    cert, key = pair(tmp_path, "enc", ["enc.zone"])
    private = serialization.load_pem_private_key(open(key, "rb").read(), None)
    with open(key, "wb") as f:
        f.write(private.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.BestAvailableEncryption(b"passphrase")))
    with pytest.raises(ConfigError, match="cannot load"):
        CertStore([(cert, key)])


def test_configure_adds_and_drops_pairs_and_keeps_installed_ones(tmp_path, caplog):
    """SIGHUP with a changed list of pairs: a new pair serves at once, a dropped one no
    longer does, ACME's installed pair stays, the relay's own stays first (a new first
    pair waits for a restart), a pair that does not load is left out."""
    own = pair(tmp_path, "own", ["relay.zone"])
    b = pair(tmp_path, "b", ["b.zone"])
    store = CertStore([own, b], poll_interval=0)
    acme = pair(tmp_path, "acme", ["*.auto.zone"])
    store.install(*acme)
    c = pair(tmp_path, "c", ["c.zone"])
    added, dropped = store.configure([own, c])
    assert (added, dropped) == ([c[0]], [b[0]])
    assert store.covers("c.zone") and not store.covers("b.zone")
    assert store.pair_for("x.auto.zone").cert_path == acme[0]  # installed: stays
    assert store.default.cert_path == own[0]
    # a different first pair: logged, the running one stays first
    d = pair(tmp_path, "d", ["d.zone"])
    added, dropped = store.configure([d, c])
    assert (added, dropped) == ([d[0]], [])
    assert store.default.cert_path == own[0] and store.covers("d.zone")
    assert "changes at the next restart" in caplog.text
    # a pair that does not load is left out; the rest of the change happens
    bad = pair(tmp_path, "bad", ["bad.zone"])
    added, dropped = store.configure([own, (bad[0], d[1])])
    assert added == [] and sorted(dropped) == sorted([c[0], d[0]])
    assert not store.covers("bad.zone") and not store.covers("c.zone")
    assert "not added" in caplog.text
    assert [p.cert_path for p in store.pairs] == [own[0], acme[0]]
    # no pairs at all (TLS off) waits for a restart, as the relay says
    assert store.configure([]) == ([], [])
    assert store.default.cert_path == own[0]
