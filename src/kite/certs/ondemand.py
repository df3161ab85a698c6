"""Certificates on demand: HTTP-01 for the names of kites outside the zone, when visited.

A kite may fly under any name the relay's grants or registry allow (``www.example.org``,
a user's own domain pointed at the relay with a CNAME or an A record).  The zone's
certificate (:class:`~kite.certs.acme.AcmeManager`, DNS-01) does not cover such a name, and
the relay cannot answer DNS-01 for a zone it does not serve: it answers HTTP-01 instead, on
its own listeners (the CA asks ``http://NAME/.well-known/acme-challenge/TOKEN`` on port 80).

Theory of operation.

1. A visitor asks for a name: a TLS ClientHello's SNI, or a plain request's ``Host``.  The
   dispatcher calls :meth:`OnDemandCertificates.request` when no certificate covers the
   name and an http kite flies for it here.
2. The name is taken only when a kite of this relay flies that very name (not a wildcard
   above it: ``*.example.org`` would let visitors pick names to order), the name is outside
   the zone, and fewer than ``per_hour`` orders began in the last hour.  Otherwise nothing is
   ordered (no open issuance).
3. A taken name gets its own :class:`AcmeManager` (``challenge="http-01"``, its certificate
   in ``on-demand/NAME/``, the account shared with the zone's): one order at a time, a
   failure retried after 60 s doubling to 6 h, renewal at two thirds of the lifetime.  Each
   order, first or renewal, asks :meth:`_allow` first: the kite must still fly the name and
   the hourly bound must have room, else the order waits.
4. While an order is under way, the dispatcher answers ``/.well-known/acme-challenge/TOKEN``
   for ``NAME`` from :meth:`http01` before any kite routing; once the order ends, the path
   goes to the kite again (a backend may run its own ACME client).
5. A TLS visitor that arrives while its name's order is under way waits for it, at most
   :data:`FIRST_VISITOR_WAIT` seconds (its ClientHello stays unread in the socket), then is
   served with the new certificate, or gets the ``unrecognized_name`` alert as before.  Plain
   HTTP visitors are served as ever; they only start the order.

At start, the stored certificates still valid are installed and their renewal scheduled.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import ConfigError
from .acme import MAX_SLEEP, RETRY_FIRST, RETRY_MAX, AcmeManager, directory_folder

log = logging.getLogger("kite.certs")

__all__ = ["OnDemandCertificates", "http01_reply", "ACME_CHALLENGE_PATH", "FIRST_VISITOR_WAIT",
           "PER_HOUR", "MAX_PER_HOUR"]

#: Where the CA looks for an HTTP-01 key authorization (RFC 8555 section 8.3).
ACME_CHALLENGE_PATH = "/.well-known/acme-challenge/"
#: Orders (first ones, renewals and retries together) that may begin in one hour, by default
#: (acme_on_demand_per_hour); Let's Encrypt allows 300 new orders per account per 3 hours.
PER_HOUR = 10
MAX_PER_HOUR = 1000
#: How long the first TLS visitor of a name waits for the certificate being ordered.
FIRST_VISITOR_WAIT = 10.0
#: The hourly bound's window.
WINDOW = 3600.0
#: A renewal due while no kite flies the name: look again this much later.
NOT_FLYING_WAIT = 600.0
#: At most one log line per this many seconds says that the hourly bound deferred orders.
BOUND_LOG_INTERVAL = 60.0
#: The folder of the on-demand certificates, in the directory's folder.
FOLDER = "on-demand"

# A host name a CA can certify: dot-separated LDH labels, the last one starting with a
# letter (no IP address, no wildcard, no trailing dot), 253 characters at most.
_NAME = re.compile(r"(?=.{1,253}\Z)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+"
                   r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?")


def http01_reply(key_authorization: str) -> bytes:
    """The relay's answer to the CA's HTTP-01 request: the key authorization, and a close."""
    body = key_authorization.encode("ascii")
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)) + body


@dataclass
class _Name:
    """One name taken for on-demand certificates."""

    manager: AcmeManager
    task: Optional[asyncio.Task] = None
    #: Done when the order under way ends (True: a certificate is installed); None while
    #: no order is under way.
    waiter: Optional[asyncio.Future] = None
    #: Its first order was counted against the hourly bound when the name was taken.
    counted: bool = False


class OnDemandCertificates:
    """Orders certificates through HTTP-01 for the kite names visitors ask for (see the
    module docstring).

    ``flies(name)``: an http kite of this relay flies exactly ``name``.  ``covered(name)``:
    a certificate the relay serves covers it.  ``on_certificate(cert_path, key_path)``
    installs a new certificate (on the event loop).  ``zone``: names in it are the zone
    certificate's business, never ordered here.
    """

    def __init__(self, directory_url: str, email: str, *, state_dir: str,
                 flies: Callable[[str], bool], covered: Callable[[str], bool],
                 on_certificate: Callable[[str, str], object], ca_file: Optional[str] = None,
                 per_hour: int = PER_HOUR, zone: Optional[str] = None,
                 clock: Callable[[], float] = time.time, retry_first: float = RETRY_FIRST,
                 retry_max: float = RETRY_MAX) -> None:
        self.directory_url = directory_url
        self.email = email
        self.state_dir = state_dir
        self.ca_file = ca_file
        self.flies = flies
        self.covered = covered
        self.on_certificate = on_certificate
        self.per_hour = per_hour
        self.zone = zone.lower().rstrip(".") if zone else None
        self.clock = clock
        self.retry_first = retry_first
        self.retry_max = retry_max
        self.folder = os.path.join(directory_folder(state_dir, directory_url), FOLDER)
        self.names: dict[str, _Name] = {}
        self._begun: collections.deque = collections.deque()  # order starts in the window
        self._answers: dict[str, str] = {}  # "NAME/.well-known/acme-challenge/TOKEN" -> answer
        self.deferred = 0  # orders the hourly bound deferred or refused since the last line
        self._bound_logged = -BOUND_LOG_INTERVAL
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Install the stored certificates that are still valid; schedule their renewal (a
        state folder that cannot be made is a ConfigError)."""
        base = os.path.dirname(self.folder)
        for d in (self.state_dir, os.path.dirname(base), base, self.folder):
            try:
                os.makedirs(d, mode=0o700, exist_ok=True)
                if d != self.state_dir:
                    os.chmod(d, 0o700)
            except OSError as exc:
                raise ConfigError("--state-dir", f"cannot create {d!r}: {exc.strerror}",
                                  "give a folder the relay may write") from None
        try:
            stored = sorted(os.listdir(self.folder))
        except OSError:
            stored = []
        for name in stored:
            if not _NAME.fullmatch(name):
                continue
            entry = self._take(name)
            if entry.manager.load_stored() is None:
                del self.names[name]  # expired or unreadable: a visitor orders it again
        for name, entry in self.names.items():
            entry.task = asyncio.get_running_loop().create_task(self._run(name, entry))

    async def close(self) -> None:
        self._closed = True
        tasks = [e.task for e in self.names.values() if e.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for entry in self.names.values():
            await entry.manager.close()  # withdraws what it published
            if entry.waiter is not None and not entry.waiter.done():
                entry.waiter.set_result(False)
        self._answers.clear()

    # -- what the dispatcher asks ---------------------------------------------------------------
    def request(self, name: str) -> Optional[asyncio.Future]:
        """A visitor asks for ``name``: take it if it qualifies (module docstring, step 2).
        Returns a future done when the order under way for it ends (its result: True if a
        certificate was installed), or None when no order is under way (nothing to wait for:
        the name does not qualify, the hourly bound is reached, or its manager waits)."""
        name = name.lower().rstrip(".")
        entry = self.names.get(name)
        if entry is not None:
            return entry.waiter
        if self._closed or self.covered(name):
            return None
        why = self.refusal(name)
        if why is not None:
            log.debug("acme: on-demand: no order for %s: %s", name, why)
            return None
        if self._room() > 0:
            self._note_bound(name)
            return None
        self._begun.append(self.clock())  # the manager's first order uses this one
        entry = self._take(name)
        entry.counted = True
        entry.waiter = asyncio.get_running_loop().create_future()
        entry.task = asyncio.get_running_loop().create_task(self._run(name, entry))
        log.info("acme: on-demand: a visitor asked for %s (a kite flies it here): ordering "
                 "its certificate", name)
        return entry.waiter

    def refusal(self, name: str) -> Optional[str]:
        """Why ``name`` may not be ordered on demand, or None if it may."""
        if not _NAME.fullmatch(name):
            return "not a host name a CA certifies"
        if self.zone and (name == self.zone or name.endswith("." + self.zone)):
            return "in the zone (its certificate is the zone's)"
        if not self.flies(name):
            return "no kite of this relay flies it"
        return None

    def http01(self, host: str, path: str) -> Optional[bytes]:
        """The answer to the CA's ``GET path`` for ``host`` while an order waits for it, else
        None (the request goes to the kites as usual)."""
        if not path.startswith(ACME_CHALLENGE_PATH) or not self._answers:
            return None
        answer = self._answers.get(host.lower().rstrip(".") + path)
        return http01_reply(answer) if answer is not None else None

    # -- the hourly bound -----------------------------------------------------------------------
    def _room(self) -> float:
        """0 if an order may begin now, else the seconds until one may."""
        now = self.clock()
        begun = self._begun
        while begun and begun[0] <= now - WINDOW:
            begun.popleft()
        if len(begun) < self.per_hour:
            return 0.0
        return max(1.0, begun[0] + WINDOW - now)

    def _note_bound(self, name: str) -> None:
        """At most one line per BOUND_LOG_INTERVAL: orders held back by the hourly bound."""
        self.deferred += 1
        now = time.monotonic()
        if now - self._bound_logged >= BOUND_LOG_INTERVAL:
            n = len(self._begun)
            log.warning("acme: on-demand: %d order%s began in the last hour, the bound "
                        "(acme_on_demand_per_hour = %d): no order for %s now (%d held back)",
                        n, "" if n == 1 else "s", self.per_hour, name, self.deferred)
            self._bound_logged = now
            self.deferred = 0

    def _allow(self, name: str) -> float:
        """Asked by the name's manager before each order (AcmeManager ``allow_order``)."""
        entry = self.names[name]
        if entry.counted:  # counted when the visitor asked
            entry.counted = False
            return 0.0
        if not self.flies(name):
            log.info("acme: on-demand: no kite flies %s now: no order; looking again in %d s",
                     name, NOT_FLYING_WAIT)
            return NOT_FLYING_WAIT
        wait = self._room()
        if wait > 0:
            self._note_bound(name)
            return wait
        self._begun.append(self.clock())
        return 0.0

    # -- one name -------------------------------------------------------------------------------
    def _take(self, name: str) -> _Name:
        manager = AcmeManager(
            self.directory_url, self.email, state_dir=self.state_dir, names=[name],
            publish_txt=self._publish, withdraw_txt=self._withdraw,
            on_certificate=self.on_certificate, ca_file=self.ca_file, clock=self.clock,
            retry_first=self.retry_first, retry_max=self.retry_max, challenge="http-01",
            cert_dir=os.path.join(self.folder, name),
            allow_order=lambda: self._allow(name))
        entry = _Name(manager)
        self.names[name] = entry
        return entry

    async def _run(self, name: str, entry: _Name) -> None:
        manager = entry.manager
        loop = asyncio.get_running_loop()
        try:
            manager.prepare()
        except ConfigError as exc:
            log.error("acme: on-demand: %s: %s", name, exc)
            if entry.waiter is not None and not entry.waiter.done():
                entry.waiter.set_result(False)
            entry.waiter = None
            return
        while True:
            if entry.waiter is None and manager.due() == 0:
                entry.waiter = loop.create_future()  # visitors of an order under way wait
            try:
                delay = await manager.step()
            finally:
                waiter, entry.waiter = entry.waiter, None
                if waiter is not None and not waiter.done():
                    waiter.set_result(manager.current is not None and
                                      manager.current.not_after > self.clock())
            await asyncio.sleep(min(max(delay, 1.0), MAX_SLEEP))

    def _publish(self, where: str, values: list) -> None:
        self._answers[where] = values[0]

    def _withdraw(self, where: str, values: list) -> None:
        self._answers.pop(where, None)
