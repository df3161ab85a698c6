"""Relay benchmark: kite against a direct connection, haproxy, a stunnel pair and pagekite.py, on loopback.

Every system is started by this script on 127.0.0.1 in front of the same origin (nginx with
its own config and its files in /dev/shm, sendfile on; ``bench/origin.py`` when nginx is
missing), and visitors reach the origin through it:

  direct          client -> origin
  haproxy         client -> haproxy (mode tcp, nbthread 1, no TLS) -> origin
  stunnel         client -> stunnel (client mode) -> TLS -> stunnel (server mode) -> origin
                  (the C reference: a TLS tunnel of the same shape as kite, one TLS connection
                  per visitor connection)
  pagekite        pagekite.py frontend + backend over a TLS tunnel (Debian package pagekite)
  pagekite-tuned  the same with --select_loop_min_ms=0 --max_read_bytes=262144
  kite            kite relay + kite expose over TLS, uvloop, compiled fast path
  kite-py         the same with KITE_NO_EXTENSIONS=1 (pure-Python fast path)
  kite-asyncio    kite on plain asyncio instead of uvloop (compiled fast path)

"relay" below means the process visitors connect to (kite relay, pagekite.py frontend,
stunnel in client mode) and "backend" the one that connects to the origin (kite expose,
pagekite.py backend, stunnel in server mode).  A system that is not installed is skipped
with a note.

Workloads (each started on a fresh instance of the system, after the check):

  check    a file of --check-size down and up: content intact (SHA-256), the visitor served by
           the relay process, the origin reached by the backend process, and at least that
           many bytes counted by the kernel on the tunnel connection(s) (ss -ti), the compiled
           fast path and uvloop mapped in (or not) as the system's name says
  bulk     --bulk-size down and up on one connection, MB/s (10^6 B/s); CPU seconds per GB
           (10^9 B) of the relay and of the backend; a transfer is cut at --bulk-cap seconds
           (then the bytes that arrived are counted: client side down, origin side up)
  c50      wrk, --wrk-conns keep-alive connections fetching a 1 KiB file: req/s, p50, p99
  seq      one keep-alive connection, sequential requests: req/s, p50, p99 per request
  newconn  wrk with "Connection: close": one request per connection, connections/s
  idle     --idle-conns visitor connections that each fetched the 1 KiB file and then stay
           open and idle: RSS per connection of relay + backend, and meanwhile one
           connection's sequential-request latency (p50, p99)

The scaling curves (not run by default; --workloads, or --curves for these and idle):

  scale-conns      wrk at each of --conn-levels keep-alive connections: req/s, p50, p99
  scale-downloads  each of --download-levels concurrent downloads of the bulk file for
                   --download-duration s: aggregate MB/s, Jain's index over the per-download bytes
  scale-uploads    each of --download-levels concurrent endless uploads (PUT /sink, which the
                   origin drops), counted for --download-duration s after a 1 s warm-up:
                   aggregate MB/s, Jain's index over the per-upload bytes
  idle             at --idle-levels up to 100,000 (several 127.0.0.x source addresses beyond
                   one port range; a level beyond the descriptor or port limits is skipped)

Each figure is the median of --rounds interleaved rounds (every system once per round, in a
rotated order), shown with min..max.  Output: a table on stdout (progress on stderr), JSON
lines (--json) and a PNG chart (--png, needs matplotlib).  Benchmarks are not tests: nothing
here asserts a speed.  Every process started here is stopped by its PID at the end, also on
Ctrl-C or an error.

    python bench/relay_bench.py                  # everything (full sizes; ~15 min on 2 cores)
    python bench/relay_bench.py --quick          # a smoke run: 1 round, 64 MiB, 3 s wrk, 200 idle
    python bench/relay_bench.py --systems kite,stunnel --workloads bulk,c50
    python bench/relay_bench.py --profile        # plus py-spy profiles of kite during c50
    python bench/relay_bench.py --curves         # the scaling curves

The code, one job per module (imports go one way: cli -> workloads, report, profiling ->
systems -> context -> client, wrk, downloads, limits, measure, procs -> common):

  common      paths, the loopback address, names, units, BenchError
  progress    the progress line on stderr and the notes for the report
  procs       Procs (start, stop by PID), free_port, port_open, wait_for, log_has, raise_nofile
  measure     /proc and ss: CPU time, RSS, mapped files, interference and steal, TCP sockets
  client      the HTTP client: connect, read_head, http_get, http_put_file, python_seq
  wrk         run wrk, parse its output
  downloads   the scale-downloads and scale-uploads clients (one thread, a selector loop)
              and Jain's index
  limits      the kernel's limits, source addresses for many visitors, run/cap/skip a level
  context     Ctx: work directory, files, certificates, origin, which kite
  systems     Direct, Haproxy, Stunnel, Pagekite, PagekiteTuned, Kite, KitePy, KiteAsyncio; Running
  workloads   the check, bulk, c50, seq, newconn, idle, scale-conns, scale-downloads,
              scale-uploads
  idleclient  the idle workload's helper process (relay_bench.py _idle-client)
  report      Results, the tables, notes, targets, the PNG charts
  profiling   --profile: py-spy on relay and backend
  cli         options, the interleaved rounds, main
"""
