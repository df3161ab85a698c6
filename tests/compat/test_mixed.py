"""Mixed fleets during a migration: one kite flown on a kite relay and on a pagekite.py
frontend at the same time, by kite expose and by pagekite.py; and the real ``kite relay``
command with a pagekite.py backend and curl as the visitor."""

from __future__ import annotations

import asyncio
import subprocess

import pytest
from compat_env import (
    FE_NAME,
    SECRET,
    MiB,
    be_flying_marker,
    blob,
    check_kites,
    download,
    fe_live_marker,
    free_port,
    http_get,
    http_kite,
    https_kite,
    kite_backend,
    kite_name,
    kite_relay,
    raw_kite,
    relay_spec,
    report,
    sha,
    start_services,
)

from support import KITE, Proc, run

pytestmark = pytest.mark.compat

WEB, WEB2, SECURE, BOX, BULK = (kite_name(n) for n in ("web", "web2", "secure", "box", "bulk"))


def test_same_kites_on_kite_relay_and_pagekite_frontend(pagekite, certs):
    fe = pagekite.frontend()
    size = 4 * MiB

    async def main():
        svc = await start_services(certs)
        kites = [http_kite(WEB, svc.web), https_kite(SECURE, svc.https), raw_kite(BOX, svc.raw, 22),
                 http_kite(BULK, svc.bulk)]
        async with kite_relay(certs) as relay:
            # kite expose: both relays at once, both over TLS reached with CONNECT FE_NAME:443
            backend = kite_backend([relay_spec(relay.port, kites, certs, "connect"),
                                    relay_spec(fe.port, kites, certs, "connect")])
            # pagekite.py: one more kite, on both relays at once (two --frontend)
            be = pagekite.backend(relay.port, [("http", WEB2, svc.web)], frontends=[fe.port])
            await backend.start()
            try:
                await backend.wait_flying(30)
                for port in (relay.port, fe.port):
                    await be.await_log(be_flying_marker(port, "http", WEB2))
                await fe.await_log(fe_live_marker("http", WEB))
                to_kite, to_pagekite = (c.tunnel for c in backend.connectors)
                # Towards kite: in-band registration, big windows; towards pagekite.py:
                # re-connect registration, pagekite-sized windows and the frame budget.
                assert to_kite.kite_peer and to_kite.signed is None
                assert not to_pagekite.kite_peer and to_pagekite.signed is not None
                for port in (relay.port, fe.port):
                    await check_kites(port, certs, web=WEB, extra_web=(WEB2,), raw=BOX)
                # The same bulk kite through both relays at the same time.
                (got1, d1, t1), (got2, d2, t2) = await asyncio.gather(
                    download(relay.port, BULK, size), download(fe.port, BULK, size))
                assert got1 == got2 == size and d1 == d2 == sha(blob(size))
                report(f"mixed: one kite on kite relay ({size / t1 / MiB:.1f} MiB/s) and on "
                       f"pagekite.py FE ({size / t2 / MiB:.2f} MiB/s) at once")
                fe.assert_healthy()
                be.assert_healthy()
            finally:
                await backend.close()
        svc.close()

    run(main, "uvloop", timeout=120)


def test_kite_relay_command_with_pagekite_backend_and_curl(pagekite, certs, tmp_path):
    """``kite relay --zchunks --tls-name`` (the real command) as the frontend of a pagekite.py
    backend with an encrypted tunnel; curl is the visitor, plain and through CONNECT :443."""
    port = free_port()
    relay = Proc([*KITE, "relay", "--listen", f"127.0.0.1:{port}", "--tls-cert", certs.fe_cert,
                  "--tls-key", certs.fe_key, "--tls-name", FE_NAME, "--zchunks",
                  "--kite", f"*:*.{FE_NAME.split('.', 1)[1]}:{SECRET}"], tmp_path, "relay")
    try:
        relay.wait_for("relay listening on", 30)

        async def main():
            svc = await start_services(certs)
            be = pagekite.backend(port, [("http", WEB, svc.web), ("https", SECURE, svc.https)],
                                  tls=True)
            for proto, domain in (("http", WEB), ("https", SECURE)):
                await be.await_log(be_flying_marker(port, proto, domain))

            async def curl(*args):
                proc = await asyncio.create_subprocess_exec(
                    "curl", "-sS", "--max-time", "20", *args, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE)
                out, err = await proc.communicate()
                assert proc.returncode == 0, err
                return out

            out = await curl("-H", f"Host: {WEB}", f"http://127.0.0.1:{port}/curl")
            assert out.startswith(b"GET /curl HTTP/1.1\r\n")
            out = await curl("--cacert", certs.site_cert, "-x", f"http://127.0.0.1:{port}",
                             f"https://{SECURE}/via-connect")
            assert out == b"secure hello: /via-connect\n"
            head, _ = await http_get(port, kite_name("nosuch"))
            assert head.split(b" ")[1] in (b"404", b"503")
            be.assert_healthy()
            svc.close()

        run(main, "uvloop", timeout=60)
        relay.wait_for(f"kite online: http:{WEB}", 5)
        assert "TLS, 1.5.2.201011" in relay.output()  # the tunnel came in encrypted
    finally:
        relay.stop()


def test_switch_backend_from_pagekite_to_kite_with_its_rc_file(pagekite, certs, tmp_path):
    """The migration path: a pagekite.py backend runs from its rc file; it is stopped,
    ``kite import-pagekiterc`` converts that file, and ``kite expose --config`` serves the
    same kites on the same (unchanged) pagekite.py frontend."""
    from compat_env import RAW_BANNER, PageKite, raw_roundtrip

    from kite.pagekiterc import convert

    fe = pagekite.frontend()
    mig = kite_name("mig")

    async def main():
        svc = await start_services(certs)
        rc = tmp_path / "pagekite.rc"
        rc.write_text(
            "##[ Default kite and account details ]##\n"
            f"kitename   = {mig}\n"
            f"kitesecret = {SECRET}\n"
            f"frontend = 127.0.0.1:{fe.port}\n"
            f"fe_certname = {FE_NAME}\n"
            f"ca_certs = {certs.fe_pem}\n"
            f"service_on = http:@kitename : 127.0.0.1:{svc.web} : @kitesecret\n"
            f"service_on = ssh:@kitename : 127.0.0.1:{svc.raw} : @kitesecret\n"
            f"savefile = {tmp_path / 'saved.rc'}\n")
        be = PageKite([f"--optfile={rc}"], tmp_path, "pk-be-rc")
        pagekite.procs.append(be)
        for proto in ("http", "raw-22"):
            await be.await_log(be_flying_marker(fe.port, proto, mig))
        # pagekite.py's own frontend drops an in-band registered tunnel at a PING from its
        # backend, sometimes a second after it came up (docs §13.2); the backend then comes
        # back.  So "before" is a request the pair served, within a bound.
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            _, body = await http_get(fe.port, mig, "/before")
            if b"Sorry! (fe)" not in body or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.5)  # a bounded poll while pagekite.py reconnects
        assert body.startswith(b"GET /before HTTP/1.1\r\n")
        be.stop()

        kind, toml, report = convert(rc.read_text(), str(rc))
        assert kind == "backend"
        assert [ln.option for ln, _ in report.unconverted] == []
        conf = tmp_path / "kite.toml"
        conf.write_text(toml)
        exp = Proc([*KITE, "expose", "--config", str(conf)], tmp_path, "expose")
        try:
            await asyncio.to_thread(exp.wait_for, f"kite flying: raw-22:{mig}", 30)
            await asyncio.to_thread(exp.wait_for, f"kite flying: http:{mig}", 30)
            _, body = await http_get(fe.port, mig, "/after")
            assert body.startswith(b"GET /after HTTP/1.1\r\n")
            banner, echo, _ = await raw_roundtrip(fe.port, mig, 22)
            assert banner == RAW_BANNER and echo == b"HELLO RAW\n"
            fe.assert_healthy()
        finally:
            exp.stop()
        svc.close()

    run(main, "uvloop", timeout=90)
