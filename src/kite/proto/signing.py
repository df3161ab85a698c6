"""PageKite signatures and challenge tokens, bit-exact with pagekite.py 1.5.2.

Theory of operation (docs/protocol.md §3; pagekite/proto/proto.py ``signToken`` and
``checkSignature``)::

    sign(secret, payload, salt8)  = salt8 + sha1hex(secret + payload + salt8)[:28]
    challenge(fe_secret, payload) = tok8  + sha1hex(fe_secret + payload + ts + tok8)[:28]
        where tok8 = "t" + 7 random characters and ts = "%x" % (unix_time // 600)

Both are 36 characters (``TOKEN_LENGTH``).  Everything is lower-case hex SHA-1 over plain string
concatenations.  pagekite.py handles strings as latin-1, so that is the encoding used here
(characters beyond latin-1, which pagekite.py cannot handle at all, are encoded as UTF-8).

A signature whose first character is ``t`` is verified as a *timestamped* token, for the
current and the previous 10-minute window, exactly as ``checkSignature`` does; that is why a
salt must never start with ``t`` (hex salts never do).

Pure functions: no I/O except the operating system's random source for new salts and secrets.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Optional

from ..errors import LocalProtocolError

__all__ = [
    "TOKEN_LENGTH",
    "SALT_LENGTH",
    "CHALLENGE_WINDOW",
    "sha1hex",
    "sign",
    "check_signature",
    "make_challenge",
    "check_challenge",
    "make_bsalt",
    "new_salt",
    "new_secret",
]

TOKEN_LENGTH = 36  # pagekite.py TOKEN_LENGTH: salt8 + 28 hex digits
SALT_LENGTH = 8  # the salt (or challenge token) prefix of a signature
CHALLENGE_WINDOW = 600  # seconds per challenge time window; two windows are accepted


def _encode(text: str) -> bytes:
    # pagekite.py's compat.b(): latin-1.  A character it could not encode would crash it, so
    # for those there is no compatibility to keep; UTF-8 keeps them usable between kites.
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def sha1hex(text: str) -> str:
    """Lower-case hex SHA-1 of ``text`` (pagekite.py ``sha1hex``)."""
    return hashlib.sha1(_encode(text)).hexdigest()


def _equal(a: str, b: str) -> bool:
    # Constant time for equal-length strings; compare_digest refuses non-ASCII str.
    return hmac.compare_digest(_encode(a), _encode(b))


def sign(secret: str, payload: str, salt: Optional[str] = None) -> str:
    """Sign ``payload`` with ``secret``: ``salt8 + sha1hex(secret + payload + salt8)[:28]``.

    ``salt`` defaults to :func:`new_salt`; only its first 8 characters are used (as
    ``signToken(token=...)`` does).  A salt shorter than 8 characters or starting with ``t``
    (which the verifier would take for a timestamped token) is a LocalProtocolError.
    """
    if salt is None:
        salt = new_salt()
    if len(salt) < SALT_LENGTH:
        raise LocalProtocolError(f"signature salt must have {SALT_LENGTH} characters: {salt!r}")
    if salt.startswith("t"):
        raise LocalProtocolError(f"signature salt must not start with 't': {salt!r}")
    salt8 = salt[:SALT_LENGTH]
    return salt8 + sha1hex(secret + payload + salt8)[: TOKEN_LENGTH - SALT_LENGTH]


def _timestamped(secret: str, payload: str, token8: str, when: int) -> str:
    ts = "%x" % (when // CHALLENGE_WINDOW)
    return token8 + sha1hex(secret + payload + ts + token8)[: TOKEN_LENGTH - SALT_LENGTH]


def check_signature(
    secret: str, payload: str, signature: str, *, now: Optional[float] = None
) -> bool:
    """True if ``signature`` is valid for ``payload`` under ``secret`` (constant-time compare).

    A signature starting with ``t`` is checked as a timestamped token (current and previous
    10-minute window relative to ``now``, default the clock), like pagekite's checkSignature.
    An empty signature is simply invalid (pagekite.py would raise IndexError).
    """
    if not signature:
        return False
    if signature[0] == "t":
        return check_challenge(secret, payload, signature, now=now)
    if len(signature) < SALT_LENGTH:
        return False
    salt8 = signature[:SALT_LENGTH]
    expected = salt8 + sha1hex(secret + payload + salt8)[: TOKEN_LENGTH - SALT_LENGTH]
    return _equal(signature, expected)


def make_challenge(
    fe_secret: str, payload: str, *, now: Optional[float] = None, token: Optional[str] = None
) -> str:
    """A relay's timestamped challenge (FSALT) over ``payload`` (``PROTO:DOMAIN:BSALT``).

    ``token`` supplies the random part (its characters 1..7 are used after a forced ``t``, as
    in signToken); default 7 random hex digits.  ``now`` defaults to the clock.
    """
    if token is None:
        token = "t" + secrets.token_hex(4)[:7]
    elif len(token) < SALT_LENGTH:
        raise LocalProtocolError(f"challenge token must have {SALT_LENGTH} characters: {token!r}")
    token8 = ("t" + token[1:])[:SALT_LENGTH]
    when = int(time.time() if now is None else now)
    return _timestamped(fe_secret, payload, token8, when)


def check_challenge(
    fe_secret: str, payload: str, token: str, *, now: Optional[float] = None
) -> bool:
    """True if ``token`` is a challenge this relay issued for ``payload`` within the current or
    the previous 10-minute window (so a challenge lives 10 to 20 minutes).

    Only timestamped tokens (leading ``t``) are accepted: an untimed one would never expire.
    """
    if len(token) != TOKEN_LENGTH or token[0] != "t":
        return False
    when = int(time.time() if now is None else now)
    token8 = token[:SALT_LENGTH]
    ok = False
    for window in (0, 1):  # evaluate both: no early exit that times the window
        then = when - window * CHALLENGE_WINDOW
        ok |= _equal(token, _timestamped(fe_secret, payload, token8, then))
    return ok


def make_bsalt(global_secret: str, relay_addr: str, kite_secret: str) -> str:
    """The backend's stable salt for a kite: ``sha1hex(global + "host:port" + kite_secret)[:36]``.

    Stable across the two rounds of a registration (the challenge is bound to it) and across
    reconnects to the same relay, unguessable without the global secret.
    """
    return sha1hex(global_secret + relay_addr + kite_secret)[:TOKEN_LENGTH]


def new_salt() -> str:
    """A fresh 8-hex-digit signature salt (hex never starts with ``t``)."""
    return secrets.token_hex(SALT_LENGTH // 2)


def new_secret() -> str:
    """A fresh process secret: 40 hex digits (the shape of pagekite's ``globalSecret()``)."""
    return secrets.token_hex(20)
