"""Event-loop selection: uvloop by default, plain asyncio when uvloop cannot load.

``KITE_LOOP=asyncio`` (or ``loop="asyncio"``) forces the standard loop; the tests run every
integration test on both.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Awaitable, Callable, Optional, TypeVar

log = logging.getLogger("kite")

T = TypeVar("T")

__all__ = ["feed_protocol", "new_event_loop", "run", "loop_name"]


def feed_protocol(protocol: asyncio.BaseProtocol, data) -> None:
    """Hand ``data`` to ``protocol`` as if its transport had read it (through
    ``get_buffer``/``buffer_updated`` for a BufferedProtocol, else ``data_received``)."""
    if not isinstance(protocol, asyncio.BufferedProtocol):
        protocol.data_received(bytes(data))  # type: ignore[attr-defined]
        return
    view = memoryview(data)
    while view:
        buf = memoryview(protocol.get_buffer(len(view)))
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        protocol.buffer_updated(n)
        view = view[n:]


def new_event_loop(kind: Optional[str] = None) -> asyncio.AbstractEventLoop:
    """A new loop of ``kind`` ("uvloop", "asyncio" or None/"auto" = uvloop if importable)."""
    kind = kind or os.environ.get("KITE_LOOP") or "auto"
    if kind not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f"unknown event loop {kind!r}: use uvloop or asyncio")
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
            log.debug("uvloop not available; using asyncio")
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(main: Callable[[], Awaitable[T]], kind: Optional[str] = None) -> T:
    """Run ``main()`` to completion on a fresh loop of ``kind`` and close the loop."""
    loop = new_event_loop(kind)
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main())
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
