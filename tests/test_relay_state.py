"""kite.relay.state: registration, presence events and tunnel bookkeeping, without sockets."""

from __future__ import annotations

from kite.proto.handshake import AuthReply, KiteDecision, KiteLine
from kite.relay.config import RelayConfig
from kite.relay.grants import GrantTable, parse_grant
from kite.relay.state import PresenceEvent, RelayState


class FakeTunnel:
    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.name = f"tunnel from {peer}"
        self.kites: list = []
        self.session_id = None
        self.streams: dict = {}
        self.closed_with = None
        self.pings = 0

    def close(self, reason: str) -> None:
        self.closed_with = reason

    def request_ping(self) -> None:
        self.pings += 1


def state_for(*grants, single=()):
    table = GrantTable(parse_grant(g) for g in grants)
    return RelayState(RelayConfig(grants=table, single_backend=set(single)))


def ok_reply(sid: str, *kites: tuple[str, str]) -> AuthReply:
    decisions = [KiteDecision(KiteLine(p, d, "b" * 36, "", ""), "ok") for p, d in kites]
    return AuthReply(decisions, sid, [])


def test_presence_events_first_and_last_tunnel():
    state = state_for("*:*.test.kite:s3cret")
    events: list[PresenceEvent] = []
    state.subscribe(events.append)
    t1, t2 = FakeTunnel("1.1.1.1:1"), FakeTunnel("2.2.2.2:2")
    for t in (t1, t2):
        state.tunnel_opened(t)
    state.register(t1, ok_reply("s1", ("http", "a.test.kite")))
    state.register(t2, ok_reply("s2", ("http", "a.test.kite")))
    assert events == [PresenceEvent("http", "a.test.kite", True)]  # the second backend is no news
    state.tunnel_closed(t1)
    assert events == [PresenceEvent("http", "a.test.kite", True)]
    state.tunnel_closed(t2)
    assert events[-1] == PresenceEvent("http", "a.test.kite", False)
    assert not state.tunnels and not state.sessions and not state.routes.kites()


def test_register_twice_adds_once_and_moves_the_session():
    state = state_for("*:*.test.kite:s3cret")
    t = FakeTunnel("1.1.1.1:1")
    state.register(t, ok_reply("s1", ("http", "a.test.kite")))
    state.register(t, ok_reply("s2", ("http", "a.test.kite")))
    assert t.kites == [("http", "a.test.kite")]
    assert state.sessions == {"s2": t}


def test_a_failing_listener_does_not_stop_the_others():
    state = state_for("*:*.test.kite:s3cret")
    seen = []

    def bad(event):
        raise RuntimeError("listener bug")

    state.subscribe(bad)
    unsubscribe = state.subscribe(seen.append)
    state.register(FakeTunnel("1.1.1.1:1"), ok_reply("s", ("raw-22", "b.test.kite")))
    assert seen == [PresenceEvent("raw-22", "b.test.kite", True)]
    unsubscribe()
    state.register(FakeTunnel("1.1.1.1:2"), ok_reply("t", ("raw-22", "c.test.kite")))
    assert len(seen) == 1


def test_replace_sessions_closes_the_stale_tunnel():
    state = state_for("*:*.test.kite:s3cret")
    old, new = FakeTunnel("1.1.1.1:1"), FakeTunnel("1.1.1.1:2")
    state.register(old, ok_reply("old", ("http", "a.test.kite"), ("raw-22", "a.test.kite")))
    # Knowing the session id is not enough: the new tunnel must fly every kite of the old.
    assert state.replace_sessions(["old", "unknown"], new) == ["old"]
    assert old.closed_with is None
    state.register(new, ok_reply("new", ("http", "a.test.kite")))
    assert state.replace_sessions(["old"], new) == ["old"]
    assert state.register(new, ok_reply("new2", ("raw-22", "a.test.kite")), ["old"]) == []
    assert old.closed_with == "replaced by the reconnecting backend"
    old.closed_with = None
    state.replace_sessions(["new2"], new)  # a tunnel never replaces itself
    assert new.closed_with is None


def test_single_kite_is_duplicate_while_flown():
    state = state_for("*:*.test.kite:s3cret", single=("one.test.kite",))
    t = FakeTunnel("1.1.1.1:1")
    line = KiteLine("http", "one.test.kite", "b" * 36, "", "")
    assert not state._is_duplicate(line)
    state.register(t, ok_reply("s", ("http", "one.test.kite")))
    assert state._is_duplicate(line) and t.pings == 1
    other = KiteLine("http", "two.test.kite", "b" * 36, "", "")
    assert not state._is_duplicate(other)


def test_relay_names():
    state = RelayState(RelayConfig(tls_names=["Relay.Example.com"]))
    assert state.is_relay_name("relay.example.com")
    assert not state.is_relay_name("app.example.com") and not state.is_relay_name(None)


def test_dns_names_are_reserved_too():
    from kite.names.config import NamesConfig

    state = RelayState(RelayConfig(tls_names=["localhost"],
                                   names=NamesConfig(zone="k.test", ns_names=["relay.k.test"])))
    assert state.is_reserved("relay.k.test") and state.is_reserved("LOCALHOST")
    assert not state.is_relay_name("relay.k.test")  # TLS for it is not the relay's own
    assert not state.is_reserved("app.k.test")
