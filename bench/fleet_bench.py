#!/usr/bin/env python3
"""The fleet on Redis: what a hand-over costs, how fast a registry change is seen, and what
presence writes to Redis.  One run, loopback only, a redis-server of its own.

* **hand-over**: relay A (127.0.0.2) flies the kite, relay B (127.0.0.3) hands its visitors
  to A over its fleet link.  Keep-alive requests per second (wrk, ``--conns`` connections),
  the same with a new connection for every request, and a bulk download (MB/s) through B
  against the same through A, in interleaved rounds; medians and the ratio B/A (the target
  is >= 0.7 for keep-alive and bulk).  With ``--nginx``, nginx in the same shape in the same
  rounds, the C reference for what the shape costs: a backend nginx (TLS in, to the origin),
  an A nginx (plain visitors, and TLS from B, both over TLS to the backend), a B nginx
  (plain visitors over TLS to A).
* **change**: a registry of ``--kites`` kites in Redis; a new kite added with ``kite
  accounts``' store is looked for at the relay until it is known (503, offline, instead of
  404); p50/p99 of ``--changes`` changes, and the relay's start time and RSS.
* **presence**: Redis' own command counters over 10 s of an idle fleet of two relays: what
  heartbeats and full reads of the map cost (a kite change costs one MULTI of SADD/SREM,
  EXPIRE and PUBLISH on top).
* **storm**: ``--storm`` backends (plain tunnels with one kite each, from one asyncio
  process speaking kite's own protocol layer, ``--storm-parallel`` handshakes at a time)
  connect to one relay of the fleet: how long until all fly, the relay's RSS per tunnel, and
  the Redis commands their presence cost.

    python bench/fleet_bench.py                     # about 2 minutes
    python bench/fleet_bench.py --rounds 5 --kites 100000

It measures, it does not assert (bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from relaybench.common import REPO, TLS13_SUITES  # noqa: E402
from relaybench.context import choose_kite  # noqa: E402
from relaybench.procs import Procs, raise_nofile, wait_for  # noqa: E402
from relaybench.systems import NGINX_STREAMING  # noqa: E402

KITE_NAME = "app.fleet.bench"
SECRET = "fleet-bench-secret-0123456789"
PY = sys.executable
KITE = [PY, "-m", "kite"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def listening(log: str, host: str) -> int:
    text = open(log, errors="replace").read()
    m = re.search(r"relay listening on " + re.escape(host) + r":(\d+)", text)
    return int(m.group(1)) if m else 0


def wrk(url: str, host: str, conns: int, seconds: float, close: bool = False) -> float:
    """Requests/s; ``close``: a new connection for every request."""
    extra = ["-H", "Connection: close"] if close else []
    out = subprocess.run(["wrk", "-t2", f"-c{conns}", f"-d{max(1, round(seconds))}s", "-H",
                          f"Host: {host}", *extra, url], capture_output=True, text=True,
                         timeout=seconds + 60).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(m.group(1)) if m else 0.0


def bulk(url: str, host: str) -> float:
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-H", f"Host: {host}", "-w",
                          "%{speed_download}", url], capture_output=True, text=True, timeout=300)
    return float(out.stdout or 0) / 1e6


def start_nginx_shape(procs: Procs, work: str, oport: int) -> dict:
    """nginx in the hand-over's shape over the origin on ``oport``: {"na": A's plain
    listener, "nb": B's}, as (host, port).  One worker each, tuned proxy buffers and
    keep-alive upstreams (bench/README.md, "A fair nginx"), AES-128-GCM first."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proxy = ("proxy_http_version 1.1; proxy_set_header Connection \"\"; "
             f"proxy_set_header Host $host; {NGINX_STREAMING} proxy_ssl_protocols TLSv1.3; "
             f"proxy_ssl_session_reuse on; proxy_ssl_conf_command Ciphersuites {TLS13_SUITES};")
    tls = (f"ssl_certificate {CERT}; ssl_certificate_key {KEY}; ssl_protocols TLSv1.3; "
           f"ssl_conf_command Ciphersuites {TLS13_SUITES};")
    be, a_tls = free_port(), free_port("127.0.0.2")
    a, b = free_port("127.0.0.2"), free_port("127.0.0.3")
    layout = {  # name: (upstream, scheme, [(listen, tls)])
        "backend": (f"127.0.0.1:{oport}", "http", [(f"127.0.0.1:{be}", True)]),
        "a": (f"127.0.0.1:{be}", "https", [(f"127.0.0.2:{a}", False),
                                           (f"127.0.0.2:{a_tls}", True)]),
        "b": (f"127.0.0.2:{a_tls}", "https", [(f"127.0.0.3:{b}", False)]),
    }
    for name, (upstream, scheme, listens) in layout.items():
        prefix = os.path.join(work, f"nginx-{name}")
        os.makedirs(prefix)
        servers = "".join(
            f"server {{ listen {addr}{' ssl' if on else ''}; {tls if on else ''} "
            f"location / {{ proxy_pass {scheme}://up; {proxy} }} }}\n" for addr, on in listens)
        conf = os.path.join(prefix, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"daemon off; master_process off; pid {prefix}/nginx.pid;\n"
                    f"error_log {prefix}/error.log warn;\n"
                    "events { worker_connections 4096; multi_accept on; }\n"
                    f"http {{ access_log off; client_body_temp_path {prefix}; "
                    f"proxy_temp_path {prefix}; keepalive_timeout 3600s; "
                    "keepalive_requests 100000000; client_max_body_size 0;\n"
                    f"upstream up {{ server {upstream}; keepalive 256; }}\n{servers}}}\n")
        procs.start(f"nginx-{name}", [nginx, "-p", prefix, "-c", conf],
                    log=os.path.join(prefix, "out.log"))
    for host, port in (("127.0.0.2", a), ("127.0.0.3", b)):
        wait_for("nginx", lambda host=host, port=port: subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"Host: {KITE_NAME}",
             f"http://{host}:{port}/small"], capture_output=True, text=True).stdout == "200",
            15, [])
    return {"na": ("127.0.0.2", a), "nb": ("127.0.0.3", b)}


def redis_commands(port: int) -> dict:
    out = subprocess.run(["redis-cli", "-p", str(port), "info", "commandstats"],
                         capture_output=True, text=True, timeout=10).stdout
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"cmdstat_(\w+):calls=(\d+)", out)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0, help="wrk duration per round")
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--bulk-mb", type=int, default=256)
    ap.add_argument("--kites", type=int, default=100_000, help="registry size for 'change'")
    ap.add_argument("--changes", type=int, default=30)
    ap.add_argument("--storm", type=int, default=10_000, help="tunnels of the connect storm")
    ap.add_argument("--storm-parallel", type=int, default=200)
    ap.add_argument("--storm-tls", action="store_true",
                    help="the storm's tunnels in TLS, as backends connect (default plain)")
    ap.add_argument("--nginx", action="store_true",
                    help="also nginx in the hand-over's shape, in the same rounds")
    ap.add_argument("--only", choices=("handover",),
                    help="run only this phase (the others are skipped)")
    ap.add_argument("--hold", type=float, default=0.0,
                    help="seconds to keep the fleet up after the hand-over phase, its "
                         "addresses printed (to profile or poke it by hand)")
    ap.add_argument("--json", help="append the results as one JSON line to this file")
    args = ap.parse_args()
    for tool in ("redis-server", "redis-cli", "wrk", "curl"):
        if not shutil.which(tool):
            print(f"fleet_bench: {tool} is missing", file=sys.stderr)
            return 2
    if args.nginx and not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")):
        print("fleet_bench: --nginx: nginx is missing (apt-get install nginx-light)",
              file=sys.stderr)
        return 2
    raise_nofile()
    work = tempfile.mkdtemp(prefix="kite-fleet-bench-")
    env, kite_at, _ = choose_kite()  # this checkout's kite if built, else the installed one
    if env is None:
        print(f"fleet_bench: {kite_at}", file=sys.stderr)
        return 2
    procs = Procs()
    results: dict = {"args": vars(args), "kite": kite_at}
    try:
        rport = free_port()
        procs.start("redis", ["redis-server", "--port", str(rport), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", work],
                    log=os.path.join(work, "redis.log"))
        wait_for("redis", lambda: subprocess.run(["redis-cli", "-p", str(rport), "ping"],
                                                 capture_output=True).returncode == 0, 10, [])
        url = f"redis://127.0.0.1:{rport}/0"
        www = os.path.join(work, "www")
        os.makedirs(www)
        with open(os.path.join(www, "small"), "wb") as f:
            f.write(b"x" * 1024)
        with open(os.path.join(www, "big"), "wb") as f:
            f.truncate(args.bulk_mb << 20)
        oport = free_port()
        procs.start("origin", [PY, os.path.join(HERE, "origin.py"), "--port", str(oport),
                               "--root", www], log=os.path.join(work, "origin.log"), env=env)
        wait_for("origin", lambda: "listening" in open(os.path.join(work, "origin.log")).read(),
                 15, [])
        relays = {}
        for rid, host in (("a", "127.0.0.2"), ("b", "127.0.0.3")):
            log = os.path.join(work, f"relay-{rid}.log")
            relay = procs.start(f"relay-{rid}", [*KITE, "relay", "--listen", f"{host}:0",
                                                 "--kite", f"http:{KITE_NAME}:{SECRET}",
                                                 "--redis", url, "--relay-id", rid,
                                                 "--access-log", "off", "--tls-cert", CERT,
                                                 "--tls-key", KEY], log=log, env=env)
            wait_for(f"relay-{rid}", lambda log=log, host=host: listening(log, host) > 0, 30,
                     [relay], [log])
            relays[rid] = (host, listening(log, host))
        a_host, a_port = relays["a"]
        blog = os.path.join(work, "backend.log")
        backend = procs.start("backend", [*KITE, "expose", f"http://127.0.0.1:{oport}",
                                          KITE_NAME, "--relay", f"{a_host}:{a_port}",
                                          "--insecure", "--secret", SECRET, "--access-log",
                                          "off"], log=blog, env=env)
        wait_for("backend", lambda: "flying" in open(blog).read(), 30, [backend], [blog])
        b_host, b_port = relays["b"]
        wait_for("hand-over", lambda: subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"Host: {KITE_NAME}",
             f"http://{b_host}:{b_port}/small"], capture_output=True, text=True).stdout == "200",
            15, [])
        # -- hand-over ------------------------------------------------------------------
        rps: dict = {"a": [], "b": []}
        cps: dict = {"a": [], "b": []}
        mbs: dict = {"a": [], "b": []}
        if args.nginx:
            relays.update(start_nginx_shape(procs, work, oport))
            for rid in ("na", "nb"):
                rps[rid], cps[rid], mbs[rid] = [], [], []
        for _ in range(args.rounds):
            for rid in rps:
                host, port = relays[rid]
                rps[rid].append(wrk(f"http://{host}:{port}/small", KITE_NAME, args.conns,
                                    args.seconds))
                cps[rid].append(wrk(f"http://{host}:{port}/small", KITE_NAME, args.conns,
                                    args.seconds, close=True))
                mbs[rid].append(bulk(f"http://{host}:{port}/big", KITE_NAME))
        med = {k: statistics.median(v) for k, v in rps.items()}
        medc = {k: statistics.median(v) for k, v in cps.items()}
        medb = {k: statistics.median(v) for k, v in mbs.items()}
        results["handover"] = {"rps": rps, "cps": cps, "mbs": mbs}
        for label, a, b, key in (("hand-over", "a", "b", "handover"),
                                 ("nginx in that shape", "na", "nb", "handover_nginx")):
            if a not in med:
                continue
            ratios = {"rps_ratio": med[b] / med[a], "cps_ratio": medc[b] / medc[a],
                      "mbs_ratio": medb[b] / medb[a]}
            results.setdefault(key, {}).update(ratios)
            print(f"{label}: c{args.conns} req/s direct {med[a]:.0f}, via B {med[b]:.0f} "
                  f"({ratios['rps_ratio']:.2f}x); a connection a request: direct "
                  f"{medc[a]:.0f}, via B {medc[b]:.0f} ({ratios['cps_ratio']:.2f}x); bulk "
                  f"MB/s direct {medb[a]:.0f}, via B {medb[b]:.0f} "
                  f"({ratios['mbs_ratio']:.2f}x)")
        if args.hold:
            print(f"holding {args.hold:.0f} s: A http://{a_host}:{a_port} (pid "
                  f"{procs_pid(procs, 'relay-a')}), B http://{b_host}:{b_port} (pid "
                  f"{procs_pid(procs, 'relay-b')}), Host: {KITE_NAME}", flush=True)
            time.sleep(args.hold)  # the fleet stays up for whoever profiles it
        if args.only == "handover":
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(results) + "\n")
            return 0
        # -- presence writes --------------------------------------------------------------
        before = redis_commands(rport)
        t0 = time.monotonic()
        time.sleep(10.0)  # a measuring window, not a wait: the idle rate of heartbeats and reads
        idle = {k: v - before.get(k, 0) for k, v in redis_commands(rport).items()}
        idle_rate = sum(idle.values()) / (time.monotonic() - t0)
        results["presence_idle"] = {"per_s": idle_rate, "by_command": idle}
        print(f"presence, idle fleet of 2: {idle_rate:.1f} Redis commands/s "
              f"({', '.join(f'{k} {v}' for k, v in sorted(idle.items()) if v)})")
        # -- connect storm ----------------------------------------------------------------
        if args.storm:
            log = os.path.join(work, "relay-s.log")
            tls = ["--tls-cert", CERT, "--tls-key", KEY] if args.storm_tls else []
            procs.start("relay-s", [*KITE, "relay", "--listen", "127.0.0.5:0", "--kite",
                                    f"http:*.storm.bench:{SECRET}", "--redis", url,
                                    "--relay-id", "s", "--access-log", "off", *tls],
                        log=log, env=env)
            wait_for("relay-s", lambda: listening(log, "127.0.0.5") > 0, 30, [])
            s_port = listening(log, "127.0.0.5")
            pid = procs_pid(procs, "relay-s")
            rss0 = rss_mib(pid)
            before = redis_commands(rport)
            marks: dict = {}

            def flown():
                marks["flown"] = time.monotonic()
                marks["rss"] = rss_mib(pid)

            def in_redis(count: int) -> bool:
                return subprocess.run(["redis-cli", "-p", str(rport), "scard",
                                       "kite:fleet:kites:s"], capture_output=True,
                                      text=True).stdout.strip() == str(count)

            t0 = time.monotonic()
            flying, at = asyncio.run(storm(s_port, args.storm, args.storm_parallel, flown,
                                           in_redis, args.storm_tls))
            took, seen = marks["flown"] - t0, at - t0
            spent = {k: v - before.get(k, 0) for k, v in redis_commands(rport).items()}
            rss1 = marks["rss"]
            results["storm"] = {"tunnels": flying, "seconds": took, "in_redis_s": seen,
                                "rss_mib": [rss0, rss1], "redis": spent}
            print(f"connect storm: {flying:,} {'TLS' if args.storm_tls else 'plain'} tunnels "
                  f"flying in {took:.1f} s "
                  f"({flying / took:.0f}/s), all in Redis after {seen:.1f} s; relay RSS "
                  f"{rss0} -> {rss1} MiB ({(rss1 - rss0) * 1024 / max(flying, 1):.1f} KiB a "
                  f"tunnel); Redis commands {sum(spent.values()):,} "
                  f"({sum(spent.values()) / max(flying, 1):.2f} a kite: "
                  f"{', '.join(f'{k} {v}' for k, v in sorted(spent.items()) if v)})")
        # -- change to visible ----------------------------------------------------------
        sys.path.insert(0, os.path.join(REPO, "src"))
        from kite.store.redis import RedisStore

        store = RedisStore(f"redis://127.0.0.1:{rport}/1")
        t0 = time.monotonic()
        pipe = store.r.pipeline(transaction=False)
        accounts = max(1, args.kites // 10)
        for i in range(accounts):
            pipe.hset("kite:accounts", i + 1, json.dumps(
                {"email": f"u{i}@x.org", "secret": f"s{i:024d}", "disabled": False,
                 "expires": None, "created": 0}))
            pipe.hset("kite:emails", f"u{i}@x.org", i + 1)
            pipe.hset("kite:quota", i + 1, 10**12)
        for i in range(args.kites):
            pipe.hset("kite:kites", f"k{i}.u{i % accounts}.reg.bench",
                      json.dumps({"account": i % accounts + 1, "protos": ["http"]}))
            if i % 10000 == 0:
                pipe.execute()
        pipe.execute()
        store.r.set("kite:next_id", accounts)
        fill = time.monotonic() - t0
        log = os.path.join(work, "relay-c.log")
        t0 = time.monotonic()
        procs.start("relay-c", [*KITE, "relay", "--listen", "127.0.0.4:0", "--redis",
                                f"redis://127.0.0.1:{rport}/1", "--relay-id", "c",
                                "--access-log", "off"], log=log, env=env)
        wait_for("relay-c", lambda: listening(log, "127.0.0.4") > 0, 60, [])
        started = time.monotonic() - t0
        c_port = listening(log, "127.0.0.4")
        rss = 0
        for line in open(f"/proc/{procs_pid(procs, 'relay-c')}/status"):
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) // 1024
        lat = []
        for n in range(args.changes):
            name = f"new{n}.u7.reg.bench"
            t0 = time.monotonic()
            store.set_kite("u7@x.org", name, frozenset({"http"}))
            while True:
                code = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                       "-H", f"Host: {name}", f"http://127.0.0.4:{c_port}/"],
                                      capture_output=True, text=True).stdout
                if code == "503":
                    break
                if time.monotonic() - t0 > 30:
                    raise SystemExit("a change was not seen within 30 s")
            lat.append(time.monotonic() - t0)
        lat.sort()
        p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        results["change"] = {"kites": args.kites, "fill_s": fill, "start_s": started,
                             "rss_mib": rss, "p50_s": p50, "p99_s": p99}
        print(f"registry of {args.kites:,} kites in Redis: relay start {started:.2f} s, RSS "
              f"{rss} MiB; change visible p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms "
              f"({args.changes} changes)")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(results) + "\n")
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


def rss_mib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


async def storm(port: int, n: int, parallel: int, flown, in_redis, tls: bool) -> tuple:
    """``n`` tunnels (plain, or in TLS unchecked) to 127.0.0.5:port, one kite each,
    ``parallel`` handshakes at a time; ``flown()`` is called when all handshakes are done;
    the tunnels stay open until ``in_redis(count)`` (or a minute).  Returns (how many flew,
    when Redis had them)."""
    import ssl

    from kite.fastpath import ChunkWriter, Demux
    from kite.proto import control, handshake, signing
    from kite.proto.http import find_head_end

    gate = asyncio.Semaphore(parallel)
    writers: list = []
    context = None
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE

    async def one(i: int) -> bool:
        async with gate:
            reader, writer = await asyncio.open_connection(
                "127.0.0.5", port, ssl=context, server_hostname="127.0.0.5" if tls else None)
            writers.append(writer)
            domain = f"k{i}.storm.bench"
            bsalt = signing.make_bsalt("bench", f"127.0.0.5:{port}", SECRET)
            line = handshake.KiteLine.signed("http", domain, bsalt, SECRET, "")
            writer.write(handshake.build_tunnel_request([line], zchunks=False))
            buf = b""
            while (end := find_head_end(buf)) is None:
                data = await reader.read(65536)
                if not data:
                    return False
                buf += data
            first = handshake.parse_tunnel_response(buf[:end])
            events: list = []
            demux = Demux(lambda h, p: events.extend(control.parse_chunk(h, p)))
            if buf[end:]:
                demux.feed_data(buf[end:])
            w = ChunkWriter()
            w.write_chunk(*handshake.build_inband_request(
                [first.sign_this[0].answer(SECRET)]))
            writer.write(w.flush())
            while not any(isinstance(e, control.KiteReply) for e in events):
                data = await reader.read(65536)
                if not data:
                    return False
                demux.feed_data(data)
            reply = next(e for e in events if isinstance(e, control.KiteReply)).reply
            return bool(reply.ok)

    got = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    flown()
    ok = sum(1 for g in got if g is True)
    if ok < n:
        errors = [g for g in got if g is not True][:3]
        print(f"storm: {n - ok} of {n} tunnels did not fly: {errors}", file=sys.stderr)
    try:
        deadline = time.monotonic() + 60
        while not in_redis(ok) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the tunnels stay up while the relay writes presence
        return ok, time.monotonic()
    finally:
        for w in writers:
            w.close()


def procs_pid(procs: Procs, label: str) -> int:
    for pid, info in procs.live.items():
        if info[0] == label:
            return pid
    raise KeyError(label)


CERT = KEY = ""

if __name__ == "__main__":
    sys.path.insert(0, os.path.join(REPO, "src"))
    from kite.net.tls import generate_self_signed

    _d = tempfile.mkdtemp(prefix="kite-fleet-cert-")
    CERT, KEY = os.path.join(_d, "relay.crt"), os.path.join(_d, "relay.key")
    generate_self_signed(CERT, KEY, ["localhost", "127.0.0.2", "127.0.0.3"])
    def _on_term(signum, frame):
        raise KeyboardInterrupt  # so that main's finally stops every process it started

    signal.signal(signal.SIGTERM, _on_term)
    try:
        sys.exit(main())
    finally:
        shutil.rmtree(_d, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
