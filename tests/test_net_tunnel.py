"""kite.net.tunnel without a network: a stream's states and pauses, driven by the events its
local protocol and its tunnel report, against recording transports."""

from __future__ import annotations

import asyncio
import socket

import pytest

from kite.net.tunnel import (
    LOWAT_SLACK,
    PAUSE_PEER_CLOSED,
    PAUSE_QUEUE,
    PAUSE_TUNNEL,
    PAUSE_WINDOW,
    Stream,
    StreamProtocol,
    StreamState,
    TunnelProtocol,
)
from kite.proto.flow import QUEUE_MIN


class FakeTransport:
    """Records what a protocol does to its transport."""

    def __init__(self, *, can_eof: bool = True) -> None:
        self.written: list[bytes] = []
        self.calls: list[str] = []
        self.closing = False
        self.can_eof = can_eof
        self.buffered = 0

    def write(self, data) -> None:
        self.written.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return default

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return self.can_eof

    def write_eof(self) -> None:
        self.calls.append("write_eof")

    def close(self) -> None:
        self.calls.append("close")
        self.closing = True

    def abort(self) -> None:
        self.calls.append("abort")
        self.closing = True

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")


class RecordingTunnel(TunnelProtocol):
    """A tunnel in chunk mode whose control chunks are recorded as (kind, sid, flags)."""

    def __init__(self, loop, kite_peer: bool = True) -> None:
        super().__init__(loop=loop)
        self.sent: list[tuple] = []
        self.keepalive = None
        self.connection_made(FakeTransport())
        self.start_chunks(kite_peer=kite_peer)

    def send_eof(self, sid: int, flags: str) -> None:
        self.sent.append(("eof", sid, flags))

    def send_skb(self, sid: int, kib: int) -> None:
        self.sent.append(("skb", sid, kib))


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def tunnel(loop):
    return RecordingTunnel(loop)


def open_stream(tunnel, sid=1, *, attach=True, can_eof=True):
    stream = Stream(tunnel, sid, proto="raw", host="box.test.kite", port=22, peer="127.0.0.1:9")
    tunnel.add_stream(stream)
    local = FakeTransport(can_eof=can_eof)
    protocol = StreamProtocol(tunnel, stream)
    if attach:
        protocol.connection_made(local)
    return stream, protocol, local


def eofs(tunnel):
    return [e for e in tunnel.sent if e[0] == "eof"]


def test_local_eof_then_peer_eof_closes_once(tunnel):
    stream, protocol, local = open_stream(tunnel)
    assert stream.state is StreamState.OPEN
    assert protocol.eof_received() is True  # keep writing: the peer may still send
    assert stream.state is StreamState.LOCAL_DONE
    assert eofs(tunnel) == [("eof", 1, "R")]
    stream.on_peer_eof(read_closed=True, write_closed=False)
    assert stream.state is StreamState.CLOSED and stream.closed
    assert eofs(tunnel) == [("eof", 1, "R"), ("eof", 1, "WR")]
    assert local.calls == ["close"]
    assert 1 not in tunnel.streams
    stream.on_peer_eof(read_closed=True, write_closed=True)  # late events change nothing
    protocol.eof_received()
    assert eofs(tunnel) == [("eof", 1, "R"), ("eof", 1, "WR")]


def test_peer_eof_half_closes_then_local_eof_closes(tunnel):
    stream, protocol, local = open_stream(tunnel)
    stream.on_peer_eof(read_closed=True, write_closed=False)
    assert stream.state is StreamState.PEER_DONE
    assert local.calls == ["write_eof"]
    assert protocol.eof_received() is False
    assert stream.state is StreamState.CLOSED
    assert eofs(tunnel) == [("eof", 1, "R"), ("eof", 1, "WR")]


def test_peer_eof_without_half_close_closes(tunnel):
    """A local transport that cannot half-close (TLS) is closed after its queued bytes, and
    the stream ends well: R, then WR."""
    stream, _, local = open_stream(tunnel, can_eof=False)
    stream.on_peer_eof(read_closed=True, write_closed=False)
    assert stream.state is StreamState.CLOSED
    assert local.calls == ["close"]
    assert eofs(tunnel) == [("eof", 1, "R"), ("eof", 1, "WR")]


def test_kite_peer_forgets_stream_after_its_eof(tunnel):
    """R, then WR: the peer's side ended well; the local socket is closed after its bytes."""
    stream, _, local = open_stream(tunnel)
    stream.on_peer_eof(read_closed=True, write_closed=False)
    stream.on_peer_eof(read_closed=True, write_closed=True)
    assert stream.state is StreamState.CLOSED
    assert local.calls == ["write_eof", "close"]
    assert eofs(tunnel) == [("eof", 1, "WR")]


def test_kite_peer_cuts_stream(tunnel):
    """WR without R from a kite peer: the stream was cut there; the local socket is reset."""
    stream, _, local = open_stream(tunnel)
    stream.on_peer_eof(read_closed=True, write_closed=True)
    assert stream.state is StreamState.CLOSED
    assert local.calls == ["abort"]
    assert eofs(tunnel) == [("eof", 1, "WR")]


def test_pagekite_peer_forgets_stream(loop):
    """pagekite.py sends WR alone also when its side ended well: closed, not reset."""
    tunnel = RecordingTunnel(loop, kite_peer=False)
    stream, _, local = open_stream(tunnel)
    stream.on_peer_eof(read_closed=True, write_closed=True)
    assert stream.state is StreamState.CLOSED
    assert local.calls == ["close"]
    assert eofs(tunnel) == [("eof", 1, "WR")]


def test_local_socket_lost(tunnel):
    stream, protocol, local = open_stream(tunnel)
    protocol.connection_lost(None)
    assert stream.state is StreamState.CLOSED
    assert eofs(tunnel) == [("eof", 1, "WR")]
    assert local.calls == []  # already gone: nothing to close


class EndsTunnel(RecordingTunnel):
    """Records when streams leave the tunnel and when they end for their observers."""

    def on_stream_closed(self, stream) -> None:
        self.sent.append(("closed", stream.sid))

    def on_stream_ended(self, stream) -> None:
        self.sent.append(("ended", stream.sid))


def test_a_stream_ends_when_its_local_side_took_the_last_byte(loop):
    """The peer is done and forgot the stream, bytes for the local side still wait in its
    transport: the stream leaves the tunnel now (its id is free) and ends for its observers
    (access log, live visitors, final counts) when the transport is gone, once."""
    tunnel = EndsTunnel(loop)
    stream, protocol, local = open_stream(tunnel)
    local.buffered = 1_000_000  # a slow visitor of a response the relay holds
    stream.on_peer_eof(read_closed=True, write_closed=False)
    stream.on_peer_eof(read_closed=True, write_closed=True)
    assert stream.state is StreamState.CLOSED and 1 not in tunnel.streams
    assert [e for e in tunnel.sent if e[0] != "eof"] == [("closed", 1)]
    assert local.calls == ["write_eof", "close"]
    protocol.connection_lost(None)  # the last byte went out, the socket closed
    protocol.connection_lost(None)
    assert [e for e in tunnel.sent if e[0] != "eof"] == [("closed", 1), ("ended", 1)]
    # Nothing left to write: both at once.
    stream, protocol, local = open_stream(tunnel, sid=2)
    stream.on_peer_eof(read_closed=True, write_closed=False)
    stream.on_peer_eof(read_closed=True, write_closed=True)
    assert [e for e in tunnel.sent if e[0] != "eof"][2:] == [("closed", 2), ("ended", 2)]
    protocol.connection_lost(None)
    assert len([e for e in tunnel.sent if e[0] != "eof"]) == 4


def test_pause_reasons_stack(tunnel):
    stream, _, local = open_stream(tunnel)
    stream.pause(PAUSE_WINDOW)
    stream.pause(PAUSE_TUNNEL)
    assert local.calls == ["pause_reading"]  # one pause for two reasons
    stream.resume(PAUSE_WINDOW)
    assert local.calls == ["pause_reading"]  # the tunnel still pushes back
    stream.resume(PAUSE_WINDOW)  # a reason that no longer holds changes nothing
    stream.resume(PAUSE_TUNNEL)
    assert local.calls == ["pause_reading", "resume_reading"]
    assert stream.paused == 0


def test_peer_write_closed_pauses_for_good(tunnel):
    stream, _, local = open_stream(tunnel)
    stream.on_peer_eof(read_closed=False, write_closed=True)
    assert stream.state is StreamState.OPEN
    assert stream.paused == PAUSE_PEER_CLOSED
    tunnel.resume_writing()  # resuming other reasons does not lift it
    assert local.calls == ["pause_reading"]


def test_tunnel_resume_writing_resumes_its_streams(tunnel):
    stream, _, local = open_stream(tunnel)
    tunnel.pause_writing()
    stream.pause(PAUSE_TUNNEL)
    tunnel.resume_writing()
    assert local.calls == ["pause_reading", "resume_reading"]


def test_data_and_eof_before_the_local_socket(tunnel):
    """Bytes and an EOF R that arrive before the local connection is up wait for it."""
    stream, protocol, local = open_stream(tunnel, attach=False)
    stream.sink(memoryview(b"early "))
    stream.sink(memoryview(b"bytes"))
    stream.on_peer_eof(read_closed=True, write_closed=False)
    assert stream.state is StreamState.PEER_DONE
    protocol.connection_made(local)
    assert b"".join(local.written) == b"early bytes"
    assert local.calls == ["write_eof"]
    assert stream.pending is None


def test_pause_before_the_local_socket_applies_on_attach(tunnel):
    stream, protocol, local = open_stream(tunnel, attach=False)
    tunnel.pause_writing()
    protocol.connection_made(local)
    assert stream.paused == PAUSE_TUNNEL
    assert local.calls == ["pause_reading"]


def test_prepend_local_goes_first_and_is_not_acknowledged(tunnel):
    stream, protocol, local = open_stream(tunnel, attach=False)
    stream.sink(memoryview(b"payload"))
    stream.prepend_local(b"PROXY UNKNOWN\r\n")
    protocol.connection_made(local)
    assert b"".join(local.written) == b"PROXY UNKNOWN\r\npayload"
    assert stream.inflated == len(b"PROXY UNKNOWN\r\n")


def test_tunnel_teardown_aborts_local_sockets(tunnel):
    """A tunnel that dies cuts its streams' local sockets with an error, never a clean end."""
    s1, _, l1 = open_stream(tunnel, 1)
    s2, _, l2 = open_stream(tunnel, 3)
    tunnel.abort("test")
    assert s1.state is StreamState.CLOSED and s2.state is StreamState.CLOSED
    assert l1.calls == ["abort"] and l2.calls == ["abort"]
    assert not tunnel.streams


def test_connection_made_on_closed_stream_resets_transport(tunnel):
    stream, protocol, _ = open_stream(tunnel, attach=False)
    tunnel.discard(stream, close_local=False)
    local = FakeTransport()
    protocol.connection_made(local)
    assert local.calls == ["abort"]


def test_http_stream_cut_before_its_visitor_came_gets_a_502_page(loop):
    """On the relay (error pages on), an HTTP stream cut before its visitor's transport is
    up has sent nothing of a response: the visitor gets the 502 page a cut stream gets,
    then FIN - not a reset.  Other streams cut that early are reset (above)."""
    tunnel = RecordingTunnel(loop)
    tunnel.error_pages = True
    stream = Stream(tunnel, 1, proto="http", host="site.test.kite", port=80,
                    peer="127.0.0.1:9")
    tunnel.add_stream(stream)
    protocol = StreamProtocol(tunnel, stream)
    stream.cut()
    local = FakeTransport()
    protocol.connection_made(local)
    assert b"".join(local.written).startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert local.calls == ["close"]


# -- the scheduler: bulk streams are held once the queue below it is full ---------------------
def read_local(protocol, data: bytes) -> int:
    """One read of the local socket: ``data`` lands in the buffer the protocol lends."""
    buf = protocol.get_buffer(-1)
    n = min(len(buf), len(data))
    buf[:n] = data[:n]
    protocol.buffer_updated(n)
    return n


def test_a_read_that_filled_its_buffer_gets_a_whole_quantum_next(tunnel):
    """The event loop's size hint (libuv's 64 KiB) is lent while the stream's reads fit;
    once one filled its buffer, the next loan is a whole quantum (up to a kite peer's
    chunk on a fast uplink), and a short read goes back to the hint."""
    _, protocol, _ = open_stream(tunnel, 1)
    sq = tunnel.send_queue
    sq.quantum = quantum = sq.quantum_max  # a fast uplink: the largest quantum
    assert quantum > 65536
    buf = protocol.get_buffer(65536)
    assert len(buf) == 65536
    protocol.buffer_updated(100)  # a short read: it fit
    assert len(protocol.get_buffer(65536)) == 65536
    protocol.buffer_updated(65536)  # filled: more is waiting in the socket
    assert len(protocol.get_buffer(65536)) == quantum
    protocol.buffer_updated(quantum - 1)
    assert len(protocol.get_buffer(65536)) == 65536


def test_only_a_kite_peers_tunnel_takes_batched_tls_reads(loop):
    """kite._tls fills a loan with several records only for a protocol that asks
    (read_batch): a kite peer's tunnel and a stream's local side, whose brakes are windows.
    A pagekite.py peer's tunnel is braked by pausing the tunnel between two reads, so it
    takes a record a call."""
    assert RecordingTunnel(loop, kite_peer=True).read_batch is True
    pagekite = RecordingTunnel(loop, kite_peer=False)
    assert pagekite.read_batch is False
    _, protocol, _ = open_stream(pagekite, 1)
    assert protocol.read_batch is True  # its loan is one pagekite chunk, below a record


def data_chunks(wire: bytes) -> list[tuple[int, bytes]]:
    """(sid, payload) of each data chunk in ``wire`` (the writer's output), in order."""
    out = []
    while wire:
        size, _, rest = wire.partition(b"\r\n")
        n = int(size, 16)
        chunk, wire = rest[:n], rest[n:]
        head, _, payload = chunk.partition(b"\r\n\r\n")
        out.append((int(head.split(b":")[1]), payload))
    return out


def test_small_stream_skips_a_bulk_streams_backlog(tunnel):
    """A bulk stream (its reads fill the buffer: more is waiting) is held once the queue
    below the scheduler is full; a small stream's bytes (a short read) are read at once and
    leave with only that short queue ahead of them, while the bulk stream's rest waits in
    its own local socket."""
    transport = tunnel.transport
    bulk, bulk_proto, bulk_local = open_stream(tunnel, 1)
    backlog = bytes(range(256)) * 4096  # 1 MiB offered by the bulk stream's local socket
    offered = 0
    while not bulk.paused:
        offered += read_local(bulk_proto, backlog[offered:])
    assert bulk.paused == PAUSE_QUEUE and list(tunnel.held) == [bulk]
    assert bulk_local.calls == ["pause_reading"]
    sq = tunnel.send_queue
    assert offered <= sq.target + 2 * sq.quantum  # the rest waits in the local socket
    tunnel.flush_now()
    transport.buffered = 10 * sq.target  # the peer is slow: the queue stays full

    small, small_proto, _ = open_stream(tunnel, 3)
    assert read_local(small_proto, b"s" * 1024) == 1024
    assert not small.paused and list(tunnel.held) == [bulk]
    tunnel.flush_now()
    chunks = data_chunks(b"".join(transport.written))
    assert chunks[-1] == (3, b"s" * 1024)
    ahead = sum(len(p) for sid, p in chunks if sid == 1)
    assert ahead == offered < len(backlog) // 4

    # The queue drains: the bulk stream's turn; it reads on until the queue is full again.
    transport.buffered = 0
    tunnel.pace_tick()
    assert bulk.paused == 0 and bulk_local.calls[-1] == "resume_reading"
    before = offered
    while not bulk.paused:
        offered += read_local(bulk_proto, backlog[offered:])
    assert offered - before <= sq.target + sq.quantum
    tunnel.flush_now()
    payload = b"".join(p for sid, p in data_chunks(b"".join(transport.written)) if sid == 1)
    assert payload == backlog[:offered]  # in order, nothing lost


def test_held_streams_take_turns(tunnel):
    """With room for one quantum per look, held streams are released one at a time, in
    the order they were held; a released stream that fills the queue again goes last."""
    transport = tunnel.transport
    streams = [open_stream(tunnel, sid) for sid in (1, 3, 5)]
    data = b"x" * (1 << 20)
    for stream, proto, _ in streams:
        while not stream.paused:
            read_local(proto, data)
        tunnel.flush_now()
    assert [s.sid for s in tunnel.held] == [1, 3, 5]
    sq = tunnel.send_queue
    transport.buffered = sq.target - 1  # room for one turn
    tunnel.pace_tick()
    assert [s.sid for s, _, _ in streams if not s.paused] == [1]
    assert [s.sid for s in tunnel.held] == [3, 5]
    read_local(streams[0][1], data)  # its one read fills the queue: held again, at the end
    assert [s.sid for s in tunnel.held] == [3, 5, 1]
    tunnel.flush_now()  # it left (the transport's buffer stays where it was)
    tunnel.pace_tick()
    assert [s.sid for s, _, _ in streams if not s.paused] == [3]


def test_a_closed_held_stream_loses_its_turn(tunnel):
    transport = tunnel.transport
    (a, pa, _), (b, pb, _) = open_stream(tunnel, 1), open_stream(tunnel, 3)
    for stream, proto in ((a, pa), (b, pb)):
        while not stream.paused:
            read_local(proto, b"y" * 65536)
    a.cut()
    transport.buffered = 0
    tunnel.flush_now()
    tunnel.pace_tick()
    assert not b.paused and not tunnel.held


def test_tunnel_socket_keeps_the_kernels_unsent_queue_short(loop):
    """On a real TCP socket the tunnel sets TCP_NOTSENT_LOWAT: with a peer that reads
    nothing, the kernel holds at most about that much unsent, and the rest stays in the
    transport, where the scheduler sees it."""
    async def main():
        server = socket.create_server(("127.0.0.1", 0))
        server.setblocking(False)
        port = server.getsockname()[1]
        transport, tunnel = await loop.create_connection(
            lambda: TunnelProtocol(loop=loop), "127.0.0.1", port)
        peer, _ = await loop.sock_accept(server)
        try:
            sock = transport.get_extra_info("socket")
            lowat = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
            assert lowat == 2 * QUEUE_MIN + LOWAT_SLACK
            transport.write(b"z" * (8 << 20))
            deadline = loop.time() + 10
            while tunnel.kernel_unsent() < lowat // 2:
                assert loop.time() < deadline, "the kernel never queued unsent bytes"
                await asyncio.sleep(0.01)
            assert tunnel.kernel_unsent() <= lowat + 128 * 1024  # one more segment at most
            assert tunnel.queue_full() and tunnel.queued > lowat
        finally:
            transport.abort()
            peer.close()
            server.close()

    loop.run_until_complete(main())


def test_request_response_streams_are_never_held(tunnel):
    """Reads that drain the local socket (a response at a time) each start a new burst:
    with the queue full, such a stream still sends, however much it sent before."""
    transport = tunnel.transport
    stream, proto, _ = open_stream(tunnel, 1)
    transport.buffered = 10 * tunnel.send_queue.target
    for _ in range(100):
        assert read_local(proto, b"r" * 3000) == 3000  # short: the socket is drained
        assert not stream.paused
    assert stream.slot.sent == 300_000 and not tunnel.held
