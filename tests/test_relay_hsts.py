"""kite.relay.hsts: the header goes into the first response head only, however the head
is cut into chunks, and the bytes added count as inflated."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kite.relay.hsts import HSTS_FIELD, FirstResponseHeader

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
ADDED = b"Strict-Transport-Security: max-age=9\r\n"


def fake_stream():
    out: list = []
    stream = SimpleNamespace(slot=SimpleNamespace(sink=None), inflated=0, out=out)
    stream.sink = lambda view: out.append(bytes(view))
    return stream


@pytest.mark.parametrize("cut", [1, 5, 17, 30, len(RESPONSE) - 5, len(RESPONSE)])
def test_first_head_gets_the_header_in_every_cut(cut):
    stream = fake_stream()
    FirstResponseHeader(stream, HSTS_FIELD, b"max-age=9")
    pieces = [RESPONSE[:cut], RESPONSE[cut:], RESPONSE]  # a second response follows
    for piece in pieces:
        if piece:
            stream.slot.sink(memoryview(piece))
    assert stream.slot.sink is stream.sink  # the wrapper is gone after the first head
    got = b"".join(stream.out)
    first = RESPONSE[:17] + ADDED + RESPONSE[17:]
    assert got == first + RESPONSE
    assert stream.inflated == len(ADDED)


def test_a_head_too_long_passes_unchanged():
    stream = fake_stream()
    FirstResponseHeader(stream, HSTS_FIELD, b"max-age=9")
    junk = b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * 20000
    stream.slot.sink(memoryview(junk))
    assert b"".join(stream.out) == junk and stream.inflated == 0
    assert stream.slot.sink is stream.sink
