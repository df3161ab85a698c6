"""Busy polling: the event loop polls for a short while instead of sleeping, when an answer
is likely to come within it.

A request through kite crosses two processes twice (relay, backend, and back).  Each time a
process sleeps in ``epoll_wait`` and is woken by the next packet, the kernel has to wake a
CPU that went idle - on a virtual machine an idle vCPU halts and its wake-up costs tens of
microseconds - and the interpreter starts from cold caches: one sequential request through
relay and backend spent ~200 us of CPU in them, four wake-ups, against ~50 us per request
when many are in flight.  So after a process sent something that an answer may quickly
follow (a request down the tunnel, a response to a visitor), its loop keeps polling for up
to ``window`` seconds: each turn a zero-timeout poll and ``sched_yield`` - a yield, so any
other runnable process (the origin, the other kite process, the client) gets the CPU at
once and a poll never delays it.

The window adapts per process, as KVM's halt polling does: an answer that came while
polling keeps it; a poll that ended with nothing halves it (below ``MIN_WINDOW`` it stops:
a slow local server costs nothing); an answer that came shortly after polling stopped - a
longer poll would have caught it - grows it to 1.5 times that gap, up to the configured
maximum (``busy_poll`` microseconds, ``DEFAULT_US``; 0 turns it off).  What polling costs
is bounded by the window per answer (``bench/README.md``, "seq").

A busy process does not poll: when more than one answer went out in one turn of the loop,
its reads come in batches, which polling would break up into more system calls per
request, so it sleeps in ``epoll_wait`` as usual, and polls again at the earliest
``BUSY_HOLD`` later.  Nor does a process on full CPUs: when most turns come back long after
the previous one (``SLOW_TURN``: the yield let another process run), polling would only add
system calls to their load, and it holds off the same way.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Optional

__all__ = ["BUSY_HOLD", "BusyPoll", "DEFAULT_US", "MAX_US", "MIN_WINDOW", "SLOW_TURN"]

#: The default maximum window, microseconds (KVM's default halt-polling window is 200 us).
DEFAULT_US = 200
#: The largest window a configuration may ask for, microseconds.
MAX_US = 10_000
#: A window shorter than this (seconds) is no window: polling stops until answers come
#: quickly again.
MIN_WINDOW = 10e-6
#: Seconds without polling after the loop was seen busy.
BUSY_HOLD = 0.001
#: A turn this long after the previous one (seconds) means the yield let another process
#: run: the CPU is wanted elsewhere.
SLOW_TURN = 20e-6


def _no_yield() -> None:
    pass


class BusyPoll:
    """One per process and loop: :meth:`poke` after sending what may be answered quickly."""

    __slots__ = ("max_window", "window", "until", "last", "polling", "pokes", "held_until",
                 "prev_turn", "contended", "loop", "clock", "_yield")

    def __init__(self, max_us: float, *, clock: Callable[[], float] = time.monotonic,
                 yield_cpu: Optional[Callable[[], None]] = None) -> None:
        self.max_window = max_us / 1e6
        self.window = self.max_window  # the current window, seconds (adapts)
        self.until = 0.0  # polling goes on until this time
        self.last = float("-inf")  # the latest poke
        self.polling = False
        self.pokes = 0  # pokes since the latest turn: more than one, and the loop is busy
        self.held_until = 0.0  # busy: no polling before this time
        self.prev_turn = 0.0  # when the latest turn ran
        self.contended = 0.0  # moving share of turns whose yield gave the CPU away
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.clock = clock
        if yield_cpu is None:
            yield_cpu = getattr(os, "sched_yield", _no_yield)  # not on Windows
        self._yield: Callable[[], None] = yield_cpu

    def poke(self) -> None:
        """Something was sent that may be answered soon: poll for the window from now."""
        now = self.clock()
        if self.polling:
            self.pokes += 1
        elif now < self.held_until:
            self.last = now
            return
        elif now - self.last <= self.max_window:
            # This came while the loop slept, soon after the previous one: a longer poll
            # would have caught it.
            self.window = min(self.max_window, max(self.window * 2, (now - self.last) * 1.5))
        self.last = now
        if self.window < MIN_WINDOW:
            return
        self.until = now + self.window
        if not self.polling:
            loop = self.loop
            if loop is None:
                loop = self.loop = asyncio.get_running_loop()
            self.polling = True
            self.pokes = 1
            self.prev_turn = now
            loop.call_soon(self._turn)

    def _turn(self) -> None:
        pokes, self.pokes = self.pokes, 0
        if pokes > 1:
            # Several answers went out in one turn of the loop: it is busy, its reads come
            # in batches, and polling would only break them up.  Sleep as usual, and look
            # again in BUSY_HOLD (a turn scheduled at every answer would itself keep the
            # loop from blocking).
            self._hold(self.clock())
            return
        now = self.clock()
        if now < self.until:
            # A turn long after the previous one: the yield gave the CPU to another process
            # that wanted it.  When most turns do, the CPUs are full, and polling only adds
            # system calls to their load: hold it as for a busy loop.
            slow = 1.0 if now - self.prev_turn > SLOW_TURN else 0.0
            self.contended += (slow - self.contended) / 8
            if self.contended > 0.5:
                self.contended = 0.0
                self._hold(now)
                return
            self.prev_turn = now
            self._yield()
            self.loop.call_soon(self._turn)  # type: ignore[union-attr]
            return
        # A whole window passed with nothing to answer (each answer moves ``until``):
        # poll shorter next time.
        self.polling = False
        self.window /= 2
        if self.window < MIN_WINDOW:
            self.window = 0.0

    def _hold(self, now: float) -> None:
        """Stop polling; pokes before ``now + BUSY_HOLD`` start none."""
        self.polling = False
        self.held_until = now + BUSY_HOLD
