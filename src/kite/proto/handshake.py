"""The PageKite tunnel handshake, both sides, bit-exact with pagekite.py 1.5.2.

Theory of operation (docs/protocol.md §1.3, §2, §3):

1. The backend probes the relay with ``HEAD /ping`` (:data:`PING_REQUEST`); the relay answers
   :func:`build_ping_reply` (a 503 page carrying ``X-PageKite-UUID``) and closes.
2. The backend sends :func:`build_tunnel_request`: ``CONNECT PageKite:1 HTTP/1.0`` plus one
   ``X-PageKite: PROTO:DOMAIN:BSALT:FSALT:SIGNATURE`` line per kite (:class:`KiteLine`), FSALT
   empty in the first round.  The relay parses it with :func:`parse_tunnel_request`.
3. The relay decides per kite with :class:`KiteAuthorizer` (SignThis / OK / Invalid /
   Duplicate) and answers :func:`build_tunnel_response` (``HTTP/1.1 200 OK`` + capability
   headers + the decision headers) - or :data:`TUNNEL_FORBIDDEN` / :data:`TUNNEL_UNAVAILABLE`.
   The backend parses that with :func:`parse_tunnel_response` into a :class:`RelayReply`.
4. Second round, in-band: the backend signs each :class:`Challenge` and sends
   :func:`build_inband_request` as a NOOP chunk; the relay parses the chunk's headers with
   :func:`parse_inband_request`, decides again, and answers :func:`build_inband_reply`
   (parsed by :func:`parse_inband_reply`).  Or, re-connect style, a new CONNECT with signed
   lines whose 200 reply carries the OKs directly.

Everything here is pure: bytes or header lists in, dataclasses out, and back.  Header names
are matched case-insensitively, and every ``X-PageKite*`` name is also accepted with the
legacy prefix ``X-Beanstalk`` (pagekite.py ``GetKiteRequests``); results echo the prefix the
kite was requested with.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Collection, Iterable, Literal, Mapping, Optional, Sequence, Union
from urllib.parse import parse_qs, urlencode

from ..errors import HandshakeError, LocalProtocolError
from .http import has_control
from .names import KITE_PROTOS
from .signing import check_challenge, check_signature, make_challenge, sha1hex, sign

__all__ = [
    "PAGEKITE_VERSION",
    "PING_REQUEST",
    "TUNNEL_FORBIDDEN",
    "TUNNEL_UNAVAILABLE",
    "DEFAULT_PROTOS",
    "KiteLine",
    "KiteRef",
    "Challenge",
    "TunnelRequest",
    "build_tunnel_request",
    "parse_tunnel_request",
    "build_inband_request",
    "parse_inband_request",
    "KiteDecision",
    "AuthReply",
    "KiteAuthorizer",
    "ChallengeBook",
    "session_id",
    "RelayReply",
    "build_tunnel_response",
    "parse_tunnel_response",
    "build_inband_reply",
    "parse_inband_reply",
    "build_unavailable",
    "build_ping_reply",
    "new_relay_uuid",
]

Headers = Sequence[tuple[str, str]]

PAGEKITE_VERSION = "1.5.2.201011"  # APPVER of pagekite.py 1.5.2 (informational on the wire)

PING_REQUEST = b"HEAD /ping HTTP/1.1\r\nHost: ping.pagekite\r\n\r\n"  # pk.py Ping(), exactly
TUNNEL_FORBIDDEN = b"HTTP/1.0 403 Forbidden\r\n\r\n"  # tunnel ACL refused the peer's address
TUNNEL_UNAVAILABLE = b"HTTP/1.0 503 Unavailable\r\n\r\n"  # unparsable request (HTTP_ConnectBad())

DEFAULT_PROTOS = KITE_PROTOS

_PREFIXES = ("X-Beanstalk", "X-PageKite")  # pagekite.py iterates them in this order
_HTTP_VERSIONS = ("HTTP/1.0", "HTTP/1.1")


# --------------------------------------------------------------------------------------------
# HTTP heads (their end and bound: .http)


def _split_head(head: Union[bytes, str], what: str) -> tuple[str, list[tuple[str, str]]]:
    """First line and ``(name, value)`` pairs of an HTTP head, as pagekite's HttpLineParser
    reads them: names as sent (compare them case-insensitively), values stripped."""
    text = head.decode("latin-1") if isinstance(head, (bytes, bytearray, memoryview)) else head
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    first, headers = lines[0], []
    if has_control(first):
        raise HandshakeError(f"control character in the first line of {what}: {first[:80]!r}")
    for line in lines[1:]:
        if line == "":
            break
        if has_control(line):  # a lone CR, NUL, ESC ...: docs/protocol.md §11
            raise HandshakeError(f"control character in a header line of {what}: {line[:80]!r}")
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise HandshakeError(f"malformed header line in {what}: {line[:80]!r}")
        headers.append((name, value.strip()))
    return first, headers


def _check_values(headers: Headers, what: str) -> None:
    """No control characters in header values (in-band headers come from the Demux, which
    splits lines at CRLF only: a lone CR or LF stays in a value)."""
    for name, value in headers:
        if has_control(value):
            raise HandshakeError(f"control character in {what} header {name[:40]!r}: {value[:80]!r}")


# A kite field (PROTO, DOMAIN, BSALT, FSALT, SIGNATURE): visible ASCII, no ':' (which
# separates them).  docs/protocol.md §2.1, §11.
_KITE_FIELD = re.compile(r"[!-9;-~]*")


def _kite_fields(value: str, count: int, what: str) -> list[str]:
    fields = value.strip().split(":")
    if len(fields) != count:
        raise HandshakeError(f"{what} needs {count} ':'-separated fields, got {value[:200]!r}")
    for text in fields:
        if not _KITE_FIELD.fullmatch(text):
            raise HandshakeError(f"{what} field is not visible ASCII: {value[:200]!r}")
    return fields


def _values(headers: Headers, suffix: str) -> list[str]:
    """All values of ``X-Beanstalk<suffix>`` then of ``X-PageKite<suffix>``, in wire order."""
    out: list[str] = []
    for prefix in _PREFIXES:
        wanted = (prefix + suffix).lower()
        out.extend(v for n, v in headers if n.strip().lower() == wanted)
    return out


def _list_values(values: Iterable[str]) -> list[str]:
    # pagekite.py sends one feature per header line and ", "-joined port/proto lists;
    # accept comma lists in either.
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _header_line(name: str, value: object) -> str:
    text = f"{value}"
    if "\r" in text or "\n" in text:
        raise LocalProtocolError(f"header value must not contain CR or LF: {name}: {text!r}")
    return f"{name}: {text}\r\n"


def _encode(text: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"header text is not latin-1: {text[:80]!r}") from None


# --------------------------------------------------------------------------------------------
# Kite lines and references


@dataclass(frozen=True)
class KiteLine:
    """One ``X-PageKite: PROTO:DOMAIN:BSALT:FSALT:SIGNATURE`` request value.

    ``proto`` may carry a port (``raw-22``, ``http-8080``).  ``fsalt`` is empty in the first
    round; ``signature`` signs ``PROTO:DOMAIN:BSALT:FSALT`` with the kite's secret.
    ``prefix`` is the header name it came with (``X-PageKite`` or the legacy ``X-Beanstalk``).
    """

    proto: str
    domain: str
    bsalt: str
    fsalt: str
    signature: str
    prefix: str = field(default="X-PageKite", compare=False)

    @property
    def what(self) -> str:
        """``PROTO:DOMAIN:BSALT``: how the relay names this kite in its answers."""
        return f"{self.proto}:{self.domain}:{self.bsalt}"

    @property
    def kite(self) -> str:
        """``PROTO:DOMAIN``."""
        return f"{self.proto}:{self.domain}"

    @property
    def payload(self) -> str:
        """``PROTO:DOMAIN:BSALT:FSALT``: what ``signature`` signs."""
        return f"{self.what}:{self.fsalt}"

    @property
    def value(self) -> str:
        """The header value, ``PROTO:DOMAIN:BSALT:FSALT:SIGNATURE``."""
        return f"{self.payload}:{self.signature}"

    @classmethod
    def parse(cls, value: str, prefix: str = "X-PageKite") -> KiteLine:
        """Parse a header value: exactly five ``:``-separated fields of visible ASCII, PROTO
        and DOMAIN not empty, else HandshakeError (pagekite.py refuses the whole request on a
        wrong field count).  PROTO and DOMAIN are lower-cased."""
        proto, domain, bsalt, fsalt, signature = _kite_fields(value, 5, "kite request")
        if not proto or not domain:
            raise HandshakeError(f"kite request without PROTO or DOMAIN: {value[:200]!r}")
        return cls(proto.lower(), domain.lower(), bsalt, fsalt, signature, prefix)

    @classmethod
    def signed(
        cls,
        proto: str,
        domain: str,
        bsalt: str,
        kite_secret: str,
        fsalt: str = "",
        *,
        salt: Optional[str] = None,
    ) -> KiteLine:
        """A kite line signed with ``kite_secret`` (first round: ``fsalt`` empty)."""
        proto, domain = proto.lower(), domain.lower()
        fields = (("proto", proto), ("domain", domain), ("bsalt", bsalt), ("fsalt", fsalt))
        for name, text in fields:
            if ":" in text or not text.isprintable() or (name != "fsalt" and not text):
                raise LocalProtocolError(f"invalid kite {name}: {text!r}")
        payload = f"{proto}:{domain}:{bsalt}:{fsalt}"
        return cls(proto, domain, bsalt, fsalt, sign(kite_secret, payload, salt))


@dataclass(frozen=True)
class KiteRef:
    """A kite as the relay's answers name it: ``PROTO:DOMAIN:BSALT`` (``what``)."""

    proto: str
    domain: str
    bsalt: str

    @property
    def what(self) -> str:
        return f"{self.proto}:{self.domain}:{self.bsalt}"

    @property
    def kite(self) -> str:
        return f"{self.proto}:{self.domain}"

    @classmethod
    def parse(cls, value: str) -> KiteRef:
        """``PROTO:DOMAIN:BSALT``, visible ASCII; else HandshakeError."""
        return cls(*_kite_fields(value, 3, "kite reference"))


@dataclass(frozen=True)
class Challenge:
    """``X-PageKite-SignThis: PROTO:DOMAIN:BSALT:FSALT``: sign this to fly the kite."""

    proto: str
    domain: str
    bsalt: str
    fsalt: str

    @property
    def what(self) -> str:
        return f"{self.proto}:{self.domain}:{self.bsalt}"

    @property
    def kite(self) -> str:
        return f"{self.proto}:{self.domain}"

    @classmethod
    def parse(cls, value: str) -> Challenge:
        """``PROTO:DOMAIN:BSALT:FSALT``, visible ASCII, no field empty (each is signed by
        :meth:`answer`); else HandshakeError."""
        fields = _kite_fields(value, 4, "SignThis")
        if not all(fields):
            raise HandshakeError(f"SignThis with an empty field: {value[:200]!r}")
        return cls(*fields)

    def answer(self, kite_secret: str, *, salt: Optional[str] = None) -> KiteLine:
        """The second-round kite line: sign ``PROTO:DOMAIN:BSALT:FSALT`` with the kite secret."""
        return KiteLine.signed(
            self.proto, self.domain, self.bsalt, kite_secret, self.fsalt, salt=salt
        )


# --------------------------------------------------------------------------------------------
# The tunnel request (backend -> relay)


@dataclass
class TunnelRequest:
    """A parsed ``CONNECT PageKite:1`` request, or the headers of an in-band kite request.

    Repeated ``Features``/``Version`` lines are all kept, in order (pagekite.py sends the
    version twice and every feature on its own line).
    """

    kites: list[KiteLine] = field(default_factory=list)
    features: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    replace: list[str] = field(default_factory=list)
    target: str = "PageKite:1"
    http_version: str = "HTTP/1.0"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def zchunks(self) -> bool:
        """The backend reads ZChunks: the relay may compress what it sends."""
        return "ZChunks" in self.features

    @property
    def add_kites(self) -> bool:
        """The backend can register kites in-band (NOOP chunk) on this connection."""
        return "AddKites" in self.features

    @property
    def mobile(self) -> bool:
        return "Mobile" in self.features

    @property
    def version(self) -> str:
        """The last version header, or ``old`` (what pagekite.py records)."""
        return self.versions[-1] if self.versions else "old"


def _request_from_headers(headers: Headers) -> TunnelRequest:
    _check_values(headers, "kite request")
    kites: list[KiteLine] = []
    for prefix in _PREFIXES:
        wanted = prefix.lower()
        kites.extend(KiteLine.parse(v, prefix) for n, v in headers if n.strip().lower() == wanted)
    return TunnelRequest(
        kites=kites,
        features=_list_values(_values(headers, "-Features")),
        versions=_values(headers, "-Version"),
        replace=_values(headers, "-Replace"),
        headers=list(headers),
    )


def parse_tunnel_request(head: Union[bytes, str]) -> TunnelRequest:
    """Parse a ``CONNECT PageKite:...`` head (up to its blank line: kite.proto.http.find_head_end).

    The target must start with ``pagekite:`` (any case), the version be HTTP/1.0 or 1.1.
    Any malformed line or kite value is a HandshakeError: answer :data:`TUNNEL_UNAVAILABLE`.
    """
    first, headers = _split_head(head, "tunnel request")
    parts = first.split()
    if (
        len(parts) != 3
        or parts[0].upper() != "CONNECT"
        or not parts[1].lower().startswith("pagekite:")
        or parts[2].upper() not in _HTTP_VERSIONS
    ):
        raise HandshakeError(f"not a PageKite tunnel request: {first[:80]!r}")
    request = _request_from_headers(headers)
    request.target, request.http_version = parts[1], parts[2].upper()
    return request


def parse_inband_request(headers: Headers) -> TunnelRequest:
    """Parse the headers of an in-band kite request chunk (``NOOP: 1`` + ``X-PageKite`` lines)
    as the demux hands them up."""
    return _request_from_headers(headers)


def _kite_request_lines(
    kites: Iterable[KiteLine], version: str, replace: Optional[str]
) -> list[str]:
    # pagekite.py PageKiteRequestHeaders(): version, replace, then one line per kite.
    lines = [_header_line("X-PageKite-Version", version)]
    if replace:
        lines.append(_header_line("X-PageKite-Replace", replace))
    lines.extend(_header_line("X-PageKite", kite.value) for kite in kites)
    return lines


def build_tunnel_request(
    kites: Iterable[KiteLine],
    *,
    zchunks: bool = True,
    replace: Optional[str] = None,
    version: str = PAGEKITE_VERSION,
    tls: bool = False,
    extra_features: Sequence[str] = (),
) -> bytes:
    """The backend's ``CONNECT PageKite:1 HTTP/1.0`` request, byte for byte as pagekite.py's
    ``HTTP_PageKiteRequest`` writes it (``zchunks=False`` is its ``--nozchunks``).

    ``replace`` is the relay's session id from the previous connection (``X-PageKite-Replace``).
    """
    lines = [
        "CONNECT PageKite:1 HTTP/1.0\r\n",
        "X-PageKite-Features: AddKites\r\n",
        _header_line("X-PageKite-Version", version),
    ]
    if zchunks:
        lines.append("X-PageKite-Features: ZChunks\r\n")
    if tls:
        lines.append("X-PageKite-Features: TLS\r\n")
    lines.extend(_header_line("X-PageKite-Features", f) for f in extra_features)
    lines.extend(_kite_request_lines(kites, version, replace))
    lines.append("\r\n")
    return _encode("".join(lines))


def build_inband_request(
    kites: Iterable[KiteLine], *, version: str = PAGEKITE_VERSION, replace: Optional[str] = None
) -> tuple[bytes, bytes]:
    """The in-band kite request chunk as ``(header_block, payload)`` for
    ``ChunkWriter.write_chunk``: ``NOOP: 1`` + version + one ``X-PageKite`` line per kite,
    payload ``\\r\\n!`` (pagekite.py writes ``'NOOP: 1\\r\\n%s\\r\\n\\r\\n!'``)."""
    block = "NOOP: 1\r\n" + "".join(_kite_request_lines(kites, version, replace))
    return _encode(block), b"\r\n!"


# --------------------------------------------------------------------------------------------
# The relay's decision


Outcome = Literal["signthis", "ok", "invalid", "duplicate"]


@dataclass(frozen=True)
class KiteDecision:
    """The relay's answer for one requested kite.

    ``signthis`` (with ``fsalt``, the challenge), ``ok`` (``ssl_ok``: the relay also holds a TLS
    endpoint for the domain), ``invalid`` (``reason``: ``port``, ``proto``, ``unauthorized``,
    ``signature``, ...) or ``duplicate`` (another live tunnel serves the kite).
    """

    kite: KiteLine
    outcome: Outcome
    fsalt: Optional[str] = None
    reason: Optional[str] = None
    ssl_ok: bool = False

    def headers(self) -> list[tuple[str, str]]:
        """The result headers, named with the kite's prefix, in pagekite.py's order."""
        p, what = self.kite.prefix, self.kite.what
        if self.outcome == "signthis":
            return [(f"{p}-SignThis", f"{what}:{self.fsalt}")]
        if self.outcome == "invalid":
            return [(f"{p}-Invalid", what), (f"{p}-Invalid-Why", f"{what};{self.reason}")]
        if self.outcome == "duplicate":
            return [(f"{p}-Duplicate", what)]
        out = [(f"{p}-OK", what)]
        if self.ssl_ok:
            out.append((f"{p}-SSL-OK", what))
        return out


@dataclass
class AuthReply:
    """The decisions for one request (CONNECT or in-band round) and the headers that carry
    them: per-kite results, then SessionID, Misc, Upgrade, as pagekite.py's AuthThread."""

    decisions: list[KiteDecision]
    session_id: str
    headers: list[tuple[str, str]]

    @property
    def ok(self) -> list[KiteLine]:
        return [d.kite for d in self.decisions if d.outcome == "ok"]

    @property
    def challenges(self) -> list[KiteDecision]:
        return [d for d in self.decisions if d.outcome == "signthis"]

    @property
    def refused(self) -> list[KiteDecision]:
        """Invalid and Duplicate decisions (pagekite.py's ``bad`` list)."""
        return [d for d in self.decisions if d.outcome in ("invalid", "duplicate")]

    def disposition(self, add_kites: bool) -> Literal["live", "idle", "close"]:
        """What the relay does with the tunnel after sending this reply (ProcessAuthResults):

        ``live`` if a kite is OK; else ``idle`` (wait 60 s for in-band requests) if the backend
        advertised AddKites and nothing was refused (only challenges); else ``close`` - also
        after an in-band round, even if the tunnel carries other kites.
        """
        if self.ok:
            return "live"
        if add_kites and not self.refused:
            return "idle"
        return "close"


def session_id(now: int, fe_secret: str, whats: Iterable[str]) -> str:
    """``X-PageKite-SessionID``: ``HEXTIME:sha1hex("%x:SECRET:" + WHAT + WHAT ...)``."""
    return "%x:%s" % (now, sha1hex("%x:%s:" % (now, fe_secret) + "".join(whats)))


SecretLookup = Callable[[str, str], Optional[str]]

#: How long a challenge of kite's relay may be answered (the backend answers at once: in
#: the next in-band chunk or the next CONNECT).
CHALLENGE_TTL = 60.0
#: How many unanswered challenges a relay remembers; past that the oldest are forgotten
#: (their backends get a new challenge), so a flood of requests costs bounded memory.
CHALLENGE_LIMIT = 65536


class ChallengeBook:
    """The challenges a relay issued and not yet redeemed: each answers one signature, for
    ``ttl`` seconds.  Sans-IO: the caller passes the clock."""

    __slots__ = ("ttl", "limit", "_expiry")

    def __init__(self, ttl: float = CHALLENGE_TTL, limit: int = CHALLENGE_LIMIT) -> None:
        self.ttl = ttl
        self.limit = limit
        self._expiry: dict[str, float] = {}  # token -> expiry, oldest first

    def __len__(self) -> int:
        return len(self._expiry)

    def issue(self, token: str, now: float) -> None:
        expiry = self._expiry
        for old, when in list(islice(expiry.items(), 8)):  # amortised: drop a few old ones
            if when >= now and len(expiry) < self.limit:
                break
            del expiry[old]
        expiry[token] = now + self.ttl

    def redeem(self, token: str, now: float) -> bool:
        """True once for a token issued less than ``ttl`` ago; it is forgotten either way."""
        expiry = self._expiry.pop(token, None)
        return expiry is not None and now <= expiry


class KiteAuthorizer:
    """The relay's authorisation decision for kite requests, as pagekite.py 1.5.2 makes it
    (pk.py ``AuthThread._run`` and ``GetDomainQuota``), without remote auth.

    For each kite, in order:

    1. no FSALT or no signature: ``signthis`` with a fresh challenge over ``PROTO:DOMAIN:BSALT``
       (no other check in this round);
    2. PROTO ``p-N``: N must be a number in ``ports`` (``raw``: in ``raw_ports``), after
       ``port_aliases``, unless that list holds ``"virtual"`` - else ``invalid``/``port``;
    3. the bare proto must be in ``protos`` - else ``invalid``/``proto``;
    4. unless ``check_fsalt`` is False, FSALT must be a challenge of ours for
       ``PROTO:DOMAIN:BSALT`` from this or the previous 10-minute window - else
       ``invalid``/``unauthorized`` (sic: pagekite.py reports a stale challenge that way).
       With a :class:`ChallengeBook` (kite's relay), FSALT must also be one it issued less
       than its ``ttl`` ago and not yet used: each challenge answers one signature.  A
       stale, used or unknown FSALT then gets a fresh challenge (``signthis``) instead of
       ``invalid``: only the secret's holder can answer it, so a replayed line flies nothing;
    5. the secret is looked up for the exact proto, then the bare proto, each for the domain
       and then its ``*.parent`` wildcards; none: ``invalid``/``unauthorized``;
    6. the signature must verify with that secret - else ``invalid``/``signature``;
    7. ``is_duplicate(kite)`` true: ``duplicate`` (pagekite.py also pings the old tunnel);
    8. else ``ok`` (``ssl_ok`` for ``http*`` kites when ``has_tls_endpoint(domain)``).

    pagekite.py skips step 4 on a tunnel that already completed an in-band round with an OK
    kite (its ``quota`` is set then), so a signed line captured at any time flies that kite
    again there; ``check_fsalt=False`` reproduces that for tests.  kite's relay never skips it.

    Before step 1, ``is_reserved(domain)`` true (a name of the relay itself) is
    ``invalid``/``reserved``: the relay's own names are never kites.

    ``lookup_secret(proto, domain)`` is an exact lookup (``"*.example.com"`` is asked for as
    such); an empty string means no secret.
    """

    def __init__(
        self,
        *,
        lookup_secret: SecretLookup,
        challenge_secret: str,
        protos: Collection[str] = DEFAULT_PROTOS,
        ports: Collection[Union[int, str]] = (),
        raw_ports: Collection[Union[int, str]] = (),
        port_aliases: Optional[Mapping[int, int]] = None,
        is_duplicate: Optional[Callable[[KiteLine], bool]] = None,
        is_reserved: Optional[Callable[[str], bool]] = None,
        challenges: Optional[ChallengeBook] = None,
        has_tls_endpoint: Optional[Callable[[str], bool]] = None,
        motd: str = "",
        upgrade_info: Sequence[Sequence[str]] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.lookup_secret = lookup_secret
        self.challenge_secret = challenge_secret
        self.protos = frozenset(protos)
        self.ports = frozenset(ports)
        self.raw_ports = frozenset(raw_ports)
        self.port_aliases = dict(port_aliases or {})
        self.is_duplicate = is_duplicate
        self.is_reserved = is_reserved
        self.challenges = challenges
        self.has_tls_endpoint = has_tls_endpoint
        self.motd = motd
        self.upgrade_info = [tuple(u) for u in upgrade_info]
        self.clock = clock

    def find_secret(self, proto: str, domain: str) -> Optional[str]:
        """The kite secret: exact proto then bare proto, each for the domain then wildcards."""
        protos = [proto]
        if "-" in proto:
            protos.append(proto.split("-", 1)[0])
        for p in protos:
            for candidate in _domain_candidates(domain):
                secret = self.lookup_secret(p, candidate)
                if secret:
                    return secret
        return None

    def _port_ok(self, proto: str) -> bool:
        bare, port = proto.split("-", 1)
        port_list = self.raw_ports if bare == "raw" else self.ports
        if not (port.isascii() and port.isdigit()):  # pagekite.py: int() fails -> "port"
            return False
        porti = int(port)
        porti = self.port_aliases.get(porti, porti)
        return porti in port_list or str(porti) in port_list or "virtual" in port_list

    def decide(self, kite: KiteLine, *, now: int, check_fsalt: bool = True) -> KiteDecision:
        """The decision for one kite (steps 1-8 above)."""
        if self.is_reserved is not None and self.is_reserved(kite.domain):
            return KiteDecision(kite, "invalid", reason="reserved")
        if not kite.fsalt or not kite.signature:
            return self._challenge(kite, now)
        proto = kite.proto
        if "-" in proto:
            if not self._port_ok(proto):
                return KiteDecision(kite, "invalid", reason="port")
            proto = proto.split("-", 1)[0]
        if proto not in self.protos:
            return KiteDecision(kite, "invalid", reason="proto")
        if check_fsalt:
            ours = check_challenge(self.challenge_secret, kite.what, kite.fsalt, now=now)
            if self.challenges is not None:
                ours = self.challenges.redeem(kite.fsalt, now) and ours
                if not ours:
                    return self._challenge(kite, now)
            if not ours:
                return KiteDecision(kite, "invalid", reason="unauthorized")
        secret = self.find_secret(kite.proto, kite.domain)
        if not secret:
            return KiteDecision(kite, "invalid", reason="unauthorized")
        if not check_signature(secret, kite.payload, kite.signature, now=now):
            return KiteDecision(kite, "invalid", reason="signature")
        if self.is_duplicate is not None and self.is_duplicate(kite):
            return KiteDecision(kite, "duplicate")
        ssl_ok = bool(
            kite.proto.startswith("http")
            and self.has_tls_endpoint is not None
            and self.has_tls_endpoint(kite.domain)
        )
        return KiteDecision(kite, "ok", ssl_ok=ssl_ok)

    def _challenge(self, kite: KiteLine, now: int) -> KiteDecision:
        token = make_challenge(self.challenge_secret, kite.what, now=now)
        if self.challenges is not None:
            self.challenges.issue(token, now)
        return KiteDecision(kite, "signthis", fsalt=token)

    def authorize(
        self, kites: Sequence[KiteLine], *, check_fsalt: bool = True, now: Optional[float] = None
    ) -> AuthReply:
        """Decide every kite of one request and build the result headers."""
        when = int(self.clock() if now is None else now)
        decisions = [self.decide(k, now=when, check_fsalt=check_fsalt) for k in kites]
        # The prefix of the reply's trailer headers is that of the last kite (pagekite.py
        # reuses the loop variable); X-PageKite without kites.
        prefix = kites[-1].prefix if kites else "X-PageKite"
        sid = session_id(when, self.challenge_secret, (k.what for k in kites))
        headers = [h for d in decisions for h in d.headers()]
        headers.append((f"{prefix}-SessionID", sid))
        headers.append((f"{prefix}-Misc", urlencode({"motd": self.motd})))
        headers.extend((f"{prefix}-Upgrade", ";".join(u)) for u in self.upgrade_info)
        return AuthReply(decisions, sid, headers)


def _domain_candidates(domain: str) -> list[str]:
    # pk.py GetBackendData(): the domain, then "*." + each parent with at least one label.
    out = [domain]
    parts = domain.split(".")
    while len(parts) > 1:
        parts = parts[1:]
        out.append("*." + ".".join(parts))
    return out


# --------------------------------------------------------------------------------------------
# The relay's reply (relay -> backend)


@dataclass
class RelayReply:
    """The relay's answer: the ``200 OK`` head, or an in-band reply chunk (``status`` None).

    ``invalid`` pairs each refused kite with its reason (``unknown`` when no Invalid-Why named
    it); ``headers`` keeps every header in wire order.
    """

    status: Optional[int] = None
    reason_phrase: str = ""
    http_version: str = ""
    features: list[str] = field(default_factory=list)
    protos: list[str] = field(default_factory=list)
    ports: list[str] = field(default_factory=list)
    raw_ports: list[str] = field(default_factory=list)
    sign_this: list[Challenge] = field(default_factory=list)
    ok: list[KiteRef] = field(default_factory=list)
    invalid: list[tuple[KiteRef, str]] = field(default_factory=list)
    duplicate: list[KiteRef] = field(default_factory=list)
    ssl_ok: list[KiteRef] = field(default_factory=list)
    session_id: Optional[str] = None
    misc: dict[str, str] = field(default_factory=dict)
    quota: Optional[float] = None
    q_conns: Optional[float] = None
    q_days: Optional[float] = None
    ips_per_sec: Optional[tuple[int, int]] = None
    upgrade: list[str] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def zchunks(self) -> bool:
        """The relay reads ZChunks: the backend may compress what it sends."""
        return "ZChunks" in self.features

    @property
    def add_kites(self) -> bool:
        """The relay accepts in-band kite requests (the in-band second round)."""
        return "AddKites" in self.features

    @property
    def motd(self) -> str:
        return self.misc.get("motd", "")


# A number on the wire: ASCII decimal digits, optionally a fraction (no sign, exponent,
# underscore, nan or inf, which float() would take).
_DIGITS = re.compile(r"[0-9]{1,15}")
_STATUS = re.compile(r"[1-9][0-9]{2}")  # RFC 9110 §15: three digits, 1xx to 9xx
_DECIMAL = re.compile(r"[0-9]{1,15}(?:\.[0-9]{1,15})?")


def _float(value: str, name: str) -> float:
    if not _DECIMAL.fullmatch(value):
        raise HandshakeError(f"{name} is not a number: {value[:80]!r}")
    return float(value)


def _reply_from_headers(headers: Headers) -> RelayReply:
    _check_values(headers, "relay reply")
    reply = RelayReply(headers=list(headers))
    reply.features = _list_values(_values(headers, "-Features"))
    reply.protos = _list_values(_values(headers, "-Protos"))
    reply.ports = _list_values(_values(headers, "-Ports"))
    reply.raw_ports = _list_values(_values(headers, "-Raw-Ports"))
    reply.sign_this = [Challenge.parse(v) for v in _values(headers, "-SignThis")]
    reasons = {}
    for value in _values(headers, "-Invalid-Why"):
        details = value.split(";")
        if len(details) < 2:
            raise HandshakeError(f"Invalid-Why needs 'WHAT;REASON', got {value!r}")
        reasons[details[0].strip()] = details[1].strip()
    for value in _values(headers, "-Invalid"):
        ref = KiteRef.parse(value)
        reply.invalid.append((ref, reasons.get(ref.what, "unknown")))
    reply.duplicate = [KiteRef.parse(v) for v in _values(headers, "-Duplicate")]
    reply.ssl_ok = [KiteRef.parse(v) for v in _values(headers, "-SSL-OK")]
    reply.ok = [KiteRef.parse(v) for v in _values(headers, "-OK")]
    sessions = _values(headers, "-SessionID")
    reply.session_id = sessions[-1] if sessions else None
    for misc in _values(headers, "-Misc"):
        reply.misc.update({k: v[0] for k, v in parse_qs(misc).items()})
    for name, attr in (("-Quota", "quota"), ("-QConns", "q_conns"), ("-QDays", "q_days")):
        for value in _values(headers, name):
            setattr(reply, attr, _float(value, "X-PageKite" + name))
    for value in _values(headers, "-IPsPerSec"):
        ips, _, secs = (part.strip() for part in value.partition("/"))
        if not (_DIGITS.fullmatch(ips) and _DIGITS.fullmatch(secs)):
            raise HandshakeError(f"X-PageKite-IPsPerSec needs 'IPS/SECONDS', got {value[:80]!r}")
        reply.ips_per_sec = (int(ips), int(secs))
    reply.upgrade = _values(headers, "-Upgrade")
    return reply


def parse_tunnel_response(head: Union[bytes, str]) -> RelayReply:
    """Parse the relay's reply head (up to its blank line) to a CONNECT PageKite request.

    Like pagekite.py only the version is checked (HTTP/1.0 or 1.1); the status is reported,
    not judged: a 200 with every kite refused is normal, and 403/503 carry no kite headers.
    """
    first, headers = _split_head(head, "tunnel response")
    parts = first.split(" ", 2)
    if len(parts) < 2 or parts[0].upper() not in _HTTP_VERSIONS or not _STATUS.fullmatch(parts[1]):
        raise HandshakeError(f"not an HTTP/1.x response: {first[:80]!r}")
    reply = _reply_from_headers(headers)
    reply.http_version, reply.status = parts[0].upper(), int(parts[1])
    reply.reason_phrase = parts[2] if len(parts) > 2 else ""
    return reply


def parse_inband_reply(headers: Headers) -> RelayReply:
    """Parse the headers of the relay's in-band reply chunk (``NOOP: 1`` + results)."""
    return _reply_from_headers(headers)


_RESPONSE_HEAD = (
    "HTTP/1.1 200 OK\r\n"
    "Content-Type: text/html; charset=utf-8\r\n"
    "Pragma: no-cache\r\nExpires: 0\r\nCache-Control: no-store\r\nConnection: close\r\n"
    "Transfer-Encoding: chunked\r\n"
)


def build_tunnel_response(
    results: Iterable[tuple[str, object]],
    *,
    zchunks: bool = True,
    features: Sequence[str] = ("WebSockets", "AddKites"),
    protos: Sequence[str] = DEFAULT_PROTOS,
    ports: Sequence[Union[int, str]] = (),
    raw_ports: Sequence[Union[int, str]] = (),
) -> bytes:
    """The relay's ``HTTP/1.1 200 OK`` head, byte for byte as pagekite.py's AuthCallback:
    standard headers, ``Transfer-Encoding: chunked``, ``X-PageKite-Features: ZChunks`` (if
    ``zchunks``), the other features, Protos and Ports (``", "``-joined), Raw-Ports (only if
    given), then ``results`` (``AuthReply.headers``) and the blank line."""
    out = [_RESPONSE_HEAD]
    if zchunks:
        out.append("X-PageKite-Features: ZChunks\r\n")
    out.extend(_header_line("X-PageKite-Features", f) for f in features)
    out.append(_header_line("X-PageKite-Protos", ", ".join(f"{p}" for p in protos)))
    out.append(_header_line("X-PageKite-Ports", ", ".join(f"{p}" for p in ports)))
    if raw_ports:
        out.append(_header_line("X-PageKite-Raw-Ports", ", ".join(f"{p}" for p in raw_ports)))
    out.extend(_header_line(name, value) for name, value in results)
    out.append("\r\n")
    return _encode("".join(out))


def build_inband_reply(results: Iterable[tuple[str, object]]) -> tuple[bytes, bytes]:
    """The relay's in-band reply chunk as ``(header_block, payload)`` for
    ``ChunkWriter.write_chunk``: ``NOOP: 1`` + ``results``, payload ``!`` (ChunkAuthCallback).
    Send it uncompressed."""
    block = "NOOP: 1\r\n" + "".join(_header_line(n, v) for n, v in results)
    return _encode(block), b"!"


# --------------------------------------------------------------------------------------------
# The pre-flight ping and the relay's error page


def build_unavailable(
    domain: str,
    *,
    uuid: str,
    proto: str = "http",
    where: str = "fe",
    advertise: bool = True,
    overloaded: bool = False,
    code: int = 503,
    status: str = "Unavailable",
    comment: str = "",
) -> bytes:
    """pagekite.py's "Sorry!" page (``HTTP_Unavailable``, without ``frame_url``), byte for byte.

    ``X-PageKite-UUID`` identifies the relay; ``X-PageKite-Overloaded: Sorry`` goes first when
    ``overloaded``.  ``domain`` and ``comment`` are inserted as given: pass only names that were
    validated (the sniffer's hosts are).
    """
    first = []
    if overloaded:
        first.append("X-PageKite-Overloaded: Sorry\r\n")
    first.append(_header_line("X-PageKite-UUID", uuid))
    if code == 401:
        realm = "PageKite" if advertise else "Connection"
        first.append(f"WWW-Authenticate: Basic realm={realm}\r\n")
    if advertise:
        whatis = '<a href="https://pagekite.net/"><i>PageKite</i></a>'
    else:
        whatis = "connection"
    message = (
        f"<h1>Sorry! ({where})</h1><p>The {proto.upper()} {whatis} for <b>{domain}</b>"
        f" is unavailable at the moment.</p><p>Please try again later.</p><!-- {comment} -->"
    )
    head = (
        f"HTTP/1.1 {code} {status}\r\n{''.join(first)}"
        "Content-Type: text/html; charset=utf-8\r\nPragma: no-cache\r\n"
        "Expires: 0\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    return (head + f"<html><body>{message}</body></html>\n").encode("utf-8")


def build_ping_reply(uuid: str, *, overloaded: bool = False) -> bytes:
    """The relay's answer to the ``HEAD /ping`` probe: a 503 page starting with
    ``HTTP/1.1 503 Unavailable`` and carrying ``X-PageKite-UUID`` (pagekite.py's
    FastPingHelper; write it and close the connection)."""
    return build_unavailable("ping.pagekite", uuid=uuid, advertise=False, overloaded=overloaded)


def new_relay_uuid() -> str:
    """A fresh relay identity for ``X-PageKite-UUID``: 40 hex digits (a SHA-1, like pagekite)."""
    return sha1hex(secrets.token_hex(32))
