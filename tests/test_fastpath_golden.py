"""Golden vectors: interop of the fast path with the real pagekite.py 1.5.2.

* Frames our ChunkWriter produces are parsed by pagekite.py's own chunk parser
  (``pagekite.proto.selectables.ChunkParser.ProcessPageKiteData``, which works on latin-1
  ``str``) and its header parser (``HttpLineParser``, as ``Tunnel.ProcessChunk`` uses it).
* Frames captured from pagekite.py on the wire (docs/protocol.md §5, §6 and §15,
  bytes copied exactly) are parsed by our Demux into the right events.
"""

import zlib

import pytest

from test_fastpath_demux import MODES, Recorder, ZInflater, feed, make, zframe

pytestmark = pytest.mark.compat


# -- pagekite.py's parser --------------------------------------------------------------------


def pagekite_parse(pagekite_mod, stream, piece=1024):
    """Feed ``stream`` to pagekite.py's ChunkParser; return (chunks, corrupt chunks)."""
    from pagekite.proto.selectables import ChunkParser

    class Collector(ChunkParser):
        def __init__(self):
            # Selectable.__init__ opens a socket; set only what ProcessPageKiteData reads.
            self.want_cbytes = self.want_bytes = 0
            self.compressed = False
            self.header = self.chunk = ""
            self.zr = None
            self.peeking = self.read_eof = self.use_websocket = False
            self.chunks, self.corrupt, self.errors = [], [], []

        def ProcessChunk(self, chunk):
            self.chunks.append(chunk)
            return True

        def ProcessCorruptChunk(self, chunk):
            self.corrupt.append(chunk)
            return True

        def LogError(self, msg, params=None):
            self.errors.append(msg)

        def Log(self, values):
            pass

    parser = Collector()
    text = stream.decode("latin-1")
    # Pieces: pagekite.py refuses more than 150 chunks per read ("Too much data").
    for pos in range(0, len(text), piece):
        assert parser.ProcessPageKiteData(text[pos : pos + piece]) is True, parser.errors
    assert parser.errors == [] and parser.want_bytes == 0 and parser.header == ""
    return parser.chunks, parser.corrupt


def pagekite_headers(chunk):
    """Split a chunk body as pagekite.py's Tunnel.ProcessChunk does."""
    from pagekite.proto.parsers import HttpLineParser

    headers, data = chunk.split("\r\n\r\n", 1)
    parse = HttpLineParser(lines=headers.splitlines(), state=HttpLineParser.IN_HEADERS)
    return parse, data


# -- our frames, pagekite.py's parser --------------------------------------------------------


def test_writer_frames_parse_in_pagekite(fastpath, pagekite_mod):
    w = fastpath.ChunkWriter(max_payload=4000)
    a, b = fastpath.StreamSlot(33), fastpath.StreamSlot(2**31 - 1)
    binary = bytes(range(256)) * 40  # 10240 bytes: split into 4000 + 4000 + 2240
    w.write_data(a, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    w.write_data(b, binary)
    w.write_data(a, b"")
    w.write_chunk(b"NOOP: 1\r\nSID: 33\r\nSKB: 0\r\n")
    w.write_chunk(b"NOOP: 1\r\nPING: 1795516026.4960\r\n", b"!")
    w.write_chunk(b"SID: 33\r\nEOF: 1WR\r\n", b"Bye!")
    chunks, corrupt = pagekite_parse(pagekite_mod, w.flush())
    assert corrupt == []
    payloads = [
        (33, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        (2**31 - 1, binary[:4000]),
        (2**31 - 1, binary[4000:8000]),
        (2**31 - 1, binary[8000:]),
        (33, b""),
    ]
    for chunk, (sid, payload) in zip(chunks[: len(payloads)], payloads, strict=True):
        parse, data = pagekite_headers(chunk)
        assert parse.Header("SID") == [str(sid)] and parse.headers == [("sid", str(sid))]
        assert data.encode("latin-1") == payload
    controls = [pagekite_headers(c) for c in chunks[len(payloads) :]]
    assert [(p.headers, d) for p, d in controls] == [
        ([("noop", "1"), ("sid", "33"), ("skb", "0")], ""),
        ([("noop", "1"), ("ping", "1795516026.4960")], "!"),
        ([("sid", "33"), ("eof", "1WR")], "Bye!"),
    ]


@pytest.mark.parametrize("max_payload, sizehint", [(65504, -1), (100, 0), (2**20, -1), (4000, 3)])
def test_zero_padded_sizes_parse_in_pagekite(fastpath, pagekite_mod, max_payload, sizehint):
    w = fastpath.ChunkWriter(max_payload=max_payload)
    slot = fastpath.StreamSlot(7)
    payloads = [b"a", b"bc", bytes(range(256)), b"x" * 300]
    sent = []
    for payload in payloads:
        view = w.get_data_buffer(slot, sizehint)
        n = min(len(view), len(payload))
        view[:n] = payload[:n]
        w.data_buffer_updated(n)
        sent.append(payload[:n])
    out = w.flush()
    assert out.startswith(b"0") or sizehint == 3  # zero-padded: int(x, 16) reads it
    chunks, corrupt = pagekite_parse(pagekite_mod, out)
    assert corrupt == [] and len(chunks) == len(payloads)
    for chunk, payload in zip(chunks, sent, strict=True):
        parse, data = pagekite_headers(chunk)
        assert parse.Header("SID") == ["7"]
        assert data.encode("latin-1") == payload


def test_zchunks_parse_in_pagekite_and_in_our_demux(fastpath, pagekite_mod):
    # ZChunks are framed by kite.proto.zchunks and go out with write_raw.
    deflater = zlib.compressobj(1)
    bodies = [
        b"SID: 33\r\nProto: http\r\nHost: foo.testkite.local\r\nPort: 20080\r\n"
        b"RIP: 127.0.0.1\r\nRPort: 54886\r\n\r\nGET / HTTP/1.1\r\nHost: foo.testkite.local\r\n"
        b"User-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n",
        b"SID: 33\r\n\r\n" + b"hello, compressible world. " * 10,
    ]
    assert len(bodies[0]) == 0xAF  # the "afZ8c" frame of docs/protocol.md §4.4
    w = fastpath.ChunkWriter()
    w.write_raw(zframe(deflater, bodies[0]))
    w.write_data(fastpath.StreamSlot(33), b"plain")
    w.write_raw(zframe(deflater, bodies[1]))
    w.write_raw(zframe(zlib.compressobj(9), bodies[1], reset=True))
    stream = w.flush()
    assert stream.startswith(b"afZ")
    chunks, corrupt = pagekite_parse(pagekite_mod, stream, piece=50)
    assert corrupt == []
    assert [c.encode("latin-1") for c in chunks] == [
        bodies[0], b"SID: 33\r\n\r\nplain", bodies[1], bodies[1]]
    for mode in MODES:
        demux, rec = make(fastpath, sids=(33,), inflater=ZInflater())
        feed(demux, stream, mode)
        assert rec.events == [
            ("chunk", [("SID", "33"), ("Proto", "http"), ("Host", "foo.testkite.local"),
                       ("Port", "20080"), ("RIP", "127.0.0.1"), ("RPort", "54886")],
             bodies[0][bodies[0].index(b"\r\n\r\n") + 4 :]),
            ("data", 33, b"plain"),
            ("data", 33, bodies[1][11:]),
            ("data", 33, bodies[1][11:]),
        ]


# -- pagekite.py's frames, our parser --------------------------------------------------------

# docs/protocol.md §15.3: FE->BE end of stream, four frames in one TCP segment (hex dump).
FOUR_FRAMES = bytes.fromhex(
    "32 33 0d 0a 53 49 44 3a 20 34 33 0d 0a 0d 0a 17"
    "03 03 00 13 91 c9 4f f3 b3 06 ed b3 1e 65 18 46"
    "19 4c 02 4e 11 6a 03 62 0d 0a 53 49 44 3a 20 34"
    "33 0d 0a 0d 0a 31 38 0d 0a 53 49 44 3a 20 34 33"
    "0d 0a 45 4f 46 3a 20 31 52 0d 0a 0d 0a 42 79 65"
    "21 31 39 0d 0a 53 49 44 3a 20 34 33 0d 0a 45 4f"
    "46 3a 20 31 57 52 0d 0a 0d 0a 42 79 65 21"
)
TLS_RECORD = bytes.fromhex("17 03 03 00 13 91 c9 4f f3 b3 06 ed b3 1e 65 18 46 19 4c 02 4e 11 6a 03")

# docs/protocol.md §15.3: FE->BE stream open for the https kite (hex dump).
HTTPS_OPEN = bytes.fromhex(
    "35 63 0d 0a 53 49 44 3a 20 34 33 0d 0a 50 72 6f"
    "74 6f 3a 20 68 74 74 70 73 0d 0a 48 6f 73 74 3a"
    "20 66 6f 6f 2e 74 65 73 74 6b 69 74 65 2e 6c 6f"
    "63 61 6c 0d 0a 50 6f 72 74 3a 20 34 34 33 0d 0a"
    "52 49 50 3a 20 31 32 37 2e 30 2e 30 2e 31 0d 0a"
    "52 50 6f 72 74 3a 20 34 35 39 32 30 0d 0a 0d 0a"
)

GOLDEN = [
    pytest.param(
        b"1c\r\nNOOP: 1\r\nSID: 43\r\nSKB: 0\r\n\r\n",  # 5.5 / 15.3 flow ack
        [("chunk", [("NOOP", "1"), ("SID", "43"), ("SKB", "0")], b"")],
        id="skb",
    ),
    pytest.param(
        b"18\r\nSID: 43\r\nEOF: 1R\r\n\r\nBye!",  # 5.3 half close
        [("chunk", [("SID", "43"), ("EOF", "1R")], b"Bye!")],
        id="eof-r",
    ),
    pytest.param(
        b"23\r\nNOOP: 1\r\nPING: 1795516026.4960\r\n\r\n!"  # 6 keepalive
        b"23\r\nNOOP: 1\r\nPONG: 1795516026.4960\r\n\r\n!",
        [("chunk", [("NOOP", "1"), ("PING", "1795516026.4960")], b"!"),
         ("chunk", [("NOOP", "1"), ("PONG", "1795516026.4960")], b"!")],
        id="ping-pong",
    ),
    pytest.param(
        FOUR_FRAMES,
        [("data", 43, TLS_RECORD), ("data", 43, b""),
         ("chunk", [("SID", "43"), ("EOF", "1R")], b"Bye!"),
         ("chunk", [("SID", "43"), ("EOF", "1WR")], b"Bye!")],
        id="four-frames-one-segment",
    ),
    pytest.param(
        HTTPS_OPEN,
        [("chunk", [("SID", "43"), ("Proto", "https"), ("Host", "foo.testkite.local"),
                    ("Port", "443"), ("RIP", "127.0.0.1"), ("RPort", "45920")], b"")],
        id="https-open-empty-payload",
    ),
    pytest.param(
        b"59\r\nSID: 45\r\nProto: raw\r\nHost: foo.testkite.local\r\nPort: 22\r\n"  # 5.1
        b"RIP: 127.0.0.1\r\nRPort: 45930\r\n\r\n"
        b"2e\r\nSID: 45\r\n\r\nSSH-2.0-FakeSSH_for_pagekite_test\r\n"  # 15.3 raw stream
        b"1b\r\nSID: 45\r\n\r\nSSH-2.0-client\r\n"
        b"20\r\nSID: 45\r\n\r\nECHO:SSH-2.0-CLIENT\r\n",
        [("chunk", [("SID", "45"), ("Proto", "raw"), ("Host", "foo.testkite.local"),
                    ("Port", "22"), ("RIP", "127.0.0.1"), ("RPort", "45930")], b""),
         ("data", 45, b"SSH-2.0-FakeSSH_for_pagekite_test\r\n"),
         ("data", 45, b"SSH-2.0-client\r\n"),
         ("data", 45, b"ECHO:SSH-2.0-CLIENT\r\n")],
        id="raw-stream",
    ),
    pytest.param(
        b"2f\r\nSID: 33\r\n\r\nhello from the local backend server\n"  # 15.2 end of an HTTP stream
        b"b\r\nSID: 33\r\n\r\n"
        b"18\r\nSID: 33\r\nEOF: 1R\r\n\r\nBye!"
        b"19\r\nSID: 33\r\nEOF: 1WR\r\n\r\nBye!",
        [("data", 33, b"hello from the local backend server\n"), ("data", 33, b""),
         ("chunk", [("SID", "33"), ("EOF", "1R")], b"Bye!"),
         ("chunk", [("SID", "33"), ("EOF", "1WR")], b"Bye!")],
        id="http-stream-end",
    ),
]


@pytest.mark.parametrize("wire, expected", GOLDEN)
def test_captured_frames_parse_in_our_demux(fastpath, wire, expected):
    for mode in MODES:
        demux, rec = make(fastpath, sids=(33, 43, 45))
        feed(demux, wire, mode)
        assert rec.events == expected, mode
        assert demux.buffered == 0 and demux.chunks_received == len(expected)


@pytest.mark.parametrize("wire, expected", GOLDEN)
def test_captured_frames_parse_in_pagekite(pagekite_mod, wire, expected):
    """The captures are self-consistent: pagekite.py's parser splits them the same way."""
    chunks, corrupt = pagekite_parse(pagekite_mod, wire)
    assert corrupt == [] and len(chunks) == len(expected)
    for chunk, event in zip(chunks, expected, strict=True):
        parse, data = pagekite_headers(chunk)
        if event[0] == "data":
            assert parse.Header("SID") == [str(event[1])] and data.encode("latin-1") == event[2]
        else:
            assert [(n, v.strip()) for n, v in parse.headers] == [
                (n.lower(), v) for n, v in event[1]]
            assert data.encode("latin-1") == event[2]


def test_pagekite_parser_agrees_with_ours_on_a_mixed_stream(fastpath, pagekite_mod):
    """The same bytes through both parsers: same chunks, same payloads."""
    w = fastpath.ChunkWriter(max_payload=300)
    slots = [fastpath.StreamSlot(s) for s in (1, 20, 300)]
    for i in range(60):
        w.write_data(slots[i % 3], bytes([i]) * (i * 13 % 700))
        if i % 7 == 0:
            w.write_chunk(b"NOOP: 1\r\nSID: %d\r\nSKB: %d\r\n" % (slots[i % 3].sid, i))
    stream = w.flush()
    chunks, corrupt = pagekite_parse(pagekite_mod, stream)
    rec = Recorder()
    demux = fastpath.Demux(rec.on_chunk)
    for slot in slots:
        demux.attach(fastpath.StreamSlot(slot.sid, rec.sink_for(slot.sid)))
    demux.feed_data(stream)
    assert len(chunks) == len(rec.events) == w.chunks_written
    for chunk, event in zip(chunks, rec.events, strict=True):
        parse, data = pagekite_headers(chunk)
        if event[0] == "data":
            assert parse.Header("SID") == [str(event[1])]
            assert data.encode("latin-1") == event[2]
        else:
            assert parse.Header("NOOP") == ["1"] and event[2] == data.encode("latin-1")
