"""ExaBGP 5 JSON (captured from real sessions, tests/unit/data) -> typed messages -> speaker events."""

from __future__ import annotations

from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N
from pathlib import Path

from bgp.attributes import PathAttributes
from bgp.events import EndOfRib, PeerDown, PeerUp, RoutesAnnounced, RoutesWithdrawn
from bgp.messages import (Ack, Notice, NotificationMsg, OpenMsg, StateMsg, Unparsed, UpdateMsg, parse_line)
from bgp.sessions import SessionTracker

DATA = Path(__file__).parent / "data"


def lines(name: str) -> list[str]:
    # `# SENT ...` lines are what the capture harness wrote to ExaBGP; not ExaBGP output.
    return [ln for ln in (DATA / name).read_text().splitlines() if ln.strip() and not ln.startswith("# ")]


def test_every_captured_line_parses() -> None:
    for name in ("exabgp_session_a.jsonl", "exabgp_session_b.jsonl", "exabgp_notification.jsonl"):
        for ln in lines(name):
            msg = parse_line(ln)
            if isinstance(msg, Unparsed):
                assert msg.why == "not JSON", (ln, msg)  # only `show neighbor summary` text


def test_open_carries_graceful_restart_time() -> None:
    opens = [m for m in map(parse_line, lines("exabgp_session_b.jsonl")) if isinstance(m, OpenMsg)]
    assert opens and all(o.gr_time == 120 and o.hold_time == 9 for o in opens)
    assert opens[0].peer_address == A("10.99.0.1")
    no_gr = [m for m in map(parse_line, lines("exabgp_notification.jsonl")) if isinstance(m, OpenMsg)]
    assert no_gr and all(o.gr_time is None for o in no_gr)


def test_update_announce_withdraw_and_eor() -> None:
    msgs = [m for m in map(parse_line, lines("exabgp_session_b.jsonl")) if isinstance(m, UpdateMsg)]
    first = msgs[0]
    assert first.announced == ((A("10.99.0.1"), (N("10.244.1.0/24"), N("10.244.2.0/24"))),)
    assert first.attributes["local-preference"] == 200 and first.attributes["community"] == [[64512, 100]]
    assert msgs[1].announced == ((A("10.99.0.7"), (N("10.244.3.0/24"),)),)
    assert msgs[2].eor and not msgs[2].announced
    withdraw = next(m for m in msgs if m.withdrawn)
    assert withdraw.withdrawn == (N("10.244.2.0/24"), N("10.244.3.0/24"))


def test_state_notification_acks_and_notice() -> None:
    msgs = list(map(parse_line, lines("exabgp_notification.jsonl")))
    note = next(m for m in msgs if isinstance(m, NotificationMsg))
    assert (note.code, note.subcode) == (6, 2) and "Administrative Shutdown" in note.message
    downs = [m for m in msgs if isinstance(m, StateMsg) and m.state == "down"]
    assert any(d.reason == "notification received (6,2)" for d in downs)
    assert parse_line("done\n") == Ack(True) and parse_line("error") == Ack(False)
    shutdown = '{ "exabgp": "5.0.0", "time": 1.0, "type": "notification", "notification": "shutdown" }'
    assert parse_line(shutdown) == Notice("notification: shutdown")


def test_malformed_input_never_raises() -> None:
    for bad in ['{"type": "update", "neighbor": {"address": {"peer": "nope"}}}', "{not json", "",
                '{"type": "update", "neighbor": {"address": {"peer": "10.0.0.1"}, "message": {"update": '
                '{"announce": {"ipv4 unicast": {"10.0.0.1": [{"nlri": "300.0.0.0/8"}]}}}}}}',
                '{"type": "weird"}', "[1, 2]"]:
        assert isinstance(parse_line(bad), Unparsed)


def replay(name: str) -> list[object]:
    t = SessionTracker()
    t.set_neighbors({A("10.99.0.1"): "node-a", A("10.99.0.2"): "node-b"}, 0.0)
    out: list[object] = []
    for i, ln in enumerate(lines(name)):
        out += t.feed(parse_line(ln), float(i))
    return out


def test_session_b_events() -> None:
    ev = replay("exabgp_session_b.jsonl")
    assert ev[0] == PeerUp("node-a", A("10.99.0.1"), 120, A("10.99.0.1"))
    # attributes as a real ExaBGP reported them (route reflection passes them on)
    lp200 = PathAttributes(local_pref=200, communities=("64512:100",))
    assert ev[1] == RoutesAnnounced("node-a", A("10.99.0.1"), (N("10.244.1.0/24"), N("10.244.2.0/24")), lp200)
    assert ev[2] == RoutesAnnounced("node-a", A("10.99.0.7"), (N("10.244.3.0/24"),), PathAttributes(med=50,
                                                                                                 local_pref=100))
    assert ev[3] == EndOfRib("node-a")
    assert RoutesWithdrawn("node-a", (N("10.244.2.0/24"), N("10.244.3.0/24"))) in ev
    # the peer closed TCP without NOTIFICATION (GR negotiated): graceful
    down = next(e for e in ev if isinstance(e, PeerDown))
    assert down.graceful and down.reason == "closing connection"
    assert ev[-2:] == [PeerUp("node-a", A("10.99.0.1"), 120, A("10.99.0.1")),
                       RoutesAnnounced("node-a", A("10.99.0.1"), (N("10.244.1.0/24"),), lp200)]


def test_our_own_teardown_is_not_graceful() -> None:
    ev = replay("exabgp_session_a.jsonl")
    down = next(e for e in ev if isinstance(e, PeerDown))
    assert not down.graceful and down.peer == "node-b"


def test_notification_is_hard_and_attempts_without_up_are_silent() -> None:
    ev = replay("exabgp_notification.jsonl")
    # connected/down pairs that never reached `up` (collisions) produce nothing
    assert isinstance(ev[0], PeerUp) and ev[0].gr_time is None
    downs = [e for e in ev if isinstance(e, PeerDown)]
    assert downs[0] == PeerDown("node-b", A("10.99.0.2"), "notification received (6,2)", False)
    assert len([e for e in ev if isinstance(e, PeerUp)]) == 2


def test_hold_timer_expiry_is_hard() -> None:
    t = SessionTracker()
    t.set_neighbors({A("10.0.0.2"): "b"}, 0.0)
    t.feed(StateMsg(A("10.0.0.2"), A("10.0.0.1"), "up", ""), 1.0)
    (down,) = t.feed(StateMsg(A("10.0.0.2"), A("10.0.0.1"), "down", "notification sent (4,0)"), 2.0)
    assert down == PeerDown("b", A("10.0.0.2"), "notification sent (4,0)", False)
    assert t.status()["b"]["last_error"] == "notification sent (4,0)"


def test_removed_neighbor_goes_down_hard_and_status_counts() -> None:
    t = SessionTracker()
    t.set_neighbors({A("10.0.0.2"): "b"}, 0.0)
    t.feed(StateMsg(A("10.0.0.2"), None, "up", ""), 1.0)
    t.feed(UpdateMsg(A("10.0.0.2"), ((A("10.0.0.2"), (N("10.1.0.0/24"), N("10.1.1.0/24"))),), (), False, {}), 2.0)
    st = t.status()["b"]
    assert st["state"] == "established" and st["received"] == 2 and st["since"] == 1.0
    assert t.set_neighbors({}, 3.0) == [PeerDown("b", A("10.0.0.2"), "removed from configuration", False)]


def test_messages_for_unconfigured_addresses_are_ignored() -> None:
    t = SessionTracker()
    t.set_neighbors({A("10.0.0.2"): "b"}, 0.0)
    assert t.feed(StateMsg(A("10.0.0.9"), None, "up", ""), 1.0) == []
    assert set(t.status()) == {"b"}
    t.feed(StateMsg(A("10.0.0.2"), None, "up", ""), 1.0)
    t.set_neighbors({}, 2.0)
    # ExaBGP reports the removed neighbor's `down` after we already said PeerDown: nothing more
    assert t.feed(StateMsg(A("10.0.0.2"), None, "down", "closing connection"), 3.0) == []
    assert t.status() == {}
