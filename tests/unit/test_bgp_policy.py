"""Import filters: mesh (pools, own pod CIDRs, node addresses, default) and external (filter, maxPrefixes)."""

from __future__ import annotations

from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N

from bgp.policy import ExternalImportPolicy, MeshImportPolicy, Rejection, RejectionLog
from fabric.config import Pool, PrefixFilter

MESH = MeshImportPolicy(
    pools=(Pool(cidr="10.244.0.0/16"), Pool(cidr="10.250.0.0/16", disabled=True)),
    own_pod_cidrs=(N("10.244.1.0/24"),),
    node_addresses=(A("10.0.0.1"), A("10.244.200.1")),
)


def test_mesh_accepts_pool_routes_and_rejects_the_rest_with_reasons() -> None:
    ok, bad = MESH.filter([N("10.244.2.0/24"), N("10.244.3.0/26"), N("0.0.0.0/0"), N("10.244.1.0/24"),
                           N("10.244.1.128/25"), N("10.250.1.0/24"), N("192.168.0.0/24"), N("10.0.0.0/24"),
                           N("10.244.200.0/24"), N("10.244.0.0/16")])
    assert ok == [N("10.244.2.0/24"), N("10.244.3.0/26")]
    reasons = {r.prefix: r.reason for r in bad}
    assert reasons[N("0.0.0.0/0")] == "default route"
    assert reasons[N("10.244.1.0/24")] == "overlaps this node's pod CIDR 10.244.1.0/24"
    assert reasons[N("10.244.1.128/25")].startswith("overlaps this node's pod CIDR")
    assert reasons[N("10.250.1.0/24")] == "not inside an enabled IP pool"
    assert reasons[N("192.168.0.0/24")] == "not inside an enabled IP pool"
    assert reasons[N("10.0.0.0/24")] == "covers node address 10.0.0.1"
    assert reasons[N("10.244.200.0/24")] == "covers node address 10.244.200.1"
    assert reasons[N("10.244.0.0/16")].startswith("covers node address")  # the whole pool covers a node


def test_external_prefix_filter() -> None:
    pol = ExternalImportPolicy(PrefixFilter(allow=["10.0.0.0/8"], deny=["10.66.0.0/16"], max_length=24),
                               node_addresses=(A("10.1.1.1"),))
    ok, bad = pol.filter([N("10.1.0.0/16"), N("10.66.1.0/24"), N("10.2.3.0/25"), N("172.16.0.0/12"),
                          N("10.1.1.1/32"), N("10.3.0.0/16")])
    assert ok == [N("10.3.0.0/16")]
    assert {r.prefix: r.reason.split(" (")[0] for r in bad} == {
        N("10.66.1.0/24"): "denied by 10.66.0.0/16",
        N("10.2.3.0/25"): "longer than maxLength 24",
        N("172.16.0.0/12"): "not inside an allowed prefix",
        N("10.1.1.1/32"): "covers node address 10.1.1.1",
        N("10.1.0.0/16"): "covers node address 10.1.1.1",
    }


def test_external_no_filter_accepts_everything_but_the_nodes_own_networks() -> None:
    pol = ExternalImportPolicy(None, node_addresses=(A("10.0.1.11"), A("10.0.2.21")),
                               node_networks=(N("10.0.1.0/24"),))
    ok, bad = pol.filter([N("0.0.0.0/0"), N("8.8.8.0/24"), N("10.0.1.0/24"), N("10.0.1.128/25"), N("10.0.2.0/24"),
                          N("10.0.0.0/8")])
    assert ok == [N("8.8.8.0/24")]
    reasons = {r.prefix: r.reason for r in bad}
    assert reasons[N("0.0.0.0/0")].startswith("default route") and "allowDefaultRoute" in reasons[N("0.0.0.0/0")]
    assert reasons[N("10.0.1.0/24")].startswith("inside the node's own subnet 10.0.1.0/24")
    assert reasons[N("10.0.1.128/25")].startswith("inside the node's own subnet")  # no node in it: still the subnet
    assert reasons[N("10.0.2.0/24")].startswith("covers node address 10.0.2.21")
    assert reasons[N("10.0.0.0/8")].startswith("covers node address 10.0.1.11")


def test_external_opt_ins_take_the_default_route_and_node_networks() -> None:
    pol = ExternalImportPolicy(None, node_addresses=(A("10.0.1.11"),), node_networks=(N("10.0.1.0/24"),),
                               allow_default=True, allow_node_networks=True)
    ok, bad = pol.filter([N("0.0.0.0/0"), N("10.0.1.0/24"), N("10.0.0.0/8")])
    assert ok == [N("0.0.0.0/0"), N("10.0.0.0/8"), N("10.0.1.0/24")] and bad == []
    only_default = ExternalImportPolicy(None, node_addresses=(A("10.0.1.11"),), node_networks=(N("10.0.1.0/24"),),
                                        allow_default=True)
    ok, bad = only_default.filter([N("0.0.0.0/0"), N("10.0.1.0/24")])
    assert ok == [N("0.0.0.0/0")] and [r.prefix for r in bad] == [N("10.0.1.0/24")]


def test_max_prefixes_rejects_the_excess_and_counts_what_is_held() -> None:
    pol = ExternalImportPolicy(None, max_prefixes=3)
    ok, bad = pol.filter([N(f"10.0.{i}.0/24") for i in range(5)])
    assert ok == [N("10.0.0.0/24"), N("10.0.1.0/24"), N("10.0.2.0/24")]
    assert [r.reason for r in bad] == ["max-prefixes 3 exceeded"] * 2
    # later update: 2 held, one re-announced (still fine), two new: only one fits
    ok, bad = pol.filter([N("10.0.0.0/24"), N("10.9.0.0/24"), N("10.9.1.0/24")],
                         held=[N("10.0.0.0/24"), N("10.0.1.0/24")])
    assert ok == [N("10.0.0.0/24"), N("10.9.0.0/24")]
    assert bad == [Rejection(N("10.9.1.0/24"), "max-prefixes 3 exceeded")]


def test_rejection_log_reports_each_once() -> None:
    log = RejectionLog()
    r1, r2 = Rejection(N("0.0.0.0/0"), "default route"), Rejection(N("1.0.0.0/8"), "x")
    assert log.new("b", [r1, r2]) == [r1, r2]
    assert log.new("b", [r1, r2]) == []
    assert log.new("c", [r1]) == [r1]
    log.forget_peer("b")
    assert log.new("b", [r1]) == [r1]
    small = RejectionLog(limit=2)
    small.new("p", [r1, r2])
    assert small.new("p", [Rejection(N("2.0.0.0/8"), "y")])  # bounded: starts over instead of growing


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bgp.policy import _covered  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(nodes=st.lists(st.integers(0, 2**32 - 1), max_size=20),
       net=st.integers(0, 2**32 - 1), plen=st.integers(0, 32))
def test_covered_matches_the_naive_loop(nodes: list[int], net: int, plen: int) -> None:
    from ipaddress import IPv4Address, IPv4Network
    prefix = IPv4Network((net, plen), strict=False)
    addrs = sorted({IPv4Address(n) for n in nodes})
    naive = next((a for a in addrs if a in prefix), None)
    assert _covered(sorted(int(a) for a in addrs), prefix) == naive
    # the edges: a node at the network and at the broadcast address is covered
    assert _covered([int(prefix.network_address)], prefix) == prefix.network_address
    assert _covered([int(prefix.broadcast_address)], prefix) == prefix.broadcast_address


def test_external_as_path_loop_and_own_prefixes() -> None:
    """RFC 4271 9.1.2: a route with our own ASN in its AS_PATH came back (a loop); allowOwnAsn N takes up
    to N occurrences (FRR's allowas-in). A prefix inside what this node announces is never taken back."""
    from bgp.attributes import PathAttributes as P

    paths = {N("10.0.4.0/24"): P(as_path=(65000, 64512)),  # our ASN once
             N("10.0.5.0/24"): P(as_path=(65000, 64512, 64512)),  # twice
             N("10.0.6.0/24"): P(as_path=(65000, (64999, 64512))),  # inside an AS_SET
             N("10.0.7.0/24"): P(as_path=(65000, 65001)),  # not ours
             N("10.96.0.0/24"): P(as_path=(65000,)),  # our service range, sent back without our ASN
             N("10.96.100.7/32"): P(as_path=(65000,)),  # a /32 inside our LB range
             N("10.96.0.0/16"): P(as_path=(65000,))}  # covering our range: not ours, taken
    own = (N("10.96.0.0/24"), N("10.96.100.0/24"))
    pol = ExternalImportPolicy(None, own_asn=64512, own_prefixes=own)
    ok, bad = pol.filter(list(paths), attrs=paths)
    assert ok == [N("10.0.7.0/24"), N("10.96.0.0/16")]
    why = {r.prefix: r.reason for r in bad}
    assert why[N("10.0.4.0/24")].startswith("AS_PATH 65000 64512 holds our AS 64512: a loop (RFC 4271 9.1.2")
    assert "allowOwnAsn" in why[N("10.0.4.0/24")]
    assert why[N("10.0.5.0/24")].startswith("AS_PATH 65000 64512 64512 holds our AS 64512 2 times")
    assert why[N("10.0.6.0/24")].startswith("AS_PATH 65000 {64999,64512} holds our AS 64512")
    assert why[N("10.96.0.0/24")] == "inside 10.96.0.0/24, which this node announces itself (never taken back)"
    assert why[N("10.96.100.7/32")].startswith("inside 10.96.100.0/24, which this node announces itself")
    # allowas-in 1: once is fine, twice is not; our own prefixes stay refused whatever the opt-in
    pol1 = ExternalImportPolicy(None, own_asn=64512, allow_own_asn=1, own_prefixes=own)
    ok, bad = pol1.filter(list(paths), attrs=paths)
    assert ok == [N("10.0.4.0/24"), N("10.0.6.0/24"), N("10.0.7.0/24"), N("10.96.0.0/16")]
    assert {r.prefix for r in bad} == {N("10.0.5.0/24"), N("10.96.0.0/24"), N("10.96.100.7/32")}
    # no attributes known (a route from a test, or an unreadable attribute set): no loop can be seen
    assert pol.filter([N("10.0.4.0/24")])[0] == [N("10.0.4.0/24")]
