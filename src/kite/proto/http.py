"""HTTP heads and the CONNECT conversation, sans-IO: the one home for both.

Heads: :func:`find_head_end` finds the blank line that ends an HTTP head in the bytes
received so far, bounded by :data:`MAX_HEAD`.  Everything that reads an HTTP head (the
tunnel handshake, the sniffer, the answer to a CONNECT) uses it.

CONNECT (docs/protocol.md §1.2, §8.1): a client sends :func:`build_connect_request`; the
relay answers :data:`VISITOR_CONNECT_OK` and from then on the bytes pass unframed, or refuses
with :func:`connect_refused` (403: not a kite on that port; 503: its backend is offline).
:func:`parse_connect_reply` reads such an answer.  A backend reaching a relay the pagekite.py
way (``--fe_certname``) sends ``CONNECT NAME:443`` and gets :data:`TUNNEL_CONNECT_OK` before
its TLS handshake.

The relay's refusal pages for visitors are built by :func:`http_error`.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass

from ..errors import BadRelayReply, HeadTooLong

__all__ = [
    "MAX_HEAD",
    "MAX_REFUSAL_BODY",
    "TUNNEL_CONNECT_OK",
    "VISITOR_CONNECT_OK",
    "ConnectReply",
    "authority",
    "build_connect_request",
    "connect_refused",
    "https_redirect",
    "add_response_header",
    "find_head_end",
    "has_control",
    "http_error",
    "parse_connect_reply",
    "render_template",
    "TEMPLATE_FIELDS",
]

Buffer = bytes | bytearray | memoryview

#: Bound on every HTTP head kite reads (request or response), its blank line included.
MAX_HEAD = 16384
#: Bound on the body of a CONNECT refusal that is read for its message (a kite relay sends
#: about 60 bytes).
MAX_REFUSAL_BODY = 4096

#: The relay's answer to a visitor's ``CONNECT host:port`` that it carries to a kite.
VISITOR_CONNECT_OK = b"HTTP/1.1 200 Connection Established\r\n\r\n"
#: The relay's answer to a backend's ``CONNECT NAME:443`` to one of the relay's own TLS names
#: (the TLS handshake of the tunnel follows): pagekite.py's ``HTTP_ConnectOK()``, exactly.
TUNNEL_CONNECT_OK = b"HTTP/1.0 200 Connection Established\r\n\r\n"


# --------------------------------------------------------------------------------------------
# Heads


def find_head_end(buf: Buffer, limit: int = MAX_HEAD, *, bare_lf: bool = True) -> int | None:
    """Offset just past the blank line that ends the HTTP head at the start of ``buf``, or
    None while more bytes are needed.

    With ``bare_lf`` (the default) a line may end in ``\\r\\n`` or in a bare ``\\n``, so the
    head ends at the first ``\\n\\r\\n`` or ``\\n\\n``: what pagekite.py's reader accepts, and
    what RFC 9112 §2.2 allows a recipient to accept.  Without it only ``\\r\\n\\r\\n`` ends a
    head (the relay's sniffer, towards visitors).

    A head longer than ``limit`` bytes (blank line included) raises :class:`HeadTooLong`
    as soon as ``limit`` bytes without an end have arrived.
    """
    data = bytes(buf[:limit]) if isinstance(buf, memoryview) else buf
    if bare_lf:
        ends = [i + 3 for i in (data.find(b"\n\r\n", 0, limit),) if i >= 0]
        ends += [i + 2 for i in (data.find(b"\n\n", 0, limit),) if i >= 0]
        if ends:
            return min(ends)
    else:
        i = data.find(b"\r\n\r\n", 0, limit)
        if i >= 0:
            return i + 4
    if len(buf) >= limit:
        raise HeadTooLong(f"HTTP head longer than {limit} bytes: {bytes(buf[:40])!r}...")
    return None


# A control character in a header value (C0 but HTAB, DEL, C1): never valid on the wire
# (RFC 9110 §5.5), and never echoed or logged raw by kite (docs/protocol.md §11).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def has_control(text: str) -> bool:
    """True if ``text`` holds a control character other than HTAB (C0, DEL or C1)."""
    return _CONTROL.search(text) is not None


# --------------------------------------------------------------------------------------------
# CONNECT


def authority(host: str, port: int) -> str:
    """``host:port``, with an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def build_connect_request(host: str, port: int) -> bytes:
    """``CONNECT host:port HTTP/1.1`` with its ``Host`` header (what nc/socat/proxytunnel send).

    Non-ASCII names are sent in their IDNA form; a name with spaces or control characters
    is refused here (ValueError) rather than sent: it would break the request line.
    """
    if not 0 < port < 65536:
        raise ValueError(f"port {port!r} out of range 1-65535")
    try:
        host_b = host.encode("ascii")
    except UnicodeEncodeError:
        host_b = host.encode("idna")
    if not host_b or len(host_b) > 255 or any(c <= 0x20 or c >= 0x7F for c in host_b):
        raise ValueError(f"bad host name {host!r}")
    auth = authority(host_b.decode("ascii"), port).encode("ascii")
    return b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (auth, auth)


@dataclass(frozen=True)
class ConnectReply:
    """The answer head to a CONNECT: ``status``, ``reason``, and where the head ends."""

    status: int
    reason: str
    head_length: int  # bytes of the head, blank line included: the tunnel starts after it
    content_length: int | None  # of a refusal's body (None: read to EOF, bounded)


def parse_connect_reply(buf: Buffer) -> ConnectReply | None:
    """Parse the answer to a CONNECT from the bytes received so far.

    Returns None while the head is incomplete; raises :class:`~kite.errors.BadRelayReply`
    as soon as the bytes cannot be an HTTP/1.x response or the head passes :data:`MAX_HEAD`.
    Bare-LF line ends are accepted (see :func:`find_head_end`).
    """
    prefix = bytes(buf[:5])
    if b"HTTP/"[:len(prefix)] != prefix:
        raise BadRelayReply(f"relay answered {bytes(buf[:24])!r}, not HTTP")
    try:
        end = find_head_end(buf, MAX_HEAD)
    except HeadTooLong:
        raise BadRelayReply(f"relay answer head longer than {MAX_HEAD} bytes") from None
    if end is None:
        return None
    lines = bytes(buf[:end]).replace(b"\r\n", b"\n").split(b"\n")
    parts = lines[0].split(b" ", 2)
    if (len(parts) < 2 or parts[0] not in (b"HTTP/1.0", b"HTTP/1.1")
            or len(parts[1]) != 3 or not parts[1].isdigit() or parts[1][:1] == b"0"):
        raise BadRelayReply(f"bad status line {lines[0][:80]!r}")
    status = int(parts[1])
    reason = parts[2].decode("latin-1").strip() if len(parts) > 2 else ""
    content_length = None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"content-length":
            v = value.strip()
            if not v.isdigit() or len(v) > 12:
                raise BadRelayReply(f"bad Content-Length {v[:20]!r}")
            content_length = int(v)
    return ConnectReply(status, reason, end, content_length)


# --------------------------------------------------------------------------------------------
# The relay's refusals

_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

_TEXT = {
    404: "There is no kite called {name} on this relay.",
    503: "The kite {name} is offline: its backend is not connected to this relay right now.",
    502: "The kite {name} is online, but its local server did not answer.",
    504: "The kite {name} is online, but its local server took too long to answer.",
    400: "The request could not be understood: {name}",
    403: "{name}",
}


#: The placeholders a page template (``kite relay --error-pages DIR``) may use; each is
#: replaced by its value, HTML-escaped.
TEMPLATE_FIELDS = ("{status}", "{reason}", "{kite}", "{message}")


def render_template(template: str, status: int, reason: str, name: str, message: str) -> str:
    """``template`` with :data:`TEMPLATE_FIELDS` filled in (other braces are left alone, so
    CSS and scripts need no escaping)."""
    values = {"{status}": str(status), "{reason}": reason, "{kite}": name, "{message}": message}
    out = template
    for field_, value in values.items():
        out = out.replace(field_, html.escape(value))
    return out


def http_error(status: int, name: str, *, json_wanted: bool = False,
               extra_headers: bytes = b"", template: str | None = None) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 error response, HTML or JSON; ``template``
    replaces the built-in HTML page (see :func:`render_template`)."""
    reason = _REASONS.get(status, "Error")
    text = _TEXT.get(status, "{name}").format(name=name)
    if template is not None and not json_wanted:
        body_b = render_template(template, status, reason, name, text).encode()
        ctype = b"text/html; charset=utf-8"
    elif json_wanted:
        body = json.dumps({"error": status, "reason": reason, "kite": name, "message": text})
        body_b = (body + "\n").encode()
        ctype = b"application/json"
    else:
        body_b = (
            f"<!DOCTYPE html><html><head><title>{status} {reason}</title></head><body>"
            f"<h1>{status} {reason}</h1><p>{html.escape(text)}</p>"
            "<hr><p>kite relay</p></body></html>\n"
        ).encode()
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


def https_redirect(host: str, port: int, target: str) -> bytes:
    """``308 Permanent Redirect`` to the https URL of a plain-HTTP request for ``host``
    (a kite name) received on public ``port``; ``target`` is its request target.

    The https URL keeps the port, except 80 and 443 (80 becomes https's own 443); an
    absolute-form or odd target becomes ``/``.  308 keeps the method and body (RFC 9110
    §15.4.9), so a POST is repeated over https."""
    path = target if target.startswith("/") and not has_control(target) else "/"
    netloc = host if port in (80, 443) else f"{host}:{port}"
    location = f"https://{netloc}{path}".encode("ascii", "replace")
    return (b"HTTP/1.1 308 Permanent Redirect\r\nLocation: %s\r\nContent-Length: 0\r\n"
            b"Cache-Control: no-store\r\nConnection: close\r\n\r\n" % location)


def add_response_header(data: bytes, end: int, name: bytes, value: bytes) -> bytes:
    """``data`` with ``name: value`` right after the status line of the response head
    ``data[:end]`` (what follows the head is kept as it is); ``data`` unchanged when the
    head is no HTTP/1.x response or has that field already (the server's own wins)."""
    head = data[:end]
    if not head.startswith(b"HTTP/1.") or re.search(
            rb"\n" + re.escape(name) + rb"[ \t]*:", head, re.IGNORECASE):
        return data
    cut = head.index(b"\n") + 1
    return data[:cut] + name + b": " + value + b"\r\n" + data[cut:]
