"""The fleet's ACME certificate, shared in Redis: one relay orders, every relay serves it.

:class:`FleetCertificates` is what :class:`kite.certs.acme.AcmeManager` is given as its
``share`` when the relays share a Redis (``kite relay --redis ... --acme ...``):

- ``claim``/``release``: the right to order for these names, a lock with an expiry
  (``kite:fleet:acme:NAMES:lock``, :data:`LOCK_TTL` s, released only by its holder), so a
  fleet places one order however many relays find the certificate due at once;
- ``offer``/``latest``: the newest certificate and its key (``kite:fleet:acme:NAMES:cert``,
  JSON), which the other relays install when their own is due or missing;
- ``publish_txt``/``withdraw_txt``: the DNS-01 values go to every relay's DNS (whichever the
  CA asks), through the fleet's channel (:meth:`kite.store.presence.FleetPresence.share_txt`),
  each relay confirming before the challenge is answered.

The certificate's key travels through Redis: the fleet's Redis is as trusted as the relays'
state directories (protect it with a password and a private network, as the README says).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Iterable, Optional

from ..errors import StoreError

try:
    import redis
except ImportError:  # pragma: no cover - the [fleet] extra is not installed
    redis = None  # type: ignore[assignment]

__all__ = ["FleetCertificates", "LOCK_TTL"]

#: Seconds an order may hold the lock (an order takes seconds; a crashed holder's lock goes).
LOCK_TTL = 600

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class FleetCertificates:
    """The ACME certificate for ``names``, shared by the relays of ``presence``'s fleet."""

    def __init__(self, presence, names: Iterable[str]) -> None:
        self.presence = presence
        self.names = sorted(n.lower() for n in names)
        digest = hashlib.sha256(",".join(self.names).encode()).hexdigest()[:16]
        self.key = f"{presence.p}acme:{digest}"

    async def claim(self) -> bool:
        """True if this relay may order now (nobody else holds the lock)."""
        try:
            return bool(await self.presence.r.set(self.key + ":lock", self.presence.relay_id,
                                                  nx=True, ex=LOCK_TTL))
        except (redis.RedisError, OSError) as exc:
            raise StoreError(f"fleet: the ACME lock: {exc}") from None

    async def release(self) -> None:
        try:
            await self.presence.r.eval(_RELEASE, 1, self.key + ":lock", self.presence.relay_id)
        except (redis.RedisError, OSError):
            pass  # the lock expires by itself

    async def latest(self) -> Optional[tuple]:
        """The fleet's newest certificate: ``(chain_pem, key_pem)``, or None."""
        try:
            data = await self.presence.r.get(self.key + ":cert")
        except (redis.RedisError, OSError) as exc:
            raise StoreError(f"fleet: the shared certificate: {exc}") from None
        if not data:
            return None
        try:
            doc = json.loads(data)
            return str(doc["chain"]), str(doc["key"]).encode()
        except (ValueError, KeyError, TypeError):
            return None

    async def offer(self, chain_pem: str, key_pem: bytes) -> None:
        """Make a new certificate the fleet's (the other relays take it when theirs is due)."""
        doc = {"chain": chain_pem, "key": key_pem.decode(), "by": self.presence.relay_id,
               "at": time.time(), "names": self.names}
        try:
            await self.presence.r.set(self.key + ":cert", json.dumps(doc))
        except (redis.RedisError, OSError) as exc:
            raise StoreError(f"fleet: storing the certificate: {exc}") from None

    async def publish_txt(self, name: str, values: list) -> None:
        await self.presence.share_txt(name, values, True)

    async def withdraw_txt(self, name: str, values: list) -> None:
        await self.presence.share_txt(name, values, False)
