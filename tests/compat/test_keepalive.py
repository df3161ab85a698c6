"""Tunnels between kite and pagekite.py 1.5.2 survive long idleness on keepalives.

pagekite.py 1.5.2 frontends close an in-band-registered tunnel at the backend's first PING
(docs/protocol.md §13.2), so kite expose registers with the re-connect variant.  This
test proves the choice over many keepalive rounds in both directions, with short intervals
so that they happen in test time:

* kite expose -> pagekite.py FE, kite pings (keepalive 2 s: a PING after each second of
  silence).  At least 40 PING/PONG rounds: with kite's default keepalive of 30 s (PING
  after 15 s of silence) that is ten minutes of idleness;
* kite expose -> pagekite.py FE (``--keepalive=20``), the frontend pings (it checks every
  36 s);
* pagekite.py BE (``--keepalive=20``) -> kite relay, the backend pings, twice;
* pagekite.py BE -> kite relay (keepalive 2 s), the relay pings, 40 rounds or more.

Every tunnel must still be the same connection at the end (no reconnect), both pagekite.py
processes must be free of errors, and all kites must answer.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from compat_env import (
    be_flying_marker,
    fe_live_marker,
    http_get,
    http_kite,
    kite_backend,
    kite_name,
    kite_relay,
    relay_spec,
    report,
)

from support import run, start_http_server

pytestmark = [pytest.mark.compat, pytest.mark.slow]

KA1, KA2, KA3 = kite_name("ka1"), kite_name("ka2"), kite_name("ka3")
ROUNDS = 40


def test_tunnels_survive_idleness_on_keepalives(pagekite, certs):
    fe = pagekite.frontend(tls=False, keepalive=20)
    fe_started = time.monotonic()

    async def main():
        server, port = await start_http_server(b"still here\n")
        # kite expose -> pagekite.py FE: one tunnel where kite pings, one where the FE does
        pinger = kite_backend([relay_spec(fe.port, [http_kite(KA1, port)], certs, "plain")],
                              keepalive=2.0, ping_timeout=5.0)
        quiet = kite_backend([relay_spec(fe.port, [http_kite(KA2, port)], certs, "plain")],
                             keepalive=600.0)
        async with kite_relay(certs, keepalive=2.0, ping_timeout=5.0) as relay_pinging, \
                kite_relay(certs, keepalive=600.0) as relay_quiet:
            # pagekite.py BE -> two kite relays: one pings it, on the other it pings.
            be = pagekite.backend(relay_pinging.port, [("http", KA3, port)],
                                  frontends=[relay_quiet.port], keepalive=20)
            await pinger.start()
            await quiet.start()
            try:
                await pinger.wait_flying(30)
                await quiet.wait_flying(30)
                for r in (relay_pinging, relay_quiet):
                    await be.await_log(be_flying_marker(r.port, "http", KA3))
                await fe.await_log(fe_live_marker("http", KA1))
                await fe.await_log(fe_live_marker("http", KA2))
                t_expose = pinger.connectors[0].tunnel
                t_fe_pings = quiet.connectors[0].tunnel
                t_relay = next(iter(relay_pinging.state.tunnels))
                t_be_pings = next(iter(relay_quiet.state.tunnels))
                tunnels = {"kite expose pings pagekite FE": t_expose,
                           "pagekite FE pings kite expose": t_fe_pings,
                           "kite relay pings pagekite BE": t_relay,
                           "pagekite BE pings kite relay": t_be_pings}
                t0 = time.monotonic()

                def done():
                    return (t_expose.pongs_received >= ROUNDS
                            and t_relay.pongs_received >= ROUNDS
                            and t_fe_pings.pings_received >= 1
                            and t_be_pings.pings_received >= 2)

                # Nothing but keepalives from here on: no visitors until the end.
                deadline = fe_started + 85
                while not done():
                    for name, t in tunnels.items():
                        assert not t.closed, f"{name}: tunnel closed: {t.close_reason}"
                    assert time.monotonic() < deadline, {
                        n: (t.pings_sent, t.pongs_received, t.pings_received)
                        for n, t in tunnels.items()}
                    await asyncio.sleep(0.5)
                idle = time.monotonic() - t0
                # The very same connections, no reconnect on either side.
                assert pinger.connectors[0].tunnel is t_expose
                assert quiet.connectors[0].tunnel is t_fe_pings
                assert relay_pinging.state.tunnels == {t_relay}
                assert relay_quiet.state.tunnels == {t_be_pings}
                for name, t in tunnels.items():
                    assert not t.closed, name
                assert t_expose.pings_sent - t_expose.pongs_received <= 1
                # pagekite.py logged the RTT of each PONG it got from kite.
                assert be.count("tunnel_ping_ms=") >= 2
                assert fe.count("tunnel_ping_ms=") >= 1
                fe.assert_healthy()
                be.assert_healthy()
                for p, name in ((fe.port, KA1), (fe.port, KA2), (relay_pinging.port, KA3),
                                (relay_quiet.port, KA3)):
                    _, body = await http_get(p, name)
                    assert body == b"still here\n"
                report(f"keepalive: {idle:.0f} s idle; kite expose->pagekite FE "
                       f"{t_expose.pongs_received} PING/PONG rounds, kite relay->pagekite BE "
                       f"{t_relay.pongs_received}, pagekite BE->kite relay "
                       f"{t_be_pings.pings_received}, pagekite FE->kite expose "
                       f"{t_fe_pings.pings_received}; no tunnel was re-established")
            finally:
                await pinger.close()
                await quiet.close()
        server.close()

    run(main, "uvloop", timeout=150)
