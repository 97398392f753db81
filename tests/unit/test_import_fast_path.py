"""The bulk import's fast paths equal the straightforward code they replaced, on random inputs.

The import policy tests prefixes as integer spans (instead of IPv4Network.subnet_of / overlaps) and
judges an AS_PATH once per attributes object; the route model works out each (pool, peer, next hop)
once; learned prefixes are `bgp.prefix.Prefix` (hash computed once). The references below are the
previous code, kept here only to compare with.
"""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address as A, IPv4Network as N

from hypothesis import given, settings
from hypothesis import strategies as st

from bgp.attributes import PathAttributes
from bgp.policy import ExternalImportPolicy, MeshImportPolicy, Reason, _covered, _path_text, own_asn_count
from bgp.prefix import Address, Prefix
from fabric.config import IPIPMode, Pool, PrefixFilter
from ipip.model import (NextHop, NodeFacts, PeerRouting, Route, RoutePlan, UnderlayRoute, _external_hop, _shape,
                        desired_routes, pool_for, resolve_underlay)

# -- the previous code ---------------------------------------------------------------------------------


def ref_filter_verdict(f, prefix):
    if f is None:
        return None
    for d in f.deny:
        if prefix.subnet_of(d):
            return Reason("filter-denied", f"denied by {d}")
    if f.allow and not any(prefix.subnet_of(a) for a in f.allow):
        return Reason("filter-not-allowed", "not inside an allowed prefix")
    if f.max_length is not None and prefix.prefixlen > f.max_length:
        return Reason("filter-max-length", f"longer than maxLength {f.max_length}")
    return None


def ref_mesh_check(pol: MeshImportPolicy, prefix):
    if prefix.prefixlen == 0:
        return Reason("default-route", "default route")
    addr = _covered(pol._node_ints, prefix)
    if addr is not None:
        return Reason("covers-node-address", f"covers node address {addr}")
    for own in pol.own_pod_cidrs:
        if prefix.overlaps(own):
            return Reason("own-pod-cidr", f"overlaps this node's pod CIDR {own}")
    for pool in pol.pools:
        if not pool.disabled and prefix.subnet_of(pool.cidr):
            return None
    return Reason("outside-pools", "not inside an enabled IP pool")


def ref_external_check(pol: ExternalImportPolicy, prefix, attrs):
    for own in pol.own_prefixes:
        if prefix.subnet_of(own):
            return Reason("own-prefix", f"inside {own}, which this node announces itself (never taken back)")
    if pol.own_asn is not None and attrs is not None:
        n = own_asn_count(attrs, pol.own_asn)
        if n > pol.allow_own_asn:
            more = f" {n} times" if n > 1 else ""
            return Reason("as-path-loop", f"AS_PATH {_path_text(attrs)} holds our AS {pol.own_asn}{more}: a loop "
                                          f"(RFC 4271 9.1.2; set import.allowOwnAsn to accept)")
    if prefix.prefixlen == 0 and not pol.allow_default:
        return Reason("default-route", "default route (the node's own default route comes first; set "
                                       "import.allowDefaultRoute to install it behind the node's own)")
    if not pol.allow_node_networks and prefix.prefixlen > 0:
        for net in pol.node_networks:
            if prefix.subnet_of(net):
                return Reason("node-subnet", f"inside the node's own subnet {net} (set import.allowNodeNetworks "
                                             "to accept it)")
        addr = _covered(pol._node_ints, prefix)
        if addr is not None:
            return Reason("covers-node-address", f"covers node address {addr} (set import.allowNodeNetworks "
                                                 "to accept it)")
    return ref_filter_verdict(pol.prefix_filter, prefix)


def ref_desired_routes(*, facts, pools, local_pod_cidrs, learned, tunnel_device="tunl0", external=None,
                       external_metric=0) -> RoutePlan:
    routes, warnings, unusable = {}, {}, {}
    tunnel_mtu = facts.mtu - 20
    tunnel_needed = any(p.ipip_mode is not IPIPMode.NEVER and not p.disabled for p in pools)
    local = set(local_pod_cidrs)
    for cidr in sorted(local):
        routes[cidr] = Route(cidr, "blackhole", why=f"local pod CIDR of this node ({cidr}): blackhole for unused "
                                                     "addresses; pods have their own /32 routes", shape="blackhole")
    for prefix in sorted(learned):
        if prefix in local:
            continue
        hops, reasons, uses_tunnel, shapes = set(), [], False, set()
        pool = pool_for(prefix, pools)
        if pool is None:
            for peer, next_hop in sorted(learned[prefix], key=lambda t: (t[1], t[0])):
                hop, why = _external_hop(peer, next_hop, (external or {}).get(peer), facts)
                if hop is None:
                    unusable.setdefault(prefix, []).append((peer, why))
                    continue
                hops.add(hop)
                shapes.add("recursive" if hop.gateway != next_hop else "direct")
                reasons.append(f"from {peer} via {next_hop} (no pool: external route, metric {external_metric}) "
                               f"-> {why}")
            if hops:
                routes[prefix] = Route(prefix, "unicast", tuple(sorted(hops)), metric=external_metric,
                                       why="; ".join(reasons) + (" [ECMP]" if len(hops) > 1 else ""),
                                       shape=_shape(hops, shapes))
            continue
        for peer, next_hop in sorted(learned[prefix], key=lambda t: (t[1], t[0])):
            same = next_hop in facts.network
            mode = pool.ipip_mode
            where = "same subnet" if same else "another subnet"
            pool_txt = f"pool {pool.cidr} ipipMode {mode.value}"
            if mode is IPIPMode.ALWAYS or (mode is IPIPMode.CROSS_SUBNET and not same):
                hops.add(NextHop(next_hop, tunnel_device, onlink=True))
                uses_tunnel = True
                shapes.add("ipip")
                reasons.append(f"from {peer} via {next_hop} ({where}, {pool_txt}) -> IPIP via {tunnel_device}")
                continue
            hop = resolve_underlay(next_hop, facts)
            if hop is None:
                why = (f"next hop {next_hop} is in another subnet and not routed by the underlay ({pool_txt}): "
                       "unreachable")
                unusable.setdefault(prefix, []).append((peer, why))
                continue
            hops.add(hop)
            shapes.add("recursive" if hop.gateway != next_hop else "direct")
            if hop.gateway == next_hop:
                reasons.append(f"from {peer} via {next_hop} ({where}, {pool_txt}) -> direct on {hop.device}")
            else:
                reasons.append(f"from {peer} via {next_hop} ({where}, {pool_txt}) -> recursive via underlay "
                               f"gateway {hop.gateway} on {hop.device}")
                warnings.setdefault(prefix, []).append(
                    f"{prefix} from {peer}: ipipMode Never and {next_hop} is in another subnet: sent to underlay "
                    f"gateway {hop.gateway}, reachable only if it routes pod CIDRs")
        if not hops:
            continue
        routes[prefix] = Route(prefix, "unicast", tuple(sorted(hops)), mtu=tunnel_mtu if uses_tunnel else None,
                               why="; ".join(reasons) + (" [ECMP]" if len(hops) > 1 else ""),
                               shape=_shape(hops, shapes))
    return RoutePlan(routes, tunnel_needed, tunnel_mtu, tuple(w for p in sorted(warnings) for w in warnings[p]),
                     {p: tuple(ws) for p, ws in warnings.items()}, {p: tuple(u) for p, u in unusable.items()})


# -- random inputs: prefixes around a few ranges, so containment and overlap happen often ---------------

BASES = [int(A(x)) for x in ("10.244.0.0", "10.245.0.0", "10.0.1.0", "10.96.0.0", "192.168.0.0", "0.0.0.0")]


@st.composite
def prefixes(draw, lo: int = 0) -> N:
    base = draw(st.sampled_from(BASES))
    plen = draw(st.integers(min_value=lo, max_value=32))
    off = draw(st.integers(min_value=0, max_value=0xFFFF))
    return N(((base + off) & (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF, plen))


addrs = st.builds(lambda b, o: A(b + o), st.sampled_from(BASES), st.integers(0, 0xFFFF))
paths = st.sampled_from([(), (65000,), (64512,), (65000, 64512, 64512), (65000, (64512, 65001)), (64512, 64512)])
filters = st.one_of(st.none(), st.builds(
    lambda allow, deny, ml: PrefixFilter(allow=[str(p) for p in allow], deny=[str(p) for p in deny], max_length=ml),
    st.lists(prefixes(), max_size=3), st.lists(prefixes(), max_size=3), st.one_of(st.none(), st.integers(0, 32))))
# pools: realistic ones (often holding the learned prefixes: nested, overlapping the node's subnet) or random
pool_cidrs = st.one_of(st.sampled_from([N("10.244.0.0/16"), N("10.244.128.0/17"), N("10.245.0.0/16"), N("10.0.0.0/8"),
                                        N("192.168.0.0/16")]), prefixes(lo=8))
pools = st.lists(st.builds(lambda p, mode, off: Pool(cidr=str(p), ipip_mode=mode, disabled=off),
                           pool_cidrs, st.sampled_from(list(IPIPMode)), st.booleans()), max_size=3)


@settings(max_examples=300, deadline=None)
@given(ps=st.lists(prefixes(), max_size=30), pl=pools, own=st.lists(prefixes(lo=8), max_size=3),
       nodes=st.lists(addrs, max_size=4))
def test_mesh_policy_equals_the_subnet_of_code(ps, pl, own, nodes) -> None:
    pol = MeshImportPolicy(tuple(pl), tuple(own), tuple(nodes))
    for p in ps:
        assert pol.check(p) == ref_mesh_check(pol, p)
        assert pol.check(Prefix(p)) == ref_mesh_check(pol, p)


@settings(max_examples=300, deadline=None)
@given(ps=st.lists(st.tuples(prefixes(), paths), max_size=30), f=filters, own=st.lists(prefixes(lo=8), max_size=3),
       nets=st.lists(prefixes(lo=8), max_size=2), nodes=st.lists(addrs, max_size=4), allow=st.integers(0, 2),
       flags=st.tuples(st.booleans(), st.booleans(), st.booleans()), maxp=st.one_of(st.none(), st.integers(0, 10)))
def test_external_policy_equals_the_subnet_of_code(ps, f, own, nets, nodes, allow, flags, maxp) -> None:
    pol = ExternalImportPolicy(f, maxp, tuple(nodes), tuple(nets), allow_default=flags[0], allow_node_networks=flags[1],
                               own_asn=64512 if flags[2] else None, allow_own_asn=allow, own_prefixes=tuple(own))
    attrs = {}
    for p, path in ps:
        a = attrs.setdefault(p, PathAttributes(as_path=path))
        assert pol.check(p, a) == ref_external_check(pol, p, a)
    # filter(): one verdict per attributes object, the same rejections and order as checking each prefix
    ok, bad = pol.filter([Prefix(p) for p, _ in ps], attrs=attrs)
    held, want_ok, want_bad = set(), [], []
    for p in sorted({p for p, _ in ps}):
        why = ref_external_check(pol, p, attrs.get(p))
        if why is None and maxp is not None and len(held) >= maxp:
            why = "max-prefixes"
        if why is None:
            want_ok.append(p)
            held.add(p)
        else:
            want_bad.append((p, str(why).split(" exceeded")[0]))
    assert ok == want_ok
    assert [(r.prefix, str(r.reason).split(" exceeded")[0].replace(f"max-prefixes {maxp}", "max-prefixes"))
            for r in bad] == want_bad


FACTS = [NodeFacts(A("10.0.1.11"), N("10.0.1.0/24"), "eth1", 1500,
                   (UnderlayRoute(N("0.0.0.0/0"), A("10.0.1.1"), "eth1"), UnderlayRoute(N("192.168.0.0/16"), None, "eth2")),
                   ((N("192.168.5.0/24"), "eth2"),)),
         NodeFacts(A("10.0.1.11"), N("10.0.1.0/24"), "eth1", 1400)]
hops = st.sampled_from([A("10.0.1.12"), A("10.0.1.11"), A("10.0.2.21"), A("192.168.5.9"), A("172.16.0.1"),
                        A("10.0.1.1")])


@settings(max_examples=300, deadline=None)
@given(facts=st.sampled_from(FACTS), pl=pools, local=st.lists(prefixes(lo=16), max_size=2),
       learned=st.dictionaries(st.one_of(prefixes(), prefixes(lo=16)), st.sets(st.tuples(st.sampled_from(["a", "b", "tor", "rr"]), hops),
                                                    min_size=1, max_size=3), max_size=25),
       nh=st.dictionaries(st.sampled_from(["tor", "rr"]),
                          st.builds(PeerRouting, hops, st.sampled_from(["connected", "peer", "any"]))),
       metric=st.sampled_from([0, 1024]))
def test_route_model_equals_the_per_prefix_code(facts, pl, local, learned, nh, metric) -> None:
    kw = dict(facts=facts, pools=pl, local_pod_cidrs=local, tunnel_device="tunl0", external=nh, external_metric=metric)
    new = desired_routes(learned={Prefix(p): h for p, h in learned.items()}, **kw)
    ref = ref_desired_routes(learned=learned, **kw)
    assert {p: (r.key(), r.why, r.shape) for p, r in new.routes.items()} == \
        {p: (r.key(), r.why, r.shape) for p, r in ref.routes.items()}
    assert list(new.routes) == list(ref.routes)  # the same order (status, explain)
    assert (new.tunnel_needed, new.tunnel_mtu, new.warnings) == (ref.tunnel_needed, ref.tunnel_mtu, ref.warnings)
    assert new.prefix_warnings == ref.prefix_warnings
    assert new.unusable == ref.unusable


@given(p=prefixes())
def test_a_prefix_is_an_ipv4network_with_the_same_hash(p) -> None:
    q = Prefix(str(p))
    assert q == p and p == q and hash(q) == hash(p) and {p: 1}[q] == 1 and str(q) == str(p)
    assert not q < p and not p < q and q.subnet_of(p)
    assert Prefix((int(p.network_address), p.prefixlen)) == p


@given(a=addrs)
def test_an_address_is_an_ipv4address_with_the_same_hash(a) -> None:
    b = Address(str(a))
    assert b == a and a == b and hash(b) == hash(a) and {a: 1}[b] == 1 and str(b) == str(a) and repr(b) == repr(a)
    assert Address(int(a)) == a and not b < a and (b, "x") == (a, "x")
    assert repr(Prefix("10.0.0.0/8")) == repr(N("10.0.0.0/8"))


routes = st.builds(
    lambda dst, kind, hops, mtu, metric: Route(dst, kind, () if kind == "blackhole" else tuple(sorted(set(hops))),
                                               mtu, metric),
    prefixes(), st.sampled_from(["unicast", "unicast", "blackhole"]),
    st.lists(st.builds(NextHop, hops, st.sampled_from(["eth1", "tunl0"]), st.booleans()), min_size=1, max_size=3),
    st.sampled_from([None, 1480]), st.sampled_from([0, 1024]))


@settings(max_examples=300, deadline=None)
@given(batch=st.lists(st.tuples(routes, st.sampled_from(["create", "replace", "delete"])), max_size=20),
       table=st.sampled_from([254, 1000]))
def test_route_encoder_equals_encode_route(batch, table) -> None:
    """The encoder's per-shape templates give byte for byte what encode_route gives for each route."""
    from ipip import rtnl

    ifx = {"eth1": 2, "tunl0": 3}
    enc = rtnl.RouteEncoder(proto=80, table=table, ifindex=ifx)
    for seq, (r, op) in enumerate(batch, 1):
        assert enc.encode(r, op=op, seq=seq) == rtnl.encode_route(r, op=op, seq=seq, proto=80, table=table, ifindex=ifx)
