"""The registry in Redis, for a fleet of relays that share it (``kite relay --redis URL``).

The same :class:`~kite.store.Store` as the SQLite file, on redis-py's client.  Like the
SQLite store it is called from the registry's one database thread (the relay) or from
``kite accounts``, never on the event loop, so the blocking client is the right one here.

Keys (prefix ``kite:``), each a hash so that a snapshot is one ``MULTI`` of ``HGETALL``\\ s:

=====================  =========================================================
``kite:accounts``      id -> JSON {email, secret, expires, disabled, created}
``kite:emails``        email -> id
``kite:quota``         id -> bytes left (``HINCRBY``; floored at 0 by the flush)
``kite:period``        id -> bytes since the quota was last set
``kite:total``         id -> bytes ever
``kite:daily:ID``      YYYY-MM-DD -> bytes that day
``kite:kites``         name -> JSON {account, protos, limits}
``kite:kitebytes``     name -> bytes ever
``kite:flushes``       relay id -> last applied flush number
``kite:online``        "relay proto name" -> since (presence as each relay reports it)
``kite:version``       counter, bumped by every registry change (not by flushes)
``kite:changes``       sorted set: "a:ID" / "k:NAME" -> the version that last changed it
``kite:next_id``       the last account id given
=====================  =========================================================

A change is one ``MULTI``/``EXEC`` under ``WATCH`` of the keys it checked (an optimistic
transaction, retried when another writer got in between), so concurrent ``kite accounts``
commands never lose an update and a name still belongs to one account.  A usage flush is
one Lua script: it applies a flush number once (a retried flush changes nothing), like the
SQLite store's ``flushes`` table.  Each change also records what it touched, scored with
the version it made (one script in the same transaction), so a relay that knows version V
reads only what changed since (:meth:`RedisStore.changes_since`) instead of the whole
registry.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Callable, Optional

from ..errors import StoreError
from ..proto.names import domain_candidates
from . import NO_LIMITS, Account, Kite, Limits, Snapshot, UsageBatch, check_email, check_name

try:
    import redis
except ImportError:  # pragma: no cover - the [fleet] extra is not installed
    redis = None  # type: ignore[assignment]

__all__ = ["RedisStore", "open_redis_store", "PREFIX"]

PREFIX = "kite:"
#: Seconds a Redis command may take before the store reports an error.
SOCKET_TIMEOUT = 5.0
_RETRIES = 50  # optimistic transactions retried at most this often under contention

# Arguments: relay, seq, day, now, then JSON {"a": {id: [bytes, charged]}, "k": {name: bytes},
# "p": [[proto, name, online], ...]}.  Byte counts travel as strings (Lua numbers print
# large integers in exponent form).
_FLUSH = """
local p = ARGV[5]
local cur = tonumber(redis.call('HGET', p .. 'flushes', ARGV[1]) or '0')
if tonumber(ARGV[2]) <= cur then return 0 end
redis.call('HSET', p .. 'flushes', ARGV[1], ARGV[2])
local batch = cjson.decode(ARGV[6])
for aid, v in pairs(batch['a']) do
  if redis.call('HEXISTS', p .. 'accounts', aid) == 1 then
    if v[2] ~= '0' then
      local left = redis.call('HINCRBY', p .. 'quota', aid, '-' .. v[2])
      if left < 0 then redis.call('HSET', p .. 'quota', aid, '0') end
    end
    redis.call('HINCRBY', p .. 'period', aid, v[1])
    redis.call('HINCRBY', p .. 'total', aid, v[1])
    redis.call('HINCRBY', p .. 'daily:' .. aid, ARGV[3], v[1])
  end
end
for name, n in pairs(batch['k']) do
  if redis.call('HEXISTS', p .. 'kites', name) == 1 then
    redis.call('HINCRBY', p .. 'kitebytes', name, n)
  end
end
for _, e in ipairs(batch['p']) do
  local field = ARGV[1] .. ' ' .. e[1] .. ' ' .. e[2]
  if e[3] then redis.call('HSET', p .. 'online', field, ARGV[4])
  else redis.call('HDEL', p .. 'online', field) end
end
return 1
"""


# KEYS: version, changes; ARGV: the entities touched.  Runs inside the change's MULTI.
_LOG = """
local v = redis.call('INCR', KEYS[1])
for _, m in ipairs(ARGV) do redis.call('ZADD', KEYS[2], v, m) end
return v
"""


def open_redis_store(url: str) -> RedisStore:
    return RedisStore(url)


class RedisStore:
    """:class:`~kite.store.Store` on the Redis server at ``url`` (``redis://HOST:PORT/DB``)."""

    def __init__(self, url: str, prefix: str = PREFIX) -> None:
        if redis is None:
            raise StoreError("--redis needs the redis client: pip install 'kite-relay[fleet]'")
        self.url = url
        self.p = prefix
        self._touched: list = []  # what the change being made touches (see _change)
        try:
            self.r = redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT,
                                          socket_connect_timeout=SOCKET_TIMEOUT,
                                          decode_responses=True)
            self.r.ping()
            self._flush = self.r.register_script(_FLUSH)
        except (redis.RedisError, ValueError) as exc:
            raise StoreError(f"cannot reach Redis at {self._where()}: {exc}") from None

    def _where(self) -> str:
        # The URL without a password (redis://:PASS@host).
        head, sep, tail = self.url.rpartition("@")
        return ("redis://…@" + tail) if sep else self.url

    def close(self) -> None:
        self.r.close()

    def _k(self, name: str) -> str:
        return self.p + name

    # -- plumbing -------------------------------------------------------------------------------
    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except redis.RedisError as exc:
            raise StoreError(f"Redis at {self._where()}: {exc}") from None

    def _change(self, watch: list, body: Callable) -> Any:
        """Run ``body(pipe)`` as one optimistic transaction over the keys in ``watch``:
        ``body`` reads (immediate mode), then queues its writes after ``pipe.multi()``.
        Every change bumps ``kite:version`` (relays reload their snapshot)."""
        keys = [self._k(w) for w in watch]

        def attempt():
            with self.r.pipeline() as pipe:
                for _ in range(_RETRIES):
                    try:
                        pipe.watch(*keys)
                        self._touched = []
                        result = body(pipe)
                        pipe.eval(_LOG, 2, self._k("version"), self._k("changes"),
                                  *self._touched)
                        pipe.execute()
                        return result
                    except redis.WatchError:
                        continue
                raise StoreError("the registry is busy (too many concurrent changes); try again")

        return self._call(attempt)

    def _touch(self, kind: str, key) -> None:
        """Record that this change touches account ``key`` (kind "a") or kite (kind "k")."""
        self._touched.append(f"{kind}:{key}")

    def _account_id(self, r, email: str) -> int:
        aid = r.hget(self._k("emails"), check_email(email))
        if aid is None:
            raise StoreError(f"no account {email!r}")
        return int(aid)

    def _account(self, aid: int) -> Account:
        pipe = self.r.pipeline(transaction=True)
        pipe.hget(self._k("accounts"), aid)
        for h in ("quota", "period", "total"):
            pipe.hget(self._k(h), aid)
        data, quota, period, total = self._call(pipe.execute)
        if data is None:
            raise StoreError(f"no account with id {aid}")
        return _account(aid, json.loads(data), quota, period, total)

    # -- the relay ------------------------------------------------------------------------------
    def data_version(self) -> int:
        return int(self._call(lambda: self.r.get(self._k("version"))) or 0)

    def snapshot(self) -> Snapshot:
        pipe = self.r.pipeline(transaction=True)  # one consistent read
        for h in ("accounts", "quota", "period", "total", "kites", "kitebytes"):
            pipe.hgetall(self._k(h))
        accounts, quota, period, total, kites, kitebytes = self._call(pipe.execute)
        snap = Snapshot()
        for key, data in accounts.items():
            aid = int(key)
            snap.accounts[aid] = _account(aid, json.loads(data), quota.get(key),
                                          period.get(key), total.get(key))
        for name, data in kites.items():
            snap.kites[name] = _kite(name, json.loads(data), kitebytes.get(name))
        return snap

    def changes_since(self, version: int) -> Optional[tuple]:
        """What changed after ``version``: ``(new version, {account id: Account or None},
        {kite name: Kite or None})`` (None: removed), read in one transaction."""
        pipe = self.r.pipeline(transaction=True)
        pipe.get(self._k("version"))
        pipe.zrangebyscore(self._k("changes"), f"({version}", "+inf")
        now, members = self._call(pipe.execute)
        now = int(now or 0)
        if now < version:
            return None  # the registry was emptied or replaced: read it whole
        aids = sorted({int(m[2:]) for m in members if m.startswith("a:")})
        names = sorted({m[2:] for m in members if m.startswith("k:")})
        pipe = self.r.pipeline(transaction=True)
        for aid in aids:
            pipe.hget(self._k("accounts"), aid)
            for h in ("quota", "period", "total"):
                pipe.hget(self._k(h), aid)
        for name in names:
            pipe.hget(self._k("kites"), name)
            pipe.hget(self._k("kitebytes"), name)
        got = self._call(pipe.execute) if (aids or names) else []
        accounts: dict = {}
        for i, aid in enumerate(aids):
            data, quota, period, total = got[4 * i:4 * i + 4]
            accounts[aid] = None if data is None else _account(aid, json.loads(data), quota,
                                                              period, total)
        kites: dict = {}
        base = 4 * len(aids)
        for i, name in enumerate(names):
            data, nbytes = got[base + 2 * i:base + 2 * i + 2]
            kites[name] = None if data is None else _kite(name, json.loads(data), nbytes)
        return now, accounts, kites

    def quotas(self) -> dict:
        """Bytes left per account id, as every relay's flushes left them (one read): how a
        relay of a fleet learns what the others charged, without reading a snapshot."""
        return {int(k): int(v) for k, v in
                self._call(lambda: self.r.hgetall(self._k("quota"))).items()}

    def last_seq(self, relay: str) -> int:
        return int(self._call(lambda: self.r.hget(self._k("flushes"), relay)) or 0)

    def flush(self, relay: str, batch: UsageBatch) -> bool:
        """Apply ``batch`` atomically (one script); False if its ``seq`` was applied before."""
        body = json.dumps({
            "a": {str(aid): [str(n), str(batch.charged.get(aid, n))]
                  for aid, n in batch.accounts.items()},
            "k": {name: str(n) for name, n in batch.kites.items()},
            "p": [[proto, name, bool(online)] for proto, name, online in batch.presence],
        })
        args: list = [relay, batch.seq, batch.day, repr(time.time()), self.p, body]
        return bool(self._call(lambda: self._flush(args=args)))

    def reset_presence(self, relay: str) -> None:
        def clear():
            fields = [f for f in self.r.hkeys(self._k("online"))
                      if str(f).split(" ", 1)[0] == relay]
            if fields:
                self.r.hdel(self._k("online"), *fields)

        self._call(clear)

    # -- kite accounts --------------------------------------------------------------------------
    def add_account(self, email: str, quota: int, days: Optional[float]) -> Account:
        email = check_email(email)
        aid = self._change(["emails"], lambda pipe: self._add_account(pipe, email, quota, days))
        return self._account(aid)

    def signup(self, email: str, name: str, quota: int, protos: frozenset) -> Account:
        """A new account with one kite, in one transaction (both or neither)."""
        email, name = check_email(email), check_name(name)

        def body(pipe):
            kites = pipe.hgetall(self._k("kites"))
            aid = self._next_id(pipe)
            entry = self._check_kite(kites, aid, name)
            self._add_account(pipe, email, quota, None, aid=aid)
            self._touch("k", name)
            pipe.hset(self._k("kites"), name, _kite_json(aid, protos, entry))
            return aid

        return self._account(self._change(["emails", "kites"], body))

    def _next_id(self, pipe) -> int:
        # Ids are taken outside the transaction (INCR is atomic on its own): a retried or
        # failed transaction leaves a gap, never a duplicate.
        return int(self.r.incr(self._k("next_id")))

    def _add_account(self, pipe, email: str, quota: int, days: Optional[float],
                     aid: Optional[int] = None) -> int:
        if pipe.hexists(self._k("emails"), email):
            raise StoreError(f"account {email!r} exists already")
        if aid is None:
            aid = self._next_id(pipe)
        now = time.time()
        data = {"email": email, "secret": secrets.token_urlsafe(24), "disabled": False,
                "expires": now + days * 86400 if days is not None else None, "created": now}
        pipe.multi()
        self._touch("a", aid)
        pipe.hset(self._k("accounts"), aid, json.dumps(data))
        pipe.hset(self._k("emails"), email, aid)
        pipe.hset(self._k("quota"), aid, quota)
        pipe.hset(self._k("period"), aid, 0)
        pipe.hset(self._k("total"), aid, 0)
        return aid

    def _check_kite(self, kites: dict, aid: int, name: str) -> Optional[dict]:
        """Refuse a name another account holds (itself, a wildcard above it, or for a
        wildcard a name below it); returns the name's entry if ``aid`` holds it."""
        for cand in [name, *domain_candidates(name.removeprefix("*."))]:
            data = kites.get(cand)
            if data is not None and int(json.loads(data)["account"]) != aid:
                raise StoreError(f"kite name {name!r} is taken (by {cand!r} of another account)")
        if name.startswith("*."):
            parent = name[2:]
            data = kites.get(parent)
            if data is None or int(json.loads(data)["account"]) != aid:
                raise StoreError(f"wildcard {name!r}: add the kite {parent!r} to this "
                                 "account first (wildcards only under its own names)")
            for other, data in kites.items():
                if other.endswith("." + parent) and int(json.loads(data)["account"]) != aid:
                    raise StoreError(f"wildcard {name!r}: {other!r} below it belongs to "
                                     "another account")
        data = kites.get(name)
        return json.loads(data) if data is not None else None

    def set_kite(self, email: str, name: str, protos: frozenset) -> Kite:
        name = check_name(name)

        def body(pipe):
            aid = self._account_id(pipe, email)
            entry = self._check_kite(pipe.hgetall(self._k("kites")), aid, name)
            pipe.multi()
            self._touch("k", name)
            pipe.hset(self._k("kites"), name, _kite_json(aid, protos, entry))
            return aid

        return Kite(name, self._change(["emails", "kites"], body), protos)

    def _own_kite(self, pipe, email: str, name: str) -> tuple[int, dict]:
        aid = self._account_id(pipe, email)
        data = pipe.hget(self._k("kites"), name)
        if data is None or int(json.loads(data)["account"]) != aid:
            raise StoreError(f"account {email!r} has no kite {name!r}")
        return aid, json.loads(data)

    def remove_kite(self, email: str, name: str) -> None:
        name = check_name(name)

        def body(pipe):
            self._own_kite(pipe, email, name)
            pipe.multi()
            self._touch("k", name)
            pipe.hdel(self._k("kites"), name)
            pipe.hdel(self._k("kitebytes"), name)

        self._change(["emails", "kites"], body)

    def set_limits(self, email: str, name: str, limits: Limits) -> None:
        name = check_name(name)

        def body(pipe):
            aid, entry = self._own_kite(pipe, email, name)
            entry["limits"] = json.loads(limits.to_json())
            pipe.multi()
            self._touch("k", name)
            pipe.hset(self._k("kites"), name, json.dumps(entry))

        self._change(["emails", "kites"], body)

    def set_quota(self, email: str, size: int, *, add: bool) -> Account:
        def body(pipe):
            aid = self._account_id(pipe, email)
            left = int(pipe.hget(self._k("quota"), aid) or 0)
            pipe.multi()
            self._touch("a", aid)
            if add:
                pipe.hset(self._k("quota"), aid, max(left, 0) + size)
            else:
                pipe.hset(self._k("quota"), aid, size)
                pipe.hset(self._k("period"), aid, 0)
            return aid

        # Watching the quota hash: a flush that charges in between retries this change.
        return self._account(self._change(["emails", "quota"], body))

    def set_disabled(self, email: str, disabled: bool) -> Account:
        def body(pipe):
            aid = self._account_id(pipe, email)
            data = json.loads(pipe.hget(self._k("accounts"), aid))
            data["disabled"] = bool(disabled)
            pipe.multi()
            self._touch("a", aid)
            pipe.hset(self._k("accounts"), aid, json.dumps(data))
            return aid

        return self._account(self._change(["emails", "accounts"], body))

    def remove_account(self, email: str) -> None:
        def body(pipe):
            aid = self._account_id(pipe, email)
            names = [n for n, d in pipe.hgetall(self._k("kites")).items()
                     if int(json.loads(d)["account"]) == aid]
            pipe.multi()
            self._touch("a", aid)
            for n in names:
                self._touch("k", n)
            pipe.hdel(self._k("emails"), check_email(email))
            for h in ("accounts", "quota", "period", "total"):
                pipe.hdel(self._k(h), aid)
            pipe.delete(self._k(f"daily:{aid}"))
            if names:
                pipe.hdel(self._k("kites"), *names)
                pipe.hdel(self._k("kitebytes"), *names)

        self._change(["emails", "kites"], body)

    def list_accounts(self) -> list:
        now = time.time()
        snap = self.snapshot()
        counts: dict = {}
        for kite in snap.kites.values():
            counts[kite.account_id] = counts.get(kite.account_id, 0) + 1
        return [{"email": a.email, "kites": counts.get(a.id, 0),
                 "quota_bytes": max(a.quota_bytes, 0), "total_bytes": a.total_bytes,
                 "expires": a.expires, "disabled": a.disabled, "status": a.blocked(now) or "ok"}
                for a in sorted(snap.accounts.values(), key=lambda a: a.email)]

    def show(self, email: str, now: float) -> dict:
        aid = self._account_id(self.r, email)
        a = self._account(aid)
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        pipe = self.r.pipeline(transaction=True)
        pipe.hget(self._k(f"daily:{aid}"), day)
        pipe.hgetall(self._k("kites"))
        pipe.hgetall(self._k("kitebytes"))
        pipe.hkeys(self._k("online"))
        today, kites, kitebytes, online_fields = self._call(pipe.execute)
        online: dict[str, set] = {}
        for f in online_fields:
            _relay, proto, name = f.split(" ", 2)
            online.setdefault(name, set()).add(proto)
        out = []
        for name in sorted(kites):
            d = json.loads(kites[name])
            if int(d["account"]) != aid:
                continue
            out.append({"name": name, "protos": sorted(d["protos"]),
                        "total_bytes": int(kitebytes.get(name, 0)),
                        "online": sorted(online.get(name, ())),
                        **({"limits": d["limits"]} if d.get("limits") else {})})
        return {"email": a.email, "status": a.blocked(now) or "ok", "disabled": a.disabled,
                "expires": a.expires, "quota_bytes": max(a.quota_bytes, 0),
                "today_bytes": int(today or 0), "period_bytes": a.period_bytes,
                "total_bytes": a.total_bytes, "kites": out}


def _account(aid: int, data: dict, quota, period, total) -> Account:
    return Account(aid, data["email"], data["secret"], int(quota or 0), data.get("expires"),
                   bool(data.get("disabled")), int(period or 0), int(total or 0))


def _kite(name: str, d: dict, nbytes) -> Kite:
    limits = Limits.from_json(json.dumps(d["limits"])) if d.get("limits") else NO_LIMITS
    return Kite(name, int(d["account"]), frozenset(d["protos"]), int(nbytes or 0), limits)


def _kite_json(aid: int, protos: frozenset, entry: Optional[dict]) -> str:
    limits = entry.get("limits") if entry else None
    return json.dumps({"account": aid, "protos": sorted(protos),
                       **({"limits": limits} if limits else {})})
