"""A real pagekite.py 1.5.2 backend behind a kite relay that terminates the visitors' TLS
for its http kite: the relay sends the decrypted request with ``RTLS: 1`` and pagekite.py
writes ``X-Forwarded-Proto: https`` for its local server (docs/protocol.md §8.3)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import pytest
from compat_env import FE_NAME, SECRET, ZONE, be_flying_marker, kite_name, start_services

from kite.net.tls import generate_self_signed
from kite.relay.grants import GrantTable, parse_grant
from kite.relay.server import RelayConfig, RelayServer
from support import run

pytestmark = pytest.mark.compat

WEB = kite_name("web")


@contextlib.asynccontextmanager
async def terminating_relay(certs, wild):
    """kite relay with the frontend's certificate first (its own name) and ``*.ZONE``."""
    cfg = RelayConfig(listen=[("127.0.0.1", 0)],
                      grants=GrantTable([parse_grant(f"*:*.{ZONE}:{SECRET}")]),
                      tls_cert=certs.fe_cert, tls_key=certs.fe_key,
                      tls_pairs=[(certs.fe_cert, certs.fe_key), wild], tls_names=[FE_NAME],
                      drain_timeout=1.0, allow_plain=True)  # the plain-tunnel case
    relay = RelayServer(cfg)
    (_host, relay.port), = await relay.start()
    try:
        yield relay
    finally:
        await relay.close(drain_timeout=0.2)


async def https_get(port: int, name: str, ca: str, path: str) -> bytes:
    ctx = ssl.create_default_context(cafile=ca)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                   server_hostname=name)
    writer.write(b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                 % (path.encode(), name.encode()))
    data = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    return data


@pytest.mark.parametrize("tunnel_tls", [False, True], ids=["plain-tunnel", "tls-tunnel"])
def test_pagekite_backend_gets_rtls(pagekite, certs, tmp_path, tunnel_tls):
    wild = (str(tmp_path / "wild.crt"), str(tmp_path / "wild.key"))
    generate_self_signed(*wild, [f"*.{ZONE}"])

    async def main():
        svc = await start_services(certs)
        try:
            async with terminating_relay(certs, wild) as relay:
                be = pagekite.backend(relay.port, [("http", WEB, svc.web)], tls=tunnel_tls)
                await be.await_log(be_flying_marker(relay.port, "http", WEB))
                data = await https_get(relay.port, WEB, wild[0], "/secure?x=1")
                head, _, body = data.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), (data, be.tail())
                # the local server's echo of the request pagekite.py gave it
                assert body.startswith(b"GET /secure?x=1 HTTP/1.1\r\n"), body
                assert b"X-Forwarded-Proto: https\r\n" in body, body
                assert b"X-Forwarded-For: 127.0.0.1\r\n" in body, body
                be.assert_healthy()
        finally:
            svc.close()

    run(main, "uvloop")
