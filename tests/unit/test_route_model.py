"""Desired routes: every ipipMode x same/other subnet x ECMP case, blackholes, /32 rule, diff."""

from __future__ import annotations

from ipaddress import IPv4Address as A, IPv4Interface as I, IPv4Network as N

import pytest

from fabric.config import IPIPMode, Pool
from ipip.model import (NextHop, NodeFacts, PeerRouting, Route, UnderlayRoute, desired_routes, unusable_lines,
                        same_subnet_network, tunnel_address)
from ipip.reconcile import RouteReconciler

FACTS = NodeFacts(address=A("10.0.1.11"), network=N("10.0.1.0/24"), device="eth1", mtu=1500,
                  routes=(UnderlayRoute(N("0.0.0.0/0"), A("10.0.1.1"), "eth1"),))
SAME, OTHER = A("10.0.1.12"), A("10.0.2.21")
P_SAME, P_OTHER = N("10.244.2.0/24"), N("10.244.3.0/24")


def plan(mode: IPIPMode, learned, facts: NodeFacts = FACTS):
    return desired_routes(facts=facts, pools=[Pool(cidr=N("10.244.0.0/16"), ipip_mode=mode)],
                          local_pod_cidrs=[N("10.244.1.0/24")], learned=learned)


DIRECT_SAME = (NextHop(SAME, "eth1"),)
TUN_SAME = (NextHop(SAME, "tunl0", True),)
TUN_OTHER = (NextHop(OTHER, "tunl0", True),)
RECURSIVE_OTHER = (NextHop(A("10.0.1.1"), "eth1"),)


@pytest.mark.parametrize("mode, peer, prefix, hops, mtu", [
    (IPIPMode.CROSS_SUBNET, SAME, P_SAME, DIRECT_SAME, None),
    (IPIPMode.CROSS_SUBNET, OTHER, P_OTHER, TUN_OTHER, 1480),
    (IPIPMode.ALWAYS, SAME, P_SAME, TUN_SAME, 1480),
    (IPIPMode.ALWAYS, OTHER, P_OTHER, TUN_OTHER, 1480),
    (IPIPMode.NEVER, SAME, P_SAME, DIRECT_SAME, None),
    (IPIPMode.NEVER, OTHER, P_OTHER, RECURSIVE_OTHER, None),
])
def test_mode_by_subnet(mode: IPIPMode, peer: A, prefix: N, hops: tuple, mtu: int | None) -> None:
    p = plan(mode, {prefix: {("peer", peer)}})
    r = p.routes[prefix]
    assert (r.kind, r.nexthops, r.mtu) == ("unicast", hops, mtu)
    assert p.tunnel_needed is (mode is not IPIPMode.NEVER)
    assert p.tunnel_mtu == 1480


def test_never_cross_subnet_warns() -> None:
    p = plan(IPIPMode.NEVER, {P_OTHER: {("node-b1", OTHER)}})
    assert any("ipipMode Never" in w and "node-b1" in w for w in p.warnings)


def test_never_cross_subnet_without_underlay_route_is_unreachable() -> None:
    facts = NodeFacts(A("10.0.1.11"), N("10.0.1.0/24"), "eth1", 1500, routes=())
    p = plan(IPIPMode.NEVER, {P_OTHER: {("node-b1", OTHER)}}, facts)
    assert P_OTHER not in p.routes
    assert [w for _, w in p.unusable[P_OTHER]] and "unreachable" in p.unusable[P_OTHER][0][1]
    assert "unreachable: not installed" in unusable_lines(p.unusable)[0]


def test_local_pod_cidr_is_blackhole_and_never_learned() -> None:
    p = plan(IPIPMode.CROSS_SUBNET, {N("10.244.1.0/24"): {("evil", SAME)}})
    r = p.routes[N("10.244.1.0/24")]
    assert r.kind == "blackhole" and r.nexthops == ()


@pytest.mark.parametrize("mode, expected", [
    (IPIPMode.CROSS_SUBNET, (NextHop(SAME, "eth1"), NextHop(OTHER, "tunl0", True))),
    (IPIPMode.ALWAYS, (NextHop(SAME, "tunl0", True), NextHop(OTHER, "tunl0", True))),
    (IPIPMode.NEVER, (NextHop(A("10.0.1.1"), "eth1"), NextHop(SAME, "eth1"))),
])
def test_ecmp_same_prefix_from_two_peers(mode: IPIPMode, expected: tuple) -> None:
    prefix = N("10.244.9.0/24")
    p = plan(mode, {prefix: {("a", SAME), ("b", OTHER)}})
    r = p.routes[prefix]
    assert r.nexthops == tuple(sorted(expected))
    assert "[ECMP]" in r.why
    assert r.mtu == (None if mode is IPIPMode.NEVER else 1480)


def test_ecmp_same_subnet_peers_direct() -> None:
    prefix = N("10.244.9.0/24")
    p = plan(IPIPMode.CROSS_SUBNET, {prefix: {("a", SAME), ("b", A("10.0.1.13"))}})
    assert p.routes[prefix].nexthops == (NextHop(SAME, "eth1"), NextHop(A("10.0.1.13"), "eth1"))


def test_prefix_outside_pools_goes_direct_without_tunnel() -> None:
    prefix = N("192.168.50.0/24")
    p = plan(IPIPMode.ALWAYS, {prefix: {("tor", A("10.0.1.1"))}})
    assert p.routes[prefix].nexthops == (NextHop(A("10.0.1.1"), "eth1"),)


def test_most_specific_pool_decides() -> None:
    pools = [Pool(cidr=N("10.244.0.0/16"), ipip_mode=IPIPMode.NEVER),
             Pool(cidr=N("10.245.0.0/16"), ipip_mode=IPIPMode.ALWAYS)]
    p = desired_routes(facts=FACTS, pools=pools, local_pod_cidrs=[],
                       learned={N("10.245.3.0/24"): {("x", SAME)}, N("10.244.3.0/24"): {("y", SAME)}})
    assert p.routes[N("10.245.3.0/24")].nexthops == TUN_SAME
    assert p.routes[N("10.244.3.0/24")].nexthops == DIRECT_SAME


def test_same_subnet_never_from_a_slash_32() -> None:
    net, warn = same_subnet_network(I("10.0.1.11/24"), None)
    assert net == N("10.0.1.0/24") and warn is None
    net, warn = same_subnet_network(I("10.0.1.11/32"), I("10.0.1.11/24"))
    assert net == N("10.0.1.0/24") and "/32" in (warn or "")
    net, warn = same_subnet_network(I("10.0.1.11/32"), None)
    assert net == N("10.0.1.11/32") and "cross-subnet" in (warn or "")
    facts = NodeFacts(A("10.0.1.11"), net, "eth1", 1500)
    p = plan(IPIPMode.CROSS_SUBNET, {P_SAME: {("p", SAME)}}, facts)
    assert p.routes[P_SAME].nexthops == TUN_SAME


def test_mode_switch_reevaluates_every_route_at_once() -> None:
    learned = {N(f"10.244.{i}.0/24"): {(f"n{i}", A(f"10.0.1.{20 + i}"))} for i in range(2, 30)}
    before = plan(IPIPMode.CROSS_SUBNET, learned)
    after = plan(IPIPMode.ALWAYS, learned)
    rec = RouteReconciler()
    rec.set_dataplane({r.id: r for r in before.routes.values()}, {})
    rec.set_desired({r.id: r for r in after.routes.values()})
    ops = rec.plan(0.0)
    assert ops.delete == []
    assert {r.dst for op, r in ops.write if op == "replace"} == set(learned)
    assert all(r.nexthops[0].device == "tunl0" for _, r in ops.write)


EXT = {"tor": PeerRouting(A("10.0.1.1"), "connected")}
FACTS2 = NodeFacts(A("10.0.1.11"), N("10.0.1.0/24"), "eth1", 1500,
                   routes=(UnderlayRoute(N("0.0.0.0/0"), A("10.0.1.1"), "eth1"),
                           UnderlayRoute(N("10.0.8.0/24"), A("10.0.1.1"), "eth1")),
                   connected=((N("192.168.5.0/24"), "eth2"),))


def ext(learned, policy: str = "connected", metric: int = 4096):
    return desired_routes(facts=FACTS2, pools=[Pool(cidr=N("10.244.0.0/16"))], local_pod_cidrs=[], learned=learned,
                          external={"tor": PeerRouting(A("10.0.1.1"), policy)}, external_metric=metric)


@pytest.mark.parametrize("policy, nh, hop", [
    ("connected", A("10.0.1.1"), NextHop(A("10.0.1.1"), "eth1")),   # the peer itself
    ("connected", A("10.0.1.5"), NextHop(A("10.0.1.5"), "eth1")),   # third party on the subnet
    ("connected", A("192.168.5.9"), NextHop(A("192.168.5.9"), "eth2")),  # another connected network
    ("connected", A("10.0.8.1"), None),                              # off-subnet: not for single-hop eBGP
    ("peer", A("10.0.1.1"), NextHop(A("10.0.1.1"), "eth1")),
    ("peer", A("10.0.1.5"), None),                                   # third party refused
    ("any", A("10.0.8.1"), NextHop(A("10.0.1.1"), "eth1")),          # recursive through the underlay
    ("any", A("10.0.1.11"), None),                                   # our own address: never
    ("connected", A("10.0.1.11"), None),
])
def test_external_next_hop_policies(policy: str, nh: A, hop: NextHop | None) -> None:
    p = ext({N("10.0.9.0/24"): {("tor", nh)}}, policy)
    r = p.routes.get(N("10.0.9.0/24"))
    if hop is None:
        assert r is None
        lines = unusable_lines(p.unusable)
        assert lines and "not installed" in lines[0] and not p.warnings
    else:
        assert r is not None and r.nexthops == (hop,) and r.metric == 4096 and not p.warnings and not p.unusable
        assert r.shape == ("direct" if hop.gateway == nh else "recursive")


def test_external_routes_carry_the_external_metric_pod_routes_do_not() -> None:
    p = ext({N("0.0.0.0/0"): {("tor", A("10.0.1.1"))}, N("10.244.5.0/24"): {("tor", A("10.0.1.12"))}})
    assert p.routes[N("0.0.0.0/0")].metric == 4096 and p.routes[N("0.0.0.0/0")].id == (N("0.0.0.0/0"), 4096)
    assert p.routes[N("10.244.5.0/24")].metric == 0


def test_tunnel_address_is_the_first_pod_cidrs_network_address() -> None:
    assert tunnel_address([N("10.244.7.0/24"), N("10.244.3.0/26")]) == A("10.244.3.0")
    assert tunnel_address([]) is None
