"""Negative answers (NXDOMAIN, REFUSED) rendered from templates, without dnspython.

Theory of operation
-------------------
A flood of random names (each a different NXDOMAIN, the "random subdomain" load) misses the
server's answer cache every time, and dnspython's parse, respond and render cost ~100 us a
query.  :meth:`NegativeAnswers.answer` answers the plain cases from bytes instead: it reads
the header and question itself, asks the zone whether the name exists (the same
:class:`~kite.names.zone.Zone` lookups ``respond`` uses), and writes header + the question
as it came (case kept) + the zone's SOA in the authority section (NXDOMAIN) or nothing
(REFUSED) + an OPT record only when the query had one.  The answer is byte for byte what
dnspython renders for the same query (``tests/test_names_negative.py`` checks it), name
compression included: the SOA's names point into the question as dnspython's compressor
would.

A query is a plain case when it is a standard query (QR clear, opcode QUERY) with one
question and nothing else but maybe one OPT (version 0, extended rcode 0, no option but
maybe one well-formed COOKIE); the question's name is uncompressed, with labels of letters,
digits, ``-`` and ``_`` only; its type is neither a zone transfer nor a metatype other than
ANY; and the message ends where the question (or the OPT) does.  Everything else -- a name
that exists, and an answer that would not fit the client's UDP limit -- is None here, and
the server gives it to dnspython.
"""

from __future__ import annotations

import re
import struct
from typing import Optional

import dns.flags
import dns.rcode
import dns.rdatatype

from .zone import EDNS_PAYLOAD, Zone

__all__ = ["NegativeAnswers"]

#: Labels answered here: nothing dnspython would escape or that needs care.
_PLAIN = re.compile(rb"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_OPT, _COOKIE = 41, 10
_IN, _ANY_CLASS = 1, 255
_KEPT_FLAGS = int(dns.flags.RD | dns.flags.CD)
_QR = int(dns.flags.QR)
_NXDOMAIN = int(dns.flags.AA) | int(dns.rcode.NXDOMAIN)
_REFUSED = int(dns.rcode.REFUSED)
#: The OPT record of every EDNS answer: root, OPT, 1232 bytes, rcode 0, version 0, no flags.
_OPT_RR = b"\x00" + struct.pack("!HHIH", _OPT, EDNS_PAYLOAD, 0, 0)
_HEADER = struct.Struct("!HHHHHH")
_TYPE_CLASS = struct.Struct("!HH")


def _name_parts(name) -> list:
    """(lower-case text of the suffix, wire of its first label) for each non-root suffix."""
    labels = [lab for lab in name.labels if lab]
    return [(b".".join(labels[i:]).lower().decode("ascii", "backslashreplace"),
             bytes([len(lab)]) + lab) for i, lab in enumerate(labels)]


class NegativeAnswers:
    """Templates of the negative answers of ``zone``, rebuilt when it changes."""

    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self._version = -1
        self._suffix = ""
        self._ttl_class = b""
        self._mname: list = []
        self._rname: list = []
        self._soa_tail = b""
        self._below: list = []
        self._soas: dict = {}  # (name length, suffixes below the zone it has) -> SOA RR
        self._rebuild()

    def _rebuild(self) -> None:
        zone = self.zone
        self._version = zone.version
        self._suffix = "." + zone.name
        soa = zone.soa
        rd = soa[0]
        self._ttl_class = struct.pack("!HHI", dns.rdatatype.SOA, _IN, soa.ttl)
        self._mname = _name_parts(rd.mname)
        self._rname = _name_parts(rd.rname)
        self._soa_tail = struct.pack("!IIIII", rd.serial, rd.refresh, rd.retry, rd.expire,
                                     rd.minimum)
        # The SOA's bytes depend on where the question's name has the suffixes of the SOA's
        # names: the zone and its ancestors sit at fixed distances from the name's end, the
        # names below the zone (``relay.ZONE``...) may or may not be suffixes of the name.
        # So they are kept per (length of the name, those suffixes it has).
        below = {sfx for sfx, _ in self._mname + self._rname if sfx.endswith(self._suffix)}
        self._below = sorted("." + sfx for sfx in below)
        self._soas = {}

    def answer(self, data: bytes, tcp: bool) -> Optional[bytes]:
        """The negative answer to ``data``, or None when it is not a plain negative case."""
        size = len(data)
        if size < 17:
            return None
        qid, flags, qd, an, ns, ar = _HEADER.unpack_from(data)
        if flags & 0xF800 or qd != 1 or an or ns or ar > 1:  # QR, opcode; the counts
            return None
        # the question's name: uncompressed labels, at most 255 bytes
        starts = []
        pos = 12
        ln = data[12]
        while ln:
            if ln > 63:
                return None
            starts.append(pos)
            pos += 1 + ln
            if pos >= size:
                return None
            ln = data[pos]
        qend = pos + 5  # the root label, type and class
        if not starts or qend > size or pos > 266:
            return None
        qtype, qclass = _TYPE_CLASS.unpack_from(data, pos + 1)
        if 128 <= qtype <= 254 or qtype == _OPT or qtype > 255 and dns.rdatatype.is_metatype(qtype):
            return None  # zone transfers, metatypes (but ANY)
        # the OPT record, if any
        payload = 512
        if ar:
            if size < qend + 11 or data[qend] != 0:
                return None
            rtype, payload, ttl, rdlen = struct.unpack_from("!HHIH", data, qend + 1)
            if rtype != _OPT or ttl & 0xFFFF0000 or qend + 11 + rdlen != size:
                return None
            if rdlen and not _only_cookie(data, qend + 11, size):
                return None
        elif qend != size:
            return None
        # the name as text (dots between the labels) and the zone's view of it
        text = bytearray(data[13:pos])
        for s in starts[1:]:
            text[s - 13] = 0x2E
        if not _PLAIN.fullmatch(text) or text.count(0x2E) != len(starts) - 1:
            return None  # a byte dnspython escapes, or a dot inside a label
        key = text.decode("ascii").lower()
        zone = self.zone
        if self._version != zone.version:
            self._rebuild()
        out_flags = (flags & _KEPT_FLAGS) | _QR
        question = data[12:qend]
        if (qclass != _IN and qclass != _ANY_CLASS) or not (
                key.endswith(self._suffix) or key == zone.name):
            wire = _HEADER.pack(qid, out_flags | _REFUSED, 1, 0, 0, 1 if ar else 0) \
                + question + (_OPT_RR if ar else b"")
        else:
            if zone.exists(key):
                return None  # an answer or NODATA: dnspython renders it (and it is cached)
            dotted = "." + key
            shape = (len(key), *[d for d in self._below if dotted.endswith(d)])
            soa = self._soas.get(shape)
            if soa is None:
                if len(self._soas) >= 1024:
                    self._soas.clear()
                soa = self._soas[shape] = self._soa(key, starts, qend)
            wire = _HEADER.pack(qid, out_flags | _NXDOMAIN, 1, 0, 1, 1 if ar else 0) \
                + question + soa + (_OPT_RR if ar else b"")
        if not tcp and len(wire) > min(max(512, payload if ar else 512), EDNS_PAYLOAD):
            return None  # truncation: dnspython's
        return wire

    def _soa(self, key: str, starts: list, at: int) -> bytes:
        """The zone's SOA RR, written at offset ``at`` after the question whose name is
        ``key`` (its labels at ``starts``), compressed as dnspython does: each name's longest
        suffix already written becomes a pointer, and the suffixes written are remembered."""
        table = {key[s - 12:]: s for s in starts}  # lower-case suffix -> its offset
        rdata = bytearray()
        here = at + 12  # the owner (a pointer), type, class, TTL, rdata length
        for parts in (self._mname, self._rname):
            for suffix, label in parts:
                p = table.get(suffix)
                if p is not None:
                    rdata += (0xC000 | p).to_bytes(2, "big")
                    break
                if here + len(rdata) <= 0x3FFF:
                    table[suffix] = here + len(rdata)
                rdata += label
            else:
                rdata.append(0)
        rdata += self._soa_tail
        return (0xC000 | table[self.zone.name]).to_bytes(2, "big") + self._ttl_class \
            + len(rdata).to_bytes(2, "big") + rdata


def _only_cookie(data: bytes, start: int, end: int) -> bool:
    """The OPT's options are one well-formed COOKIE (8 bytes client, 8..32 server)."""
    if end - start < 4:
        return False
    code, length = struct.unpack_from("!HH", data, start)
    return code == _COOKIE and start + 4 + length == end and (length == 8 or 16 <= length <= 40)
