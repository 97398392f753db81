"""Per-change route updates equal a full recompute, on random BGP event sequences."""

from __future__ import annotations

from ipaddress import IPv4Address as A, IPv4Network as N

from hypothesis import given, settings
from hypothesis import strategies as st

from bgp.attributes import PathAttributes
from bgp.events import RoutesAnnounced, RoutesWithdrawn
from bgp.rib import Rib
from fabric import config as cfgmod
from fabric.import_policy import ImportFilter
from fabric.inputs import NodeInfo
from fabric.route_state import RouteState, make_inputs
from ipip.model import NodeFacts, UnderlayRoute

CFG = cfgmod.parse({"node": {"name": "a1", "address": "10.0.1.11/24", "podCIDRs": ["10.244.1.0/24"]},
                    "pools": [{"cidr": "10.244.0.0/16", "ipipMode": "CrossSubnet"},
                              {"cidr": "10.245.0.0/16", "ipipMode": "Never"}],
                    "peers": [{"name": "rr", "address": "10.0.1.1", "asn": 64512},
                              {"name": "tor", "address": "10.0.1.2", "asn": 65000}],
                    "advertise": {"serviceClusterIPs": ["10.96.0.0/24"]},
                    "source": {"kind": "file", "path": "c.yaml"}})
NODES = {n: NodeInfo(name=n, address=a) for n, a in
         [("a1", "10.0.1.11"), ("a2", "10.0.1.12"), ("b1", "10.0.2.21"), ("b2", "10.0.2.22")]}
PEERS = {"a2": A("10.0.1.12"), "b1": A("10.0.2.21"), "b2": A("10.0.2.22"), "rr": A("10.0.1.1"),
         "tor": A("10.0.1.2")}
KINDS = {"a2": "mesh", "b1": "mesh", "b2": "mesh", "rr": "external", "tor": "external"}
FACTS = NodeFacts(A("10.0.1.11"), N("10.0.1.0/24"), "eth1", 1500, (UnderlayRoute(N("0.0.0.0/0"), A("10.0.1.1"), "eth1"),))
PREFIXES = [N(f"10.244.{i}.0/24") for i in range(0, 8)] + [N(f"10.245.{i}.0/24") for i in range(2)] + \
           [N("10.0.2.0/24"), N("0.0.0.0/0"), N("192.168.9.0/24"), N("192.168.10.0/24"), N("10.96.0.0/24")]
INPUTS = make_inputs(facts=FACTS, pools=CFG.pools, pod_cidrs=CFG.node.pod_cidrs, nodes=NODES, kinds=KINDS,
                     ibgp=["rr"], tunnel_device="tunl0", per_peer_limits=False)

event = st.tuples(st.sampled_from(sorted(PEERS)), st.booleans(),
                  st.lists(st.sampled_from(PREFIXES), min_size=1, max_size=4, unique=True),
                  st.sampled_from([None, A("10.0.2.99")]),
                  st.sampled_from([(), (65000,), (65000, 64512), (65000, (64512, 65001))]))  # AS_PATH (loops too)


def full(rib: Rib) -> RouteState:
    s = RouteState(ImportFilter(CFG))
    s.update(INPUTS, NODES, dirty=None, all_routes=rib.routes, holders=rib.holders, attrs=rib.attrs)
    return s


@settings(max_examples=150, deadline=None)
@given(events=st.lists(event, min_size=1, max_size=25))
def test_incremental_equals_full(events) -> None:
    rib = Rib()
    inc = RouteState(ImportFilter(CFG))
    inc.update(INPUTS, NODES, dirty=None, all_routes=rib.routes, holders=rib.holders, attrs=rib.attrs)
    for peer, announce, prefixes, other_nh, path in events:
        if announce:
            ev = RoutesAnnounced(peer, other_nh or PEERS[peer], tuple(prefixes), PathAttributes(as_path=path))
        else:
            ev = RoutesWithdrawn(peer, tuple(prefixes))
        rib.apply(ev, 0.0)
        touched, _ = inc.update(INPUTS, NODES, dirty=set(prefixes), all_routes=rib.routes, holders=rib.holders,
                                attrs=rib.attrs)
        assert touched == set(prefixes)
        ref = full(rib)
        assert {p: r.key() for p, r in inc.routes.items()} == {p: r.key() for p, r in ref.routes.items()}
        assert inc.warning_lines() == ref.warning_lines()
        assert inc.import_filter.active_rejections() == ref.import_filter.active_rejections()


def test_changed_inputs_force_a_full_recompute() -> None:
    rib = Rib()
    rib.apply(RoutesAnnounced("b1", A("10.0.2.21"), (N("10.244.3.0/24"),)), 0.0)
    s = RouteState(ImportFilter(CFG))
    assert s.update(INPUTS, NODES, dirty=set(), all_routes=rib.routes, holders=rib.holders)[0] is None
    assert s.routes[N("10.244.3.0/24")].nexthops[0].device == "tunl0"
    assert s.update(INPUTS, NODES, dirty=set(), all_routes=rib.routes, holders=rib.holders)[0] == set()
    always = make_inputs(facts=FACTS, pools=[cfgmod.Pool(cidr=N("10.244.0.0/16"), ipip_mode="Always")],
                         pod_cidrs=CFG.node.pod_cidrs, nodes=NODES, kinds=KINDS, ibgp=["rr"], tunnel_device="tunl0",
                         per_peer_limits=False)
    assert s.update(always, NODES, dirty=set(), all_routes=rib.routes, holders=rib.holders)[0] is None
