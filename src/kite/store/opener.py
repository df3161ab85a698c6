"""Which store a registry location names: a Redis URL (``redis://``, ``rediss://``,
``unix://``) opens :class:`~kite.store.redis.RedisStore`, anything else is a SQLite file."""

from __future__ import annotations

from . import Store

__all__ = ["open_registry", "is_redis_url"]

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def is_redis_url(location: str) -> bool:
    return location.startswith(_REDIS_SCHEMES)


def open_registry(location: str) -> Store:
    """Open the registry at ``location``; raises StoreError with the reason."""
    if is_redis_url(location):
        from .redis import RedisStore

        return RedisStore(location)
    from .sqlite import SqliteStore

    return SqliteStore(location)
