import asyncio, pytest, time, os
from conftest import *
from support import run, start_http_server

def test_tls_rc(pagekite, certs):
    async def main():
        server, port = await start_http_server(b"x")
        async with kite_relay(certs, keepalive=6) as relay:
            be = pagekite.backend(relay.port, [("http", "w.testkite.local", port)], tls=True, zchunks=False, extra=["--loglevel=debug", "--debugio"])
            await be.await_log(be_flying_marker(relay.port, "http", "w.testkite.local"))
            t = next(iter(relay.tunnels))
            t0 = time.monotonic()
            await asyncio.sleep(12)
            print("pings", t.pings_sent, "pongs", t.pongs_received, t.closed, t.close_reason)
    run(main, "uvloop", timeout=200)
