"""``kite import-pagekiterc``: pagekite.py rc files -> kite TOML (src/kite/pagekiterc.py).

Every output is loaded with kite's own config loaders, so a converted file is known to
start; every line that is not converted must be reported, and no report may contain a
secret.
"""

from __future__ import annotations

import os
import stat

import pytest
from click.testing import CliRunner

from kite.cli.tools import import_pagekiterc
from kite.config import load_backend_config
from kite.net.tls import generate_self_signed
from kite.pagekiterc import convert, read_rc
from kite.relay.main import build_relay_config

# What pagekite.py 1.5.2 itself writes with --save (layout of PageKite.GenerateConfig),
# plus lines a user typically adds.
BACKEND_RC = """\
###[ Current settings for pagekite.py v1.5.2.201011. ]#########
#
## NOTE: This file may be rewritten/reordered by pagekite.py.
#

##[ Default kite and account details ]##
kitename   = foo.example.com
kitesecret = s3cr3t-main

##[ Front-end settings: use pagekite.net defaults ]##
frontend = relay.example.com:443
fe_certname = relay.example.com
ca_certs = /etc/ssl/relay.pem

##[ Back-ends and local services ]##
service_on  = http:@kitename             : localhost:8080    : @kitesecret
service_on  = ssh:@kitename              : localhost:22      : @kitesecret
service_on  = https:secure.example.com   : 127.0.0.1:8443    : other-s3cr3t
service_on  = raw-2222:box.example.com   : 10.0.0.5:22       : @kitesecret
service_off = http:old.example.com       : localhost:8081    : @kitesecret
service_on  = irc:chat.example.com       : localhost:6667    : @kitesecret

service_cfg = foo.example.com/80         : rawheaders        : True
service_cfg = secure.example.com/80      : proxyproto        : True
service_cfg = foo.example.com/80         : ip/192.168.1      : ok

##[ Miscellaneous settings ]##
savefile = /home/user/.pagekite.rc
logfile = /var/log/pagekite.log
keepalive = 60
webpath = foo.example.com/80:/:default:/var/www
definitely_not_an_option = 1
nozchunks
END
frontend = ignored.after.end:443
"""

FRONTEND_RC = """\
isfrontend
host = 127.0.0.1
ports = 80,443
protos = http,https,raw,irc
rawports = virtual
tls_endpoint = fe.example.com:{pem}
domain = *:*.example.com:fe-s3cr3t
domain = http,irc:chat.example.org:chat-s3cr3t
logfile = /var/log/pagekite.log
authdomain = auth.example.com
"""

SECRETS = ("s3cr3t-main", "other-s3cr3t", "fe-s3cr3t", "chat-s3cr3t")


def _load_backend(tmp_path, toml):
    p = tmp_path / "kite.toml"
    p.write_text(toml)
    return load_backend_config(str(p))


def test_rc_lines_are_read_like_pagekite():
    lines = read_rc(BACKEND_RC)
    assert lines[0].option == "kitename" and lines[0].value == "foo.example.com"
    svc = [ln for ln in lines if ln.option == "service_on"][0]
    assert svc.value == "http:@kitename:localhost:8080:@kitesecret"  # spaces around ':' go
    assert all(ln.value != "ignored.after.end:443" for ln in lines)  # END stops reading
    assert read_rc("--frontend=a:1\n  # c\n\nnozchunks\n")[1].value is None


def test_backend_rc_becomes_a_kite_expose_config(tmp_path):
    kind, toml, report = convert(BACKEND_RC, "/home/user/.pagekite.rc")
    assert kind == "backend"
    cfg = _load_backend(tmp_path, toml)
    assert cfg.keepalive == 60.0
    (relay,) = cfg.relays
    assert (relay.host, relay.port) == ("relay.example.com", 443)
    assert relay.connect_name == "relay.example.com" and relay.ca == "/etc/ssl/relay.pem"
    assert not relay.plain
    kites = {k.name: k for k in relay.kites}
    assert set(kites) == {"http:foo.example.com", "raw-22:foo.example.com",
                          "https:secure.example.com", "raw-2222:box.example.com"}
    web = kites["http:foo.example.com"]
    assert (web.target.host, web.target.port, web.secret) == ("localhost", 8080, "s3cr3t-main")
    assert web.forwarded is False  # rawheaders
    assert kites["https:secure.example.com"].secret == "other-s3cr3t"
    assert kites["https:secure.example.com"].proxy_protocol == 1
    box = kites["raw-2222:box.example.com"]
    assert (box.target.proto, box.target.host, box.target.port) == ("raw", "10.0.0.5", 22)
    # the disabled kite is kept, commented out
    assert '# name = "old.example.com"' in toml


def test_nothing_is_dropped_silently_and_no_secret_is_reported():
    kind, toml, report = convert(BACKEND_RC)
    text = "\n".join(report.lines())
    not_converted = {ln.number for ln, _ in report.unconverted}
    ignored = {ln.number for ln, _ in report.ignored}
    src = BACKEND_RC.splitlines()

    def line_of(s):
        return next(i for i, ln in enumerate(src, 1) if s in ln)

    assert line_of("irc:chat") in not_converted
    assert line_of("ip/192.168.1") in not_converted
    assert line_of("webpath") in not_converted
    assert line_of("definitely_not_an_option") in not_converted
    assert {line_of("savefile"), line_of("logfile"), line_of("nozchunks")} <= ignored
    assert "service_off" in text  # the disabled kite is mentioned
    # ... and all of it is in the output file too, as comments
    for line in report.lines():
        assert f"#   {line}" in toml
    for s in SECRETS:
        assert s not in text


def test_kitename_defaults_and_plain_tunnels(tmp_path):
    rc = """\
frontend = 127.0.0.1:8080
frontend = [2001:db8::1]:443
service_on = http:first.example.com:localhost:80:sec-a
service_on = http:@kitename:localhost:81:@kitesecret
service_on = 8000
"""
    kind, toml, report = convert(rc)
    cfg = _load_backend(tmp_path, toml)
    assert [r.plain for r in cfg.relays] == [True, True]  # pagekite.py's default: plain TCP
    assert cfg.relays[1].host == "2001:db8::1"
    # @kitename / @kitesecret come from the first service_on when not set explicitly
    assert [(k.domain, k.target.port, k.secret) for k in cfg.relays[0].kites] == [
        ("first.example.com", 80, "sec-a"), ("first.example.com", 81, "sec-a")]
    assert any("8000" in ln.text for ln, _ in report.unconverted)


def test_fe_nocertcheck_frontends_and_missing_frontend(tmp_path):
    kind, toml, report = convert("frontends = 2:fe.example.net:443\nfe_nocertcheck\n"
                                 "service_on = http:a.example.net:localhost:80:s\n")
    cfg = _load_backend(tmp_path, toml)
    (relay,) = cfg.relays
    assert (relay.host, relay.port, relay.insecure) == ("fe.example.net", 443, True)
    assert any("crash" in text for _, text in report.notes)
    kind, toml, report = convert("defaults\nservice_on = http:a.example.net:localhost:80:s\n")
    assert any("pagekite.net" in r for _, r in report.unconverted)
    assert any("no relay" in r for _, r in report.unconverted)
    assert "# [[relay]]" in toml


def test_frontend_rc_becomes_a_kite_relay_config(tmp_path):
    cert, key = str(tmp_path / "fe.crt"), str(tmp_path / "fe.key")
    generate_self_signed(cert, key, ["fe.example.com"])
    pem = tmp_path / "fe.pem"
    pem.write_text(open(key).read() + open(cert).read())
    kind, toml, report = convert(FRONTEND_RC.format(pem=pem))
    assert kind == "relay"
    p = tmp_path / "relay.toml"
    p.write_text(toml)
    cfg = build_relay_config(config_file=str(p))
    assert cfg.listen == [("127.0.0.1", 80), ("127.0.0.1", 443)]
    assert cfg.tls_cert == cfg.tls_key == str(pem)
    assert cfg.tls_names == ["fe.example.com"]
    assert cfg.zchunks  # pagekite.py frontends ask for ZChunks by default
    assert cfg.allow_plain  # ... and take plain tunnels beside TLS ones
    wild = cfg.grants.find("http", "www.example.com")
    assert wild is not None and wild.allows("raw-22") and not wild.allows("websocket")
    chat = cfg.grants.find("http", "chat.example.org")
    assert chat is not None and chat.protos == frozenset({"http"})
    text = "\n".join(report.lines())
    assert "irc" in text and "authdomain" in text and "logfile" in text
    assert "note: allow_plain = true" in text
    for s in SECRETS:
        assert s not in text


def test_cli_writes_a_private_file_and_reports_on_stderr(tmp_path):
    rc = tmp_path / "pagekite.rc"
    rc.write_text(BACKEND_RC)
    out = tmp_path / "kite.toml"
    runner = CliRunner()
    res = runner.invoke(import_pagekiterc, [str(rc), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert "kite expose --config" in res.output
    assert "NOT converted" in res.output
    _load_backend(tmp_path, out.read_text())
    # no overwrite without --force; --strict fails on unconverted lines
    res = runner.invoke(import_pagekiterc, [str(rc), "-o", str(out)])
    assert res.exit_code == 2 and "exists" in res.output
    res = runner.invoke(import_pagekiterc, [str(rc), "-o", str(out), "--force", "--strict"])
    assert res.exit_code == 2 and "not converted" in res.output
    res = runner.invoke(import_pagekiterc, [str(tmp_path / "nope.rc")])
    assert res.exit_code == 2
    # stdout mode: the TOML itself
    clean = tmp_path / "clean.rc"
    clean.write_text("frontend = 127.0.0.1:2\nservice_on = http:a.example.com:localhost:80:s\n")
    res = runner.invoke(import_pagekiterc, [str(clean), "--strict"])
    assert res.exit_code == 0
    assert '[[kite]]\nname = "a.example.com"' in res.output


@pytest.mark.parametrize("line,expect", [
    ("service_on = http-8080:a.example.com:localhost:80:s", "every"),
    ("service_on = raw:a.example.com:localhost:2022:s", "raw-2022"),
    ("service_on = websocket:a.example.com:localhost:80:s", "WebSocket"),
])
def test_lossy_conversions_are_noted(tmp_path, line, expect):
    kind, toml, report = convert("frontend = 127.0.0.1:2\n" + line + "\n")
    assert any(expect in text for _, text in report.notes)
    _load_backend(tmp_path, toml)


# -- the expose settings converted files rely on: connect_name and zchunks ------------------------
def test_connect_name_and_zchunks_in_toml_and_cli(tmp_path):
    from kite.backend.main import build_backend_config
    from kite.errors import ConfigError

    p = tmp_path / "k.toml"
    p.write_text('zchunks = true\n[[relay]]\naddress = "10.0.0.1:443"\n'
                 'connect_name = "FE.Example.com."\nca = "fe.pem"\n'
                 '[[kite]]\nname = "a.example.com"\ntarget = "8080"\nsecret = "s"\n')
    cfg = load_backend_config(str(p))
    assert cfg.zchunks and cfg.relays[0].connect_name == "fe.example.com"
    p.write_text('[[relay]]\naddress = "10.0.0.1:443"\nconnect_name = "fe.example.com"\n'
                 'plain = true\n[[kite]]\nname = "a.example.com"\ntarget = "8080"\nsecret = "s"\n')
    with pytest.raises(ConfigError, match="connect_name"):
        load_backend_config(str(p))
    cfg = build_backend_config(target="8080", name="a.example.com", relays=["10.0.0.1:8443"],
                               secret="s", ca="fe.pem", connect_name="fe.example.com",
                               zchunks=True)
    assert cfg.zchunks and cfg.relays[0].connect_name == "fe.example.com"
    with pytest.raises(ConfigError, match="--connect-name"):
        build_backend_config(target="8080", name="a.example.com", relays=["10.0.0.1:80"],
                             secret="s", plain=True, connect_name="fe.example.com")
    with pytest.raises(ConfigError, match="bad relay name"):
        build_backend_config(target="8080", name="a.example.com", relays=["10.0.0.1:80"],
                             secret="s", connect_name="fe.example.com:443")
