# C layout of kite._fastpath (see _fastpath.pyx for the code, _fastpath.pyi for the API and
# _fastpath_py.py for the executable specification).  Every field says its invariant.

from cpython.object cimport PyObject


cdef enum:
    # C mirrors of constants defined in kite._fastpath_py (the definitions of record), for
    # the per-chunk loop and for array sizes; tests/test_fastpath_constants.py checks that
    # each equals the twin's value.  Every other shared constant (the public ones, the
    # argument bounds, the buffer policy) is imported from the twin by _fastpath.pyx.
    # Wire-format bounds (docs/protocol.md §4.1, h11-style grammar bounds).
    SIZE_DIGITS = 8                  # MAX_SIZE_DIGITS: hex digits per number in a size line
    SIZE_LINE_WINDOW = 20            # _SIZE_LINE_WINDOW: CRLF starts within this many bytes
    MAX_SID = 2147483647             # _MAX_SID (2**31 - 1): largest stream id
    SID_DIGITS = 10                  # _MAX_SID_DIGITS: len(str(MAX_SID))
    SID_HEADER_MAX = 19              # len(b"SID: %d\r\n\r\n" % _MAX_SID)
    # C only (no counterpart in the twin):
    # Slot lookup cache (direct-mapped on the low bits of the sid).
    SLOT_CACHE_SIZE = 64
    SLOT_CACHE_MASK = 63
    # ChunkWriter pending buffer.
    WRITER_INITIAL_CAP = 98304       # 96 KiB: one ~64 KiB flush plus a chunk, below
                                     # glibc's 128 KiB mmap threshold
    WRITER_COPY_BELOW = 4096         # flush() copies less than this and keeps the buffer


cdef class _Memory:
    # The only exporter of the views this module lends or hands to sinks.  A view keeps
    # its _Memory alive (Py_buffer.obj), and the _Memory keeps the memory alive, so a view
    # kept against the rules never points into freed memory.
    cdef char* mem                   # malloc'd block owned by this object, or NULL
    cdef Py_ssize_t size             # bytes allocated at mem (0 if mem is NULL)
    cdef object owner                # object whose memory is exported (the writer's pending
                                     # bytes), kept alive by this reference; None if mem
    cdef char* win_ptr               # start of the window the next export covers
    cdef Py_ssize_t win_len          # its length
    cdef bint win_readonly           # the next export is read-only (payload) or writable (loan)
    cdef bint armed                  # set just before our own PyMemoryView_FromObject and
                                     # cleared right after: anyone else gets BufferError


cdef class StreamSlot:
    cdef readonly long long sid      # 0 <= sid <= MAX_SID, fixed at construction
    cdef public object sink          # callable(memoryview), or None (data goes to on_chunk)
    cdef public long long received   # payload bytes the demux handed to sink
    cdef public long long sent       # payload bytes the writer framed for this stream
    cdef char header[SID_HEADER_MAX + 1]  # b"SID: <sid>\r\n\r\n", computed once
    cdef Py_ssize_t header_len       # its length, 11..SID_HEADER_MAX


cdef class Demux:
    cdef public object on_chunk          # callable(headers, payload) for every non-sink chunk
    cdef public object on_corrupt_chunk  # callable(exc) or None (CompressionError propagates)
    cdef public object inflater          # Inflater or None (Z chunks are a FramingError)
    cdef readonly long long chunks_received  # chunks consumed (data and others)
    cdef readonly long long bytes_received   # bytes accepted by feed_data/buffer_updated
    cdef Py_ssize_t _max_chunk_size      # 1.._MAX_CHUNK_SIZE_LIMIT: bound on SIZE/ULEN/CLEN
    cdef _Memory _mem                    # owns the receive buffer; None until first use
    cdef char* _data                     # == _mem.mem (NULL while _cap == 0)
    cdef Py_ssize_t _cap                 # bytes at _data
    cdef Py_ssize_t _start               # 0 <= _start <= _end: first unparsed byte
    cdef Py_ssize_t _end                 # _end <= _cap: _data[_start:_end] is unparsed input
    cdef object _loan                    # the view get_buffer lent (covers _data[_end:_cap]),
                                         # until buffer_updated; else None
    cdef object _stale                   # a view whose release failed (BufferError): retried
                                         # once at the next loan end; else None
    cdef dict _slots                     # sid (int) -> StreamSlot: the attached streams
    cdef long long _cache_sid[SLOT_CACHE_SIZE]  # sid cached at [sid & MASK], or -1
    cdef PyObject* _cache_slot[SLOT_CACHE_SIZE]  # borrowed from _slots; the whole cache is
                                                 # cleared whenever _slots changes
    cdef list _retired                   # blocks replaced while a view still held them (a
                                         # payload slice a transport queued): the view keeps
                                         # the block alive; pruned when no view holds it
    cdef _Memory _spare                  # one such block no view holds any more, of the size
                                         # the next replacement takes, else None
    cdef object _error                   # the FramingError that failed the demux, else None
    cdef bint _parsing                   # callbacks are running: re-entry is refused

    cdef int _reserve(self, Py_ssize_t n) except -1
    cdef int _new_buffer(self, Py_ssize_t newcap, Py_ssize_t live) except -1
    cdef Py_ssize_t _prune(self) except -1
    cdef int _end_loan(self) except -1
    cdef int _clear_cache(self) noexcept
    cdef int _fail(self, exc) except -1
    cdef int _parse(self) except -1
    cdef int _parse_chunks(self) except -1
    cdef object _size_line_slow(self, Py_ssize_t pos)
    cdef int _compressed_chunk(self, Py_ssize_t body, Py_ssize_t chunk_end, Py_ssize_t ulen,
                               bint reset, object inflater) except -1


cdef class ChunkWriter:
    cdef PyObject* _out                  # pending bytes object (NULL when nothing is pending
                                         # and no buffer is kept); ours alone unless a loan
                                         # view pins it (then it is copied, never resized)
    cdef char* _data                     # PyBytes_AS_STRING(_out), NULL with _out
    cdef Py_ssize_t _len                 # 0 <= _len <= _cap: framed bytes waiting for flush()
    cdef Py_ssize_t _cap                 # PyBytes_GET_SIZE(_out), 0 with _out
    cdef Py_ssize_t _max_payload         # 1.._MAX_PAYLOAD_LIMIT: largest data chunk payload
    cdef readonly long long chunks_written  # chunks framed so far (write_raw not counted)
    cdef readonly long long bytes_written   # bytes returned by flush() so far
    cdef object _loan                    # the view get_data_buffer lent, else None
    cdef StreamSlot _loan_slot           # its stream (None without a loan)
    cdef _Memory _loan_mem               # exporter of loan views (owner = _out)
    cdef Py_ssize_t _loan_limit          # len(_loan)
    cdef int _loan_width                 # hex digits of the loan's zero-padded size
    cdef object _stale                   # a view whose release failed, retried once

    cdef int _reserve(self, Py_ssize_t n) except -1
    cdef int _retry_stale(self) except -1
    cdef int _refuse_during_loan(self, str method) except -1
    cdef int _append(self, const char* src, Py_ssize_t n) except -1
