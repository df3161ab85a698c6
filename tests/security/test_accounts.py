"""Accounts on a real relay process (``kite relay --db``): quotas cut a kite off and a
top-up brings it back with the same backend, counts are what curl moved and survive
``kill -9``, removed kites stop flying, concurrent ``kite accounts`` lose no update.
(issue 13)"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from support import KITE, Proc, free_port, wait_until

MB = 1000 * 1000
NAME = "alice.acct.kite"


def accounts(db, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([*KITE, "accounts", *args, "--db", str(db)], capture_output=True,
                         text=True, timeout=60)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def show(db) -> dict:
    return json.loads(accounts(db, "show", "a@x.org", "--json").stdout)


def curl(port: int, path: str, *args: str, host: str = NAME) -> tuple[int, int, str, int]:
    """(curl's exit status, HTTP status, body head, bytes downloaded) of GET path."""
    out = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code} %{size_download}",
                          "-H", f"Host: {host}", *args, f"http://127.0.0.1:{port}{path}"],
                         capture_output=True, timeout=60)
    body, _, tail = out.stdout.rpartition(b"\n")
    code, size = tail.decode().split()
    return out.returncode, int(code), body[:400].decode(errors="replace"), int(size)


def slow_get(port: int, path: str, rate: int, host: str = NAME,
             addr: str = "127.0.0.1") -> tuple[bool, int]:
    """(whether the response ended well, bytes received) of GET path, read at ``rate`` bytes
    a second through a 64 KiB receive buffer.  The small buffer (curl's autotunes, up to
    tcp_rmem's maximum: 32 MiB on some hosts) bounds what can sit between the relay and
    the reader when the relay cuts the stream: a cut shows after ~64 KiB, not after
    however many megabytes the kernel had queued."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # before connect
        sock.settimeout(30)
        sock.connect((addr, port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                     .encode())
        got = 0
        start = time.monotonic()
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                return False, got
            if not data:
                return True, got
            got += len(data)
            ahead = got / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)  # pacing the reader, not waiting for an event


@pytest.fixture
def site(tmp_path):
    """A static HTTP server with /f4 (4 MB), /f1 (1 MB) and /f20 (20 MB)."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "f4").write_bytes(b"x" * (4 * MB))
    (www / "f1").write_bytes(b"y" * MB)
    (www / "f20").write_bytes(b"z" * (20 * MB))
    port = free_port()
    proc = Proc([sys.executable, "-m", "http.server", "-b", "127.0.0.1", "-d", str(www),
                 str(port)], tmp_path, "www")
    proc.wait_for("Serving HTTP", timeout=20)
    yield port
    proc.stop(signal.SIGKILL)


@pytest.fixture
def account(tmp_path):
    """db path, secret of a@x.org (5 MB quota) flying alice.acct.kite (http)."""
    db = tmp_path / "kite.db"
    info = json.loads(accounts(db, "add", "a@x.org", "--quota", "5MB", "--json").stdout)
    assert info["quota_bytes"] == 5 * MB and info["email"] == "a@x.org"
    accounts(db, "kite", "a@x.org", NAME, "--protos", "http")
    return db, info["secret"]


def test_quota_cut_off_and_top_up(account, site, relay_process, expose_process):
    db, secret = account
    relay = relay_process("--db", str(db), grants=())
    backend = expose_process(f"127.0.0.1:{site}", NAME, relay, secret=secret)
    rc, code, _, size = curl(relay.port, "/f4")
    assert (rc, code, size) == (0, 200, 4 * MB)
    # A slow download crosses 5 MB: cut within a second or so.  What the reader gets is
    # the 1 MB left, what the relay wrote before its next look (every 0.5 s), and what the
    # socket buffers held (a 64 KiB receive buffer here; the relay's send buffer).
    ended_well, size = slow_get(relay.port, "/f20", 2 * MB)
    assert not ended_well and size < 14 * MB, size
    rc, code, body, _ = curl(relay.port, "/f1")
    assert code == 403 and "quota" in body, body
    accounts(db, "quota", "a@x.org", "+10MB")
    wait_until(lambda: curl(relay.port, "/f1")[1] == 200, 5, "top-up brings the kite back")
    rc, code, _, size = curl(relay.port, "/f4")
    assert (rc, code, size) == (0, 200, 4 * MB)
    assert backend.proc.poll() is None  # the same backend process all along
    assert "account a@x.org blocked: quota" in relay.proc.output()


def test_counts_match_curl_and_survive_kill(account, site, relay_process, expose_process):
    db, secret = account
    accounts(db, "quota", "a@x.org", "100MB")
    relay = relay_process("--db", str(db), grants=())
    expose_process(f"127.0.0.1:{site}", NAME, relay, secret=secret)
    moved = 0
    for _ in range(3):
        rc, code, _, size = curl(relay.port, "/f4")
        assert (rc, code) == (0, 200)
        moved += size
    time.sleep(3.5)  # past a flush
    relay.proc.stop(signal.SIGKILL)
    info = show(db)
    assert moved <= info["total_bytes"] <= moved * 1.01, (moved, info)
    assert info["today_bytes"] == info["period_bytes"] == info["total_bytes"]
    assert info["quota_bytes"] == 100 * MB - info["total_bytes"]
    assert info["kites"][0]["total_bytes"] == info["total_bytes"]
    # A new relay on the same database continues: nothing counted twice.
    relay2 = relay_process("--db", str(db), grants=())
    time.sleep(3.5)
    relay2.proc.stop(signal.SIGTERM)
    assert show(db)["total_bytes"] == info["total_bytes"]


def test_removed_kite_stops_flying_and_handshake_reasons(account, site, relay_process,
                                                         expose_process):
    db, secret = account
    relay = relay_process("--db", str(db), grants=("http:static.test.kite:other",))
    expose_process(f"127.0.0.1:{site}", NAME, relay, secret=secret)
    wait_until(lambda: show(db)["kites"][0]["online"] == ["http"], 5, "presence written")
    accounts(db, "kite", "a@x.org", NAME, "--remove")
    wait_until(lambda: curl(relay.port, "/f1")[1] == 404, 3, "a removed kite stops flying")
    wait_until(lambda: not show(db)["kites"], 3, "removed from show")
    # Back, but the account is out of quota: the handshake says so (pagekite's reason).
    accounts(db, "kite", "a@x.org", NAME, "--protos", "http")
    accounts(db, "quota", "a@x.org", "0")
    time.sleep(1.5)
    refused = expose_process(f"127.0.0.1:{site}", NAME, relay, wait=False, secret=secret)
    refused.wait_for(f"refused kite http:{NAME}: quota", timeout=20)
    accounts(db, "quota", "a@x.org", "5MB")
    accounts(db, "disable", "a@x.org")
    time.sleep(1.5)
    refused = expose_process(f"127.0.0.1:{site}", NAME, relay, wait=False, secret=secret)
    refused.wait_for(f"refused kite http:{NAME}: unauthorized", timeout=20)


def test_concurrent_accounts_commands_lose_nothing(account, site, relay_process,
                                                   expose_process):
    db, secret = account
    relay = relay_process("--db", str(db), grants=())
    expose_process(f"127.0.0.1:{site}", NAME, relay, secret=secret)
    with ThreadPoolExecutor(8) as pool:
        traffic = pool.submit(lambda: [curl(relay.port, "/f1") for _ in range(4)])
        list(pool.map(lambda _: accounts(db, "quota", "a@x.org", "+1MB"), range(16)))
        assert all(r[1] == 200 for r in traffic.result())
    time.sleep(3.5)
    info = show(db)
    assert info["quota_bytes"] == 21 * MB - info["total_bytes"]
    assert info["total_bytes"] >= 4 * MB


def test_sigterm_flushes_the_last_counts(account, site, relay_process, expose_process):
    db, secret = account
    relay = relay_process("--db", str(db), grants=())
    expose_process(f"127.0.0.1:{site}", NAME, relay, secret=secret)
    assert curl(relay.port, "/f1")[1] == 200
    relay.proc.stop(signal.SIGTERM)  # before the next periodic flush
    assert MB <= show(db)["total_bytes"] <= MB * 1.01


def test_relay_with_a_db_it_cannot_open(tmp_path):
    out = subprocess.run([*KITE, "relay", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "no" / "x.db")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "cannot open the database" in out.stderr, out.stderr


def test_big_registry_starts_and_changes_fast(tmp_path, relay_process):
    """10,000 accounts with 100,000 kites: the relay starts and sees a change; the times and
    the RSS are printed (figures, not assertions: tests never assert on timings)."""
    import secrets as secrets_

    from kite.store.sqlite import SqliteStore

    db = tmp_path / "big.db"
    store = SqliteStore(str(db))
    now = time.time()
    with store._tx():
        store.db.executemany(
            "INSERT INTO accounts (email, secret, quota_bytes, created) VALUES (?, ?, ?, ?)",
            ((f"u{i}@x.org", secrets_.token_urlsafe(24), 10**9, now) for i in range(10000)))
        store.db.executemany(
            "INSERT INTO kites (name, account_id, protos) VALUES (?, ?, 'http')",
            ((f"k{i}.u{i % 10000}.big.kite", i % 10000 + 1) for i in range(100000)))
    store.close()
    t0 = time.monotonic()
    relay = relay_process("--db", str(db), grants=())
    started = time.monotonic() - t0
    assert curl(relay.port, "/", host="k5.u5.big.kite")[1] == 503  # known, offline
    assert curl(relay.port, "/", host="new.u7.big.kite")[1] == 404
    t0 = time.monotonic()
    accounts(db, "kite", "u7@x.org", "new.u7.big.kite")
    wait_until(lambda: curl(relay.port, "/", host="new.u7.big.kite")[1] == 503, 30,
               "a new kite is known")
    seen = time.monotonic() - t0
    print(f"\n100,000 kites: start {started:.2f} s (process included), change seen in "
          f"{seen:.2f} s, RSS {relay.rss_kib() / 1024:.0f} MiB")


def test_wire_quota_headers_chunks_and_reasons(tmp_path, relay_process):
    """pagekite's view: X-PageKite-Quota (kB) and QDays at registration, Quota chunks when
    it changes, reject reasons quota / nodays / unauthorized."""
    import sqlite3

    from pkpeer import fly

    from kite.proto import control

    db = tmp_path / "kite.db"
    secret = json.loads(accounts(db, "add", "a@x.org", "--quota", "5MB", "--days", "10",
                                 "--json").stdout)["secret"]
    accounts(db, "kite", "a@x.org", NAME)
    relay = relay_process("--db", str(db), grants=())
    peer, reply, _ = fly(relay.port, NAME, secret)
    assert [r.kite for r in reply.ok] == [f"http:{NAME}"]
    assert reply.quota == 5 * MB // 1024 and reply.q_days == 9, reply.headers
    assert peer.wait_event(control.Quota).quota == 5 * MB // 1024
    accounts(db, "quota", "a@x.org", "0")
    assert peer.wait_event(control.Quota, timeout=3).quota == 0
    for change, reason in (("UPDATE accounts SET quota_bytes = 0", "quota"),
                           ("UPDATE accounts SET quota_bytes = 9, expires = 1", "nodays"),
                           ("UPDATE accounts SET expires = NULL, disabled = 1", "unauthorized")):
        with sqlite3.connect(db) as conn:
            conn.execute(change)
        time.sleep(1.2)
        _, reply, _ = fly(relay.port, NAME, secret)
        assert [(r.kite, why) for r, why in reply.invalid] == [(f"http:{NAME}", reason)]
    peer.close()


def _signup(relay, body, *args, https: bool = True) -> tuple[int, dict]:
    url = f"{'https' if https else 'http'}://localhost:{relay.port}"
    out = subprocess.run(["curl", "-s", "--cacert", relay.cert, "-w", "\n%{http_code}",
                          "-H", "Content-Type: application/json", "--data-binary", body, *args,
                          url + "/api/signup"], capture_output=True, text=True, timeout=30)
    text, _, code = out.stdout.rpartition("\n")
    return int(code), json.loads(text) if text.strip() else {}


def test_signup_over_https_then_fly(tmp_path, site, relay_process, expose_process):
    db = tmp_path / "kite.db"
    relay = relay_process("--db", str(db), "--signup", "signup.kite", "--signup-quota", "50MB",
                          grants=())
    code, got = _signup(relay, json.dumps({"email": "new@x.org", "kite": "bob.signup.kite"}))
    assert code == 200 and got["kite"] == "bob.signup.kite" and got["quota_bytes"] == 50 * MB
    expose_process(f"127.0.0.1:{site}", "bob.signup.kite", relay, secret=got["secret"])
    assert curl(relay.port, "/f1", host="bob.signup.kite")[1] == 200
    for body, want, word in (
            ('{"email": "b@x.org", "kite": "bob.signup.kite"}', 409, "taken"),
            ('{"email": "new@x.org", "kite": "eve.signup.kite"}', 409, "exists"),
            ('{"email": "b@x.org", "kite": "eve.other.kite"}', 403, "zone"),
            ('{"email": "b@x.org", "kite": "a.b.signup.kite"}', 403, "zone"),
            ('{"email": "\\u00e9@x.org", "kite": "eve.signup.kite"}', 400, "email"),
            ('{"email": "b@x.org", "kite": "x\'; drop table kites;--.signup.kite"}', 400,
             "kite name"),
            ('{"email": "b@x.org", "kite": ', 400, "JSON"),
            ('[1, 2]', 400, "required"),
            ("x" * 5000, 413, "body")):
        code, got = _signup(relay, body, https=want != 413)
        assert code == want and word in got["error"], (body, code, got)
    # At most 5 sign-ups an hour from one address (one went through above).
    codes = [_signup(relay, json.dumps({"email": f"u{i}@x.org", "kite": f"u{i}.signup.kite"}))[0]
             for i in range(5)]
    assert codes == [200, 200, 200, 200, 429], codes
    assert relay.alive()


def test_expose_signup_saves_the_secret(tmp_path, site, relay_process, expose_process,
                                        monkeypatch):
    import os

    secrets_file = tmp_path / "cfg" / "secrets.json"
    monkeypatch.setenv("KITE_SECRETS", str(secrets_file))
    relay = relay_process("--db", str(tmp_path / "kite.db"), "--signup", "signup.kite",
                          grants=())
    first = expose_process(f"127.0.0.1:{site}", "carol.signup.kite", relay, "--signup",
                           "carol@x.org", secret="")
    assert "signed up carol@x.org for carol.signup.kite" in first.output()
    assert os.stat(secrets_file).st_mode & 0o777 == 0o600
    assert list(json.loads(secrets_file.read_text())) == ["carol.signup.kite"]
    assert curl(relay.port, "/f1", host="carol.signup.kite")[1] == 200
    first.stop(signal.SIGKILL)
    expose_process(f"127.0.0.1:{site}", "carol.signup.kite", relay, secret="")  # saved secret
    assert curl(relay.port, "/f1", host="carol.signup.kite")[1] == 200
    taken = expose_process(f"127.0.0.1:{site}", "carol.signup.kite", relay, "--signup",
                           "dave@x.org", secret="", wait=False)
    assert taken.proc.wait(30) == 1
    assert "refused the sign-up: kite name 'carol.signup.kite' is taken" in taken.output()


def test_per_kite_limits(account, site, relay_process, expose_process):
    db, secret = account
    accounts(db, "quota", "a@x.org", "100MB")
    relay = relay_process("--db", str(db), grants=())
    expose_process(f"127.0.0.1:{site}", NAME, relay, secret=secret)
    assert curl(relay.port, "/f1")[1] == 200
    accounts(db, "limits", "a@x.org", NAME, "--deny", "127.0.0.0/8")
    time.sleep(1.2)
    code, body = curl(relay.port, "/f1")[1:3]
    assert code == 403 and "does not take visitors from 127.0.0.1" in body, body
    accounts(db, "limits", "a@x.org", NAME, "--allow", "10.0.0.0/8")
    time.sleep(1.2)
    assert curl(relay.port, "/f1")[1] == 403
    accounts(db, "limits", "a@x.org", NAME, "--rate", "3")
    time.sleep(1.2)
    time.sleep(1 - time.monotonic() % 1 + 0.05)  # not across a second boundary, mostly
    codes = [curl(relay.port, "/", "-I")[1] for _ in range(5)]
    assert codes.count(403) >= 1 and codes[0] == 200, codes
    accounts(db, "limits", "a@x.org", NAME, "--max-visitors", "1")
    time.sleep(1.2)
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(curl, relay.port, "/f20", "--limit-rate", "1M", "--max-time", "3")
        time.sleep(0.5)
        code, body = curl(relay.port, "/f1")[1:3]
        assert code == 403 and "maximum of 1 visitors" in body, body
        assert slow.result()[1] == 200
    wait_until(lambda: curl(relay.port, "/f1")[1] == 200, 3, "the visitor left: room again")
    assert show(db)["kites"][0]["limits"] == {"max_visitors": 1}
    assert accounts(db, "limits", "a@x.org", NAME, "--allow", "10.0.0.300/8",
                    check=False).returncode == 2


def test_locked_database_keeps_serving(account, site, relay_process, expose_process):
    """A database locked for longer than the busy timeout: the relay serves on with the last
    good registry and its counts, and writes them once the lock is gone (once only)."""
    import sqlite3

    db, secret = account
    accounts(db, "quota", "a@x.org", "100MB")
    relay = relay_process("--db", str(db), grants=())
    expose_process(f"127.0.0.1:{site}", NAME, relay, secret=secret)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        moved = 0
        for _ in range(3):
            rc, code, _, size = curl(relay.port, "/f1")
            assert (rc, code) == (0, 200)
            moved += size
        time.sleep(7)  # past the 5 s busy timeout: a flush failed
        assert curl(relay.port, "/f1")[1] == 200
        moved += MB
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "will retry" in relay.proc.output()
    time.sleep(3.5)
    assert moved <= show(db)["total_bytes"] <= moved * 1.01


def test_two_relays_with_their_own_ids_share_one_db(account, site, relay_process,
                                                    expose_process):
    """kite relay --relay-id: two relays on one database each count their own traffic
    (neither relay's numbered flushes are taken for the other's) and keep their own
    presence (one stopping leaves the other's kites online)."""
    db, secret = account
    accounts(db, "quota", "a@x.org", "100MB")
    other = json.loads(accounts(db, "add", "b@x.org", "--quota", "100MB", "--json").stdout)
    accounts(db, "kite", "b@x.org", "bob.acct.kite", "--protos", "http")
    eu = relay_process("--db", str(db), "--relay-id", "eu", grants=())
    us = relay_process("--db", str(db), "--relay-id", "us", grants=())
    expose_process(f"127.0.0.1:{site}", NAME, eu, secret=secret)
    expose_process(f"127.0.0.1:{site}", "bob.acct.kite", us, secret=other["secret"])
    for _ in range(2):  # several flushes on each side
        assert curl(eu.port, "/f1")[1] == 200
        assert curl(us.port, "/f1", host="bob.acct.kite")[1] == 200
        time.sleep(2.5)

    def both() -> bool:
        a, b = show(db), json.loads(accounts(db, "show", "b@x.org", "--json").stdout)
        return (a["kites"][0]["online"] == ["http"] and b["kites"][0]["online"] == ["http"]
                and 2 * MB <= a["total_bytes"] and 2 * MB <= b["total_bytes"])

    wait_until(both, 5, "both relays' counts and presence in the db")
    assert "relay id eu" in eu.log() and "relay id us" in us.log()
    eu.proc.stop(signal.SIGTERM)
    b = json.loads(accounts(db, "show", "b@x.org", "--json").stdout)
    assert show(db)["kites"][0]["online"] == [] and b["kites"][0]["online"] == ["http"]
    assert 2 * MB <= show(db)["total_bytes"] <= 2 * MB * 1.01
