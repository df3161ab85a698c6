"""pagekite.py's own sign-up against a kite relay (``kite relay --signup ZONE``): the
XML-RPC calls of its wizard (``getAvailableDomains``, ``signUp``, ``getSharedSecret``,
``addKite``) at ``/xmlrpc/``, made with pagekite.py's own client object and with the
stdlib's, then a pagekite.py 1.5.2 backend flies the new kite with the secret it got.
(issue 13)"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import xmlrpc.client

import pytest
from compat_env import FE_NAME, be_flying_marker, pagekite_path, start_services

from kite.relay.config import RelayConfig
from kite.relay.server import RelayServer
from support import run

pytestmark = pytest.mark.compat

ZONE = "signup.testkite.local"


# pagekite.py's own client: PageKite.GetServiceXmlRpc() of the installed pagekite package,
# run by pagekite.py's interpreter (its shebang), one call per process, answers as JSON.
_PK_CALL = """
import json, sys
from pagekite import pk
kite = pk.PageKite()
kite.service_xmlrpc = sys.argv[1]
service = kite.GetServiceXmlRpc()
print(json.dumps(getattr(service, sys.argv[2])(*sys.argv[3:])))
"""


def _pagekite_call(url: str, method: str, *args: str):
    with open(pagekite_path(), "rb") as f:
        interpreter = f.readline().decode().removeprefix("#!").split()
    out = subprocess.run([*interpreter, "-c", _PK_CALL, url, method, *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _raw_post(port: int, body: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"POST /xmlrpc/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_pagekite_signup_over_xmlrpc_then_fly(pagekite, certs, tmp_path):
    async def main():
        svc = await start_services(certs)
        # allow_plain: pagekite.py flies over plain TCP here
        cfg = RelayConfig(listen=[("127.0.0.1", 0)], allow_plain=True, tls_cert=certs.fe_cert,
                          tls_key=certs.fe_key, tls_names=[FE_NAME, "127.0.0.1"],
                          db=str(tmp_path / "kite.db"), drain_timeout=1.0,
                          signup_zone=ZONE, signup_quota=50_000_000, signup_per_hour=3)
        relay = RelayServer(cfg)
        (_host, port), = await relay.start()
        url = f"http://127.0.0.1:{port}/xmlrpc/"
        try:
            std = xmlrpc.client.ServerProxy(url)
            call = asyncio.to_thread

            assert await call(_pagekite_call, url, "getAvailableDomains", "", "") == [f".{ZONE}"]
            got = await call(_pagekite_call, url, "signUp", "pk@x.org", f"bob.{ZONE}")
            assert set(got) == {"secret", "timeout"} and got["timeout"] > 0
            secret = got["secret"]
            for args, error in ((("pk@x.org", f"eve.{ZONE}"), "pleaselogin"),
                                (("b@x.org", f"bob.{ZONE}"), "domaintaken"),
                                (("not-an-email", f"eve.{ZONE}"), "email"),
                                (("b@x.org", "eve.other.local"), "domain"),
                                (("b@x.org", f"a.b.{ZONE}"), "domain"),
                                (("b@x.org", f"x'; drop table kites;--.{ZONE}"), "domain")):
                assert await call(std.signUp, *args) == {"error": error}, args

            # "Logging on" takes the account's secret as the password; every failure is the
            # same Fault, whether the account exists or not.
            assert await call(std.getSharedSecret, "pk@x.org", secret) == secret
            faults = []
            for args in (("pk@x.org", "wrong"), ("nobody@x.org", secret), ("", "")):
                with pytest.raises(xmlrpc.client.Fault) as exc:
                    await call(std.getSharedSecret, *args)
                faults.append(exc.value.faultString)
            assert faults == ["login failed"] * 3
            assert await call(_pagekite_call, url, "addKite", "pk@x.org", secret,
                              f"bob2.{ZONE}") == {}
            assert await call(std.addKite, "pk@x.org", secret, f"bob2.{ZONE}") == {}  # again
            with pytest.raises(xmlrpc.client.Fault):
                await call(std.addKite, "pk@x.org", "wrong", f"eve.{ZONE}")
            # Sign-ups and added kites share the per-address limit (3 an hour here).
            assert await call(std.signUp, "c@x.org", f"carol.{ZONE}") == {"error": "ratelimit"}

            # Bad input: a Fault, and the relay serves on.
            for body in (b"<?xml version='1.0'?><methodCall><methodName>signUp",
                         b"<!DOCTYPE x [<!ENTITY a 'aaaa'>]><methodCall><methodName>&a;"
                         b"</methodName></methodCall>",
                         xmlrpc.client.dumps((1, 2), "signUp").encode(),
                         xmlrpc.client.dumps(("a",), "signUp").encode(),
                         xmlrpc.client.dumps(("a", "b"), "deleteEverything").encode()):
                out = await call(_raw_post, port, body)
                assert out.startswith(b"HTTP/1.1 200 OK\r\n") and b"<fault>" in out, out
            out = await call(_raw_post, port, b"x" * 5000)
            assert out.startswith(b"HTTP/1.1 413 "), out

            # pagekite.py 1.5.2 flies both kites with the secret it was given.
            be = pagekite.backend(port, [("http", f"bob.{ZONE}", svc.web, secret),
                                         ("http", f"bob2.{ZONE}", svc.web, secret)])
            await be.await_log(be_flying_marker(port, "http", f"bob.{ZONE}"))
            await be.await_log(be_flying_marker(port, "http", f"bob2.{ZONE}"))
        finally:
            await relay.close(drain_timeout=0.2)
            svc.close()

    run(main, "uvloop")
