"""The fast path in pure Python: the executable specification of ``kite._fastpath``.

``kite/_fastpath.pyi`` is the API of record; this module implements it in plain Python and
the Cython module ``kite._fastpath`` implements the same behaviour in C, with the same
exceptions, the same messages and the same buffer sizes (the differential tests feed both
the same bytes and compare every event).  Change this file first, then the ``.pyx``.

The cold parts (constants, argument checks, error messages, reprs, the size-line slow
path, header-block parsing, ZChunk inflating, dispatching a chunk that is not a plain data
chunk) exist only here: the compiled module imports them.  The hot parts (the per-chunk
loop, buffer management, the writer) are implemented twice, once in each module.

Theory of operation
===================

Demux: one receive buffer per tunnel, ``_buf[_start:_end]`` holding bytes received but not
yet parsed.  ``get_buffer`` lends ``_buf[_end:]`` (asyncio's BufferedProtocol: the kernel or
the TLS layer writes straight into it); ``buffer_updated(n)`` ends the loan, moves ``_end``
and parses.  Parsing consumes whole chunks only:

1. find CRLF within the first ``_SIZE_LINE_WINDOW`` (20) bytes; no CRLF there and 20 bytes
   buffered is a FramingError, fewer than 20 means "wait".  Errors are decided on complete
   lines (or on a full window), never on a prefix, so the message does not depend on how
   the stream was cut into reads;
2. validate the size line (grammar, at most 8 hex digits per number, not 0, not above
   ``max_chunk_size``; a ``Z`` line needs an inflater);
3. wait until the whole body is buffered (the buffer grows to fit it; lengths are bounded
   by step 2 before anything is allocated);
4. for a plain chunk, find the first CRLF CRLF in the body and parse the header block
   (FramingError before the chunk is consumed);
5. consume the chunk (``_start`` and ``chunks_received`` move *before* any callback, so an
   exception from a callback leaves the rest buffered), call ``inflater.reset()`` for an
   ``R`` chunk, inflate a ``Z`` chunk (then step 4 on the inflated body), and dispatch.

The hot case, ``SID: <digits>\\r\\n\\r\\n`` exactly, is recognised by a prefix test and a
digit check, without splitting header lines.

Buffer sizes are part of the specified behaviour (both implementations lend views of the
same length): the buffer starts at ``_INITIAL_CAP``, grows to ``max(_INITIAL_CAP, 2 * cap,
live + n)`` when compacting is not enough, and an empty buffer larger than
``_SHRINK_ABOVE`` is dropped for a fresh small one (a peer that sent one huge chunk does
not pin a huge buffer for the life of the tunnel).  A buffer is never resized in place:
growing makes a new one, so a view a callback kept (against the rules) keeps the old
memory alive instead of pointing into freed memory.  Nor is it compacted while a slice of
a payload view lives (a sink may hand ``view[k:]`` to a transport instead of copying it):
the partial chunk then moves to a new buffer of the same size.

Views lent or handed to sinks are released when the loan or call ends.  A release fails
with BufferError while someone holds a buffer export of the view: uvloop keeps one on the
``get_buffer`` view until ``buffer_updated`` returns.  Such a view is remembered and
released at the next call into the object (one retry).

ChunkWriter: appends framed chunks to one pending buffer; ``flush`` returns it as ``bytes``
(immutable, owned by the caller) and starts again.
"""

import operator
import re
import sys

from .errors import CompressionError, FramingError, LocalProtocolError

# The constants below are the only definitions: the compiled module imports them, except
# MAX_SIZE_DIGITS, _SIZE_LINE_WINDOW, _MAX_SID and _MAX_SID_DIGITS, which its per-chunk
# loop needs at C compile time: _fastpath.pxd repeats them as a ``cdef enum``, and
# tests/test_fastpath_constants.py fails if the two differ.

__all__ = [
    "MAX_SIZE_DIGITS",
    "MAX_CHUNK_SIZE",
    "MAX_DATA_PAYLOAD",
    "StreamSlot",
    "Demux",
    "ChunkWriter",
]

MAX_SIZE_DIGITS = 8  # hex digits per number in a size line (h11-style grammar bound)
MAX_CHUNK_SIZE = 1 << 20  # default bound on a chunk body: plain size, ULEN and CLEN
MAX_DATA_PAYLOAD = 65536 - 32  # default largest payload of one data chunk we write

_MAX_SIZE_LINE = 2 * MAX_SIZE_DIGITS + 2  # "ULENZCLENR": 18 characters before CRLF
_SIZE_LINE_WINDOW = _MAX_SIZE_LINE + 2  # CRLF must start within this many bytes
_MAX_CHUNK_SIZE_LIMIT = 1 << 24  # upper bound of the max_chunk_size argument
_MAX_PAYLOAD_LIMIT = 1 << 20  # upper bound of the max_payload argument
_MAX_SID = (1 << 31) - 1  # stream ids are 0..2**31-1
_MAX_SID_DIGITS = 10  # len(str(_MAX_SID))

_INITIAL_CAP = 1 << 16  # first receive buffer
_SHRINK_ABOVE = 1 << 18  # an empty buffer larger than this is replaced by a small one
_MIN_LOAN = 1 << 14  # get_buffer(sizehint <= 0) lends at least this much
_MAX_LOAN = 1 << 18  # a larger sizehint is clamped to this

_SIZE_LINE_RE = re.compile(rb"([0-9A-Fa-f]+)(?:Z([0-9A-Fa-f]+))?(R?)")
_ABBREV = 64  # bytes quoted in an error message about a body or a header line

_index = operator.index


def _bytes_view(data):
    """A 1-D unsigned-byte memoryview of ``data``, with the C module's TypeError message."""
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"a bytes-like object is required, not {type(data).__name__!r}") from None
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _release(view):
    """Release ``view``; False if a buffer export of it is still held (BufferError)."""
    try:
        view.release()
    except BufferError:
        return False
    return True


# -- cold parts shared with the compiled module ---------------------------------------------
#
# The functions from here to ``class StreamSlot`` are the compiled module's too (it imports
# them, and has no copy): argument checks, error messages, reprs, the size-line slow path,
# header-block parsing, ZChunk inflating, dispatching a chunk that is not a plain
# ``SID: n`` data chunk.  Only cold paths call them (setup, errors, control chunks,
# ZChunks); the per-chunk loops of the two implementations do not.


def _abbrev(data):
    """``repr`` of (the start of) a bytes object, for error messages."""
    if len(data) <= _ABBREV:
        return repr(data)
    return f"{data[:_ABBREV]!r}... ({len(data)} bytes)"


def _sid_arg(sid):
    """``sid`` as an int; ValueError unless 0 <= sid <= 2**31-1."""
    sid = _index(sid)
    if not 0 <= sid <= _MAX_SID:
        raise ValueError(f"sid {sid!r} out of range 0..{_MAX_SID}")
    return sid


def _max_chunk_size_arg(max_chunk_size):
    """``max_chunk_size`` as an int; ValueError unless 1..``_MAX_CHUNK_SIZE_LIMIT``."""
    max_chunk_size = _index(max_chunk_size)
    if not 1 <= max_chunk_size <= _MAX_CHUNK_SIZE_LIMIT:
        raise ValueError(
            f"max_chunk_size must be 1..{_MAX_CHUNK_SIZE_LIMIT}, got {max_chunk_size!r}"
        )
    return max_chunk_size


def _max_payload_arg(max_payload):
    """``max_payload`` as an int; ValueError unless 1..``_MAX_PAYLOAD_LIMIT``."""
    max_payload = _index(max_payload)
    if not 1 <= max_payload <= _MAX_PAYLOAD_LIMIT:
        raise ValueError(f"max_payload must be 1..{_MAX_PAYLOAD_LIMIT}, got {max_payload!r}")
    return max_payload


def _slot_type_error(slot):
    return TypeError(f"slot must be a StreamSlot, not {type(slot).__name__}")


def _reentry_error(method):
    return LocalProtocolError(f"Demux.{method}() called from inside a Demux callback")


def _no_loan_error(method, lender):
    return LocalProtocolError(f"{method}() without a {lender}() loan")


def _outside_loan_error(method, nbytes, lent):
    return LocalProtocolError(f"{method}({nbytes!r}): outside the lent 0..{lent} bytes")


def _loan_out_error(method):
    return LocalProtocolError(f"ChunkWriter.{method}() while a get_data_buffer() loan is out")


def _no_inflater_error(line):
    return FramingError(f"compressed chunk but no inflater: {line!r}")


def _slot_repr(slot):
    return f"<StreamSlot sid={slot.sid} received={slot.received} sent={slot.sent}>"


def _demux_repr(demux, failed):
    return (
        f"<Demux {'failed' if failed else 'ok'} chunks_received={demux.chunks_received} "
        f"bytes_received={demux.bytes_received} buffered={demux.buffered}>"
    )


def _writer_repr(writer):
    return (
        f"<ChunkWriter pending={writer.pending} chunks_written={writer.chunks_written} "
        f"bytes_written={writer.bytes_written}>"
    )


def _read_size_line(window, max_chunk_size):
    """Steps 1 and 2 on ``window``, the first ``_SIZE_LINE_WINDOW`` bytes of the unparsed
    input (fewer if fewer are buffered).

    ``None`` while more bytes are needed, else ``(body_len, ulen, reset, nl)``: ``nl`` is
    the offset of the CRLF, ``body_len`` the number of bytes that follow it (CLEN for a
    ZChunk), ``ulen`` -1 for a plain chunk.  FramingError if a full window holds no CRLF,
    or the line breaks the grammar or the bounds.
    """
    nl = window.find(b"\r\n")
    if nl < 0:
        if len(window) >= _SIZE_LINE_WINDOW:
            raise FramingError(
                f"chunk size line too long (no CRLF within {_MAX_SIZE_LINE} bytes): {window!r}"
            )
        return None
    m = _SIZE_LINE_RE.fullmatch(window, 0, nl)
    if m is None:
        raise FramingError(f"invalid chunk size line: {window[:nl]!r}")
    first, second, reset = m.groups()
    if len(first) > MAX_SIZE_DIGITS or (second is not None and len(second) > MAX_SIZE_DIGITS):
        raise FramingError(f"too many hex digits in chunk size line: {window[:nl]!r}")
    a = int(first, 16)
    b = -1 if second is None else int(second, 16)
    if a == 0 or b == 0:
        raise FramingError(f"chunk size 0 in size line: {window[:nl]!r}")
    if a > max_chunk_size or b > max_chunk_size:
        raise FramingError(f"chunk size over max_chunk_size={max_chunk_size}: {window[:nl]!r}")
    if b < 0:
        return a, -1, bool(reset), nl
    return b, a, bool(reset), nl


def _is_sid(value):
    """True if the str ``value`` is a stream id: 1..10 ASCII digits, at most 2**31-1."""
    return (
        0 < len(value) <= _MAX_SID_DIGITS
        and value.isascii()
        and value.isdigit()
        and int(value) <= _MAX_SID
    )


def _analyse_body(body):
    """Split a whole chunk body (bytes): ``(sid, headers, payload_offset)``.

    The header block is everything before the first CRLF CRLF; ``headers`` is
    ``[(name, value), ...]`` of its lines, split at CRLF: the name is everything before the
    first ``:`` (as sent), the value everything after it with spaces and tabs stripped,
    both latin-1 decoded.  ``sid`` is the stream id of a data chunk (exactly one header,
    named ``sid`` in any case, with a decimal value), else -1.  FramingError if there is
    no CRLF CRLF or a header line has no ``:``.
    """
    sep = body.find(b"\r\n\r\n")
    if sep < 0:
        raise FramingError(f"chunk body without CRLF CRLF: {_abbrev(body)}")
    headers = []
    # latin-1 maps bytes to code points one to one: splitting and stripping the decoded
    # block is splitting and stripping the bytes.
    for line in body[:sep].decode("latin-1").split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon:
            raise FramingError(
                f"chunk header line without ':': {_abbrev(line.encode('latin-1'))}"
            )
        headers.append((name, value.strip(" \t")))
    sid = -1
    if len(headers) == 1:
        name, value = headers[0]
        if name.lower() == "sid" and _is_sid(value):
            sid = int(value)
    return sid, headers, sep + 4


def _inflate_chunk(inflater, reset, data, ulen, on_corrupt_chunk):
    """The body of a consumed ZChunk (``data``: its CLEN bytes), inflated to ``ulen`` bytes.

    ``inflater.reset()`` first if the size line had ``R``.  When ``inflate`` raises
    CompressionError or returns other than ``ulen`` bytes, the chunk is dropped: None after
    ``on_corrupt_chunk(exc)``, or the CompressionError propagates if there is none.
    """
    if reset:
        inflater.reset()
    try:
        inflated = inflater.inflate(data, ulen)
        if type(inflated) is not bytes:
            inflated = bytes(inflated)
        if len(inflated) != ulen:
            raise CompressionError(
                f"inflated chunk has {len(inflated)} bytes, its size line said {ulen}"
            )
    except CompressionError as exc:
        if on_corrupt_chunk is None:
            raise
        on_corrupt_chunk(exc)
        return None
    return inflated


def _dispatch(slots, on_chunk, sid, headers, body, offset):
    """Hand a consumed chunk (``body`` is bytes, ``sid`` -1 unless a data chunk) to the
    sink of ``slots[sid]``, else to ``on_chunk(headers, payload)``."""
    if sid >= 0:
        slot = slots.get(sid)
        if slot is not None:
            sink = slot.sink
            if sink is not None:
                view = memoryview(body)[offset:]
                try:
                    sink(view)
                finally:
                    slot.received += len(body) - offset
                    _release(view)
                return
    on_chunk(headers, body[offset:])


def _check_header_block(block):
    """LocalProtocolError unless ``block`` (bytes) may be framed by ``write_chunk``: not
    empty, ending in CRLF, without a blank line."""
    if not block:
        raise LocalProtocolError("ChunkWriter.write_chunk(): empty header block")
    if not block.endswith(b"\r\n"):
        raise LocalProtocolError(
            f"ChunkWriter.write_chunk(): header block does not end in CRLF: {_abbrev(block)}"
        )
    if block.startswith(b"\r\n") or b"\r\n\r\n" in block:
        raise LocalProtocolError(
            f"ChunkWriter.write_chunk(): blank line in header block: {_abbrev(block)}"
        )


# -- the fast path ---------------------------------------------------------------------------


class StreamSlot:
    """One stream's record in the fast path: its sink and its byte counters."""

    __slots__ = ("_sid", "sink", "received", "sent")

    def __init__(self, sid, sink=None):
        self._sid = _sid_arg(sid)
        self.sink = sink
        self.received = 0
        self.sent = 0

    @property
    def sid(self):
        return self._sid

    def __repr__(self):
        return _slot_repr(self)


def _check_slot(slot):
    if not isinstance(slot, StreamSlot):
        raise _slot_type_error(slot)


class Demux:
    """Splits the chunk stream of one tunnel into sink calls and ``on_chunk`` events."""

    __slots__ = (
        "on_chunk",
        "on_corrupt_chunk",
        "inflater",
        "_chunks_received",
        "_bytes_received",
        "_max_chunk_size",
        "_buf",  # bytearray; never resized in place (see the module docstring)
        "_mv",  # writable memoryview of _buf: loans are slices of it
        "_cap",  # len(_buf)
        "_start",  # parse position: _buf[_start:_end] is received but not parsed
        "_end",  # fill position: _buf[_end:] is free
        "_loan",  # the view lent by get_buffer, until buffer_updated; else None
        "_stale",  # a view whose release failed (BufferError), retried once
        "_slots",  # sid -> StreamSlot
        "_error",  # the FramingError that failed the demux, else None
        "_retired",  # buffers replaced while a view held them; pruned when none does
        "_spare",  # one retired buffer no view holds any more, for reuse; else None
        "_parsing",  # True while callbacks run: re-entering the demux is refused
    )

    def __init__(self, on_chunk, *, on_corrupt_chunk=None, inflater=None,
                 max_chunk_size=MAX_CHUNK_SIZE):
        max_chunk_size = _max_chunk_size_arg(max_chunk_size)
        self.on_chunk = on_chunk
        self.on_corrupt_chunk = on_corrupt_chunk
        self.inflater = inflater
        self._chunks_received = 0
        self._bytes_received = 0
        self._max_chunk_size = max_chunk_size
        self._buf = bytearray()
        self._mv = memoryview(self._buf)
        self._cap = self._start = self._end = 0
        self._loan = self._stale = self._error = None
        self._slots = {}
        self._retired = []  # buffers replaced while a view held them (see _reserve)
        self._spare = None  # one such buffer no view holds any more, for reuse
        self._parsing = False

    @property
    def chunks_received(self):
        return self._chunks_received

    @property
    def bytes_received(self):
        return self._bytes_received

    @property
    def buffered(self):
        return self._end - self._start

    @property
    def capacity(self):
        return self._cap

    def _shared(self):
        """True while a view of the buffer is alive: a payload view, a slice of one, a loan.

        Every payload view and loan is made by its own ``memoryview(buf)``, which holds a
        reference to the bytearray; the baseline is ``self._buf``, ``self._mv`` and the
        argument of ``sys.getrefcount``.
        """
        return sys.getrefcount(self._buf) > 3

    def __repr__(self):
        return _demux_repr(self, self._error is not None)

    # -- streams -----------------------------------------------------------------------

    def attach(self, slot):
        _check_slot(slot)
        self._slots[slot._sid] = slot

    def detach(self, sid):
        return self._slots.pop(sid, None)

    def get_slot(self, sid):
        return self._slots.get(sid)

    # -- input -------------------------------------------------------------------------

    def get_buffer(self, sizehint):
        if self._parsing:
            raise _reentry_error("get_buffer")
        sizehint = _index(sizehint)
        self._end_loan()
        want = sizehint if sizehint > 0 else _MIN_LOAN
        if want > _MAX_LOAN:
            want = _MAX_LOAN
        self._reserve(want)
        # A view of its own, like payload views, so that _shared() counts a stale loan.
        loan = self._loan = memoryview(self._buf)[self._end :]
        return loan

    def buffer_updated(self, nbytes):
        if self._parsing:
            raise _reentry_error("buffer_updated")
        nbytes = _index(nbytes)
        loan = self._loan
        if loan is None:
            raise _no_loan_error("Demux.buffer_updated", "get_buffer")
        lent = len(loan)
        self._end_loan()
        if not 0 <= nbytes <= lent:
            raise _outside_loan_error("Demux.buffer_updated", nbytes, lent)
        if self._error is not None:
            raise self._error.with_traceback(None)
        self._end += nbytes
        self._bytes_received += nbytes
        self._parse()

    def feed_data(self, data):
        if self._parsing:
            raise _reentry_error("feed_data")
        view = _bytes_view(data)
        self._end_loan()
        if self._error is not None:
            raise self._error.with_traceback(None)
        n = len(view)
        self._reserve(n)
        end = self._end
        self._mv[end : end + n] = view
        self._end = end + n
        self._bytes_received += n
        self._parse()

    # -- buffer management -------------------------------------------------------------

    def _retry_stale(self):
        stale = self._stale
        if stale is not None:
            self._stale = None
            _release(stale)

    def _end_loan(self):
        """End the loan (if any) and release its view; retry an earlier failed release."""
        self._retry_stale()
        loan = self._loan
        if loan is not None:
            self._loan = None
            if not _release(loan):
                self._stale = loan

    def _reserve(self, n):
        """Make ``_cap - _end >= n`` (no loan is out, no callback is running)."""
        start, end, cap = self._start, self._end, self._cap
        live = end - start
        if live == 0 and self._retired:
            self._prune()  # free the retired buffers whose slices have gone since
        if live == 0 and start and not self._shared():
            # All parsed: the next bytes go to the front again - unless a view still covers
            # it (a payload slice a transport queued).
            self._start = self._end = start = end = 0
        if live == 0 and cap > _SHRINK_ABOVE:
            newcap = max(_INITIAL_CAP, n)  # drop the large buffer for a small one, and the
            self._spare = None  # spare of its size
        elif cap - end >= n:
            return
        elif live + n <= cap:
            if not self._shared():
                # Compact: move the partial chunk to the front.
                self._buf[0:live] = self._buf[start:end]
                self._start, self._end = 0, live
                return
            # A slice of a payload view is still alive (a transport queued it): its bytes
            # must not be overwritten, so the partial chunk moves to a new buffer of the
            # same size and the old one goes with its last view.
            newcap = cap
        else:
            newcap = max(_INITIAL_CAP, 2 * cap, live + n)
        held = self._shared()
        if held:
            # A view holds the buffer (a payload slice a transport queued, or a stale
            # loan): it is retired, and freed (or reused) once the last view has gone.
            self._prune()
        spare = self._spare
        if held and spare is not None and len(spare) == newcap:
            buf, self._spare = spare, None
        else:
            buf = bytearray(newcap)
        buf[0:live] = self._buf[start:end]
        if held:
            self._retired.append(self._buf)
        self._buf = buf
        self._mv = memoryview(buf)
        self._cap = newcap
        self._start, self._end = 0, live

    def _prune(self):
        """Forget retired buffers no view holds any more, but keep one of the current size
        as ``_spare``; return the bytes of those still held."""
        retired = self._retired
        if not retired:
            return 0
        held = []
        total = 0
        while retired:
            buf = retired.pop()
            # References: ``buf`` and the argument of getrefcount; any more are views.
            if sys.getrefcount(buf) > 2:
                held.append(buf)
                total += len(buf)
            elif self._spare is None and len(buf) == self._cap:
                self._spare = buf
            del buf
        held.reverse()
        self._retired = held
        return total

    @property
    def pinned(self):
        return self._prune()

    # -- parsing -----------------------------------------------------------------------

    def _fail(self, exc):
        self._error = exc
        raise exc

    def _parse(self):
        self._parsing = True
        try:
            self._parse_chunks()
        except BaseException as exc:
            if exc is self._error:
                # Kept for every later call: without the parser's frames, whose locals
                # (the buffer itself) would count as views and pin it (C has no such frames).
                exc.__traceback__ = None
            raise
        finally:
            self._parsing = False

    def _parse_chunks(self):
        buf = self._buf
        find = buf.find
        max_chunk_size = self._max_chunk_size
        end = self._end
        while True:
            pos = self._start
            if pos == end:
                return
            # 1+2. The size line: CRLF within the first _SIZE_LINE_WINDOW bytes, validated.
            lim = pos + _SIZE_LINE_WINDOW
            try:
                line = _read_size_line(bytes(buf[pos : lim if lim < end else end]),
                                       max_chunk_size)
            except FramingError as exc:
                self._fail(exc)
            if line is None:
                return
            body_len, ulen, reset, nl = line
            nl += pos
            inflater = self.inflater
            if ulen >= 0 and inflater is None:
                self._fail(_no_inflater_error(bytes(buf[pos:nl])))
            # 3. Wait for the whole body.
            body = nl + 2
            chunk_end = body + body_len
            if chunk_end > end:
                return
            if ulen >= 0:
                # 5. A ZChunk: consume, reset, inflate, then analyse the inflated body.
                self._start = chunk_end
                self._chunks_received += 1
                inflated = _inflate_chunk(inflater, reset, bytes(buf[body:chunk_end]), ulen,
                                          self.on_corrupt_chunk)
                if inflated is None:
                    continue
                try:
                    sid, headers, offset = _analyse_body(inflated)
                except FramingError as exc:
                    self._fail(exc)
                _dispatch(self._slots, self.on_chunk, sid, headers, inflated, offset)
                continue
            # 4. A plain chunk: the hot case "SID: <digits>\r\n\r\n" first.
            sep = find(b"\r\n\r\n", body, chunk_end)
            sid = -1
            if sep >= 0 and buf.startswith(b"SID: ", body):
                digits = buf[body + 5 : sep]
                if 0 < len(digits) <= _MAX_SID_DIGITS and digits.isdigit():
                    sid = int(digits)
                    if sid > _MAX_SID:
                        sid = -1
            if sid >= 0:
                # 5. Consume and dispatch a data chunk.
                self._start = chunk_end
                self._chunks_received += 1
                if reset and inflater is not None:
                    inflater.reset()
                slot = self._slots.get(sid)
                sink = None if slot is None else slot.sink
                if slot is None or sink is None:
                    self.on_chunk(
                        [("SID", digits.decode("latin-1"))], bytes(buf[sep + 4 : chunk_end])
                    )
                    continue
                # A view of its own (not a slice of self._mv) so that _shared() sees it
                # and any slice a sink keeps.
                view = memoryview(buf)[sep + 4 : chunk_end].toreadonly()
                try:
                    sink(view)
                finally:
                    slot.received += chunk_end - sep - 4
                    _release(view)
                continue
            # The general case: a copy of the body, parsed line by line.
            data = bytes(buf[body:chunk_end])
            try:
                sid, headers, offset = _analyse_body(data)
            except FramingError as exc:
                self._fail(exc)
            self._start = chunk_end
            self._chunks_received += 1
            if reset and inflater is not None:
                inflater.reset()
            _dispatch(self._slots, self.on_chunk, sid, headers, data, offset)


class ChunkWriter:
    """Encodes outgoing chunks into one coalesced buffer per flush."""

    __slots__ = (
        "_buf",  # bytearray of framed chunks waiting for flush()
        "_max_payload",
        "_chunks_written",
        "_bytes_written",
        "_loan",  # the view lent by get_data_buffer, else None
        "_loan_slot",  # the StreamSlot of the loan
        "_loan_header",  # b"SID: n\r\n\r\n" of the loan
        "_loan_width",  # hex digits of the loan's zero-padded size
        "_stale",  # a view whose release failed (BufferError), retried once
    )

    def __init__(self, *, max_payload=MAX_DATA_PAYLOAD):
        max_payload = _max_payload_arg(max_payload)
        self._buf = bytearray()
        self._max_payload = max_payload
        self._chunks_written = 0
        self._bytes_written = 0
        self._loan = self._loan_slot = self._loan_header = self._stale = None
        self._loan_width = 0

    @property
    def pending(self):
        return len(self._buf)

    @property
    def chunks_written(self):
        return self._chunks_written

    @property
    def bytes_written(self):
        return self._bytes_written

    def __repr__(self):
        return _writer_repr(self)

    def _refuse_during_loan(self, method):
        if self._loan is not None:
            raise _loan_out_error(method)
        stale = self._stale
        if stale is not None:
            self._stale = None
            _release(stale)

    def write_data(self, slot, data):
        self._refuse_during_loan("write_data")
        _check_slot(slot)
        view = _bytes_view(data)
        n = len(view)
        header = b"SID: %d\r\n\r\n" % slot._sid
        buf = self._buf
        step = self._max_payload
        if n <= step:
            buf += b"%x\r\n" % (len(header) + n)
            buf += header
            buf += view
            self._chunks_written += 1
        else:
            for offset in range(0, n, step):
                piece = view[offset : offset + step]
                buf += b"%x\r\n" % (len(header) + len(piece))
                buf += header
                buf += piece
                self._chunks_written += 1
        slot.sent += n

    def write_chunk(self, header_block, payload=b""):
        self._refuse_during_loan("write_chunk")
        block = _bytes_view(header_block).tobytes()
        payload = _bytes_view(payload)
        _check_header_block(block)
        buf = self._buf
        buf += b"%x\r\n" % (len(block) + 2 + len(payload))
        buf += block
        buf += b"\r\n"
        buf += payload
        self._chunks_written += 1

    def write_raw(self, data):
        self._refuse_during_loan("write_raw")
        self._buf += _bytes_view(data)

    def get_data_buffer(self, slot, sizehint):
        _check_slot(slot)
        sizehint = _index(sizehint)
        self.cancel_data_buffer()
        step = self._max_payload
        limit = sizehint if 0 < sizehint < step else step
        header = b"SID: %d\r\n\r\n" % slot._sid
        self._loan_slot = slot
        self._loan_header = header
        self._loan_width = len(b"%x" % (len(header) + limit))
        # The twin lends a separate bytearray and copies it in at data_buffer_updated;
        # the compiled module lends the pending buffer itself.  The contents of a fresh
        # loan are unspecified.
        loan = self._loan = memoryview(bytearray(limit))
        return loan

    def data_buffer_updated(self, nbytes):
        nbytes = _index(nbytes)
        loan = self._loan
        if loan is None:
            raise _no_loan_error("ChunkWriter.data_buffer_updated", "get_data_buffer")
        lent = len(loan)
        if not 0 <= nbytes <= lent:
            self.cancel_data_buffer()
            raise _outside_loan_error("ChunkWriter.data_buffer_updated", nbytes, lent)
        if nbytes:
            header = self._loan_header
            slot = self._loan_slot
            assert header is not None and slot is not None  # set with the loan
            buf = self._buf
            buf += b"%0*x\r\n" % (self._loan_width, len(header) + nbytes)
            buf += header
            buf += loan[:nbytes]
            self._chunks_written += 1
            slot.sent += nbytes
        self.cancel_data_buffer()

    def cancel_data_buffer(self):
        stale = self._stale
        if stale is not None:
            self._stale = None
            _release(stale)
        loan = self._loan
        if loan is not None:
            self._loan = self._loan_slot = self._loan_header = None
            if not _release(loan):
                self._stale = loan

    def flush(self):
        self._refuse_during_loan("flush")
        buf = self._buf
        if not buf:
            return None
        out = bytes(buf)
        buf.clear()
        self._bytes_written += len(out)
        return out
