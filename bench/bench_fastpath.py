"""Fast-path micro-benchmark: the compiled ``kite._fastpath`` against its twin ``kite._fastpath_py``.

Demux: a pre-built stream of data chunks (``SID: n``, canonical, as pagekite.py and kite
send them) for 4 streams in round robin, fed the way a BufferedProtocol is fed: the bench
asks ``get_buffer(65536)``, copies the next <= 64 KiB of the stream into the lent view
(what the kernel or the TLS layer does) and calls ``buffer_updated``.  Every stream has a
sink: the bound method ``Counter.sink`` of a 2-line Python class (``self.chunks += 1``),
i.e. a real Python-level call per chunk, as a tunnel has.

Writer: ``write_data(slot, payload)`` per payload (4 streams in round robin) and one
``flush()`` per ~64 KiB of framed output, the result dropped.

Each case runs ``--runs`` times (default 5); the table shows the median and min..max, the
JSON file every run.  Benchmarks are not tests: nothing is asserted.

    python bench/bench_fastpath.py            # table + bench/results/fastpath.json
    python bench/bench_fastpath.py --quick    # 1/10 of the work, for a smoke run
"""

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

PAYLOADS = (64, 1024, 16384)
SIDS = (1, 2, 3, 1000)  # one above the small-int cache, as real sids are
PIECE = 65536
# Chunks per run, per payload size: enough for >= ~50 ms of compiled work.
CHUNKS = {64: 400_000, 1024: 200_000, 16384: 40_000}

SINK_DESCRIPTION = "bound method Counter.sink(self, view): self.chunks += 1"


class Counter:
    """The sink: a trivial Python-level callable, as cheap as a real one can be."""

    __slots__ = ("chunks",)

    def __init__(self):
        self.chunks = 0

    def sink(self, view):
        self.chunks += 1


def build_stream(payload_size, nchunks):
    payload = bytes(range(256)) * (payload_size // 256) + bytes(payload_size % 256)
    frames = []
    for i in range(len(SIDS)):
        body = b"SID: %d\r\n\r\n" % SIDS[i] + payload
        frames.append(b"%x\r\n" % len(body) + body)
    rounds, rest = divmod(nchunks, len(frames))
    return b"".join(frames) * rounds + b"".join(frames[:rest])


def feed(demux, stream):
    view = memoryview(stream)
    total = len(stream)
    get_buffer = demux.get_buffer
    buffer_updated = demux.buffer_updated
    pos = 0
    while pos < total:
        buf = get_buffer(PIECE)
        n = min(len(buf), PIECE, total - pos)
        buf[:n] = view[pos : pos + n]  # the kernel's copy
        buffer_updated(n)
        pos += n


def bench_demux(impl, payload_size, nchunks):
    stream = build_stream(payload_size, nchunks)

    def on_chunk(headers, payload):
        raise AssertionError(f"unexpected control chunk {headers!r}")

    counter = Counter()
    demux = impl.Demux(on_chunk)
    for sid in SIDS:
        demux.attach(impl.StreamSlot(sid, counter.sink))
    t0 = time.perf_counter()
    feed(demux, stream)
    elapsed = time.perf_counter() - t0
    assert counter.chunks == nchunks and demux.buffered == 0, (counter.chunks, nchunks)
    return elapsed


def bench_writer(impl, payload_size, nchunks):
    payload = bytes(payload_size)
    slots = [impl.StreamSlot(sid) for sid in SIDS]
    writer = impl.ChunkWriter()
    per_flush = max(1, PIECE // (payload_size + 16))
    rounds = nchunks // per_flush
    # Pre-built sequence of slots for one flush, round robin.
    order = [slots[i % len(slots)] for i in range(per_flush)]
    write_data = writer.write_data
    flush = writer.flush
    t0 = time.perf_counter()
    for _ in range(rounds):
        for slot in order:
            write_data(slot, payload)
        flush()
    elapsed = time.perf_counter() - t0
    done = rounds * per_flush
    assert writer.chunks_written == done
    return elapsed, done


def load(name):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        print(f"# {name} not available: {exc}", file=sys.stderr)
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1/10 of the chunks per run")
    parser.add_argument(
        "--json", default=os.path.join(HERE, "results", "fastpath.json"), help="output file"
    )
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0

    impls = {"c": load("kite._fastpath"), "py": load("kite._fastpath_py")}
    impls = {k: v for k, v in impls.items() if v is not None}
    results = []
    for kind in ("demux", "writer"):
        for size in PAYLOADS:
            nchunks = max(1000, int(CHUNKS[size] * scale))
            for name, impl in impls.items():
                # The twin gets a tenth of the chunks: same statistics, less waiting.
                n = nchunks if name == "c" else max(1000, nchunks // 10)
                rates = []
                for _ in range(args.runs):
                    if kind == "demux":
                        elapsed = bench_demux(impl, size, n)
                        done = n
                    else:
                        elapsed, done = bench_writer(impl, size, n)
                    rates.append(done / elapsed)
                results.append(
                    {
                        "kind": kind,
                        "impl": name,
                        "payload": size,
                        "chunks_per_run": n,
                        "chunks_per_s": rates,
                        "median_chunks_per_s": statistics.median(rates),
                        "median_mb_per_s": statistics.median(rates) * size / 1e6,
                    }
                )

    print(f"kite fast path, Python {platform.python_version()}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs; median of {args.runs} runs (min..max)")
    print(f"demux: stream of canonical data chunks for sids {SIDS}, fed by get_buffer/"
          f"buffer_updated in {PIECE // 1024} KiB pieces; sink = {SINK_DESCRIPTION}")
    print(f"writer: write_data per payload, flush() every ~{PIECE // 1024} KiB")
    header = (f"{'':7}{'payload':>8} {'impl':>4} {'Mchunks/s':>10} {'(min..max)':>15} "
              f"{'MB/s':>9} {'(min..max)':>19} {'c/py':>6}")
    print(header)
    print("-" * len(header))
    by_key = {(r["kind"], r["payload"], r["impl"]): r for r in results}
    for r in results:
        rates = r["chunks_per_s"]
        lo, hi, med = min(rates), max(rates), r["median_chunks_per_s"]
        size = r["payload"]
        ratio = ""
        other = by_key.get((r["kind"], size, "py"))
        if r["impl"] == "c" and other:
            ratio = f"{med / other['median_chunks_per_s']:.1f}x"
        label = f"{size} B" if size < 1024 else f"{size // 1024} KiB"
        chunks_range = f"({lo / 1e6:.2f}..{hi / 1e6:.2f})"
        mbps_range = f"({lo * size / 1e6:.0f}..{hi * size / 1e6:.0f})"
        print(
            f"{r['kind']:7}{label:>8} {r['impl']:>4} {med / 1e6:10.2f} "
            f"{chunks_range:>15} {med * size / 1e6:9.0f} "
            f"{mbps_range:>19} {ratio:>6}"
        )

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(
            {
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "runs": args.runs,
                "piece": PIECE,
                "sids": SIDS,
                "sink": SINK_DESCRIPTION,
                "results": results,
            },
            f,
            indent=1,
        )
    print(f"saved {os.path.relpath(args.json)}")


if __name__ == "__main__":
    main()
