"""Keep bursts of small chunks within what pagekite.py's chunk reader survives.

pagekite.py 1.5.2 parses at most 150 chunks (or chunk pieces) per ``recv()`` on a tunnel
and otherwise raises "Too much data", which crash-restarts the whole process
(docs/protocol.md §4.1, §13.9).  kite corks its writes (one coalesced buffer per loop
tick), so a burst - hundreds of visitors arriving at once, many streams ending together,
a run of SKB acknowledgements - easily puts hundreds of small chunks into one read.
Towards a kite peer none of this matters; towards pagekite.py every corked buffer goes
through :class:`FrameBudget`, which cuts it at chunk boundaries:

* **TLS tunnel** - pagekite.py's ``recv`` on a TLS socket returns at most one TLS record
  (16 KiB of plaintext), and every piece handed to the transport becomes its own
  record(s).  Pieces of at most ``TLS_RECORD`` bytes and ``TLS_MAX_CHUNKS`` chunks bound
  every read; nothing is added.  (Chunks are also aligned with records: every read is
  whole chunks.)
* **Plain TCP** - a ``recv`` takes whatever is buffered, up to 50393 bytes (3.1 x 16256),
  so the bound must hold for any 50393 bytes of the stream.  The stream is cut into
  *segments* of at most ``PLAIN_MAX_CHUNKS`` chunks, each spanning at least ``READ_SIZE``
  bytes: a read then overlaps at most two segments, fewer than 150 chunks.  Bulk data
  (16 KiB chunks) closes segments by size, for free.  A segment that reaches the chunk
  limit with fewer bytes is closed with one padding chunk - ``NOOP: 1`` with a filler
  payload that pagekite.py discards.  A segment also closes for free once the tunnel has
  been quiet (no writes, nothing buffered) for ``IDLE_RESET`` seconds: pagekite.py reads
  its tunnels every few milliseconds.

The padding costs bandwidth only where chunks are dense: about 0.7 KiB per small chunk
beyond 71 in a second (bursts of new streams, long runs of SKBs while pagekite.py uploads).
(A PING/PONG read barrier would prove what pagekite.py has read without padding, but a
PING makes pagekite.py 1.5.2 backends stall for ~30 ms while they stream, so bulk
transfers would crawl.)

Sans-IO: :meth:`FrameBudget.split` takes the corked buffer and returns the pieces to write.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["FrameBudget", "READ_SIZE", "TLS_RECORD", "padding_chunk", "chunk_ends"]

#: The most pagekite.py reads from a tunnel at once (MAX_READ_BYTES * MAX_READ_TUNNEL_X =
#: 16256 * 3.1 = 50393), rounded up.
READ_SIZE = 52 * 1024
#: pagekite.py parses at most 150 chunks per read; these leave a margin.
PLAIN_MAX_CHUNKS = 72  # a read overlaps at most two segments: <= 144
TLS_MAX_CHUNKS = 100
#: Largest TLS plaintext record.
TLS_RECORD = 16384
#: Quiet seconds after which pagekite.py has certainly read what it was sent.
IDLE_RESET = 1.0

_NOOP = b"NOOP: 1\r\n\r\n"


def padding_chunk(size: int) -> bytes:
    """A NOOP chunk of about ``size`` bytes in total (at least a minimal one)."""
    body = max(len(_NOOP) + 1, size - 8)
    return b"%x\r\n" % body + _NOOP + b"!" * (body - len(_NOOP))


def chunk_ends(data, start: int = 0):
    """Yield the end offset of each chunk in ``data`` (our own, well-formed output)."""
    n = len(data)
    pos = start
    find = data.find
    while pos < n:
        eol = find(b"\r\n", pos, pos + 24)
        if eol < 0:
            raise ValueError(f"no chunk size line at offset {pos}")
        line = data[pos:eol]
        if line.endswith(b"R"):
            line = line[:-1]
        z = line.find(b"Z")
        size = int(line[z + 1:] if z >= 0 else line, 16)
        pos = eol + 2 + size
        yield pos


class FrameBudget:
    """Cuts corked chunk buffers for one tunnel to a pagekite.py peer (see module doc)."""

    __slots__ = ("tls", "max_chunks", "seg_chunks", "seg_bytes", "last_write", "padded",
                 "pieces")

    def __init__(self, *, tls: bool) -> None:
        self.tls = tls
        self.max_chunks = TLS_MAX_CHUNKS if tls else PLAIN_MAX_CHUNKS
        self.seg_chunks = 0  # plain: chunks in the open segment
        self.seg_bytes = 0  # plain: bytes in the open segment
        self.last_write: Optional[float] = None
        self.padded = 0  # statistics: padding bytes sent,
        self.pieces = 0  # and transport writes produced

    def split(self, data: bytes, chunks: int, now: float, quiet: bool) -> list:
        """Pieces to hand to the transport, in order, for the corked ``data``.

        ``chunks``: how many chunks ``data`` holds (every one must be counted: the writer's
        ``chunks_written``); ``now``: a monotonic clock; ``quiet``: the transport has
        nothing buffered.
        """
        last, self.last_write = self.last_write, now
        if self.tls:
            out = self._split_tls(data, chunks)
        else:
            if quiet and last is not None and now - last >= IDLE_RESET:
                self.seg_chunks = self.seg_bytes = 0
            out = self._split_plain(data, chunks)
        self.pieces += len(out)
        return out

    def _split_tls(self, data: bytes, chunks: int) -> list:
        if len(data) <= TLS_RECORD and chunks <= self.max_chunks:
            return [data]
        out = []
        start = 0  # start of the piece being built
        last_end = 0  # end of the last chunk that fits in it
        count = 0
        for end in chunk_ends(data):
            if count and (end - start > TLS_RECORD or count >= self.max_chunks):
                out.append(data[start:last_end])
                start, count = last_end, 0
            last_end = end
            count += 1
        if start < len(data):
            out.append(data[start:])
        return out

    def _split_plain(self, data: bytes, chunks: int) -> list:
        limit = self.max_chunks - 1  # room for the padding chunk that closes a segment
        if self.seg_chunks + chunks <= limit:
            self._add(len(data), chunks)
            return [data]
        out = []
        piece_start = pos = 0
        for end in chunk_ends(data):
            if self.seg_chunks >= limit:
                if pos > piece_start:
                    out.append(data[piece_start:pos])
                    piece_start = pos
                pad = padding_chunk(READ_SIZE - self.seg_bytes)
                out.append(pad)
                self.padded += len(pad)
                self.seg_chunks = self.seg_bytes = 0
            self._add(end - pos, 1)
            pos = end
        if piece_start < len(data):
            out.append(data[piece_start:])
        return out

    def _add(self, nbytes: int, nchunks: int) -> None:
        self.seg_bytes += nbytes
        self.seg_chunks += nchunks
        if self.seg_bytes >= READ_SIZE:  # spans a whole read: a closed segment, for free
            self.seg_chunks = self.seg_bytes = 0
