"""Real OpenSSH through a kite relay: ``ssh``/``scp`` with ``kite connect`` as ProxyCommand,
the same through ``kite forward``, ``kite ssh-config``'s block, and the generic CONNECT
clients users already have (``nc -X connect``, ``proxytunnel``, ``socat PROXY:``).

Everything is a subprocess owned by the tests (tests.support.Proc, killed by process group):
a throwaway sshd on a loopback port (its own host key, one authorized key, root login), and
``kite relay`` + ``kite expose tcp://127.0.0.1:SSHD box.test.kite --public-port 22``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

# Subprocesses import the same kite package as this test process (site-packages in CI,
# src/ in an editable checkout).
import kite as _kite_pkg
from support import KITE, Proc, free_port

SRC = os.path.dirname(os.path.dirname(os.path.abspath(_kite_pkg.__file__)))
SSHD = "/usr/sbin/sshd"
SECRET = "ssh-test-secret"
KITE_NAME = "box.test.kite"

pytestmark = pytest.mark.skipif(
    not (os.path.exists(SSHD) and shutil.which("ssh") and shutil.which("ssh-keygen")),
    reason="needs Debian's openssh-server and openssh-client")



class Env:
    """What the tests need: the relay's address, ssh's arguments and environment."""

    def __init__(self, tmp, relay_port, sshd_port, key):
        self.tmp = tmp
        self.relay = f"127.0.0.1:{relay_port}"
        self.sshd_port = sshd_port
        self.key = key
        bindir = tmp / "bin"
        bindir.mkdir(exist_ok=True)
        # ssh runs ProxyCommand through the shell: `kite` must be on PATH, and be this tree.
        wrapper = bindir / "kite"
        wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m kite "$@"\n')
        wrapper.chmod(0o755)
        self.env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": SRC}

    def ssh_opts(self, proxy=None):
        opts = ["-F", "/dev/null", "-i", str(self.key), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20"]
        if proxy:
            opts += ["-o", f"ProxyCommand={proxy}"]
        return opts

    def run(self, args, timeout=60):
        return subprocess.run(args, capture_output=True, env=self.env, timeout=timeout)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ssh")
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name,
                        "-f", str(tmp / f"{name}_key")], check=True)
    (tmp / "authorized_keys").write_text((tmp / "client_key.pub").read_text())
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
    procs = []
    try:
        for _attempt in range(3):  # a free port can be taken between probe and bind
            sshd_port = free_port()
            cfg = tmp / "sshd_config"
            cfg.write_text(
                f"ListenAddress 127.0.0.1\nPort {sshd_port}\nHostKey {tmp / 'host_key'}\n"
                f"AuthorizedKeysFile {tmp / 'authorized_keys'}\nPidFile {tmp / 'sshd.pid'}\n"
                "UsePAM no\nStrictModes no\nPermitRootLogin yes\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nSubsystem sftp /usr/lib/openssh/sftp-server\n"
                "LogLevel INFO\n")
            sshd = Proc([SSHD, "-D", "-e", "-f", str(cfg)], tmp, f"sshd{_attempt}")
            try:
                sshd.wait_for(f"Server listening on 127.0.0.1 port {sshd_port}", timeout=10)
            except AssertionError:
                sshd.stop()
                continue
            procs.append(sshd)
            break
        else:
            pytest.fail("sshd did not start")
        pyenv = {"PYTHONPATH": SRC}
        relay = Proc(KITE + ["relay", "--listen", "127.0.0.1:0", "--kite",
                             f"*:*.test.kite:{SECRET}"], tmp, "relay", pyenv)
        procs.append(relay)
        out = relay.wait_for("relay listening on 127.0.0.1:")
        relay_port = int(re.search(r"relay listening on 127\.0\.0\.1:(\d+)", out).group(1))
        expose = Proc(KITE + ["expose", f"tcp://127.0.0.1:{sshd_port}", KITE_NAME, "--relay",
                              f"127.0.0.1:{relay_port}", "--plain", "--secret", SECRET,
                              "--public-port", "22"], tmp, "expose", pyenv)
        procs.append(expose)
        expose.wait_for("kite flying")
        yield Env(tmp, relay_port, sshd_port, tmp / "client_key")
    finally:
        for p in reversed(procs):
            p.stop()


@pytest.fixture(scope="module")
def big_file(env):
    path = env.tmp / "big.bin"
    data = os.urandom(50 << 20)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def forward(env):
    """``kite forward 0 box.test.kite:22`` as a subprocess; yields its local port."""
    proc = Proc(KITE + ["forward", "0", f"{KITE_NAME}:22", "--relay", env.relay],
                env.tmp, "forward", {"PYTHONPATH": SRC})
    try:
        out = proc.wait_for("forwarding 127.0.0.1:")
        yield int(re.search(r"forwarding 127\.0\.0\.1:(\d+) to", out).group(1))
    finally:
        proc.stop()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def scp_both_ways(env, opts, src, digest, remote_host, tag):
    """scp the file up to the far side and back down; both copies intact.  Returns seconds."""
    remote = env.tmp / f"far-{tag}.bin"
    back = env.tmp / f"back-{tag}.bin"
    t0 = time.monotonic()
    up = env.run(["scp", "-q", *opts, str(src), f"root@{remote_host}:{remote}"], timeout=120)
    t1 = time.monotonic()
    assert up.returncode == 0, up.stderr.decode()
    down = env.run(["scp", "-q", *opts, f"root@{remote_host}:{remote}", str(back)], timeout=120)
    t2 = time.monotonic()
    assert down.returncode == 0, down.stderr.decode()
    assert sha256_file(remote) == digest
    assert sha256_file(back) == digest
    remote.unlink()
    back.unlink()
    size_mb = src.stat().st_size / 1e6
    print(f"\nscp {tag}: up {size_mb / (t1 - t0):.0f} MB/s, down {size_mb / (t2 - t1):.0f} MB/s")
    return t1 - t0, t2 - t1


# -- kite connect as ProxyCommand --------------------------------------------------------------
@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
@pytest.mark.parametrize("mode", ["splice", "copy"])
def test_ssh_command_through_kite_connect(env, loop_kind, mode):
    proxy = f"kite connect %h %p --relay {env.relay} --loop {loop_kind}"
    run_env = dict(env.env, KITE_NO_SPLICE="1" if mode == "copy" else "")
    proc = subprocess.run(["ssh", *env.ssh_opts(proxy), f"root@{KITE_NAME}",
                           "echo far side says $((6*7)); echo to stderr >&2; exit 3"],
                          capture_output=True, env=run_env, timeout=60)
    assert proc.returncode == 3, proc.stderr.decode()
    assert proc.stdout == b"far side says 42\n"
    assert proc.stderr == b"to stderr\n"  # kite connect itself said nothing


def test_ssh_stdin_eof_through_kite_connect(env):
    """stdin is forwarded and its EOF ends the remote command (ssh's own half-close)."""
    proxy = f"kite connect %h %p --relay {env.relay}"
    data = os.urandom(3 << 20)
    proc = subprocess.run(["ssh", *env.ssh_opts(proxy), f"root@{KITE_NAME}", "sha256sum"],
                          input=data, capture_output=True, env=env.env, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_scp_50mb_through_kite_connect(env, big_file):
    path, digest = big_file
    scp_both_ways(env, env.ssh_opts(f"kite connect %h %p --relay {env.relay}"), path, digest,
                  KITE_NAME, "connect")


def test_ssh_to_an_offline_kite_says_why(env):
    proxy = f"kite connect %h %p --relay {env.relay}"
    proc = env.run(["ssh", *env.ssh_opts(proxy), "root@gone.test.kite", "true"])
    assert proc.returncode == 255
    err = proc.stderr.decode()
    assert "kite: error: kite gone.test.kite:22 is offline" in err and "Traceback" not in err


def test_ssh_config_block_works(env):
    out = env.run(KITE + ["ssh-config", KITE_NAME, "--relay", env.relay, "--user", "root"])
    assert out.returncode == 0, out.stderr.decode()
    block = out.stdout.decode()
    # the kite that wrote it, by its absolute path (here: this Python, -m kite)
    assert f"ProxyCommand {sys.executable} -m kite connect %h %p --relay {env.relay}\n" in block
    cfg = env.tmp / "ssh_config"
    cfg.write_text(block + f"    IdentityFile {env.key}\n    StrictHostKeyChecking no\n"
                   "    UserKnownHostsFile /dev/null\n    BatchMode yes\n    LogLevel ERROR\n")
    proc = env.run(["ssh", "-F", str(cfg), KITE_NAME, "echo via ssh-config"])
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"via ssh-config\n"


# -- kite forward --------------------------------------------------------------------------------
def test_ssh_and_scp_through_kite_forward(env, forward, big_file):
    opts = env.ssh_opts() + ["-o", "HostKeyAlias=forwarded"]
    proc = env.run(["ssh", *opts, "-p", str(forward), "root@127.0.0.1", "echo forwarded"])
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"forwarded\n"
    path, digest = big_file
    scp_both_ways(env, opts + ["-P", str(forward)], path, digest, "127.0.0.1", "forward")


def test_concurrent_ssh_sessions_through_kite_forward(env, forward):
    opts = env.ssh_opts() + ["-o", "HostKeyAlias=forwarded", "-p", str(forward)]
    procs = [subprocess.Popen(["ssh", *opts, "root@127.0.0.1", f"echo session {i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env.env)
             for i in range(8)]
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
        assert out == b"session %d\n" % i


# -- the CONNECT clients users already have ------------------------------------------------------
GENERIC = {
    "nc": "nc -X connect -x {relay} %h %p",
    "proxytunnel": "proxytunnel -q -p {relay} -d %h:%p",
    "socat": "socat - PROXY:{host}:%h:%p,proxyport={port}",
}


@pytest.mark.parametrize("tool", sorted(GENERIC))
def test_generic_connect_clients_reach_the_raw_kite(env, tool):
    if not shutil.which(tool):
        pytest.skip(f"{tool} not installed")
    host, port = env.relay.split(":")
    proxy = GENERIC[tool].format(relay=env.relay, host=host, port=port)
    proc = env.run(["ssh", *env.ssh_opts(proxy), f"root@{KITE_NAME}", f"echo hello {tool}"])
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == f"hello {tool}\n".encode()
