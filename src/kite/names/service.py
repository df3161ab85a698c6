"""The name service: the relay's zone, its DNS server and its RFC 2136 pusher, as one object.

:class:`NameService` is what a role sees: built from a :class:`~kite.names.config.NamesConfig`
and the relay's own names, started and closed with the relay, told about presence changes
(:meth:`NameService.presence`, or :meth:`NameService.on_presence` given a presence event) and
asked to publish TXT records (:meth:`NameService.publish_txt`: served, pushed, or both).  A
presence or TXT change reaches the served zone before the call returns (the next query sees
it) and is on its way to the update server at once.
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional

from ..errors import LocalProtocolError
from ..proto.names import valid_domain
from .config import NamesConfig, hostnames, in_zone
from .server import DnsServer
from .update import DnsUpdater
from .zone import Zone

log = logging.getLogger("kite.names")

__all__ = ["NameService"]


class NameService:
    """DNS for the kites of one relay: served (``--dns``), pushed (``--dns-update``), or both."""

    def __init__(self, config: NamesConfig, relay_names: Iterable[str] = ()) -> None:
        self.config = config
        own = hostnames(relay_names)
        self.zone: Optional[Zone] = None
        self.server: Optional[DnsServer] = None
        self.updater: Optional[DnsUpdater] = None
        if config.zone:
            ns = config.ns_names or own or [f"relay.{config.zone}"]
            self.zone = Zone(config.zone, config.public_ips, ttl=config.ttl,
                             negative_ttl=config.negative_ttl, ns_names=ns,
                             own_names=[n for n in own if in_zone(n, config.zone)])
        if config.listen and self.zone is not None:
            self.server = DnsServer(self.zone, config.listen, rate_limit=config.rate_limit)
        if config.update_server and config.update_zone:
            self.updater = DnsUpdater(config.update_server, config.update_zone, config.public_ips,
                                      ttl=config.ttl, key=config.tsig)

    async def start(self) -> list:
        """Listen (DNS) and start pushing (updates); returns the DNS addresses bound."""
        bound = await self.server.start() if self.server is not None else []
        if self.updater is not None:
            self.updater.start()
            log.info("dns updates of the zone %s go to %s%s", self.updater.zone,
                     self.updater.where, " (TSIG)" if self.config.tsig else "")
        return bound

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()
        if self.updater is not None:
            await self.updater.close()

    # -- presence -----------------------------------------------------------------------------
    def presence(self, proto: str, domain: str, online: bool) -> None:
        """Kite ``proto:domain`` started (``online``) or stopped flying on this relay."""
        if self.zone is not None and self.zone.presence(proto, domain, online):
            log.debug("dns: %s %s (serial %d)", domain, "up" if online else "down",
                      self.zone.serial)
        if self.updater is not None:
            self.updater.presence(proto, domain, online)

    def fleet(self, domain: str, addresses: Iterable[str]) -> None:
        """The other relays of a fleet flying kite ``domain`` have ``addresses`` (empty: no
        other relay flies it): the served zone answers with them too."""
        if self.zone is not None and self.zone.fleet(domain, addresses):
            log.debug("dns: %s on other relays: %s (serial %d)", domain,
                      ", ".join(addresses) or "none", self.zone.serial)

    def on_presence(self, event) -> None:
        """A presence listener: ``event`` has ``proto``, ``domain`` and ``online``."""
        self.presence(event.proto, event.domain, event.online)

    # -- TXT ----------------------------------------------------------------------------------
    def publish_txt(self, name: str, values: Iterable[str]) -> None:
        """Publish ``values`` (added to those already there) in the TXT RRset of ``name``
        (e.g. ``_acme-challenge.app.ZONE`` for ACME DNS-01): served if ``name`` is in the zone
        (``--zone``), pushed if it is in the update zone (``--dns-update-zone``), or both."""
        n, targets = self._txt_targets(name)
        vals = list(values)
        for t in targets:
            t.publish_txt(n, vals)

    def withdraw_txt(self, name: str, values: Optional[Iterable[str]] = None) -> None:
        """Stop publishing ``values`` (default: every value) at ``name``."""
        n, targets = self._txt_targets(name)
        vals = None if values is None else list(values)
        for t in targets:
            t.withdraw_txt(n, vals)

    def _txt_targets(self, name: str) -> tuple:
        """``name`` (lower case, no final dot) and what publishes its TXT: the served zone,
        the updater, or both; LocalProtocolError if neither covers it."""
        n = name.lower().rstrip(".") if isinstance(name, str) else ""
        targets: list = []
        if valid_domain(n, wildcard=False):
            if self.zone is not None and in_zone(n, self.zone.name):
                targets.append(self.zone)
            if self.updater is not None and in_zone(n, self.updater.zone):
                targets.append(self.updater)
        if not targets:
            zones = [z for z in (self.zone and self.zone.name, self.updater and self.updater.zone) if z]
            raise LocalProtocolError(f"{name!r} is not a name in the zone "
                                     f"{' or '.join(repr(z) for z in zones) or '(none: no --zone)'}")
        return n, targets
