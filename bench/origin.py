"""A small HTTP/1.1 origin for the relay benchmark, used when nginx is not installed.

It does what the benchmark's nginx configuration does, and nothing more:

* ``GET``/``HEAD /NAME``: a file from ``--root`` with ``Content-Length`` (sent with
  ``loop.sendfile``, which is ``os.sendfile`` on plain asyncio; uvloop has none, so there
  the file is read and written 1 MiB at a time);
* ``PUT /up/NAME``: the body is written to ``ROOT/.tmp/`` as it arrives (so the benchmark can
  see how far a time-capped upload got), renamed to ``ROOT/up/NAME`` when complete, and
  answered ``201 Created``;
* ``PUT /sink``: the body is read and dropped, then ``204`` (scale-uploads);
* keep-alive unless the request says ``Connection: close``; no chunked bodies (``411``).

    python bench/origin.py --port 8080 --root /dev/shm/www     # logs "origin listening on ..."

It is a fallback, not a rival to nginx: a Python origin costs CPU that the systems under test
then do not have, so figures taken with it are lower and are marked as such.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile

MAX_HEAD = 16384  # bytes; a request head longer than this is refused (431)
READ_PIECE = 1 << 20


class Origin:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.tmp = os.path.join(self.root, ".tmp")
        os.makedirs(self.tmp, exist_ok=True)
        os.makedirs(os.path.join(self.root, "up"), exist_ok=True)

    def _path(self, target: str):
        path = target.split("?", 1)[0]
        full = os.path.normpath(os.path.join(self.root, path.lstrip("/")))
        if not full.startswith(self.root + os.sep):
            return None
        return full

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                keep = await self._one(head, reader, writer)
                if not keep:
                    return
        finally:
            writer.close()

    async def _one(self, head: bytes, reader, writer) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            await self._reply(writer, 400, b"bad request line\n", close=True)
            return False
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
        if "chunked" in headers.get("transfer-encoding", "").lower():
            await self._reply(writer, 411, b"chunked bodies not supported\n", close=True)
            return False
        length = int(headers.get("content-length", "0") or 0)
        full = self._path(target)
        if method == "PUT" and target == "/sink":  # scale-uploads: read and drop the body
            left = length
            while left:
                data = await reader.read(min(left, READ_PIECE))
                if not data:
                    return False
                left -= len(data)
            await self._reply(writer, 204, b"", close=close)
            return not close
        if method == "PUT":
            if full is None or not target.startswith("/up/"):
                await self._reply(writer, 403, b"PUT only under /up/\n", close=True)
                return False
            fd, tmp = tempfile.mkstemp(dir=self.tmp)
            try:
                with os.fdopen(fd, "wb", buffering=0) as f:
                    left = length
                    while left:
                        data = await reader.read(min(left, READ_PIECE))
                        if not data:
                            raise ConnectionError("client went away mid-body")
                        f.write(data)
                        left -= len(data)
                existed = os.path.exists(full)
                os.replace(tmp, full)
            except BaseException:
                os.unlink(tmp)
                raise
            await self._reply(writer, 204 if existed else 201, b"", close=close)
            return not close
        if length:  # a body we do not want: read and drop it
            await reader.readexactly(length)
        if method not in ("GET", "HEAD"):
            await self._reply(writer, 405, b"method not allowed\n", close=close)
            return not close
        if full is None or not os.path.isfile(full):
            await self._reply(writer, 404, b"not found\n", close=close)
            return not close
        size = os.path.getsize(full)
        writer.write(b"HTTP/1.1 200 OK\r\nServer: kite-bench-origin\r\n"
                     b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n%s\r\n"
                     % (size, b"Connection: close\r\n" if close else b""))
        if method == "GET" and size:
            with open(full, "rb") as f:
                if size <= 65536:
                    writer.write(f.read())
                else:
                    await writer.drain()
                    try:
                        await asyncio.get_running_loop().sendfile(writer.transport, f)
                    except NotImplementedError:  # uvloop has no loop.sendfile
                        while piece := f.read(READ_PIECE):
                            writer.write(piece)
                            await writer.drain()
        await writer.drain()
        return not close

    async def _reply(self, writer, status: int, body: bytes, *, close: bool):
        reason = {201: "Created", 204: "No Content", 400: "Bad Request", 403: "Forbidden",
                  404: "Not Found", 405: "Method Not Allowed", 411: "Length Required"}[status]
        writer.write(b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\n%s\r\n"
                     % (status, reason.encode(), len(body), b"Connection: close\r\n" if close else b"")
                     + body)
        await writer.drain()


async def serve(host: str, port: int, root: str):
    origin = Origin(root)
    server = await asyncio.start_server(origin.handle, host, port, backlog=4096, limit=MAX_HEAD)
    bound = server.sockets[0].getsockname()
    print(f"origin listening on {bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--root", required=True, help="directory of the files to serve")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args(argv)
    if args.loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            uvloop = None
        if uvloop is not None:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        asyncio.run(serve(args.host, args.port, args.root))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
