"""What every command does around its entry point: logging, the event loop, exit codes.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error (one line
``kite: error: ...`` naming the problem and the fix).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click

from ..errors import ConfigError, KiteError

__all__ = ["GRACE_SECONDS", "config_errors", "fail", "run_until_signal", "serve",
           "setup_logging"]

#: After SIGTERM/SIGINT, how long a command may take to wind down before it is cancelled.
GRACE_SECONDS = 30.0


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.INFO
    if quiet:
        level = logging.WARNING
    if verbose:
        level = logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def fail(message: str, status: int = 2) -> NoReturn:
    """One line ``kite: error: message`` on stderr, then exit (2: usage or configuration)."""
    click.echo(f"kite: error: {message}", err=True)
    sys.exit(status)


@contextmanager
def config_errors() -> Iterator[None]:
    """A ConfigError raised inside the block is reported in one line and exits 2."""
    try:
        yield
    except ConfigError as err:
        fail(str(err))


def run_until_signal(main: Callable[[asyncio.Event], Coroutine[Any, Any, int | None]],
                     loop_kind: str | None) -> int:
    """Run ``main(stop_event)`` on uvloop (or asyncio); SIGTERM/SIGINT set the event.

    Returns main's exit status (None counts as 0); a KiteError is one line on stderr and
    status 1, a ConfigError status 2.
    """
    from ..net.aio import run

    async def wrapper():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        main_task = loop.create_task(main(stop))

        def on_signal():
            if stop.is_set():  # a second signal: stop now
                main_task.cancel()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, on_signal)
            except (NotImplementedError, RuntimeError):
                pass
        stop_waiter = loop.create_task(stop.wait())
        await asyncio.wait({main_task, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not main_task.done():
            # main() drains on its own (relay: up to --drain-timeout); past that, cancel it.
            done, _ = await asyncio.wait({main_task}, timeout=GRACE_SECONDS)
            if not done:
                main_task.cancel()
        stop_waiter.cancel()
        try:
            return await main_task
        except asyncio.CancelledError:
            return 1

    try:
        with config_errors():
            return run(wrapper, loop_kind) or 0
    except KiteError as err:
        click.echo(f"kite: error: {err}", err=True)
        return 1


def serve(main: Callable[[asyncio.Event], Coroutine[Any, Any, int | None]],
          loop_kind: str | None) -> NoReturn:
    """:func:`run_until_signal`, then exit with its status."""
    sys.exit(run_until_signal(main, loop_kind))
