"""kite.net.busypoll: the loop polls for a quick answer, adapts its window, and stops.

The clock is the test's: each loop turn advances it by a fixed step, so what the poller
decides depends on no real time."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from kite.config import check_busy_poll
from kite.errors import ConfigError
from kite.net.busypoll import BUSY_HOLD, MIN_WINDOW, BusyPoll
from support import KITE, run

US = 1e-6


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(max_us=200, step_us=10):
    """A poller whose clock advances by ``step_us`` at every yield (every turn of polling)."""
    clock = Clock()
    turns = []

    def turn():
        turns.append(clock.now)
        clock.now += step_us * US

    return BusyPoll(max_us, clock=clock, yield_cpu=turn), clock, turns


async def settle(poller: BusyPoll) -> None:
    """Run the loop until the poller stops polling."""
    for _ in range(100_000):
        if not poller.polling:
            return
        await asyncio.sleep(0)
    raise AssertionError("still polling")


def test_polls_for_the_window_then_halves_it(loop_kind):
    async def main():
        poller, clock, turns = make(max_us=200, step_us=10)
        poller.poke()
        assert poller.polling
        await settle(poller)
        # about 200 us of turns, then it stops, and the next window is half as long
        assert 19 <= len(turns) <= 21
        assert poller.window == pytest.approx(100 * US)
        turns.clear()
        clock.now += 1.0  # a long quiet: the next poke is not "soon after"
        poller.poke()
        await settle(poller)
        assert 9 <= len(turns) <= 11
        assert poller.window == pytest.approx(50 * US)

    run(main, loop_kind)


def test_an_answer_while_polling_keeps_it_polling(loop_kind):
    async def main():
        poller, clock, turns = make(max_us=200, step_us=10)
        poller.poke()
        for _ in range(5):
            await asyncio.sleep(0)
        assert poller.polling
        poller.poke()  # the answer came: poll on, a full window from now
        until = poller.until
        assert until == pytest.approx(clock.now + 200 * US)
        await settle(poller)
        assert clock.now >= until

    run(main, loop_kind)


def test_a_slow_answer_shrinks_the_window_to_nothing(loop_kind):
    async def main():
        poller, clock, turns = make(max_us=200, step_us=10)
        for _ in range(6):
            poller.poke()
            await settle(poller)
            clock.now += 0.005  # the local server takes 5 ms: beyond every window
        assert poller.window == 0.0
        turns.clear()
        poller.poke()
        assert not poller.polling and not turns  # nothing spent on it any more

    run(main, loop_kind)


def test_an_answer_just_after_polling_stopped_grows_the_window(loop_kind):
    async def main():
        poller, clock, turns = make(max_us=200, step_us=10)
        poller.window = 0.0  # shrunk earlier
        poller.poke()
        assert not poller.polling
        clock.now += 80 * US  # the answer came 80 us later: polling would have caught it
        poller.poke()
        assert poller.polling
        assert poller.window == pytest.approx(120 * US)  # 1.5 x the gap
        await settle(poller)  # ~120 us of polling caught nothing: the window halves
        assert poller.window == pytest.approx(60 * US)
        clock.now += 30 * US
        poller.poke()  # ~150 us after the last: 1.5 x that is beyond the maximum, 200
        assert poller.window == pytest.approx(200 * US)

    run(main, loop_kind)


def test_a_busy_loop_does_not_poll(loop_kind):
    """Two answers in one turn of the loop: its reads come in batches; polling stops (and
    the window stays, for when it is quiet again)."""
    async def main():
        poller, clock, turns = make(max_us=200, step_us=10)
        poller.poke()
        poller.poke()
        await settle(poller)
        assert not turns and poller.window == pytest.approx(200 * US)
        poller.poke()  # held: no polling for BUSY_HOLD
        assert not poller.polling
        clock.now += BUSY_HOLD
        poller.poke()  # one answer a turn: it polls
        await asyncio.sleep(0)
        assert poller.polling and turns
        await settle(poller)

    run(main, loop_kind)


def test_yields_that_give_the_cpu_away_stop_polling(loop_kind):
    """Turns far apart (each yield let another process run): the CPUs are full, so the
    poller holds off as for a busy loop."""
    async def main():
        poller, clock, turns = make(max_us=10_000, step_us=50)  # 50 us a turn: contended
        poller.poke()
        await settle(poller)
        assert 3 <= len(turns) <= 8  # stopped long before its 10 ms window
        assert poller.held_until > clock.now - 0.001
        turns.clear()
        poller.poke()  # held
        assert not poller.polling

    run(main, loop_kind)


def test_window_bounds():
    assert MIN_WINDOW > 0
    assert check_busy_poll(0) == 0 and check_busy_poll(10_000) == 10_000
    for bad in (-1, 10_001, 1.5, True, "200"):
        with pytest.raises(ConfigError, match="busy"):
            check_busy_poll(bad)


@pytest.mark.parametrize("command", [["relay", "--kite", "*:*.example.com:a-long-enough-secret"],
                                     ["expose", "8080", "app.example.com", "--relay",
                                      "127.0.0.1:1", "--secret", "a-long-enough-secret"]])
def test_a_bad_busy_poll_exits_2_naming_the_option(command):
    out = subprocess.run([*KITE, *command, "--busy-poll", "20000"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert "--busy-poll" in out.stderr and "10000" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
