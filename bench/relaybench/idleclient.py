"""The idle workload's helper process (``relay_bench.py _idle-client``): open N visitor
connections, fetch the 1 KiB file on each, report, and hold them idle until stdin closes."""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import sys
import time

from .common import HOST
from .procs import raise_nofile


async def _idle_client_main(port: int, host: str, n: int, timeout: float, concurrency: int) -> None:
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(concurrency)
    keep = []
    errors: collections.Counter = collections.Counter()
    req = b"GET /1k.bin HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode()

    async def one():
        writer = None
        async with sem:
            try:
                reader, writer = await asyncio.open_connection(HOST, port)
                writer.write(req)
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
            except Exception as exc:  # noqa: BLE001 - counted and reported
                if writer is not None:
                    writer.close()
                errors[type(exc).__name__ + ": " + str(exc)[:60]] += 1
                return False

    t0 = time.monotonic()
    tasks = [loop.create_task(one()) for _ in range(n)]
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
    p.add_argument("--host", required=True)
    p.add_argument("--conns", type=int, required=True)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--concurrency", type=int, default=100)
    a = p.parse_args(argv)
    raise_nofile()
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    asyncio.run(_idle_client_main(a.port, a.host, a.conns, a.timeout, a.concurrency))
