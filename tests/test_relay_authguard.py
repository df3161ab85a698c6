"""kite.relay.authguard and the relay's ChallengeBook: limits without a clock of their own."""

from __future__ import annotations

import logging

from kite.proto.handshake import ChallengeBook
from kite.relay.authguard import AuthGuard


def test_free_failures_then_doubling_blocks():
    g = AuthGuard(free=3, first_block=2.0, max_block=16.0, forget_after=100.0)
    for i in range(3):
        g.failed("1.2.3.4", float(i), "http:a", "signature")
    assert g.blocked("1.2.3.4", 3.0) == 0
    g.failed("1.2.3.4", 3.0, "http:a", "signature")
    assert g.blocked("1.2.3.4", 3.0) == 2.0
    g.failed("1.2.3.4", 4.0, "http:a", "signature")
    assert g.blocked("1.2.3.4", 4.0) == 4.0
    for t in range(5, 12):
        g.failed("1.2.3.4", float(t), "http:a", "signature")
    assert g.blocked("1.2.3.4", 11.0) == 16.0  # capped
    assert g.blocked("5.6.7.8", 11.0) == 0  # per address
    assert g.blocked("1.2.3.4", 11.0 + 101.0) == 0  # forgotten
    assert len(g) == 0


def test_memory_is_bounded():
    g = AuthGuard(max_tracked=100)
    for i in range(1000):
        g.failed(f"10.0.{i // 256}.{i % 256}", float(i), "http:a", "signature")
    assert len(g) == 100


def test_logs_in_aggregate(caplog):
    g = AuthGuard(free=1)
    with caplog.at_level(logging.WARNING, logger="kite.relay"):
        for i in range(64):
            g.failed("1.2.3.4", float(i), "http:a", "signature")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 7  # the first, then at 2, 4, 8, 16, 32, 64
    assert lines[0] == "1.2.3.4: kite http:a refused: signature"
    assert lines[-1].startswith("1.2.3.4: 64 failed kite signatures in 63 s; blocked for")


def test_challenge_book_single_use_and_short_lived():
    book = ChallengeBook(ttl=60.0, limit=4)
    book.issue("t1", 0.0)
    assert book.redeem("t1", 10.0)
    assert not book.redeem("t1", 10.0)  # used
    book.issue("t2", 0.0)
    assert not book.redeem("t2", 61.0)  # expired
    assert not book.redeem("t3", 1.0)  # never issued
    for i in range(10):
        book.issue(f"x{i}", 100.0)
    assert len(book) <= 4 + 1
    assert book.redeem("x9", 101.0) and not book.redeem("x0", 101.0)  # oldest forgotten
