"""The routes stage on the fake kernel, driven directly (virtual time): adoption and the hold, a node
address missing at start, foreign routes, a ToR's default route, failures injected at every step."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from ipaddress import IPv4Address as A, IPv4Network as N
from typing import Any

import pytest

from bgp.events import RoutesAnnounced, RoutesWithdrawn
from bgp.exabgp_config import Neighbor
from fabric import config as cfgmod
from fabric.inputs import NodeInfo
from fabric.lifecycle import Lifecycle, Phase
from fabric.shared_rib import SharedRib
from fabric.stage import StageInput
from fabric.stages.routes import RoutesStage
from fabric.tracker import Changes, Store
from ipip.model import NextHop, Route
from tests.unit.fakes import FakeKernel

CFG = cfgmod.parse({"node": {"name": "a1", "address": "10.0.1.11/24", "podCIDRs": ["10.244.1.0/24"]},
                    "pools": [{"cidr": "10.244.0.0/16", "ipipMode": "CrossSubnet"}],
                    "peers": [{"name": "tor", "address": "10.0.1.1", "asn": 65000,
                               "import": {"allow": ["0.0.0.0/0"], "allowDefaultRoute": True}}],
                    "source": {"kind": "file", "path": "c.yaml"}})
NODES = {"a1": NodeInfo(name="a1", address="10.0.1.11", podCIDRs=["10.244.1.0/24"]),
         "a2": NodeInfo(name="a2", address="10.0.1.12", podCIDRs=["10.244.2.0/24"]),
         "b1": NodeInfo(name="b1", address="10.0.2.21", podCIDRs=["10.244.3.0/24"])}


def nb(name: str, addr: str, kind: str = "mesh", asn: int = 64512) -> Neighbor:
    return Neighbor(name, A(addr), asn, 64512, A("10.0.1.11"), A("10.0.1.11"), 9, kind=kind)


@dataclass
class Shim:
    cfg: Any = CFG
    store: Store = field(default_factory=lambda: Store(default_consumer=False))
    rib: SharedRib = field(default_factory=SharedRib)
    neighbors: list = field(default_factory=lambda: [nb("a2", "10.0.1.12"), nb("b1", "10.0.2.21"),
                                                     nb("tor", "10.0.1.1", "external", 65000)])
    lifecycle: Lifecycle = field(default_factory=lambda: Lifecycle(60, Phase.RUNNING))


def make(kernel: FakeKernel, shim: Shim | None = None) -> tuple[RoutesStage, Shim]:
    shim = shim or Shim()
    shim.store.replace("Node", NODES)
    return RoutesStage(shim, lambda cfg: kernel, sysctls=False), shim


def run(stage: RoutesStage, now: float, *, full: bool = False, complete: bool = True):
    inp = StageInput(Changes(), full, now, complete)
    p = stage.prepare(inp)
    try:
        return stage.run(inp, p)
    except Exception:
        stage.restore(inp, p)
        raise


def learn(shim: Shim, stage: RoutesStage, peer: str, nh: str, *prefixes: str) -> None:
    ev = RoutesAnnounced(peer, A(nh), tuple(N(p) for p in prefixes))
    shim.rib.apply(ev, 0)
    stage.mark_dirty(ev.prefixes)


def ours(k: FakeKernel) -> dict[str, str]:
    return {f"{d}" + (f" m{m}" if m else ""): r.text() for (d, m), r in k.ours().items()}


def test_learned_routes_and_blackhole_and_tunnel() -> None:
    k = FakeKernel()
    stage, shim = make(k)
    learn(shim, stage, "a2", "10.0.1.12", "10.244.2.0/24")
    learn(shim, stage, "b1", "10.0.2.21", "10.244.3.0/24")
    res = run(stage, 0)
    assert ours(k) == {"10.244.1.0/24": "blackhole 10.244.1.0/24",
                       "10.244.2.0/24": "10.244.2.0/24 via 10.0.1.12 dev eth1",
                       "10.244.3.0/24": "10.244.3.0/24 via 10.0.2.21 dev tunl0 onlink mtu 1480"}
    assert k.tunnel is not None and k.tunnel.up and k.tunnel.mtu == 1480
    assert k.tunnel.owned == {A("10.244.1.0")}  # the tunnel's own source address
    assert res.failures == {} and res.next_deadline is None
    # per change: a withdraw touches one key
    writes = k.writes
    shim.rib.apply(RoutesWithdrawn("a2", (N("10.244.2.0/24"),)), 1)
    stage.mark_dirty([N("10.244.2.0/24")])
    run(stage, 1)
    assert "10.244.2.0/24" not in ours(k) and k.writes == writes + 1


def test_tor_default_route_and_node_subnet_never_touch_the_nodes_own() -> None:
    """Finding 1: a ToR announcing 0.0.0.0/0 and the node subnet (permissive filter)."""
    k = FakeKernel()
    node_default = Route(N("0.0.0.0/0"), nexthops=(NextHop(A("10.0.1.1"), "eth1"),))
    connected = Route(N("10.0.1.0/24"))
    k.add_foreign(node_default, proto=3)
    k.add_foreign(connected, proto=2)
    before = dict(k.routes)
    stage, shim = make(k)
    learn(shim, stage, "tor", "10.0.1.1", "0.0.0.0/0", "10.0.1.0/24", "10.0.9.0/24")
    learn(shim, stage, "a2", "10.0.1.12", "10.244.2.0/24")
    res = run(stage, 0)
    assert {key: v for key, v in k.routes.items() if key in before} == before  # the node's own, untouched
    got = ours(k)
    assert got["0.0.0.0/0 m4096"] == "0.0.0.0/0 via 10.0.1.1 dev eth1 metric 4096"  # opted in: behind the node's
    assert "10.0.1.0/24" not in got and "10.0.1.0/24 m4096" not in got  # node subnet: refused (no opt-in)
    assert got["10.0.9.0/24 m4096"] == "10.0.9.0/24 via 10.0.1.1 dev eth1 metric 4096"
    assert "10.244.2.0/24" in got  # the legitimate route next to it is fine
    assert any("10.0.1.0/24" in w and "inside the node's own subnet" in w for w in res.status["warnings"])
    # the ToR withdraws everything: only our routes go
    shim.rib.apply(RoutesWithdrawn("tor", (N("0.0.0.0/0"), N("10.0.1.0/24"), N("10.0.9.0/24"))), 1)
    stage.mark_all()
    run(stage, 1)
    assert {key: v for key, v in k.routes.items() if key in before} == before
    assert set(ours(k)) == {"10.244.1.0/24", "10.244.2.0/24"}


def test_blackhole_over_a_bridge_cnis_route_is_a_conflict_not_a_replace() -> None:
    k = FakeKernel()
    bridge = Route(N("10.244.1.0/24"))  # `10.244.1.0/24 dev cni0 proto kernel scope link`
    k.add_foreign(bridge, proto=2)
    stage, shim = make(k)
    res = run(stage, 0)
    assert k.routes[(N("10.244.1.0/24"), 0)] == (bridge, 2)
    assert "another owner's route" in res.failures["10.244.1.0/24"]
    assert res.status["conflicts"] == 1 and res.next_deadline == 1.0


def test_node_address_missing_at_start_adopts_and_touches_nothing() -> None:
    """Finding 3: the previous run's routes stay until peers are back, however late the address comes."""
    k = FakeKernel(has_address=False)
    old = {"10.244.2.0/24": Route(N("10.244.2.0/24"), nexthops=(NextHop(A("10.0.1.12"), "eth1"),)),
           "10.244.3.0/24": Route(N("10.244.3.0/24"), nexthops=(NextHop(A("10.0.2.21"), "tunl0", True),), mtu=1480)}
    for r in old.values():
        k.routes[r.id] = (r, 80)
    lc = Lifecycle(60)
    stage, shim = make(k, Shim(lifecycle=lc))
    res = run(stage, 0)
    assert stage.adopted is not None and len(stage.adopted) == 2
    assert "no interface holds the node address" in res.status["waiting"] and k.writes == 0
    lc.adopt(2)
    lc.update(0, source_complete=True, config_known=True, facts=stage.view.facts_error, neighbors={"a2", "b1"})
    assert lc.phase is Phase.HOLDING
    k.has_address = True  # the address appears; no peer is up yet (nothing learned)
    stage.facts_changed()
    run(stage, 5)
    assert {str(d) for d, m in k.ours()} == {"10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24"}  # kept
    lc.update(5, source_complete=True, config_known=True, facts=None, neighbors={"a2", "b1"})
    assert lc.phase is Phase.HOLDING and lc.deadline() == 65
    learn(shim, stage, "a2", "10.0.1.12", "10.244.2.0/24")
    lc.end_of_rib("a2")
    lc.end_of_rib("b1")  # b1 came back without 10.244.3.0/24: it goes when the hold ends
    assert lc.update(6, source_complete=True, config_known=True, facts=None, neighbors={"a2", "b1"})
    assert lc.phase is Phase.RUNNING
    run(stage, 6, full=True)
    assert {str(d) for d, m in k.ours()} == {"10.244.1.0/24", "10.244.2.0/24"}


def test_nothing_is_written_before_the_source_is_complete() -> None:
    k = FakeKernel()
    k.routes[(N("10.244.9.0/24"), 0)] = (Route(N("10.244.9.0/24"), nexthops=(NextHop(A("10.0.1.12"), "eth1"),)), 80)
    stage, shim = make(k)
    res = run(stage, 0, complete=False)
    assert res.status["waiting"] == "the source's first complete list" and k.writes == 0
    assert stage.adopted is not None and len(stage.adopted) == 1


def test_holding_keeps_adopted_routes_through_per_change_updates() -> None:
    k = FakeKernel()
    adopted = Route(N("10.244.3.0/24"), nexthops=(NextHop(A("10.0.2.21"), "tunl0", True),), mtu=1480)
    k.routes[adopted.id] = (adopted, 80)
    stage, shim = make(k, Shim(lifecycle=Lifecycle(60)))
    run(stage, 0)
    learn(shim, stage, "b1", "10.0.2.21", "10.244.3.0/24")
    run(stage, 1)
    shim.rib.apply(RoutesWithdrawn("b1", (N("10.244.3.0/24"),)), 2)
    stage.mark_dirty([N("10.244.3.0/24")])
    run(stage, 2)
    assert k.ours()[adopted.id] == adopted  # withdrawn while holding: the adopted route stays


@pytest.mark.parametrize("scenario", ["read-timeout", "write-refused-once", "foreign-then-gone"])
def test_failures_converge_within_a_few_runs(scenario: str) -> None:
    k = FakeKernel()
    stage, shim = make(k)
    learn(shim, stage, "a2", "10.0.1.12", "10.244.2.0/24")
    if scenario == "read-timeout":
        k.fail_next_reads = 1
        with pytest.raises(TimeoutError):
            run(stage, 0)  # the runner retries with backoff; nothing was written meanwhile
        assert k.writes == 0
    elif scenario == "write-refused-once":
        k.fail_next_writes = 1
    else:
        k.add_foreign(Route(N("10.244.2.0/24"), "blackhole"), proto=4)
    now = 0.0
    for i in range(3):
        res = run(stage, now)
        if scenario == "foreign-then-gone" and i == 0:
            del k.routes[(N("10.244.2.0/24"), 0)]
        now = res.next_deadline or now + 1
    assert set(ours(k)) == {"10.244.1.0/24", "10.244.2.0/24"} and res.failures == {}


def test_a_permanently_refused_route_costs_one_write_per_backoff_step() -> None:
    k = FakeKernel(refuse={N("10.244.2.0/24"): errno.EINVAL})
    k.create_tunnel()
    stage, shim = make(k)
    learn(shim, stage, "a2", "10.0.1.12", "10.244.2.0/24")
    learn(shim, stage, "b1", "10.0.2.21", "10.244.3.0/24")
    now, runs = 0.0, 0
    while now < 120:
        res = run(stage, now)
        runs += 1
        now = res.next_deadline
    assert k.reads == 1  # never escalated to a re-read of the kernel
    assert k.attempts[N("10.244.2.0/24")] == runs == 7  # at 0, 1, 3, 7, 15, 31, 63 s (then 123 > 120)
    assert k.attempts[N("10.244.3.0/24")] == 1
    assert "10.244.2.0/24" in res.failures and "Invalid argument" in res.failures["10.244.2.0/24"]


def test_ip_forward_is_written_only_once_the_node_address_is_there(monkeypatch) -> None:
    """Finding 11: a node whose configured address is not on any interface is not touched at all."""
    from fabric.stages import routes as routes_mod

    written: list[tuple[str, str]] = []
    monkeypatch.setattr(routes_mod, "set_sysctl", lambda name, value: written.append((name, value)))
    k = FakeKernel(has_address=False)
    shim = Shim()
    shim.store.replace("Node", NODES)
    stage = RoutesStage(shim, lambda cfg: k, sysctls=True)
    run(stage, 0)
    assert written == [] and k.writes == 0
    k.has_address = True
    stage.facts_changed()
    run(stage, 1)
    assert written == [("net.ipv4.ip_forward", "1")]


def test_as_path_loops_and_our_own_prefixes_from_a_tor_are_not_installed() -> None:
    """A ToR sending back our service range, a /32 inside it, and a route whose AS_PATH holds our ASN
    (RFC 4271 9.1.2): none installed, each reported; `import.allowOwnAsn: 1` takes the looped one
    (and only it) on a configuration change, without any BGP event."""
    from bgp.attributes import PathAttributes

    def conf(allow: int) -> Any:
        return cfgmod.parse({"node": {"name": "a1", "address": "10.0.1.11/24", "podCIDRs": ["10.244.1.0/24"]},
                             "pools": [{"cidr": "10.244.0.0/16"}],
                             "peers": [{"name": "tor", "address": "10.0.1.1", "asn": 65000,
                                        "import": {"allowOwnAsn": allow}}],
                             "advertise": {"serviceClusterIPs": ["10.96.0.0/24"],
                                           "serviceLoadBalancerIPs": ["10.96.100.0/24"]},
                             "source": {"kind": "file", "path": "c.yaml"}})

    k = FakeKernel()
    stage, shim = make(k, Shim(cfg=conf(0)))
    for prefixes, path in ((("10.0.4.0/24",), (65000, 64512)), (("10.96.0.0/24", "10.96.100.5/32"), (65000,)),
                           (("10.0.9.0/24",), (65000,))):
        ev = RoutesAnnounced("tor", A("10.0.1.1"), tuple(N(p) for p in prefixes), PathAttributes(as_path=path))
        shim.rib.apply(ev, 0)
        stage.mark_dirty(ev.prefixes)
    res = run(stage, 0)
    got = ours(k)
    assert "10.0.9.0/24 m4096" in got
    assert not any(p.startswith(("10.0.4.", "10.96.")) for p in got), got
    rejected = {p: (code, why) for p, code, why in res.status["rejectedAll"]["tor"]}
    assert rejected["10.0.4.0/24"][0] == "as-path-loop", rejected
    assert rejected["10.0.4.0/24"][1].startswith("AS_PATH 65000 64512 holds our AS 64512: a loop"), rejected
    assert rejected["10.96.0.0/24"] == ("own-prefix", "inside 10.96.0.0/24, which this node announces itself "
                                                      "(never taken back)"), rejected
    assert rejected["10.96.100.5/32"][1].startswith("inside 10.96.100.0/24, which this node announces"), rejected
    assert "import from tor rejected 10.0.4.0/24: AS_PATH 65000 64512 holds our AS 64512" in \
        "\n".join(res.status["warnings"])
    shim.cfg = conf(1)
    run(stage, 1)
    got = ours(k)
    assert "10.0.4.0/24 m4096" in got and not any(p.startswith("10.96.") for p in got), got


def test_status_learned_carries_as_paths_for_fabric_plan(tmp_path) -> None:
    """`fabric plan` replays the learned routes from the agent's status: with their AS_PATHs, so it judges
    loops as the agent does (else it would plan to install a route the agent refuses)."""
    from bgp.attributes import PathAttributes
    from fabric import status as status_mod
    from fabric.agent import _learned
    from fabric.plan import _learned_from_status

    rib = SharedRib()
    rib.apply(RoutesAnnounced("tor", A("10.0.1.1"), (N("10.0.4.0/24"),),
                              PathAttributes(as_path=(65000, (64512, 65001), 64512))), 0)
    rib.apply(RoutesAnnounced("a2", A("10.0.1.12"), (N("10.244.2.0/24"),)), 0)
    status_mod.write(tmp_path, {"learned": _learned(rib)})
    learned, _ = _learned_from_status(tmp_path)
    assert learned == {N("10.0.4.0/24"): {("tor", A("10.0.1.1")): PathAttributes(as_path=(65000, (64512, 65001), 64512))},
                       N("10.244.2.0/24"): {("a2", A("10.0.1.12")): PathAttributes()}}


# -- the kernel's own events: repaired per key, no kernel read ------------------------------------------

def _converged(k: FakeKernel) -> tuple[RoutesStage, Shim]:
    stage, shim = make(k)
    learn(shim, stage, "a2", "10.0.1.12", "10.244.2.0/24")
    learn(shim, stage, "b1", "10.0.2.21", "10.244.3.0/24")
    run(stage, 0)
    assert set(ours(k)) == {"10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24"}
    return stage, shim


A2 = Route(N("10.244.2.0/24"), nexthops=(NextHop(A("10.0.1.12"), "eth1"),))


def test_device_down_and_up_repairs_the_routes_through_it_without_a_read() -> None:
    """`ip link set eth1 down` drops our routes through eth1 with no RTM_DELROUTE; the link event alone
    says which: they are pending at once, refused while the device is down (retried on the key's backoff),
    and written the moment it is up again, not at the backoff time; the kernel is never read again."""
    from ipip import rtnl

    k = FakeKernel()
    stage, _ = _converged(k)
    reads = k.reads
    assert stage.kernel_event(rtnl.RTM_NEWLINK, 0, 0, k.set_down("eth1"))
    assert set(ours(k)) == {"10.244.1.0/24", "10.244.3.0/24"}  # the kernel dropped it, silently
    res = run(stage, 10)
    assert res.status["problems"]["10.244.2.0/24"]["attempts"] == 1  # refused while down (ENETDOWN)
    assert res.status["repairs"] == 1 and res.next_deadline == 11.0
    assert stage.kernel_event(rtnl.RTM_NEWLINK, 0, 0, k.set_up("eth1"))
    res = run(stage, 10.2)  # before the key's retry time: the device coming up is the reason to write now
    assert ours(k)["10.244.2.0/24"] == "10.244.2.0/24 via 10.0.1.12 dev eth1"
    assert res.failures == {} and res.next_deadline is None
    assert k.reads == reads and res.status["reads"] == 1  # no read, no full resync: per key
    # an unchanged link (a carrier flap, statistics) or an unknown one (a pod's veth) wakes nothing
    from tests.unit.fakes import link_body
    assert not stage.kernel_event(rtnl.RTM_NEWLINK, 0, 0, link_body("eth1", 2, up=True))
    assert not stage.kernel_event(rtnl.RTM_NEWLINK, 0, 0, link_body("cali7", 77, up=True))
    # the node device renamed or re-created, the tunnel changed: facts, the kernel is read again
    assert stage.kernel_event(rtnl.RTM_DELLINK, 0, 0, link_body("eth1", 2, up=False))
    run(stage, 11)
    assert k.reads == reads + 1


def test_our_route_deleted_or_changed_by_someone_else_is_repaired_at_once() -> None:
    from ipip import rtnl
    from tests.unit.fakes import route_body

    k = FakeKernel()
    stage, _ = _converged(k)
    reads = k.reads
    del k.routes[A2.id]  # `ip route del 10.244.2.0/24 proto 80`
    assert stage.kernel_event(rtnl.RTM_DELROUTE, 0, 999, route_body(A2))
    run(stage, 5)
    assert ours(k)["10.244.2.0/24"] == "10.244.2.0/24 via 10.0.1.12 dev eth1"
    odd = Route(A2.dst, nexthops=(NextHop(A("10.0.1.99"), "eth1"),))
    k.routes[A2.id] = (odd, 80)  # `ip route replace ... proto 80`: our key, a route we don't want
    assert stage.kernel_event(rtnl.RTM_NEWROUTE, 0x100, 999, route_body(odd))
    res = run(stage, 6)
    assert ours(k)["10.244.2.0/24"] == "10.244.2.0/24 via 10.0.1.12 dev eth1" and k.reads == reads
    assert res.status["repairs"] == 2
    # the echo of our own writes (our port id) and other owners' routes elsewhere are not news
    assert not stage.kernel_event(rtnl.RTM_NEWROUTE, 0x600, k.portid, route_body(A2))
    other = Route(N("192.168.7.0/24"), nexthops=(NextHop(A("10.0.1.1"), "eth1"),))
    assert not stage.kernel_event(rtnl.RTM_NEWROUTE, 0x600, 999, route_body(other, proto=4))


def test_a_foreign_route_appearing_at_our_key_later_is_reported_and_not_fought() -> None:
    """Someone's `ip route replace` puts their route where ours was: reported as a conflict, never written
    over (a create with NLM_F_EXCL, on the key's backoff: no loop); once it goes, ours is back at once. A
    route appended next to ours is reported too, and both are left alone."""
    from ipip import netlink as nl
    from ipip import rtnl
    from tests.unit.fakes import route_body

    k = FakeKernel()
    stage, _ = _converged(k)
    reads = k.reads
    theirs = Route(A2.dst, nexthops=(NextHop(A("10.0.1.1"), "eth1"),))
    k.routes[A2.id] = (theirs, 4)  # replaced ours (proto static)
    assert stage.kernel_event(rtnl.RTM_NEWROUTE, nl.NLM_F_REPLACE, 999, route_body(theirs, proto=4))
    res = run(stage, 10)
    p = res.status["problems"]["10.244.2.0/24"]
    assert p["conflict"] and "another owner's route" in p["error"], p
    assert k.routes[A2.id] == (theirs, 4)  # theirs, untouched
    tries = k.attempts[A2.dst]
    for t in (10.5, 11.5, 12.0, 13.9, 14.5, 17.0):  # backoff 1, 2, 4 s: at most one try per step
        run(stage, t)
    assert k.attempts[A2.dst] - tries <= 3 and k.routes[A2.id] == (theirs, 4)
    del k.routes[A2.id]  # they remove it
    assert stage.kernel_event(rtnl.RTM_DELROUTE, 0, 999, route_body(theirs, proto=4))
    res = run(stage, 17.1)  # not at the next backoff step: now
    assert ours(k)["10.244.2.0/24"] == "10.244.2.0/24 via 10.0.1.12 dev eth1" and res.failures == {}
    # appended next to ours (`ip route append`): reported, both left
    k2 = Route(A2.dst, nexthops=(NextHop(A("10.0.1.7"), "eth1"),))
    assert stage.kernel_event(rtnl.RTM_NEWROUTE, 0xC00, 999, route_body(k2, proto=3))
    res = run(stage, 18)
    p = res.status["problems"]["10.244.2.0/24"]
    assert p["conflict"] and "next to ours" in p["error"] and p["attempts"] == 0, p
    assert res.failures == {} and res.status["conflicts"] == 1
    assert stage.kernel_event(rtnl.RTM_DELROUTE, 0, 999, route_body(k2, proto=3))
    res = run(stage, 19)
    assert res.status["problems"] == {} and k.reads == reads
