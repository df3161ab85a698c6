"""Moved to :mod:`kite.net.tls`; this name stays until its last importers switch."""

from .net.tls import (
    ClientTLS,
    cert_fingerprint,
    client_context,
    generate_self_signed,
    normalize_fingerprint,
    server_context,
)

__all__ = [
    "ClientTLS",
    "cert_fingerprint",
    "client_context",
    "generate_self_signed",
    "normalize_fingerprint",
    "server_context",
]
