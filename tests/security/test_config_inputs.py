"""Hostile command-line and TOML values: every one is exit 2 with ONE line on stderr,
``kite: error: ...`` naming the key -- never a traceback, never a process that starts anyway.

Each case runs the real ``python -m kite ...`` (bounded by a timeout: a command that
accepted its input would start serving and time out).  Files a case needs are written to
its tmp_path first: ``{tmp}`` in an argument is that folder.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from support import KITE

S = "0123456789abcdef-secret"  # a valid secret, long enough not to be warned about
RELAY = ["relay", "--listen", "127.0.0.1:0", "--kite", f"*:*.example.com:{S}"]
EXPOSE = ["expose", "8080", "app.example.com", "--relay", "127.0.0.1:1", "--secret", S, "--plain"]
TCP = ["expose", "tcp://127.0.0.1:22", "box.example.com", "--relay", "127.0.0.1:1", "--secret", S,
       "--plain"]
CONNECT = ["connect", "box.example.com", "22", "--relay", "127.0.0.1:1"]
FORWARD = ["forward", "127.0.0.1:0", "box.example.com:22", "--relay", "127.0.0.1:1"]

RELAY_TOML = f'listen = ["127.0.0.1:0"]\n[[kite]]\ndomain = "*.example.com"\nsecret = "{S}"\n'
BACKEND_TOML = (f'[defaults]\nsecret = "{S}"\nplain = true\n[[relay]]\naddress = "127.0.0.1:1"\n'
                '[[kite]]\nname = "app.example.com"\ntarget = "http://127.0.0.1:8080"\n')


class Toml(str):
    """An argument that is a file written with this text (a path in the case's tmp_path)."""


def relay_toml(text: str) -> list:
    return ["relay", "--config", Toml(text)]


def backend_toml(text: str) -> list:
    return ["expose", "--config", Toml(text)]


# (id, argv, key that the one line must name).
CASES = [
    # kite relay: options
    ("relay-listen-superscript", RELAY + ["--listen", "127.0.0.1:²"], "--listen"),
    ("relay-listen-65536", RELAY + ["--listen", "127.0.0.1:65536"], "--listen"),
    ("relay-listen-space", RELAY + ["--listen", "a b:80"], "--listen"),
    ("relay-listen-empty", RELAY + ["--listen", ""], "--listen"),
    ("relay-listen-v6-open", RELAY + ["--listen", "[::1:80"], "--listen"),
    ("relay-keepalive-negative", RELAY + ["--keepalive", "-1"], "--keepalive"),
    ("relay-keepalive-nan", RELAY + ["--keepalive", "nan"], "--keepalive"),
    ("relay-keepalive-inf", RELAY + ["--keepalive", "inf"], "--keepalive"),
    ("relay-keepalive-huge", RELAY + ["--keepalive", "1e12"], "--keepalive"),
    ("relay-keepalive-text", RELAY + ["--keepalive", "abc"], "--keepalive"),
    ("relay-drain-nan", RELAY + ["--drain-timeout", "nan"], "--drain-timeout"),
    ("relay-drain-negative", RELAY + ["--drain-timeout", "-5"], "--drain-timeout"),
    ("relay-kite-space", RELAY + ["--kite", f"http:a b.example.com:{S}"], "--kite"),
    ("relay-kite-unicode", RELAY + ["--kite", f"http:ünï.example.com:{S}"], "--kite"),
    ("relay-kite-no-secret", RELAY + ["--kite", "http:a.example.com"], "--kite"),
    ("relay-kite-proto", RELAY + ["--kite", f"ftp:a.example.com:{S}"], "--kite"),
    ("relay-kite-port-superscript", RELAY + ["--kite", f"raw-²:a.example.com:{S}"], "--kite"),
    ("relay-kite-port-0", RELAY + ["--kite", f"raw-0:a.example.com:{S}"], "--kite"),
    ("relay-kite-port-65536", RELAY + ["--kite", f"raw-65536:a.example.com:{S}"], "--kite"),
    ("relay-secret-file-missing", RELAY + ["--kite", "http:a.example.com", "--secret-file",
                                           "{tmp}/nothing"], "--secret-file"),
    ("relay-secret-file-empty", RELAY + ["--kite", "http:a.example.com", "--secret-file",
                                         "{tmp}/empty"], "--secret-file"),
    ("relay-secret-file-dir", RELAY + ["--secret-file", "{tmp}"], "--secret-file"),
    ("relay-tls-name", RELAY + ["--tls-name", "a b"], "--tls-name"),
    ("relay-single", RELAY + ["--single", "a:b"], "--single"),
    ("relay-cert-alone", RELAY + ["--tls-cert", "{tmp}/empty"], "--tls-cert"),
    ("relay-unknown-option", RELAY + ["--bogus"], "--bogus"),
    # kite relay: TOML
    ("relay-toml-keepalive-text", relay_toml(RELAY_TOML + 'keepalive = "abc"\n'), "keepalive"),
    ("relay-toml-keepalive-nan", relay_toml(RELAY_TOML + "keepalive = nan\n"), "keepalive"),
    ("relay-toml-listen-number", relay_toml(RELAY_TOML.replace('["127.0.0.1:0"]', "[19703]")),
     "listen"),
    ("relay-toml-listen-superscript",
     relay_toml(RELAY_TOML.replace("127.0.0.1:0", "127.0.0.1:²")), "listen"),
    ("relay-toml-zchunks-text", relay_toml('zchunks = "yes"\n' + RELAY_TOML), "zchunks"),
    ("relay-toml-unknown-key", relay_toml('bogus = 1\n' + RELAY_TOML), "bogus"),
    ("relay-toml-kite-not-table", relay_toml('kite = 5\n'), "kite"),
    ("relay-toml-domain-number", relay_toml(RELAY_TOML.replace('"*.example.com"', "5")),
     "kite[0].domain"),
    ("relay-toml-domain-space", relay_toml(RELAY_TOML.replace("*.example.com", "a b.c")),
     "kite[0]"),
    ("relay-toml-protos-number", relay_toml(RELAY_TOML + "protos = [1]\n"), "kite[0].protos"),
    ("relay-toml-single-text", relay_toml(RELAY_TOML + 'single = "yes"\n'), "kite[0].single"),
    ("relay-toml-kite-unknown", relay_toml(RELAY_TOML + 'secrte = "x"\n'), "kite[0].secrte"),
    ("relay-toml-secret-file-missing",
     relay_toml(RELAY_TOML.replace(f'secret = "{S}"', 'secret_file = "/nonexistent/s"')),
     "kite[0].secret_file"),
    ("relay-toml-secret-and-file", relay_toml(RELAY_TOML + 'secret_file = "{tmp}/secret"\n'),
     "kite[0].secret_file"),
    ("relay-toml-tls-names", relay_toml('tls_names = "a b"\n' + RELAY_TOML), "tls_names"),
    ("relay-toml-syntax", relay_toml("listen = [\n"), "--config"),
    ("relay-toml-not-utf8", relay_toml("\udcff"), "--config"),
    ("relay-toml-missing", ["relay", "--config", "{tmp}/nothing.toml"], "--config"),
    # kite expose: options
    ("expose-relay-superscript", EXPOSE[:3] + ["--relay", "h:³", "--secret", S], "--relay"),
    ("expose-relay-port-0", EXPOSE[:3] + ["--relay", "h:0", "--secret", S], "--relay"),
    ("expose-public-port-negative", TCP + ["--public-port", "-5"], "--public-port"),
    ("expose-public-port-65536", TCP + ["--public-port", "65536"], "--public-port"),
    ("expose-public-port-text", TCP + ["--public-port", "abc"], "--public-port"),
    ("expose-keepalive-negative", EXPOSE + ["--keepalive", "-1"], "--keepalive"),
    ("expose-keepalive-nan", EXPOSE + ["--keepalive", "nan"], "--keepalive"),
    ("expose-keepalive-tiny", EXPOSE + ["--keepalive", "1e-9"], "--keepalive"),
    ("expose-name-space", ["expose", "8080", "a b.c", "--relay", "h:1", "--secret", S], "NAME"),
    ("expose-name-colon", ["expose", "8080", "a:b", "--relay", "h:1", "--secret", S], "NAME"),
    ("expose-name-unicode", ["expose", "8080", "ünï.com", "--relay", "h:1", "--secret", S],
     "NAME"),
    ("expose-name-empty", ["expose", "8080", "", "--relay", "h:1", "--secret", S], "NAME"),
    ("expose-target-v6-open", ["expose", "http://[::1", "a.example.com", "--relay", "h:1",
                               "--secret", S], "TARGET"),
    ("expose-target-superscript", ["expose", "http://a:²", "a.example.com", "--relay", "h:1",
                                   "--secret", S], "TARGET"),
    ("expose-target-port-big", ["expose", "99999", "a.example.com", "--relay", "h:1",
                                "--secret", S], "TARGET"),
    ("expose-target-port-0", ["expose", "0", "a.example.com", "--relay", "h:1", "--secret", S],
     "TARGET"),
    ("expose-target-scheme", ["expose", "ftp://a:21", "a.example.com", "--relay", "h:1",
                              "--secret", S], "TARGET"),
    ("expose-secret-space", EXPOSE[:5] + ["--secret", "a b c d e f g h i j"], "--secret"),
    ("expose-secret-file-missing", EXPOSE[:5] + ["--secret-file", "{tmp}/nothing"],
     "--secret-file"),
    ("expose-secret-file-empty", EXPOSE[:5] + ["--secret-file", "{tmp}/empty"], "--secret-file"),
    ("expose-secret-and-file", EXPOSE + ["--secret-file", "{tmp}/secret"], "--secret-file"),
    ("expose-no-secret", EXPOSE[:5], "--secret"),
    ("expose-proxy-protocol-3", TCP + ["--proxy-protocol", "3"], "--proxy-protocol"),
    # kite expose --config
    ("backend-toml-public-port-text",
     backend_toml(BACKEND_TOML + 'public_port = "abc"\n'), "kite[0].public_port"),
    ("backend-toml-public-port-0", backend_toml(BACKEND_TOML + "public_port = 0\n"),
     "kite[0].public_port"),
    ("backend-toml-keepalive-text", backend_toml('keepalive = "abc"\n' + BACKEND_TOML),
     "keepalive"),
    ("backend-toml-keepalive-negative", backend_toml("keepalive = -1\n" + BACKEND_TOML),
     "keepalive"),
    ("backend-toml-keepalive-inf", backend_toml("keepalive = inf\n" + BACKEND_TOML),
     "keepalive"),
    ("backend-toml-name-space", backend_toml(BACKEND_TOML.replace("app.example.com", "a b.c")),
     "kite[0].name"),
    ("backend-toml-name-number",
     backend_toml(BACKEND_TOML.replace('"app.example.com"', "7")), "kite[0].name"),
    ("backend-toml-target-bool",
     backend_toml(BACKEND_TOML.replace('"http://127.0.0.1:8080"', "true")), "kite[0].target"),
    ("backend-toml-target-v6-open",
     backend_toml(BACKEND_TOML.replace("http://127.0.0.1:8080", "http://[::1")),
     "kite[0].target"),
    ("backend-toml-proxy-protocol-bool", backend_toml(BACKEND_TOML + "proxy_protocol = true\n"),
     "kite[0].proxy_protocol"),
    ("backend-toml-forwarded-text", backend_toml(BACKEND_TOML + 'forwarded = "no"\n'),
     "kite[0].forwarded"),
    ("backend-toml-relays-text", backend_toml(BACKEND_TOML + 'relays = "h:1"\n'),
     "kite[0].relays"),
    ("backend-toml-kite-unknown", backend_toml(BACKEND_TOML + "bogus = 1\n"), "kite[0].bogus"),
    ("backend-toml-address-number",
     backend_toml(BACKEND_TOML.replace('"127.0.0.1:1"', "19703")), "relay[0].address"),
    ("backend-toml-address-superscript",
     backend_toml(BACKEND_TOML.replace("127.0.0.1:1", "127.0.0.1:²")), "relay[0].address"),
    ("backend-toml-secret-file-missing",
     backend_toml(BACKEND_TOML.replace(f'secret = "{S}"', 'secret_file = "/nonexistent/s"')),
     "defaults.secret_file"),
    ("backend-toml-relay-not-table", backend_toml('relay = "x"\n'), "relay"),
    ("backend-toml-zchunks-number", backend_toml("zchunks = 1\n" + BACKEND_TOML), "zchunks"),
    ("backend-toml-with-secret", backend_toml(BACKEND_TOML)[:4] + ["--secret-file",
                                                                    "{tmp}/secret"],
     "--secret-file"),
    # unknown keys name the nearest valid one; --check-config; --relay beside --config
    ("backend-toml-defaults-typo", backend_toml(BACKEND_TOML.replace("plain =", "plian =")),
     "defaults.plian: unknown key (did you mean 'plain'?"),
    ("backend-toml-top-typo", backend_toml("zchunk = true\n" + BACKEND_TOML),
     "zchunk: unknown key (did you mean 'zchunks'?"),
    ("backend-toml-relay-typo", backend_toml(BACKEND_TOML.replace("address", "adress")),
     "relay[0].adress: unknown key (did you mean 'address'?"),
    ("backend-toml-response-timeout", backend_toml(BACKEND_TOML + "response_timeout = nan\n"),
     "kite[0].response_timeout"),
    ("backend-check-config-typo", ["expose", "--check-config",
                                   Toml(BACKEND_TOML + "targt = 1\n")],
     "kite[0].targt: unknown key (did you mean 'target'?"),
    ("backend-relay-with-config", backend_toml(BACKEND_TOML) + ["--relay", "127.0.0.1:2"],
     "--relay: not used with --config"),
    ("expose-response-timeout", EXPOSE + ["--response-timeout", "-1"], "--response-timeout"),
    ("relay-toml-top-typo", relay_toml("tls_crt = \"x\"\n" + RELAY_TOML),
     "tls_crt: unknown key (did you mean 'tls_cert'?"),
    ("relay-toml-kite-typo", relay_toml(RELAY_TOML + "singel = true\n"),
     "kite[0].singel: unknown key (did you mean 'single'?"),
    ("relay-toml-names-typo", relay_toml("dns_tll = 5\n" + RELAY_TOML),
     "dns_tll: unknown key (did you mean 'dns_ttl'?"),
    ("relay-check-config-typo", ["relay", "--check-config", Toml("lisen = []\n" + RELAY_TOML)],
     "lisen: unknown key (did you mean 'listen'?"),
    ("relay-check-config-bad-cert", ["relay", "--check-config",
                                     Toml('tls_cert = "empty"\ntls_key = "empty"\n'
                                          'tls_names = ["relay.example.com"]\n' + RELAY_TOML)],
     "tls-cert: cannot load"),
    ("relay-error-pages-missing", RELAY + ["--error-pages", "{tmp}/nothing"], "error_pages"),
    # kite connect / forward / ssh-config
    ("connect-host-space", ["connect", "a b", "22", "--relay", "h:1"], "HOST"),
    ("connect-port-0", ["connect", "a.example.com", "0", "--relay", "h:1"], "PORT"),
    ("connect-port-superscript", ["connect", "a.example.com", "²", "--relay", "h:1"], "PORT"),
    ("connect-relay-superscript", CONNECT[:3] + ["--relay", "h:²"], "--relay"),
    ("connect-timeout-nan", CONNECT + ["--timeout", "nan"], "--timeout"),
    ("connect-timeout-negative", CONNECT + ["--timeout", "-1"], "--timeout"),
    ("forward-listen-superscript", ["forward", "²", "a.example.com:22", "--relay", "h:1"],
     "LISTEN"),
    ("forward-kite-port-0", ["forward", "8080", "a.example.com:0", "--relay", "h:1"],
     "NAME:PORT"),
    ("forward-kite-space", ["forward", "8080", "a b:22", "--relay", "h:1"], "NAME:PORT"),
    ("forward-kite-superscript", ["forward", "8080", "a.example.com:²", "--relay", "h:1"],
     "NAME:PORT"),
    ("forward-timeout-inf", FORWARD + ["--timeout", "inf"], "--timeout"),
    ("ssh-config-name-space", ["ssh-config", "a b", "--relay", "h:1"], "NAME"),
    ("ssh-config-relay", ["ssh-config", "a.example.com", "--relay", "h:²"], "--relay"),
    ("ssh-config-port-0", ["ssh-config", "a.example.com", "--relay", "h:1", "--port", "0"],
     "--port"),
    ("ssh-config-user-newline", ["ssh-config", "a.example.com", "--relay", "h:1", "--user",
                                 "u\n    ProxyCommand x"], "--user"),
    # kite init / import-pagekiterc
    ("init-domain-space", ["init", "relay", "--dir", "{tmp}/i", "--domain", "a b"], "--domain"),
    ("init-domain-quote", ["init", "relay", "--dir", "{tmp}/i", "--domain", '*."x'], "--domain"),
    ("init-name-space", ["init", "relay", "--dir", "{tmp}/i", "--name", "a b"], "--name"),
    ("init-what", ["init", "client"], "relay|backend"),
    ("import-missing", ["import-pagekiterc", "{tmp}/nothing.rc"], "nothing.rc"),
    ("import-directory", ["import-pagekiterc", "{tmp}"], "RCFILE"),
    ("import-output-exists", ["import-pagekiterc", "{tmp}/empty", "-o", "{tmp}/secret"],
     "secret"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_value_is_one_line_exit_2(case, tmp_path):
    _name, argv, key = case
    tmp = str(tmp_path)
    (tmp_path / "empty").write_text("")
    (tmp_path / "secret").write_text(S + "\n")
    (tmp_path / "secret").chmod(0o600)
    args = []
    for i, arg in enumerate(argv):
        if isinstance(arg, Toml):
            path = tmp_path / f"config{i}.toml"
            path.write_bytes(arg.replace("{tmp}", tmp).encode("utf-8", "surrogateescape"))
            arg = str(path)
        args.append(arg.replace("{tmp}", tmp))
    env = {k: v for k, v in os.environ.items() if k != "KITE_SECRET"}
    r = subprocess.run(KITE + args, capture_output=True, text=True, timeout=30, env=env,
                       stdin=subprocess.DEVNULL)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("kite: error: "), lines[0]
    assert key in lines[0], lines[0]
