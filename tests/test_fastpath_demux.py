"""Demux: chunk framing, dispatch, errors and buffer loans, on both implementations.

Every framing test feeds its input in every way a tunnel can (h11's ``tr()`` idea): whole,
one byte at a time, with trailing bytes of a next chunk, and through ``get_buffer`` loans of
random and of 1-byte sizes.  The events must not depend on how the stream was cut.

The helpers here (``Recorder``, ``ZInflater``, ``frame``, ``zframe``, ``feed``) are also
used by the writer, golden and differential tests.
"""

import ctypes
import gc
import random
import zlib

import pytest

from kite.errors import CompressionError, FramingError, LocalProtocolError

# -- helpers ---------------------------------------------------------------------------------


def frame(body, suffix=b""):
    """A plain chunk: lower-case hex size line, then the body."""
    return b"%x%s\r\n" % (len(body), suffix) + body


def zframe(deflater, body, reset=False):
    """A ZChunk as pagekite.py writes it: compress + Z_SYNC_FLUSH (docs/protocol.md §4.4)."""
    data = deflater.compress(body) + deflater.flush(zlib.Z_SYNC_FLUSH)
    return b"%xZ%x%s\r\n" % (len(body), len(data), b"R" if reset else b"") + data


class ZInflater:
    """A small Inflater (the protocol of kite._fastpath.Inflater) over zlib, logging calls."""

    def __init__(self, log=None):
        self.log = log if log is not None else []
        self._d = zlib.decompressobj()

    def reset(self):
        self.log.append(("reset",))
        self._d = zlib.decompressobj()

    def inflate(self, data, ulen):
        self.log.append(("inflate", bytes(data), ulen))
        try:
            out = self._d.decompress(data)
        except zlib.error as exc:
            raise CompressionError(f"zlib: {exc}") from None
        if len(out) != ulen:
            raise CompressionError(f"inflated {len(out)} bytes, expected {ulen}")
        return out


class Recorder:
    """Collects every event of a Demux in order, as plain comparable tuples."""

    def __init__(self):
        self.events = []

    def on_chunk(self, headers, payload):
        assert type(headers) is list and type(payload) is bytes
        for name, value in headers:
            assert type(name) is str and type(value) is str
        self.events.append(("chunk", headers, payload))

    def on_corrupt_chunk(self, exc):
        self.events.append(("corrupt", type(exc).__name__, str(exc)))

    def sink_for(self, sid):
        def sink(view):
            assert type(view) is memoryview and view.readonly
            self.events.append(("data", sid, bytes(view)))

        return sink


def make(fastpath, sids=(), *, corrupt=False, inflater=None, **kwargs):
    """A Demux with a recorder and a sink for each of ``sids``."""
    rec = Recorder()
    if corrupt:
        kwargs["on_corrupt_chunk"] = rec.on_corrupt_chunk
    if inflater is not None:
        if inflater is True:
            inflater = ZInflater(rec.events)
        kwargs["inflater"] = inflater
    demux = fastpath.Demux(rec.on_chunk, **kwargs)
    for sid in sids:
        demux.attach(fastpath.StreamSlot(sid, rec.sink_for(sid)))
    return demux, rec


def pieces(data, mode, rng):
    """The cuts of ``data`` for a feeding mode."""
    if mode == "whole":
        return [data]
    if mode in ("bytewise", "buffer1"):
        return [data[i : i + 1] for i in range(len(data))]
    out, pos = [], 0
    while pos < len(data):
        n = rng.choice((1, 2, 3, 7, 16, 100, 1000, 5000, 70000))
        out.append(data[pos : pos + n])
        pos += n
    return out


def feed_piece(demux, piece, via_buffer, rng):
    """Feed one piece with feed_data, or copy it into get_buffer loans like the kernel."""
    if not via_buffer:
        demux.feed_data(piece)
        return
    pos = 0
    while True:
        view = demux.get_buffer(rng.choice((-1, 0, 1, 100, 65536)))
        assert len(view) >= 1 and not view.readonly
        n = min(len(view), len(piece) - pos)
        view[:n] = piece[pos : pos + n]
        demux.buffer_updated(n)
        pos += n
        if pos >= len(piece):
            return


MODES = ("whole", "bytewise", "random", "buffer", "buffer1")


def feed(demux, data, mode="whole", seed=0):
    rng = random.Random(seed)
    for piece in pieces(data, mode, rng):
        feed_piece(demux, piece, mode.startswith("buffer"), rng)


def tr(fastpath, data, expected, **kwargs):
    """Feed ``data`` every way; the events must be ``expected`` each time."""
    for mode in MODES:
        demux, rec = make(fastpath, **kwargs)
        feed(demux, data, mode)
        assert rec.events == expected, mode
        assert demux.buffered == 0
        assert demux.bytes_received == len(data)
    for trailing in (b"1", b"1c\r", b"1c\r\nSID: 1\r\n"):
        demux, rec = make(fastpath, **kwargs)
        demux.feed_data(data + trailing)
        assert rec.events == expected, trailing
        assert demux.buffered == len(trailing)
    return demux


def tr_error(fastpath, data, exc_type, message, expected=(), **kwargs):
    """Feed ``data`` every way: the events ``expected``, then ``exc_type(message)``; then the
    demux stays failed (the same error again, whatever is fed)."""
    for mode in MODES:
        demux, rec = make(fastpath, **kwargs)
        rng = random.Random(1)
        with pytest.raises(exc_type) as info:
            for piece in pieces(data, mode, rng):
                feed_piece(demux, piece, mode.startswith("buffer"), rng)
        assert str(info.value) == message, mode
        assert rec.events == list(expected), mode
        if exc_type is FramingError:
            with pytest.raises(FramingError) as again:
                demux.feed_data(b"")
            assert again.value is info.value
            view = demux.get_buffer(-1)
            view[:1] = b"1"
            with pytest.raises(FramingError) as again:
                demux.buffer_updated(1)
            assert again.value is info.value
            assert rec.events == list(expected)


# -- data chunks -----------------------------------------------------------------------------


def test_data_chunk_goes_to_its_sink(fastpath):
    data = frame(b"SID: 43\r\n\r\nhello") + frame(b"SID: 7\r\n\r\nworld!")
    tr(fastpath, data, [("data", 43, b"hello"), ("data", 7, b"world!")], sids=(7, 43))


def test_data_chunk_counters(fastpath):
    demux, rec = make(fastpath, sids=(43,))
    data = frame(b"SID: 43\r\n\r\nhello") + frame(b"SID: 43\r\n\r\n") + frame(b"NOOP: 1\r\n\r\n!")
    demux.feed_data(data)
    slot = demux.get_slot(43)
    assert slot.received == 5 and slot.sent == 0
    assert demux.chunks_received == 3
    assert demux.bytes_received == len(data)
    assert demux.buffered == 0


def test_empty_payload_data_chunk_calls_the_sink(fastpath):
    # pagekite.py sends one before every EOF: "b\r\nSID: 33\r\n\r\n" (protocol 5.2).
    tr(fastpath, b"b\r\nSID: 33\r\n\r\n", [("data", 33, b"")], sids=(33,))


def test_payload_may_contain_crlf_crlf(fastpath):
    body = b"SID: 1\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"
    tr(fastpath, frame(body), [("data", 1, body[10:])], sids=(1,))


def test_binary_payload_all_byte_values(fastpath):
    payload = bytes(range(256)) * 3
    tr(fastpath, frame(b"SID: 9\r\n\r\n" + payload), [("data", 9, payload)], sids=(9,))


@pytest.mark.parametrize(
    "header",
    [b"sid:5", b"Sid: 5", b"SID:5", b"SID:  5 \t", b"SID: 005", b"sID:\t5", b"SID: 0000000005"],
)
def test_non_canonical_data_header_is_data(fastpath, header):
    tr(fastpath, frame(header + b"\r\n\r\nxyz"), [("data", 5, b"xyz")], sids=(5,))


def test_sid_zero_and_largest_sid(fastpath):
    data = frame(b"SID: 0\r\n\r\na") + frame(b"SID: 2147483647\r\n\r\nb")
    tr(fastpath, data, [("data", 0, b"a"), ("data", 2147483647, b"b")], sids=(0, 2147483647))


@pytest.mark.parametrize(
    "header, value",
    [
        (b"SID: 2147483648", "2147483648"),  # above 2**31 - 1
        (b"SID: 12345678901", "12345678901"),  # 11 digits
        (b"SID: +5", "+5"),
        (b"SID: -5", "-5"),
        (b"SID: 5x", "5x"),
        (b"SID: 0x5", "0x5"),
        (b"SID: \xb5", "\xb5"),  # a latin-1 "digit"? no: ASCII digits only
        (b"SID:", ""),
    ],
)
def test_not_a_stream_id_goes_to_on_chunk(fastpath, header, value):
    name = header.split(b":")[0].decode()
    tr(fastpath, frame(header + b"\r\n\r\nxyz"), [("chunk", [(name, value)], b"xyz")], sids=(5,))


def test_unknown_sid_goes_to_on_chunk(fastpath):
    # The tunnel answers data for an unknown SID with EOF: 1WR (protocol 5.2).
    data = frame(b"SID: 7\r\n\r\nlate") + frame(b"SID: 7\r\n\r\n")
    tr(fastpath, data, [("chunk", [("SID", "7")], b"late"), ("chunk", [("SID", "7")], b"")],
       sids=(8,))


def test_slot_without_sink_goes_to_on_chunk(fastpath):
    demux, rec = make(fastpath)
    demux.attach(fastpath.StreamSlot(7))
    demux.feed_data(frame(b"SID: 7\r\n\r\nlate"))
    assert rec.events == [("chunk", [("SID", "7")], b"late")]
    assert demux.get_slot(7).received == 0


def test_sink_may_be_set_and_cleared_on_an_attached_slot(fastpath):
    demux, rec = make(fastpath)
    slot = fastpath.StreamSlot(7)
    demux.attach(slot)
    demux.feed_data(frame(b"SID: 7\r\n\r\na"))
    slot.sink = rec.sink_for(7)
    demux.feed_data(frame(b"SID: 7\r\n\r\nb"))
    slot.sink = None
    demux.feed_data(frame(b"SID: 7\r\n\r\nc"))
    assert rec.events == [
        ("chunk", [("SID", "7")], b"a"),
        ("data", 7, b"b"),
        ("chunk", [("SID", "7")], b"c"),
    ]


# -- control chunks --------------------------------------------------------------------------


def test_control_chunks(fastpath):
    data = (
        b"23\r\nNOOP: 1\r\nPING: 1795516026.4960\r\n\r\n!"
        b"1c\r\nNOOP: 1\r\nSID: 43\r\nSKB: 0\r\n\r\n"
        b"18\r\nSID: 43\r\nEOF: 1R\r\n\r\nBye!"
        b"19\r\nSID: 43\r\nEOF: 1WR\r\n\r\nBye!"
        + frame(b"NOOP: 1\r\nZRST: 1\r\n\r\n!")
    )
    tr(fastpath, data, [
        ("chunk", [("NOOP", "1"), ("PING", "1795516026.4960")], b"!"),
        ("chunk", [("NOOP", "1"), ("SID", "43"), ("SKB", "0")], b""),
        ("chunk", [("SID", "43"), ("EOF", "1R")], b"Bye!"),
        ("chunk", [("SID", "43"), ("EOF", "1WR")], b"Bye!"),
        ("chunk", [("NOOP", "1"), ("ZRST", "1")], b"!"),
    ], sids=(43,))


def test_stream_open_with_payload(fastpath):
    # The decoded "afZ8c" frame of docs/protocol.md §4.4.
    headers = (b"SID: 33\r\nProto: http\r\nHost: foo.testkite.local\r\nPort: 20080\r\n"
               b"RIP: 127.0.0.1\r\nRPort: 54886\r\n\r\n")
    payload = b"GET / HTTP/1.1\r\nHost: foo.testkite.local\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
    assert len(headers + payload) == 0xAF
    tr(fastpath, frame(headers + payload), [("chunk", [
        ("SID", "33"), ("Proto", "http"), ("Host", "foo.testkite.local"), ("Port", "20080"),
        ("RIP", "127.0.0.1"), ("RPort", "54886")], payload)])


def test_header_names_as_sent_values_stripped_latin1(fastpath):
    body = (b"X-PageKite: http:foo.example:abc::def\r\nnoop:1\r\n Spaced :  v  \t\r\n"
            b"Empty:\r\nX-\xe9: \xff\xfe\r\n:anonymous\r\n\r\npayload")
    tr(fastpath, frame(body), [("chunk", [
        ("X-PageKite", "http:foo.example:abc::def"), ("noop", "1"), (" Spaced ", "v"),
        ("Empty", ""), ("X-\xe9", "\xff\xfe"), ("", "anonymous")], b"payload")])


def test_data_header_with_extra_header_is_not_data(fastpath):
    body = b"SID: 5\r\nX: y\r\n\r\nabc"
    tr(fastpath, frame(body), [("chunk", [("SID", "5"), ("X", "y")], b"abc")], sids=(5,))


def test_mixed_stream_keeps_wire_order(fastpath):
    data = (frame(b"SID: 1\r\n\r\na") + frame(b"NOOP: 1\r\n\r\n!") + frame(b"SID: 2\r\n\r\nb")
            + frame(b"SID: 3\r\n\r\nc") + frame(b"sid: 1\r\n\r\nd"))
    tr(fastpath, data, [
        ("data", 1, b"a"), ("chunk", [("NOOP", "1")], b"!"), ("data", 2, b"b"),
        ("chunk", [("SID", "3")], b"c"), ("data", 1, b"d")], sids=(1, 2))


# -- size lines ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [b"f", b"0f", b"F", b"0000000f"])
def test_size_line_leading_zeros(fastpath, size):
    tr(fastpath, size + b"\r\nSID: 1\r\n\r\nabcde", [("data", 1, b"abcde")], sids=(1,))


def test_size_line_upper_and_lower_hex(fastpath):
    payload = bytes(range(256)) * 4 + b"ab"  # body 0x40c
    body = b"SID: 1\r\n\r\n" + payload[:0x402]
    assert len(body) == 0x40C
    data = b"40C\r\n" + body + b"40c\r\n" + body + b"000040C\r\n" + body
    tr(fastpath, data, [("data", 1, payload[:0x402])] * 3, sids=(1,))


def test_size_line_hex_letters(fastpath):
    body = b"NOOP: 1\r\n\r\n" + b"x" * (0xABCDE - 11)
    expected = [("chunk", [("NOOP", "1")], b"x" * (0xABCDE - 11))]
    for size in (b"abcde", b"ABCDE", b"aBcDe"):
        demux, rec = make(fastpath)
        feed(demux, size + b"\r\n" + body, "buffer")
        assert rec.events == expected


def test_reset_suffix_without_inflater_is_ignored(fastpath):
    tr(fastpath, frame(b"SID: 1\r\n\r\nab", b"R") + frame(b"NOOP: 1\r\n\r\n", b"R"),
       [("data", 1, b"ab"), ("chunk", [("NOOP", "1")], b"")], sids=(1,))


def test_reset_suffix_resets_the_inflater_before_the_chunk(fastpath):
    tr(fastpath, frame(b"SID: 1\r\n\r\nab", b"R") + frame(b"NOOP: 1\r\n\r\n", b"R"),
       [("reset",), ("data", 1, b"ab"), ("reset",), ("chunk", [("NOOP", "1")], b"")],
       sids=(1,), inflater=True)


def test_max_chunk_size_bounds_the_body(fastpath):
    ok = frame(b"SID: 1\r\n\r\n" + b"x" * 90)  # body 100
    tr(fastpath, ok, [("data", 1, b"x" * 90)], sids=(1,), max_chunk_size=100)
    tr_error(fastpath, frame(b"SID: 1\r\n\r\n" + b"x" * 91), FramingError,
             "chunk size over max_chunk_size=100: b'65'", sids=(1,), max_chunk_size=100)


def test_largest_default_chunk(fastpath):
    payload = b"y" * (fastpath.MAX_CHUNK_SIZE - 11)
    data = frame(b"SID: 12\r\n\r\n" + payload)
    demux, rec = make(fastpath, sids=(12,))
    feed(demux, data, "buffer")
    assert rec.events == [("data", 12, payload)]
    # The grown buffer is dropped once empty: the next loan is a small one again.
    assert len(demux.get_buffer(-1)) <= 1 << 16


# -- framing errors --------------------------------------------------------------------------


@pytest.mark.parametrize("line", [b"0", b"00000000", b"0R"])
def test_size_zero_is_fatal(fastpath, line):
    tr_error(fastpath, line + b"\r\nSID: 1\r\n\r\n", FramingError,
             f"chunk size 0 in size line: {line!r}")


@pytest.mark.parametrize("line", [b"0Z5", b"5Z0"])
def test_compressed_size_zero_is_fatal(fastpath, line):
    tr_error(fastpath, line + b"\r\nxxxxx", FramingError,
             f"chunk size 0 in size line: {line!r}", inflater=ZInflater())


@pytest.mark.parametrize(
    "line",
    [b"1g", b"GET / HTTP/1.1", b" 1c", b"1c ", b"0x1c", b"+1c", b"-1", b"", b"Z5", b"5Z",
     b"5RR", b"R", b"5z3", b"5r", b"1c\r", b"5R5", b"\x00", b"\xff1"],
)
def test_invalid_size_line(fastpath, line):
    tr_error(fastpath, line + b"\r\nSID: 1\r\n\r\nabc", FramingError,
             f"invalid chunk size line: {line!r}")


@pytest.mark.parametrize("line", [b"123456789", b"000000001", b"5Z123456789", b"123456789Z5R"])
def test_too_many_hex_digits(fastpath, line):
    tr_error(fastpath, line + b"\r\nabc", FramingError,
             f"too many hex digits in chunk size line: {line!r}")


@pytest.mark.parametrize("data", [b"1" * 19 + b"\r\n", b"x" * 20, b"12345678Z12345678RR\r\n",
                                  b"GET /a/rather/long/path HTTP/1.1\r\n"])
def test_size_line_too_long(fastpath, data):
    tr_error(fastpath, data, FramingError,
             f"chunk size line too long (no CRLF within 18 bytes): {data[:20]!r}")


def test_longest_valid_size_line_is_accepted_up_to_the_bound(fastpath):
    # 18 characters before CRLF is the longest size line: parsed, then bounded by size.
    tr_error(fastpath, b"12345678Z12345678R\r\n", FramingError,
             "chunk size over max_chunk_size=1048576: b'12345678Z12345678R'", inflater=ZInflater())


def test_a_short_prefix_waits(fastpath):
    for prefix in (b"", b"1", b"1c", b"1c\r", b"12345678Z1234567", b"1ZR", b"x" * 19):
        demux, rec = make(fastpath)
        demux.feed_data(prefix)
        assert demux.buffered == len(prefix) and rec.events == []


def test_oversized_chunk(fastpath):
    tr_error(fastpath, b"100001\r\n", FramingError,
             "chunk size over max_chunk_size=1048576: b'100001'")


def test_oversized_compressed_chunk(fastpath):
    for line in (b"100001Z10", b"10Z100001"):
        tr_error(fastpath, line + b"\r\n", FramingError,
                 f"chunk size over max_chunk_size=1048576: {line!r}", inflater=ZInflater())


def test_compressed_chunk_without_inflater(fastpath):
    tr_error(fastpath, frame(b"SID: 1\r\n\r\na") + b"10Z8\r\n", FramingError,
             "compressed chunk but no inflater: b'10Z8'", expected=[("data", 1, b"a")], sids=(1,))


def test_body_without_crlf_crlf(fastpath):
    tr_error(fastpath, frame(b"SID: 1\r\n\r\nok") + frame(b"SID: 1\r\nabc"), FramingError,
             "chunk body without CRLF CRLF: b'SID: 1\\r\\nabc'", expected=[("data", 1, b"ok")],
             sids=(1,))


def test_body_without_crlf_crlf_is_quoted_abbreviated(fastpath):
    body = b"NOOP: 1\r\n" + b"z" * 100
    tr_error(fastpath, frame(body), FramingError,
             f"chunk body without CRLF CRLF: {body[:64]!r}... (109 bytes)")


def test_header_line_without_colon(fastpath):
    tr_error(fastpath, frame(b"NOOP: 1\r\nSID 5\r\n\r\n!"), FramingError,
             "chunk header line without ':': b'SID 5'")


def test_empty_header_block(fastpath):
    tr_error(fastpath, frame(b"\r\n\r\npayload"), FramingError,
             "chunk header line without ':': b''")


def test_framing_error_after_good_chunks_keeps_their_events(fastpath):
    data = frame(b"SID: 1\r\n\r\na") + frame(b"NOOP: 1\r\n\r\n!") + b"zz\r\n"
    tr_error(fastpath, data, FramingError, "invalid chunk size line: b'zz'",
             expected=[("data", 1, b"a"), ("chunk", [("NOOP", "1")], b"!")], sids=(1,))


def test_failed_state_counters(fastpath):
    demux, rec = make(fastpath)
    with pytest.raises(FramingError):
        demux.feed_data(b"0\r\n")
    assert demux.bytes_received == 3 and demux.chunks_received == 0 and demux.buffered == 3
    with pytest.raises(FramingError):
        demux.feed_data(b"more")
    assert demux.bytes_received == 3


# -- exceptions from callbacks ---------------------------------------------------------------


class Boom(Exception):
    pass


def test_sink_exception_propagates_with_the_rest_buffered(fastpath):
    calls = []

    def sink(view):
        calls.append(bytes(view))
        if len(calls) == 2:
            raise Boom("sink failed")

    rec = Recorder()
    demux = fastpath.Demux(rec.on_chunk)
    slot = fastpath.StreamSlot(1, sink)
    demux.attach(slot)
    rest = frame(b"NOOP: 1\r\n\r\n!") + frame(b"SID: 1\r\n\r\nccc")
    data = frame(b"SID: 1\r\n\r\na") + frame(b"SID: 1\r\n\r\nbb") + rest
    with pytest.raises(Boom):
        demux.feed_data(data)
    assert calls == [b"a", b"bb"] and rec.events == []
    assert demux.chunks_received == 2 and slot.received == 3
    assert demux.buffered == len(rest)
    demux.feed_data(b"")
    assert calls == [b"a", b"bb", b"ccc"] and rec.events == [("chunk", [("NOOP", "1")], b"!")]
    assert demux.buffered == 0 and slot.received == 6 and demux.chunks_received == 4


def test_on_chunk_exception_propagates_from_buffer_updated(fastpath):
    seen = []

    def on_chunk(headers, payload):
        seen.append(payload)
        if payload == b"1":
            raise Boom("on_chunk failed")

    demux = fastpath.Demux(on_chunk)
    data = frame(b"NOOP: 1\r\n\r\n1") + frame(b"NOOP: 1\r\n\r\n2")
    view = demux.get_buffer(-1)
    view[: len(data)] = data
    with pytest.raises(Boom, match="on_chunk failed"):
        demux.buffer_updated(len(data))
    assert seen == [b"1"] and demux.buffered == len(data) // 2
    view = demux.get_buffer(-1)
    demux.buffer_updated(0)
    assert seen == [b"1", b"2"] and demux.buffered == 0


def test_callbacks_may_not_reenter_the_demux(fastpath):
    demux = fastpath.Demux(lambda h, p: None)
    errors = []

    def sink(view):
        for call in (lambda: demux.feed_data(b"x"), lambda: demux.get_buffer(-1),
                     lambda: demux.buffer_updated(0)):
            with pytest.raises(LocalProtocolError) as info:
                call()
            errors.append(str(info.value))

    demux.attach(fastpath.StreamSlot(1, sink))
    demux.feed_data(frame(b"SID: 1\r\n\r\nx"))
    assert errors == [
        "Demux.feed_data() called from inside a Demux callback",
        "Demux.get_buffer() called from inside a Demux callback",
        "Demux.buffer_updated() called from inside a Demux callback",
    ]


def test_callbacks_may_attach_and_detach(fastpath):
    rec = Recorder()

    def on_chunk(headers, payload):
        rec.on_chunk(headers, payload)
        if ("Proto", "raw") in headers:  # a stream opens: attach it
            demux.attach(fastpath.StreamSlot(5, sink))

    def sink(view):
        rec.events.append(("data", 5, bytes(view)))
        if bytes(view) == b"last":
            assert demux.detach(5) is not None

    demux = fastpath.Demux(on_chunk)
    data = (frame(b"SID: 5\r\nProto: raw\r\n\r\n") + frame(b"SID: 5\r\n\r\nfirst")
            + frame(b"SID: 5\r\n\r\nlast") + frame(b"SID: 5\r\n\r\nafter"))
    demux.feed_data(data)
    assert rec.events == [
        ("chunk", [("SID", "5"), ("Proto", "raw")], b""),
        ("data", 5, b"first"),
        ("data", 5, b"last"),
        ("chunk", [("SID", "5")], b"after"),
    ]


# -- streams ---------------------------------------------------------------------------------


def test_attach_detach_get_slot(fastpath):
    demux = fastpath.Demux(lambda h, p: None)
    a, b = fastpath.StreamSlot(3), fastpath.StreamSlot(3)
    assert demux.get_slot(3) is None and demux.detach(3) is None
    demux.attach(a)
    assert demux.get_slot(3) is a
    demux.attach(b)  # replaces
    assert demux.get_slot(3) is b
    assert demux.detach(3) is b
    assert demux.get_slot(3) is None and demux.detach(3) is None
    with pytest.raises(TypeError, match="slot must be a StreamSlot, not int"):
        demux.attach(3)


def test_sid_cache_follows_replacement(fastpath):
    rec = Recorder()
    demux = fastpath.Demux(rec.on_chunk)
    for sid in (1, 65, 129):  # same slot of a 64-entry cache
        demux.attach(fastpath.StreamSlot(sid, rec.sink_for(sid)))
    data = b"".join(frame(b"SID: %d\r\n\r\n%d" % (s, s)) for s in (1, 65, 129, 1, 65))
    demux.feed_data(data)
    demux.attach(fastpath.StreamSlot(65, rec.sink_for(-65)))
    demux.detach(1)
    demux.feed_data(data)
    assert rec.events == [("data", 1, b"1"), ("data", 65, b"65"), ("data", 129, b"129"),
                          ("data", 1, b"1"), ("data", 65, b"65"),
                          ("chunk", [("SID", "1")], b"1"), ("data", -65, b"65"),
                          ("data", 129, b"129"), ("chunk", [("SID", "1")], b"1"),
                          ("data", -65, b"65")]


def test_stream_slot(fastpath):
    slot = fastpath.StreamSlot(7)
    assert (slot.sid, slot.sink, slot.received, slot.sent) == (7, None, 0, 0)
    with pytest.raises(AttributeError):
        slot.sid = 8
    slot.received = 10
    slot.sent = 20
    slot.sink = print
    assert (slot.received, slot.sent, slot.sink) == (10, 20, print)
    assert repr(slot) == "<StreamSlot sid=7 received=10 sent=20>"
    assert fastpath.StreamSlot(2**31 - 1, sink=len).sink is len
    for bad in (-1, 2**31):
        with pytest.raises(ValueError) as info:
            fastpath.StreamSlot(bad)
        assert str(info.value) == f"sid {bad} out of range 0..2147483647"
    with pytest.raises(TypeError):
        fastpath.StreamSlot("1")


def test_demux_arguments(fastpath):
    for bad in (0, 2**24 + 1):
        with pytest.raises(ValueError) as info:
            fastpath.Demux(print, max_chunk_size=bad)
        assert str(info.value) == f"max_chunk_size must be 1..16777216, got {bad}"
    demux = fastpath.Demux(print, max_chunk_size=2**24)
    assert demux.chunks_received == 0 and demux.bytes_received == 0 and demux.buffered == 0
    for attr in ("chunks_received", "bytes_received", "buffered"):
        with pytest.raises(AttributeError):
            setattr(demux, attr, 1)
    demux.on_chunk = len
    demux.on_corrupt_chunk = len
    demux.inflater = None
    assert demux.on_chunk is len and demux.on_corrupt_chunk is len


def test_constants(fastpath):
    assert fastpath.MAX_SIZE_DIGITS == 8
    assert fastpath.MAX_CHUNK_SIZE == 1 << 20
    assert fastpath.MAX_DATA_PAYLOAD == 65536 - 32


# -- ZChunks ---------------------------------------------------------------------------------


def test_zchunks_real_zlib_stream(fastpath):
    deflater = zlib.compressobj(1)
    open_body = b"SID: 33\r\nProto: http\r\nHost: a.example\r\n\r\nGET / HTTP/1.1\r\n\r\n"
    data = (zframe(deflater, open_body) + frame(b"SID: 33\r\n\r\nplain")
            + zframe(deflater, b"SID: 33\r\n\r\n" + b"compressible " * 20)
            + zframe(deflater, b"NOOP: 1\r\nSID: 33\r\nSKB: 1\r\n\r\n"))
    expected = [
        ("chunk", [("SID", "33"), ("Proto", "http"), ("Host", "a.example")],
         b"GET / HTTP/1.1\r\n\r\n"),
        ("data", 33, b"plain"),
        ("data", 33, b"compressible " * 20),
        ("chunk", [("NOOP", "1"), ("SID", "33"), ("SKB", "1")], b""),
    ]
    for mode in MODES:
        inflater = ZInflater()
        demux, rec = make(fastpath, sids=(33,), inflater=inflater)
        feed(demux, data, mode)
        assert rec.events == expected, mode
        assert [c[0] for c in inflater.log] == ["inflate"] * 3
        assert demux.chunks_received == 4


def test_zchunk_with_reset(fastpath):
    d1 = zlib.compressobj(9)
    first = zframe(d1, b"SID: 1\r\n\r\none")
    d2 = zlib.compressobj(9)  # the sender reset its compressor: R on the next chunk
    second = zframe(d2, b"SID: 1\r\n\r\ntwo", reset=True) + zframe(d2, b"SID: 1\r\n\r\nthree")
    for mode in MODES:
        log = []
        demux, rec = make(fastpath, sids=(1,), inflater=ZInflater(log))
        feed(demux, first + second, mode)
        assert [e for e in rec.events if e[0] == "data"] == [
            ("data", 1, b"one"), ("data", 1, b"two"), ("data", 1, b"three")]
        assert [e[0] for e in log] == ["inflate", "reset", "inflate", "inflate"]


def test_corrupt_zchunk_calls_on_corrupt_chunk_and_goes_on(fastpath):
    deflater = zlib.compressobj(1)
    good = zframe(deflater, b"SID: 1\r\n\r\n" + b"a" * 50)
    bad = bytearray(zframe(zlib.compressobj(1), b"SID: 1\r\n\r\n" + b"b" * 50))
    bad[bad.index(b"\r\n") + 2] ^= 0xFF  # break the zlib header
    data = good + bytes(bad) + frame(b"SID: 1\r\n\r\nplain")
    demux, rec = make(fastpath, sids=(1,), corrupt=True)
    demux.inflater = ZInflater()
    feed(demux, data, "bytewise")
    assert rec.events[0] == ("data", 1, b"a" * 50)
    assert rec.events[1][:2] == ("corrupt", "CompressionError")
    assert rec.events[1][2].startswith("zlib: Error -3 while decompressing data")
    assert rec.events[2:] == [("data", 1, b"plain")]
    assert demux.chunks_received == 3


def test_corrupt_zchunk_without_handler_propagates_rest_buffered(fastpath):
    bad = b"10Z5R\r\nxxxxx"
    rest = frame(b"SID: 1\r\n\r\nplain")
    demux, rec = make(fastpath, sids=(1,), inflater=True)
    with pytest.raises(CompressionError, match="zlib: Error -3"):
        demux.feed_data(bad + rest)
    assert rec.events == [("reset",), ("inflate", b"xxxxx", 16)]
    assert demux.buffered == len(rest) and demux.chunks_received == 1
    demux.feed_data(b"")  # not failed: the tunnel answers ZRST and goes on
    assert rec.events[-1] == ("data", 1, b"plain")


def test_inflater_returning_the_wrong_length_is_a_compression_error(fastpath):
    class Liar:
        def reset(self):
            pass

        def inflate(self, data, ulen):
            return bytearray(b"SID: 1\r\n\r\n")  # 10 bytes, and not even bytes

    demux, rec = make(fastpath, sids=(1,), corrupt=True, inflater=Liar())
    demux.feed_data(b"10Z3\r\nabc" + b"bZ3\r\nabc")
    assert rec.events == [
        ("corrupt", "CompressionError", "inflated chunk has 10 bytes, its size line said 16"),
        ("corrupt", "CompressionError", "inflated chunk has 10 bytes, its size line said 11"),
    ]


def test_inflated_body_is_framed_like_a_plain_one(fastpath):
    deflater = zlib.compressobj(1)
    demux, rec = make(fastpath, inflater=True)
    with pytest.raises(FramingError) as info:
        demux.feed_data(zframe(deflater, b"SID 1\r\n\r\nabc"))
    assert str(info.value) == "chunk header line without ':': b'SID 1'"
    with pytest.raises(FramingError) as again:
        demux.feed_data(b"")
    assert again.value is info.value


def test_other_inflater_errors_propagate(fastpath):
    class Broken:
        def reset(self):
            pass

        def inflate(self, data, ulen):
            raise RuntimeError("bug in the inflater")

    demux, rec = make(fastpath, corrupt=True, inflater=Broken())
    with pytest.raises(RuntimeError, match="bug in the inflater"):
        demux.feed_data(b"10Z3\r\nabc" + frame(b"NOOP: 1\r\n\r\n"))
    assert rec.events == [] and demux.chunks_received == 1
    demux.feed_data(b"")
    assert rec.events == [("chunk", [("NOOP", "1")], b"")]


# -- buffer loans ----------------------------------------------------------------------------


def test_get_buffer_sizes(fastpath):
    demux = fastpath.Demux(print)
    for hint in (-1, 0):
        view = demux.get_buffer(hint)
        assert len(view) >= 16384 and not view.readonly
    assert len(demux.get_buffer(1)) >= 1
    assert len(demux.get_buffer(200000)) >= 200000
    assert len(demux.get_buffer(10**12)) >= 1  # clamped, not allocated


def test_loan_ends_at_buffer_updated_and_the_view_is_released(fastpath):
    demux, rec = make(fastpath, sids=(1,))
    view = demux.get_buffer(-1)
    data = frame(b"SID: 1\r\n\r\nhi")
    view[: len(data)] = data
    demux.buffer_updated(len(data))
    assert rec.events == [("data", 1, b"hi")]
    with pytest.raises(ValueError):
        view[0]
    with pytest.raises(ValueError):
        view[:1] = b"x"


def test_buffer_updated_without_loan(fastpath):
    demux = fastpath.Demux(print)
    with pytest.raises(LocalProtocolError) as info:
        demux.buffer_updated(0)
    assert str(info.value) == "Demux.buffer_updated() without a get_buffer() loan"
    demux.get_buffer(-1)
    demux.buffer_updated(0)
    with pytest.raises(LocalProtocolError):
        demux.buffer_updated(0)  # the loan ended


@pytest.mark.parametrize("delta", [-1, 1])
def test_buffer_updated_out_of_range_ends_the_loan(fastpath, delta):
    demux = fastpath.Demux(print)
    view = demux.get_buffer(-1)
    lent = len(view)
    n = -1 if delta < 0 else lent + 1
    with pytest.raises(LocalProtocolError) as info:
        demux.buffer_updated(n)
    assert str(info.value) == f"Demux.buffer_updated({n}): outside the lent 0..{lent} bytes"
    assert demux.bytes_received == 0
    with pytest.raises(ValueError):
        view[0]
    with pytest.raises(LocalProtocolError):
        demux.buffer_updated(0)


def test_new_loan_or_feed_data_cancels_the_old_loan(fastpath):
    demux, rec = make(fastpath, sids=(1,))
    first = demux.get_buffer(-1)
    first[:3] = b"zzz"  # never reported: discarded
    second = demux.get_buffer(-1)
    with pytest.raises(ValueError):
        first[0]
    data = frame(b"SID: 1\r\n\r\nok")
    demux.feed_data(data)
    with pytest.raises(ValueError):
        second[0]
    assert rec.events == [("data", 1, b"ok")] and demux.bytes_received == len(data)


def test_loan_under_an_export_like_uvloop(fastpath):
    # uvloop holds a Py_buffer export of the lent view until buffer_updated() returns, so
    # the view cannot be released there; it is released at the next loan instead.
    demux, rec = make(fastpath, sids=(1,))
    view = demux.get_buffer(-1)
    export = (ctypes.c_char * len(view)).from_buffer(view)
    data = frame(b"SID: 1\r\n\r\nuv")
    export[: len(data)] = data
    demux.buffer_updated(len(data))
    assert rec.events == [("data", 1, b"uv")]
    del export
    demux.get_buffer(-1)
    with pytest.raises(ValueError):
        view[0]


def test_sink_view_is_read_only_and_released_after_the_call(fastpath):
    kept = []

    def sink(view):
        assert view.readonly and bytes(view) == b"data"
        with pytest.raises(TypeError):
            view[0] = 0
        kept.append(view)

    demux = fastpath.Demux(print)
    demux.attach(fastpath.StreamSlot(1, sink))
    demux.feed_data(frame(b"SID: 1\r\n\r\ndata") + frame(b"sid:1\r\n\r\ndata"))
    assert len(kept) == 2
    for view in kept:
        with pytest.raises(ValueError):
            bytes(view)


def test_sink_keeping_a_slice_is_memory_safe(fastpath):
    # Against the rules, but it must not crash the process: the slice keeps its memory.
    kept = []
    demux = fastpath.Demux(print)
    demux.attach(fastpath.StreamSlot(1, lambda view: kept.append(view[1:])))
    for _ in range(3):
        feed(demux, frame(b"SID: 1\r\n\r\n" + b"q" * 300000), "buffer")
    gc.collect()
    for part in kept:
        assert len(bytes(part)) == 299999


def test_kept_slices_are_never_overwritten_and_are_accounted(fastpath):
    # What a transport does with a queued payload slice (kite.net.tunnel.Stream._write_local).
    kept = []
    demux = fastpath.Demux(print)
    demux.attach(fastpath.StreamSlot(1, lambda view: kept.append(view[:])))
    first = frame(b"SID: 1\r\n\r\n" + b"a" * 30000)
    demux.feed_data(first + frame(b"SID: 1\r\n\r\n" + b"b" * 20000)[:50])
    assert demux.capacity == 65536 and demux.buffered == 50 and demux.pinned == 0
    # Room for 60000 needs compaction; a kept slice covers the front, so the partial chunk
    # moves to a new buffer of the same size and the old one counts as pinned.
    view = demux.get_buffer(60000)
    view[:10] = b"x" * 10
    demux.buffer_updated(0)
    assert demux.capacity == 65536 and demux.buffered == 50
    assert demux.pinned == 65536
    assert bytes(kept[0]) == b"a" * 30000
    # Once the transport lets go, nothing is pinned; the old buffer is reused.
    kept.clear()
    gc.collect()
    assert demux.pinned == 0
    demux.feed_data(frame(b"SID: 1\r\n\r\n" + b"b" * 20000)[50:])
    assert [bytes(k) for k in kept] == [b"b" * 20000]
    # A fully parsed buffer is not rewound under a live slice either.
    demux.feed_data(frame(b"SID: 1\r\n\r\n" + b"c" * 100))
    assert bytes(kept[0]) == b"b" * 20000 and bytes(kept[1]) == b"c" * 100
    # Without kept slices the buffer is compacted in place as before.
    kept.clear()
    demux.get_buffer(60000)
    demux.buffer_updated(0)
    assert demux.pinned == 0 and demux.capacity == 65536


def test_sink_holding_an_export_is_tolerated(fastpath):
    # A PickleBuffer holds a buffer export of the view: view.release() raises BufferError,
    # which the demux tolerates (the view stays usable; its memory stays alive).
    import pickle

    exports = []

    def sink(view):
        exports.append(pickle.PickleBuffer(view))
        exports.append(memoryview(view))  # a second view of the same buffer

    demux = fastpath.Demux(print)
    demux.attach(fastpath.StreamSlot(1, sink))
    demux.feed_data(frame(b"SID: 1\r\n\r\nabc") * 3)
    feed(demux, frame(b"SID: 1\r\n\r\n" + b"w" * 200000), "buffer")  # the buffer grows
    # Contents of a kept view are unspecified (the buffer moved on); its memory is alive.
    assert len(bytes(exports[0].raw())) == 3 and len(exports) == 8
    del exports[:]
    gc.collect()


def test_internal_buffer_is_not_exportable(fastpath):
    demux = fastpath.Demux(print)
    view = demux.get_buffer(-1)
    if isinstance(view.obj, (bytes, bytearray)):
        return  # the twin lends a slice of a bytearray
    with pytest.raises(BufferError):
        memoryview(view.obj)


def test_feed_data_accepts_buffers(fastpath):
    data = frame(b"SID: 1\r\n\r\nabc")
    for buf in (data, bytearray(data), memoryview(data), memoryview(b"xx" + data)[2:]):
        demux, rec = make(fastpath, sids=(1,))
        demux.feed_data(buf)
        assert rec.events == [("data", 1, b"abc")]
    with pytest.raises(TypeError) as info:
        demux.feed_data("text")
    assert str(info.value) == "a bytes-like object is required, not 'str'"


def test_repr(fastpath):
    demux = fastpath.Demux(print)
    demux.feed_data(b"1c")
    assert repr(demux) == "<Demux ok chunks_received=0 bytes_received=2 buffered=2>"
    with pytest.raises(FramingError):
        demux.feed_data(b"x\r\n")
    assert repr(demux) == "<Demux failed chunks_received=0 bytes_received=5 buffered=5>"


# -- a real event loop -----------------------------------------------------------------------


def _loops():
    import asyncio

    loops = [("asyncio", asyncio.new_event_loop)]
    try:
        import uvloop
    except ImportError:
        pass
    else:
        loops.append(("uvloop", uvloop.new_event_loop))
    return loops


@pytest.mark.parametrize("loop_name, new_loop", _loops(), ids=[n for n, _ in _loops()])
def test_demux_and_writer_as_buffered_protocols(fastpath, loop_name, new_loop):
    """The Demux's get_buffer/buffer_updated and the writer's loans used as a real loop's
    BufferedProtocol methods (uvloop holds an export of the view during buffer_updated)."""
    import asyncio

    payloads = [bytes([i % 251]) * (i * 97 % 5000) for i in range(200)]
    out = fastpath.ChunkWriter()
    slot = fastpath.StreamSlot(9)
    for p in payloads:
        out.write_data(slot, p)
    out.write_chunk(b"NOOP: 1\r\n", b"!")
    stream = out.flush()

    async def main():
        loop = asyncio.get_running_loop()
        received = []
        tunnel_done = loop.create_future()
        demux = fastpath.Demux(lambda h, p: received.append(("chunk", h, p)))
        demux.attach(fastpath.StreamSlot(9, lambda view: received.append(bytes(view))))

        class TunnelSide(asyncio.BufferedProtocol):
            get_buffer = staticmethod(demux.get_buffer)

            def buffer_updated(self, nbytes):
                demux.buffer_updated(nbytes)
                if len(received) == len(payloads) + 1 and not tunnel_done.done():
                    tunnel_done.set_result(None)

        writer = fastpath.ChunkWriter()
        visitor_done = loop.create_future()

        class VisitorSide(asyncio.BufferedProtocol):
            """Reads a visitor's bytes straight into the writer's pending buffer."""

            def get_buffer(self, sizehint):
                return writer.get_data_buffer(slot, sizehint)

            def buffer_updated(self, nbytes):
                writer.data_buffer_updated(nbytes)

            def eof_received(self):
                writer.cancel_data_buffer()
                visitor_done.set_result(writer.flush())

        servers = [await loop.create_server(TunnelSide, "127.0.0.1", 0),
                   await loop.create_server(VisitorSide, "127.0.0.1", 0)]
        ports = [s.sockets[0].getsockname()[1] for s in servers]
        _, tunnel = await asyncio.open_connection("127.0.0.1", ports[0])
        _, visitor = await asyncio.open_connection("127.0.0.1", ports[1])
        for pos in range(0, len(stream), 7000):
            tunnel.write(stream[pos : pos + 7000])
            visitor.write(stream[pos : pos + 7000])  # any bytes will do
            await tunnel.drain()
            await visitor.drain()
        visitor.write_eof()
        await asyncio.wait_for(tunnel_done, 30)
        framed = await asyncio.wait_for(visitor_done, 30)
        for w in (tunnel, visitor):
            w.close()
        for server in servers:
            server.close()
            await server.wait_closed()
        return received, framed

    loop = new_loop()
    try:
        received, framed = loop.run_until_complete(main())
    finally:
        loop.close()
    assert received == payloads + [("chunk", [("NOOP", "1")], b"!")]
    rec = Recorder()
    demux = fastpath.Demux(rec.on_chunk)
    demux.attach(fastpath.StreamSlot(9, rec.sink_for(9)))
    demux.feed_data(framed)
    assert b"".join(e[2] for e in rec.events) == stream
