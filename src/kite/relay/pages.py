"""What the relay answers when it cannot route a visitor: short, clear, never a hang.

Re-exported from their homes (:mod:`kite.proto.http`, :mod:`kite.proto.sniff`) until the
relay imports them from there.
"""

from __future__ import annotations

from ..proto.http import VISITOR_CONNECT_OK as CONNECT_OK
from ..proto.http import connect_refused, http_error
from ..proto.sniff import TLS_ALERT_INTERNAL_ERROR, TLS_ALERT_UNRECOGNIZED_NAME

__all__ = [
    "CONNECT_OK",
    "TLS_ALERT_INTERNAL_ERROR",
    "TLS_ALERT_UNRECOGNIZED_NAME",
    "connect_refused",
    "http_error",
]
