"""The access log: one line per visitor stream when it ends, and tunnel events, for relay
and backend alike (the one home of the format).

Theory of operation
-------------------
A role tells the :class:`AccessLog` when a visitor stream opens (:meth:`AccessLog.opened`,
with what it already parsed: the HTTP method, path and ``User-Agent`` of the first request
head) and when it closes (:meth:`AccessLog.closed`).  Bytes come from the counters the fast
path keeps in each stream's slot (``sent``, ``received``): nothing is added per chunk.  An
HTTP response's status is read once per stream from the first bytes of the response: on
the relay by a sink installed for the first response chunk, which then puts the stream's
own sink back (:func:`watch_status`); on the backend by the local connection's protocol
for its first read, which then hands the transport to the plain one.

A stream's ``result`` is ``ok`` unless something marked it before it closed
(:meth:`AccessLog.mark`): ``reset`` (cut: the tunnel went down, the far side reset, flow
control), ``quota`` (its account was blocked), ``offline``.  A visitor refused before any
stream existed is one line too (:meth:`AccessLog.refused`), result ``refused``, ``offline``
or ``quota`` with the reason.

Lines are written once per loop iteration at most (one write for every stream that ended
in it), as text or as JSON (``--log-format``).  Whatever is written passes through
:func:`clean`: no query string (unless asked for), no control characters; the log never
carries a header value other than ``User-Agent``, so secrets, ``Authorization`` and
``Cookie`` values cannot appear.

The log also keeps totals for metrics (:attr:`AccessLog.totals`, :attr:`AccessLog.bytes`):
streams by (kite, protocol, result) and bytes by kite, added when a stream ends; at most
:data:`MAX_NAMES` names, the rest under ``other``.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from typing import IO, Callable, Optional

from ..errors import ConfigError

__all__ = ["AccessRecord", "AccessLog", "format_text", "format_json", "clean", "user_agent",
           "request_fields", "response_status", "watch_status", "open_access_log", "FORMATS",
           "RESULTS"]

#: ``--log-format`` values.
FORMATS = ("text", "json")
#: What a stream or visitor line may say in ``result``.
RESULTS = ("ok", "refused", "quota", "offline", "reset")
#: Longest path and user agent written (longer ones are cut and end with ``...``).
MAX_FIELD = 512
#: Names kept apart in the totals; visitors may send any Host or SNI, so past this many the
#: rest are counted under :data:`OTHER` (memory stays bounded).
MAX_NAMES = 10_000
OTHER = "other"

_UA = re.compile(rb"\r\nuser-agent:[ \t]*([^\r\n]*)", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\"\\]")


def clean(value: str, limit: int = MAX_FIELD) -> str:
    """``value`` safe for one log line: control characters, quotes and backslashes escaped,
    at most ``limit`` characters."""
    if len(value) > limit:
        value = value[:limit] + "..."
    return _CONTROL.sub(lambda m: "\\x%02x" % ord(m.group()), value)


def user_agent(head: bytes) -> str:
    """The ``User-Agent`` of a request head (``""`` if it has none)."""
    m = _UA.search(head, 0, 16384)
    return m.group(1).decode("latin-1").strip() if m else ""


def request_fields(head: bytes) -> tuple[str, str, str]:
    """``(method, path, user agent)`` of an HTTP request head, ``("", "", "")`` if the
    bytes do not start with a request line."""
    end = head.find(b"\r\n", 0, 16384)
    parts = head[:end if end >= 0 else 16384].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/") or not parts[0].isalpha():
        return "", "", ""
    return parts[0].decode("latin-1"), parts[1].decode("latin-1"), user_agent(head)


def response_status(view) -> Optional[int]:
    """The status code of a response head's first bytes (``HTTP/1.1 200 ...``), or None."""
    first = bytes(view[:12])
    if len(first) == 12 and first[:5] == b"HTTP/" and first[8:9] == b" " and first[9:12].isdigit():
        return int(first[9:12])
    return None


@dataclass
class AccessRecord:
    """One visitor stream (or a refused visitor), as written."""

    time: float  # when the stream opened (Unix time)
    kite: str  # the name the visitor asked for
    proto: str  # http, https, raw, websocket
    visitor: str  # ip:port
    method: str = ""
    path: str = ""
    status: Optional[int] = None
    user_agent: str = ""
    bytes_in: int = 0  # from the visitor
    bytes_out: int = 0  # to the visitor
    duration: float = 0.0  # seconds
    result: str = "ok"
    reason: str = ""


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % (int(t * 1000) % 1000)


def format_text(rec: AccessRecord) -> str:
    """One text line: ``TIME KITE PROTO VISITOR "METHOD PATH" STATUS IN OUT DURATION
    RESULT[:REASON] "USER-AGENT"`` (``-`` for what a stream does not have)."""
    request = f'"{clean(rec.method, 16)} {clean(rec.path)}"' if rec.method else "-"
    result = rec.result + (f' "{clean(rec.reason, 200)}"' if rec.reason else "")
    agent = f'"{clean(rec.user_agent)}"' if rec.user_agent else "-"
    return (f"{_stamp(rec.time)} {clean(rec.kite, 253) or '-'} {rec.proto or '-'} "
            f"{rec.visitor or '-'} {request} {rec.status if rec.status is not None else '-'} "
            f"in={rec.bytes_in} out={rec.bytes_out} {rec.duration:.3f}s {result} {agent}")


def format_json(rec: AccessRecord) -> str:
    """One JSON object per line (the record's fields; ``time`` as ISO 8601 UTC)."""
    d = asdict(rec)
    d["time"] = _stamp(rec.time)
    d["duration"] = round(rec.duration, 6)
    for key in ("kite", "path", "user_agent", "reason", "method"):
        d[key] = clean(d[key])
    return json.dumps(d, separators=(",", ":"))


def _event_text(t: float, event: str, fields: dict) -> str:
    rest = " ".join(f'{k}="{clean(str(v))}"' if isinstance(v, str) and (" " in v or not v)
                    else f"{k}={clean(str(v))}" for k, v in fields.items())
    return f"{_stamp(t)} {event} {rest}".rstrip()


def _event_json(t: float, event: str, fields: dict) -> str:
    d = {"time": _stamp(t), "event": event}
    d.update({k: clean(v) if isinstance(v, str) else v for k, v in fields.items()})
    return json.dumps(d, separators=(",", ":"))


def watch_status(slot, record: AccessRecord) -> None:
    """Read the status of the first response chunk that reaches ``slot``'s sink, then
    give the sink back: one extra Python call per stream, none per chunk after."""
    sink = slot.sink

    def first(view) -> None:
        slot.sink = sink
        record.status = response_status(view)
        sink(view)

    slot.sink = first


class AccessLog:
    """Open streams' records, the totals, and the writer (see the module doc).

    ``out``: where lines go (None: keep totals only, e.g. metrics without a log);
    ``fmt``: ``text`` or ``json``; ``query``: keep query strings in paths.  ``inbound``:
    which slot counter counts bytes *from* the visitor, ``sent`` on the relay (it reads the
    visitor's socket), ``received`` on the backend.
    """

    def __init__(self, out: Optional[IO[str]] = None, fmt: str = "text", *, query: bool = False,
                 inbound: str = "sent", clock: Callable[[], float] = time.time) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"log format {fmt!r}: choose {' or '.join(FORMATS)}")
        self.out = out
        self.fmt = fmt
        self.query = query
        self._inbound = inbound == "sent"
        self._clock = clock
        self._open: dict = {}  # Stream -> (record, monotonic start, bytes peeked)
        self._ending: dict = {}  # streams closed in this loop iteration, same entries
        self._lines: list[str] = []
        self._scheduled = False
        #: streams ended, by (kite, proto, result)
        self.totals: dict[tuple[str, str, str], int] = {}
        #: bytes of ended streams by kite: [in, out]
        self.bytes: dict[str, list[int]] = {}

    # -- streams ------------------------------------------------------------------------------
    def opened(self, stream, *, head: bytes = b"", method: str = "", path: str = "",
               peeked: int = 0) -> AccessRecord:
        """``stream`` started; ``head``: the first request head if it is HTTP (method,
        path, user agent come from it unless given); ``peeked``: bytes from the visitor that
        travelled in the stream-open chunk and are not in the slot's counters."""
        proto = stream.proto
        rec = AccessRecord(self._clock(), stream.host, proto, stream.peer)
        if head and proto in ("http", "websocket"):
            m, p, rec.user_agent = request_fields(head)
            rec.method, rec.path = method or m, path or p
            if rec.path and not self.query:
                rec.path = rec.path.partition("?")[0]
            if self._inbound:  # the relay: responses reach the visitor through the sink
                watch_status(stream.slot, rec)
        self._open[stream] = (rec, time.monotonic(), peeked)
        return rec

    def mark(self, stream, result: str, reason: str = "") -> None:
        """The stream ends for ``result`` (the first mark wins; a mark may come just after
        :meth:`closed`, in the same loop iteration, as a cut's reset follows its close)."""
        entry = self._open.get(stream) or self._ending.get(stream)
        if entry is not None and entry[0].result == "ok":
            entry[0].result = result
            entry[0].reason = reason

    def closed(self, stream) -> None:
        """``stream`` ended: its line is finished and written at the end of this loop
        iteration (marks made until then still count)."""
        entry = self._open.pop(stream, None)
        if entry is None:
            return
        entry[0].duration = time.monotonic() - entry[1]
        self._ending[stream] = entry
        self._schedule()

    def _finish(self, stream, entry) -> None:
        rec, _started, peeked = entry
        slot = stream.slot
        if self._inbound:
            rec.bytes_in, rec.bytes_out = slot.sent + peeked, slot.received
        else:
            rec.bytes_in, rec.bytes_out = slot.received, slot.sent
        self._count(rec.kite, rec.proto, rec.result)
        name = rec.kite
        b = self.bytes.get(name)
        if b is None:
            if len(self.bytes) >= MAX_NAMES:
                name = OTHER
            b = self.bytes.setdefault(name, [0, 0])
        b[0] += rec.bytes_in
        b[1] += rec.bytes_out
        if self.out is not None:
            self._lines.append(format_json(rec) if self.fmt == "json" else format_text(rec))

    def _count(self, kite: str, proto: str, result: str) -> None:
        totals = self.totals
        key = (kite, proto, result)
        n = totals.get(key)
        if n is None and len(totals) >= MAX_NAMES:
            key = (OTHER, proto, result)
            n = totals.get(key)
        totals[key] = (n or 0) + 1

    def live(self) -> list:
        """``(stream, record, bytes in, bytes out)`` of every open stream, now."""
        out = []
        for stream, (rec, _started, peeked) in self._open.items():
            slot = stream.slot
            if self._inbound:
                out.append((stream, rec, slot.sent + peeked, slot.received))
            else:
                out.append((stream, rec, slot.received, slot.sent))
        return out

    # -- visitors without a stream, tunnel events ------------------------------------------------
    def refused(self, visitor: str, kite: str, proto: str, reason: str, result: str = "refused",
                *, head: bytes = b"") -> None:
        """A visitor refused before any stream (no kite, offline, quota, limits)."""
        rec = AccessRecord(self._clock(), kite, proto, visitor, result=result, reason=reason)
        if head and proto in ("http", "websocket"):
            rec.method, rec.path, rec.user_agent = request_fields(head)
            if not self.query:
                rec.path = rec.path.partition("?")[0]
        self._count(kite, proto, result)
        if self.out is not None:
            self._queue(format_json(rec) if self.fmt == "json" else format_text(rec))

    def event(self, event: str, **fields) -> None:
        """A tunnel event on its own line: ``tunnel-up``, ``tunnel-down`` (with ``reason``),
        ``kite-flying``, ``kite-offline``."""
        if self.out is None:
            return
        t = self._clock()
        self._queue(_event_json(t, event, fields) if self.fmt == "json"
                    else _event_text(t, event, fields))

    # -- writing ------------------------------------------------------------------------------
    def _queue(self, line: str) -> None:
        self._lines.append(line)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
                self._scheduled = True
            except RuntimeError:  # no loop (shutdown): write now
                self.flush()

    def flush(self) -> None:
        """Finish the streams that ended, write the queued lines (one write)."""
        self._scheduled = False
        ending, self._ending = self._ending, {}
        for stream, entry in ending.items():
            self._finish(stream, entry)
        lines, self._lines = self._lines, []
        if lines and self.out is not None:
            try:
                self.out.write("\n".join(lines) + "\n")
                self.out.flush()
            except (OSError, ValueError):
                pass  # a closed or full log must not cost a visitor


def open_access_log(target: Optional[str], fmt: str = "text", *, inbound: str = "sent",
                    query: bool = False) -> Optional[AccessLog]:
    """``--access-log``: ``-`` (standard output), ``off`` (None), or a file appended to."""
    if target == "off":
        return None
    out: IO[str]
    if target in (None, "", "-"):
        out = sys.stdout
    else:
        try:  # open for the life of the process
            out = open(target, "a", encoding="utf-8", buffering=1 << 16)
        except OSError as exc:
            raise ConfigError("--access-log", f"cannot write {target!r}: {exc.strerror or exc}",
                              'give a writable file, "-" (standard output) or "off"') from None
    return AccessLog(out, fmt, inbound=inbound, query=query)
