"""The idle workload's helper process (``relay_bench.py _idle-client``): open N visitor
connections, fetch the 1 KiB file on each, report, and hold them idle until stdin closes."""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import socket
import sys
import time

from .common import HOST
from .procs import raise_nofile

#: Linux's IP_BIND_ADDRESS_NO_PORT: bind() takes the address only, connect() picks the port
#: (unique per destination, so each source address has a whole port range per destination).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


async def _open(port: int, source: str | None):
    """A connection to HOST:port, from ``source`` (an address of 127.0.0.0/8) if given."""
    if source is None:
        return await asyncio.open_connection(HOST, port)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def _idle_client_main(port: int, hosts: list[str], n: int, timeout: float, concurrency: int,
                            sources: list[str]) -> None:
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(concurrency)
    keep = []
    errors: collections.Counter = collections.Counter()
    reqs = [b"GET /1k.bin HTTP/1.1\r\nHost: %s\r\n\r\n" % h.encode() for h in hosts]

    async def one(k: int):
        writer = None
        async with sem:
            try:
                reader, writer = await _open(port, sources[k % len(sources)] if sources else None)
                writer.write(reqs[k % len(reqs)])
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise ValueError("status " + head[:20].decode("latin-1"))
                m = re.search(rb"(?i)content-length:\s*(\d+)", head)
                await reader.readexactly(int(m.group(1)))
                keep.append(writer)
                return True
            except asyncio.CancelledError:
                if writer is not None:
                    writer.close()  # not connected in time: do not leave it queued
                raise
            except Exception as exc:
                if writer is not None:
                    writer.close()
                errors[type(exc).__name__ + ": " + str(exc)[:60]] += 1
                return False

    t0 = time.monotonic()
    tasks = [loop.create_task(one(k)) for k in range(n)]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending)
        errors[f"not connected within {timeout:g}s"] += len(pending)
    ok = sum(1 for t in done if t.result())
    print(json.dumps({"ok": ok, "failed": n - ok, "elapsed": time.monotonic() - t0,
                      "errors": dict(errors)}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the harness closes our stdin
    for w in keep:
        w.close()


def idle_client(argv: list[str]) -> None:
    """Hidden subcommand: hold N idle visitor connections until stdin closes."""
    p = argparse.ArgumentParser(prog="relay_bench.py _idle-client")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", required=True, help="Host header; comma-separated: each in turn")
    p.add_argument("--conns", type=int, required=True)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--sources", default="",
                   help="comma-separated source addresses, used in turn (default: none bound)")
    a = p.parse_args(argv)
    raise_nofile()
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    sources = [x for x in a.sources.split(",") if x]
    hosts = [x for x in a.host.split(",") if x]
    asyncio.run(_idle_client_main(a.port, hosts, a.conns, a.timeout, a.concurrency, sources))
