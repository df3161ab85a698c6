"""Flow-control arithmetic (kite.proto.flow): windows shared per tunnel, acks, clamping."""

from __future__ import annotations

import pytest

from kite.proto.flow import (KITE_ACK_STEP, KITE_MAX_WINDOW, KITE_MIN_WINDOW,
                             KITE_TUNNEL_BUDGET, PAGEKITE_WINDOW, AckPolicy, SendWindow,
                             WindowPolicy)

MiB = 1024 * 1024


def kite_policy():
    return WindowPolicy(KITE_MIN_WINDOW, KITE_MAX_WINDOW, KITE_TUNNEL_BUDGET)


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


def test_send_window_follows_its_policy():
    p = kite_policy()
    p.set_streams(1)
    w = SendWindow(p)
    assert not w.blocked(15 * MiB)
    assert w.blocked(16 * MiB)
    p.set_streams(4)  # three more streams: this one narrows at once
    assert w.blocked(4 * MiB)
    assert not w.on_ack(0, 4 * MiB)
    assert w.on_ack(1, 4 * MiB)  # 1 KiB acked: 4 MiB - 1 KiB in flight < 4 MiB
    p.set_streams(1)  # the others finished: it widens again
    assert not w.blocked(8 * MiB)


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


def test_ack_policy_steps_and_forced_acks():
    a = AckPolicy(KITE_ACK_STEP)
    assert a.due(KITE_ACK_STEP - 1024) is None
    assert a.due(KITE_ACK_STEP) == KITE_ACK_STEP // 1024
    assert a.due(KITE_ACK_STEP + 5000) is None
    assert a.due(KITE_ACK_STEP + 5000, force=True) == (KITE_ACK_STEP + 5000) // 1024
    assert a.due(KITE_ACK_STEP + 5000, force=True) is None  # nothing new
    with pytest.raises(ValueError):
        AckPolicy(100)
