"""The account registry in Redis (``kite relay --redis``, ``kite accounts --redis``) on a
real relay process and a real ``redis-server``: an account made with ``kite accounts
--redis`` flies, its bytes are counted in Redis within 1 % of what curl moved and survive
``kill -9`` of the relay, the quota cuts the kite off and a top-up brings it back.
(issue 16, the registry; issue 13's accounting on the fleet's store)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from test_accounts import (  # noqa: F401 - site: a fixture
    MB,
    NAME,
    curl,
    site,
    slow_get,
    wait_until,
)

from redisd import RedisServer
from support import KITE


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    os.kill(server.proc.pid, signal.SIGCONT)  # in case a test left it stopped
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    return redis_server.url(2)


def accounts(url: str, *args: str) -> str:
    out = subprocess.run([*KITE, "accounts", "--redis", url, *args], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_redis_registry_counts_quota_and_kill(redis_url, site, relay_process,  # noqa: F811
                                             expose_process):
    info = json.loads(accounts(redis_url, "add", "a@x.org", "--quota", "50MB", "--json"))
    accounts(redis_url, "kite", "a@x.org", NAME, "--protos", "http")
    relay = relay_process("--redis", redis_url, grants=())
    expose_process(f"127.0.0.1:{site}", NAME, relay, secret=info["secret"])
    moved = 0
    for _ in range(2):
        rc, code, _, size = curl(relay.port, "/f4")
        assert (rc, code, size) == (0, 200, 4 * MB)
        moved += size

    def counted():
        shown = json.loads(accounts(redis_url, "show", "a@x.org", "--json"))
        return shown if shown["total_bytes"] >= moved else None

    shown = wait_until(counted, 10, "the relay flushes its counts to Redis")
    relay.proc.stop(signal.SIGKILL)
    shown = json.loads(accounts(redis_url, "show", "a@x.org", "--json"))
    assert moved <= shown["total_bytes"] <= moved * 1.01, (moved, shown)
    assert shown["quota_bytes"] == 50 * MB - shown["total_bytes"]
    assert shown["today_bytes"] == shown["total_bytes"] == shown["kites"][0]["total_bytes"]

    # A new relay on the same Redis: the quota runs out, a top-up brings the kite back.
    accounts(redis_url, "quota", "a@x.org", "5MB")
    relay = relay_process("--redis", redis_url, grants=())
    backend = expose_process(f"127.0.0.1:{site}", NAME, relay, secret=info["secret"])
    rc, code, _, size = curl(relay.port, "/f4")
    assert (rc, code, size) == (0, 200, 4 * MB)
    ended_well, size = slow_get(relay.port, "/f20", 2 * MB)
    assert not ended_well and size < 14 * MB, size
    rc, code, body, _ = curl(relay.port, "/f1")
    assert code == 403 and "quota" in body, body
    accounts(redis_url, "quota", "a@x.org", "+10MB")
    wait_until(lambda: curl(relay.port, "/f1")[1] == 200, 5, "top-up brings the kite back")
    assert backend.proc.poll() is None


def test_redis_unreachable_keeps_serving_and_counts_catch_up(redis_server, redis_url, site,  # noqa: F811
                                                             relay_process, expose_process):
    """Redis stopped (SIGSTOP: connections hang, as with a network partition) for 10 s
    during traffic: visitors of the known kite see no error, and the relay's counts reach
    Redis once it answers again."""
    info = json.loads(accounts(redis_url, "add", "a@x.org", "--quota", "10GB", "--json"))
    accounts(redis_url, "kite", "a@x.org", NAME, "--protos", "http")
    relay = relay_process("--redis", redis_url, grants=())
    expose_process(f"127.0.0.1:{site}", NAME, relay, secret=info["secret"])
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    moved, t0 = 0, time.monotonic()
    try:
        while time.monotonic() - t0 < 10:
            rc, code, _, size = curl(relay.port, "/f1")
            assert (rc, code, size) == (0, 200, MB)
            moved += size
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    wait_until(lambda: json.loads(accounts(redis_url, "show", "a@x.org", "--json"))
               ["total_bytes"] >= moved, 30, "the counts of the outage reach Redis")
    assert "registry" in relay.log() and relay.alive()
