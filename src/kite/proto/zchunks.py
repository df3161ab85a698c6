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

The receiver side (:class:`ZInflater`) is the fast path Demux's ``inflater``.
"""

from __future__ import annotations

import zlib
from typing import Optional, Union

from ..errors import CompressionError, LocalProtocolError

__all__ = ["MIN_COMPRESS", "MAX_BODY", "ZInflater", "ZDeflater"]

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


def _is_uncompressible(header_block: bytes) -> bool:
    # NOOP (every control chunk) and EOF chunks are always sent plain.
    for line in header_block.split(b"\r\n"):
        name = line.split(b":", 1)[0].strip().lower()
        if name in (b"noop", b"eof"):
            return True
    return False


class ZDeflater:
    """One tunnel direction's compressor: frames chunks, compressed where the rules allow.

    ``frame()`` returns a complete chunk (size line + body) for ``ChunkWriter.write_raw``.
    Use it only once the peer advertised ``ZChunks``.  ``level`` 1 is what pagekite.py's
    relay uses (its backend uses 9).
    """

    __slots__ = ("level", "_z", "_reset_pending", "_history")

    def __init__(self, level: int = 1) -> None:
        if not (isinstance(level, int) and 0 <= level <= 9):
            raise LocalProtocolError(f"zlib level must be 0..9: {level!r}")
        self.level = level
        self._z = zlib.compressobj(level)
        self._reset_pending = False
        self._history: dict[int, tuple[int, int]] = {}  # sid -> (plain, compressed) sizes

    def reset(self) -> None:
        """The peer sent ZRST: start a new zlib stream and mark the next chunk with ``R``."""
        self._z = zlib.compressobj(self.level)
        self._reset_pending = True

    def forget(self, sid: int) -> None:
        """Drop the size history of a closed stream."""
        self._history.pop(sid, None)

    def stream_compresses(self, sid: int) -> bool:
        """False once a chunk of ``sid`` grew when compressed."""
        plain, packed = self._history.get(sid, (0, 0))
        return not plain < packed

    def frame(
        self,
        header_block: Buffer,
        payload: Buffer = b"",
        *,
        sid: Optional[int] = None,
        compress: bool = True,
    ) -> bytes:
        """Frame one chunk: ``header_block`` (``Name: value\\r\\n`` lines, no blank line) and
        ``payload``.  ``sid`` names the stream whose size history applies (data and stream
        open chunks); ``compress=False`` forces a plain chunk.  Either way the chunk carries
        ``R`` if it is the first after :meth:`reset`."""
        block = bytes(header_block)
        if (
            not block.endswith(b"\r\n")
            or block.startswith(b"\r\n")
            or b"\r\n\r\n" in block
        ):  # the same refusals as ChunkWriter.write_chunk (an empty block ends in no CRLF)
            raise LocalProtocolError(f"bad chunk header block: {block[:80]!r}")
        body = b"".join((block, b"\r\n", payload))
        if len(body) > MAX_BODY:
            raise LocalProtocolError(f"chunk body of {len(body)} bytes exceeds {MAX_BODY}")
        rst = b"R" if self._reset_pending else b""
        self._reset_pending = False
        if (
            compress
            and len(body) > MIN_COMPRESS
            and (sid is None or self.stream_compresses(sid))
            and not _is_uncompressible(block)
        ):
            packed = self._z.compress(body) + self._z.flush(zlib.Z_SYNC_FLUSH)
            if sid is not None:
                self._history[sid] = (len(body), len(packed))
            return b"%xZ%x%s\r\n" % (len(body), len(packed), rst) + packed
        return b"%x%s\r\n" % (len(body), rst) + body

    def frame_data(self, sid: int, payload: Buffer) -> bytes:
        """Frame a data chunk (``SID: n``) for stream ``sid``."""
        return self.frame(b"SID: %d\r\n" % sid, payload, sid=sid)
