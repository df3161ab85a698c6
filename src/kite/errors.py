"""kite's error hierarchy.

Two sides, as in h11: a *remote* error means the peer sent bytes that break the protocol
(close that connection, log the reason, keep serving the others); a *local* error means kite
itself tried something illegal (a bug, or API misuse).  Messages quote the offending value
with ``!r`` and never contain secrets.

The fast path imports this module and nothing else of kite.
"""

__all__ = [
    "KiteError",
    "ProtocolError",
    "RemoteProtocolError",
    "FramingError",
    "CompressionError",
    "HandshakeError",
    "SniffError",
    "HeadTooLong",
    "LocalProtocolError",
    "ConfigError",
    "KiteRefused",
    "TooManyStreams",
    "RelayFull",
    "ConnectFailed",
    "RelayUnreachable",
    "RelayTLSError",
    "RelayRefused",
    "KiteOffline",
    "NotAKite",
    "BadRelayReply",
    "DnsUpdateRejected",
    "StoreError",
    "SignupFailed",
    "AcmeFailed",
    "PermanentFailure",
    "InspectorError",
]


class KiteError(Exception):
    """Base class of every error kite raises on purpose."""


class ProtocolError(KiteError):
    """A rule of the PageKite wire protocol was broken (by the peer or by us)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something that breaks the protocol: close that connection."""


class FramingError(RemoteProtocolError):
    """A malformed chunk: bad size line, size out of bounds, header block without end."""


class CompressionError(RemoteProtocolError):
    """A ZChunk could not be inflated, or inflated to the wrong length (answer with ZRST)."""


class HandshakeError(RemoteProtocolError):
    """A malformed tunnel request or response (CONNECT PageKite / 200 reply / kite lines)."""


class SniffError(RemoteProtocolError):
    """A visitor's first bytes are neither HTTP, TLS, a CONNECT, nor a tunnel."""


class HeadTooLong(RemoteProtocolError):
    """An HTTP head passed its bound before its blank line."""


class LocalProtocolError(ProtocolError):
    """kite itself tried something illegal: a bug or a misuse of an API."""


class ConfigError(KiteError):
    """A bad configuration value; ``key`` names it and ``fix`` says what would be valid.

    The CLI prints ``str(err)`` as its one-line message and exits 2.
    """

    def __init__(self, key: str, problem: str, fix: str = "") -> None:
        self.key = key
        self.problem = problem
        self.fix = fix
        msg = f"{key}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


class KiteRefused(KiteError):
    """A relay refused one of our kites (``reason`` as in X-PageKite-Invalid-Why)."""

    def __init__(self, kite: str, reason: str) -> None:
        self.kite = kite
        self.reason = reason
        super().__init__(f"relay refused kite {kite!r}: {reason}")


class TooManyStreams(KiteError):
    """A tunnel carries as many streams as it may (``--max-streams``): no new stream id is
    given out, and the visitor is refused."""


class RelayFull(TooManyStreams):
    """The relay's connections left for visitors are taken (``--max-connections`` less
    ``--tunnel-reserve``): the visitor is refused, the rest are kept for tunnels."""


# -- reaching a relay (kite connect, kite forward, the dialer) ------------------------------------
class ConnectFailed(KiteError):
    """The relay could not be reached, or would not carry the CONNECT (one-line message)."""


class RelayUnreachable(ConnectFailed):
    """No TCP connection to the relay (refused, unreachable, timed out, bad name)."""


class RelayTLSError(ConnectFailed):
    """The TLS handshake with the relay failed, or its certificate did not verify."""


class RelayRefused(ConnectFailed):
    """The relay answered the CONNECT with something other than 200."""

    def __init__(self, message: str, status: int, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class KiteOffline(RelayRefused):
    """503: the name is a kite, but its backend is not connected to the relay."""


class NotAKite(RelayRefused):
    """403 (or a close without an answer): the relay does not carry this name and port."""


class BadRelayReply(ConnectFailed, RemoteProtocolError):
    """The relay's answer is not an HTTP response head (or breaks its bounds)."""


# -- the name service -------------------------------------------------------------------------
class DnsUpdateRejected(KiteError):
    """A DNS server answered an RFC 2136 update (or its TSIG) with an error: ``rcode`` as
    text (REFUSED, NOTAUTH, ...), ``reason`` what that means here."""

    def __init__(self, rcode: str, reason: str) -> None:
        self.rcode = rcode
        self.reason = reason
        super().__init__(f"{reason} (rcode {rcode})")


class StoreError(KiteError):
    """The account registry cannot do what was asked (a bad value, a taken name, a database
    that cannot be opened or written).  The CLI prints it in one line and exits 2; the
    relay logs it and keeps the last good registry."""


class SignupFailed(KiteError):
    """``kite expose --signup``: the relay refused the sign-up (its JSON error is the
    message) or could not be asked."""


# -- certificates -----------------------------------------------------------------------------
class AcmeFailed(KiteError):
    """Getting a certificate from an ACME server failed; the message is one line, names the
    step and the server's reason, and never holds a key."""
# -- kite expose ------------------------------------------------------------------------------
class PermanentFailure(KiteError):
    """A relay keeps refusing us for a reason retrying does not change (a wrong secret, a
    name it does not allow, a certificate that fails the check, an address that is not a
    relay): ``kite expose`` reports it with the fix and exits 1."""


class InspectorError(KiteError):
    """``kite expose --inspect``: a recorded request cannot be replayed (gone, cut at the
    body limit, or the local server did not answer)."""
