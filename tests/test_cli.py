"""The command line as users run it: real processes, real curl, signals, exit codes."""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support import KITE, Proc, make_certs

SECRET = "cli-test-secret"


def kite(*args, timeout=60, env=None):
    return subprocess.run(KITE + list(args), capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_version_and_help():
    r = kite("--version")
    assert r.returncode == 0 and re.search(r"kite, version \d+\.\d+", r.stdout)
    r = kite("--help")
    assert r.returncode == 0
    for cmd in ("relay", "expose", "demo", "init"):
        assert cmd in r.stdout
    r = subprocess.run([sys.executable, "-m", "kite", "--version"], capture_output=True, text=True)
    assert r.returncode == 0


COMMANDS = ("relay", "expose", "connect", "forward", "ssh-config", "init", "demo", "bench",
            "import-pagekiterc", "accounts", "status")


@pytest.mark.parametrize("module", ["kite", "kite.cli"])
def test_help_lists_every_command(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    listed = set(re.findall(r"^  (\S+)  ", r.stdout.split("Commands:")[1], re.M))
    assert listed == set(COMMANDS)


def test_only_kite_cli_imports_click():
    import kite

    pkg = Path(kite.__file__).resolve().parent
    offenders = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg)
        if rel.parts[0] == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            if any(n == "click" or n.startswith("click.") for n in names):
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, offenders


def test_bench_passes_help_to_the_benchmark(tmp_path):
    import kite

    # kite run from a source checkout finds bench/relay_bench.py from any directory; an
    # installed kite finds it in the checkout's directory.
    checkout = Path(kite.__file__).resolve().parents[2]
    repo = Path(__file__).resolve().parents[1]
    cwd = tmp_path if (checkout / "bench" / "relay_bench.py").is_file() else repo
    env = {k: v for k, v in os.environ.items() if k != "KITE_BENCH_SCRIPT"}
    r = subprocess.run(KITE + ["bench", "--help"], capture_output=True, text=True, timeout=60,
                       env=env, cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert "relay_bench.py" in r.stdout and "--systems" in r.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["relay", "--listen", "127.0.0.1:0"], "--kite"),
        (["relay", "--kite", "http:app.example.com"], "PROTO:DOMAIN:SECRET"),
        (["relay", "--kite", "ftp:app.example.com:a-long-enough-secret"], "unknown protocol 'ftp'"),
        (
            ["relay", "--kite", "*:*.example.com:a-long-enough-secret", "--listen", "127.0.0.1:99999"],
            "bad port",
        ),
        (
            ["relay", "--kite", "*:*.example.com:a-long-enough-secret", "--tls-cert", "/nonexistent.pem"],
            "--tls-key",
        ),
        (["expose", "8080", "app.example.com", "--relay", "127.0.0.1:1"], "--secret"),
        (["expose", "8080", "app.example.com", "--secret", "a-long-enough-secret"], "--relay"),
        (
            [
                "expose",
                "ftp://127.0.0.1:21",
                "app.example.com",
                "--relay",
                "r:1",
                "--secret",
                "a-long-enough-secret",
            ],
            "unknown scheme",
        ),
        (
            [
                "expose",
                "8080",
                "app.example.com",
                "--relay",
                "r:1",
                "--secret",
                "a-long-enough-secret",
                "--insecure",
                "--fingerprint",
                "ab",
            ],
            "cannot be combined",
        ),
        (["expose", "--config", "/nonexistent.toml"], "no such file"),
    ],
)
def test_bad_usage_exits_2_with_one_line(args, needle):
    r = kite(*args, env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"})
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert needle in lines[0]
    assert "Traceback" not in r.stderr


def test_bad_toml_names_the_key(tmp_path):
    cfg = tmp_path / "b.toml"
    cfg.write_text('[[relay]]\naddress = "127.0.0.1:1"\n[[kite]]\nname = "a.example.com"\n'
                   'target = "http://127.0.0.1:8080"\nsecret = "x"\nproxy_protocol = 7\n')
    r = kite("expose", "--config", str(cfg))
    assert r.returncode == 2 and "kite[0].proxy_protocol" in r.stderr
    cfg.write_text("this is [not toml")
    r = kite("expose", "--config", str(cfg))
    assert r.returncode == 2 and "not valid TOML" in r.stderr


def test_demo_once():
    r = kite("demo", "--once", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "through the tunnel: HTTP/1.1 200 OK" in r.stdout
    assert re.search(r"curl http://demo\.kite\.localhost:\d+/", r.stdout)
    # a clean run and a clean stop: nothing to warn about (its own shutdown is no news)
    assert "WARNING" not in r.stderr and "ERROR" not in r.stderr, r.stderr


def _relay(tmp_path, certs, extra=()):
    p = Proc(KITE + ["relay", "--listen", "127.0.0.1:0", "--tls-cert", certs.cert, "--tls-key",
                     certs.key, "--kite", f"*:*.cli.kite:{SECRET}", "--drain-timeout", "5",
                     *extra], tmp_path, "relay")
    out = p.wait_for("relay listening on")
    port = int(re.search(r"relay listening on 127\.0\.0\.1:(\d+)", out).group(1))
    return p, port


@pytest.fixture
def site(tmp_path):
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text("hello through kite\n")
    p = Proc([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory",
              str(tmp_path / "www")], tmp_path, "site")
    out = p.wait_for("Serving HTTP on")
    port = int(re.search(r"port (\d+)", out).group(1))
    yield port
    p.stop()


def test_relay_and_expose_processes_with_curl(tmp_path, site):
    certs = make_certs(tmp_path)
    relay, port = _relay(tmp_path, certs)
    expose = Proc(KITE + ["expose", str(site), "www.cli.kite", "--relay", f"127.0.0.1:{port}",
                          "--ca", certs.cert], tmp_path, "expose", env={"KITE_SECRET": SECRET})
    try:
        expose.wait_for("kite flying: http:www.cli.kite")
        r = subprocess.run(["curl", "-sS", "--max-time", "20", "--resolve",
                            f"www.cli.kite:{port}:127.0.0.1", f"http://www.cli.kite:{port}/"],
                           capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout == "hello through kite\n"
        # Secrets never reach the logs.
        assert SECRET not in relay.output() and SECRET not in expose.output()
        # SIGTERM: both exit cleanly.
        assert expose.stop(signal.SIGTERM) == 0
        assert relay.stop(signal.SIGTERM) == 0
        assert "Traceback" not in relay.output() + expose.output()
    finally:
        expose.stop(signal.SIGKILL)
        relay.stop(signal.SIGKILL)


def test_secret_files_keep_the_secret_off_the_command_line(tmp_path, site):
    """kite relay --kite PROTO:DOMAIN --secret-file, kite expose --secret-file: the secret is
    in no process's command line (what `ps` shows) and the kite flies."""
    certs = make_certs(tmp_path)
    secret_file = tmp_path / "kite.secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    relay = Proc(KITE + ["relay", "--listen", "127.0.0.1:0", "--tls-cert", certs.cert,
                         "--tls-key", certs.key, "--kite", "*:*.cli.kite", "--secret-file",
                         str(secret_file)], tmp_path, "relay")
    expose = None
    try:
        out = relay.wait_for("relay listening on")
        port = int(re.search(r"relay listening on 127\.0\.0\.1:(\d+)", out).group(1))
        expose = Proc(KITE + ["expose", str(site), "file.cli.kite", "--relay", f"127.0.0.1:{port}",
                              "--ca", certs.cert, "--secret-file", str(secret_file)],
                      tmp_path, "expose")
        expose.wait_for("kite flying: http:file.cli.kite")
        r = subprocess.run(["curl", "-sS", "--max-time", "20", "--resolve",
                            f"file.cli.kite:{port}:127.0.0.1", f"http://file.cli.kite:{port}/"],
                           capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout == "hello through kite\n"
        for p in (relay, expose):
            assert SECRET.encode() not in Path(f"/proc/{p.pid}/cmdline").read_bytes()
            assert SECRET not in p.output()
        # A 15-character secret is warned about, once, on both sides (without showing it).
        assert relay.output().count("has 15 characters") == 1
        assert expose.output().count("has 15 characters") == 1
    finally:
        if expose is not None:
            expose.stop(signal.SIGKILL)
        relay.stop(signal.SIGKILL)


def test_init_relay_then_run_from_its_config(tmp_path, site):
    r = kite("init", "relay", "--dir", str(tmp_path / "conf"), "--domain", "*.init.kite")
    assert r.returncode == 0, r.stderr
    conf = (tmp_path / "conf" / "relay.toml").read_text()
    secret = re.search(r'secret = "([^"]+)"', conf).group(1)
    fp = re.search(r"fingerprint: ([0-9a-f]{64})", r.stdout).group(1)
    assert (tmp_path / "conf" / "relay.key").stat().st_mode & 0o077 == 0
    relay = Proc(KITE + ["relay", "--config", str(tmp_path / "conf" / "relay.toml"), "--listen",
                         "127.0.0.1:0"], tmp_path, "relay")
    try:
        out = relay.wait_for("relay listening on")
        port = int(re.search(r"127\.0\.0\.1:(\d+)", out).group(1))
        expose = Proc(KITE + ["expose", f"http://127.0.0.1:{site}", "a.init.kite", "--relay",
                              f"127.0.0.1:{port}", "--fingerprint", fp, "--secret", secret],
                      tmp_path, "expose")
        try:
            expose.wait_for("kite flying")
            r = subprocess.run(["curl", "-sS", "--max-time", "20", "-H", "Host: a.init.kite",
                                f"http://127.0.0.1:{port}/"], capture_output=True, text=True)
            assert r.stdout == "hello through kite\n"
        finally:
            expose.stop()
    finally:
        relay.stop()
