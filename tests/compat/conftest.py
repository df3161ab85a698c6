"""Fixtures for the interoperability suite: the real pagekite.py 1.5.2 (Debian ``pagekite``)
as frontend and backend, next to kite's relay and backend (helpers: compat_env.py).

pagekite.py runs as owned subprocesses, always with the loopback-only flags of
docs/protocol.md §14.1 (``--clean --noproxy``, explicit 127.0.0.1 addresses, never
``--defaults``/``--frontends``/``--dyndns``), with ``--logfile`` so that tests wait for its
success markers instead of sleeping.  Every process is started in its own session and killed
by process group when the test ends.

kite runs in-process (the test's event loop), as in tests/test_relay_e2e.py, so tests can
look at tunnels, registration variants, PINGs and inflated ZChunks directly.

Skipped, with the reason, where pagekite.py is not installed; under CI (env ``CI``) a
missing pagekite.py is a failure (.ci/run installs it).
"""

from __future__ import annotations

import os

import pytest
from compat_env import FE_NAME, MEASUREMENTS, CompatCerts, PageKiteFactory, kite_name, pagekite_path

from kite.net.tls import generate_self_signed


@pytest.fixture(autouse=True)
def _require_pagekite():
    if pagekite_path() is None:
        if os.environ.get("CI"):
            pytest.fail("pagekite.py (Debian package 'pagekite') is missing, but CI must run the "
                        "compat suite: .ci/run installs it with apt-get install pagekite")
        pytest.skip("pagekite.py is not installed (apt-get install pagekite); the compat suite "
                    "needs the real program")



@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> CompatCerts:
    d = tmp_path_factory.mktemp("certs")
    fe_cert, fe_key = str(d / "fe.crt"), str(d / "fe.key")
    generate_self_signed(fe_cert, fe_key, [FE_NAME])
    fe_pem = str(d / "fe.pem")
    with open(fe_pem, "w") as out:
        out.write(open(fe_key).read() + open(fe_cert).read())
    site = kite_name("secure")
    site_cert, site_key = str(d / "site.crt"), str(d / "site.key")
    generate_self_signed(site_cert, site_key, [site])
    return CompatCerts(fe_cert, fe_key, fe_pem, site_cert, site_key, site)


@pytest.fixture
def pagekite(tmp_path, certs):
    factory = PageKiteFactory(tmp_path, certs)
    try:
        yield factory
    finally:
        factory.stop_all()


def pytest_terminal_summary(terminalreporter):
    if MEASUREMENTS:
        terminalreporter.section("kite <-> pagekite.py measurements")
        for line in MEASUREMENTS:
            terminalreporter.write_line(line)
