"""Per-stream flow control with PageKite ``SKB`` acknowledgements (docs/protocol.md §5.5).

Theory of operation
-------------------
Each side of a stream counts the payload bytes it *sent* into the tunnel (``StreamSlot.sent``)
and the bytes it *wrote* to its local socket (the visitor on the relay, the local server on
the backend).  The writer side acknowledges with ``SKB: k``, k = floor(bytes written / 1024),
an absolute, monotonic count.  The sender stops reading its local socket while

    unacked = sent - 1024 * k  >=  window

and resumes when an acknowledgement brings ``unacked`` below the window again.  So the bytes
buffered for one stream anywhere between the two sockets never exceed ``window`` plus one
read, whatever the visitor or local server does, and a stalled reader stalls only its own
stream.

pagekite.py stops reading at ~47.6 KiB unacknowledged and acknowledges after every socket
write.  kite peers (they announce ``X-PageKite-Features: KiteFlow``) use larger windows and
acknowledge every ``KITE_ACK_STEP`` bytes, so a bulk transfer costs one tiny control chunk
per 256 KiB instead of one per chunk.  Towards pagekite.py, kite acknowledges every
``PAGEKITE_ACK_STEP`` bytes so that pagekite's fixed 47.6 KiB window never runs dry.

Window sizing between kite peers
--------------------------------
A window must cover the bytes in flight during one acknowledgement round trip, and that
round trip crosses two event loops and the scheduler: on a loaded two-core machine a 1 MiB
window left a bulk upload stalled, waiting for acks, for almost half of its time.  TCP
meets the same problem with receive buffers that grow to several MiB.  So each tunnel
shares a *budget* among its streams (:class:`WindowPolicy`): one busy stream may run
``KITE_TUNNEL_BUDGET`` (16 MiB) ahead, n streams get ``budget / n`` each, never less than
``KITE_MIN_WINDOW`` (1 MiB).  What one tunnel can make its peer hold is therefore at most
``max(16 MiB, n * 1 MiB)`` - never more than a fixed 1 MiB window allowed for 16 streams or
more, and a stalled visitor holds at most its stream's share.  Both ends count their own
streams; the receiver's safety limit (``KITE_MAX_WINDOW``, twice over) does not depend on
the two counts agreeing.

A big window has a price on a slow link: the data in flight queues in the tunnel ahead of
other visitors' small requests (head-of-line blocking), and 16 MiB on a 10 Mbit/s uplink
is 13 s.  So a stream earns its share by measured throughput (:class:`SendWindow`): it
starts at the 1 MiB floor, and its limit is twice what its acknowledgements show it moves
in 0.15 s.  The stream with the fast far end gets the whole share within milliseconds; one
behind a slow uplink or a slow visitor shrinks below the floor, to ``KITE_RATE_FLOOR``
(320 KiB: one ack step and a bit, so the peer's next ack always comes).  On a 10 Mbit/s
uplink that is ~375 KB, 0.3 s of the link, where the 1 MiB floor was 0.84 s
(``bench/uplink_bench.py``).

The queue below the scheduler
-----------------------------
Windows bound what a stream has in flight, not where it waits: whatever a tunnel has
written and its socket has not sent yet (the TLS layer, the transport's buffer, the
kernel's send queue) is one FIFO, and a new stream's first chunk queues behind all of it.
So a tunnel keeps that queue short (:class:`SendQueue`): about ``QUEUE_DELAY`` of the rate
its socket delivers at (bytes the peer's TCP acknowledged per second while data was
waiting), never under ``QUEUE_MIN``; a stream that has sent more than one quantum in its
current burst reads its local socket only while the queue is under that target, and held
streams take turns, one quantum each.  The rest of a bulk transfer waits in its own local
socket, where it delays nobody.  On a 10 Mbit/s uplink the target is ~12 KB (10 ms); on
loopback it is megabytes, and bulk transfers read as before.

Sans-IO: these classes only count; the tunnel pauses and resumes transports.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "KITE_MIN_WINDOW",
    "KITE_MAX_WINDOW",
    "KITE_TUNNEL_BUDGET",
    "KITE_ACK_STEP",
    "KITE_RATE_FLOOR",
    "PAGEKITE_WINDOW",
    "PAGEKITE_ACK_STEP",
    "KITE_FLOW_FEATURE",
    "WindowPolicy",
    "SendWindow",
    "AckPolicy",
    "QUEUE_MIN",
    "QUEUE_MAX",
    "QUEUE_DELAY",
    "SendQueue",
]

#: The feature a kite peer announces: it honours large windows and acks in big steps.
KITE_FLOW_FEATURE = "KiteFlow"
#: Smallest window a stream gets towards a kite peer (bytes unacknowledged per stream).
KITE_MIN_WINDOW = 1024 * 1024
#: Largest window a stream gets towards a kite peer (it is the tunnel's only busy stream).
KITE_MAX_WINDOW = 16 * 1024 * 1024
#: What all streams of one tunnel to a kite peer share (see "Window sizing" above).
KITE_TUNNEL_BUDGET = 16 * 1024 * 1024
#: How often kite acks towards a kite peer: four acks per smallest window.
KITE_ACK_STEP = KITE_MIN_WINDOW // 4
#: Smallest window of a stream whose throughput has been measured low (a slow uplink, a slow
#: visitor): it starts at KITE_MIN_WINDOW and may shrink to this.  One ack step and a bit,
#: so that the peer's next ack (every KITE_ACK_STEP written) always comes.
KITE_RATE_FLOOR = KITE_ACK_STEP + 64 * 1024
#: pagekite.py's own limit: it pauses at 3 * 16256 bytes (~47.6 KiB) unacknowledged.
PAGEKITE_WINDOW = 3 * 16256
#: How often kite acks towards pagekite.py: well inside its 47.6 KiB window.
PAGEKITE_ACK_STEP = 8 * 1024


class WindowPolicy:
    """The window of every stream of one tunnel: a share of the tunnel's budget.

    ``window`` is recomputed when the number of streams changes (O(1)); the streams read it
    at each check, so a new stream narrows the others at once and a finished one widens
    them.  A fixed policy (``min_window == max_window``) is what pagekite.py peers get.
    """

    __slots__ = ("window", "min_window", "max_window", "budget", "streams", "rate_floor")

    def __init__(self, min_window: int, max_window: Optional[int] = None,
                 budget: Optional[int] = None, rate_floor: Optional[int] = None) -> None:
        if min_window < 1024:
            raise ValueError(f"flow-control window {min_window!r} is below 1 KiB")
        max_window = min_window if max_window is None else max_window
        if max_window < min_window:
            raise ValueError(f"max_window {max_window!r} is below min_window {min_window!r}")
        rate_floor = min_window if rate_floor is None else rate_floor
        if not 1024 <= rate_floor <= min_window:
            raise ValueError(f"rate_floor {rate_floor!r} is outside 1 KiB..min_window")
        self.min_window = min_window
        self.rate_floor = rate_floor  # what a stream measured slow may shrink to
        self.max_window = max_window
        self.budget = max_window if budget is None else budget
        self.streams = 0
        self.window = max(min_window, min(max_window, self.budget))

    @classmethod
    def fixed(cls, window: int) -> WindowPolicy:
        return cls(window, window, window)

    def set_streams(self, n: int) -> None:
        """The tunnel now carries ``n`` streams."""
        self.streams = n
        share = self.budget // n if n > 1 else self.budget
        self.window = max(self.min_window, min(self.max_window, share))


class SendWindow:
    """The sending half: how far one stream may run ahead of the peer's acknowledgements.

    A stream starts at the policy's floor and may use its share of the tunnel's budget only
    while its acknowledgements show the far end drains fast enough: the limit is twice the
    bytes acknowledged per ``RATE_HORIZON`` seconds (throughput measured over at least
    ``RATE_INTERVAL``), so a stream keeps at most ~0.3 s of its own data queued ahead of the
    other streams.  On loopback or a fast link that is the whole share at once; on a
    10 Mbit/s uplink ~375 KB (never below the policy's ``rate_floor``).  A window-limited
    stream doubles its limit per round trip while the round trip is under 2 * RATE_HORIZON
    (0.3 s: every terrestrial link), up to the share.
    """

    __slots__ = ("policy", "acked", "want", "clear_below", "_t0", "_acked0")

    #: seconds of measured throughput a stream may keep in flight (twice, see above)
    RATE_HORIZON = 0.15
    #: shortest interval a throughput sample is measured over
    RATE_INTERVAL = 0.02

    def __init__(self, policy: WindowPolicy) -> None:
        self.policy = policy
        self.acked = 0  # bytes the peer has acknowledged (1024 * its latest SKB)
        self.want = policy.min_window  # what the measured throughput justifies
        # Below this many bytes sent the stream cannot be blocked (the window is never under
        # the rate floor): the per-read check is one comparison until a stream sends a lot.
        self.clear_below = policy.rate_floor
        self._t0: Optional[float] = None  # start of the current throughput sample
        self._acked0 = 0

    @property
    def window(self) -> int:
        """The limit now: the rate floor <= limit <= this stream's share of the budget."""
        p = self.policy
        w = p.window
        want = self.want
        if want < w:
            w = want if want > p.rate_floor else p.rate_floor
        return w

    def blocked(self, sent: int) -> bool:
        """True while ``sent`` bytes run a full window ahead of the acknowledgements."""
        return sent - self.acked >= self.window

    def on_ack(self, kib: int, sent: int, now: Optional[float] = None) -> bool:
        """Record ``SKB: kib`` (received at ``now``, seconds on any monotonic clock); returns
        True if the stream may read again.

        Acks are absolute and monotonic: an old (smaller) one is ignored, and an ack beyond
        what was sent is clamped (a confused or hostile peer cannot open the window wider
        than the bytes actually sent).
        """
        acked = kib * 1024
        if acked > sent:
            acked = sent
        if acked > self.acked:
            self.acked = acked
            self.clear_below = acked + self.policy.rate_floor
            if now is not None:
                t0 = self._t0
                if t0 is None:
                    self._t0, self._acked0 = now, acked
                elif now - t0 >= self.RATE_INTERVAL:
                    rate = (acked - self._acked0) / (now - t0)
                    self.want = int(2 * rate * self.RATE_HORIZON)
                    self._t0, self._acked0 = now, acked
        return sent - self.acked < self.window


class AckPolicy:
    """The receiving half: when to send ``SKB`` for bytes written to the local socket."""

    __slots__ = ("step", "last_kib")

    def __init__(self, step: int) -> None:
        if step < 1024:
            raise ValueError(f"ack step {step!r} is below 1 KiB")
        self.step = step
        self.last_kib = 0  # the SKB value sent last

    def due(self, written: int, *, force: bool = False) -> Optional[int]:
        """The SKB value to send now for ``written`` bytes, or None if no ack is due.

        Due when at least ``step`` bytes were written since the last ack, or on ``force``
        (the local socket drained: ack whatever is new so the sender can refill).
        """
        kib = written >> 10
        if kib <= self.last_kib:
            return None
        if force or (kib - self.last_kib) * 1024 >= self.step:
            self.last_kib = kib
            return kib
        return None


#: Unsent bytes a tunnel keeps queued below its stream scheduler: at least this much ...
QUEUE_MIN = 8 * 1024
#: ... at most this much (the tunnel transport's high-water mark) ...
QUEUE_MAX = 4 * 1024 * 1024
#: ... and else this many seconds of the rate its socket delivers at.
QUEUE_DELAY = 0.01


class SendQueue:
    """How many bytes may wait below a tunnel's stream scheduler (see "The queue below the
    scheduler" above), from samples of its socket: ``sample(now, acked, unsent)`` with the
    peer's TCP-acknowledged byte count and the bytes still queued.

    The estimate is the highest sample, decaying by ``RATE_DECAY`` per lower sample taken
    while bytes stayed queued (the link slowed down); a sample in which the queue ran dry
    measured only what was offered, and can only raise it.

    ``target`` follows the estimate; ``quantum`` is what a held stream sends per turn
    (half the target, between ``QUANTUM_MIN`` and ``quantum_max``); ``delay(queued)`` is
    when to look again: when about half the target is left.
    """

    __slots__ = ("rate", "target", "quantum", "quantum_max", "_t0", "_acked0", "_busy")

    #: shortest interval a rate sample is measured over
    RATE_INTERVAL = 0.01
    #: what a lower sample keeps of the estimate: a queue that ran dry between two looks
    #: measures less than the link does, so one sample must not shrink the target
    RATE_DECAY = 0.97
    #: a held stream's turn: never under this
    QUANTUM_MIN = 4 * 1024
    #: how soon and how late the tunnel looks at its queue again while streams are held
    DELAY_MIN = 0.001
    DELAY_MAX = 0.02

    def __init__(self, quantum_max: int = 128 * 1024) -> None:
        self.rate = 0.0  # bytes/s the socket delivers at (0: not measured yet)
        self.quantum_max = max(self.QUANTUM_MIN, quantum_max)
        self.target = QUEUE_MIN
        self.quantum = self.QUANTUM_MIN
        self._t0: Optional[float] = None
        self._acked0 = 0
        self._busy = True  # bytes stayed queued since the sample interval began

    def sample(self, now: float, acked: int, unsent: int) -> None:
        """The socket's peer has acknowledged ``acked`` bytes in all (monotonic) and
        ``unsent`` bytes wait to be sent, at ``now`` (seconds, any monotonic clock)."""
        if not unsent:
            self._busy = False
        t0 = self._t0
        if t0 is None or acked < self._acked0:
            self._t0, self._acked0, self._busy = now, acked, bool(unsent)
            return
        if now - t0 < self.RATE_INTERVAL:
            return
        rate = (acked - self._acked0) / (now - t0)
        if rate > self.rate:
            self.rate = rate
        elif self._busy:  # the link slowed down, or the queue ran dry unseen: decay slowly
            self.rate = max(rate, self.rate * self.RATE_DECAY)
        self._t0, self._acked0, self._busy = now, acked, bool(unsent)
        self.target = min(QUEUE_MAX, max(QUEUE_MIN, int(self.rate * QUEUE_DELAY)))
        self.quantum = min(self.quantum_max, max(self.QUANTUM_MIN, self.target // 2))

    def delay(self, queued: int) -> float:
        """Seconds until ``queued`` bytes are down to about half the target."""
        rate = self.rate
        if rate <= 0:
            return self.DELAY_MIN
        d = (queued - self.target / 2) / rate
        return min(self.DELAY_MAX, max(self.DELAY_MIN, d))
