"""Flow-control arithmetic (kite.proto.flow): windows shared per tunnel, acks, clamping."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kite.proto.flow import (
    KITE_ACK_STEP,
    KITE_MAX_WINDOW,
    KITE_MIN_WINDOW,
    KITE_RATE_FLOOR,
    KITE_TUNNEL_BUDGET,
    PAGEKITE_WINDOW,
    QUEUE_DELAY,
    QUEUE_MAX,
    QUEUE_MIN,
    AckPolicy,
    SendQueue,
    SendWindow,
    WindowPolicy,
)

MiB = 1024 * 1024


def kite_policy():
    return WindowPolicy(KITE_MIN_WINDOW, KITE_MAX_WINDOW, KITE_TUNNEL_BUDGET,
                        rate_floor=KITE_RATE_FLOOR)


def test_one_stream_gets_the_whole_budget_and_many_share_it_down_to_the_floor():
    p = kite_policy()
    p.set_streams(1)
    assert p.window == 16 * MiB
    p.set_streams(2)
    assert p.window == 8 * MiB
    p.set_streams(5)
    assert p.window == 16 * MiB // 5
    p.set_streams(16)
    assert p.window == 1 * MiB
    p.set_streams(10_000)
    assert p.window == KITE_MIN_WINDOW
    p.set_streams(0)
    assert p.window == KITE_MAX_WINDOW


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 17, 100, 10_000])
def test_what_a_tunnel_can_make_its_peer_hold_is_bounded(n):
    p = kite_policy()
    p.set_streams(n)
    assert p.window * n <= max(KITE_TUNNEL_BUDGET, n * KITE_MIN_WINDOW)
    # the ack step always fits well inside the smallest window
    assert KITE_ACK_STEP * 4 <= p.window


def test_fixed_policy_for_pagekite_peers_never_changes():
    p = WindowPolicy.fixed(PAGEKITE_WINDOW)
    for n in (0, 1, 50, 10_000):
        p.set_streams(n)
        assert p.window == PAGEKITE_WINDOW


def fast_stream(p):
    """A stream whose acks showed 400 MB/s (loopback): it may use its whole share."""
    w = SendWindow(p)
    w.on_ack(1, 1024, now=0.0)  # the first ack starts a throughput sample
    w.on_ack(8 * 1024, 8 * MiB, now=0.021)  # 8 MiB in 21 ms
    return w


def test_a_new_stream_starts_at_the_floor():
    p = kite_policy()
    p.set_streams(1)
    w = SendWindow(p)
    assert w.window == KITE_MIN_WINDOW
    assert w.blocked(KITE_MIN_WINDOW)
    assert not w.blocked(KITE_MIN_WINDOW - 1)


def test_send_window_follows_its_policy():
    p = kite_policy()
    p.set_streams(1)
    w = fast_stream(p)
    sent = 8 * MiB
    assert w.window == 16 * MiB
    assert not w.blocked(sent + 15 * MiB)
    assert w.blocked(sent + 16 * MiB)
    p.set_streams(4)  # three more streams: this one narrows at once
    assert w.window == 4 * MiB
    assert w.blocked(sent + 4 * MiB)
    assert not w.on_ack(8 * 1024, sent + 4 * MiB)
    assert w.on_ack(8 * 1024 + 1, sent + 4 * MiB)  # 1 KiB acked: back under 4 MiB
    p.set_streams(1)  # the others finished: it widens again
    assert not w.blocked(sent + 8 * MiB)


def test_throughput_earns_the_window_and_losing_it_shrinks_it_again():
    p = kite_policy()
    p.set_streams(1)
    w = SendWindow(p)
    now, acked = 0.0, 1024
    w.on_ack(1, acked, now=now)
    # A long fat link (RTT 100 ms): each round trip acks one window; it grows per RTT
    # (x3 here: twice the throughput over 0.15 s) up to the share.
    windows = []
    for _ in range(6):
        acked += w.window
        now += 0.1
        w.on_ack(acked // 1024, acked, now=now)
        windows.append(w.window)
    assert KITE_MIN_WINDOW < windows[0] < windows[1] < windows[2]
    assert windows[-1] == 16 * MiB
    # The far end slows to 1.25 MB/s (a 10 Mbit/s uplink): twice 0.15 s of that, below the
    # 1 MiB a stream starts with.
    for _ in range(3):
        acked += 125_000
        now += 0.1
        w.on_ack(acked // 1024, acked + 16 * MiB, now=now)
    assert KITE_RATE_FLOOR < w.window < KITE_MIN_WINDOW
    assert abs(w.window - 375_000) < 20_000
    # A stalled far end: down to the rate floor, which is more than one ack step.
    for _ in range(3):
        now += 0.1
        w.on_ack(acked // 1024, acked + 16 * MiB, now=now)
        acked += 1024
    assert w.window == KITE_RATE_FLOOR > KITE_ACK_STEP


def test_samples_shorter_than_the_interval_do_not_count():
    p = kite_policy()
    p.set_streams(1)
    w = SendWindow(p)
    w.on_ack(1, 1024, now=0.0)
    w.on_ack(4096, 4 * MiB, now=0.001)  # 4 MiB in 1 ms, but one sample of 1 ms
    assert w.window == KITE_MIN_WINDOW


def test_fixed_windows_ignore_throughput():
    w = SendWindow(WindowPolicy.fixed(PAGEKITE_WINDOW))
    w.on_ack(1, 1024, now=0.0)
    w.on_ack(40, 40 * 1024, now=0.5)
    assert w.window == PAGEKITE_WINDOW


def test_acks_are_monotonic_and_clamped_to_what_was_sent():
    w = SendWindow(WindowPolicy.fixed(64 * 1024))
    assert w.blocked(64 * 1024)
    assert w.on_ack(10, 64 * 1024)
    assert w.acked == 10 * 1024
    w.on_ack(5, 64 * 1024)  # an old ack changes nothing
    assert w.acked == 10 * 1024
    w.on_ack(1_000_000, 70 * 1024)  # beyond what was sent: clamped
    assert w.acked == 70 * 1024
    assert not w.blocked(70 * 1024 + 64 * 1024 - 1)


def test_policy_rejects_nonsense():
    with pytest.raises(ValueError, match="below 1 KiB"):
        WindowPolicy(512)
    with pytest.raises(ValueError, match="below min_window"):
        WindowPolicy(2 * MiB, 1 * MiB)
    with pytest.raises(ValueError, match="rate_floor"):
        WindowPolicy(1 * MiB, 2 * MiB, rate_floor=2 * MiB)


def test_ack_policy_steps_and_forced_acks():
    a = AckPolicy(KITE_ACK_STEP)
    assert a.due(KITE_ACK_STEP - 1024) is None
    assert a.due(KITE_ACK_STEP) == KITE_ACK_STEP // 1024
    assert a.due(KITE_ACK_STEP + 5000) is None
    assert a.due(KITE_ACK_STEP + 5000, force=True) == (KITE_ACK_STEP + 5000) // 1024
    assert a.due(KITE_ACK_STEP + 5000, force=True) is None  # nothing new
    with pytest.raises(ValueError):
        AckPolicy(100)


@given(steps=st.lists(st.tuples(st.integers(0, 40 * MiB), st.integers(0, 40_000),
                                st.integers(1, 3000), st.floats(0, 0.5)), max_size=40))
def test_clear_below_never_hides_a_blocked_stream(steps):
    # The per-read fast path skips blocked() while sent < clear_below: that must be exact
    # for every sequence of sends, acks, stream counts and ack timings.
    p = kite_policy()
    w = SendWindow(p)
    sent, now = 0, 0.0
    for more, kib, streams, dt in steps:
        sent += more
        now += dt
        p.set_streams(streams)
        w.on_ack(kib, sent, now)
        for probe in (sent, w.clear_below - 1, w.clear_below):
            if probe < w.clear_below:
                assert not w.blocked(probe)
        assert w.clear_below == w.acked + p.rate_floor


# -- SendQueue: the target for the queue below a tunnel's scheduler ----------------------------
def test_send_queue_starts_small_and_follows_the_measured_rate():
    q = SendQueue(quantum_max=128 * 1024)
    assert (q.target, q.quantum, q.rate) == (QUEUE_MIN, SendQueue.QUANTUM_MIN, 0.0)
    q.sample(10.0, 0, 5000)
    q.sample(10.1, 12_500, 5000)  # 1 Mbit/s: the floor holds
    assert q.rate == pytest.approx(125_000)
    assert q.target == QUEUE_MIN
    q.sample(10.2, 12_500 + 125_000, 5000)  # 10 Mbit/s: QUEUE_DELAY of it
    assert q.target == int(1.25e6 * QUEUE_DELAY)
    q.sample(10.3, 137_500 + 100_000_000, 5000)  # 1 GB/s: QUEUE_DELAY of it, capped
    assert q.target == min(QUEUE_MAX, int(q.rate * QUEUE_DELAY))
    assert q.quantum == 128 * 1024  # never more than one read


def test_send_queue_lower_samples_decay_the_estimate_only_while_busy():
    q = SendQueue()
    q.sample(0.0, 0, 1)
    q.sample(1.0, 10_000_000, 1)
    assert q.rate == 10_000_000
    q.sample(2.0, 10_000_000, 0)  # ran dry: nothing was offered, the link is as fast
    assert q.rate == 10_000_000
    q.sample(3.0, 11_000_000, 1)  # began empty: may have run dry, counts as offered only
    assert q.rate == 10_000_000
    q.sample(4.0, 12_000_000, 1)  # queued throughout and slower: decays, not at once
    assert q.rate == pytest.approx(10_000_000 * SendQueue.RATE_DECAY)


def test_send_queue_ignores_short_intervals_and_counter_resets():
    q = SendQueue()
    q.sample(0.0, 1000, 1)
    q.sample(0.001, 900_000, 1)  # under RATE_INTERVAL: no sample
    assert q.rate == 0.0
    q.sample(0.1, 10, 1)  # a smaller count (a new socket): starts over
    assert q.rate == 0.0


def test_send_queue_delay_looks_again_at_half_the_target():
    q = SendQueue()
    assert q.delay(10**9) == SendQueue.DELAY_MIN  # no rate yet: look soon
    q.sample(0.0, 0, 1)
    q.sample(1.0, 1_250_000, 1)
    assert q.delay(q.target) == pytest.approx(q.target / 2 / 1_250_000)
    assert q.delay(0) == SendQueue.DELAY_MIN
    assert q.delay(10**9) == SendQueue.DELAY_MAX
