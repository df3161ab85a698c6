"""kite expose --config: many kites on several relays, one tunnel per relay."""

from __future__ import annotations

import asyncio
import contextlib

from kite.backend.connector import Backend
from kite.config import load_backend_config
from support import SECRET, http_get, kite_env, run, start_banner_server, start_http_server


def test_config_file_many_kites_two_relays(tmp_path, loop_kind):
    async def main():
        web, web_port = await start_http_server(b"web\n")
        api, api_port = await start_http_server(b"api\n")
        raw, raw_port = await start_banner_server()
        async with contextlib.AsyncExitStack() as stack:
            (tmp_path / "r1").mkdir()
            (tmp_path / "r2").mkdir()
            env1 = await stack.enter_async_context(kite_env(tmp_path / "r1"))
            env2 = await stack.enter_async_context(kite_env(tmp_path / "r2"))
            cfg = tmp_path / "backend.toml"
            cfg.write_text(f"""
[defaults]
secret = "{SECRET}"
ca = "{env1.certs.cert}"

[[relay]]
address = "127.0.0.1:{env1.port}"

[[relay]]
address = "127.0.0.1:{env2.port}"
ca = "{env2.certs.cert}"

[[kite]]
name = "web.test.kite"
target = "http://127.0.0.1:{web_port}"

[[kite]]
name = "api.test.kite"
target = "{api_port}"
relays = ["127.0.0.1:{env2.port}"]

[[kite]]
name = "box.test.kite"
target = "tcp://127.0.0.1:{raw_port}"
public_port = 22
""")
            backend = Backend(load_backend_config(str(cfg)))
            await backend.start()
            try:
                await backend.wait_flying(20)
                for c in backend.connectors:
                    await asyncio.wait_for(_all_flying(c), 10)
                assert len(env1.relay.state.tunnels) == 1 and len(env2.relay.state.tunnels) == 1
                assert env1.relay.state.routes.kites() == [("http", "web.test.kite"),
                                                     ("raw-22", "box.test.kite")]
                assert env2.relay.state.routes.kites() == [("http", "api.test.kite"),
                                                     ("http", "web.test.kite"),
                                                     ("raw-22", "box.test.kite")]
                for env in (env1, env2):
                    head, body = await http_get(env.port, "web.test.kite")
                    assert body == b"web\n"
                head, body = await http_get(env2.port, "api.test.kite")
                assert body == b"api\n"
                head, body = await http_get(env1.port, "api.test.kite")
                assert head.startswith(b"HTTP/1.1 503")
            finally:
                await backend.close()
        for s in (web, api, raw):
            s.close()

    run(main, loop_kind)


async def _all_flying(connector):
    while not connector.tunnel or len(connector.tunnel.flying) < len(connector.spec.kites):
        await asyncio.sleep(0.01)


def test_backend_drains_open_streams_on_stop(tmp_path, loop_kind):
    """SIGTERM (the stop event) lets an open download finish before the tunnel closes."""
    from kite.backend.main import serve_backend
    from kite.config import BackendConfig, RelaySpec
    from support import http_kite

    async def main():
        release = asyncio.Event()

        async def slow(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\nConnection: close\r\n\r\n")
            writer.write(b"a" * 100000)
            await writer.drain()
            await release.wait()
            writer.write(b"b" * 100000)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(slow, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with kite_env(tmp_path) as env:
            cfg = BackendConfig(relays=[RelaySpec(host="127.0.0.1", port=env.port,
                                                  ca=env.certs.cert,
                                                  kites=[http_kite("drain.test.kite", port)])])
            stop = asyncio.Event()
            task = asyncio.ensure_future(serve_backend(cfg, stop))
            while not env.relay.state.routes.kites():
                await asyncio.sleep(0.01)
            reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: drain.test.kite\r\n\r\n")
            await reader.readuntil(b"\r\n\r\n")
            assert await reader.readexactly(100000) == b"a" * 100000
            stop.set()  # what SIGTERM does
            await asyncio.sleep(0)
            assert not task.done()
            release.set()
            assert await reader.readexactly(100000) == b"b" * 100000
            assert await reader.read() == b""  # the server closed: so does the visitor
            writer.close()
            assert await asyncio.wait_for(task, 10) == 0
        server.close()

    run(main, loop_kind)
