# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""The fast path in C: PageKite chunk framing for one tunnel.

Same API, behaviour, exceptions and messages as ``kite._fastpath_py`` (the executable
specification; read its module docstring for the theory of operation) and as documented
in ``_fastpath.pyi``.  The C layout and the invariant of every field are in
``_fastpath.pxd``.

What is different here is only *how*:

* The receive buffer is a malloc'd block owned by a ``_Memory`` object; the size line is
  parsed by a hand loop over a hex table, and the data chunk ``SID: <digits>\\r\\n\\r\\n``
  is recognised with memcmp and a digit loop.  Everything else (control chunks, unusual
  spellings, ZChunks, every error) is handed to the twin's helpers.
* Slot lookups for data chunks go through a small direct-mapped cache (sid & 63) holding
  borrowed references; it is cleared whenever the slot table changes.
* A sink gets a read-only memoryview made by ``PyMemoryView_FromObject`` over the
  ``_Memory`` exporter (not ``PyMemoryView_FromMemory``: such a view has no owner, so a
  slice a sink kept, e.g. ``view[2:]`` or ``memoryview(view)``, would point into freed
  memory once the buffer grows; ours keeps the block alive, and while any view of the
  block lives the block is never compacted over: the bytes move to a new block).  After
  the call, if ``Py_REFCNT(view) == 1`` nobody kept the view and dropping our reference
  releases it; only otherwise is ``view.release()`` called (so a view kept against the
  rules raises ValueError when used, as in the twin).  That saves a Python-level method
  call per chunk.
* ChunkWriter frames straight into a ``bytes`` object under construction and ``flush()``
  shrinks it with ``_PyBytes_Resize`` and hands it over instead of copying it (a
  bytearray would be mutable in the caller's hands).  Small flushes (< 4 KiB) are copied
  instead, keeping the big buffer for the next tick.

One source for the cold parts: the public constants, the buffer policy, every argument
check, error message and repr, the size-line slow path, header-block parsing, ZChunk
inflating and the dispatch of a chunk that is not a plain data chunk are imported from
``kite._fastpath_py`` (as aiohttp's ``_http_parser.pyx`` imports from ``http_parser.py``),
so they cannot drift apart.  Only the hot parts are written here a second time (the
differential tests prove them equal to the twin's): the per-chunk loop, buffer
management, the writer.  The constants the per-chunk loop needs in C are ``cdef enum``
members in ``_fastpath.pxd``; tests/test_fastpath_constants.py checks them against the
twin's values.
"""

from cpython.buffer cimport (
    PyBUF_SIMPLE,
    PyBuffer_FillInfo,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.dict cimport PyDict_GetItem
from cpython.exc cimport PyErr_SetString
from cpython.list cimport PyList_GET_ITEM
from cpython.long cimport PyLong_FromLongLong
from cpython.memoryview cimport PyMemoryView_FromObject
from cpython.number cimport PyNumber_Index
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_REFCNT, Py_XDECREF
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove

from .errors import FramingError
from ._fastpath_py import (
    MAX_CHUNK_SIZE,
    MAX_DATA_PAYLOAD,
    MAX_SIZE_DIGITS,
    __all__,
    _INITIAL_CAP,
    _MAX_LOAN,
    _MIN_LOAN,
    _SHRINK_ABOVE,
    _analyse_body,
    _check_header_block,
    _demux_repr,
    _dispatch,
    _inflate_chunk,
    _loan_out_error,
    _max_chunk_size_arg,
    _max_payload_arg,
    _no_inflater_error,
    _no_loan_error,
    _outside_loan_error,
    _read_size_line,
    _reentry_error,
    _sid_arg,
    _slot_repr,
    _slot_type_error,
    _writer_repr,
)

cdef extern from "Python.h":
    Py_ssize_t _Py_REFCNT "Py_REFCNT"(PyObject* ob)
    # Declared here without Cython's ``except -1`` so that the callers can clean up:
    # on failure it frees the object, sets *pv to NULL and leaves MemoryError set.
    int _PyBytes_Resize(PyObject** pv, Py_ssize_t newsize)
    # The number of buffer exports a memoryview has handed out (a public field of the
    # non-limited API): checked so that a release that would fail is not even tried.
    ctypedef struct _MemoryViewStruct "PyMemoryViewObject":
        Py_ssize_t exports
    bint PyMemoryView_Check(object ob)

# The demux buffer policy (part of the specified behaviour: views have the same sizes), as
# C variables set once from the twin's values.
cdef Py_ssize_t INITIAL_CAP = _INITIAL_CAP
cdef Py_ssize_t SHRINK_ABOVE = _SHRINK_ABOVE
cdef Py_ssize_t MIN_LOAN = _MIN_LOAN
cdef Py_ssize_t MAX_LOAN = _MAX_LOAN

# The enums of _fastpath.pxd that mirror a constant of the twin, for the test that checks
# they are equal.
_ENUMS = {
    "SIZE_DIGITS": SIZE_DIGITS,
    "SIZE_LINE_WINDOW": SIZE_LINE_WINDOW,
    "MAX_SID": MAX_SID,
    "SID_DIGITS": SID_DIGITS,
    "SID_HEADER_MAX": SID_HEADER_MAX,
}

# -- tables --------------------------------------------------------------------------------

cdef signed char _HEXVAL[256]  # value of a hex digit (either case), -1 for anything else
cdef char* _HEXDIGITS = b"0123456789abcdef"


cdef void _init_tables() noexcept:
    cdef int c
    for c in range(256):
        _HEXVAL[c] = -1
    for c in range(10):
        _HEXVAL[48 + c] = c
    for c in range(6):
        _HEXVAL[65 + c] = 10 + c
        _HEXVAL[97 + c] = 10 + c


_init_tables()


cdef inline int _put_hex(char* p, size_t value, int width) noexcept:
    """Lower-case hex of ``value`` at ``p``, zero-padded to ``width``; returns the length."""
    cdef int n = 1
    cdef size_t rest = value >> 4
    while rest:
        n += 1
        rest >>= 4
    if n < width:
        n = width
    cdef int i = n
    while i > 0:
        i -= 1
        p[i] = _HEXDIGITS[value & 15]
        value >>= 4
    return n


# -- helpers -------------------------------------------------------------------------------

cdef inline bint _release(view):
    """Release ``view``; False if a buffer export of it is still held.

    The usual case: a loan ends inside ``buffer_updated``, while the event loop still
    holds its export of the view (uvloop releases it after the call returns).  The export
    count is checked first, so that this case does not raise and catch a BufferError at
    every read.
    """
    if PyMemoryView_Check(view) and (<_MemoryViewStruct*><PyObject*>view).exports:
        return False
    try:
        view.release()
    except BufferError:
        return False
    return True


cdef inline int _check_slot(slot) except -1:
    if not isinstance(slot, StreamSlot):
        raise _slot_type_error(slot)
    return 0


# -- the exporter ----------------------------------------------------------------------------

cdef class _Memory:
    """Owner of a buffer and exporter of windows into it (see _fastpath.pxd)."""

    def __cinit__(self):
        self.mem = NULL
        self.size = 0
        self.owner = None
        self.armed = False

    def __dealloc__(self):
        if self.mem is not NULL:
            free(self.mem)
            self.mem = NULL

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        if not self.armed:
            _refuse_export()
        PyBuffer_FillInfo(buffer, self, self.win_ptr, self.win_len, self.win_readonly, flags)


cdef int _refuse_export() except -1:
    # PyErr_SetString, not ``raise BufferError(...)``: the machinery of a Python-level call
    # would be inlined into __getbuffer__, which runs once per data chunk.
    PyErr_SetString(BufferError, b"kite._fastpath internal buffer: not exportable")
    return -1


cdef inline _Memory _new_memory(Py_ssize_t size):
    cdef _Memory m = _Memory.__new__(_Memory)
    m.mem = <char*>malloc(size if size > 0 else 1)
    if m.mem is NULL:
        raise MemoryError()
    m.size = size
    return m


cdef inline object _export(_Memory m, char* ptr, Py_ssize_t length, bint readonly):
    """A memoryview of ``ptr[:length]`` owned by ``m``."""
    m.win_ptr = ptr
    m.win_len = length
    m.win_readonly = readonly
    m.armed = True
    try:
        return PyMemoryView_FromObject(m)
    finally:
        m.armed = False


# -- StreamSlot ------------------------------------------------------------------------------

cdef class StreamSlot:
    """One stream's record in the fast path: its sink and its byte counters."""

    def __cinit__(self, *args, **kwargs):
        self.sid = 0
        self.sink = None
        self.received = 0
        self.sent = 0
        memcpy(self.header, b"SID: 0\r\n\r\n", 11)
        self.header_len = 11

    def __init__(self, sid, sink=None):
        self.sid = _sid_arg(sid)
        self.sink = sink
        self.received = 0
        self.sent = 0
        cdef long long v = self.sid
        cdef char digits[SID_DIGITS]
        cdef int n = 0
        while True:
            digits[n] = <char>(48 + v % 10)
            n += 1
            v //= 10
            if v == 0:
                break
        memcpy(self.header, b"SID: ", 5)
        cdef int i
        for i in range(n):
            self.header[5 + i] = digits[n - 1 - i]
        memcpy(self.header + 5 + n, b"\r\n\r\n", 4)
        self.header_len = 9 + n

    def __repr__(self):
        return _slot_repr(self)


# -- Demux -----------------------------------------------------------------------------------

cdef class Demux:
    """Splits the chunk stream of one tunnel into sink calls and ``on_chunk`` events."""

    def __cinit__(self, *args, **kwargs):
        self._mem = None
        self._data = NULL
        self._cap = self._start = self._end = 0
        self._slots = {}
        self._retired = []
        self._spare = None
        self._parsing = False
        self._clear_cache()

    def __init__(self, on_chunk, *, on_corrupt_chunk=None, inflater=None,
                 max_chunk_size=MAX_CHUNK_SIZE):
        self._max_chunk_size = _max_chunk_size_arg(max_chunk_size)
        self.on_chunk = on_chunk
        self.on_corrupt_chunk = on_corrupt_chunk
        self.inflater = inflater
        self.chunks_received = 0
        self.bytes_received = 0
        self._loan = self._stale = self._error = None

    @property
    def buffered(self):
        return self._end - self._start

    @property
    def capacity(self):
        return self._cap

    def __repr__(self):
        return _demux_repr(self, self._error is not None)

    # -- streams -----------------------------------------------------------------------

    cdef int _clear_cache(self) noexcept:
        cdef int i
        for i in range(SLOT_CACHE_SIZE):
            self._cache_sid[i] = -1
            self._cache_slot[i] = NULL
        return 0

    def attach(self, slot):
        _check_slot(slot)
        self._slots[(<StreamSlot>slot).sid] = slot
        self._clear_cache()

    def detach(self, sid):
        slot = self._slots.pop(sid, None)
        self._clear_cache()
        return slot

    def get_slot(self, sid):
        return self._slots.get(sid)

    # -- input -------------------------------------------------------------------------

    def get_buffer(self, sizehint):
        if self._parsing:
            raise _reentry_error("get_buffer")
        sizehint = PyNumber_Index(sizehint)
        self._end_loan()
        cdef Py_ssize_t want
        if sizehint <= 0:
            want = MIN_LOAN
        elif sizehint >= MAX_LOAN:
            want = MAX_LOAN
        else:
            want = sizehint
        self._reserve(want)
        loan = _export(self._mem, self._data + self._end, self._cap - self._end, False)
        self._loan = loan
        return loan

    def buffer_updated(self, nbytes):
        if self._parsing:
            raise _reentry_error("buffer_updated")
        nbytes = PyNumber_Index(nbytes)
        loan = self._loan
        if loan is None:
            raise _no_loan_error("Demux.buffer_updated", "get_buffer")
        cdef Py_ssize_t lent = len(loan)
        self._end_loan()
        if not 0 <= nbytes <= lent:
            raise _outside_loan_error("Demux.buffer_updated", nbytes, lent)
        if self._error is not None:
            raise self._error.with_traceback(None)
        cdef Py_ssize_t n = nbytes
        self._end += n
        self.bytes_received += n
        self._parse()

    def feed_data(self, data):
        if self._parsing:
            raise _reentry_error("feed_data")
        cdef Py_buffer pybuf
        PyObject_GetBuffer(data, &pybuf, PyBUF_SIMPLE)
        try:
            self._end_loan()
            if self._error is not None:
                raise self._error.with_traceback(None)
            self._reserve(pybuf.len)
            if pybuf.len:
                # memmove: ``data`` may (absurdly) be a view of this very buffer.
                memmove(self._data + self._end, pybuf.buf, pybuf.len)
            self._end += pybuf.len
            self.bytes_received += pybuf.len
        finally:
            PyBuffer_Release(&pybuf)
        self._parse()

    # -- buffer management -------------------------------------------------------------

    cdef int _end_loan(self) except -1:
        """End the loan (if any) and release its view; retry an earlier failed release."""
        stale = self._stale
        if stale is not None:
            self._stale = None
            _release(stale)
        loan = self._loan
        if loan is not None:
            self._loan = None
            if not _release(loan):
                self._stale = loan
        return 0

    cdef int _reserve(self, Py_ssize_t n) except -1:
        """Make ``_cap - _end >= n`` (no loan is out, no callback is running)."""
        cdef Py_ssize_t start = self._start, end = self._end, cap = self._cap
        cdef Py_ssize_t live = end - start, newcap
        if live == 0 and self._retired:
            self._prune()  # free the retired blocks whose slices have gone since
        if live == 0 and start and _Py_REFCNT(<PyObject*>self._mem) == 1:
            # All parsed: the next bytes go to the front again - unless a view still covers
            # it (a payload slice a transport queued).
            self._start = self._end = start = end = 0
        if live == 0 and cap > SHRINK_ABOVE:
            cap = 0  # drop the large buffer below, and the spare of its size
            self._spare = None
        elif cap - end >= n:
            return 0
        elif live + n <= cap:
            if _Py_REFCNT(<PyObject*>self._mem) == 1:
                # Compact: move the partial chunk to the front.
                memmove(self._data, self._data + start, live)
                self._start = 0
                self._end = live
                return 0
            # A slice of a payload view is still alive (a transport queued it): its bytes
            # must not be overwritten, so the partial chunk moves to a new block of the
            # same size and the old one goes with its last view.
            return self._new_buffer(cap, live)
        newcap = 2 * cap
        if newcap < INITIAL_CAP:
            newcap = INITIAL_CAP
        if newcap < live + n:
            newcap = live + n
        return self._new_buffer(newcap, live)

    cdef int _new_buffer(self, Py_ssize_t newcap, Py_ssize_t live) except -1:
        cdef _Memory mem
        cdef char* grown
        if self._mem is not None and _Py_REFCNT(<PyObject*>self._mem) == 1:
            # No view holds the block: move the live bytes to the front and grow or
            # shrink it in place.
            mem = self._mem
            if self._start and live:
                memmove(self._data, self._data + self._start, live)
            grown = <char*>realloc(mem.mem, newcap)
            if grown is NULL:
                raise MemoryError()
            mem.mem = grown
            mem.size = newcap
            self._data = grown
            self._cap = newcap
            self._start = 0
            self._end = live
            return 0
        # A view holds the block (a payload slice a transport queued, or a stale loan):
        # it is retired, and freed (or reused) once the last view has gone.
        self._prune()
        mem = self._spare
        if mem is not None and mem.size == newcap:
            self._spare = None
        else:
            mem = _new_memory(newcap)
        if live:
            memcpy(mem.mem, self._data + self._start, live)
        if self._mem is not None:
            self._retired.append(self._mem)
        self._mem = mem
        self._data = mem.mem
        self._cap = newcap
        self._start = 0
        self._end = live
        return 0

    cdef Py_ssize_t _prune(self) except -1:
        """Forget retired blocks no view holds any more, but keep one of the current size
        as ``_spare``; return the bytes of those still held."""
        cdef list retired = self._retired
        cdef list held
        cdef PyObject* o
        cdef Py_ssize_t i, n = len(retired), total = 0
        if not n:
            return 0
        held = []
        for i in range(n):
            o = PyList_GET_ITEM(retired, i)  # borrowed: the list's is the only reference
            if _Py_REFCNT(o) > 1:
                held.append(<object>o)
                total += (<_Memory>o).size
            elif self._spare is None and (<_Memory>o).size == self._cap:
                self._spare = <_Memory>o
        self._retired = held
        return total

    @property
    def pinned(self):
        return self._prune()

    # -- parsing -----------------------------------------------------------------------

    cdef int _fail(self, exc) except -1:
        self._error = exc
        raise exc

    cdef int _parse(self) except -1:
        self._parsing = True
        try:
            self._parse_chunks()
        finally:
            self._parsing = False
        return 0

    cdef object _size_line_slow(self, Py_ssize_t pos):
        """The twin's steps 1 and 2 on the raw bytes: ``None`` (wait for more bytes),
        ``(body_len, ulen, reset, line_end)``, or a FramingError (the demux fails)."""
        cdef Py_ssize_t end = self._end
        cdef Py_ssize_t lim = pos + SIZE_LINE_WINDOW
        if lim > end:
            lim = end
        window = PyBytes_FromStringAndSize(self._data + pos, lim - pos)
        try:
            parsed = _read_size_line(window, self._max_chunk_size)
        except FramingError as exc:
            self._fail(exc)
        if parsed is None:
            return None
        body_len, ulen, reset, nl = parsed
        return body_len, ulen, reset, pos + nl

    cdef int _parse_chunks(self) except -1:
        cdef const unsigned char* data = <const unsigned char*>self._data  # fixed while parsing
        cdef const unsigned char* p
        cdef Py_ssize_t end = self._end
        cdef Py_ssize_t pos, avail, lim, i, j, line_end, body, chunk_end, plen
        cdef long long a, b, sid
        cdef int v, cache_index
        cdef bint reset
        cdef PyObject* found
        cdef StreamSlot slot
        cdef _Memory mem = self._mem
        cdef object inflater, sink, view
        while True:
            pos = self._start
            avail = end - pos
            if avail <= 0:
                return 0
            p = data + pos
            # 1+2. The size line, by hand: HEX{1,8} [Z HEX{1,8}] [R] CRLF.  Anything else
            # (including an error) is decided by _size_line_slow, exactly as in the twin.
            # (Each digit loop stops after SIZE_DIGITS + 1 digits: enough to see "too
            # many", and a and b stay far from overflowing.)
            lim = avail if avail < SIZE_LINE_WINDOW else SIZE_LINE_WINDOW
            i = 0
            a = 0
            while i < lim and i <= SIZE_DIGITS:
                v = _HEXVAL[p[i]]
                if v < 0:
                    break
                a = (a << 4) | v
                i += 1
            b = -1
            reset = False
            line_end = -1
            if 0 < i <= SIZE_DIGITS:
                if i < lim and p[i] == 90:  # 'Z'
                    i += 1
                    j = i
                    b = 0
                    while i < lim and i - j <= SIZE_DIGITS:
                        v = _HEXVAL[p[i]]
                        if v < 0:
                            break
                        b = (b << 4) | v
                        i += 1
                    if i == j or i - j > SIZE_DIGITS:
                        i = -1
                if i >= 0:
                    if i < lim and p[i] == 82:  # 'R'
                        reset = True
                        i += 1
                    if i + 1 < avail and p[i] == 13 and p[i + 1] == 10:  # CRLF
                        line_end = pos + i
                    elif i == avail or (i + 1 == avail and p[i] == 13):
                        return 0  # a valid prefix of a size line: wait for the rest
            if line_end >= 0 and (
                a == 0 or b == 0 or a > self._max_chunk_size or b > self._max_chunk_size
            ):
                line_end = -1  # zero or too large: let the slow path raise
            if line_end < 0:
                parsed = self._size_line_slow(pos)
                if parsed is None:
                    return 0
                a, b, reset, line_end = parsed  # (body_len, ulen, reset, line_end)
            elif b >= 0:
                a, b = b, a  # body_len = CLEN, ulen = ULEN
            # a = body length (CLEN for a ZChunk), b = ULEN or -1.
            inflater = self.inflater
            if b >= 0 and inflater is None:
                line = PyBytes_FromStringAndSize(<char*>p, line_end - pos)
                self._fail(_no_inflater_error(line))
            # 3. Wait for the whole body.
            body = line_end + 2
            chunk_end = body + a
            if chunk_end > end:
                return 0
            if b >= 0:
                self._compressed_chunk(body, chunk_end, b, reset, inflater)
                continue
            # 4. A plain chunk: the hot case "SID: <digits>\r\n\r\n" first.
            p = data + body
            sid = -1
            if a >= 10 and memcmp(p, b"SID: ", 5) == 0:
                j = 5
                sid = 0
                lim = a if a < 5 + SID_DIGITS + 1 else 5 + SID_DIGITS + 1
                while j < lim and 48 <= p[j] <= 57:  # '0'..'9'
                    sid = sid * 10 + (p[j] - 48)
                    j += 1
                if (j == 5 or j > 5 + SID_DIGITS or sid > MAX_SID or j + 4 > a
                        or memcmp(p + j, b"\r\n\r\n", 4) != 0):
                    sid = -1
            if sid < 0:
                # The general case: a copy of the body, parsed line by line.
                data_copy = PyBytes_FromStringAndSize(<char*>p, a)
                try:
                    sid, headers, offset = _analyse_body(data_copy)
                except FramingError as exc:
                    self._fail(exc)
                self._start = chunk_end
                self.chunks_received += 1
                if reset and inflater is not None:
                    inflater.reset()
                _dispatch(self._slots, self.on_chunk, sid, headers, data_copy, offset)
                continue
            # 5. Consume and dispatch a data chunk.
            self._start = chunk_end
            self.chunks_received += 1
            if reset and inflater is not None:
                inflater.reset()
            cache_index = <int>(sid & SLOT_CACHE_MASK)
            if self._cache_sid[cache_index] == sid:
                slot = <StreamSlot><object>self._cache_slot[cache_index]
            else:
                found = PyDict_GetItem(self._slots, PyLong_FromLongLong(sid))
                if found is NULL:
                    slot = None
                else:
                    slot = <StreamSlot><object>found
                    self._cache_sid[cache_index] = sid
                    self._cache_slot[cache_index] = found
            plen = chunk_end - body - j - 4
            if slot is None or slot.sink is None:
                self.on_chunk(
                    [("SID", (<char*>p)[5:j].decode("latin-1"))],
                    PyBytes_FromStringAndSize(<char*>p + j + 4, plen),
                )
                continue
            sink = slot.sink
            view = _export(mem, <char*>p + j + 4, plen, True)
            try:
                sink(view)
            finally:
                slot.received += plen
                if Py_REFCNT(view) > 1:
                    _release(view)  # the sink kept it: make it unusable
                view = None

    cdef int _compressed_chunk(self, Py_ssize_t body, Py_ssize_t chunk_end, Py_ssize_t ulen,
                               bint reset, object inflater) except -1:
        """5. A ZChunk: consume, reset, inflate, then analyse the inflated body."""
        self._start = chunk_end
        self.chunks_received += 1
        data = PyBytes_FromStringAndSize(self._data + body, chunk_end - body)
        inflated = _inflate_chunk(inflater, reset, data, ulen, self.on_corrupt_chunk)
        if inflated is None:
            return 0
        try:
            sid, headers, offset = _analyse_body(inflated)
        except FramingError as exc:
            self._fail(exc)
        _dispatch(self._slots, self.on_chunk, sid, headers, inflated, offset)
        return 0


# -- ChunkWriter -----------------------------------------------------------------------------

cdef class ChunkWriter:
    """Encodes outgoing chunks into one coalesced buffer per flush."""

    def __cinit__(self, *args, **kwargs):
        self._out = NULL
        self._data = NULL
        self._len = self._cap = 0
        self._loan_mem = None

    def __dealloc__(self):
        Py_XDECREF(self._out)
        self._out = NULL

    def __init__(self, *, max_payload=MAX_DATA_PAYLOAD):
        self._max_payload = _max_payload_arg(max_payload)
        self.chunks_written = 0
        self.bytes_written = 0
        self._loan = self._stale = None
        self._loan_slot = None

    @property
    def pending(self):
        return self._len

    def __repr__(self):
        return _writer_repr(self)

    cdef int _reserve(self, Py_ssize_t n) except -1:
        """Make ``_cap - _len >= n``, growing the pending bytes object."""
        if self._cap - self._len >= n:
            return 0
        cdef Py_ssize_t need = self._len + n
        cdef Py_ssize_t newcap
        if self._out is NULL:
            newcap = need if need > WRITER_INITIAL_CAP else WRITER_INITIAL_CAP
            fresh_obj = PyBytes_FromStringAndSize(NULL, newcap)
            Py_INCREF(fresh_obj)  # the reference self._out holds
            self._out = <PyObject*>fresh_obj
        else:
            newcap = 2 * self._cap
            if newcap < need:
                newcap = need
            if _Py_REFCNT(self._out) == 1:
                if _PyBytes_Resize(&self._out, newcap) < 0:  # freed it, MemoryError set
                    self._data = NULL
                    self._len = self._cap = 0
                    return -1
            else:
                # A loan view still pins it: copy, and let the view keep the old one.
                fresh_obj = PyBytes_FromStringAndSize(NULL, newcap)
                memcpy(PyBytes_AS_STRING(fresh_obj), self._data, self._len)
                Py_INCREF(fresh_obj)
                Py_DECREF(<object>self._out)
                self._out = <PyObject*>fresh_obj
        self._data = PyBytes_AS_STRING(<object>self._out)
        self._cap = newcap
        return 0

    cdef int _retry_stale(self) except -1:
        stale = self._stale
        if stale is not None:
            self._stale = None
            _release(stale)
        return 0

    cdef int _refuse_during_loan(self, str method) except -1:
        if self._loan is not None:
            raise _loan_out_error(method)
        if self._stale is not None:
            self._retry_stale()
        return 0

    cdef int _append(self, const char* src, Py_ssize_t n) except -1:
        self._reserve(n)
        memcpy(self._data + self._len, src, n)
        self._len += n
        return 0

    def write_data(self, slot, data):
        if self._loan is not None or self._stale is not None:
            self._refuse_during_loan("write_data")
        _check_slot(slot)
        cdef StreamSlot s = <StreamSlot>slot
        cdef Py_buffer pybuf
        cdef const char* src
        cdef Py_ssize_t n, piece, step = self._max_payload, hlen = s.header_len
        cdef char* out
        PyObject_GetBuffer(data, &pybuf, PyBUF_SIMPLE)
        try:
            n = pybuf.len
            src = <const char*>pybuf.buf
            if n <= step:
                self._reserve(8 + hlen + n)
                out = self._data + self._len
                out += _put_hex(out, hlen + n, 0)
                out[0] = b'\r'
                out[1] = b'\n'
                memcpy(out + 2, s.header, hlen)
                out += 2 + hlen
                memcpy(out, src, n)
                self._len = (out + n) - self._data
                self.chunks_written += 1
            else:
                self._reserve(n + ((n + step - 1) // step) * (8 + hlen))
                out = self._data + self._len
                while n > 0:
                    piece = n if n < step else step
                    out += _put_hex(out, hlen + piece, 0)
                    out[0] = b'\r'
                    out[1] = b'\n'
                    memcpy(out + 2, s.header, hlen)
                    out += 2 + hlen
                    memcpy(out, src, piece)
                    out += piece
                    src += piece
                    n -= piece
                    self.chunks_written += 1
                self._len = out - self._data
            s.sent += pybuf.len
        finally:
            PyBuffer_Release(&pybuf)

    def write_chunk(self, header_block, payload=b""):
        self._refuse_during_loan("write_chunk")
        cdef Py_buffer pybuf
        cdef bytes block
        PyObject_GetBuffer(header_block, &pybuf, PyBUF_SIMPLE)
        try:
            block = PyBytes_FromStringAndSize(<char*>pybuf.buf, pybuf.len)
        finally:
            PyBuffer_Release(&pybuf)
        PyObject_GetBuffer(payload, &pybuf, PyBUF_SIMPLE)
        try:
            # The twin's _check_header_block decides and words the error; the valid case
            # (every call from the tunnel) is recognised here without calling it.
            if (not block.endswith(b"\r\n") or block.startswith(b"\r\n")
                    or b"\r\n\r\n" in block):
                _check_header_block(block)
            self._reserve(10 + len(block) + 2 + pybuf.len)
            self._len += _put_hex(self._data + self._len, len(block) + 2 + pybuf.len, 0)
            self._append(b"\r\n", 2)
            self._append(PyBytes_AS_STRING(block), len(block))
            self._append(b"\r\n", 2)
            self._append(<char*>pybuf.buf, pybuf.len)
            self.chunks_written += 1
        finally:
            PyBuffer_Release(&pybuf)

    def write_raw(self, data):
        self._refuse_during_loan("write_raw")
        cdef Py_buffer pybuf
        PyObject_GetBuffer(data, &pybuf, PyBUF_SIMPLE)
        try:
            self._append(<char*>pybuf.buf, pybuf.len)
        finally:
            PyBuffer_Release(&pybuf)

    def get_data_buffer(self, slot, sizehint):
        _check_slot(slot)
        sizehint = PyNumber_Index(sizehint)
        self.cancel_data_buffer()
        cdef StreamSlot s = <StreamSlot>slot
        cdef Py_ssize_t step = self._max_payload, limit
        if 0 < sizehint < step:
            limit = sizehint
        else:
            limit = step
        cdef char scratch[16]
        cdef int width = _put_hex(scratch, s.header_len + limit, 0)
        self._reserve(width + 2 + s.header_len + limit)
        # One exporter per loan: the view keeps it, and through it the bytes object,
        # alive; when the loan ends we drop ours, so an idle writer does not pin _out.
        cdef _Memory mem = _Memory.__new__(_Memory)
        mem.owner = <object>self._out
        self._loan_mem = mem
        self._loan_slot = s
        self._loan_limit = limit
        self._loan_width = width
        loan = _export(mem, self._data + self._len + width + 2 + s.header_len, limit, False)
        self._loan = loan
        return loan

    def data_buffer_updated(self, nbytes):
        nbytes = PyNumber_Index(nbytes)
        loan = self._loan
        if loan is None:
            raise _no_loan_error("ChunkWriter.data_buffer_updated", "get_data_buffer")
        cdef Py_ssize_t lent = self._loan_limit
        if not 0 <= nbytes <= lent:
            self.cancel_data_buffer()
            raise _outside_loan_error("ChunkWriter.data_buffer_updated", nbytes, lent)
        cdef Py_ssize_t n = nbytes
        cdef StreamSlot s = self._loan_slot
        cdef char* out
        if n:
            out = self._data + self._len
            out += _put_hex(out, s.header_len + n, self._loan_width)
            out[0] = b'\r'
            out[1] = b'\n'
            memcpy(out + 2, s.header, s.header_len)
            self._len += self._loan_width + 2 + s.header_len + n
            self.chunks_written += 1
            s.sent += n
        self.cancel_data_buffer()

    def cancel_data_buffer(self):
        stale = self._stale
        if stale is not None:
            self._stale = None
            _release(stale)
        loan = self._loan
        if loan is not None:
            self._loan = None
            self._loan_slot = None
            self._loan_mem = None
            if not _release(loan):
                self._stale = loan

    def flush(self):
        self._refuse_during_loan("flush")
        cdef Py_ssize_t n = self._len
        if n == 0:
            return None
        cdef PyObject* out
        if n < WRITER_COPY_BELOW or _Py_REFCNT(self._out) != 1:
            # Small: copy, and keep the buffer for the next tick unless it grew large.
            # Pinned by a loan view: copy, and leave the old buffer to the view.
            result = PyBytes_FromStringAndSize(self._data, n)
            if _Py_REFCNT(self._out) != 1 or self._cap > 4 * WRITER_INITIAL_CAP:
                Py_DECREF(<object>self._out)
                self._out = NULL
                self._data = NULL
                self._cap = 0
        else:
            # Hand the bytes object over, shrunk to size: no copy.
            out = self._out
            self._out = NULL
            self._data = NULL
            self._cap = 0
            self._len = 0
            if _PyBytes_Resize(&out, n) < 0:  # freed it, MemoryError set
                raise MemoryError()
            result = <object>out  # a new reference...
            Py_DECREF(result)  # ...so drop the one self._out held
        self._len = 0
        self.bytes_written += n
        return result
