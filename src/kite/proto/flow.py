"""Per-stream flow control with PageKite ``SKB`` acknowledgements (pagekite-protocol.md §5.5).

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
acknowledge in steps of a quarter window, so a bulk transfer costs one tiny control chunk per
``window / 4`` bytes instead of one per chunk.  Towards pagekite.py, kite acknowledges every
``PAGEKITE_ACK_STEP`` bytes so that pagekite's fixed 47.6 KiB window never runs dry.

Sans-IO: these classes only count; the tunnel pauses and resumes transports.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "KITE_WINDOW",
    "PAGEKITE_WINDOW",
    "PAGEKITE_ACK_STEP",
    "KITE_FLOW_FEATURE",
    "SendWindow",
    "AckPolicy",
]

#: The feature a kite peer announces: it honours large windows and acks in big steps.
KITE_FLOW_FEATURE = "KiteFlow"
#: Window towards a kite peer (bytes unacknowledged per stream).
KITE_WINDOW = 1024 * 1024
#: pagekite.py's own limit: it pauses at 3 * 16256 bytes (~47.6 KiB) unacknowledged.
PAGEKITE_WINDOW = 3 * 16256
#: How often kite acks towards pagekite.py: well inside its 47.6 KiB window.
PAGEKITE_ACK_STEP = 8 * 1024


class SendWindow:
    """The sending half: how far we may run ahead of the peer's acknowledgements."""

    __slots__ = ("window", "acked")

    def __init__(self, window: int) -> None:
        if window < 1024:
            raise ValueError(f"flow-control window {window!r} is below 1 KiB")
        self.window = window
        self.acked = 0  # bytes the peer has acknowledged (1024 * its latest SKB)

    def blocked(self, sent: int) -> bool:
        """True while ``sent`` bytes run a full window ahead of the acknowledgements."""
        return sent - self.acked >= self.window

    def on_ack(self, kib: int, sent: int) -> bool:
        """Record ``SKB: kib``; returns True if the stream may read again.

        Acks are absolute and monotonic: an old (smaller) one is ignored, and an ack beyond
        what was sent is clamped (a confused or hostile peer cannot open the window wider
        than the bytes actually sent).
        """
        acked = kib * 1024
        if acked > sent:
            acked = sent
        if acked > self.acked:
            self.acked = acked
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
