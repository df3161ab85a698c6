"""Differential tests: the compiled fast path and its twin, fed the same random input, must
produce exactly the same events, exceptions (type and message), loans and counters.

Hypothesis builds random chunk streams (data chunks for attached, sink-less and unknown
sids in canonical and odd spellings, control chunks, random header blocks, ZChunks from a
real deflater with resets, junk size lines, flipped bytes, truncations), cuts them at random
points and feeds both implementations through a random mix of ``feed_data`` and
``get_buffer``/``buffer_updated``, with sinks that sometimes raise.  A second test drives
both writers with random operations and compares every flushed byte.

Skipped when only the twin is available, unless KITE_REQUIRE_EXTENSIONS=1 (then it fails).
"""

import zlib

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fastpath_impls import NO_EXT, _load_impl
from test_fastpath_demux import ZInflater

SETTINGS = settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def impls():
    if NO_EXT:
        pytest.skip("KITE_NO_EXTENSIONS=1: only the pure-Python twin is in use")
    return _load_impl("c"), _load_impl("py")


# -- random chunk streams ----------------------------------------------------------------------

WITH_SINK = (1, 2, 65, 2**31 - 1)  # 1 and 65 share a slot of the compiled lookup cache
WITHOUT_SINK = (7,)  # attached, sink None
SIDS = WITH_SINK + WITHOUT_SINK + (0, 1000, 2**31)  # 0 and 1000 unknown, 2**31 not a sid

DATA_HEADERS = [b"SID: %d", b"sid:%d", b"Sid:  %d \t", b"SID: 00%d", b"SID:%d", b"SID: %d "]
CONTROL_BODIES = [
    b"NOOP: 1\r\nPING: 1795516026.4960\r\n\r\n!",
    b"NOOP: 1\r\nSID: 1\r\nSKB: 3\r\n\r\n",
    b"SID: 2\r\nEOF: 1WR\r\n\r\nBye!",
    b"SID: 65\r\nProto: raw\r\nHost: a.example\r\nPort: 22\r\nRIP: ::1\r\nRPort: 9\r\n\r\nhi",
    b"NOOP: 1\r\nZRST: 1\r\n\r\n!",
]
BAD_BODIES = [b"\r\n\r\nno headers", b"NOOP: 1\r\nno colon\r\n\r\n", b"SID: 1\r\nno blank line"]
header_name = st.sampled_from([b"SID", b"sid", b"NOOP", b"X-\xe9", b"", b" Host", b"EOF"])
header_value = st.binary(max_size=8).filter(lambda v: b"\r\n" not in v)

data_body = st.builds(
    lambda sid, header, payload: (header % sid) + b"\r\n\r\n" + payload,
    st.sampled_from(SIDS),
    st.sampled_from(DATA_HEADERS),
    st.binary(max_size=120) | st.sampled_from([b"", b"\r\n\r\n", b"x" * 400]),
)
random_headers_body = st.builds(
    lambda lines, payload: b"".join(lines) + b"\r\n" + payload,
    st.lists(
        st.builds(lambda n, sep, v: n + sep + v + b"\r\n", header_name,
                  st.sampled_from([b":", b": ", b":\t", b":", b": ", b""]), header_value),
        min_size=1, max_size=3,
    ),
    st.binary(max_size=20),
)
good_body = st.one_of(data_body, data_body, data_body, st.sampled_from(CONTROL_BODIES))
any_body = st.one_of(good_body, random_headers_body, st.sampled_from(BAD_BODIES))

size_style = st.sampled_from(["lower", "lower", "upper", "zeros"])
plain = st.tuples(st.just("plain"), good_body, size_style, st.booleans())  # (.., R suffix)
zchunk = st.tuples(st.just("z"), good_body, st.booleans(), st.just(False))  # (.., R, corrupt)
oddity = st.one_of(
    st.tuples(st.just("plain"), any_body, size_style, st.booleans()),
    st.tuples(st.just("z"), any_body, st.booleans(), st.booleans()),
    st.tuples(st.just("junk"), st.sampled_from(
        [b"0\r\n", b"zz\r\n", b"123456789\r\n", b"5Z\r\n", b"1ZR", b"x" * 25, b"\r\n"])
        | st.binary(max_size=24)),
)
good_item = st.one_of(plain, plain, zchunk)


def hex_size(n, style):
    text = b"%x" % n
    if style == "upper":
        return text.upper()
    if style == "zeros":
        return text.rjust(8, b"0")
    return text


def build_stream(items, level):
    out = []
    deflater = zlib.compressobj(level)
    for it in items:
        kind = it[0]
        if kind == "plain":
            _, b, style, reset = it
            out.append(hex_size(len(b), style) + (b"R" if reset else b"") + b"\r\n" + b)
        elif kind == "z":
            _, b, reset, corrupt = it
            if reset:
                deflater = zlib.compressobj(level)
            data = deflater.compress(b) + deflater.flush(zlib.Z_SYNC_FLUSH)
            if corrupt:
                data = bytes([data[0] ^ 0x55]) + data[1:]
            out.append(b"%xZ%x%s\r\n" % (len(b), len(data), b"R" if reset else b"") + data)
        else:
            out.append(it[1])
    return b"".join(out)


@st.composite
def demux_cases(draw):
    # Well-formed chunks, and at most two oddities at random places: a stream goes on for a
    # while before an oddity fails it (or is dropped as a corrupt ZChunk).
    n = draw(st.integers(1, 40))
    items = draw(st.lists(good_item, min_size=n, max_size=n))
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2]))):
        items.insert(len(items) - draw(st.integers(0, len(items))), draw(oddity))
    stream = bytearray(build_stream(items, draw(st.sampled_from([1, 9]))))
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 0, 1, 2]))):  # flipped bytes
        if stream:
            pos = draw(st.integers(0, len(stream) - 1))
            stream[pos] ^= draw(st.integers(1, 255))
    if stream and draw(st.sampled_from([False, False, True])):  # truncation
        del stream[draw(st.integers(0, len(stream) - 1)) :]
    plan = draw(st.lists(
        st.tuples(st.sampled_from(["feed", "buffer"]), st.integers(1, 300),
                  st.sampled_from([-1, 0, 1, 7, 100, 65200, 70000])),
        min_size=1, max_size=12))
    return {
        "stream": bytes(stream),
        "plan": plan,
        "raise_at": draw(st.sets(st.integers(0, 40), max_size=3)),
        "corrupt_handler": draw(st.booleans()),
        "inflater": draw(st.sampled_from([True] * 7 + [False])),
        "max_chunk_size": draw(st.sampled_from([1 << 20] * 14 + [64, 300])),
        # Sinks of these sids keep a slice of their view (as a transport queues one) for
        # this many steps: the demux must never overwrite it and must account for it.
        "keep": draw(st.sampled_from([(), (), (1,), (1, 2)])),
        "keep_steps": draw(st.integers(0, 6)),
    }


class Boom(Exception):
    pass


def run_demux(impl, case):
    """Everything observable about one run, as a list of plain values."""
    events = []
    calls = [0]

    def maybe_raise():
        calls[0] += 1
        if calls[0] in case["raise_at"]:
            raise Boom(f"callback {calls[0]}")

    kept = []  # [step when it goes, slice, its bytes when it was handed over]
    step = 0

    def sink_for(sid):
        def sink(view):
            events.append(("data", sid, bytes(view), view.readonly))
            if sid in case.get("keep", ()):
                piece = view[1:]
                kept.append([step + case["keep_steps"], piece, bytes(piece)])
            maybe_raise()
        return sink

    def check_kept(final=False):
        for entry in kept:
            assert bytes(entry[1]) == entry[2], "a kept slice was overwritten"
        if not final:
            kept[:] = [e for e in kept if e[0] > step]

    def on_chunk(headers, payload):
        events.append(("chunk", headers, payload))
        maybe_raise()

    def on_corrupt_chunk(exc):
        events.append(("corrupt", type(exc).__name__, str(exc)))
        maybe_raise()

    demux = impl.Demux(
        on_chunk,
        on_corrupt_chunk=on_corrupt_chunk if case["corrupt_handler"] else None,
        inflater=ZInflater(events) if case["inflater"] else None,
        max_chunk_size=case["max_chunk_size"],
    )
    slots = [impl.StreamSlot(sid, sink_for(sid)) for sid in WITH_SINK]
    slots += [impl.StreamSlot(sid) for sid in WITHOUT_SINK]
    for slot in slots:
        demux.attach(slot)

    def call(fn, *args):
        try:
            return fn(*args)
        except Exception as exc:
            events.append(("raise", type(exc).__name__, str(exc)))
            return None

    stream, pos = case["stream"], 0
    while pos < len(stream):
        mode, size, hint = case["plan"][step % len(case["plan"])]
        step += 1
        piece = stream[pos : pos + size]
        if mode == "feed":
            events.append(("feed", len(piece)))
            call(demux.feed_data, piece)
            pos += len(piece)
        else:
            view = demux.get_buffer(hint)
            n = min(len(view), len(piece))
            events.append(("loan", len(view), n))
            view[:n] = piece[:n]
            call(demux.buffer_updated, n)
            pos += n
        check_kept()
        events.append(("state", demux.buffered, demux.chunks_received, demux.bytes_received,
                       demux.capacity, demux.pinned))
    call(demux.feed_data, b"")  # whatever an exception left buffered
    check_kept(final=True)
    events.append(("end", demux.buffered, demux.chunks_received, demux.bytes_received,
                   [s.received for s in slots]))
    return events


#: Found by the test: after a ZChunk whose inflated body fails to parse, the twin kept the
#: parser's frames in the error it keeps, and their locals pinned the buffer (its next loan
#: was shorter than C's).
AFTER_A_FAILED_ZCHUNK = {'corrupt_handler': False,
     'inflater': True,
     'keep': (),
     'keep_steps': 0,
     'max_chunk_size': 1048576,
     'plan': [('buffer', 1, -1)],
     'raise_at': set(),
     'stream': b'aZ12\r\nx\x01\n\xf6t\xb1R0\xe4\xe5\xe2\xe5\x02\x00\x00\x00\xff\xff23Z23\r\n\xf2'
               b'\xf3\xf7\x0f\x003\x03<\xfd\xdc\x81\x0csKSSC3\x03#3=\x13K3\x03\x90\nE'
               b'\x00\x00\x00\x00\xff\xffA\r\nSID: 1\r\n\r\n19aZf\r\n\n\x86+\xae\x18\x05'
               b'\x83*\x04\x00\x00\x00\x00\xff\xff23\r\nNOOP: 1\r\nPING: 1795516026.4960\r\n\r\n!'
               b'23\r\nNOOP: 1\r\nPING: 1795516026.4960\r\n\r\n!a\r\nSID: 1\r\n\r\n23\r\nNOOP: 1\r'
               b'\nPING: 1795516026.4960\r\n\r\n!23\r\nNOOP: 1\r\nPING: 1795516026.4960\r\n\r\n!dZ'
               b'c\r\nB\xc4\xcc\x9f\x95\x12\x00\x00\x00\x00\xff\xff23Z9\r\n""&\x01\x00\x00\x00'
               b'\xff\xff23Z8\r\n"B\t\x00\x00\x00\xff\xff23Z8\r\n"B\t\x00\x00\x00\xff\xff1bZ13\r'
               b'\n\x82+\x81Y\x1f\xec\xedd\xa5`\x0cJ+\x00\x00\x00\x00\xff\xff23Zb\r\n\x82K'
               b'\xe1NM\x00\x00\x00\x00\xff\xff23Z8\r\n"B\t\x00\x00\x00\xff\xff23Z8\r\n"B\t'
               b'\x00\x00\x00\xff\xff23\r\nNOOP: 1\r\nPING: 1795516026.4960\r\n\r\n!aZa\r'
               b'\n\x82Y\xcd\xcb\x05\x00\x00\x00\xff\xffa\r\nSID: 1\r\n\r\n23Z8\r\n"B1\x00\x00\x00'
               b'\xff\xff23\r\nNOOP: 1\r\nPING: 1795516026.4960\r\n\r\n!23\r\nNOOP: 1\r\nPING: '
               b'1795516026.4960\r\n\r\n!aZ8\r\nB(\x06\x00\x00\x00\xff\xffa\r\nSID: 1\r\n\r\n17'
               b"Z10\r\n\x02\xb1\x90H\x90\x93'\xdf-<\x01\x00\x00\x00\xff\xffa\r\nSID: 1\r\n\r\n"}


@SETTINGS
@example(case=AFTER_A_FAILED_ZCHUNK)
@given(case=demux_cases())
def test_demux_differential(impls, case):
    c, py = impls
    assert run_demux(c, case) == run_demux(py, case)


def test_demux_differential_sees_errors(impls):
    """The generator does reach the interesting states (a guard against a vacuous test)."""
    case = {"stream": b"5\r\nSID: 1\r\n\r\nzz\r\n", "plan": [("buffer", 3, -1), ("feed", 2, 0)],
            "raise_at": {1}, "corrupt_handler": False, "inflater": False,
            "max_chunk_size": 1 << 20}
    c, py = impls
    events = run_demux(c, case)
    assert events == run_demux(py, case)
    kinds = [e[0] for e in events]
    assert "raise" in kinds and "loan" in kinds and "feed" in kinds


# -- random writer operations ------------------------------------------------------------------

BLOCKS = [b"NOOP: 1\r\n", b"NOOP: 1\r\nSID: 3\r\nSKB: 9\r\n", b"SID: 3\r\nEOF: 1WR\r\n",
          b"", b"NOOP: 1", b"\r\nNOOP: 1\r\n", b"A: 1\r\n\r\nB: 2\r\n"]
writer_op = st.one_of(
    st.tuples(st.just("data"), st.integers(0, 2), st.binary(max_size=300)
              | st.sampled_from([b"", b"y" * 2000])),
    st.tuples(st.just("chunk"), st.sampled_from(BLOCKS), st.binary(max_size=20)),
    st.tuples(st.just("raw"), st.binary(max_size=40)),
    st.tuples(st.just("loan"), st.integers(0, 2), st.sampled_from([-1, 0, 1, 5, 100, 10**6]),
              st.integers(-1, 400)),
    st.tuples(st.just("open"), st.integers(0, 2), st.sampled_from([-1, 3, 100])),
    st.tuples(st.just("cancel")),
    st.tuples(st.just("flush")),
)


def run_writer(impl, max_payload, ops):
    events = []
    w = impl.ChunkWriter(max_payload=max_payload)
    slots = [impl.StreamSlot(sid) for sid in (0, 43, 2**31 - 1)]
    pattern = bytes(range(256)) * 8

    def call(fn, *args):
        try:
            return fn(*args)
        except Exception as exc:
            events.append(("raise", type(exc).__name__, str(exc)))
            return None

    for op in ops:
        kind = op[0]
        if kind == "data":
            call(w.write_data, slots[op[1]], op[2])
        elif kind == "chunk":
            call(w.write_chunk, op[1], op[2])
        elif kind == "raw":
            call(w.write_raw, op[1])
        elif kind in ("loan", "open"):
            view = call(w.get_data_buffer, slots[op[1]], op[2])
            if view is not None:
                events.append(("loan", len(view)))
                if kind == "loan":
                    n = op[3]
                    k = max(0, min(n, len(view)))
                    view[:k] = pattern[:k]
                    call(w.data_buffer_updated, n)
        elif kind == "cancel":
            w.cancel_data_buffer()
        else:
            events.append(("flush", call(w.flush)))
        events.append(("state", w.pending, w.chunks_written, w.bytes_written))
    w.cancel_data_buffer()
    events.append(("final", w.flush(), w.bytes_written, [s.sent for s in slots]))
    return events


@SETTINGS
@given(max_payload=st.sampled_from([1, 7, 100, 65504]),
       ops=st.lists(writer_op, min_size=1, max_size=30))
def test_writer_differential(impls, max_payload, ops):
    c, py = impls
    assert run_writer(c, max_payload, ops) == run_writer(py, max_payload, ops)
