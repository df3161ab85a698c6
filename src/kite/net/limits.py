"""Limits on the local connections of streams, shared by every tunnel of a process (the
relay's visitors): streams per tunnel, idle streams, and a memory budget for what visitor
transports hold in their write buffers.

Theory of operation
-------------------
Nothing here runs per chunk.  The stream code reports three kinds of event, each once per
connection or per buffer crossing: a local connection opened or lost
(:meth:`StreamLimits.opened`, :meth:`StreamLimits.lost`), and a local transport's write
buffer crossing its high or low mark (:meth:`StreamLimits.note_full`, from asyncio's
``pause_writing``/``resume_writing``).

*Budget.*  A transport below its high mark holds less than that mark (8 KiB towards
pagekite.py peers, 256 KiB between kite peers: kite.net.tunnel).  The transports above it
are the slow readers; while there are any, a timer sums their buffers every
``BUDGET_CHECK_INTERVAL`` s.  Above ``buffer_budget`` each of them is *held*: its stream
stops acknowledging (no SKB), so the peer stops sending once its window is used up.  A
held transport that drains below its low mark is released at once.  Those still held
after ``slow_reader_timeout`` s, while the sum is still above the budget, are cut (reset),
largest first, until the sum is back under it.  Below ``RELEASE_BELOW`` x budget every
hold is lifted.

*Idle.*  Each tunnel checks its own streams (kite.net.tunnel, ``_idle_tick``); a stream
that was ended gracefully while its transport still had bytes to write is watched here,
and reset once those bytes stop moving for ``idle_timeout`` s (a visitor that never reads
would otherwise keep its descriptor and buffer forever).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Optional

from .sockets import reset

if TYPE_CHECKING:  # pragma: no cover
    from .tunnel import Stream

log = logging.getLogger("kite.tunnel")

__all__ = [
    "StreamLimits",
    "DEFAULT_MAX_STREAMS",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_BUFFER_BUDGET",
    "DEFAULT_SLOW_READER_TIMEOUT",
    "IDLE_CHECKS",
    "BUDGET_CHECK_INTERVAL",
    "RELEASE_BELOW",
]

#: Streams one tunnel may carry at once: room for a kite with 10,000 idle visitors (chat,
#: websockets), well below the 131071 stream ids (so a free id is found in a few steps), and
#: a bound on what one backend can make the relay hold (~5 KiB a stream).
DEFAULT_MAX_STREAMS = 16384
#: Seconds without a byte either way after which a stream is closed (0/None: never).
DEFAULT_IDLE_TIMEOUT = 600.0
#: Bytes all visitor transports together may hold in their write buffers (0/None: no limit).
DEFAULT_BUFFER_BUDGET = 256 * 1024 * 1024
#: Seconds a slow reader may stay held over the budget before it is cut.
DEFAULT_SLOW_READER_TIMEOUT = 30.0
#: Idle checks per idle_timeout: an idle stream is closed within 1.1 x idle_timeout.
IDLE_CHECKS = 10
#: Seconds between budget checks while some transport is above its high mark.
BUDGET_CHECK_INTERVAL = 0.5
#: Holds are lifted once the buffered sum falls below this fraction of the budget.
RELEASE_BELOW = 0.75


class StreamLimits:
    """The limits (see the module docstring) and the counters they need."""

    def __init__(self, *, max_streams: int = DEFAULT_MAX_STREAMS,
                 idle_timeout: Optional[float] = DEFAULT_IDLE_TIMEOUT,
                 buffer_budget: Optional[int] = DEFAULT_BUFFER_BUDGET,
                 slow_reader_timeout: float = DEFAULT_SLOW_READER_TIMEOUT) -> None:
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout or None
        self.buffer_budget = buffer_budget or None
        self.slow_reader_timeout = slow_reader_timeout
        self.connections = 0  # open local connections of streams (the relay: visitors)
        self.full: dict[Stream, float] = {}  # above the high mark, since (loop time)
        self.held: dict[Stream, float] = {}  # acks held, since
        self.closing: dict[Stream, tuple] = {}  # ended with bytes left: (activity mark, since)
        self.slow_cut = 0  # streams cut by the budget (for logs and tests)
        self.idle_closed = 0  # streams closed for idleness
        self._budget_timer: Optional[asyncio.TimerHandle] = None
        self._closing_timer: Optional[asyncio.TimerHandle] = None

    # -- connections ------------------------------------------------------------------------
    def opened(self) -> None:
        self.connections += 1

    def lost(self, stream: Stream) -> None:
        self.connections -= 1
        self.full.pop(stream, None)
        self.held.pop(stream, None)
        self.closing.pop(stream, None)

    # -- budget -----------------------------------------------------------------------------
    def note_full(self, stream: Stream, full: bool) -> None:
        """``stream``'s local write buffer went above its high mark (``full``) or below its
        low mark."""
        if self.buffer_budget is None:
            return
        if full:
            loop = asyncio.get_running_loop()
            self.full[stream] = loop.time()
            if self._budget_timer is None:
                self._budget_timer = loop.call_later(BUDGET_CHECK_INTERVAL, self._check_budget)
        else:
            self.full.pop(stream, None)
            if self.held.pop(stream, None) is not None:
                stream.release_acks()

    def buffered(self) -> int:
        """Bytes the transports above their high mark hold now."""
        return sum(s.buffered() for s in self.full)

    def _check_budget(self) -> None:
        self._budget_timer = None
        budget = self.buffer_budget
        if not self.full or budget is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        sizes = [(s.buffered(), s) for s in self.full]
        total = sum(n for n, _ in sizes)
        if total > budget:
            for _, s in sizes:
                if s not in self.held:
                    self.held[s] = now
                    s.hold_acks()
            due = [(n, s) for n, s in sizes if now - self.held[s] >= self.slow_reader_timeout]
            due.sort(key=lambda item: item[0], reverse=True)
            cut = 0
            was = total
            for n, s in due:
                if total <= budget:
                    break
                total -= n
                cut += 1
                self.full.pop(s, None)
                self.held.pop(s, None)
                s.cut()
            if cut:
                self.slow_cut += cut
                log.warning("visitor buffers hold %d KiB, over the budget of %d KiB: %d slow "
                            "reader(s) held over %g s cut", was // 1024, budget // 1024, cut,
                            self.slow_reader_timeout)
        elif self.held and total <= budget * RELEASE_BELOW:
            held, self.held = self.held, {}
            for s in held:
                s.release_acks()
        if self.full:
            self._budget_timer = loop.call_later(BUDGET_CHECK_INTERVAL, self._check_budget)

    # -- streams ended with bytes left --------------------------------------------------------
    def watch_closing(self, stream: Stream) -> None:
        """``stream`` was ended gracefully with bytes still buffered: reset its transport if
        they stop moving for ``idle_timeout`` s."""
        if self.idle_timeout is None:
            return
        loop = asyncio.get_running_loop()
        self.closing[stream] = (stream.activity(), loop.time())
        if self._closing_timer is None:
            self._closing_timer = loop.call_later(self.idle_timeout / IDLE_CHECKS,
                                                  self._check_closing)

    def _check_closing(self) -> None:
        self._closing_timer = None
        timeout = self.idle_timeout
        if timeout is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        stuck = 0
        for stream, (mark, since) in list(self.closing.items()):
            now_mark = stream.activity()
            if now_mark != mark:
                self.closing[stream] = (now_mark, now)
            elif now - since >= timeout:
                del self.closing[stream]
                if stream.transport is not None:
                    stuck += 1
                    reset(stream.transport)
        if stuck:
            log.info("%d ended stream(s) whose local side stopped reading for %g s: reset",
                     stuck, timeout)
        if self.closing:
            self._closing_timer = loop.call_later(timeout / IDLE_CHECKS, self._check_closing)
