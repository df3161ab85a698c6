# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""The X-Forwarded-* rewriter's common case in C: one whole request head without a body.

``kite.proto.forwarded.ForwardedRewriter`` is the executable specification; read its
module docstring for what is added, what is renamed and why.  Its ``feed`` hands over
bytes that are exactly one complete request head (they end with their only CRLFCRLF, as
a GET on a keep-alive connection arrives) to :func:`rewrite_one_head`, which does the
same work in one call: one pass over the field lines finds Host, Content-Length,
Transfer-Encoding, Upgrade and the forwarding fields a visitor must not set and writes
the rewritten head into one new ``bytes``; then llhttp validates the head (the same
strict ``httptools.HttpRequestParser``, reused from message to message), and only a head
it accepts gets that result.  The pass reads within the bytes whatever they hold, so it
may run first; that way a head that is not the plain case costs no llhttp parse here.

Only the plain case is done here: llhttp accepted the head and ended the message with it
(no body), HTTP/1.0 or 1.1, no Upgrade field, no CONNECT, at most one Host, no
Transfer-Encoding.  For anything else - and for every error - the answer is ``None``,
with nothing of the caller's state touched, and the caller runs its own path from the
start, which decides, words the error and handles bodies, upgrades and chunked framing.
So this module adds speed and no behaviour; tests/test_fastpath_forwarded.py holds both
paths to the same output for the same input.

One thread: the parsers kept for the next head are in a module-level list (kite runs one
event loop; list operations under the GIL are atomic, so other threads would be safe too).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memchr, memcmp, memcpy

import httptools

__all__ = ["rewrite_one_head", "IDLE_MAX", "MAX_RENAMES"]

cdef enum:
    _IDLE_MAX = 64       # parsers kept for the next head (as the specification keeps)
    _MAX_RENAMES = 32    # forwarding fields renamed in one head here; more: the slow path

IDLE_MAX = _IDLE_MAX
MAX_RENAMES = _MAX_RENAMES

cdef bytes _UNTRUSTED_PREFIX = b"X-Old-"
cdef bytes _XFH = b"X-Forwarded-Host: "
cdef object _ParserError = httptools.HttpParserError
cdef object _ParserUpgrade = httptools.HttpParserUpgrade


cdef class _Events:
    """llhttp's callbacks for one message: the flags the rewriter needs, read as the
    specification's ``_MessageEvents`` reads them (keep-alive and upgrade are set just
    before ``on_headers_complete`` and reset once the message is complete)."""

    cdef object parser
    cdef int begun
    cdef bint headers_complete
    cdef bint message_complete
    cdef bint keep_alive
    cdef bint upgrade

    def on_message_begin(self):
        self.begun += 1

    def on_headers_complete(self):
        p = self.parser
        self.headers_complete = True
        self.keep_alive = p.should_keep_alive()
        self.upgrade = p.should_upgrade()  # CONNECT as well as Upgrade

    def on_message_complete(self):
        self.message_complete = True


cdef list _idle = []


cdef inline unsigned char _lower(unsigned char c) noexcept:
    if b'A' <= c <= b'Z':
        return c + 32
    return c


cdef bint _is(const char* p, Py_ssize_t n, const char* word, bint dash_or_underscore) noexcept:
    """``p[:n]`` equals the lower-case ``word`` of length ``n``, ignoring case; with
    ``dash_or_underscore`` a ``-`` in ``word`` also matches ``_`` (CGI servers map both
    to ``_``)."""
    cdef Py_ssize_t i
    cdef unsigned char c, w
    for i in range(n):
        c = _lower(<unsigned char>p[i])
        w = <unsigned char>word[i]
        if c != w and not (dash_or_underscore and w == b'-' and c == b'_'):
            return False
    return True


cdef bint _untrusted(const char* p, Py_ssize_t n) noexcept:
    """A forwarding field name a visitor must not set (the specification's
    ``_UNTRUSTED_FIELD``): X-Forwarded-<anything>, Forwarded, X-Real-IP and
    X-PageKite-For/-Proto/-Port, in any case, ``_`` for ``-``.  llhttp has checked that
    the name is a token."""
    if n > 12 and _is(p, 12, b"x-forwarded-", True):
        return True
    if n == 9:
        return _is(p, 9, b"forwarded", True) or _is(p, 9, b"x-real-ip", True)
    if n == 14:
        return _is(p, 14, b"x-pagekite-for", True)
    if n == 15:
        return _is(p, 15, b"x-pagekite-port", True)
    if n == 16:
        return _is(p, 16, b"x-pagekite-proto", True)
    return False


cdef object _rewrite(bytes head, bytes fixed, bint copy_host):
    """The rewritten head, or None where the specification must decide."""
    cdef const char* p = PyBytes_AS_STRING(head)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(head)
    cdef const char* hit
    cdef Py_ssize_t line_end, pos, end, colon, vstart, vend, k
    cdef Py_ssize_t host_start = 0, host_end = 0
    cdef int hosts = 0
    cdef int renames = 0
    cdef Py_ssize_t rename_at[_MAX_RENAMES]
    cdef unsigned char version

    # The request line: once llhttp accepts it, it ends "<proto>/<digit>.<digit>" CRLF.
    if n >= 8 and memcmp(p, b"CONNECT ", 8) == 0:
        return None  # a tunnel: the specification makes the stream opaque
    hit = <const char*>memchr(p, b'\n', n)
    if hit == NULL:
        return None
    line_end = hit - p + 1
    if line_end < 10 or p[line_end - 2] != b'\r' or memcmp(p + line_end - 10, b"HTTP/1.", 7):
        return None
    version = <unsigned char>p[line_end - 3]
    if version != b'1' and version != b'0':
        return None  # RTSP/1.0, ICE/1.0, HTTP/1.2...: the specification refuses them

    # Field lines up to the blank line: each "name:value" CRLF (llhttp allows nothing else;
    # a line that is not is left to the specification).
    pos = line_end
    while pos < n and p[pos] != b'\r':
        hit = <const char*>memchr(p + pos, b'\n', n - pos)
        if hit == NULL:
            return None
        end = hit - p  # the LF; the CR is before it
        hit = <const char*>memchr(p + pos, b':', end - pos)
        if hit == NULL or p[end - 1] != b'\r':
            return None
        colon = hit - p
        k = colon - pos  # the name's length
        if k == 4 and _is(p + pos, 4, b"host", False):
            hosts += 1
            vstart = colon + 1
            vend = end - 1
            while vstart < vend and (p[vstart] == b' ' or p[vstart] == b'\t'):
                vstart += 1
            while vend > vstart and (p[vend - 1] == b' ' or p[vend - 1] == b'\t'):
                vend -= 1
            host_start = vstart
            host_end = vend
        elif k == 14 and _is(p + pos, 14, b"content-length", False):
            for vstart in range(colon + 1, end - 1):
                if b'1' <= p[vstart] <= b'9':
                    return None  # a body: the specification slices it
        elif k == 17 and _is(p + pos, 17, b"transfer-encoding", False):
            return None  # a chunked body
        elif k == 7 and _is(p + pos, 7, b"upgrade", False):
            return None  # perhaps a protocol switch: the specification decides
        elif _untrusted(p + pos, k):
            if renames == _MAX_RENAMES:
                return None
            rename_at[renames] = pos
            renames += 1
        pos = end + 1
    if hosts > 1:
        return None  # the specification refuses it with its own words

    # head[:line_end] + fixed [+ X-Forwarded-Host] + the field lines, renames inserted.
    cdef Py_ssize_t nfixed = PyBytes_GET_SIZE(fixed)
    cdef Py_ssize_t nprefix = PyBytes_GET_SIZE(_UNTRUSTED_PREFIX)
    cdef Py_ssize_t nxfh = PyBytes_GET_SIZE(_XFH)
    cdef bint add_host = copy_host and hosts == 1
    cdef Py_ssize_t size = n + nfixed + renames * nprefix
    if add_host:
        size += nxfh + (host_end - host_start) + 2
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* q = PyBytes_AS_STRING(out)
    memcpy(q, p, line_end)
    q += line_end
    memcpy(q, PyBytes_AS_STRING(fixed), nfixed)
    q += nfixed
    if add_host:
        memcpy(q, PyBytes_AS_STRING(_XFH), nxfh)
        q += nxfh
        memcpy(q, p + host_start, host_end - host_start)
        q += host_end - host_start
        q[0] = b'\r'
        q[1] = b'\n'
        q += 2
    pos = line_end
    for k in range(renames):
        memcpy(q, p + pos, rename_at[k] - pos)
        q += rename_at[k] - pos
        memcpy(q, PyBytes_AS_STRING(_UNTRUSTED_PREFIX), nprefix)
        q += nprefix
        pos = rename_at[k]
    memcpy(q, p + pos, n - pos)
    return out


def rewrite_one_head(bytes head not None, bytes fixed not None, bint copy_host):
    """Rewrite ``head``, exactly one complete request head: ``(rewritten, keep_alive)``,
    or ``None`` when the head is not the plain case (see the module docstring) or is not
    valid, in which case nothing changed and the caller's own path decides.

    ``fixed`` is the rewriter's ``X-Forwarded-For``/``-Proto`` [``-Host``] lines, put
    right after the request line; ``copy_host`` adds ``X-Forwarded-Host`` with the
    request's own Host value (when it has one).
    """
    out = _rewrite(head, fixed, copy_host)
    if out is None:
        return None
    cdef _Events ev
    if _idle:
        ev = <_Events>_idle.pop()
        ev.begun = 0
        ev.headers_complete = ev.message_complete = ev.keep_alive = ev.upgrade = False
    else:
        ev = _Events()
        ev.parser = httptools.HttpRequestParser(ev)
    try:
        ev.parser.feed_data(head)
    except (_ParserError, _ParserUpgrade):
        ev.parser = None  # breaks the parser <-> callbacks cycle
        return None
    if ev.begun != 1 or not ev.headers_complete or not ev.message_complete or ev.upgrade:
        ev.parser = None
        return None
    if ev.keep_alive and len(_idle) < _IDLE_MAX:
        _idle.append(ev)  # llhttp waits for the next message: any stream's next head
    else:
        ev.parser = None
    return out, ev.keep_alive
