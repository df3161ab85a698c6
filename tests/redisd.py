"""A real ``redis-server`` (Debian ``redis-server``) for the tests: on a loopback port, with
persistence off and its own working directory, started and killed by PID by the fixture
(the packaged service, if any, is never touched)."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from support import Proc, free_port


def redis_server_path() -> str:
    exe = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if exe is None:
        if os.environ.get("CI"):
            raise AssertionError("redis-server is missing (.ci/run installs redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return exe


class RedisServer:
    """One redis-server; ``url(db)`` names a database on it."""

    def __init__(self, tmp_path: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or free_port()
        args = [redis_server_path(), "--bind", host, "--port", str(self.port),
                "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
                "--protected-mode", "no", "--databases", "64"]
        self.proc = Proc(args, tmp_path, f"redis-{self.port}")
        self.wait_ready()

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.proc.poll() is not None:
                raise AssertionError(f"redis-server exited:\n{self.proc.output()}")
            time.sleep(0.02)
        raise AssertionError(f"redis-server not ready in {timeout} s:\n{self.proc.output()}")

    def stop(self) -> None:
        self.proc.stop()
