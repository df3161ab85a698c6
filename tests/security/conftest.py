"""Fixtures for the security tests: a real ``kite relay`` (and ``kite expose``) process per
test, on an ephemeral loopback port, owned by the test and killed by PID at its end, with
what /proc says about it (RSS, CPU time, open descriptors)."""

from __future__ import annotations

# relay_process and expose_process: tests/kiteprocs.py, through tests/conftest.py.
