"""``kite demo``: a relay, a backend and a sample site on loopback, and one page through them.

Everything runs in this process on 127.0.0.1 with a freshly generated certificate: the
tunnel is real TLS, verified against that certificate, exactly as in production.  What to
try is printed on stdout (flushed at once: the demo keeps running after it).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile

from .backend.connector import Backend
from .config import BackendConfig, KiteSpec, RelaySpec, Target
from .net.tls import generate_self_signed
from .relay.grants import GrantTable, parse_grant
from .relay.server import RelayConfig, RelayServer

DEMO_NAME = "demo.kite.localhost"

PAGE = b"""<!DOCTYPE html>
<html><head><title>kite demo</title></head>
<body><h1>Hello from behind the tunnel</h1>
<p>This page is served by a small local server and reached through kite relay
and kite expose over a TLS tunnel.</p></body></html>
"""


async def _sample_site(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            fwd = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"x-forwarded-for")]
            extra = b"X-Seen-" + fwd[0] + b"\r\n" if fwd else b""
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n%s\r\n"
                         % (len(PAGE), extra) + PAGE)
            await writer.drain()
            if b"connection: close" in head.lower():
                break
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


def _say(line: str) -> None:
    print(line, flush=True)


async def fetch(host: str, port: int, name: str, path: str = "/") -> tuple:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode("latin-1")
    return status, body


async def run_demo(stop: asyncio.Event, *, once: bool = False) -> int:
    with tempfile.TemporaryDirectory(prefix="kite-demo-") as tmp:
        cert, key = os.path.join(tmp, "relay.crt"), os.path.join(tmp, "relay.key")
        generate_self_signed(cert, key, ["localhost", "127.0.0.1"])
        secret = os.urandom(12).hex()
        site = await asyncio.start_server(_sample_site, "127.0.0.1", 0)
        site_port = site.sockets[0].getsockname()[1]
        relay = RelayServer(RelayConfig(
            listen=[("127.0.0.1", 0)], grants=GrantTable([parse_grant(f"*:{DEMO_NAME}:{secret}")]),
            tls_cert=cert, tls_key=key, tls_names=["localhost"]))
        (rhost, rport), = await relay.start()
        kite = KiteSpec(domain=DEMO_NAME, proto="http", secret=secret,
                        target=Target("http", "127.0.0.1", site_port))
        backend = Backend(BackendConfig(relays=[RelaySpec(host="127.0.0.1", port=rport, ca=cert,
                                                          kites=[kite])]))
        await backend.start()
        try:
            await backend.wait_flying(timeout=15)
            status, body = await fetch(rhost, rport, DEMO_NAME)
            url = f"http://{DEMO_NAME}:{rport}/"
            _say(f"kite demo: relay on {rhost}:{rport} (TLS tunnels), backend flying "
                 f"{DEMO_NAME} -> sample site on 127.0.0.1:{site_port}")
            _say(f"fetched {url} through the tunnel: {status} ({len(body)} bytes)")
            if not status.startswith("HTTP/1.1 200"):
                print("kite demo: the page did not come through", file=sys.stderr, flush=True)
                return 1
            _say(f"open {url}  or try:  curl {url}")
            _say(f"                    curl -H 'Host: {DEMO_NAME}' http://{rhost}:{rport}/")
            if not once:
                _say("press Ctrl-C to stop")
                await stop.wait()
            return 0
        finally:
            await backend.close()
            await relay.close(drain_timeout=1.0)
            site.close()
