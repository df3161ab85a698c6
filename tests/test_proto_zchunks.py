"""kite.proto.zchunks: pagekite.py's ZChunks, both directions, bit for bit (§4.4)."""

import os
import random
import tracemalloc
import zlib

import pytest

from kite.errors import CompressionError, LocalProtocolError
from kite.proto.control import build_eof, build_ping, build_skb, build_stream_open
from kite.proto.zchunks import MAX_BODY, ZInflater
from wire import ZDeflater, build_data

REQUEST = b"GET / HTTP/1.1\r\nHost: foo.testkite.local\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
TEXT = b"<html><body>" + b"hello from the local backend server, " * 40 + b"</body></html>\n"


def split_frames(wire: bytes):
    """[(size_line, body_bytes_as_sent)] of a chunk stream."""
    out = []
    while wire:
        size, _, wire = wire.partition(b"\r\n")
        clen = int(size.rstrip(b"R").split(b"Z")[-1], 16)
        out.append((size, wire[:clen]))
        wire = wire[clen:]
    return out


def read_frames(wire: bytes, inflater: ZInflater):
    """Reassemble chunk bodies as the Demux does with an inflater."""
    bodies = []
    for size, data in split_frames(wire):
        if size.endswith(b"R"):
            inflater.reset()
            size = size[:-1]
        if b"Z" in size:
            ulen, _ = size.split(b"Z")
            bodies.append(inflater.inflate(data, int(ulen, 16)))
        else:
            bodies.append(data)
    return bodies


@pytest.fixture
def pk_chunks(pagekite_mod):
    from pagekite.proto import selectables

    def sender(level):
        parser = selectables.ChunkParser()
        parser.EnableZChunks(level=level)
        parser.wire = []
        parser.Send = lambda data, **_: parser.wire.append("".join(data).encode("latin-1")) or True
        return parser

    def receiver():
        parser = selectables.ChunkParser()
        parser.got = []
        parser.ProcessChunk = lambda chunk: parser.got.append(chunk.encode("latin-1")) or True
        parser.ProcessCorruptChunk = lambda chunk: parser.got.append("corrupt") or True
        return parser

    return sender, receiver


def traffic():
    """(header_block, payload, sid) chunks: data, stream opens, control."""
    rng = random.Random(7)
    noise = bytes(rng.getrandbits(8) for _ in range(300))
    chunks = [
        build_stream_open(33, "http", "foo.testkite.local", 20080, "127.0.0.1", 54886, payload=REQUEST)
        + (33,),
        build_skb(33, 0) + (None,),
        build_data(33, TEXT) + (33,),
        build_data(34, noise) + (34,),  # grows when compressed: sid 34 goes plain from now on
        build_data(34, TEXT) + (34,),
        build_data(33, b"x" * 30) + (33,),  # too small to compress
        build_data(33, b"") + (33,),
        build_eof(33, write_closed=False) + (None,),
        build_ping(1795516026.496) + (None,),
        build_data(35, TEXT * 3) + (35,),
    ]
    return chunks


@pytest.mark.parametrize("level", [1, 9])
def test_deflater_matches_pagekite_sender(pk_chunks, level):
    sender, _ = pk_chunks
    theirs = sender(level)
    ours = ZDeflater(level)
    zhistory = {}
    wire = []
    for block, payload, sid in traffic():
        body = (block + b"\r\n" + payload).decode("latin-1")
        control = block.startswith(b"NOOP") or b"EOF:" in block
        theirs.SendChunked(
            body, compress=not control, zhistory=None if sid is None else zhistory.setdefault(sid, [0, 0])
        )
        wire.append(ours.frame(block, payload, sid=sid))
    assert wire == theirs.wire
    sizes = [s for s, _ in split_frames(b"".join(wire))]
    assert sizes[0] == b"afZ%x" % len(split_frames(wire[0])[0][1])  # 175 bytes deflated
    assert [b"Z" in s for s in sizes] == [True, False, True, True, False, False, False, False, False, True]
    assert not ours.stream_compresses(34) and ours.stream_compresses(33)


def test_deflater_reset_marks_next_chunk(pk_chunks):
    sender, _ = pk_chunks
    theirs, ours = sender(1), ZDeflater(1)
    for reset_before in (None, "compressed", None, "plain", None):
        if reset_before:
            theirs.ResetZChunks()
            ours.reset()
        block, payload = build_data(1, TEXT) if reset_before != "plain" else build_skb(1, 5)
        compress = reset_before != "plain"
        theirs.SendChunked((block + b"\r\n" + payload).decode("latin-1"), compress=compress)
        assert ours.frame(block, payload) == theirs.wire[-1]
    sizes = [s for s, _ in split_frames(b"".join(theirs.wire))]
    assert [s.endswith(b"R") for s in sizes] == [False, True, False, True, False]
    assert sizes[1].startswith(b"%xZ" % len(build_data(1, TEXT)[0] + b"\r\n" + TEXT))


@pytest.mark.parametrize("level", [1, 9])
def test_inflater_reads_pagekite_sender(pk_chunks, level):
    sender, _ = pk_chunks
    theirs = sender(level)
    bodies = []
    for i, (block, payload, _sid) in enumerate(traffic() * 3):
        body = block + b"\r\n" + payload
        bodies.append(body)
        if i == 14:
            theirs.ResetZChunks()
        theirs.SendChunked(body.decode("latin-1"))
    assert read_frames(b"".join(theirs.wire), ZInflater()) == bodies


def test_pagekite_receiver_reads_our_deflater(pk_chunks):
    _, receiver = pk_chunks
    theirs, ours = receiver(), ZDeflater(1)
    bodies = []
    for i, (block, payload, sid) in enumerate(traffic() * 3):
        if i == 12:
            ours.reset()
        bodies.append(block + b"\r\n" + payload)
        wire = ours.frame(block, payload, sid=sid)
        # one byte, then the rest: pagekite buffers partial frames
        assert theirs.ProcessPageKiteData(wire[:1].decode("latin-1"))
        assert theirs.ProcessPageKiteData(wire[1:].decode("latin-1"))
    assert theirs.got == bodies


def test_inflater_refuses_bombs_without_allocating():
    bomb = zlib.compressobj(9)
    data = bomb.compress(b"\0" * (20 << 20)) + bomb.flush(zlib.Z_SYNC_FLUSH)
    assert len(data) < 30000
    inflater = ZInflater()
    tracemalloc.start()
    try:
        with pytest.raises(CompressionError, match="more than 100 bytes"):
            inflater.inflate(data, 100)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    with pytest.raises(CompressionError):
        ZInflater().inflate(data, MAX_BODY + 1)


def test_inflater_errors_and_reset():
    deflater = ZDeflater(1)
    frames = [split_frames(deflater.frame_data(1, TEXT + bytes([i])))[0] for i in range(3)]
    inflater = ZInflater()
    ulen = lambda size: int(size.split(b"Z")[0], 16)  # noqa: E731
    assert inflater.inflate(frames[0][1], ulen(frames[0][0])) == b"SID: 1\r\n\r\n" + TEXT + b"\0"
    with pytest.raises(CompressionError, match="inflated to .* not"):
        inflater.inflate(frames[1][1], ulen(frames[1][0]) + 1)
    with pytest.raises(CompressionError, match="before a reset"):  # out of step until reset()
        inflater.inflate(frames[2][1], ulen(frames[2][0]))
    inflater.reset()
    fresh = ZDeflater(1)
    size, data = split_frames(fresh.frame_data(2, TEXT))[0]
    assert inflater.inflate(data, ulen(size)).endswith(TEXT)
    with pytest.raises(CompressionError, match="cannot inflate") as info:
        ZInflater().inflate(b"\xff\xfe garbage", 10)
    assert "b'\\xff\\xfe garbage'" in str(info.value)
    with pytest.raises(CompressionError):
        ZInflater().inflate(os.urandom(64), 64)


def test_inflater_accepts_memoryview_and_empty():
    packed = zlib.compressobj(1)
    data = packed.compress(b"SID: 1\r\n\r\n") + packed.flush(zlib.Z_SYNC_FLUSH)
    inflater = ZInflater()
    assert inflater.inflate(memoryview(data), 10) == b"SID: 1\r\n\r\n"
    assert inflater.inflate(b"", 0) == b""


def test_deflater_rules():
    deflater = ZDeflater()
    # 64 bytes of body stay plain, 65 are compressed
    block = b"SID: 1\r\n"
    plain = deflater.frame(block, b"a" * (64 - 10), sid=1)
    assert plain.startswith(b"40\r\n")
    assert b"Z" in deflater.frame(block, b"a" * (65 - 10), sid=1).split(b"\r\n")[0]
    # NOOP and EOF never, whatever their size; compress=False forces plain
    for chunk in (build_skb(1, 10**30), (b"NOOP: 1\r\nX-PageKite: " + b"k" * 200 + b"\r\n", b"\r\n!"),
                  (b"SID: 1\r\neof: 1WR\r\nX-Pad: " + b"p" * 100 + b"\r\n", b"Bye!")):
        assert b"Z" not in deflater.frame(*chunk).split(b"\r\n")[0]
    assert b"Z" not in deflater.frame(block, TEXT, compress=False).split(b"\r\n")[0]
    # forget() gives a stream that grew another chance
    noise = os.urandom(200)
    deflater.frame(b"SID: 9\r\n", noise, sid=9)
    assert not deflater.stream_compresses(9)
    assert b"Z" not in deflater.frame(b"SID: 9\r\n", TEXT, sid=9).split(b"\r\n")[0]
    deflater.forget(9)
    assert b"Z" in deflater.frame(b"SID: 9\r\n", TEXT, sid=9).split(b"\r\n")[0]


@pytest.mark.parametrize("block", [b"", b"SID: 1", b"SID: 1\r\n\r\nEOF: 1\r\n", b"\r\nSID: 1\r\n"])
def test_deflater_refuses_bad_header_blocks(block):
    with pytest.raises(LocalProtocolError):
        ZDeflater().frame(block, b"x")


def test_deflater_bounds():
    with pytest.raises(LocalProtocolError):
        ZDeflater().frame(b"SID: 1\r\n", b"x" * MAX_BODY)
    with pytest.raises(LocalProtocolError):
        ZDeflater(level=10)


def test_through_fast_path_demux(pk_chunks):
    """pagekite.py-compressed chunks through the real Demux with our inflater."""
    fastpath = pytest.importorskip("kite.fastpath")
    sender, _ = pk_chunks
    theirs = sender(9)
    seen, corrupt = [], []
    demux = fastpath.Demux(lambda headers, payload: seen.append((headers, payload)),
                           inflater=ZInflater(), on_corrupt_chunk=corrupt.append)
    theirs.SendChunked((b"SID: 5\r\nProto: raw\r\nHost: a.example\r\n\r\n" + TEXT).decode("latin-1"))
    theirs.ResetZChunks()
    theirs.SendChunked((b"SID: 5\r\n\r\n" + TEXT).decode("latin-1"))
    for piece in theirs.wire:
        demux.feed_data(piece)
    assert [p for _, p in seen] == [TEXT, TEXT] and not corrupt
    assert seen[0][0][:2] == [("SID", "5"), ("Proto", "raw")]
    # a corrupt chunk is dropped and reported; the next R chunk starts afresh
    demux.feed_data(b"40Z10\r\n" + b"\x00" * 16)
    assert len(corrupt) == 1 and isinstance(corrupt[0], CompressionError)
    ours = ZDeflater(1)
    ours.reset()
    demux.feed_data(ours.frame(b"SID: 6\r\n", TEXT))
    assert seen[-1] == ([("SID", "6")], TEXT)
