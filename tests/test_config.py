"""kite.config: the checks shared by ``kite expose`` and the client commands, and secrets
kept off the command line (secret files, KITE_SECRET, warnings)."""

from __future__ import annotations

import logging

import pytest

from kite import config as kconfig
from kite.backend.main import build_backend_config
from kite.config import check_tls_mode
from kite.errors import ConfigError
from kite.relay.config import build_relay_config


def test_check_tls_mode_allows_one_way_to_check_the_relay():
    assert check_tls_mode() is None
    assert check_tls_mode(ca="relay.pem") == "--ca"
    assert check_tls_mode(fingerprint="ab" * 32) == "--fingerprint"
    assert check_tls_mode(insecure=True) == "--insecure"
    assert check_tls_mode(plain=True) == "--plain"


@pytest.mark.parametrize("kw, key, first", [
    ({"ca": "r.pem", "fingerprint": "ab"}, "--fingerprint", "--ca"),
    ({"insecure": True, "fingerprint": "ab"}, "--insecure", "--fingerprint"),
    ({"ca": "r.pem", "plain": True}, "--plain", "--ca"),
    ({"insecure": True, "plain": True, "ca": "r.pem"}, "--insecure", "--ca"),
])
def test_check_tls_mode_names_the_second_option(kw, key, first):
    with pytest.raises(ConfigError) as info:
        check_tls_mode(**kw)
    assert info.value.key == key
    assert str(info.value) == (f"{key}: cannot be combined with {first} "
                               "(choose one way to check the relay)")


# -- secrets off the command line ---------------------------------------------------------------
LONG = "0123456789abcdef-secret"


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Each test sees the once-only warnings afresh, and no KITE_SECRET of the caller's."""
    monkeypatch.setattr(kconfig, "_warned", set())
    monkeypatch.delenv("KITE_SECRET", raising=False)


def _file(tmp_path, text, mode=0o600, name="kite.secret"):
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_secret_file_is_its_first_line_stripped(tmp_path, fresh_warnings, caplog):
    path = _file(tmp_path, f"  {LONG}  \nsecond line\n")
    with caplog.at_level(logging.WARNING, "kite.config"):
        assert kconfig.read_secret_file(path, "--secret-file") == LONG
    assert not caplog.records


@pytest.mark.parametrize("text, problem", [("", "empty"), ("\n" + LONG, "empty"),
                                           ("  \t\n", "empty")])
def test_secret_file_without_a_first_line_is_refused(tmp_path, fresh_warnings, text, problem):
    with pytest.raises(ConfigError) as info:
        kconfig.read_secret_file(_file(tmp_path, text), "--secret-file")
    assert info.value.key == "--secret-file" and problem in info.value.problem


def test_unreadable_secret_file_is_refused(tmp_path, fresh_warnings):
    with pytest.raises(ConfigError, match="cannot read"):
        kconfig.read_secret_file(str(tmp_path / "missing"), "--secret-file")
    with pytest.raises(ConfigError, match="not a regular file|cannot read"):
        kconfig.read_secret_file(str(tmp_path), "--secret-file")


def test_secret_file_readable_by_others_warns_once(tmp_path, fresh_warnings, caplog):
    path = _file(tmp_path, LONG, mode=0o644)
    with caplog.at_level(logging.WARNING, "kite.config"):
        kconfig.read_secret_file(path, "--secret-file")
        kconfig.read_secret_file(path, "--secret-file")
    warnings = [r for r in caplog.records if "chmod 600" in r.getMessage()]
    assert len(warnings) == 1 and LONG not in caplog.text


def test_short_secret_warns_once_per_place_and_never_shows_it(fresh_warnings, caplog):
    with caplog.at_level(logging.WARNING, "kite.config"):
        kconfig.warn_short_secret("short-secret", "--secret")
        kconfig.warn_short_secret("short-secret", "--secret")
        kconfig.warn_short_secret(LONG, "kite[0].secret")
    assert len(caplog.records) == 1 and "short-secret" not in caplog.text


def test_relay_grant_without_secret_takes_the_secret_file(tmp_path, fresh_warnings):
    path = _file(tmp_path, LONG + "\n")
    cfg = build_relay_config(listen=["127.0.0.1:0"], kites=["http:app.example.com"],
                             secret_file=path)
    assert cfg.grants.exact_secret("http", "app.example.com") == LONG
    # The old form keeps working, with its own secret.
    cfg = build_relay_config(listen=["127.0.0.1:0"], kites=[f"*:*.example.com:{LONG}x"],
                             secret_file=path)
    assert cfg.grants.exact_secret("http", "*.example.com") == LONG + "x"


def test_relay_grant_without_secret_takes_kite_secret_env(fresh_warnings, monkeypatch):
    monkeypatch.setenv("KITE_SECRET", LONG)
    cfg = build_relay_config(listen=["127.0.0.1:0"], kites=["raw-22:box.example.com"])
    assert cfg.grants.exact_secret("raw-22", "box.example.com") == LONG


def test_relay_toml_secret_file(tmp_path, fresh_warnings):
    path = _file(tmp_path, LONG)
    conf = tmp_path / "relay.toml"
    conf.write_text(f'listen = ["127.0.0.1:0"]\n[[kite]]\ndomain = "a.example.com"\n'
                    f'secret_file = "{path}"\n[[kite]]\ndomain = "b.example.com"\n')
    with pytest.raises(ConfigError) as info:  # the second table has no secret
        build_relay_config(config_file=str(conf))
    assert info.value.key == "kite[1]"
    conf.write_text(conf.read_text().replace("[[kite]]", f'secret_file = "{path}"\n[[kite]]', 1))
    cfg = build_relay_config(config_file=str(conf))
    assert cfg.grants.exact_secret("http", "b.example.com") == LONG


def test_relay_short_secret_is_warned(fresh_warnings, caplog):
    with caplog.at_level(logging.WARNING, "kite.config"):
        build_relay_config(listen=["127.0.0.1:0"], kites=["*:a.example.com:tooshort"])
    assert "a.example.com" in caplog.text and "tooshort" not in caplog.text


def test_expose_secret_file_env_and_conflict(tmp_path, fresh_warnings, monkeypatch, caplog):
    path = _file(tmp_path, LONG)
    kw = {"target": "8080", "name": "app.example.com", "relays": ["127.0.0.1:1"], "plain": True}
    cfg = build_backend_config(secret=None, secret_file=path, **kw)
    assert cfg.relays[0].kites[0].secret == LONG
    with pytest.raises(ConfigError) as info:
        build_backend_config(secret=LONG, secret_file=path, **kw)
    assert info.value.key == "--secret-file"
    monkeypatch.setenv("KITE_SECRET", "env-" + LONG)
    assert build_backend_config(secret=None, **kw).relays[0].kites[0].secret == "env-" + LONG
    with caplog.at_level(logging.WARNING, "kite.config"):
        build_backend_config(secret="short", **kw)
    assert "--secret" in caplog.text and "short" not in caplog.text


def test_backend_toml_secret_file(tmp_path, fresh_warnings):
    path = _file(tmp_path, LONG)
    conf = tmp_path / "backend.toml"
    conf.write_text(f'[defaults]\nsecret_file = "{path}"\nplain = true\n[[relay]]\n'
                    'address = "127.0.0.1:1"\n[[kite]]\nname = "app.example.com"\ntarget = 8080\n'
                    f'[[kite]]\nname = "b.example.com"\ntarget = 8081\nsecret = "{LONG}x"\n')
    cfg = kconfig.load_backend_config(str(conf))
    assert [k.secret for k in cfg.relays[0].kites] == [LONG, LONG + "x"]


# -- unknown keys, relative paths ----------------------------------------------------------------
BACKEND_OK = ('[defaults]\nsecret = "' + LONG + '"\nplain = true\n[[relay]]\n'
              'address = "127.0.0.1:1"\n[[kite]]\nname = "a.x.kite"\ntarget = "8080"\n')
RELAY_OK = '[[kite]]\ndomain = "*.x.kite"\nsecret = "' + LONG + '"\n'


@pytest.mark.parametrize("text, key, nearest", [
    ("keepalve = 30\n" + BACKEND_OK, "keepalve", "keepalive"),
    (BACKEND_OK.replace("plain = true", "fingerprnt = \"ab\""), "defaults.fingerprnt",
     "fingerprint"),
    (BACKEND_OK.replace("address =", "adress ="), "relay[0].adress", "address"),
    (BACKEND_OK + "traget = \"8080\"\n", "kite[0].traget", "target"),
    (BACKEND_OK + "zzz = 1\n", "kite[0].zzz", None),
])
def test_backend_unknown_key_names_the_nearest(tmp_path, fresh_warnings, text, key, nearest):
    path = tmp_path / "backend.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        kconfig.load_backend_config(str(path))
    assert info.value.key == key and info.value.problem == "unknown key"
    if nearest:
        assert info.value.fix.startswith(f"did you mean {nearest!r}? known keys: ")
    else:
        assert info.value.fix.startswith("known keys: ")


@pytest.mark.parametrize("text, key, nearest", [
    ("tls_crt = \"a.pem\"\n" + RELAY_OK, "tls_crt", "tls_cert"),
    ("zones = \"k.example.com\"\n" + RELAY_OK, "zones", "zone"),  # a names key
    ("max_stream = 5\n" + RELAY_OK, "max_stream", "max_streams"),
    (RELAY_OK + "protcols = \"*\"\n", "kite[0].protcols", "protos"),
    (RELAY_OK + "singel = true\n", "kite[0].singel", "single"),
])
def test_relay_unknown_key_names_the_nearest(tmp_path, fresh_warnings, text, key, nearest):
    path = tmp_path / "relay.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        build_relay_config(config_file=str(path))
    assert info.value.key == key and info.value.problem == "unknown key"
    assert info.value.fix.startswith(f"did you mean {nearest!r}?")


def test_relative_paths_are_relative_to_the_config_file(tmp_path, fresh_warnings, monkeypatch):
    from support import make_certs

    conf = tmp_path / "etc"
    conf.mkdir()
    certs = make_certs(conf)
    _file(conf, LONG + "\n", name="kite.secret")
    (conf / "pages").mkdir()
    (conf / "pages" / "503.html").write_text("<p>{kite} is away</p>\n")
    (conf / "relay.toml").write_text(
        'tls_cert = "relay.crt"\ntls_key = "relay.key"\nsecret_file = "kite.secret"\n'
        'error_pages = "pages"\n[[tls]]\ncert = "relay.crt"\nkey = "relay.key"\n'
        '[[kite]]\ndomain = "*.x.kite"\n'
        '[[kite]]\ndomain = "*.y.kite"\nsecret_file = "kite.secret"\n')
    (conf / "backend.toml").write_text(
        '[defaults]\nsecret_file = "kite.secret"\nca = "relay.crt"\n[[relay]]\n'
        'address = "127.0.0.1:1"\n[[kite]]\nname = "a.x.kite"\ntarget = "8080"\n')
    monkeypatch.chdir(tmp_path)  # elsewhere: the names must not be taken from here
    cfg = build_relay_config(config_file="etc/relay.toml")
    assert cfg.tls_cert == certs.cert and cfg.tls_key == certs.key
    assert cfg.tls_pairs[1] == (certs.cert, certs.key)  # [[tls]] tables too
    assert [g.secret for g in cfg.grants] == [LONG, LONG]
    assert cfg.error_pages == {"503": "<p>{kite} is away</p>\n"}
    backend = kconfig.load_backend_config("etc/backend.toml")
    assert backend.relays[0].ca == certs.cert and backend.relays[0].kites[0].secret == LONG


def test_relay_allow_plain_and_error_pages_keys(tmp_path, fresh_warnings):
    path = tmp_path / "relay.toml"
    path.write_text("allow_plain = true\n" + RELAY_OK)
    assert build_relay_config(config_file=str(path)).allow_plain is True
    assert build_relay_config(kites=[f"*:*.x.kite:{LONG}"]).allow_plain is False
    path.write_text('allow_plain = "yes"\n' + RELAY_OK)
    with pytest.raises(ConfigError, match="allow_plain"):
        build_relay_config(config_file=str(path))
    path.write_text('error_pages = "missing"\n' + RELAY_OK)
    with pytest.raises(ConfigError, match="is not a folder"):
        build_relay_config(config_file=str(path))
    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "404.html").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        build_relay_config(kites=[f"*:*.x.kite:{LONG}"], error_pages=str(pages))


def test_backend_response_timeout_keys(tmp_path, fresh_warnings):
    path = tmp_path / "backend.toml"
    path.write_text(BACKEND_OK.replace("plain = true", "plain = true\nresponse_timeout = 5")
                    + "[[kite]]\nname = \"b.x.kite\"\ntarget = \"8081\"\nresponse_timeout = 0\n")
    kites = kconfig.load_backend_config(str(path)).relays[0].kites
    assert [k.response_timeout for k in kites] == [5.0, None]
    path.write_text(BACKEND_OK + "response_timeout = -2\n")
    with pytest.raises(ConfigError) as info:
        kconfig.load_backend_config(str(path))
    assert info.value.key == "kite[0].response_timeout"


def test_docs_config_shows_every_key_in_a_valid_example():
    """docs/config.md: a TOML example holds every key of each file, and no unknown one."""
    import re
    from pathlib import Path

    import tomllib

    from kite.relay import config as rconfig

    text = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    blocks = [tomllib.loads(b) for b in re.findall(r"```toml\n(.*?)```", text, re.S)]
    relay, backend = blocks
    kconfig.check_keys(relay, rconfig.RELAY_KEYS, "")
    kconfig.check_keys(backend, kconfig.BACKEND_KEYS, "")
    commented = set(re.findall(r"^# (\w+) = ", text, re.M))  # alternatives, shown commented
    assert set(rconfig.RELAY_KEYS) - commented <= set(relay)
    grant_keys = set().union(*(k.keys() for k in relay["kite"]))
    assert grant_keys == rconfig._GRANT_KEYS
    for k in relay["kite"]:
        kconfig.check_keys(k, rconfig._GRANT_KEYS, "kite")
    assert kconfig._DEFAULTS_KEYS - commented <= set(backend["defaults"])
    assert set().union(*(r.keys() for r in backend["relay"])) | {
        k for k in kconfig._TLS_KEYS if k in backend["defaults"] or k in commented} \
        >= kconfig._RELAY_KEYS
    assert set().union(*(k.keys() for k in backend["kite"])) | commented >= kconfig._KITE_KEYS
# -- the relay's certificates (kite.certs): --tls-cert/--tls-key pairs, [[tls]] ------------------
def _cert(tmp_path, stem, names):
    from kite.net.tls import generate_self_signed

    cert, key = str(tmp_path / f"{stem}.crt"), str(tmp_path / f"{stem}.key")
    generate_self_signed(cert, key, names)
    return cert, key


def test_relay_tls_pairs_from_options_and_the_first_names_the_relay(tmp_path):
    relay = _cert(tmp_path, "relay", ["relay.example.com"])
    wild = _cert(tmp_path, "wild", ["*.example.com"])
    cfg = build_relay_config(listen=["127.0.0.1:0"], kites=[f"*:*.example.com:{LONG}"],
                             tls_cert=[relay[0], wild[0]], tls_key=[relay[1], wild[1]],
                             redirect_http=True)
    assert cfg.tls_pairs == [relay, wild]
    assert (cfg.tls_cert, cfg.tls_key) == relay
    assert cfg.tls_names == ["relay.example.com"]  # not the wildcard's
    assert cfg.redirect_http
    with pytest.raises(ConfigError, match=r"--tls-cert/--tls-key: 2 certificate\(s\) but 1 key"):
        build_relay_config(listen=["127.0.0.1:0"], kites=[f"*:*.example.com:{LONG}"],
                           tls_cert=[relay[0], wild[0]], tls_key=[relay[1]])


def test_relay_toml_tls_tables_follow_the_single_keys(tmp_path):
    relay = _cert(tmp_path, "relay", ["relay.example.com"])
    wild = _cert(tmp_path, "wild", ["*.example.com"])
    conf = tmp_path / "relay.toml"
    conf.write_text(f'tls_cert = "{relay[0]}"\ntls_key = "{relay[1]}"\nredirect_http = true\n'
                    f'[[kite]]\ndomain = "*.example.com"\nsecret = "{LONG}"\n'
                    f'[[tls]]\ncert = "{wild[0]}"\nkey = "{wild[1]}"\n')
    cfg = build_relay_config(config_file=str(conf))
    assert cfg.tls_pairs == [relay, wild] and cfg.redirect_http
    # options replace the file's certificates
    cfg = build_relay_config(config_file=str(conf), tls_cert=[wild[0]], tls_key=[wild[1]])
    assert cfg.tls_pairs == [wild]
    conf.write_text(f'[[kite]]\ndomain = "*.example.com"\nsecret = "{LONG}"\n'
                    f'[[tls]]\ncert = "{wild[0]}"\n')
    with pytest.raises(ConfigError, match=r"tls\[0\]: needs cert and key"):
        build_relay_config(config_file=str(conf))
    conf.write_text(f'[[kite]]\ndomain = "*.example.com"\nsecret = "{LONG}"\n'
                    f'[[tls]]\ncert = "{wild[0]}"\nkey = "{wild[1]}"\nkeyfile = "x"\n')
    with pytest.raises(ConfigError, match="keyfile"):
        build_relay_config(config_file=str(conf))


def test_relay_hsts_option_and_key(tmp_path):
    conf = tmp_path / "relay.toml"
    conf.write_text(f'hsts = 600\n[[kite]]\ndomain = "*.example.com"\nsecret = "{LONG}"\n')
    assert build_relay_config(config_file=str(conf)).hsts == 600
    assert build_relay_config(config_file=str(conf), hsts=5).hsts == 5  # the option wins
    for bad in ("true", '"1y"', "-1"):
        conf.write_text(f'hsts = {bad}\n[[kite]]\ndomain = "*.example.com"\nsecret = "{LONG}"\n')
        with pytest.raises(ConfigError, match="hsts: bad value"):
            build_relay_config(config_file=str(conf))


def test_relay_per_kite_redirect_and_hsts(tmp_path):
    conf = tmp_path / "relay.toml"
    conf.write_text(f'[[kite]]\ndomain = "*.example.com"\nsecret = "{LONG}"\nhsts = 60\n'
                    f'[[kite]]\ndomain = "app.example.com"\nsecret = "{LONG}"\n'
                    f'redirect_http = true\nhsts = 0\n')
    cfg = build_relay_config(config_file=str(conf))
    assert cfg.redirect_kites == {"app.example.com"} and not cfg.redirect_http
    assert cfg.hsts_kites == {"*.example.com": 60, "app.example.com": 0} and cfg.hsts is None
    conf.write_text(f'[[kite]]\ndomain = "a.example.com"\nsecret = "{LONG}"\nhsts = "1y"\n')
    with pytest.raises(ConfigError, match=r"kite\[0\]\.hsts: bad value"):
        build_relay_config(config_file=str(conf))


def test_busy_poll_from_option_toml_or_default(tmp_path):
    """``busy_poll``: the option wins over the file, the file over the default; the relay
    and the backend give their tunnels one poller, or none at 0."""
    from kite.config import DEFAULT_BUSY_POLL

    grant = [f"*:*.example.com:{LONG}"]
    assert build_relay_config(listen=["127.0.0.1:0"], kites=grant).busy_poll == DEFAULT_BUSY_POLL
    conf = tmp_path / "relay.toml"
    conf.write_text(f'listen = ["127.0.0.1:0"]\nbusy_poll = 0\n[[kite]]\n'
                    f'domain = "*.example.com"\nsecret = "{LONG}"\n')
    assert build_relay_config(config_file=str(conf)).busy_poll == 0
    assert build_relay_config(config_file=str(conf), busy_poll=300).busy_poll == 300
    conf.write_text(conf.read_text().replace("busy_poll = 0", "busy_poll = 99999"))
    with pytest.raises(ConfigError) as info:
        build_relay_config(config_file=str(conf))
    assert info.value.key == "busy_poll"
    back = tmp_path / "backend.toml"
    back.write_text(f'busy_poll = 50\n[[relay]]\naddress = "127.0.0.1:1"\n[[kite]]\n'
                    f'name = "a.example.com"\ntarget = "8080"\nsecret = "{LONG}"\n')
    assert kconfig.load_backend_config(str(back)).busy_poll == 50
