"""What every module of the relay benchmark shares: paths, the loopback address, the names
the systems serve, size units, and the error that skips a system instead of ending the run."""

from __future__ import annotations

import os

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/
REPO = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, "results")
ENTRY_SCRIPT = os.path.join(BENCH, "relay_bench.py")  # also runs the idle-client helper

HOST = "127.0.0.1"
KITE_NAME = "app.bench.kite"
KITE_DOMAIN = "*.bench.kite"
PK_FE_NAME = "fe.bench.kite"  # pagekite.py's --tls_endpoint / --fe_certname
SECRET = "bench-s3cr3t"
#: The name HTTPS visitors ask for (SNI and Host) in the https systems: it must resolve to
#: HOST for wrk, which takes SNI from its URL, and it is not among the kite relay's own names.
TLS_NAME = "localhost"
#: The TLS 1.3 cipher suites every TLS peer in the comparison prefers: kite's own order
#: (kite.net.tls.TLS13_CIPHERSUITES; a test keeps the two equal), so nginx and stunnel
#: encrypt with the same AES-128-GCM as kite rather than OpenSSL's default AES-256-GCM.
TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384"

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


class BenchError(Exception):
    """A system did not start or a check failed: reported, and the run goes on."""
