"""Which failures to reach a relay are permanent, and what to tell the user about them.

A *permanent* failure is one that retrying does not change: the relay refused every kite
for a wrong secret (``signature``), a name or protocol it does not carry (``unauthorized``,
``port``, ``proto``, ``reserved``), the relay's certificate failed the check, or the address
is not a kite relay at all (it answered the TLS hello with plain text - OpenSSL's
``WRONG_VERSION_NUMBER`` - or the tunnel request with an HTTP answer, other than 503,
without a PageKite header).  The connector makes :data:`PERMANENT_ATTEMPTS` attempts, then
``kite expose`` exits 1 with the message made here.  Everything else (refused connections, resets, timeouts,
a relay restarting, ``quota``/``nodays`` that a top-up lifts, a duplicate) is transient and
retried forever.
"""

from __future__ import annotations

import ipaddress
import ssl
from typing import Optional

from ..config import RelaySpec

__all__ = ["PERMANENT_ATTEMPTS", "PERMANENT_REASONS", "PERMANENT_RETRY", "explain_refusal",
           "explain_ssl_error", "explain_not_a_relay"]

#: Attempts a permanent failure gets (the first and the retries) before kite expose exits.
PERMANENT_ATTEMPTS = 3
#: Seconds between those attempts (doubling): 1 + 2, well within ~10 s with the dials.
PERMANENT_RETRY = 1.0

#: Refusal reasons (X-PageKite-Invalid-Why) that retrying does not change, with their fix.
PERMANENT_REASONS = {
    "signature": ("the secret is wrong (the signature did not verify)",
                  "give the secret the relay has for this kite: --secret-file FILE or "
                  "KITE_SECRET"),
    "unauthorized": ("the relay does not allow this name (no grant or account for it, or the "
                     "account is disabled)",
                     "use a name the relay serves, or have its operator add it: kite relay "
                     "--kite PROTO:NAME, or kite accounts kite EMAIL NAME"),
    "port": ("the relay takes no kite of this protocol on that port",
             "use a --public-port the relay serves"),
    "proto": ("the relay does not carry this protocol", "use http, https or tcp kites it serves"),
    "reserved": ("the name is one of the relay's own names", "use another name"),
}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def explain_refusal(relay: RelaySpec, refused: list) -> Optional[str]:
    """The report for a relay that refused every kite, or None if a reason is transient.

    ``refused`` holds ``(kite, reason)`` pairs as the relay named them.
    """
    if not refused or any(reason not in PERMANENT_REASONS for _kite, reason in refused):
        return None
    parts = []
    for kite, reason in refused:
        what, fix = PERMANENT_REASONS[reason]
        parts.append(f"kite {kite}: {what} ({fix})")
    return f"relay {relay.address} refused " + "; ".join(parts)


def explain_ssl_error(relay: RelaySpec, exc: ssl.SSLError) -> Optional[str]:
    """The report for a TLS failure that retrying does not change, or None."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = getattr(exc, "verify_message", None) or str(exc)
        if relay.fingerprint:
            fix = "check --fingerprint against the relay's certificate (kite init relay prints it)"
        else:
            fix = ("give the relay's certificate with --ca FILE, or pin it with --fingerprint "
                   "SHA256 (kite init relay prints both)")
        if _is_ip(relay.host) and not relay.server_name and not relay.fingerprint:
            fix += ("; the relay address is an IP address, so the certificate must name that "
                    "IP: give the name it carries with --server-name NAME")
        elif "mismatch" in why.lower() and not relay.fingerprint:
            fix = ("the certificate does not carry the name dialed: give the name it carries "
                   "with --server-name NAME")
        return f"relay {relay.address}: the certificate check failed: {why} ({fix})"
    if getattr(exc, "reason", None) in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST",
                                        "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"):
        return (f"relay {relay.address} did not answer in TLS: it is not a kite relay (a plain "
                f"HTTP server or another service?) (check the address and port; a relay "
                f"without TLS takes --plain)")
    return None


def explain_not_a_relay(relay: RelaySpec, status: Optional[int], phrase: str,
                        headers: list) -> Optional[str]:
    """The report for a tunnel request answered by something other than a relay (an HTTP
    answer without a single PageKite header), or None.  ``503`` is no proof: relays answer
    it bare to a request they will not take now (pagekite.py's HTTP_ConnectBad, a kite
    relay blocking an address after failed signatures)."""
    if status in (200, 503) or any(name.lower().startswith("x-pagekite") for name, _ in headers):
        return None
    answer = f"{status} {phrase}".strip() if status is not None else "no HTTP status"
    return (f"relay {relay.address} answered {answer!r} to the tunnel request: it is not a "
            f"kite relay (an HTTP server?) (check the address and port)")
