"""Shared fixtures: both fast-path implementations, and the real pagekite.py module."""

import atexit
import os
import signal
import socket
import sys

import pytest

from fastpath_impls import FASTPATH_IMPLS, NO_EXT, REQUIRE_EXT, _load_impl  # noqa: F401
from kiteprocs import expose_process, http_origin, relay_process  # noqa: F401
from support import kill_live_procs


def _stop_on_sigterm(signum, frame):
    """A test run told to stop kills the processes its tests started, then stops as for
    Ctrl-C (fixtures' finalizers still run, and find them gone)."""
    kill_live_procs()
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    # In the main process and in each xdist worker: a SIGTERM (a CI timeout, a killed run)
    # must not leave a test's relays, backends and servers running.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    atexit.register(kill_live_procs)

# Debian's pagekite package installs the pagekite module for the system Python; its code
# is pure Python, so the test interpreter can import it.  Appended, so that the packages
# of the test environment win over Debian's copies.
PAGEKITE_DIST = "/usr/lib/python3/dist-packages"


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_kind(request):
    """Each test that takes it runs on uvloop and on plain asyncio."""
    return request.param


@pytest.fixture(params=FASTPATH_IMPLS)
def fastpath(request):
    """Each fast-path test runs on the compiled module and on its pure-Python twin."""
    return _load_impl(request.param)


@pytest.fixture(scope="session")
def pagekite_mod():
    """The real pagekite.py 1.5.2 package (Debian `pagekite`), for golden vectors."""
    if PAGEKITE_DIST not in sys.path:
        sys.path.append(PAGEKITE_DIST)
    # pagekite.pk runs sockschain.wrapmodule() at import, which replaces socket.socket for
    # the whole process with a blocking SOCKS-aware class: every later test's asyncio
    # connect would go through it.  Keep the real one.
    real_socket = socket.socket
    try:
        import pagekite
        from pagekite import pk  # noqa: F401  (the import that patches socket.socket)
        from pagekite.proto import proto  # noqa: F401
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"pagekite.py must be installed in CI (apt-get install pagekite): {exc}")
        pytest.skip(f"Debian package pagekite not installed: {exc}")
    finally:
        socket.socket = real_socket
    return pagekite


_REAL_SOCKET = socket.socket


@pytest.fixture(autouse=True)
def _keep_real_socket():
    """Undo any process-wide socket.socket replacement a test's import made (sockschain)."""
    yield
    socket.socket = _REAL_SOCKET
