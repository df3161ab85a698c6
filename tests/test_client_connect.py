"""``kite connect``: the CONNECT handshake (sans-IO), the stdio bridge (splice and copy), its
errors, and the command line.

The bridge tests run in-process on uvloop and asyncio, with os.pipe() pairs standing in for
fds 0 and 1 (what ssh gives a ProxyCommand), against an in-process relay + backend.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shlex
import subprocess
import sys

import pytest

# Subprocesses import the same kite package as this test process (site-packages in CI,
# src/ in an editable checkout).
import kite as _kite_pkg
from kite.client.connect import (
    RelayTarget,
    bridge_stdio,
    open_relay,
    open_relay_socket,
    refusal_error,
)
from kite.client.sshconfig import ssh_config_block
from kite.errors import BadRelayReply, KiteOffline, NotAKite, RelayRefused, RelayTLSError, RelayUnreachable
from kite.net.tls import ClientTLS
from kite.proto.http import ConnectReply, parse_connect_reply
from support import KITE, free_port, kite_env, raw_kite, run, start_banner_server

SRC = os.path.dirname(os.path.dirname(os.path.abspath(_kite_pkg.__file__)))
CLI_ENV = {**os.environ, "PYTHONPATH": SRC}

HAS_SPLICE = hasattr(os, "splice") and sys.platform.startswith("linux")



@pytest.fixture(params=["splice", "copy"])
def splice(request):
    if request.param == "splice" and not HAS_SPLICE:
        pytest.skip("os.splice needs Linux and Python 3.10+")
    return request.param == "splice"


# -- local servers (shared with test_client_forward) -------------------------------------------
async def start_echo_server():
    """Echoes every byte; after the client's EOF, sends EOF back (half-close both ways)."""

    async def handle(reader, writer):
        try:
            while True:
                data = await reader.read(1 << 18)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except OSError:  # a reset (ENOTCONN from shutdown included): the client left
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def start_digest_server():
    """Reads until EOF (so the client's half-close must arrive), then answers
    ``<bytes read> <sha256>\\n`` on the still-open other direction, and closes."""

    async def handle(reader, writer):
        h = hashlib.sha256()
        n = 0
        try:
            while True:
                data = await reader.read(1 << 18)
                if not data:
                    break
                n += len(data)
                h.update(data)
            writer.write(b"%d %s\n" % (n, h.hexdigest().encode()))
            await writer.drain()
        except OSError:  # a reset (ENOTCONN from shutdown included): the client left
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def start_silent_server(close_at_once=False):
    """Accepts and says nothing (a relay that hangs), or closes at once (one that refuses)."""
    conns = []

    async def handle(reader, writer):
        if close_at_once:
            writer.close()
            return
        conns.append(writer)
        await reader.read()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def start_fake_sshd():
    """Speaks first like sshd (what --relay pointing at the kite's own server gets)."""

    async def handle(reader, writer):
        try:
            writer.write(b"SSH-2.0-KiteTest\r\n")
            await reader.read()
        except OSError:  # a reset (ENOTCONN from shutdown included): the client left
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]



def payload(n: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible-looking bytes."""
    out = bytearray()
    block = hashlib.sha256(b"kite%d" % seed).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:n])


class Stdio:
    """Two os.pipe() pairs: the bridge gets (in_r, out_w), the test writes in_w, reads out_r."""

    def __init__(self):
        self.in_r, self.in_w = os.pipe()
        self.out_r, self.out_w = os.pipe()

    async def open(self):
        loop = asyncio.get_running_loop()
        self.reader = asyncio.StreamReader(limit=1 << 26)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(self.reader),
                                     os.fdopen(self.out_r, "rb", 0))
        self.writer, _ = await loop.connect_write_pipe(asyncio.Protocol,
                                                       os.fdopen(self.in_w, "wb", 0))
        return self

    def close_bridge_side(self):
        for fd in (self.in_r, self.out_w):
            try:
                os.close(fd)
            except OSError:
                pass


def target_for(env, host="box.test.kite", port=22, **kw) -> RelayTarget:
    return RelayTarget("127.0.0.1", env.port, host, port, **kw)


# -- refusals (the CONNECT request and its answer: test_proto_http) ----------------------------
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
           b"Content-Length: 35\r\nConnection: close\r\n\r\n")


def test_refusals_name_the_problem():
    r503 = parse_connect_reply(REFUSAL)
    err = refusal_error(r503, b"kite box.test.kite:22 is offline\n", "relay:443", "box", 22)
    assert isinstance(err, KiteOffline) and "kite box:22 is offline" in str(err)
    r403 = ConnectReply(403, "Forbidden", 20, 10)
    err = refusal_error(r403, b"", "relay:443", "box", 22)
    assert isinstance(err, NotAKite) and "not a raw kite on relay relay:443" in str(err)
    r407 = ConnectReply(407, "Proxy Authentication Required", 20, None)
    err = refusal_error(r407, b"login first\n", "relay:443", "box", 22)
    assert type(err) is RelayRefused and str(err).endswith("407 Proxy Authentication Required: login first")
    for e in (err,):
        assert "\n" not in str(e)


def test_ssh_config_block_quotes_for_the_shell():

    block = ssh_config_block("box.example.com", "relay.example.com:443", port=2222,
                             tls_args=("--tls", "--ca", "/my certs/relay.pem"))
    assert block == (
        "Host box.example.com\n"
        "    HostName box.example.com\n"
        "    Port 2222\n"
        "    ProxyCommand kite connect %h %p --relay relay.example.com:443 --tls "
        "--ca '/my certs/relay.pem'\n")


# -- the bridge, in-process --------------------------------------------------------------------
def test_bridge_banner_echo_and_half_close(tmp_path, loop_kind, splice):
    """ssh's pattern: the server speaks first; stdin EOF reaches it as a half-close; its EOF
    ends the bridge with status 0 after stdout has every byte."""

    async def main():
        server, port = await start_banner_server()
        async with kite_env(tmp_path, [raw_kite("box.test.kite", port, 22)], tls=False) as env:
            io = await Stdio().open()
            task = asyncio.ensure_future(bridge_stdio(target_for(env), in_fd=io.in_r,
                                                      out_fd=io.out_w, splice=splice))
            assert await io.reader.readuntil(b"\r\n") == b"SSH-2.0-KiteTest\r\n"
            io.writer.write(b"hello\n")
            assert await io.reader.readexactly(6) == b"HELLO\n"
            io.writer.close()  # stdin EOF
            assert await asyncio.wait_for(task, 20) == 0
            io.close_bridge_side()
            assert await io.reader.read() == b""
        server.close()

    run(main, loop_kind)


def test_bridge_stdin_eof_reaches_server_and_answer_comes_back(tmp_path, loop_kind, splice):
    async def main():
        server, port = await start_digest_server()
        async with kite_env(tmp_path, [raw_kite("box.test.kite", port, 22)], tls=False) as env:
            io = await Stdio().open()
            data = payload(3 << 20)
            task = asyncio.ensure_future(bridge_stdio(target_for(env), in_fd=io.in_r,
                                                      out_fd=io.out_w, splice=splice))
            io.writer.write(data)
            io.writer.close()
            assert await asyncio.wait_for(task, 30) == 0
            io.close_bridge_side()
            answer = await io.reader.read()
            assert answer == b"%d %s\n" % (len(data), hashlib.sha256(data).hexdigest().encode())
        server.close()

    run(main, loop_kind)


def test_bridge_both_ways_at_once_with_a_slow_reader(tmp_path, loop_kind, splice):
    """16 MiB up and echoed down while the test reads stdout in small sips: the bridge must
    hold back (stdout pushes back, then the relay, then stdin), lose nothing, and end."""

    async def main():
        server, port = await start_echo_server()
        async with kite_env(tmp_path, [raw_kite("box.test.kite", port, 22)], tls=False) as env:
            io = await Stdio().open()
            data = payload(16 << 20, seed=1)
            task = asyncio.ensure_future(bridge_stdio(target_for(env), in_fd=io.in_r,
                                                      out_fd=io.out_w, splice=splice))

            async def feed():
                view = memoryview(data)
                for i in range(0, len(data), 1 << 20):
                    io.writer.write(view[i:i + (1 << 20)])
                    await asyncio.sleep(0)
                io.writer.close()

            feeder = asyncio.ensure_future(feed())
            got = hashlib.sha256()
            n = 0
            while True:
                chunk = await asyncio.wait_for(io.reader.read(65536), 30)
                if not chunk:
                    break
                got.update(chunk)
                n += len(chunk)
                if n == len(data):
                    break
            await feeder
            assert await asyncio.wait_for(task, 30) == 0
            assert n == len(data) and got.digest() == hashlib.sha256(data).digest()
        server.close()

    run(main, loop_kind)


def test_bridge_ends_on_remote_eof_with_stdin_still_open(tmp_path, loop_kind, splice):
    async def main():
        async def handle(reader, writer):
            writer.write(b"bye\n")
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with kite_env(tmp_path, [raw_kite("box.test.kite", port, 22)], tls=False) as env:
            io = await Stdio().open()
            status = await asyncio.wait_for(
                bridge_stdio(target_for(env), in_fd=io.in_r, out_fd=io.out_w, splice=splice), 20)
            assert status == 0
            io.close_bridge_side()
            assert await io.reader.read() == b"bye\n"
            io.writer.close()
        server.close()

    run(main, loop_kind)


def test_bridge_restores_blocking_mode_of_its_fds(tmp_path, loop_kind, splice):
    async def main():
        server, port = await start_digest_server()
        async with kite_env(tmp_path, [raw_kite("box.test.kite", port, 22)], tls=False) as env:
            io = await Stdio().open()
            os.set_blocking(io.in_r, True)
            io.writer.close()
            assert await bridge_stdio(target_for(env), in_fd=io.in_r, out_fd=io.out_w,
                                      splice=splice) == 0
            assert os.get_blocking(io.in_r)
            io.close_bridge_side()
        server.close()

    run(main, loop_kind)


# -- errors ------------------------------------------------------------------------------------
async def _open(mode, target):
    """Open a relay connection the way each bridge does: socket (splice) or transport."""
    if mode == "socket":
        sock = await open_relay_socket(target)
        sock.close()
    else:
        class Peer:
            peer = None
            read_eof = False

            def send(self, data):
                pass

            send_eof = close = pause_reading = resume_reading = lambda self: None

        end = await open_relay(target, Peer())
        end.transport.close()


@pytest.mark.parametrize("mode", ["socket", "transport"])
def test_errors_are_specific(tmp_path, loop_kind, mode):
    async def main():
        hang, hang_port = await start_silent_server()
        shut, shut_port = await start_silent_server(close_at_once=True)
        sshd, sshd_port = await start_fake_sshd()
        async with kite_env(tmp_path, [raw_kite("box.test.kite", sshd_port, 22)],
                            tls=False) as env:
            with pytest.raises(KiteOffline, match=r"kite gone\.test\.kite:22 is offline"):
                await _open(mode, target_for(env, "gone.test.kite"))
            with pytest.raises(NotAKite, match=r"example\.org:22 is not a raw kite"):
                await _open(mode, target_for(env, "example.org"))
            # Right name, wrong port: refused (today's relay says 503, as for an offline kite).
            with pytest.raises(RelayRefused, match="box.test.kite:2222"):
                await _open(mode, target_for(env, "box.test.kite", 2222))
            with pytest.raises(RelayUnreachable, match="cannot reach relay 127.0.0.1:.*refused"):
                await _open(mode, RelayTarget("127.0.0.1", free_port(), "box.test.kite", 22))
            with pytest.raises(RelayUnreachable, match=r"did not answer within 0\.3 s"):
                await _open(mode, RelayTarget("127.0.0.1", hang_port, "box", 22, timeout=0.3))
            with pytest.raises(NotAKite, match="(closed|reset) the connection without answering"):
                await _open(mode, RelayTarget("127.0.0.1", shut_port, "box", 22))
            with pytest.raises(BadRelayReply, match="SSH-2.0-KiteTest"):  # --relay = sshd
                await _open(mode, RelayTarget("127.0.0.1", sshd_port, "box", 22))
            # And the right one works.
            await _open(mode, target_for(env))
        for s in (hang, shut, sshd):
            s.close()

    run(main, loop_kind)


@pytest.mark.parametrize("mode", ["socket", "transport"])
def test_answer_in_pieces_then_the_kites_first_bytes(loop_kind, mode):
    """A relay that answers a byte at a time: the head is read whole, and the byte right
    after it is the kite's (the splice path must not have consumed it)."""

    async def main():
        async def trickle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            for piece in (b"H", b"TTP/1.1 200 Conn", b"ection Established\r\n", b"\r",
                          b"\nSSH-2.0-first", b" bytes\r\n"):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.01)  # separate segments (not synchronisation)
            await reader.read()
            writer.close()

        server = await asyncio.start_server(trickle, "127.0.0.1", 0)
        target = RelayTarget("127.0.0.1", server.sockets[0].getsockname()[1], "box", 22)
        loop = asyncio.get_running_loop()
        if mode == "socket":
            sock = await open_relay_socket(target)
            got = b""
            while not got.endswith(b"\r\n"):
                got += await loop.sock_recv(sock, 100)
            sock.close()
        else:
            got_all = bytearray()
            done = loop.create_future()

            class Peer:
                peer = None
                read_eof = False

                def send(self, data):
                    got_all.extend(data)
                    if got_all.endswith(b"\r\n") and not done.done():
                        done.set_result(None)

                send_eof = close = pause_reading = resume_reading = lambda self: None

            end = await open_relay(target, Peer())
            await asyncio.wait_for(done, 10)
            end.transport.close()
            got = bytes(got_all)
        assert got == b"SSH-2.0-first bytes\r\n"
        server.close()

    run(main, loop_kind)


@pytest.mark.parametrize("how", ["system-store", "wrong-ca", "wrong-fingerprint"])
def test_tls_verification_failure(tmp_path, loop_kind, how):
    async def main():
        server, port = await start_banner_server()
        async with kite_env(tmp_path, [raw_kite("box.test.kite", port, 22)], tls=True) as env:
            other = tmp_path / "other"
            other.mkdir()
            from support import make_certs

            wrong = make_certs(other)
            tls = {"system-store": ClientTLS(),
                   "wrong-ca": ClientTLS(ca=wrong.cert),
                   "wrong-fingerprint": ClientTLS(fingerprint=wrong.fingerprint)}[how]
            with pytest.raises(RelayTLSError, match="TLS verification of relay .* failed"):
                await _open("transport", target_for(env, tls=tls))
        server.close()

    run(main, loop_kind)


async def start_one_line_server():
    """Speaks first, upper-cases one line, then closes: ends without the client's EOF (over
    TLS the client cannot half-close: asyncio's TLS transports have no write_eof)."""

    async def handle(reader, writer):
        try:
            writer.write(b"SSH-2.0-KiteTest\r\n")
            writer.write((await reader.readline()).upper())
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def start_tls_terminator(certs, relay_port):
    """TLS in front of the relay's plain port: what the relay would do itself if it took a
    CONNECT visitor inside TLS.  Proves the client's TLS path today."""
    from kite.net.tls import server_context

    ctx = server_context(certs.cert, certs.key)

    async def handle(reader, writer):
        r2, w2 = await asyncio.open_connection("127.0.0.1", relay_port)

        async def pipe(src, dst, end):
            try:
                while True:
                    data = await src.read(1 << 16)
                    if not data:
                        break
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            end()

        def up_end():
            if not w2.is_closing():
                w2.write_eof()

        await asyncio.gather(pipe(reader, w2, up_end), pipe(r2, writer, writer.close))
        w2.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1]


async def _bridge_over_tls(io, target):
    task = asyncio.ensure_future(bridge_stdio(target, in_fd=io.in_r, out_fd=io.out_w))
    banner = asyncio.ensure_future(io.reader.readuntil(b"\r\n"))
    try:
        done, _ = await asyncio.wait({task, banner}, timeout=10,
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # a refusal: raises
        assert banner.result() == b"SSH-2.0-KiteTest\r\n"
        io.writer.write(b"over tls\n")
        assert await asyncio.wait_for(task, 10) == 0  # the server's close ends it
        io.close_bridge_side()
        assert await io.reader.read() == b"OVER TLS\n"
    finally:
        for t in (task, banner):
            t.cancel()
        await asyncio.gather(task, banner, return_exceptions=True)
        io.writer.close()


@pytest.mark.parametrize("how", ["ca", "fingerprint"])
def test_tls_client_through_a_tls_terminating_proxy(tmp_path, loop_kind, how):
    async def main():
        server, port = await start_one_line_server()
        async with kite_env(tmp_path, [raw_kite("box.test.kite", port, 22)], tls=True) as env:
            term, term_port = await start_tls_terminator(env.certs, env.port)
            tls = (ClientTLS(ca=env.certs.cert) if how == "ca"
                   else ClientTLS(fingerprint=env.certs.fingerprint))
            target = RelayTarget("127.0.0.1", term_port, "box.test.kite", 22, tls, timeout=5)
            await _bridge_over_tls(await Stdio().open(), target)
            term.close()
        server.close()

    run(main, loop_kind)


@pytest.mark.parametrize("how", ["ca", "fingerprint"])
def test_connect_inside_tls_to_the_relay(tmp_path, loop_kind, how):
    async def main():
        server, port = await start_one_line_server()
        async with kite_env(tmp_path, [raw_kite("box.test.kite", port, 22)], tls=True) as env:
            tls = (ClientTLS(ca=env.certs.cert) if how == "ca"
                   else ClientTLS(fingerprint=env.certs.fingerprint))
            await _bridge_over_tls(await Stdio().open(), target_for(env, tls=tls, timeout=5))
        server.close()

    run(main, loop_kind)


# -- the command line --------------------------------------------------------------------------
async def run_cli(*args, stdin=b"", timeout=30):
    proc = await asyncio.create_subprocess_exec(
        *KITE, *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=CLI_ENV)
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    return proc.returncode, out, err.decode()


def test_cli_connect_bridges_and_fails_in_one_line(tmp_path):
    async def main():
        server, port = await start_digest_server()
        async with kite_env(tmp_path, [raw_kite("box.test.kite", port, 22)], tls=True) as env:
            relay = f"127.0.0.1:{env.port}"
            data = payload(1 << 20, seed=2)
            jobs = [run_cli("connect", "box.test.kite", "22", "--relay", relay, stdin=data),
                    run_cli("connect", "gone.test.kite", "22", "--relay", relay),
                    run_cli("connect", "example.org", "22", "--relay", relay),
                    run_cli("connect", "box.test.kite", "22", "--relay", f"127.0.0.1:{free_port()}"),
                    run_cli("connect", "box.test.kite", "22", "--relay", relay, "--tls"),
                    run_cli("connect", "box.test.kite", "22", "--relay", relay, "--tls",
                            "--fingerprint", "ab" * 32)]
            ok, offline, forbidden, unreachable, untrusted, unpinned = await asyncio.gather(*jobs)
        server.close()
        assert ok[0] == 0, ok[2]
        assert ok[1] == b"%d %s\n" % (len(data), hashlib.sha256(data).hexdigest().encode())
        assert ok[2] == ""  # nothing on the ssh user's terminal
        for (rc, out, err), words in ((offline, "is offline"), (forbidden, "is not a raw kite"),
                                      (unreachable, "cannot reach relay"),
                                      (untrusted, "TLS verification"),
                                      (unpinned, "does not match the pinned")):
            assert rc == 1, err
            assert out == b""
            assert err.startswith("kite: error: ") and words in err, err
            assert err.count("\n") == 1 and "Traceback" not in err, err

    run(main, "uvloop")


@pytest.mark.parametrize("args, words", [
    (["box", "22", "--relay", "r:1", "--ca", "x.pem"], "--ca: only checks a TLS connection"),
    (["box", "22", "--relay", "r:1", "--tls", "--insecure", "--fingerprint", "ab" * 32],
     "cannot be combined"),
    (["box", "22", "--relay", "r:1", "--tls", "--fingerprint", "nothex"], "not a SHA-256"),
    (["box", "22", "--relay", "r:99999"], "bad port"),
    (["bad host", "22", "--relay", "r:1"], "bad host name"),
    (["box", "22"], "Missing option '--relay'"),
])
def test_cli_connect_usage_errors_exit_2(args, words):
    proc = subprocess.run(KITE + ["connect", *args], capture_output=True, text=True,
                          env=CLI_ENV, timeout=30)
    assert proc.returncode == 2
    assert words in proc.stderr and "Traceback" not in proc.stderr


def test_cli_ssh_config(tmp_path):
    from support import make_certs

    ca = make_certs(tmp_path).cert
    proc = subprocess.run(KITE + ["ssh-config", "box.example.com", "--relay", "relay.example.com",
                                  "--tls", "--ca", str(ca), "--user", "me"],
                          capture_output=True, text=True, env=CLI_ENV, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        "Host box.example.com\n    HostName box.example.com\n    Port 22\n    User me\n"
        f"    ProxyCommand {shlex.quote(sys.executable)} -m kite connect %h %p "
        f"--relay relay.example.com:443 --tls --ca {ca}\n")
    proc = subprocess.run(KITE + ["ssh-config", "box.example.com", "--relay", "r:443",
                                  "--insecure"], capture_output=True, text=True, env=CLI_ENV)
    assert proc.returncode == 2 and "add --tls" in proc.stderr
