"""kite expose --config: many kites on several relays, one tunnel per relay."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from kite.backend.connector import Backend
from kite.config import load_backend_config
from support import SECRET, http_get, kite_env, run, start_banner_server, start_http_server


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_kind(request):
    return request.param


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
                assert len(env1.relay.tunnels) == 1 and len(env2.relay.tunnels) == 1
                assert env1.relay.routes.kites() == [("http", "web.test.kite"),
                                                     ("raw-22", "box.test.kite")]
                assert env2.relay.routes.kites() == [("http", "api.test.kite"),
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
