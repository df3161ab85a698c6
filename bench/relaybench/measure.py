"""What the kernel reports about processes and the machine: CPU time (/proc/PID/stat,
/proc/stat), RSS, mapped files, TCP sockets with their owners and byte counters (ss -ti),
and the versions of the tools run."""

from __future__ import annotations

import os
import platform
import re
import resource
import shutil
import subprocess
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of the whole process (all its threads, live and exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def cpu_times(pid: int) -> tuple | None:
    """(user, system) CPU seconds of the whole process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def machine_cpu() -> dict[str, float]:
    """Machine-wide CPU seconds from /proc/stat: busy (user, nice, system, irq, softirq),
    idle (idle, iowait) and steal.  Interrupt time is included because the kernel charges
    part of the loopback TCP work done in a process's context to softirq here and to the
    process's stime there."""
    with open("/proc/stat") as f:
        v = [int(x) / CLK_TCK for x in f.readline().split()[1:9]]
    return {"busy": v[0] + v[1] + v[2] + v[5] + v[6], "idle": v[3] + v[4],
            "steal": v[7] if len(v) > 7 else 0.0}


def own_cpu() -> float:
    """CPU seconds of this script and of its children that have been waited for (wrk, ...)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


class Interference:
    """CPU used during a workload by processes this script did not start (other users of a
    shared machine), and the hypervisor's steal time: so that a noisy round can be seen.
    Also the share of the machine's CPU time left idle: a system that keeps the CPUs busy
    is limited by its CPU per request, one that leaves them idle by how its processes
    hand work to each other (and where the scheduler puts them)."""

    def __init__(self, pids):
        self.pids = [p for p in pids if p]
        self.t0 = time.monotonic()
        self.m0 = machine_cpu()
        self.p0 = sum(cpu_seconds(p) or 0.0 for p in self.pids)
        self.o0 = own_cpu()

    def result(self) -> dict:
        m1 = machine_cpu()
        ours = sum(cpu_seconds(p) or 0.0 for p in self.pids) - self.p0 + own_cpu() - self.o0
        wall = time.monotonic() - self.t0
        return {"wall_s": wall,
                "foreign_cpu_s": max(0.0, m1["busy"] - self.m0["busy"] - ours),
                "steal_s": m1["steal"] - self.m0["steal"],
                "idle_pct": 100.0 * (m1["idle"] - self.m0["idle"])
                / max(wall * (os.cpu_count() or 1), 1e-9)}


def rss_kib(pid: int) -> int | None:
    """VmRSS of the process, KiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def mapped_files(pid: int) -> str:
    """/proc/PID/maps: which shared objects (compiled fast path, uvloop) the process loaded."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return f.read()
    except OSError:
        return ""


def tool_version(argv: list[str], pattern: str = r"\d+\.\d+[\w.\-]*") -> str | None:
    """The first match of ``pattern`` in what ``argv`` prints (a version), or None."""
    try:
        out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=10,
                             stdin=subprocess.DEVNULL, check=False).stdout.decode("latin-1")
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(pattern, out)
    return m.group(0) if m else None


def tcp_sockets() -> list[dict] | None:
    """Established TCP sockets on 127.0.0.1 with owner PIDs and kernel byte counters."""
    if not shutil.which("ss"):
        return None
    out = subprocess.run(["ss", "-tinpH", "state", "established"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, check=False).stdout.decode("latin-1")
    socks: list[dict] = []
    cur = None
    for line in out.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            parts = line.split()
            # Recv-Q Send-Q Local:Port Peer:Port [users:(...)]
            if len(parts) < 4:
                cur = None
                continue
            cur = {"local": parts[2], "peer": parts[3],
                   "local_port": int(parts[2].rsplit(":", 1)[1]),
                   "peer_port": int(parts[3].rsplit(":", 1)[1]),
                   "pids": {int(p) for p in re.findall(r"pid=(\d+)", line)},
                   "bytes": 0}
            socks.append(cur)
        elif cur is not None:
            sent = re.search(r"\bbytes_sent:(\d+)", line) or re.search(r"\bbytes_acked:(\d+)", line)
            recv = re.search(r"\bbytes_received:(\d+)", line)
            cur["bytes"] = (int(sent.group(1)) if sent else 0) + (int(recv.group(1)) if recv else 0)
            pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
            cur["pids"] |= pids
    return socks


def loadavg() -> list[str]:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg writes them."""
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def cpu_model() -> str:
    """The CPU's model name, for the report."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"
