"""The account registry (kite.store): values, names that belong to one account, idempotent
usage flushes, and ``kite accounts`` on bad input (one line, exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import threading

import pytest

from kite.errors import StoreError
from kite.store import UsageBatch, check_email, check_name, check_protos, parse_size
from kite.store.sqlite import SqliteStore
from support import KITE


@pytest.mark.parametrize("text,n", [("2.5GB", 2_500_000_000), ("500MB", 500_000_000),
                                    ("1234", 1234), ("10k", 10_000), ("0", 0), ("1 TB", 10**12)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "-5MB", "5XB", "1e9", "5MBB", "1.2.3GB", "99999999TB"])
def test_bad_sizes(text):
    with pytest.raises(StoreError):
        parse_size(text)


@pytest.mark.parametrize("bad", ["é@x.org", "a@b", "a b@x.org", "x@x.org'; --", "@x.org"])
def test_bad_emails(bad):
    with pytest.raises(StoreError):
        check_email(bad)


@pytest.mark.parametrize("bad", ["x'; drop table kites;--", "com", "a..b", "ünï.example", "*"])
def test_bad_names(bad):
    with pytest.raises(StoreError):
        check_name(bad)


def test_protos():
    assert check_protos("http, raw-22") == {"http", "raw-22"}
    for bad in ("", "ftp", "raw-99999"):
        with pytest.raises(StoreError):
            check_protos(bad)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    from redisd import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    """Each registry test runs on both stores: the SQLite file and Redis."""
    if request.param == "sqlite":
        s = SqliteStore(str(tmp_path / "kite.db"))
    else:
        import redis

        from kite.store.redis import RedisStore

        url = request.getfixturevalue("redis_server").url(1)
        redis.Redis.from_url(url).flushdb()
        s = RedisStore(url)
    yield s
    s.close()


def test_file_mode_and_secret_not_in_repr(store):
    if isinstance(store, SqliteStore):
        assert os.stat(store.path).st_mode & 0o777 == 0o600
    acct = store.add_account("a@x.org", 100, None)
    assert acct.secret not in repr(acct) and len(acct.secret) >= 24


def test_names_belong_to_one_account(store):
    store.add_account("a@x.org", 100, None)
    store.add_account("b@x.org", 100, None)
    store.set_kite("a@x.org", "a.example.com", frozenset({"http"}))
    with pytest.raises(StoreError, match="taken"):
        store.set_kite("b@x.org", "a.example.com", frozenset({"http"}))
    with pytest.raises(StoreError, match="taken"):  # wildcards only under its own names
        store.set_kite("b@x.org", "*.a.example.com", frozenset({"http"}))
    with pytest.raises(StoreError, match="first"):
        store.set_kite("b@x.org", "*.b.example.com", frozenset({"http"}))
    store.set_kite("b@x.org", "x.a.example.com", frozenset({"http"}))
    with pytest.raises(StoreError, match="another account"):
        store.set_kite("a@x.org", "*.a.example.com", frozenset({"http"}))
    store.remove_kite("b@x.org", "x.a.example.com")
    store.set_kite("a@x.org", "*.a.example.com", frozenset({"http"}))
    with pytest.raises(StoreError, match="taken"):
        store.set_kite("b@x.org", "y.a.example.com", frozenset({"http"}))
    with pytest.raises(StoreError, match="no kite"):
        store.remove_kite("b@x.org", "a.example.com")


def test_flush_is_idempotent_and_daily(store):
    a = store.add_account("a@x.org", 1000, None)
    store.set_kite("a@x.org", "a.example.com", frozenset({"http"}))
    batch = UsageBatch(1, "2026-01-01", {a.id: 300}, {"a.example.com": 300},
                       [("http", "a.example.com", True)])
    assert store.flush("r1", batch) is True
    assert store.flush("r1", batch) is False  # a retry of an applied flush counts nothing
    assert store.last_seq("r1") == 1
    store.flush("r1", UsageBatch(2, "2026-01-02", {a.id: 900}, {"a.example.com": 900}))
    info = store.show("a@x.org", 0)
    assert info["total_bytes"] == 1200 and info["quota_bytes"] == 0  # floors at 0
    assert info["kites"][0] == {"name": "a.example.com", "protos": ["http"],
                                "total_bytes": 1200, "online": ["http"]}
    day1, day2 = 1767225600, 1767312000  # 2026-01-01, 2026-01-02 (UTC)
    assert [store.show("a@x.org", t)["today_bytes"] for t in (day1, day2)] == [300, 900]
    assert store.set_quota("a@x.org", 500, add=True).quota_bytes == 500
    store.remove_account("a@x.org")
    assert store.snapshot().kites == {}


def test_concurrent_top_ups(store):
    store.add_account("a@x.org", 0, None)
    again = (lambda: SqliteStore(store.path)) if isinstance(store, SqliteStore) else (
        lambda: type(store)(store.url))

    def top_up():
        s = again()
        for _ in range(20):
            s.set_quota("a@x.org", 1, add=True)
        s.close()

    threads = [threading.Thread(target=top_up) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.show("a@x.org", 0)["quota_bytes"] == 120


def _kite(*args):
    return subprocess.run([*KITE, "accounts", *args], capture_output=True, text=True,
                          timeout=60)


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    db = str(tmp_path / "kite.db")
    out = _kite("add", "a@x.org", "--quota", "1MB", "--json", "--db", db)
    assert out.returncode == 0 and json.loads(out.stdout)["quota_bytes"] == 1_000_000
    _kite("kite", "a@x.org", "a.example.com", "--db", db)
    _kite("add", "b@x.org", "--db", db)
    for args in (["add", "a@x.org"], ["add", "é@x.org"], ["quota", "a@x.org", "lots"],
                 ["kite", "b@x.org", "a.example.com"], ["kite", "b@x.org", "x'; drop--"],
                 ["kite", "a@x.org", "b.example.com", "--protos", "ftp"],
                 ["show", "nobody@x.org"], ["list", "--db", str(tmp_path)],
                 ["list", "--db", str(tmp_path / "no" / "such" / "dir.db")]):
        out = _kite(*args, *([] if "--db" in args else ["--db", db]))
        assert out.returncode == 2, (args, out)
        assert out.stderr.startswith("kite: error: ") and out.stderr.count("\n") == 1, out.stderr
    assert "taken" in _kite("kite", "b@x.org", "a.example.com", "--db", db).stderr
    listing = json.loads(_kite("list", "--json", "--db", db).stdout)
    assert [r["email"] for r in listing] == ["a@x.org", "b@x.org"]
    assert "secret" not in json.dumps(listing) and "secret" not in _kite("show", "a@x.org",
                                                                           "--db", db).stdout


def test_cli_locked_db_is_a_clear_error(tmp_path):
    import sqlite3

    db = str(tmp_path / "kite.db")
    _kite("add", "a@x.org", "--db", db)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        env = dict(os.environ)
        out = subprocess.run([*KITE, "accounts", "quota", "a@x.org", "+1", "--db", db],
                             capture_output=True, text=True, timeout=60, env=env)
    finally:
        holder.execute("ROLLBACK")
    assert out.returncode == 2 and "locked" in out.stderr, out.stderr


def test_relay_config_db(tmp_path):
    from kite.errors import ConfigError
    from kite.relay.config import build_relay_config

    p = tmp_path / "relay.toml"
    p.write_text('db = "accounts.db"\nlisten = ["127.0.0.1:0"]\n')
    cfg = build_relay_config(config_file=str(p))
    assert cfg.db == str(tmp_path / "accounts.db") and not len(cfg.grants)  # beside the file
    assert build_relay_config(db="x.db", kites=["http:a.example.com:s"]).db == "x.db"
    with pytest.raises(ConfigError, match="--db"):
        build_relay_config()


def test_relay_config_signup():
    from kite.errors import ConfigError
    from kite.relay.config import build_relay_config

    cfg = build_relay_config(db="x.db", signup="Kites.Example.com", signup_quota="1GB")
    assert (cfg.signup_zone, cfg.signup_quota, cfg.signup_per_hour) == \
        ("kites.example.com", 10**9, 5)
    for kw in ({"signup": "kites.example.com"}, {"db": "x.db", "signup": "bad zone"},
               {"db": "x.db", "signup": "k.example.com", "signup_quota": "lots"}):
        with pytest.raises(ConfigError, match="--signup"):
            build_relay_config(kites=["http:a.example.com:s"], **kw)


def test_flush_charges_what_the_relay_says(store):
    """Bytes past the quota (before the relay's cut) count in the totals, and are not taken
    from a top-up that landed before the flush."""
    a = store.add_account("a@x.org", 1000, None)
    store.set_quota("a@x.org", 5000, add=True)  # the top-up lands first
    store.flush("r", UsageBatch(1, "2026-01-01", {a.id: 9000}, {}, [], {a.id: 1000}))
    info = store.show("a@x.org", 0)
    assert info["quota_bytes"] == 5000 and info["total_bytes"] == 9000


def online_relays(store) -> list:
    """The relay ids with presence rows, in either store."""
    if isinstance(store, SqliteStore):
        return [r for (r,) in store.db.execute("SELECT DISTINCT relay FROM presence ORDER BY relay")]
    return sorted({f.split(" ", 1)[0] for f in store.r.hkeys(store._k("online"))})


def test_two_relay_ids_on_one_db_keep_their_own_presence_and_flushes(store):
    """Relays sharing a database (kite relay --relay-id): each has its own flush sequence
    and presence rows, so neither drops the other's counts or online kites."""
    a = store.add_account("a@x.org", 10_000, None)
    store.set_kite("a@x.org", "a.example.com", frozenset({"http"}))
    for relay, n in (("eu", 100), ("us", 200)):
        assert store.last_seq(relay) == 0
        batch = UsageBatch(1, "2026-01-01", {a.id: n}, {"a.example.com": n},
                           [("http", "a.example.com", True)])
        assert store.flush(relay, batch) is True  # seq 1 of "us" is not "eu"'s seq 1
    assert (store.last_seq("eu"), store.last_seq("us")) == (1, 1)
    assert store.flush("eu", UsageBatch(1, "2026-01-01", {a.id: 100})) is False
    info = store.show("a@x.org", 0)
    assert info["total_bytes"] == 300 and info["quota_bytes"] == 9_700
    assert online_relays(store) == ["eu", "us"]
    store.reset_presence("eu")  # the eu relay restarts
    assert online_relays(store) == ["us"]
    assert store.show("a@x.org", 0)["kites"][0]["online"] == ["http"]


def test_relay_config_relay_id(tmp_path):
    from kite.errors import ConfigError
    from kite.relay.config import build_relay_config

    assert build_relay_config(db="x.db").relay_id is None  # the server's default: "relay"
    assert build_relay_config(db="x.db", relay_id="eu-1.example_a").relay_id == "eu-1.example_a"
    p = tmp_path / "relay.toml"
    p.write_text('db = "x.db"\nrelay_id = "us2"\n')
    assert build_relay_config(config_file=str(p)).relay_id == "us2"
    assert build_relay_config(config_file=str(p), relay_id="cli").relay_id == "cli"  # option wins
    for bad in ("", "-x", "a b", "x" * 65, "é", "a/b", "a\nb"):
        with pytest.raises(ConfigError, match="--relay-id"):
            build_relay_config(db="x.db", relay_id=bad)
    p.write_text('db = "x.db"\nrelay_id = 7\n')
    with pytest.raises(ConfigError, match="relay_id"):
        build_relay_config(config_file=str(p))


@pytest.mark.parametrize("bad", ["a b", "--", "x" * 65])
def test_cli_bad_relay_id_is_one_line_exit_2(tmp_path, bad):
    out = subprocess.run([*KITE, "relay", "--db", str(tmp_path / "k.db"), f"--relay-id={bad}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--relay-id" in lines[0], out.stderr


def test_redis_changes_since_gives_only_what_changed(redis_server):
    """The Redis store logs what each change touched: a relay at version V reads only that."""
    import redis as redis_py

    from kite.store.redis import RedisStore

    url = redis_server.url(6)
    redis_py.Redis.from_url(url).flushdb()
    s = RedisStore(url)
    a = s.add_account("a@x.org", 100, None)
    s.set_kite("a@x.org", "a.example.com", frozenset({"http"}))
    s.set_kite("a@x.org", "b.example.com", frozenset({"http"}))
    v = s.data_version()
    assert s.changes_since(v) == (v, {}, {})
    s.set_quota("a@x.org", 500, add=False)
    s.remove_kite("a@x.org", "b.example.com")
    now, accounts, kites = s.changes_since(v)
    assert now == s.data_version() == v + 2
    assert accounts[a.id].quota_bytes == 500 and kites == {"b.example.com": None}
    s.remove_account("a@x.org")
    _, accounts, kites = s.changes_since(now)
    assert accounts == {a.id: None} and kites == {"a.example.com": None}
    redis_py.Redis.from_url(url).flushdb()  # a replaced registry: read it whole
    assert s.changes_since(now) is None
    s.close()
