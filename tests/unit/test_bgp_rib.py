"""Learned-route RIB with graceful restart: the whole table of cases, time as an argument."""

from __future__ import annotations

from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N

from bgp.events import EndOfRib, PeerDown, PeerUp, RoutesAnnounced, RoutesWithdrawn, SpeakerRestarted
from bgp.rib import Rib

P1, P2, P3 = N("10.244.1.0/24"), N("10.244.2.0/24"), N("10.244.3.0/24")
NH_B, NH_C = A("10.0.0.2"), A("10.0.0.3")


def up(rib: Rib, peer: str, gr: int | None, nh: A, prefixes: tuple[N, ...], now: float = 0.0) -> None:
    rib.apply(PeerUp(peer, nh, gr), now)
    rib.apply(RoutesAnnounced(peer, nh, prefixes), now)
    rib.apply(EndOfRib(peer), now)


def test_announce_withdraw_and_changed_flag() -> None:
    rib = Rib()
    assert rib.apply(PeerUp("b", NH_B, 120), 0) is False
    assert rib.apply(RoutesAnnounced("b", NH_B, (P1, P2)), 0) is True
    assert rib.apply(RoutesAnnounced("b", NH_B, (P1,)), 0) is False  # same again: no change
    assert rib.apply(RoutesAnnounced("b", NH_C, (P1,)), 0) is True  # next hop moved
    assert rib.routes() == {P1: {("b", NH_C)}, P2: {("b", NH_B)}}
    assert rib.apply(RoutesWithdrawn("b", (P2, P3)), 0) is True
    assert rib.apply(RoutesWithdrawn("b", (P3,)), 0) is False
    assert rib.routes() == {P1: {("b", NH_C)}}


def test_two_peers_same_prefix_ecmp_view() -> None:
    rib = Rib()
    up(rib, "b", 120, NH_B, (P1,))
    up(rib, "c", 120, NH_C, (P1,))
    assert rib.routes() == {P1: {("b", NH_B), ("c", NH_C)}}


def test_graceful_drop_with_gr_keeps_stale_until_eor_sweeps() -> None:
    rib = Rib()
    up(rib, "b", 120, NH_B, (P1, P2))
    assert rib.apply(PeerDown("b", NH_B, "closing connection", True), 10) is False
    assert rib.routes() == {P1: {("b", NH_B)}, P2: {("b", NH_B)}}
    assert rib.counts()["b"] == {"routes": 2, "stale": 2}
    assert rib.next_deadline() == 130
    rib.apply(PeerUp("b", NH_B, 120), 20)
    rib.apply(RoutesAnnounced("b", NH_B, (P1,)), 20)  # P2 not announced again
    assert rib.counts()["b"] == {"routes": 2, "stale": 1}
    assert rib.apply(EndOfRib("b"), 21) is True
    assert rib.routes() == {P1: {("b", NH_B)}}
    assert rib.next_deadline() is None


def test_graceful_drop_with_gr_expires_at_restart_time() -> None:
    rib = Rib()
    up(rib, "b", 60, NH_B, (P1,))
    up(rib, "c", 120, NH_C, (P2,))
    rib.apply(PeerDown("b", NH_B, "closing connection", True), 100)
    rib.apply(PeerDown("c", NH_C, "closing connection", True), 100)
    assert rib.next_deadline() == 160
    assert rib.expire(159.9) is False
    assert rib.expire(160) is True
    assert rib.routes() == {P2: {("c", NH_C)}}
    assert rib.next_deadline() == 220
    assert rib.expire(220) is True and rib.routes() == {} and rib.next_deadline() is None


def test_graceful_drop_without_gr_removes_at_once() -> None:
    rib = Rib()
    up(rib, "b", None, NH_B, (P1,))
    assert rib.apply(PeerDown("b", NH_B, "closing connection", True), 5) is True
    assert rib.routes() == {} and rib.next_deadline() is None
    up(rib, "c", 0, NH_C, (P2,))  # GR time 0 is no GR
    assert rib.apply(PeerDown("c", NH_C, "closing connection", True), 5) is True
    assert rib.routes() == {}


def test_hard_drop_removes_at_once_even_with_gr() -> None:
    rib = Rib()
    up(rib, "b", 120, NH_B, (P1,))
    assert rib.apply(PeerDown("b", NH_B, "notification received (6,2)", False), 5) is True
    assert rib.routes() == {} and rib.next_deadline() is None


def test_hard_drop_while_stale_removes_stale_too() -> None:
    rib = Rib()
    up(rib, "b", 120, NH_B, (P1,))
    rib.apply(PeerDown("b", NH_B, "x", True), 5)
    rib.apply(PeerUp("b", NH_B, 120), 6)
    assert rib.apply(PeerDown("b", NH_B, "notification sent (4,0)", False), 7) is True
    assert rib.routes() == {} and rib.next_deadline() is None


def test_back_without_eor_gets_a_fresh_window_then_sweep() -> None:
    rib = Rib()
    up(rib, "b", 30, NH_B, (P1, P2))
    rib.apply(PeerDown("b", NH_B, "x", True), 0)
    rib.apply(PeerUp("b", NH_B, 30), 25)
    rib.apply(RoutesAnnounced("b", NH_B, (P2,)), 25)
    assert rib.next_deadline() == 55  # not 30: the peer is back and gets its window to finish
    assert rib.expire(30) is False
    assert rib.expire(55) is True
    assert rib.routes() == {P2: {("b", NH_B)}}


def test_back_without_gr_drops_stale_at_once() -> None:
    rib = Rib()
    up(rib, "b", 30, NH_B, (P1,))
    rib.apply(PeerDown("b", NH_B, "x", True), 0)
    assert rib.apply(PeerUp("b", NH_B, None), 1) is True
    assert rib.routes() == {}


def test_speaker_restart_marks_every_peer_stale_per_its_gr() -> None:
    rib = Rib()
    up(rib, "b", 120, NH_B, (P1,))
    up(rib, "c", None, NH_C, (P2,))
    up(rib, "d", 60, A("10.0.0.4"), (P3,))
    assert rib.apply(SpeakerRestarted(), 1000) is True  # c (no GR) lost its routes
    assert set(rib.routes()) == {P1, P3}
    assert rib.next_deadline() == 1060
    # b comes back and closes with EOR; d never comes back
    rib.apply(PeerUp("b", NH_B, 120), 1001)
    rib.apply(RoutesAnnounced("b", NH_B, (P1,)), 1001)
    assert rib.apply(EndOfRib("b"), 1001) is False  # P1 refreshed, nothing swept
    assert rib.counts()["b"] == {"routes": 1, "stale": 0}
    assert rib.expire(1060) is True
    assert rib.routes() == {P1: {("b", NH_B)}}


def test_eor_with_nothing_stale_changes_nothing_and_forget() -> None:
    rib = Rib()
    up(rib, "b", 120, NH_B, (P1,))
    assert rib.apply(EndOfRib("b"), 1) is False
    assert rib.peer_routes("b") == {P1: NH_B}
    assert rib.forget("b") is True and rib.routes() == {}


def test_one_withdraw_of_many_prefixes_removes_all_of_them() -> None:
    """An UPDATE withdrawing several prefixes at once removes every one (it removed only the first)."""
    rib = Rib()
    rib.apply(RoutesAnnounced("b", NH_B, (P1, P2, P3)), 0)
    assert rib.apply(RoutesWithdrawn("b", (P1, P2, P3)), 0) is True
    assert rib.routes() == {}


def test_a_peer_back_from_another_address_or_router_id_moves_its_whole_set() -> None:
    """The routes it kept (graceful restart) now originate elsewhere: a reflector must reflect them all again
    (ORIGINATOR_ID), so the event counts as a change; the same identity again does not."""
    rib = Rib()
    up(rib, "b", 120, NH_B, (P1, P2))
    rib.apply(PeerDown("b", NH_B, "hold timer expired", True), 1)
    assert rib.apply(PeerUp("b", NH_B, 120), 2) is False  # the same peer back: its stale set waits for EoR
    rib.apply(PeerDown("b", NH_B, "hold timer expired", True), 3)
    assert rib.apply(PeerUp("b", NH_C, 120, A("10.0.0.3")), 4) is True
    assert {p.peer_router_id for p in rib.paths(P1)} == {A("10.0.0.3")}
    assert Rib().apply(PeerUp("c", NH_C, 120, A("1.1.1.1")), 0) is False  # nothing learned: nothing moved
