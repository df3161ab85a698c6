"""``--hsts SECONDS``: ``Strict-Transport-Security`` on the first response of each HTTPS
connection the relay terminates.

A browser keeps the policy from any one response over https, so the first response of a
connection is enough, and only that one is looked at: the stream's sink is wrapped until
the first response head has passed (bounded by ``MAX_HEAD``), then the stream's own sink
takes over again and later responses and bodies pass untouched - nothing parses the
responses of a keep-alive connection.  A server that sends the header itself wins.  The
bytes added count as ``Stream.inflated``, so the flow-control acknowledgements stay exact.
"""

from __future__ import annotations

from ..errors import HeadTooLong
from ..net.tunnel import Stream
from ..proto.http import MAX_HEAD, add_response_header, find_head_end

__all__ = ["FirstResponseHeader", "HSTS_FIELD"]

HSTS_FIELD = b"Strict-Transport-Security"


class FirstResponseHeader:
    """Adds ``name: value`` to the first response head of ``stream`` (tunnel -> visitor)."""

    __slots__ = ("stream", "name", "value", "held")

    def __init__(self, stream: Stream, name: bytes, value: bytes) -> None:
        self.stream = stream
        self.name = name
        self.value = value
        self.held = b""  # the start of a head that came cut in several chunks
        stream.slot.sink = self.sink

    def sink(self, view: memoryview) -> None:
        """The demultiplexer's sink until the first head is through (a borrowed view)."""
        stream = self.stream
        data = self.held + bytes(view)
        try:
            end = find_head_end(data, MAX_HEAD)
        except HeadTooLong:
            end = -1  # not a head kite can read: pass it on as it is
        if end is None:
            self.held = data
            return
        out = add_response_header(data, end, self.name, self.value) if end > 0 else data
        self.held = b""
        stream.slot.sink = stream.sink
        stream.inflated += len(out) - len(data)
        stream.sink(memoryview(out))
