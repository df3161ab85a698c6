"""RFC 2136 push: keep the kites' A/AAAA records, and the TXT values the relay publishes, on a
DNS server the relay does not own.

Theory of operation
-------------------
:class:`DnsUpdater` is told when kites start and stop flying (:meth:`DnsUpdater.presence`)
and one task sends the changes as dynamic updates (``dns.update``, TSIG-signed when a key is
configured) over TCP with ``dns.asyncquery``: never on the relay's critical path, never
blocking the event loop.  A flying kite's name gets its A and AAAA RRsets *replaced* by the
``--public-ip`` set; a stopped one has both deleted.  A published TXT value
(:meth:`DnsUpdater.publish_txt`, e.g. an ACME DNS-01 challenge; several per name) is added to
its name's TXT RRset and a withdrawn one deleted, value by value (all of them at
:meth:`DnsUpdater.close`): TXT values at the same name that the relay did not publish are
left alone.  Changes that pile up while an update is on
the wire go out together in the next one.

Which records are the relay's: the RRset ``_kite-relay.ZONE TXT`` lists them, changed in the
same update as the records: one single-string value per kite name (its A/AAAA), and one
three-string value ``"txt" NAME VALUE`` per published TXT value.  A *full resync* reads it,
deletes the records of every listed name that is not flying now and every listed TXT value
that is not published now, and replaces (A/AAAA) or adds (TXT) everything that is wanted.
It runs at start (stale names of a previous run go away) and after every failure: an
unreachable server (retried with exponential backoff, :data:`RETRY_FIRST` to
:data:`RETRY_MAX` seconds) or a rejected update (logged with its reason and rcode: BADSIG,
REFUSED, NOTAUTH...).  The TSIG secret is never logged.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Iterable, Optional

import dns.asyncquery
import dns.exception
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.tsig
import dns.update

from ..errors import DnsUpdateRejected
from .config import TsigKey, in_zone
from .zone import merge_txt, without_txt

log = logging.getLogger("kite.names")

__all__ = ["DnsUpdater", "REGISTRY_LABEL"]

#: The TXT RRset (below the update zone) listing the names this relay put there.
REGISTRY_LABEL = "_kite-relay"
#: Seconds before the first retry after a failure, and the most between two.
RETRY_FIRST = 1.0
RETRY_MAX = 30.0
#: Seconds an update may take on the wire.
TIMEOUT = 10.0
#: Names per update message in a full resync.
NAMES_PER_UPDATE = 64

#: What an update's rcode means here (RFC 2136 §2.2, RFC 8945 §5.3).
RCODE_REASONS = {
    "REFUSED": "the server's policy refuses this update (no ACL for this key or address)",
    "NOTAUTH": "the server takes no updates of the zone from us (not authoritative for it, "
               "or no ACL for this key or address)",
    "NOTZONE": "a name is outside the zone",
    "SERVFAIL": "the server failed to apply the update",
    "NOTIMP": "the server does not implement dynamic updates",
    "FORMERR": "the server could not parse the update",
}
TSIG_REASONS = {
    dns.tsig.PeerBadKey: ("BADKEY", "the server does not know the TSIG key"),
    dns.tsig.PeerBadSignature: ("BADSIG", "the server says the TSIG signature is wrong (wrong secret?)"),
    dns.tsig.PeerBadTime: ("BADTIME", "the server says the TSIG time is off (clock skew?)"),
    dns.tsig.PeerBadTruncation: ("BADTRUNC", "the server rejected the TSIG truncation"),
}


#: The first string of a registry value that lists a published TXT value.
TXT_ENTRY = b"txt"


def _txt(*strings: bytes) -> dns.rdtypes.ANY.TXT.TXT:
    """A TXT rdata of ``strings`` (each at most 255 bytes)."""
    return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings)


class DnsUpdater:
    """Pushes the flying kites of ``zone`` to the DNS server at ``server`` (host, port)."""

    def __init__(self, server: tuple, zone: str, addresses: Iterable[str], *, ttl: int = 60,
                 key: Optional[TsigKey] = None, timeout: float = TIMEOUT) -> None:
        self.host, self.port = server
        self.zone = zone.lower().rstrip(".")
        self.origin = dns.name.from_text(self.zone)
        self.registry = dns.name.from_text(f"{REGISTRY_LABEL}.{self.zone}")
        addrs = list(addresses)
        self.v4 = [a for a in addrs if ":" not in a]
        self.v6 = [a for a in addrs if ":" in a]
        self.ttl = ttl
        self.timeout = timeout
        self._key: Optional[dns.tsig.Key] = None
        if key is not None:
            self._key = dns.tsig.Key(key.name, key.secret, key.algorithm)
        self._protos: dict[str, set] = {}  # flying kite domain -> its protocols
        self._txt: dict[str, list] = {}  # name -> the TXT values published there
        self._txt_sent: dict[str, set] = {}  # name -> TXT values the server has from us
        self._dirty: set[str] = set()  # kite names whose records at the server may be out of date
        self._txt_dirty: set[str] = set()  # names whose published TXT values changed
        self._resync = True
        self._wake: Optional[asyncio.Event] = None
        self._idle: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self.updates = 0  # updates the server accepted
        self.failures = 0

    @property
    def where(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def covers(self, domain: str) -> bool:
        """Can ``domain`` (a kite, maybe ``*.parent``) be a name in the update zone?"""
        base = domain[2:] if domain.startswith("*.") else domain
        return in_zone(base, self.zone)

    # -- events -------------------------------------------------------------------------------
    def presence(self, proto: str, domain: str, online: bool) -> None:
        d = domain.lower().rstrip(".")
        if not self.covers(d):
            return
        protos = self._protos.get(d)
        if online:
            if protos is not None:
                protos.add(proto)
                return
            self._protos[d] = {proto}
        else:
            if protos is None or proto not in protos:
                return
            protos.discard(proto)
            if protos:
                return
            del self._protos[d]
        self._dirty.add(d)
        if self._wake is not None:
            self._wake.set()

    def wanted(self) -> list:
        return sorted(self._protos)

    def publish_txt(self, name: str, values: Iterable[str]) -> None:
        """Add ``values`` to the TXT values published at ``name`` (in the update zone)."""
        n = name.lower().rstrip(".")
        current = self._txt.get(n, [])
        merged = merge_txt(n, current, values)
        if merged != current:
            self._txt[n] = merged
            self._txt_changed(n)

    def withdraw_txt(self, name: str, values: Optional[Iterable[str]] = None) -> None:
        """Stop publishing ``values`` (default: every value) at ``name``."""
        n = name.lower().rstrip(".")
        left = without_txt(self._txt.get(n, []), values)
        if left is None:
            return
        if left:
            self._txt[n] = left
        else:
            del self._txt[n]
        self._txt_changed(n)

    def txt(self, name: str) -> list:
        """The TXT values published at ``name``."""
        return list(self._txt.get(name.lower().rstrip("."), []))

    def _txt_changed(self, name: str) -> None:
        self._txt_dirty.add(name)
        if self._wake is not None:
            self._wake.set()

    # -- the task -----------------------------------------------------------------------------
    def start(self) -> None:
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Stop; first withdraw every published TXT value and give pending changes (these,
        kites that went offline) ``flush_timeout`` seconds to reach the server."""
        if self._task is None:
            return
        for name in list(self._txt):
            self.withdraw_txt(name)
        if (self._dirty or self._txt_dirty) and not self._resync and self._idle is not None:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), flush_timeout)
            except asyncio.TimeoutError:
                pass
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None

    async def _run(self) -> None:
        assert self._wake is not None and self._idle is not None
        delay = RETRY_FIRST
        while True:
            if not self._resync and not self._dirty and not self._txt_dirty:
                self._idle.set()
                await self._wake.wait()
                self._wake.clear()
                continue
            try:
                if self._resync:
                    await self._full_resync()
                    self._resync = False
                else:
                    batch, self._dirty = self._dirty, set()
                    txt_batch, self._txt_dirty = self._txt_dirty, set()
                    try:
                        await self._push(sorted(batch), sorted(txt_batch))
                    except BaseException:
                        self._dirty |= batch
                        self._txt_dirty |= txt_batch
                        raise
                delay = RETRY_FIRST
                continue
            except DnsUpdateRejected as exc:
                log.error("dns update rejected by %s: %s; full resync in %g s",
                          self.where, exc, delay)
            except (OSError, EOFError, asyncio.TimeoutError, dns.exception.DNSException) as exc:
                log.warning("dns update server %s unreachable: %s; full resync in %g s",
                            self.where, str(exc) or type(exc).__name__, delay)
            except Exception:  # a bug must not end the pushing for good
                log.exception("dns update to %s failed; full resync in %g s", self.where, delay)
            self.failures += 1
            self._resync = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    # -- messages -----------------------------------------------------------------------------
    def _message(self) -> dns.update.UpdateMessage:
        return dns.update.UpdateMessage(self.origin, keyring=self._key)

    def _add_ops(self, upd: dns.update.UpdateMessage, name: str, online: bool) -> None:
        owner = dns.name.from_text(name)
        if online:
            for rdtype, addrs in (("A", self.v4), ("AAAA", self.v6)):
                if addrs:
                    upd.replace(owner, self.ttl, rdtype, *addrs)
                else:
                    upd.delete(owner, rdtype)
            upd.add(self.registry, self.ttl, _txt(name.encode()))
        else:
            upd.delete(owner, "A")
            upd.delete(owner, "AAAA")
            upd.delete(self.registry, _txt(name.encode()))

    def _txt_ops(self, upd: dns.update.UpdateMessage, name: str, sent: set) -> set:
        """Add the TXT values wanted at ``name``, delete those in ``sent`` that are not; the
        values the server has from us once the update is applied."""
        owner = dns.name.from_text(name)
        wanted = self._txt.get(name, [])
        for value in sorted(sent - set(wanted)):
            upd.delete(owner, _txt(value.encode()))
            upd.delete(self.registry, _txt(TXT_ENTRY, name.encode(), value.encode()))
        for value in wanted:
            upd.add(owner, self.ttl, _txt(value.encode()))
            upd.add(self.registry, self.ttl, _txt(TXT_ENTRY, name.encode(), value.encode()))
        return set(wanted)

    async def _address(self) -> str:
        try:
            return str(ipaddress.ip_address(self.host))
        except ValueError:
            pass
        infos = await asyncio.get_running_loop().getaddrinfo(self.host, self.port,
                                                             type=socket.SOCK_STREAM)
        return str(infos[0][4][0])

    async def _exchange(self, msg: dns.message.Message) -> dns.message.Message:
        where = await self._address()
        try:
            response = await dns.asyncquery.tcp(msg, where, timeout=self.timeout, port=self.port)
        except dns.tsig.PeerError as exc:
            tsig, reason = TSIG_REASONS.get(type(exc), ("error", "the server rejected the TSIG"))
            raise DnsUpdateRejected(f"NOTAUTH, TSIG {tsig}", reason) from None
        rcode = dns.rcode.to_text(response.rcode())
        if rcode not in ("NOERROR", "NXDOMAIN") or (
                rcode == "NXDOMAIN" and msg.opcode() != dns.opcode.QUERY):
            raise DnsUpdateRejected(rcode, RCODE_REASONS.get(rcode, "the server refused it"))
        return response

    async def _push(self, names: list, txt_names: Iterable[str] = ()) -> None:
        upd = self._message()
        for name in names:
            self._add_ops(upd, name, name in self._protos)
        sent = {n: self._txt_ops(upd, n, self._txt_sent.get(n, set())) for n in txt_names}
        await self._exchange(upd)
        self.updates += 1
        self._note_sent(sent)
        for name in names:
            log.info("dns update: %s %s at %s", name,
                     "-> " + " ".join(self.v4 + self.v6) if name in self._protos else "removed",
                     self.where)
        for n in txt_names:  # the values may be secrets of a kind (challenges): counted only
            log.info("dns update: %s TXT: %d values at %s", n, len(self._txt.get(n, [])), self.where)

    def _note_sent(self, sent: dict) -> None:
        """The server now holds ``sent`` (name -> TXT values; empty: none at the name)."""
        for n, values in sent.items():
            if values:
                self._txt_sent[n] = values
            else:
                self._txt_sent.pop(n, None)

    async def _registered(self) -> tuple:
        """What the registry RRset at the server lists: kite names, and name -> TXT values."""
        q = dns.message.make_query(self.registry, "TXT")
        if self._key is not None:
            q.use_tsig(self._key)
        response = await self._exchange(q)
        names: set = set()
        txt: dict[str, set] = {}
        for rrset in response.answer:
            if rrset.rdtype != dns.rdatatype.TXT:
                continue
            for rd in rrset:
                strings = [s.decode("utf-8", "replace") for s in rd.strings]
                if len(rd.strings) == 1:
                    n = strings[0].lower()
                    if self.covers(n):
                        names.add(n)
                elif len(rd.strings) == 3 and rd.strings[0] == TXT_ENTRY:
                    n = strings[1].lower()
                    if self.covers(n) and not n.startswith("*."):
                        txt.setdefault(n, set()).add(strings[2])
        return names, txt

    async def _full_resync(self) -> None:
        owned, owned_txt = await self._registered()
        self._dirty.clear()  # everything is sent now; later changes mark names again
        self._txt_dirty.clear()
        self._txt_sent = {n: set(v) for n, v in owned_txt.items()}
        wanted = set(self._protos)
        stale = sorted(owned - wanted)
        names = stale + sorted(wanted)
        txt_names = sorted(set(owned_txt) | set(self._txt))
        ops = [(n, False) for n in names] + [(n, True) for n in txt_names]
        for i in range(0, len(ops), NAMES_PER_UPDATE):
            upd = self._message()
            sent = {}
            for name, is_txt in ops[i:i + NAMES_PER_UPDATE]:
                if is_txt:
                    sent[name] = self._txt_ops(upd, name, owned_txt.get(name, set()))
                else:
                    self._add_ops(upd, name, name in wanted)
            await self._exchange(upd)
            self.updates += 1
            self._note_sent(sent)
        stale_txt = sum(len(v - set(self._txt.get(n, []))) for n, v in owned_txt.items())
        log.info("dns update: resynced the zone %s at %s: %d names flying, %d stale removed, "
                 "%d TXT values published, %d stale TXT values removed", self.zone, self.where,
                 len(wanted), len(stale), sum(map(len, self._txt.values())), stale_txt)
