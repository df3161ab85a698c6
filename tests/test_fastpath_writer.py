"""ChunkWriter: exact bytes, splitting, loans, flush ownership; and the round trip through
the Demux.  Every test runs on both implementations (the ``fastpath`` fixture)."""

import array
import ctypes
import random

import pytest

from kite.errors import LocalProtocolError
from test_fastpath_demux import MODES, Recorder, feed, frame


def data_chunk(sid, payload):
    return frame(b"SID: %d\r\n\r\n" % sid + payload)


# -- write_data ------------------------------------------------------------------------------


def test_write_data_exact_bytes(fastpath):
    w = fastpath.ChunkWriter()
    slot = fastpath.StreamSlot(43)
    w.write_data(slot, b"hello")
    assert w.pending == 20 and w.chunks_written == 1 and slot.sent == 5
    assert w.flush() == b"10\r\nSID: 43\r\n\r\nhello"
    assert w.pending == 0 and w.bytes_written == 20


def test_write_data_empty_frames_one_empty_chunk(fastpath):
    # The empty data chunk pagekite.py sends before EOF (protocol 5.2).
    w = fastpath.ChunkWriter()
    slot = fastpath.StreamSlot(33)
    w.write_data(slot, b"")
    assert w.flush() == b"b\r\nSID: 33\r\n\r\n"
    assert slot.sent == 0 and w.chunks_written == 1


def test_write_data_lower_case_hex(fastpath):
    w = fastpath.ChunkWriter()
    w.write_data(fastpath.StreamSlot(1), b"x" * 0xABC)
    out = w.flush()
    assert out.startswith(b"ac6\r\nSID: 1\r\n\r\n") and len(out) == 5 + 0xAC6


def test_write_data_sid_bounds(fastpath):
    w = fastpath.ChunkWriter()
    w.write_data(fastpath.StreamSlot(0), b"a")
    w.write_data(fastpath.StreamSlot(2**31 - 1), b"b")
    assert w.flush() == data_chunk(0, b"a") + data_chunk(2**31 - 1, b"b")


@pytest.mark.parametrize("max_payload, size", [(4, 10), (4, 8), (1, 3), (5, 5), (5, 6)])
def test_write_data_splits_at_max_payload(fastpath, max_payload, size):
    w = fastpath.ChunkWriter(max_payload=max_payload)
    slot = fastpath.StreamSlot(7)
    data = bytes(range(size))
    w.write_data(slot, data)
    pieces = [data[i : i + max_payload] for i in range(0, size, max_payload)]
    assert w.flush() == b"".join(data_chunk(7, p) for p in pieces)
    assert w.chunks_written == len(pieces) and slot.sent == size


def test_write_data_default_split(fastpath):
    w = fastpath.ChunkWriter()
    slot = fastpath.StreamSlot(5)
    data = bytes(range(256)) * 600  # 153600 bytes: 65504 + 65504 + 22592
    w.write_data(slot, data)
    out = w.flush()
    mp = fastpath.MAX_DATA_PAYLOAD
    assert out == data_chunk(5, data[:mp]) + data_chunk(5, data[mp : 2 * mp]) + data_chunk(
        5, data[2 * mp :]
    )
    assert out.startswith(b"ffea\r\n")  # 65504 + 10: a whole chunk stays below 64 KiB
    assert slot.sent == len(data) and w.chunks_written == 3


def test_write_data_accepts_buffers_and_copies(fastpath):
    w = fastpath.ChunkWriter()
    slot = fastpath.StreamSlot(1)
    ba = bytearray(b"abc")
    ints = array.array("I", [0x01020304])
    w.write_data(slot, ba)
    w.write_data(slot, memoryview(b"xxdefxx")[2:5])
    w.write_data(slot, ints)
    ba[:] = b"zzz"  # the writer made a copy
    assert w.flush() == data_chunk(1, b"abc") + data_chunk(1, b"def") + data_chunk(
        1, ints.tobytes()
    )
    assert slot.sent == 10


def test_write_data_argument_errors(fastpath):
    w = fastpath.ChunkWriter()
    with pytest.raises(TypeError) as info:
        w.write_data(fastpath.StreamSlot(1), "text")
    assert str(info.value) == "a bytes-like object is required, not 'str'"
    with pytest.raises(TypeError) as info:
        w.write_data(1, b"x")
    assert str(info.value) == "slot must be a StreamSlot, not int"
    assert w.pending == 0 and w.chunks_written == 0


# -- write_chunk / write_raw -----------------------------------------------------------------


def test_write_chunk_exact_bytes(fastpath):
    w = fastpath.ChunkWriter()
    w.write_chunk(b"NOOP: 1\r\nPING: 1795516026.4960\r\n", b"!")
    w.write_chunk(b"NOOP: 1\r\nSID: 43\r\nSKB: 0\r\n")
    w.write_chunk(bytearray(b"SID: 43\r\nEOF: 1R\r\n"), memoryview(b"Bye!"))
    # The frames docs/protocol.md §6 and §15 show, byte for byte.
    assert w.flush() == (
        b"23\r\nNOOP: 1\r\nPING: 1795516026.4960\r\n\r\n!"
        b"1c\r\nNOOP: 1\r\nSID: 43\r\nSKB: 0\r\n\r\n"
        b"18\r\nSID: 43\r\nEOF: 1R\r\n\r\nBye!"
    )
    assert w.chunks_written == 3


@pytest.mark.parametrize(
    "block, message",
    [
        (b"", "ChunkWriter.write_chunk(): empty header block"),
        (b"NOOP: 1", "ChunkWriter.write_chunk(): header block does not end in CRLF: b'NOOP: 1'"),
        (b"NOOP: 1\n", "ChunkWriter.write_chunk(): header block does not end in CRLF: b'NOOP: 1\\n'"),
        (b"\r\n", "ChunkWriter.write_chunk(): blank line in header block: b'\\r\\n'"),
        (b"\r\nNOOP: 1\r\n", "ChunkWriter.write_chunk(): blank line in header block: b'\\r\\nNOOP: 1\\r\\n'"),
        (
            b"NOOP: 1\r\n\r\nX: 1\r\n",
            "ChunkWriter.write_chunk(): blank line in header block: b'NOOP: 1\\r\\n\\r\\nX: 1\\r\\n'",
        ),
        (b"NOOP: 1\r\n\r\n", "ChunkWriter.write_chunk(): blank line in header block: b'NOOP: 1\\r\\n\\r\\n'"),
        (
            b"X: " + b"y" * 70 + b"\r\n\r\n",
            "ChunkWriter.write_chunk(): blank line in header block: b'X: " + "y" * 61 + "'... (77 bytes)",
        ),
    ],
)
def test_write_chunk_validation(fastpath, block, message):
    w = fastpath.ChunkWriter()
    with pytest.raises(LocalProtocolError) as info:
        w.write_chunk(block, b"!")
    assert str(info.value) == message
    assert w.pending == 0 and w.chunks_written == 0


def test_write_raw(fastpath):
    w = fastpath.ChunkWriter()
    w.write_raw(b"afZ8c\r\n" + bytes(140))
    w.write_raw(bytearray(b"x"))
    w.write_raw(b"")
    assert w.flush() == b"afZ8c\r\n" + bytes(140) + b"x"
    assert w.chunks_written == 0  # not framed by the writer


def test_writer_arguments(fastpath):
    for bad in (0, 2**20 + 1):
        with pytest.raises(ValueError) as info:
            fastpath.ChunkWriter(max_payload=bad)
        assert str(info.value) == f"max_payload must be 1..1048576, got {bad}"
    w = fastpath.ChunkWriter(max_payload=2**20)
    for attr in ("pending", "chunks_written", "bytes_written"):
        with pytest.raises(AttributeError):
            setattr(w, attr, 1)
    assert repr(w) == "<ChunkWriter pending=0 chunks_written=0 bytes_written=0>"


# -- get_data_buffer -------------------------------------------------------------------------


def test_get_data_buffer_zero_padded_header(fastpath):
    w = fastpath.ChunkWriter()
    slot = fastpath.StreamSlot(43)
    view = w.get_data_buffer(slot, -1)
    assert len(view) == fastpath.MAX_DATA_PAYLOAD and not view.readonly
    view[:5] = b"hello"
    w.data_buffer_updated(5)
    # Largest body of this loan: 11 + 65504 = 0xffeb, so 4 hex digits.
    assert w.flush() == b"0010\r\nSID: 43\r\n\r\nhello"
    assert slot.sent == 5 and w.chunks_written == 1


@pytest.mark.parametrize(
    "sizehint, max_payload, n, size_line",
    [
        (100, None, 5, b"10"),  # up to 111 = 0x6f: 2 digits
        (4, None, 4, b"f"),  # up to 15: 1 digit
        (0, 5, 5, b"10"),  # sizehint <= 0: max_payload
        (10**9, 300, 1, b"00c"),  # clamped to max_payload: up to 311 = 0x137
        (1, None, 1, b"c"),
    ],
)
def test_get_data_buffer_sizes(fastpath, sizehint, max_payload, n, size_line):
    kwargs = {} if max_payload is None else {"max_payload": max_payload}
    w = fastpath.ChunkWriter(**kwargs)
    slot = fastpath.StreamSlot(43)
    view = w.get_data_buffer(slot, sizehint)
    assert len(view) == (min(sizehint, max_payload or 65504) if sizehint > 0 else max_payload)
    view[:n] = b"x" * n
    w.data_buffer_updated(n)
    assert w.flush() == size_line + b"\r\nSID: 43\r\n\r\n" + b"x" * n


def test_get_data_buffer_zero_bytes_frames_nothing(fastpath):
    w = fastpath.ChunkWriter()
    slot = fastpath.StreamSlot(1)
    w.write_data(slot, b"a")
    view = w.get_data_buffer(slot, 100)
    view[:3] = b"xyz"
    w.data_buffer_updated(0)
    assert w.pending == 14 and w.chunks_written == 1 and slot.sent == 1
    assert w.flush() == data_chunk(1, b"a")


def test_get_data_buffer_between_other_chunks(fastpath):
    w = fastpath.ChunkWriter()
    a, b = fastpath.StreamSlot(1), fastpath.StreamSlot(22)
    w.write_data(a, b"first")
    view = w.get_data_buffer(b, 1000)
    view[:6] = b"second"
    w.data_buffer_updated(6)
    w.write_chunk(b"NOOP: 1\r\n", b"!")
    view = w.get_data_buffer(a, 0)
    view[:5] = b"third"
    w.data_buffer_updated(5)
    assert w.flush() == (data_chunk(1, b"first") + b"011\r\nSID: 22\r\n\r\nsecond"
                         + b"c\r\nNOOP: 1\r\n\r\n!" + b"000f\r\nSID: 1\r\n\r\nthird")
    assert (a.sent, b.sent, w.chunks_written) == (10, 6, 4)


def test_loan_refuses_other_operations(fastpath):
    w = fastpath.ChunkWriter()
    slot = fastpath.StreamSlot(1)
    w.get_data_buffer(slot, 10)
    for name, call in [
        ("write_data", lambda: w.write_data(slot, b"x")),
        ("write_chunk", lambda: w.write_chunk(b"NOOP: 1\r\n")),
        ("write_raw", lambda: w.write_raw(b"x")),
        ("flush", w.flush),
    ]:
        with pytest.raises(LocalProtocolError) as info:
            call()
        assert str(info.value) == f"ChunkWriter.{name}() while a get_data_buffer() loan is out"
    w.cancel_data_buffer()
    w.write_data(slot, b"x")
    assert w.flush() == data_chunk(1, b"x")


def test_new_loan_or_cancel_ends_the_old_loan_without_framing(fastpath):
    w = fastpath.ChunkWriter()
    slot = fastpath.StreamSlot(1)
    first = w.get_data_buffer(slot, 10)
    first[:2] = b"no"
    second = w.get_data_buffer(slot, 10)
    with pytest.raises(ValueError):
        first[0]
    second[:3] = b"yes"
    w.cancel_data_buffer()
    with pytest.raises(ValueError):
        second[0]
    w.cancel_data_buffer()  # no-op without a loan
    assert w.pending == 0 and w.flush() is None and slot.sent == 0 and w.chunks_written == 0


def test_loan_view_released_after_data_buffer_updated(fastpath):
    w = fastpath.ChunkWriter()
    view = w.get_data_buffer(fastpath.StreamSlot(1), 10)
    view[:1] = b"a"
    w.data_buffer_updated(1)
    with pytest.raises(ValueError):
        view[:1] = b"b"
    assert w.flush() == b"0b\r\nSID: 1\r\n\r\na"  # up to 20 = 0x14: 2 digits


def test_data_buffer_updated_errors(fastpath):
    w = fastpath.ChunkWriter()
    with pytest.raises(LocalProtocolError) as info:
        w.data_buffer_updated(0)
    assert str(info.value) == "ChunkWriter.data_buffer_updated() without a get_data_buffer() loan"
    slot = fastpath.StreamSlot(1)
    for n in (-1, 11):
        view = w.get_data_buffer(slot, 10)
        with pytest.raises(LocalProtocolError) as info:
            w.data_buffer_updated(n)
        assert str(info.value) == f"ChunkWriter.data_buffer_updated({n}): outside the lent 0..10 bytes"
        with pytest.raises(ValueError):
            view[0]  # the loan ended
    assert w.pending == 0 and slot.sent == 0
    with pytest.raises(TypeError) as info:
        w.get_data_buffer(None, 10)
    assert str(info.value) == "slot must be a StreamSlot, not NoneType"


def test_loan_under_an_export_like_uvloop(fastpath):
    # A visitor's BufferedProtocol reads into the loan under uvloop, which holds a buffer
    # export of the view until buffer_updated() returns: the release is retried later.
    w = fastpath.ChunkWriter()
    slot = fastpath.StreamSlot(1)
    view = w.get_data_buffer(slot, 100)
    export = (ctypes.c_char * len(view)).from_buffer(view)
    export[:4] = b"uvuv"
    w.data_buffer_updated(4)
    del export
    out = w.flush()
    assert out == b"0e\r\nSID: 1\r\n\r\nuvuv"
    with pytest.raises(ValueError):
        view[0]
    w.write_data(slot, b"after")
    assert out == b"0e\r\nSID: 1\r\n\r\nuvuv"
    assert w.flush() == data_chunk(1, b"after")


def test_loan_export_held_across_flush_does_not_touch_the_flushed_bytes(fastpath):
    w = fastpath.ChunkWriter()
    slot = fastpath.StreamSlot(1)
    view = w.get_data_buffer(slot, 8000)
    export = (ctypes.c_char * len(view)).from_buffer(view)
    export[:5000] = b"p" * 5000
    w.data_buffer_updated(5000)
    out = w.flush()  # the export still pins the loan's memory: flush must copy
    export[:5] = b"XXXXX"  # a misbehaving holder writes into its old view
    assert out == b"1392\r\nSID: 1\r\n\r\n" + b"p" * 5000
    del export


# -- flush -----------------------------------------------------------------------------------


def test_flush_empty_is_none(fastpath):
    w = fastpath.ChunkWriter()
    assert w.flush() is None
    assert w.bytes_written == 0


@pytest.mark.parametrize("size", [10, 3000, 5000, 70000, 300000])
def test_flush_hands_over_an_immutable_object(fastpath, size):
    w = fastpath.ChunkWriter()
    slot = fastpath.StreamSlot(3)
    payload = bytes(random.Random(size).randbytes(size))
    w.write_data(slot, payload)
    out = w.flush()
    assert type(out) is bytes
    expected = bytes(out)
    # Nothing the writer does later may change what it handed out.
    w.write_data(slot, b"z" * size)
    view = w.get_data_buffer(slot, -1)
    view[:] = b"q" * len(view)
    w.data_buffer_updated(len(view))
    w.write_raw(b"r" * 1000)
    second = w.flush()
    assert out == expected
    w.write_data(slot, b"more")
    third = w.flush()
    assert out == expected and second.endswith(b"r" * 1000)
    assert third == b"e\r\nSID: 3\r\n\r\nmore"
    assert w.bytes_written == len(out) + len(second) + len(third)


def test_flush_after_growth(fastpath):
    w = fastpath.ChunkWriter()
    slots = [fastpath.StreamSlot(i) for i in range(5)]
    expected = []
    for i in range(200):
        payload = bytes([i]) * (i * 37 % 3000)
        w.write_data(slots[i % 5], payload)
        expected.append(data_chunk(i % 5, payload))
    out = w.flush()
    assert out == b"".join(expected)
    assert w.bytes_written == len(out) and w.pending == 0


# -- round trip ------------------------------------------------------------------------------


def test_round_trip_through_the_demux(fastpath):
    w = fastpath.ChunkWriter(max_payload=1000)
    slots = {sid: fastpath.StreamSlot(sid) for sid in (1, 2, 99)}
    expected = []
    rng = random.Random(5)
    chunks = []
    for i in range(300):
        kind = rng.choice(("data", "data", "loan", "control", "empty"))
        sid = rng.choice((1, 2, 99))
        if kind == "data":
            payload = rng.randbytes(rng.choice((1, 10, 999, 1000, 1001, 2500)))
            w.write_data(slots[sid], payload)
            for off in range(0, len(payload), 1000):
                expected.append(("data", sid, payload[off : off + 1000]))
        elif kind == "empty":
            w.write_data(slots[sid], b"")
            expected.append(("data", sid, b""))
        elif kind == "loan":
            payload = rng.randbytes(rng.randrange(1, 1001))
            view = w.get_data_buffer(slots[sid], rng.choice((-1, 0, 1000, 5000, len(payload))))
            view[: len(payload)] = payload
            w.data_buffer_updated(len(payload))
            expected.append(("data", sid, payload))
        else:
            w.write_chunk(b"NOOP: 1\r\nSID: %d\r\nSKB: %d\r\n" % (sid, i), b"!")
            expected.append(("chunk", [("NOOP", "1"), ("SID", str(sid)), ("SKB", str(i))], b"!"))
        if rng.random() < 0.1:
            chunks.append(w.flush())
    chunks.append(w.flush())
    stream = b"".join(c for c in chunks if c)
    for mode in MODES:
        rec = Recorder()
        demux = fastpath.Demux(rec.on_chunk)
        for sid in (1, 2, 99):
            demux.attach(fastpath.StreamSlot(sid, rec.sink_for(sid)))
        feed(demux, stream, mode)
        assert rec.events == expected, mode
        assert demux.chunks_received == w.chunks_written
        assert {s: demux.get_slot(s).received for s in slots} == {
            s: slot.sent for s, slot in slots.items()
        }
