"""The kernel's limits on how many connections a run can hold (descriptors, ephemeral ports
per destination, listen backlogs), the loopback source addresses that spread many visitors
over several port ranges, and the plan for one idle level: run, cap or skip."""

from __future__ import annotations

import math
import resource

from .common import HOST

#: Ports of a range left for everything else that connects to the same destination.
PORT_MARGIN = 1000
#: A level whose limit is within this share of it runs capped (noted); below, it is skipped.
CAP_SHARE = 0.9
#: Source addresses the visitors may use: 127.0.0.2 to 127.0.0.254.
MAX_SOURCES = 253


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def port_range() -> tuple[int, int]:
    """net.ipv4.ip_local_port_range (the kernel's default when unreadable)."""
    text = _read("/proc/sys/net/ipv4/ip_local_port_range")
    try:
        lo, hi = (int(x) for x in text.split())  # type: ignore[union-attr]
        return lo, hi
    except (AttributeError, ValueError):
        return 32768, 60999


def ports_per_destination() -> int:
    """Connections one source address can open to one address and port."""
    lo, hi = port_range()
    return hi - lo + 1


def kernel_limits() -> dict:
    """What bounds the connection counts of this run, for the ``meta`` record."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lo, hi = port_range()

    def num(path):
        text = _read(path)
        return int(text.split()[0]) if text and text.split()[0].isdigit() else None
    return {"rlimit_nofile_soft": soft, "rlimit_nofile_hard": hard,
            "fs_nr_open": num("/proc/sys/fs/nr_open"), "fs_file_max": num("/proc/sys/fs/file-max"),
            "ip_local_port_range": [lo, hi], "somaxconn": num("/proc/sys/net/core/somaxconn"),
            "tcp_max_syn_backlog": num("/proc/sys/net/ipv4/tcp_max_syn_backlog"),
            "tcp_tw_reuse": num("/proc/sys/net/ipv4/tcp_tw_reuse")}


def source_addresses(n: int, per_address: int) -> list[str]:
    """Where ``n`` visitors connect from: HOST while one port range holds them, else enough
    of 127.0.0.2, 127.0.0.3, ... (HOST's own range stays for the systems' connections)."""
    if n <= per_address:
        return [HOST]
    k = math.ceil(n / per_address)
    if k > MAX_SOURCES:
        raise ValueError(f"{n} visitors need {k} source addresses; 127.0.0.2-254 holds {MAX_SOURCES}")
    return [f"127.0.0.{2 + i}" for i in range(k)]


def level_plan(n: int, caps: list[tuple[int, str]]) -> tuple[int, str | None, bool]:
    """``n`` visitors under the limits ``caps`` ((most visitors, why) each): the count to
    run, every limit below ``n`` (tightest first, "; "-joined) when it is less than ``n``,
    and whether to skip the level instead (the tightest is below CAP_SHARE of it)."""
    short = sorted((c for c in caps if c[0] < n), key=lambda c: c[0])
    if not short:
        return n, None, False
    limit = max(0, short[0][0])
    return limit, "; ".join(f"at most {max(0, c):,}: {why}" for c, why in short), limit < CAP_SHARE * n
