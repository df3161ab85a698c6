"""The fast path: PageKite chunk framing for one tunnel (the documentation of record).

Both ``kite._fastpath`` (Cython) and ``kite._fastpath_py`` (its pure-Python twin, the
executable specification) implement exactly this API, with the same exceptions and the same
messages.  Import it through ``kite.fastpath``, which picks one.

Wire format (docs/protocol.md §4)::

    chunk     = size-line body
    size-line = HEX{1,8} [ "Z" HEX{1,8} ] [ "R" ] CRLF      ; hex digits either case, leading zeros allowed
    body      = header-block CRLF payload                  ; the body holds the first CRLF CRLF
    data      = "SID: " DIGIT{1,10} CRLF CRLF payload        ; the hot case, recognised without a dict

Plain size line: SIZE = body length.  Compressed: ``ULENZCLEN`` = inflated body length, then
the CLEN compressed bytes that follow.  ``R`` = the sender reset its compressor: start a new
inflater before this chunk.  A size of 0, a size above ``max_chunk_size``, a non-hex digit, a
size line longer than 8+1+8+1 characters before CRLF, a body without CRLF CRLF, or a header
line without ``:`` (an empty header block counts as one) is a
:class:`~kite.errors.FramingError` whose message quotes the offending bytes with ``!r``
(bodies and header lines abbreviated to 64 bytes).  Errors are decided on a complete size
line (or on 20 bytes without CRLF) and on a complete body, so neither the events nor the
message depend on how the stream was cut into reads.

Buffer ownership (enforced, see each method):

* ``Demux.get_buffer`` lends a writable view; the loan ends at ``buffer_updated`` (or at the
  next ``get_buffer``/``feed_data``, which cancel an unfinished loan).  The view is released
  when the loan ends: using it afterwards raises ``ValueError``.  (A view cannot be released
  while someone holds a buffer export of it -- uvloop holds one on the ``get_buffer`` view
  until ``buffer_updated`` returns -- so such a view is released at the next call instead.)
* A sink is called with a *borrowed* read-only memoryview of the payload that is valid only
  for the duration of the call and released afterwards; a sink that keeps data copies it
  (``bytes(view)``).  Transports keep references to what they are given, so never hand them
  the view itself.  (A view or slice kept against this rule never points into freed
  memory, but its contents are unspecified.)
* ``ChunkWriter.flush()`` returns an object the writer never touches again (owned by the
  caller, safe to pass to ``transport.write``).  ``ChunkWriter.get_data_buffer`` lends a view
  into the pending buffer; the writer refuses every other operation while the loan is out,
  except ``get_data_buffer`` itself and ``cancel_data_buffer``, which end it.
"""

from typing import Callable, Optional, Protocol, Union

Buffer = Union[bytes, bytearray, memoryview]

MAX_SIZE_DIGITS: int  # 8: hex digits allowed in each number of a size line
MAX_CHUNK_SIZE: int  # 1 MiB: default bound on a chunk body (plain size or ULEN or CLEN)
MAX_DATA_PAYLOAD: int  # 65536 - 32: default largest payload ChunkWriter puts in one data chunk

Headers = list[tuple[str, str]]

class Inflater(Protocol):
    """What ``Demux`` needs to read ZChunks (implemented by ``kite.proto.zchunks``)."""

    def reset(self) -> None:
        """Start a new zlib stream (the chunk carried the ``R`` suffix)."""
    def inflate(self, data: bytes, ulen: int) -> bytes:
        """Inflate one chunk; raise CompressionError unless it yields exactly ``ulen`` bytes."""

class StreamSlot:
    """One stream's record in the fast path: its sink and its byte counters.

    Shared by the Demux (which fills ``received``) and the ChunkWriter (which fills
    ``sent``); flow control reads both.  Counters are payload bytes only.
    """

    sid: int  # read-only, 0 <= sid < 2**31 (ValueError otherwise)
    sink: Optional[Callable[[memoryview], object]]  # called with each data payload
    received: int  # payload bytes the demux has handed to ``sink``
    sent: int  # payload bytes the writer has framed for this stream
    def __init__(self, sid: int, sink: Optional[Callable[[memoryview], object]] = None) -> None: ...

class Demux:
    """Splits the chunk stream that arrives on one tunnel into events.

    * data chunks (``SID: n`` and nothing else in the header block, any spelling/case of the
      name, value a decimal) whose sid has an attached slot with a sink: ``slot.sink(view)``
      with a borrowed view of the payload (also for an empty payload), then
      ``slot.received += len(payload)``;
    * every other chunk (control/NOOP, stream open, EOF, data for an unattached sid or a
      slot without sink): ``on_chunk(headers, payload)`` with ``headers`` a new list of
      ``(name, value)`` str pairs (latin-1 decoded, lines split at CRLF, name as sent, value
      with surrounding spaces and tabs stripped) in wire order, and ``payload`` a new ``bytes``.

    The view is borrowed: it is released when the sink returns.  A sink may keep a *slice*
    of it (``view[k:]``, e.g. queued by a transport's ``write``) instead of a copy: the
    bytes a live slice covers are never overwritten, but the slice keeps the whole receive
    buffer (``capacity`` bytes) allocated until it goes.

    A data chunk's sid is 1..10 ASCII digits with a value below 2**31; anything else (``+5``,
    ``2147483648``, a second header) makes it an ``on_chunk`` chunk.

    Events are produced in wire order.  An exception raised by a sink or ``on_chunk``
    propagates out of ``feed_data``/``buffer_updated``; that chunk counts as consumed (and
    ``slot.received`` includes it) and the unparsed rest stays buffered for the next call
    (``feed_data(b"")`` resumes).  A FramingError puts the demux in a failed state: every
    later ``feed_data``/``buffer_updated`` raises the same error object again.  Callbacks may
    use ``attach``/``detach``/``get_slot`` (a stream opened by ``on_chunk`` gets the very
    next chunk), but ``feed_data``, ``get_buffer`` and ``buffer_updated`` called from a
    callback raise LocalProtocolError.

    ZChunks: a chunk with ``R`` calls ``inflater.reset()`` first (ignored without an
    inflater).  A ``Z`` chunk without an inflater is a FramingError.  When ``inflate`` raises
    CompressionError (or returns other than ``ulen`` bytes, which the demux checks too), the
    chunk is dropped and ``on_corrupt_chunk(exc)`` is called (the tunnel answers with ZRST);
    without ``on_corrupt_chunk`` the error propagates (the demux does not fail).  The
    inflated body is then framed like a plain one.
    """

    on_chunk: Callable[[Headers, bytes], object]
    on_corrupt_chunk: Optional[Callable[[Exception], object]]
    inflater: Optional[Inflater]
    chunks_received: int  # read-only: chunks parsed so far (data and others)
    bytes_received: int  # read-only: bytes accepted by feed_data/buffer_updated
    def __init__(
        self,
        on_chunk: Callable[[Headers, bytes], object],
        *,
        on_corrupt_chunk: Optional[Callable[[Exception], object]] = None,
        inflater: Optional[Inflater] = None,
        max_chunk_size: int = ...,  # MAX_CHUNK_SIZE; 1 <= max_chunk_size <= 2**24
    ) -> None: ...
    def attach(self, slot: StreamSlot) -> None:
        """Route data chunks for ``slot.sid`` to ``slot.sink``; replaces an earlier slot."""
    def detach(self, sid: int) -> Optional[StreamSlot]:
        """Stop routing ``sid``; returns the slot that was attached, or None."""
    def get_slot(self, sid: int) -> Optional[StreamSlot]: ...
    def get_buffer(self, sizehint: int) -> memoryview:
        """Lend a writable view of free buffer space (asyncio.BufferedProtocol.get_buffer).

        The view covers all free space: at least ``sizehint`` bytes (clamped to 256 KiB),
        at least 16 KiB if ``sizehint`` <= 0.  Its length depends only on the calls made
        so far (both implementations lend the same sizes).
        """
    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` of the lent view were filled: end the loan and parse.

        LocalProtocolError if no loan is out or ``nbytes`` is outside 0..len(view) (the loan
        ends and nothing is accepted).
        """
    def feed_data(self, data: Buffer) -> None:
        """Copy ``data`` in and parse (for tests, and for leftovers after the handshake)."""
    @property
    def buffered(self) -> int:
        """Bytes received but not yet parsed (a partial chunk)."""
    @property
    def capacity(self) -> int:
        """Size of the current receive buffer (what a kept payload slice keeps allocated)."""

class ChunkWriter:
    """Encodes outgoing chunks into one coalesced buffer per flush.

    Over TLS every separate ``transport.write`` costs at least one TLS record and a syscall,
    so the tunnel appends all chunks of a loop tick here and writes them with one flush.
    Data chunks use the canonical ``SID: n`` header (pagekite.py parses it), lower-case hex
    sizes; payloads longer than ``max_payload`` are split into several chunks.
    """

    pending: int  # read-only: bytes waiting for flush() (a loan's reservation not included)
    chunks_written: int  # read-only: chunks encoded so far (write_raw is not counted)
    bytes_written: int  # read-only: bytes returned by flush() so far
    def __init__(self, *, max_payload: int = ...) -> None: ...  # MAX_DATA_PAYLOAD; 1..2**20
    def write_data(self, slot: StreamSlot, data: Buffer) -> None:
        """Frame ``data`` for ``slot.sid`` (an empty ``data`` frames one empty data chunk).

        ``slot.sent += len(data)``.  ``data`` is copied; the caller keeps ownership.
        """
    def write_chunk(self, header_block: Buffer, payload: Buffer = b"") -> None:
        """Frame a chunk from a header block (``Name: value\\r\\n`` lines, no blank line).

        LocalProtocolError if the header block is empty, does not end in CRLF, or contains
        a blank line.
        """
    def write_raw(self, data: Buffer) -> None:
        """Append already-framed bytes as they are (ZChunks framed by kite.proto.zchunks)."""
    def get_data_buffer(self, slot: StreamSlot, sizehint: int) -> memoryview:
        """Lend a writable view for one data chunk's payload, inside the pending buffer.

        The chunk header is written in front of it at ``data_buffer_updated`` so that header
        and payload leave as one contiguous piece without a copy (a visitor's BufferedProtocol
        reads straight into the tunnel's next write).  The view holds up to
        ``min(sizehint, max_payload)`` bytes (``max_payload`` if ``sizehint`` <= 0).
        Because the header is sized before the payload is known, its hex size is written
        zero-padded to the width of the largest body the loan allows (``00a3`` for a loan of
        up to 0xffff body bytes); pagekite.py reads sizes with ``int(x, 16)``, which accepts
        that.  ``slot.sent`` grows at ``data_buffer_updated``.  The contents of a fresh loan
        are unspecified.
        """
    def data_buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` of the lent view were filled: frame them (0 frames nothing).

        LocalProtocolError if no loan is out, or (ending the loan) if ``nbytes`` is outside
        0..len(view).
        """
    def cancel_data_buffer(self) -> None:
        """End an unfinished loan without framing anything (no-op without a loan)."""
    def flush(self) -> Optional[bytes]:
        """Return everything pending as one ``bytes`` owned by the caller, or None if empty.

        ``bytes``, not any Buffer: immutable, so a transport may keep it as long as it likes.
        """
