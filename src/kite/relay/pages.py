"""What the relay answers when it cannot route a visitor: short, clear, never a hang."""

from __future__ import annotations

import html
import json

__all__ = [
    "http_error",
    "connect_refused",
    "CONNECT_OK",
    "TLS_ALERT_UNRECOGNIZED_NAME",
    "TLS_ALERT_INTERNAL_ERROR",
]

CONNECT_OK = b"HTTP/1.1 200 Connection Established\r\n\r\n"

# A fatal TLS alert record (RFC 8446 §6): level 2 (fatal), description 112 unrecognized_name
# for names the relay does not know, 80 internal_error for a known kite that is offline.
TLS_ALERT_UNRECOGNIZED_NAME = b"\x15\x03\x03\x00\x02\x02\x70"
TLS_ALERT_INTERNAL_ERROR = b"\x15\x03\x03\x00\x02\x02\x50"

_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    502: "Bad Gateway",
    503: "Service Unavailable",
}

_TEXT = {
    404: "There is no kite called {name} on this relay.",
    503: "The kite {name} is offline: its backend is not connected to this relay right now.",
    502: "The kite {name} is online, but its local server did not answer.",
    400: "The request could not be understood: {name}",
    403: "{name}",
}


def http_error(status: int, name: str, *, json_wanted: bool = False,
               extra_headers: bytes = b"") -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 error response, HTML or JSON."""
    reason = _REASONS.get(status, "Error")
    text = _TEXT.get(status, "{name}").format(name=name)
    if json_wanted:
        body = json.dumps({"error": status, "reason": reason, "kite": name, "message": text})
        body_b = (body + "\n").encode()
        ctype = b"application/json"
    else:
        body_b = (
            "<!DOCTYPE html><html><head><title>{s} {r}</title></head><body>"
            "<h1>{s} {r}</h1><p>{t}</p><hr><p>kite relay</p></body></html>\n"
        ).format(s=status, r=reason, t=html.escape(text)).encode()
        ctype = b"text/html; charset=utf-8"
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
        b"Cache-Control: no-store\r\nConnection: close\r\n%s\r\n"
        % (status, reason.encode(), ctype, len(body_b), extra_headers)
    ) + body_b


def connect_refused(status: int, message: str) -> bytes:
    """The answer to a CONNECT the relay will not carry (it is never an open proxy)."""
    reason = _REASONS.get(status, "Error")
    body = (message + "\n").encode()
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % (status, reason.encode(), len(body))
    ) + body
