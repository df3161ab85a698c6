"""The relay's certificates: several (certificate, key) pairs, chosen by SNI, reloaded from disk.

Theory of operation
-------------------
Each pair is loaded into an ``ssl.SSLContext`` of its own (TLS 1.2 and 1.3 only, ALPN
``http/1.1``, session tickets on: OpenSSL's default, left on).  The relay peeks at the
ClientHello before any TLS layer owns the socket, so it knows the SNI already and asks
:meth:`CertStore.context_for` for the context to hand the socket to: no SNI callback runs
during handshakes.

Choice by name: an exact name in a certificate's SAN first, then a wildcard ``*.zone`` one
label deep (``*.zone`` covers ``app.zone``, not ``zone`` nor ``a.b.zone``, as RFC 6125 says
browsers match).  Where two pairs claim a name, the pair given first wins.  ECDSA and RSA
keys both work; a name served with both needs two pairs (the first listed is used).

Reload: every ``poll_interval`` seconds the store compares the files' modification times
and sizes with those it loaded; a pair whose files changed is loaded again.  A pair that
fails to load (a half-written file, a key that does not match) is logged once per change
and the old pair stays in service.  :meth:`CertStore.reload` reloads every pair at once;
:meth:`CertStore.configure` (SIGHUP) also adds the pairs the config gained and drops those it
lost; :meth:`CertStore.install` adds or replaces a pair at run time (ACME).  A pair
installed ``kite_only`` (an on-demand certificate for one kite's name) is chosen by SNI like
the others but never becomes the relay's own (:attr:`CertStore.default`).

Contexts are replaced, never changed: a handshake under way keeps the context it started
with.  Session tickets of a reloaded pair stop resuming (a new context has new ticket
keys); clients just do a full handshake.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import ConfigError
from ..net.tls import prefer_ciphers

log = logging.getLogger("kite.certs")

__all__ = ["CertPair", "CertStore", "load_pair", "tls_server_context", "POLL_INTERVAL"]

#: Seconds between two looks at the certificate files.
POLL_INTERVAL = 3.0
#: What terminated visitors may speak inside TLS (the relay forwards HTTP/1.1 streams).
ALPN = ["http/1.1"]


def tls_server_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    """A server context for one pair: TLS 1.2+, ALPN http/1.1, tickets on (raises
    ``ssl.SSLError`` or ``OSError`` when the files do not load)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    prefer_ciphers(ctx)  # and the server's order (OP_CIPHER_SERVER_PREFERENCE)
    # Clients that offer no ALPN, or only protocols other than http/1.1 (a tunnel), get
    # none: CPython's selection callback answers "no acknowledgement", not a failure.
    ctx.set_alpn_protocols(ALPN)
    # An encrypted key would make OpenSSL ask for a passphrase on the terminal (a relay
    # that hangs at start or on reload): an empty one fails with an error instead.
    ctx.load_cert_chain(cert_path, key_path, password=_no_passphrase)
    return ctx


def _no_passphrase() -> bytes:
    return b""


def _file_stamp(path: str) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return (None, None)
    return (st.st_mtime_ns, st.st_size)


@dataclass(frozen=True)
class CertPair:
    """One loaded pair: its files, the names it covers, when it expires, its context."""

    cert_path: str
    key_path: str
    names: tuple  # lower-case DNS names and IP addresses of the SAN (CN without a SAN)
    not_after: float  # UNIX time the certificate expires
    context: ssl.SSLContext
    stamp: tuple  # (mtime_ns, size) of cert and key when loaded

    def covers(self, name: str) -> bool:
        name = name.lower().rstrip(".")
        if name in self.names:
            return True
        parent = name.partition(".")[2]
        return bool(parent) and f"*.{parent}" in self.names


def _cert_info(cert_path: str) -> tuple[tuple, float]:
    """The names and the expiry of the first certificate in a PEM file."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += [n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names += [str(a.value).lower() for a in
                  cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(dict.fromkeys(names)), cert.not_valid_after_utc.timestamp()


def load_pair(cert_path: str, key_path: Optional[str] = None) -> CertPair:
    """Load one pair (``key_path`` None: the key is in the certificate file); raises
    :class:`~kite.errors.ConfigError` naming the file and the problem."""
    key_path = key_path or cert_path
    stamp = _file_stamp(cert_path) + _file_stamp(key_path)
    try:
        names, not_after = _cert_info(cert_path)
        context = tls_server_context(cert_path, key_path)
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise ConfigError(
            "tls-cert", f"cannot load {cert_path!r} / {key_path!r}: {exc}",
            "give a PEM certificate (chain) and its key; `kite init relay` writes a pair",
        ) from None
    return CertPair(cert_path, key_path, names, not_after, context, stamp)


class CertStore:
    """Several pairs, chosen by SNI; the first one is the relay's own (no SNI)."""

    def __init__(self, pairs: Sequence[tuple] = (), *,
                 poll_interval: float = POLL_INTERVAL) -> None:
        """Load ``pairs`` of (cert path, key path or None); a bad one is a ConfigError.
        A store may start empty (no TLS until :meth:`install` adds a pair)."""
        self.pairs: list[CertPair] = [load_pair(c, k) for c, k in pairs]
        #: cert paths of the configured pairs, in order (the rest were installed)
        self._configured: list[str] = [p.cert_path for p in self.pairs]
        self.poll_interval = poll_interval
        self._failed: dict[str, tuple] = {}  # cert path -> stamp that failed to load
        self._exact: dict[str, CertPair] = {}
        self._wild: dict[str, CertPair] = {}  # "zone" -> the pair with "*.zone"
        self._kite_only: set[str] = set()  # cert paths of pairs that never become the default
        self._default: Optional[CertPair] = None
        self._timer: Optional[asyncio.TimerHandle] = None
        self._index()

    def _index(self) -> None:
        exact: dict[str, CertPair] = {}
        wild: dict[str, CertPair] = {}
        for pair in self.pairs:
            for name in pair.names:
                if name.startswith("*."):
                    wild.setdefault(name[2:], pair)
                else:
                    exact.setdefault(name, pair)
        self._exact, self._wild = exact, wild
        self._default = next((p for p in self.pairs if p.cert_path not in self._kite_only), None)

    # -- choosing -------------------------------------------------------------------------------
    @property
    def default(self) -> Optional[CertPair]:
        """The first pair (not installed ``kite_only``): ClientHellos without SNI, and the
        relay's own names (None: the store has no such pair)."""
        return self._default

    def pair_for(self, name: Optional[str]) -> Optional[CertPair]:
        """The pair covering ``name``: exact, then ``*.parent``; None if none does."""
        if not name:
            return None
        name = name.lower()
        pair = self._exact.get(name)
        if pair is None:
            pair = self._wild.get(name.partition(".")[2])
        return pair

    def context_for(self, name: Optional[str]) -> Optional[ssl.SSLContext]:
        pair = self.pair_for(name)
        return pair.context if pair is not None else None

    def covers(self, name: Optional[str]) -> bool:
        return self.pair_for(name) is not None

    def expiries(self) -> dict[str, float]:
        """Certificate file -> UNIX time it expires (for metrics)."""
        return {p.cert_path: p.not_after for p in self.pairs}

    # -- changing -------------------------------------------------------------------------------
    def install(self, cert_path: str, key_path: str, *, kite_only: bool = False) -> CertPair:
        """Add a pair, or replace the one loaded from ``cert_path``; raises ConfigError if it
        does not load (the old pair stays).  ``kite_only``: the pair serves the names it
        covers, never as the relay's own certificate.  Call it on the event loop's thread (from a
        worker thread: ``loop.call_soon_threadsafe``), like every method that changes the
        store; new handshakes use the pair at once, open connections keep theirs."""
        pair = load_pair(cert_path, key_path)
        if kite_only:
            self._kite_only.add(cert_path)
        self._put(pair)
        log.info("certificate %s installed: %s, expires in %.1f days", cert_path,
                 ", ".join(pair.names), (pair.not_after - time.time()) / 86400)
        return pair

    def _put(self, pair: CertPair) -> None:
        for i, old in enumerate(self.pairs):
            if old.cert_path == pair.cert_path:
                self.pairs[i] = pair
                break
        else:
            self.pairs.append(pair)
        self._failed.pop(pair.cert_path, None)
        self._index()

    def reload(self, *, changed_only: bool = False) -> int:
        """Load the pairs again (only those whose files changed, with ``changed_only``);
        a pair that fails is logged and kept as it was.  Returns how many were replaced."""
        replaced = 0
        for old in list(self.pairs):
            stamp = _file_stamp(old.cert_path) + _file_stamp(old.key_path)
            if changed_only and (stamp == old.stamp or stamp == self._failed.get(old.cert_path)):
                continue
            try:
                pair = load_pair(old.cert_path, old.key_path)
            except ConfigError as exc:
                self._failed[old.cert_path] = stamp
                log.warning("certificate %s: reload failed, still serving the old one "
                            "(expires in %.1f days): %s", old.cert_path,
                            (old.not_after - time.time()) / 86400, exc.problem)
                continue
            self._put(pair)
            replaced += 1
            log.info("certificate %s reloaded: %s", pair.cert_path, ", ".join(pair.names))
        return replaced

    def configure(self, pairs: Sequence[tuple]) -> tuple[list[str], list[str]]:
        """The configured pairs are now ``pairs`` (SIGHUP with a changed ``--tls-cert`` list
        or ``[[tls]]`` tables): pairs added load (one that fails is logged and left out),
        pairs no longer listed stop serving new handshakes, the others are read again
        (:meth:`reload`).  Pairs :meth:`install` added (ACME) stay.  The first configured
        pair is the relay's own: a different first pair needs a restart (logged; the
        running one stays first).  Returns the cert paths (added, dropped)."""
        self.reload()  # the pairs loaded already, read again
        wanted = list(pairs)
        if not wanted or not self._configured:  # TLS turned on or off: at the next restart
            return [], []
        first = self._configured[0]
        if wanted[0][0] != first:
            log.warning("certificate %s: the relay's own certificate (the first pair) changes "
                        "at the next restart; %s stays first until then", wanted[0][0], first)
            wanted = [(first, None)] + [(c, k) for c, k in wanted if c != first]
        paths = [c for c, _k in wanted]
        by_path = {p.cert_path: p for p in self.pairs}
        dropped = [c for c in self._configured if c not in paths]
        added: list[str] = []
        for cert, key in wanted:
            if cert in by_path:
                continue
            try:
                by_path[cert] = load_pair(cert, key)
            except ConfigError as exc:
                log.warning("certificate %s: not added: %s", cert, exc.problem)
                continue
            added.append(cert)
            log.info("certificate %s added: %s", cert, ", ".join(by_path[cert].names))
        for cert in dropped:
            log.info("certificate %s dropped: no longer in the config", cert)
        self._configured = [c for c in paths if c in by_path]
        installed = [p for p in self.pairs if p.cert_path not in self._configured
                     and p.cert_path not in dropped]
        self.pairs = [by_path[c] for c in self._configured] + installed
        for cert in dropped:
            self._failed.pop(cert, None)
        self._index()
        return added, dropped

    # -- watching the files ---------------------------------------------------------------------
    def start(self) -> None:
        """Look at the files every ``poll_interval`` seconds (on the running loop)."""
        if self._timer is None and self.poll_interval > 0:
            self._timer = asyncio.get_running_loop().call_later(self.poll_interval, self._poll)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.reload(changed_only=True)
        except Exception:  # a bug here must not stop the watching, nor the relay
            log.exception("certificate reload failed")
        self._timer = loop.call_later(self.poll_interval, self._poll)
