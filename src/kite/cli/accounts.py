"""``kite accounts``: manage the relay's account registry (``--db``, the relay's database).

Changes reach a running relay within 2 s (it watches the database); the logic is in
:mod:`kite.store`.  Bad input and database errors are one line and exit 2.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from typing import Iterator

import click

from .run import fail

__all__ = ["accounts"]

_DB_HELP = "The registry, a SQLite file (default: $KITE_DB, else kite.db)."
_REDIS_HELP = "The registry in Redis (redis://HOST:PORT/DB; default: $KITE_REDIS) - a fleet's."


def _db_option(fn):
    fn = click.option("--redis", "redis_url", metavar="URL", help=_REDIS_HELP)(fn)
    return click.option("--db", metavar="FILE", help=_DB_HELP)(fn)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@contextmanager
def _store(db: str, redis_url: str) -> Iterator:
    from ..errors import StoreError
    from ..store.opener import open_registry

    outer = click.get_current_context().obj or (None, None)
    if (db or outer[0]) and (redis_url or outer[1]):
        fail("--db and --redis name two registries: give one")
    location = (redis_url or db or outer[1] or outer[0] or os.environ.get("KITE_REDIS")
                or os.environ.get("KITE_DB") or "kite.db")
    try:
        store = open_registry(location)
        try:
            yield store
        finally:
            store.close()
    except StoreError as err:
        fail(str(err))


def _size(value: str) -> int:
    from ..errors import StoreError
    from ..store import parse_size

    try:
        return parse_size(value)
    except StoreError as err:
        fail(str(err))


@click.group()
@_db_option
@click.pass_context
def accounts(ctx: click.Context, db, redis_url) -> None:
    """Accounts, their kites and quotas, in the relay's registry (kite relay --db/--redis)."""
    ctx.obj = (db, redis_url)


@accounts.command()
@click.argument("email")
@click.option("--quota", default="2.5GB", show_default=True, help="Bytes the account may move.")
@click.option("--days", type=click.FloatRange(min=0, min_open=True),
              help="Expire after N days (default: never).")
@_db_option
@_json_option
def add(email, quota, days, db, redis_url, as_json):
    """Add an account; prints its secret (shown this once)."""
    size = _size(quota)
    with _store(db, redis_url) as store:
        acct = store.add_account(email, size, days)
    if as_json:
        click.echo(json.dumps({"email": acct.email, "secret": acct.secret,
                               "quota_bytes": acct.quota_bytes}))
    else:
        click.echo(acct.secret)


@accounts.command("kite")
@click.argument("email")
@click.argument("name")
@click.option("--protos", default="http,https", show_default=True,
              help="Protocols: http, https, raw-PORT, websocket (comma-separated).")
@click.option("--remove", is_flag=True, help="Take the kite away (its tunnels stop flying it).")
@_db_option
def kite_cmd(email, name, protos, remove, db, redis_url):
    """Give the account EMAIL the kite NAME (or *.NAME under one of its names)."""
    from ..errors import StoreError
    from ..store import check_protos

    with _store(db, redis_url) as store:
        if remove:
            store.remove_kite(email, name)
            return
        try:
            p = check_protos(protos)
        except StoreError as err:
            fail(str(err))
        store.set_kite(email, name, p)


@accounts.command()
@click.argument("email")
@click.argument("name")
@click.option("--max-visitors", type=click.IntRange(min=1), help="Concurrent visitor connections.")
@click.option("--rate", type=click.IntRange(min=1),
              help="New connections per second from one visitor address.")
@click.option("--allow", multiple=True, metavar="CIDR", help="Only visitors from these networks.")
@click.option("--deny", multiple=True, metavar="CIDR", help="Refuse visitors from these networks.")
@_db_option
def limits(email, name, max_visitors, rate, allow, deny, db, redis_url):
    """Set the visitor limits of the kite NAME (none given: no limits)."""
    from ..errors import StoreError
    from ..store import Limits, check_cidrs

    try:
        lim = Limits(max_visitors, rate, check_cidrs(allow), check_cidrs(deny))
    except StoreError as err:
        fail(str(err))
    with _store(db, redis_url) as store:
        store.set_limits(email, name, lim)


@accounts.command()
@click.argument("email")
@click.argument("size")
@_db_option
def quota(email, size, db, redis_url):
    """Set the bytes left to SIZE, or top up with +SIZE (2.5GB, 500MB, bytes)."""
    add_ = size.startswith("+")
    n = _size(size[1:] if add_ else size)
    from ..store import format_size

    with _store(db, redis_url) as store:
        acct = store.set_quota(email, n, add=add_)
    click.echo(f"{acct.email}: {format_size(max(acct.quota_bytes, 0))} left")


@accounts.command("list")
@_db_option
@_json_option
def list_cmd(db, redis_url, as_json):
    """Every account: kites, quota left, bytes moved, status."""
    from ..store import format_size

    with _store(db, redis_url) as store:
        rows = store.list_accounts()
    if as_json:
        click.echo(json.dumps(rows))
        return
    for r in rows:
        click.echo(f"{r['email']}  kites={r['kites']}  left={format_size(r['quota_bytes'])}  "
                   f"total={format_size(r['total_bytes'])}  {r['status']}")


@accounts.command()
@click.argument("email")
@_db_option
@_json_option
def show(email, db, redis_url, as_json):
    """One account: its kites (online or not), bytes today / this period / total, quota left."""
    from ..store import format_size

    with _store(db, redis_url) as store:
        info = store.show(email, time.time())
    if as_json:
        click.echo(json.dumps(info))
        return
    exp = "never" if info["expires"] is None else time.strftime(
        "%Y-%m-%d %H:%M UTC", time.gmtime(info["expires"]))
    click.echo(f"{info['email']}: {info['status']}, expires {exp}")
    click.echo(f"  quota left {format_size(info['quota_bytes'])}; today "
               f"{format_size(info['today_bytes'])}, this period "
               f"{format_size(info['period_bytes'])}, total {format_size(info['total_bytes'])}")
    for k in info["kites"]:
        where = ("online " + ",".join(k["online"])) if k["online"] else "offline"
        click.echo(f"  {k['name']} [{','.join(k['protos'])}] {where}, "
                   f"{format_size(k['total_bytes'])}")


def _flag(name: str, doc: str, action):
    @accounts.command(name, help=doc)
    @click.argument("email")
    @_db_option
    def cmd(email, db, redis_url):
        with _store(db, redis_url) as store:
            action(store, email)


_flag("disable", "Stop the account's kites flying (tunnels refused: unauthorized).",
      lambda s, e: s.set_disabled(e, True))
_flag("enable", "Let a disabled account's kites fly again.", lambda s, e: s.set_disabled(e, False))
_flag("remove", "Remove the account and its kites.", lambda s, e: s.remove_account(e))
