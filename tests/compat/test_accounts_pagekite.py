"""A pagekite.py 1.5.2 backend on a kite relay with accounts (``--db``): told its quota,
refused with pagekite's reasons (issue 13)."""

from __future__ import annotations

import pytest
from compat_env import FE_NAME, be_flying_marker, kite_name, start_services

from kite.relay.config import RelayConfig
from kite.relay.server import RelayServer
from kite.store.sqlite import SqliteStore
from support import run

pytestmark = pytest.mark.compat

WEB = kite_name("acct")


def test_pagekite_backend_quota_and_refusals(pagekite, certs, tmp_path):
    db = str(tmp_path / "kite.db")
    store = SqliteStore(db)
    acct = store.add_account("pk@x.org", 3 * 1024 * 1024, 30)
    store.set_kite("pk@x.org", WEB, frozenset({"http"}))

    async def main():
        svc = await start_services(certs)
        cfg = RelayConfig(listen=[("127.0.0.1", 0)], tls_cert=certs.fe_cert,
                          tls_key=certs.fe_key, tls_names=[FE_NAME], db=db, drain_timeout=1.0,
                          allow_plain=True)  # the pagekite.py backend tunnels in plain
        relay = RelayServer(cfg)
        (_host, port), = await relay.start()
        try:
            be = pagekite.backend(port, [("http", WEB, svc.web, acct.secret)])
            await be.await_log(be_flying_marker(port, "http", WEB))
            await be.await_log("quota_bw=3072; quota_days=29")  # X-PageKite-Quota (kB), QDays
            be.stop()
            store.set_quota("pk@x.org", 0, add=False)
            await relay.state.registry.reload()
            be = pagekite.backend(port, [("http", WEB, svc.web, acct.secret)])
            await be.await_log(f"err=Rejected; proto=http; reason=quota; domain={WEB}")
            store.set_quota("pk@x.org", 10**6, add=False)
            store.set_disabled("pk@x.org", True)
            await relay.state.registry.reload()
            be.stop()  # pagekite.py waits long before it retries a rejected kite
            be = pagekite.backend(port, [("http", WEB, svc.web, acct.secret)])
            await be.await_log(f"err=Rejected; proto=http; reason=unauthorized; domain={WEB}")
        finally:
            await relay.close(drain_timeout=0.2)
            svc.close()

    run(main, "uvloop")
