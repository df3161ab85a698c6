"""The frame budget (kite.proto.framebudget) against pagekite.py's own chunk reader.

Simulated tunnels: kite's ChunkWriter corks random mixes of tiny control chunks, empty
data chunks, EOFs and data chunks up to 16256 bytes; the FrameBudget cuts them; and the
real ``pagekite.proto.selectables.ChunkParser.ProcessPageKiteData`` reads the wire the
way pagekite.py does - up to 50393 bytes per read on plain TCP, one TLS record per read,
at random moments and with stalls.  It raises BugFoundError("Too much data") for more than
150 chunks in one read, exactly as in the real process.
"""

from __future__ import annotations

import random

import pytest

from kite._fastpath_py import ChunkWriter, StreamSlot
from kite.proto import framebudget as fb

pytestmark = [pytest.mark.compat, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

PAGEKITE_READ = int(16256 * 3.1)  # pagekite.py's tunnel read size


@pytest.fixture
def reader_cls(pagekite_mod):
    from pagekite.proto.selectables import ChunkParser

    class Reader(ChunkParser):
        def __init__(self):
            ChunkParser.__init__(self)
            self.chunks = []
            self.pings = []

        def ProcessChunk(self, chunk):
            head = chunk.split("\r\n\r\n", 1)[0]
            if head.startswith("NOOP: 1\r\nPING: "):
                self.pings.append(head.split("PING: ", 1)[1])
            elif head == "NOOP: 1" and set(chunk[len(head) + 4:]) <= {"!"}:
                pass  # padding (or a bare NOOP): nothing for the stream
            else:
                self.chunks.append(chunk)
            return True

    return Reader


def _random_flush(rng, writer, slots, expected, tiny):
    """Cork a random burst of chunks into ``writer``; record their bodies in order.
    ``tiny``: only control chunks, EOFs and data chunks of at most 100 bytes."""
    kind = rng.random()
    n = rng.choice([1, 1, 2, 3, 5, 20, 60, 150, 400]) if kind < 0.7 else rng.randint(1, 4)
    for _ in range(n):
        slot = rng.choice(slots)
        r = rng.random()
        if r < 0.35:
            block = b"NOOP: 1\r\nSID: %d\r\nSKB: %d\r\n" % (slot.sid, rng.randint(0, 99999))
            writer.write_chunk(block)
            expected.append(block + b"\r\n")
        elif r < 0.5:
            block = b"SID: %d\r\nEOF: 1%s\r\n" % (slot.sid, rng.choice([b"R", b"W", b"WR"]))
            writer.write_chunk(block, b"Bye!")
            expected.append(block + b"\r\nBye!")
        elif r < 0.6:
            writer.write_data(slot, b"")  # the empty data chunk pagekite sends before EOF
            expected.append(b"SID: %d\r\n\r\n" % slot.sid)
        else:
            if tiny:
                size = rng.randint(1, 100)
            elif kind < 0.7:
                size = rng.choice([1, 7, 100, 1400, 16256])
            else:
                size = rng.randint(1, 16256)
            data = bytes([rng.randint(0, 255)]) * size
            writer.write_data(slot, data)
            expected.append(b"SID: %d\r\n\r\n" % slot.sid + data)
    return n


def _simulate(reader_cls, seed, *, tls, read_chance, stall_chance, steps=400, tiny=False,
              check_pieces=True):
    rng = random.Random(seed)
    budget = fb.FrameBudget(tls=tls)
    writer = ChunkWriter(max_payload=16256)
    slots = [StreamSlot(sid) for sid in range(1, 40)]
    reader = reader_cls()
    expected: list = []
    wire: list = []  # plain: bytes not read yet; TLS: records not read yet
    now = 0.0
    stalled_until = -1

    def write(pieces):
        for p in pieces:
            if tls and check_pieces:  # a piece is one TLS record: whole chunks, <= 100
                assert len(p) <= fb.TLS_RECORD or sum(1 for _ in fb.chunk_ends(p)) == 1
                assert sum(1 for _ in fb.chunk_ends(p)) <= fb.TLS_MAX_CHUNKS
            wire.append(p)

    def read_once():
        if not wire:
            return
        if tls:
            data = wire.pop(0)
        else:
            buf = b"".join(wire)
            data, rest = buf[:PAGEKITE_READ], buf[PAGEKITE_READ:]
            wire[:] = [rest] if rest else []
        reader.ProcessPageKiteData(data.decode("latin-1"))  # BugFoundError if > 150 chunks

    for step in range(steps):
        gap = rng.choice([0.0, 0.0, 0.0005, 0.003, 0.02, 0.3, 1.5])
        now += gap
        if gap >= fb.IDLE_RESET:  # kite's assumption: a second of quiet = all was read
            while wire:
                read_once()
        if rng.random() < stall_chance:
            stalled_until = step + rng.randint(5, 60)
        n = _random_flush(rng, writer, slots, expected, tiny)
        write(budget.split(writer.flush(), n, now, True))
        if step >= stalled_until and rng.random() < read_chance:
            for _ in range(rng.randint(1, 3)):
                read_once()
    while wire:
        read_once()
    got = [c.encode("latin-1") for c in reader.chunks]
    assert got == expected  # nothing lost, reordered or altered
    return budget


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tiny", [False, True], ids=["mixed", "tiny"])
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_pagekite_reader_never_overflows(reader_cls, seed, tls, tiny):
    _simulate(reader_cls, seed, tls=tls, read_chance=0.3, stall_chance=0.05, tiny=tiny)


@pytest.mark.parametrize("seed", range(3))
def test_plain_reader_that_hardly_reads_gets_padding_not_overflow(reader_cls, seed):
    budget = _simulate(reader_cls, 100 + seed, tls=False, read_chance=0.02, stall_chance=0.2,
                       tiny=True)
    assert budget.padded > 0


def test_bulk_data_and_sparse_chunks_need_no_padding():
    budget = fb.FrameBudget(tls=False)
    writer = ChunkWriter(max_payload=16256)
    slot = StreamSlot(1)
    now = 0.0
    for _ in range(200):  # bulk: 16 KiB chunks with an SKB now and then
        writer.write_data(slot, b"x" * 16256 * 4)
        writer.write_chunk(b"NOOP: 1\r\nSID: 1\r\nSKB: 1\r\n")
        budget.split(writer.flush(), 5, now, False)
        now += 0.001
    for _ in range(200):  # keepalives and keystrokes, a second or more apart
        now += 1.5
        writer.write_data(slot, b"k")
        writer.write_chunk(b"NOOP: 1\r\nSID: 1\r\nSKB: 2\r\n")
        budget.split(writer.flush(), 2, now, True)
    assert budget.padded == 0


def test_without_the_budget_pagekite_reader_overflows(reader_cls, pagekite_mod):
    """The simulation is sensitive: kite's plain corked writes crash pagekite.py's reader."""
    from pagekite.common import BugFoundError

    class NoBudget(fb.FrameBudget):
        def split(self, data, chunks, now, quiet):
            return [data]  # kite's corked write, uncut

    real = fb.FrameBudget
    fb.FrameBudget = NoBudget
    try:
        for tls in (False, True):
            with pytest.raises(BugFoundError, match="Too much data"):
                _simulate(reader_cls, 1, tls=tls, read_chance=0.3, stall_chance=0.05,
                          tiny=True, check_pieces=False)
    finally:
        fb.FrameBudget = real
