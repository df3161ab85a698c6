"""kite.net.pipes: PipeEnd, StdioEnd and the splice bridge on their own, over socket pairs
and os.pipe() pairs (the relay conversation on top of them: test_client_connect)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import sys

import pytest

from kite.net.pipes import (
    PipeEnd,
    StdioEnd,
    bridge_splice,
    nonblocking_ok,
    splice_usable,
)
from support import run

HAS_SPLICE = hasattr(os, "splice") and sys.platform.startswith("linux")


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_kind(request):
    return request.param


def test_splice_is_chosen_only_for_pipes_and_sockets(tmp_path, monkeypatch):
    r, w = os.pipe()
    try:
        with open(tmp_path / "file", "wb") as f:
            monkeypatch.delenv("KITE_NO_SPLICE", raising=False)
            assert splice_usable(r, w) == HAS_SPLICE
            assert not splice_usable(r, f.fileno())
            monkeypatch.setenv("KITE_NO_SPLICE", "1")
            assert not splice_usable(r, w)
    finally:
        os.close(r)
        os.close(w)


def test_nonblocking_only_on_pipes_and_sockets(tmp_path):
    r, w = os.pipe()
    a, b = socket.socketpair()
    try:
        with open(tmp_path / "file", "wb") as f:
            assert nonblocking_ok(r) and nonblocking_ok(w) and nonblocking_ok(a.fileno())
            assert not nonblocking_ok(f.fileno())
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def _data(n: int) -> bytes:
    block = hashlib.sha256(b"pipes").digest() * 2048
    return (block * (n // len(block) + 1))[:n]


async def _read_all(fd: int) -> bytes:
    """Read a blocking pipe to EOF in a thread."""

    def read() -> bytes:
        out = bytearray()
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return bytes(out)
            out += chunk

    return await asyncio.get_running_loop().run_in_executor(None, read)


async def _write_all(fd: int, data: bytes) -> None:
    def write() -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.close(fd)

    await asyncio.get_running_loop().run_in_executor(None, write)


async def _echo_peer(sock: socket.socket) -> None:
    """The far end: echoes until EOF, then half-closes back."""
    loop = asyncio.get_running_loop()
    while True:
        data = await loop.sock_recv(sock, 1 << 16)
        if not data:
            break
        await loop.sock_sendall(sock, data)
    sock.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("how", ["copy", "splice"])
def test_stdio_bridge_echo_with_half_close(loop_kind, how):
    """stdin -> socket -> echo -> socket -> stdout, 4 MiB; stdin EOF is passed on as a
    half-close, and the echo's EOF ends the bridge with status 0."""
    if how == "splice" and not HAS_SPLICE:
        pytest.skip("os.splice needs Linux")

    async def main():
        loop = asyncio.get_running_loop()
        near, far = socket.socketpair()
        far.setblocking(False)
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        for fd in (in_r, out_w):
            os.set_blocking(fd, False)
        data = _data(4 << 20)
        echo = loop.create_task(_echo_peer(far))
        feeder = loop.create_task(_write_all(in_w, data))
        reader = loop.create_task(_read_all(out_r))
        try:
            if how == "splice":
                near.setblocking(False)
                status, error = await asyncio.wait_for(
                    bridge_splice(near, in_r, out_w, None), 30)
            else:
                stdio = StdioEnd(in_r, out_w)
                end = PipeEnd()
                end.peer = stdio
                stdio.peer = end
                await loop.connect_accepted_socket(lambda: end, near)
                stdio.start()
                status = await asyncio.wait_for(stdio.finished, 30)
                error = stdio.error
                end.transport.close()
            os.close(out_w)
            assert (status, error) == (0, None)
            got = await asyncio.wait_for(reader, 30)
            assert len(got) == len(data) and got == data
            await feeder
            await echo
        finally:
            for fd in (in_r, out_r):
                os.close(fd)
            far.close()
            near.close()

    run(main, loop_kind)


def test_pipe_ends_relay_both_ways_with_backpressure(loop_kind):
    """Two PipeEnds joined: 8 MiB each way between two socket pairs, one reader slow."""

    async def main():
        loop = asyncio.get_running_loop()
        a_near, a_far = socket.socketpair()
        b_near, b_far = socket.socketpair()
        for s in (a_far, b_far):
            s.setblocking(False)
        left, right = PipeEnd(), PipeEnd()
        left.peer, right.peer = right, left
        await loop.connect_accepted_socket(lambda: left, a_near)
        await loop.connect_accepted_socket(lambda: right, b_near)
        data = _data(8 << 20)

        async def send(sock):
            await loop.sock_sendall(sock, data)
            sock.shutdown(socket.SHUT_WR)

        async def recv(sock, slow):
            h, n = hashlib.sha256(), 0
            while True:
                chunk = await loop.sock_recv(sock, 4096 if slow else 1 << 16)
                if not chunk:
                    return n, h.digest()
                n += len(chunk)
                h.update(chunk)

        results = await asyncio.wait_for(asyncio.gather(
            send(a_far), send(b_far), recv(a_far, False), recv(b_far, True)), 60)
        want = (len(data), hashlib.sha256(data).digest())
        assert results[2] == want and results[3] == want
        for s in (a_far, b_far):
            s.close()

    run(main, loop_kind)
