"""Route reflection (bgp.reflect) and the attributes it passes on (bgp.attributes), pure."""

from __future__ import annotations

import json
from ipaddress import IPv4Address as A, IPv4Network as N

from hypothesis import given, strategies as st

from bgp.announce import Announcement, diff_commands
from bgp.attributes import PathAttributes, from_exabgp
from bgp.events import PeerUp, RoutesAnnounced
from bgp.messages import UpdateMsg, parse_line
from bgp.reflect import Path, Reflector, best, looped, reflect
from bgp.rib import Rib

CLUSTER = A("10.0.0.100")
ME = A("10.0.1.11")
RR = Reflector(CLUSTER, ME, clients=frozenset({"c1", "c2", "c3"}), non_clients=frozenset({"rr2", "rr-other"}))
ADDR = {"c1": A("10.0.1.21"), "c2": A("10.0.1.22"), "c3": A("10.0.2.23"), "rr2": A("10.0.1.12"),
        "rr-other": A("10.0.2.13"), "tor": A("10.0.1.1")}
P = N("10.244.21.0/24")


def path(peer: str, **attrs: object) -> Path:
    return Path(peer, ADDR[peer], ADDR[peer], ADDR[peer], PathAttributes(**attrs))  # type: ignore[arg-type]


def test_client_route_goes_to_every_other_ibgp_neighbor_with_originator_and_cluster_list() -> None:
    a = reflect(RR, P, [path("c1", local_pref=100, communities=("64512:7",))])
    assert a is not None
    assert a.neighbors == frozenset({"c2", "c3", "rr2", "rr-other"})
    assert a.next_hop == ADDR["c1"]  # next hop unchanged
    assert a.path == PathAttributes(local_pref=100, communities=("64512:7",), originator_id=ADDR["c1"],
                                    cluster_list=(CLUSTER,))


def test_non_client_route_goes_to_clients_only_and_keeps_its_originator() -> None:
    a = reflect(RR, P, [path("rr-other", originator_id=A("10.0.2.30"), cluster_list=(A("10.0.0.200"),))])
    assert a is not None and a.neighbors == frozenset({"c1", "c2", "c3"})
    assert a.path is not None
    assert a.path.originator_id == A("10.0.2.30")
    assert a.path.cluster_list == (CLUSTER, A("10.0.0.200"))  # ours in front


def test_routes_that_came_back_are_dropped() -> None:
    # from the other reflector of our cluster: it holds our cluster ID
    back = path("rr2", originator_id=ADDR["c1"], cluster_list=(CLUSTER,))
    assert looped(back.attrs, CLUSTER, ME) == f"its CLUSTER_LIST holds our cluster ID {CLUSTER}"
    assert reflect(RR, P, [back]) is None
    # our own route, reflected back by a reflector of another cluster
    mine = path("rr-other", originator_id=ME, cluster_list=(A("10.0.0.200"),))
    assert looped(mine.attrs, CLUSTER, ME) is not None and reflect(RR, P, [mine]) is None
    # a looped path never hides a good one
    a = reflect(RR, P, [back, path("c2")])
    assert a is not None and a.next_hop == ADDR["c2"]


def test_ebgp_and_unreadable_paths_are_not_reflected() -> None:
    assert reflect(RR, P, [path("tor")]) is None
    unreadable = Path("c1", ADDR["c1"], ADDR["c1"], ADDR["c1"], None)
    assert reflect(RR, P, [unreadable]) is None


def test_no_target_left() -> None:
    lone = Reflector(CLUSTER, ME, clients=frozenset({"c1"}), non_clients=frozenset())
    assert reflect(lone, P, [path("c1")]) is None


def test_best_path_order() -> None:
    assert best([path("c1", local_pref=100), path("c2", local_pref=200)]).peer == "c2"
    assert best([path("c1", as_path=(65001, 65002)), path("c2", as_path=(65001,))]).peer == "c2"
    assert best([path("c1", origin="incomplete"), path("c2", origin="egp")]).peer == "c2"
    assert best([path("c1", med=20), path("c2", med=10)]).peer == "c2"
    assert best([path("c2", cluster_list=(A("1.1.1.1"),)), path("c3")]).peer == "c3"  # shorter CLUSTER_LIST
    assert best([path("c2"), path("c1")]).peer == "c1"  # lowest router ID
    # an AS_SET counts as one AS
    assert best([path("c1", as_path=(65001, (1, 2, 3))), path("c2", as_path=(65001, 65002, 65003))]).peer == "c1"


@given(st.permutations(["c1", "c2", "c3", "rr2", "rr-other"]),
       st.lists(st.integers(50, 300), min_size=5, max_size=5))
def test_best_ignores_arrival_order(order: list[str], prefs: list[int]) -> None:
    paths = [path(p, local_pref=lp) for p, lp in zip(["c1", "c2", "c3", "rr2", "rr-other"], prefs)]
    by_peer = {p.peer: p for p in paths}
    assert best(by_peer[p] for p in order) == best(paths)


def test_reflected_announcement_is_one_exabgp_command_with_every_attribute() -> None:
    a = reflect(RR, P, [path("c1", as_path=(65001, (1, 2)), med=5, local_pref=150,
                             communities=("64512:7", "1:2:3"), atomic_aggregate=True)])
    assert a is not None
    names = ["c1", "c2", "c3", "rr2", "rr-other"]
    cmds = diff_commands({}, {P: a}, {n: ADDR[n] for n in names})
    assert cmds == ["neighbor 10.0.1.12 , neighbor 10.0.1.22 , neighbor 10.0.2.13 , neighbor 10.0.2.23 announce "
                    "attributes next-hop 10.0.1.21 origin igp as-path [ 65001 ( 1 2 ) ] med 5 local-preference 150 "
                    "community [ 64512:7 ] large-community [ 1:2:3 ] atomic-aggregate originator-id 10.0.1.21 "
                    "cluster-list [ 10.0.0.100 ] nlri 10.244.21.0/24"]
    # our own routes keep their short form
    own = Announcement(N("10.244.1.0/24"), "self")
    assert own.attributes() == "next-hop self"


UPDATE = {"exabgp": "5.0.0", "time": 1.0, "host": "h", "pid": 1, "ppid": 1, "counter": 3, "type": "update",
          "neighbor": {"address": {"local": "10.0.1.11", "peer": "10.0.1.12"}, "asn": {"local": 64512, "peer": 64512},
                       "direction": "receive", "message": {"update": {
                           "attribute": {"origin": "igp", "as-path": {"0": {"element": "as-sequence",
                                                                             "value": [65001]},
                                                                       "1": {"element": "as-set", "value": [1, 2]}},
                                         "confederation-path": [], "med": 5, "local-preference": 100,
                                         "atomic-aggregate": True, "community": [[64512, 7]],
                                         "large-community": [[1, 2, 3]], "originator-id": "10.0.1.21",
                                         "cluster-list": ["10.0.0.100", "10.0.0.200"]},
                           "announce": {"ipv4 unicast": {"10.0.1.21": [{"nlri": "10.244.21.0/24"}]}}}}}}


def test_update_attributes_parsed() -> None:
    msg = parse_line(json.dumps(UPDATE))
    assert isinstance(msg, UpdateMsg)
    assert msg.path == PathAttributes(origin="igp", as_path=(65001, (1, 2)), med=5, local_pref=100,
                                      communities=("64512:7", "1:2:3"), atomic_aggregate=True,
                                      originator_id=A("10.0.1.21"), cluster_list=(A("10.0.0.100"), A("10.0.0.200")))
    assert from_exabgp({}) == PathAttributes()


def test_an_unreadable_attribute_keeps_the_routes() -> None:
    doc = json.loads(json.dumps(UPDATE))
    doc["neighbor"]["message"]["update"]["attribute"]["community"] = [["no", "numbers"]]
    msg = parse_line(json.dumps(doc))
    assert isinstance(msg, UpdateMsg)
    assert msg.announced == ((A("10.0.1.21"), (N("10.244.21.0/24"),)),) and msg.path is None


def test_rib_paths_carry_attributes_and_the_peer_identity() -> None:
    rib = Rib()
    rib.apply(PeerUp("c1", ADDR["c1"], 120, A("192.0.2.1")), 0.0)
    attrs = PathAttributes(local_pref=120)
    assert rib.apply(RoutesAnnounced("c1", ADDR["c1"], (P,), attrs), 0.0)
    assert rib.paths(P) == [Path("c1", ADDR["c1"], A("192.0.2.1"), ADDR["c1"], attrs)]
    # new attributes alone are a change (a reflector must pass them on)
    assert rib.apply(RoutesAnnounced("c1", ADDR["c1"], (P,), PathAttributes(local_pref=90)), 0.0)
    a = reflect(Reflector(CLUSTER, ME, frozenset({"c1", "c2"}), frozenset()), P, rib.paths(P))
    assert a is not None and a.path is not None and a.path.originator_id == A("192.0.2.1")  # its BGP identifier


def test_routes_that_came_back_never_leave_the_session_tracker() -> None:
    from bgp.events import RoutesWithdrawn
    from bgp.sessions import SessionTracker

    t = SessionTracker()
    t.set_neighbors({ADDR["rr2"]: "rr2"}, 0.0, {ADDR["rr2"]: (ME, CLUSTER)})
    up = UPDATE["neighbor"]
    open_ = json.dumps({"type": "open", "neighbor": {"address": up["address"], "open": {
        "router_id": "10.0.1.12", "hold_time": 9, "capabilities": {}}}})
    state = json.dumps({"type": "state", "neighbor": {"address": up["address"], "state": "up"}})
    for line in (open_, state):
        t.feed(parse_line(line), 0.0)

    def update(cluster_list: list[str], originator: str) -> str:
        doc = json.loads(json.dumps(UPDATE))
        doc["neighbor"]["message"]["update"]["attribute"].update({"cluster-list": cluster_list,
                                                                   "originator-id": originator})
        return json.dumps(doc)

    ok = t.feed(parse_line(update(["10.0.0.200"], "10.0.1.21")), 1.0)
    assert [type(e).__name__ for e in ok] == ["RoutesAnnounced"]
    # the same prefix comes back with our cluster ID: dropped, and it replaces the good one (withdrawn)
    back = t.feed(parse_line(update(["10.0.0.200", str(CLUSTER)], "10.0.1.21")), 2.0)
    assert back == [RoutesWithdrawn("rr2", (P,))]
    # our own route (ORIGINATOR_ID = our router ID) likewise; nothing held any more: nothing to withdraw
    assert t.feed(parse_line(update(["10.0.0.200"], str(ME))), 3.0) == []
    assert t.status()["rr2"]["looped"] == 2
