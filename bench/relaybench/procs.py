"""Processes and ports: start every helper process, wait until it is ready, stop it by PID.

Shared by ``relay_bench.py`` and ``uplink_bench.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable

from .common import HOST, BenchError


def free_port() -> int:
    """A TCP port on HOST that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    """Whether something accepts connections on HOST:port."""
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def raise_nofile(want: int = 0) -> int:
    """Raise the soft limit of open files to the hard one, or both to ``want`` (at most
    fs.nr_open) where the process may raise its hard limit (CAP_SYS_RESOURCE); children
    inherit it.  Return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if want > hard:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                want = min(want, int(f.read()))
        except (OSError, ValueError):
            pass
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (OSError, ValueError):
            pass  # not privileged: the hard limit stays
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Procs:
    """Every process this script starts, stopped by PID: ``stop`` sends SIGTERM and SIGKILL
    after ``timeout``; ``kill`` sends SIGKILL to the process group at once."""

    def __init__(self):
        self.live: dict[int, tuple] = {}

    def start(self, label: str, argv: list[str], *, env=None, log: str | None = None,
              cpus=None, stdin=subprocess.DEVNULL, stdout=None, cwd=None) -> subprocess.Popen:
        """Start ``argv`` with stdout and stderr appended to ``log`` (or discarded), pinned to
        ``cpus`` if given, in a session of its own."""
        preexec = None
        if cpus:
            cpu_set = set(cpus)

            def preexec():
                os.sched_setaffinity(0, cpu_set)
        with contextlib.ExitStack() as stack:
            # The child keeps its own descriptor of the log; ours is closed once it started.
            logf = stack.enter_context(open(log, "ab")) if log else subprocess.DEVNULL
            # A new session: Ctrl-C on the terminal reaches this script only, which then stops
            # each child itself, in order.  The affinity is set before the child execs, so
            # that its threads inherit it; preexec_fn is only passed with ``cpus``, which only
            # the single-threaded relay_bench.py uses.
            p = subprocess.Popen(argv, stdin=stdin, stdout=logf if stdout is None else stdout,
                                 stderr=logf, env=env, cwd=cwd, start_new_session=True,
                                 preexec_fn=preexec)
        self.live[p.pid] = (label, p)
        return p

    def started(self) -> list[subprocess.Popen]:
        """The processes started and not yet stopped, oldest first."""
        return [p for _, p in self.live.values()]

    def stop(self, *procs: subprocess.Popen, timeout: float = 5.0) -> None:
        procs = [p for p in procs if p is not None]
        for p in procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
            self.live.pop(p.pid, None)

    def stop_all(self) -> None:
        self.stop(*self.started())

    def kill(self, *procs: subprocess.Popen) -> None:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
            self.live.pop(p.pid, None)


def tail(path: str, n: int = 12) -> str:
    """The last ``n`` lines of a log, indented, for an error message."""
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join("    | " + line for line in lines[-n:])
    except OSError:
        return "    | (no log)"


def wait_for(what: str, predicate: Callable[[], bool], timeout: float,
             procs: Iterable[subprocess.Popen] = (), logs: Iterable[str] = ()) -> None:
    """Poll ``predicate`` until true; BenchError with the logs' tails when one of ``procs``
    exits first or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for p in procs:
            if p.poll() is not None:
                raise BenchError(f"{what}: process {p.pid} exited with {p.returncode}\n"
                                 + "\n".join(tail(lg) for lg in logs))
        time.sleep(0.05)
    raise BenchError(f"{what}: not ready after {timeout:g} s\n" + "\n".join(tail(lg) for lg in logs))


def log_count(path: str, pattern: str, n: int) -> Callable[[], bool]:
    """A predicate for wait_for: the regular expression ``pattern`` occurs ``n`` times in the file."""
    rx = re.compile(pattern)

    def check() -> bool:
        try:
            with open(path, "rb") as f:
                return len(rx.findall(f.read().decode("utf-8", "replace"))) >= n
        except OSError:
            return False
    return check


def log_has(path: str, pattern: str) -> Callable[[], bool]:
    """A predicate for wait_for: the regular expression ``pattern`` occurs in the file."""
    rx = re.compile(pattern)

    def check() -> bool:
        try:
            with open(path, "rb") as f:
                return rx.search(f.read().decode("utf-8", "replace")) is not None
        except OSError:
            return False
    return check
