"""ZChunks: PageKite's optional zlib compression of chunks (docs/protocol.md §4.4).

Wire format: ``<ULEN>Z<CLEN>[R]\\r\\n`` then CLEN bytes which inflate to the ULEN-byte chunk
body (header block, blank line, payload).  Each tunnel direction is one zlib stream (RFC 1950)
shared by all streams; each compressed chunk is ``compress()`` + ``flush(Z_SYNC_FLUSH)``, so it
ends with ``00 00 ff ff`` and can be inflated on arrival.  Plain and compressed chunks
interleave.  ``R`` on a size line (either kind) says "my compressor was reset: start a new
inflater before this chunk".

Sender rules, from pagekite.py ``Selectable.SendChunked`` / ``Tunnel.SendData``:

* only bodies longer than 64 bytes are compressed;
* NOOP and EOF chunks never are (pagekite.py passes ``compress=False`` for all of them);
* per stream, the sizes of its last compressed chunk are remembered; once a chunk grew when
  compressed, that stream is sent uncompressed from then on (the chunk that grew is still
  sent compressed: its bytes are already part of the zlib stream);
* after the peer's ZRST: a new compressor, and the next chunk - compressed or not - carries
  ``R``.

kite only inflates (:class:`ZInflater`, the fast path Demux's ``inflater``); it never
compresses what it sends.
"""

from __future__ import annotations

import zlib
from typing import Optional, Union

from ..errors import CompressionError

__all__ = ["MIN_COMPRESS", "MAX_BODY", "ZInflater"]

Buffer = Union[bytes, bytearray, memoryview]

MIN_COMPRESS = 64  # bodies of at most this many bytes go uncompressed (pagekite.py: > 64)
MAX_BODY = 1 << 20  # the largest body framed here; equals the fast path's MAX_CHUNK_SIZE


class ZInflater:
    """One tunnel direction's zlib stream, as read by the Demux.

    ``inflate(data, ulen)`` never produces more than ``ulen + 1`` bytes (zlib's
    ``max_length``), so a small chunk that would inflate to gigabytes costs nothing.  Any
    failure is a CompressionError (the tunnel drops the chunk and answers ZRST); the stream is
    then out of step with the sender, so every later ``inflate`` fails too until ``reset()``
    (the sender's next chunk carries ``R``).
    """

    __slots__ = ("_z", "_failed")

    def __init__(self) -> None:
        self._z = zlib.decompressobj()
        self._failed: Optional[str] = None

    def reset(self) -> None:
        """Start a new zlib stream (the chunk carried ``R``)."""
        self._z = zlib.decompressobj()
        self._failed = None

    def inflate(self, data: Buffer, ulen: int) -> bytes:
        """Inflate one chunk body; CompressionError unless it yields exactly ``ulen`` bytes."""
        if self._failed is not None:
            raise CompressionError(f"ZChunk after a failed one, before a reset: {self._failed}")
        if not 0 <= ulen <= MAX_BODY:
            self._failed = f"ULEN {ulen!r}"
            raise CompressionError(f"ZChunk ULEN out of range 0..{MAX_BODY}: {ulen!r}")
        try:
            out = self._z.decompress(data, ulen + 1)
        except zlib.error as exc:
            self._failed = f"{exc}"
            raise CompressionError(
                f"cannot inflate ZChunk ({exc}): {bytes(data[:16])!r}..."
            ) from None
        if len(out) != ulen or self._z.unconsumed_tail or self._z.unused_data:
            what = "more than" if len(out) > ulen or self._z.unconsumed_tail else f"{len(out)}, not"
            self._failed = f"length mismatch (ULEN {ulen})"
            raise CompressionError(
                f"ZChunk inflated to {what} {ulen} bytes: {bytes(data[:16])!r}..."
            )
        return out
