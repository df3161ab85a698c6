"""Keep bursts of small chunks within what pagekite.py's chunk reader survives.

pagekite.py 1.5.2 parses at most 150 chunks (or chunk pieces) per ``recv()`` on a tunnel
and otherwise raises "Too much data", which crash-restarts the whole process
(pagekite-protocol.md §4.1, §13.9).  kite corks its writes (one coalesced buffer per loop
tick), so a burst - hundreds of visitors arriving at once, many streams ending together,
a flood of SKB acknowledgements - easily puts hundreds of small chunks into one read.
Towards a kite peer none of this matters; towards pagekite.py every corked buffer goes
through :class:`FrameBudget`, which cuts it at chunk boundaries:

* **TLS tunnel** - pagekite.py's ``recv`` on a TLS socket returns at most one TLS record
  (16 KiB of plaintext), and every piece handed to the transport becomes its own record(s).
  Pieces of at most ``TLS_RECORD`` bytes and ``TLS_MAX_CHUNKS`` chunks bound every read.
  (They also align chunks with records: each read is whole chunks.)
* **Plain TCP** - a ``recv`` takes whatever is buffered, up to 50393 bytes
  (3.1 x 16256).  kite keeps the part pagekite.py may not have read yet in *segments* of
  at most ``PLAIN_MAX_CHUNKS`` chunks that each span at least ``READ_SIZE`` bytes, so one
  read overlaps at most two segments: fewer than 150 chunks.  Bulk data (16 KiB chunks)
  fills segments by size for free.  Runs of tiny chunks are handled with a *read
  barrier*: once the open segment holds ``BARRIER_AT`` chunks, a ``NOOP: 1 / PING`` chunk
  follows.  pagekite.py answers PINGs in order, so the PONG proves that everything before
  the PING has been read, and the segment then only counts what followed.  Chunks that
  would overfill the segment before that PONG are *held* (a few milliseconds: one
  pagekite.py loop) and written when it arrives.  Only if no PONG comes within
  ``HOLD_TIMEOUT`` (or the peer stopped answering barriers) the segment is closed the
  expensive way - one ``NOOP: 1`` chunk whose
  filler payload (discarded by pagekite.py) makes the segment span ``READ_SIZE`` bytes -
  and the held chunks go out.  A segment also closes once the tunnel has been quiet (no
  writes, nothing buffered or held) for ``IDLE_RESET`` seconds.

PINGs are safe here: kite registers with pagekite.py frontends by re-connect (their PONG
works, §13.2) and pagekite.py backends answer relay PINGs.

Sans-IO: :meth:`FrameBudget.split` takes the corked buffer and returns the pieces to write
now; :meth:`FrameBudget.on_pong` takes every PONG value received and returns pieces that
may go out now; when :attr:`FrameBudget.deadline` (a time on the caller's monotonic clock)
passes, :meth:`FrameBudget.expire` returns the rest.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

__all__ = ["FrameBudget", "READ_SIZE", "TLS_RECORD", "padding_chunk"]

#: The most pagekite.py reads from a tunnel at once (MAX_READ_BYTES * MAX_READ_TUNNEL_X =
#: 16256 * 3.1 = 50393), rounded up.
READ_SIZE = 52 * 1024
#: pagekite.py parses at most 150 chunks per read; these leave a margin.
PLAIN_MAX_CHUNKS = 72  # a read overlaps at most two segments: <= 144
TLS_MAX_CHUNKS = 100
#: Chunks in the open segment after which we ask for a read barrier (PING).
BARRIER_AT = 24
#: How long chunks may wait for the barrier's PONG before we pad instead.
HOLD_TIMEOUT = 1.0
#: An unanswered barrier is given up after this long (a new one may then be sent);
#: after MAX_UNANSWERED such barriers in a row kite stops holding and only pads.
BARRIER_TIMEOUT = 5.0
MAX_UNANSWERED = 3
#: Largest TLS plaintext record.
TLS_RECORD = 16384
#: Quiet seconds after which pagekite.py has certainly read what it was sent.
IDLE_RESET = 1.0

_NOOP = b"NOOP: 1\r\n\r\n"


def padding_chunk(size: int) -> bytes:
    """A NOOP chunk of about ``size`` bytes in total (at least a minimal one)."""
    body = max(len(_NOOP) + 1, size - 8)
    return b"%x\r\n" % body + _NOOP + b"!" * (body - len(_NOOP))


def _ping_chunk(value: str) -> bytes:
    body = b"NOOP: 1\r\nPING: %s\r\n\r\n!" % value.encode("ascii")
    return b"%x\r\n" % len(body) + body


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

    __slots__ = ("tls", "max_chunks", "seg_chunks", "seg_bytes", "after_chunks",
                 "after_bytes", "barrier", "barrier_time", "last_write", "held", "deadline",
                 "padded", "pieces", "barriers", "barriers_answered", "holds", "unanswered", "_seq")

    def __init__(self, *, tls: bool) -> None:
        self.tls = tls
        self.max_chunks = TLS_MAX_CHUNKS if tls else PLAIN_MAX_CHUNKS
        self.seg_chunks = 0  # plain: chunks in the open segment (perhaps unread)
        self.seg_bytes = 0
        self.after_chunks = 0  # plain: of those, the ones written after the barrier PING
        self.after_bytes = 0
        self.barrier: Optional[str] = None  # value of the outstanding barrier PING
        self.barrier_time = 0.0
        self.last_write: Optional[float] = None
        self.held: deque = deque()  # plain: corked buffers waiting for the barrier's PONG
        self.deadline: Optional[float] = None  # when held chunks go out padded
        self.padded = 0  # statistics: padding bytes sent,
        self.pieces = 0  # transport writes produced,
        self.barriers = 0  # barrier PINGs sent,
        self.barriers_answered = 0  # ... and answered,
        self.holds = 0  # times chunks had to wait for a PONG
        self.unanswered = 0  # barriers given up in a row
        self._seq = 0

    # -- input ----------------------------------------------------------------------------
    def split(self, data: bytes, chunks: int, now: float, quiet: bool) -> list:
        """Pieces to hand to the transport now, in order, for the corked ``data``.

        ``chunks``: how many chunks ``data`` holds (every one must be counted: the writer's
        ``chunks_written``); ``now``: a monotonic clock; ``quiet``: the transport has
        nothing buffered.  Plain tunnels may hold some chunks back (see :attr:`deadline`).
        """
        if self.tls:
            out = self._split_tls(data, chunks)
        else:
            if (quiet and not self.held and self.last_write is not None
                    and now - self.last_write >= IDLE_RESET):
                self._reset()
            if self.held:
                self.held.append(data)
                out = []
            else:
                out = self._send(data, chunks, now)
        if out:
            self.last_write = now
        self.pieces += len(out)
        return out

    def on_pong(self, value: str, now: float) -> list:
        """A PONG arrived: if it answers our barrier, pagekite.py has read up to it.
        Returns held pieces that may go out now."""
        if self.barrier is None or value != self.barrier:
            return []
        self.barrier = None
        self.barriers_answered += 1
        self.unanswered = 0
        self.seg_chunks, self.seg_bytes = self.after_chunks, self.after_bytes
        return self._release(now, pad=False)

    def expire(self, now: float) -> list:
        """Everything held, now (padding the segment if needed); for the deadline and for
        closing the tunnel."""
        if not self.held:
            self.deadline = None
            return []
        return self._release(now, pad=True)

    # -- TLS ------------------------------------------------------------------------------
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

    # -- plain ----------------------------------------------------------------------------
    def _send(self, data: bytes, chunks: int, now: float, *, pad: bool = False) -> list:
        """Write what fits in the open segment; hold the rest (or pad, with ``pad``)."""
        limit = self.max_chunks - 1  # room for the chunk that closes a segment
        out: list = []
        if self.seg_chunks + chunks <= limit:
            self._add(len(data), chunks)
            out.append(data)
        else:
            piece_start = pos = 0
            for end in chunk_ends(data):
                if self.seg_chunks >= limit:
                    if pos > piece_start:
                        out.append(data[piece_start:pos])
                        piece_start = pos
                    if not pad and self.unanswered < MAX_UNANSWERED:
                        if not self._barrier_pending(now):
                            self._place_barrier(out, now)  # takes the segment's last slot
                        self.held.appendleft(data[pos:])  # wait for the PONG
                        self.holds += 1
                        self.deadline = now + HOLD_TIMEOUT
                        return out
                    self._pad(out)
                self._add(end - pos, 1)
                pos = end
            if piece_start < len(data):
                out.append(data[piece_start:])
        self._maybe_barrier(out, now)
        return out

    def _release(self, now: float, *, pad: bool) -> list:
        out: list = []
        self.deadline = None
        while self.held:
            data = self.held.popleft()
            out += self._send(data, sum(1 for _ in chunk_ends(data)), now, pad=pad)
            if self.deadline is not None:  # _send held a tail: wait for the new barrier
                break
        if out:
            self.last_write = now
        self.pieces += len(out)
        return out

    def _barrier_pending(self, now: float) -> bool:
        """A barrier is out and may still be answered (else ask for one now)."""
        if self.barrier is not None and now - self.barrier_time > BARRIER_TIMEOUT:
            self.barrier = None  # lost or ignored: padding covers us meanwhile
            self.unanswered += 1
        return self.barrier is not None

    def _maybe_barrier(self, out: list, now: float) -> None:
        if (not self._barrier_pending(now)
                and BARRIER_AT <= self.seg_chunks < self.max_chunks - 1):
            self._place_barrier(out, now)

    def _place_barrier(self, out: list, now: float) -> None:
        self._seq += 1
        value = "%d.%04d" % (self._seq, 0)  # shaped like pagekite's "%.4f" timestamps
        ping = _ping_chunk(value)
        out.append(ping)
        self._add(len(ping), 1)
        self.barrier, self.barrier_time = value, now
        self.after_chunks = self.after_bytes = 0
        self.barriers += 1

    def _add(self, nbytes: int, nchunks: int) -> None:
        self.seg_bytes += nbytes
        self.seg_chunks += nchunks
        self.after_bytes += nbytes
        self.after_chunks += nchunks
        if self.seg_bytes >= READ_SIZE:  # spans a whole read: a closed segment, for free
            self._reset()

    def _reset(self) -> None:
        self.seg_chunks = self.seg_bytes = 0
        self.after_chunks = self.after_bytes = 0

    def _pad(self, out: list) -> None:
        """Close the open segment: pad it to READ_SIZE bytes with one NOOP chunk."""
        pad = padding_chunk(READ_SIZE - self.seg_bytes)
        out.append(pad)
        self.padded += len(pad)
        self._reset()
