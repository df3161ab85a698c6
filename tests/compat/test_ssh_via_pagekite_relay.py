"""kite connect / kite forward reach an sshd flown on a *pagekite.py* relay (issue: client
helpers, "the same through a pagekite.py relay"): real OpenSSH, real pagekite.py frontend,
real pagekite.py backend."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys

import pytest
from compat_env import ZONE, be_flying_marker, fe_live_marker

SSHD = "/usr/sbin/sshd"
KITE = [sys.executable, "-m", "kite"]


@pytest.fixture
def sshd(tmp_path):
    if not os.path.exists(SSHD):
        pytest.skip("openssh-server is not installed")
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name,
                        "-f", str(tmp_path / f"{name}_key")], check=True)
    (tmp_path / "authorized_keys").write_text((tmp_path / "client_key.pub").read_text())
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    cfg = tmp_path / "sshd_config"
    cfg.write_text(
        f"ListenAddress 127.0.0.1\nPort 0\nHostKey {tmp_path / 'host_key'}\n"
        f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}\nPidFile {tmp_path / 'sshd.pid'}\n"
        "UsePAM no\nStrictModes no\nPermitRootLogin yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nSubsystem sftp /usr/lib/openssh/sftp-server\n")
    # sshd cannot tell which port 0 became, so bind a socket ourselves and pass it by port
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    cfg.write_text(cfg.read_text().replace("Port 0", f"Port {port}"))
    log = open(tmp_path / "sshd.log", "wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stderr=log, stdout=log,
                            start_new_session=True)
    try:
        import time

        deadline = time.monotonic() + 10
        while f"port {port}" not in (tmp_path / "sshd.log").read_text(errors="replace"):
            assert proc.poll() is None, (tmp_path / "sshd.log").read_text()
            assert time.monotonic() < deadline, "sshd did not start"
            time.sleep(0.02)
        yield port, tmp_path / "client_key"
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
        log.close()


def _ssh_env(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    wrapper = bindir / "kite"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m kite "$@"\n')
    wrapper.chmod(0o755)
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}


def _ssh_opts(key, proxy):
    return ["-F", "/dev/null", "-i", str(key), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=30", "-o", f"ProxyCommand={proxy}"]


@pytest.mark.slow
def test_ssh_and_scp_through_pagekite_relay_with_kite_connect(tmp_path, pagekite, sshd):
    sshd_port, key = sshd
    name = f"box.{ZONE}"
    fe = pagekite.frontend(tls=False)
    # zchunks=False: the re-connect registration, which pagekite.py's own frontend does not
    # drop at a PING from its backend (an in-band one it does, even mid-transfer: §13.2).
    be = pagekite.backend(fe.port, [("raw-22", name, sshd_port)], zchunks=False)
    be.wait(be_flying_marker(fe.port, "raw-22", name), timeout=60)
    fe.wait(fe_live_marker("raw-22", name), timeout=60)
    env = _ssh_env(tmp_path)
    proxy = f"kite connect %h %p --relay 127.0.0.1:{fe.port}"
    r = subprocess.run(["ssh", *_ssh_opts(key, proxy), f"root@{name}", "echo", "over-pagekite"],
                       capture_output=True, env=env, timeout=90)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"over-pagekite\n"
    # scp 50 MB up and back through pagekite.py (it relays at a few MB/s: tens of seconds).
    data = os.urandom(50 << 20)
    src = tmp_path / "up.bin"
    src.write_bytes(data)
    r = subprocess.run(["scp", *_ssh_opts(key, proxy), str(src), f"root@{name}:{tmp_path}/remote.bin"],
                       capture_output=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["scp", *_ssh_opts(key, proxy), f"root@{name}:{tmp_path}/remote.bin",
                        str(tmp_path / "back.bin")], capture_output=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256((tmp_path / "back.bin").read_bytes()).digest() == \
        hashlib.sha256(data).digest()


def test_ssh_through_pagekite_relay_with_kite_forward(tmp_path, pagekite, sshd):
    sshd_port, key = sshd
    name = f"fwd.{ZONE}"
    fe = pagekite.frontend(tls=False)
    # zchunks=False: the re-connect registration, which pagekite.py's own frontend does not
    # drop at a PING from its backend (an in-band one it does, even mid-transfer: §13.2).
    be = pagekite.backend(fe.port, [("raw-22", name, sshd_port)], zchunks=False)
    be.wait(be_flying_marker(fe.port, "raw-22", name), timeout=60)
    fe.wait(fe_live_marker("raw-22", name), timeout=60)
    log = open(tmp_path / "forward.log", "wb")
    proc = subprocess.Popen(KITE + ["forward", "0", f"{name}:22", "--relay",
                                    f"127.0.0.1:{fe.port}"], stderr=log, stdout=log,
                            start_new_session=True)
    try:
        import time

        deadline = time.monotonic() + 20
        while True:
            m = re.search(r"forwarding 127\.0\.0\.1:(\d+)",
                          (tmp_path / "forward.log").read_text(errors="replace"))
            if m:
                break
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "forward.log").read_text()
            time.sleep(0.02)
        lport = m.group(1)
        r = subprocess.run(["ssh", "-F", "/dev/null", "-i", str(key), "-p", lport,
                            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "root@127.0.0.1",
                            "echo", "forwarded"], capture_output=True, timeout=90)
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"forwarded\n"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(10)
        log.close()
