"""The relay's zone: which names exist now and what a query for them gets (dnspython).

Theory of operation
-------------------
:class:`Zone` is synthesised, not loaded: a name has the relay's public addresses (A/AAAA)
while a kite flies on it (``app.zone``), below a flying wildcard kite (``*.app.zone`` covers
every name under ``app.zone``, as visitors are routed), or when it is one of the relay's own
names.  The apex has SOA and NS; TXT records are published by the relay itself
(:meth:`Zone.publish_txt`, e.g. ACME DNS-01 challenges).  Every other name in the zone does
not exist (NXDOMAIN + SOA), except the ancestors of names that do (empty non-terminals:
NODATA).  Every change bumps the SOA serial and :attr:`Zone.version`.

:meth:`Zone.respond` turns one parsed query into its answer: authoritative (AA) inside the
zone, REFUSED outside, no recursion (RA clear), EDNS only when asked (version 0, 1232 bytes),
ANY answered with one RRset (RFC 8482).  It has no I/O; :mod:`kite.names.server` frames,
limits and caches.
"""

from __future__ import annotations

import time
from typing import Iterable, Optional

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset

from ..errors import LocalProtocolError
from ..proto.names import valid_domain
from .config import in_zone

__all__ = ["Zone", "EDNS_PAYLOAD", "merge_txt", "without_txt"]

#: The UDP payload size we advertise and never exceed (DNS flag day 2020).
EDNS_PAYLOAD = 1232
#: TTL of the apex NS RRset and of the relay's own names' glue.
NS_TTL = 3600
#: SOA timers a secondary would use (kite serves no zone transfers).
SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 3600, 600, 86400
#: Bounds of the published TXT records.
MAX_TXT_VALUE = 255
MAX_TXT_VALUES = 32

IN = dns.rdataclass.IN
A, AAAA, TXT, NS, SOA, ANY = (dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.TXT,
                              dns.rdatatype.NS, dns.rdatatype.SOA, dns.rdatatype.ANY)
#: ANY gets the first of these the name has (RFC 8482: one RRset, never the lot).
ANY_ORDER = (A, AAAA, TXT, SOA)
ZONE_TRANSFERS = (dns.rdatatype.AXFR, dns.rdatatype.IXFR)


def merge_txt(name: str, current: list, values: Iterable[str]) -> list:
    """``current`` TXT values of ``name`` with ``values`` added (in order, no repeats);
    LocalProtocolError if a value is not a string of at most MAX_TXT_VALUE bytes or there
    would be more than MAX_TXT_VALUES."""
    vals = list(values)
    for v in vals:
        if not isinstance(v, str) or len(v.encode()) > MAX_TXT_VALUE:
            raise LocalProtocolError(f"a TXT value is a string of at most {MAX_TXT_VALUE} bytes")
    merged = list(dict.fromkeys([*current, *vals]))
    if len(merged) > MAX_TXT_VALUES:
        raise LocalProtocolError(f"at most {MAX_TXT_VALUES} TXT values on {name!r}")
    return merged


def without_txt(current: list, values: Optional[Iterable[str]]) -> Optional[list]:
    """``current`` TXT values without ``values`` (None: all of them); None if nothing of
    ``values`` was there (no change)."""
    if not current:
        return None
    drop = set(current if values is None else values)
    left = [v for v in current if v not in drop]
    return None if left == current else left


def _key(name: dns.name.Name) -> str:
    """The text form names are kept under: lower case, no trailing dot."""
    return name.canonicalize().to_text(omit_final_dot=True)


class Zone:
    """The names of one zone the relay is authoritative for, and the answers to queries."""

    def __init__(self, origin: str, addresses: Iterable[str], *, ttl: int = 60,
                 negative_ttl: int = 30, ns_names: Iterable[str] = (),
                 own_names: Iterable[str] = ()) -> None:
        self.name = origin.lower().rstrip(".")
        self.origin = dns.name.from_text(self.name)
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        addrs = list(addresses)
        self._v4 = [dns.rdata.from_text(IN, A, a) for a in addrs if ":" not in a]
        self._v6 = [dns.rdata.from_text(IN, AAAA, a) for a in addrs if ":" in a]
        self.ns_names = [n.lower().rstrip(".") for n in ns_names] or [f"relay.{self.name}"]
        self.own = {n.lower().rstrip(".") for n in [*own_names, *self.ns_names]}
        self.own = {n for n in self.own if in_zone(n, self.name) and valid_domain(n, wildcard=False)}
        self._kites: dict[str, set] = {}  # kite domain -> the protocols flying it
        # kite domain -> (A rdatas, AAAA rdatas) of the other relays of a fleet flying it
        self._fleet: dict[str, tuple] = {}
        self._txt: dict[str, list] = {}  # name -> published TXT values
        self._nodes: dict[str, int] = {}  # empty non-terminals -> names below them
        for n in self.own:
            self._add_node(n)
        self.serial = int(time.time()) & 0xFFFFFFFF
        self.version = 0
        self._soa = self._make_soa()

    # -- changes ------------------------------------------------------------------------------
    def _relevant(self, domain: str) -> bool:
        """Can the kite ``domain`` give a name in this zone addresses?"""
        if domain.startswith("*."):
            base = domain[2:]
            return in_zone(base, self.name) or in_zone(self.name, base)
        return in_zone(domain, self.name)

    def _ancestors(self, name: str) -> list:
        out = []
        while name != self.name and "." in name:
            name = name.split(".", 1)[1]
            if name == self.name or not in_zone(name, self.name):
                break
            out.append(name)
        return out

    def _add_node(self, name: str) -> None:
        if in_zone(name, self.name):
            for a in self._ancestors(name):
                self._nodes[a] = self._nodes.get(a, 0) + 1

    def _remove_node(self, name: str) -> None:
        if in_zone(name, self.name):
            for a in self._ancestors(name):
                left = self._nodes.get(a, 0) - 1
                if left > 0:
                    self._nodes[a] = left
                else:
                    self._nodes.pop(a, None)

    def _changed(self) -> None:
        self.serial = max((self.serial + 1) & 0xFFFFFFFF, int(time.time()) & 0xFFFFFFFF)
        self.version += 1
        self._soa = self._make_soa()

    def presence(self, proto: str, domain: str, online: bool) -> bool:
        """Kite ``proto:domain`` started or stopped flying; True if the zone changed."""
        d = domain.lower().rstrip(".")
        if not self._relevant(d):
            return False
        protos = self._kites.get(d)
        if online:
            if protos is not None:
                protos.add(proto)
                return False
            self._kites[d] = {proto}
            self._add_node(d)
        else:
            if protos is None or proto not in protos:
                return False
            protos.discard(proto)
            if protos:
                return False
            del self._kites[d]
            self._remove_node(d)
        self._changed()
        return True

    def fleet(self, domain: str, addresses: Iterable[str]) -> bool:
        """The other relays of a fleet that fly kite ``domain`` have ``addresses`` (none:
        no other relay flies it); True if the zone changed.  A name answers with these and,
        if the kite flies here too, this relay's own."""
        d = domain.lower().rstrip(".")
        if not self._relevant(d):
            return False
        addrs = sorted(set(addresses))
        v4 = tuple(dns.rdata.from_text(IN, A, a) for a in addrs if ":" not in a)
        v6 = tuple(dns.rdata.from_text(IN, AAAA, a) for a in addrs if ":" in a)
        old = self._fleet.get(d)
        if (v4 or v6) and old == (v4, v6):
            return False
        if not (v4 or v6):
            if old is None:
                return False
            del self._fleet[d]
            if d not in self._kites:
                self._remove_node(d)
        else:
            if old is None and d not in self._kites:
                self._add_node(d)
            self._fleet[d] = (v4, v6)
        self._changed()
        return True

    def flying(self) -> list:
        """The kite domains that give names in this zone addresses now."""
        return sorted(self._kites)

    def publish_txt(self, name: str, values: Iterable[str]) -> None:
        """Add ``values`` to the TXT RRset of ``name`` (in the zone; several at once)."""
        n = self._txt_name(name)
        current = self._txt.get(n, [])
        merged = merge_txt(n, current, values)
        if merged == current:
            return
        if not current:
            self._add_node(n)
        self._txt[n] = merged
        self._changed()

    def withdraw_txt(self, name: str, values: Optional[Iterable[str]] = None) -> None:
        """Remove ``values`` (default: all) from the TXT RRset of ``name``."""
        n = self._txt_name(name)
        left = without_txt(self._txt.get(n, []), values)
        if left is None:
            return
        if left:
            self._txt[n] = left
        else:
            del self._txt[n]
            self._remove_node(n)
        self._changed()

    def txt(self, name: str) -> list:
        return list(self._txt.get(self._txt_name(name), []))

    def _txt_name(self, name: str) -> str:
        n = name.lower().rstrip(".")
        if not valid_domain(n, wildcard=False) or not in_zone(n, self.name):
            raise LocalProtocolError(f"{name!r} is not a name in the zone {self.name!r}")
        return n

    # -- lookups ------------------------------------------------------------------------------
    def has_addresses(self, qname: dns.name.Name) -> bool:
        """A kite flies on ``qname`` (or a wildcard above it), or it is the relay's."""
        return self._has_addresses(_key(qname), qname)

    def exists(self, key: str) -> bool:
        """Does the name ``key`` exist (a kite, an own name, TXT, the apex or an empty
        non-terminal)?  ``key``: lower case, no final dot, in dnspython's text form."""
        return self._exists(key, self._has_addresses(key, None))

    @property
    def soa(self) -> dns.rrset.RRset:
        """The apex SOA RRset (the negative answers' authority), current serial."""
        return self._soa

    def _has_addresses(self, key: str, qname: Optional[dns.name.Name]) -> bool:
        if key in self.own:
            return True
        return self._kite_of(key, qname, self._kites) is not None or (
            bool(self._fleet) and self._kite_of(key, qname, self._fleet) is not None)

    @staticmethod
    def _kite_of(key: str, qname: Optional[dns.name.Name], kites: dict) -> Optional[str]:
        """The kite domain of ``kites`` that gives ``key`` addresses (itself, or a wildcard
        above it), or None."""
        if key in kites:
            return key
        if not kites:
            return None
        if "\\" not in key:  # plain labels: the text splits where the name does
            rest = key
            while "." in rest:
                rest = rest.split(".", 1)[1]
                if "*." + rest in kites:
                    return "*." + rest
            return None
        if qname is None:
            qname = dns.name.from_text(key)  # the text form round-trips (escapes and all)
        labels = qname.canonicalize().labels
        for i in range(1, len(labels) - 1):
            wild = "*." + dns.name.Name(labels[i:]).to_text(omit_final_dot=True)
            if wild in kites:
                return wild
        return None

    def _addresses(self, key: str, qname: dns.name.Name, v6: bool) -> list:
        """The A (or AAAA) rdatas of ``key``: this relay's if a kite flies here or the name
        is its own, and those of the fleet's other relays that fly its kite."""
        own = self._v6 if v6 else self._v4
        local = key in self.own or self._kite_of(key, qname, self._kites) is not None
        if not self._fleet:
            return own if local else []
        kite = self._kite_of(key, qname, self._fleet)
        other = list(self._fleet[kite][1 if v6 else 0]) if kite is not None else []
        if not local:
            return other
        return list(dict.fromkeys([*own, *other]))

    def _exists(self, key: str, addresses: bool) -> bool:
        return addresses or key == self.name or key in self._txt or key in self._nodes

    def _make_soa(self) -> dns.rrset.RRset:
        rdata = dns.rdata.from_text(
            IN, SOA, f"{self.ns_names[0]}. hostmaster.{self.name}. {self.serial} {SOA_REFRESH} "
                     f"{SOA_RETRY} {SOA_EXPIRE} {self.negative_ttl}")
        return dns.rrset.from_rdata(self.origin, self.negative_ttl, rdata)

    def _rrset(self, qname: dns.name.Name, rdtype, key: str, addresses: bool) -> Optional[dns.rrset.RRset]:
        """The RRset of type ``rdtype`` at ``qname`` (owner spelled as asked), or None."""
        rdatas: list = []
        ttl = self.ttl
        if rdtype == A and addresses:
            rdatas = self._addresses(key, qname, False)
        elif rdtype == AAAA and addresses:
            rdatas = self._addresses(key, qname, True)
        elif rdtype == TXT and key in self._txt:
            rdatas = [dns.rdtypes.ANY.TXT.TXT(IN, TXT, (v.encode(),)) for v in self._txt[key]]
        elif rdtype == SOA and key == self.name:
            return dns.rrset.from_rdata_list(qname, self.negative_ttl, list(self._soa))
        elif rdtype == NS and key == self.name:
            ttl = NS_TTL
            rdatas = [dns.rdata.from_text(IN, NS, n + ".") for n in self.ns_names]
        if not rdatas:
            return None
        return dns.rrset.from_rdata_list(qname, ttl, rdatas)

    def _glue(self) -> list:
        out = []
        for n in self.ns_names:
            if n in self.own:
                owner = dns.name.from_text(n)
                for rdatas in (self._v4, self._v6):
                    if rdatas:
                        out.append(dns.rrset.from_rdata_list(owner, self.ttl, rdatas))
        return out

    # -- answers ------------------------------------------------------------------------------
    def respond(self, query: dns.message.Message) -> dns.message.Message:
        """The answer to ``query`` (parsed, not a response), as a message to render."""
        r = dns.message.Message(id=query.id)
        r.flags = dns.flags.QR | (query.flags & (dns.flags.RD | dns.flags.CD))
        r.set_opcode(query.opcode())
        r.question = list(query.question)
        if query.edns >= 0:
            r.use_edns(0, 0, EDNS_PAYLOAD)
            if query.edns > 0:
                r.set_rcode(dns.rcode.BADVERS)
                return r
        if query.opcode() != dns.opcode.QUERY:
            r.set_rcode(dns.rcode.NOTIMP)
            return r
        if len(query.question) != 1:
            r.set_rcode(dns.rcode.FORMERR)
            return r
        q = query.question[0]
        qname, qtype = q.name, q.rdtype
        if q.rdclass not in (IN, dns.rdataclass.ANY) or not qname.is_subdomain(self.origin):
            r.set_rcode(dns.rcode.REFUSED)
            return r
        if qtype in ZONE_TRANSFERS:
            r.set_rcode(dns.rcode.REFUSED)
            return r
        if dns.rdatatype.is_metatype(qtype) and qtype != ANY:
            r.set_rcode(dns.rcode.FORMERR)
            return r
        r.flags |= dns.flags.AA
        key = _key(qname)
        addresses = self._has_addresses(key, qname)
        if not self._exists(key, addresses):
            r.set_rcode(dns.rcode.NXDOMAIN)
            r.authority.append(self._soa)
            return r
        if qtype == ANY:
            rrset = None
            for t in ANY_ORDER:
                rrset = self._rrset(qname, t, key, addresses)
                if rrset is not None:
                    break
        else:
            rrset = self._rrset(qname, qtype, key, addresses)
        if rrset is None:
            r.authority.append(self._soa)  # NODATA
            return r
        r.answer.append(rrset)
        if rrset.rdtype == NS:
            r.additional.extend(self._glue())
        return r
