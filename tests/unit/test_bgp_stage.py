"""The BGP stage works per change: a Service or EndpointSlice change recomputes the services it touches
and hands the speaker only the prefixes whose announcement changed. Checked against a full recompute
(the pure functions over the whole Store, as the stage did before) after every step of random sequences
of Service / EndpointSlice / Node / config / BGP changes, and for the work one endpoint change costs."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address as A, IPv4Network as N
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bgp.announce import Announcement
from bgp.events import PeerUp, RoutesAnnounced, RoutesWithdrawn
from bgp.reflect import reflect_all
from bgp.rib import Rib
from fabric import config as cfgmod
from fabric.bgp_desired import (RR_LABEL, desired_announcements, desired_neighbors, local_pod_cidrs, reflector,
                                service_announcements)
from fabric.inputs import NodeInfo
from fabric.stage import StageInput
from fabric.stages.bgp import BgpStage
from fabric.tracker import Store
from tests.unit.fakes import FakeSpeaker

TOR = {"name": "tor", "address": "10.0.1.1", "asn": 65000}
TOR2 = {"name": "tor2", "address": "10.0.1.2", "asn": 65001}


def make_cfg(**extra: Any) -> cfgmod.AgentConfig:
    base: dict[str, Any] = {"node": {"name": "a1", "address": "10.0.1.11/24"}, "pools": [{"cidr": "10.244.0.0/16"}],
                            "source": {"kind": "file", "path": "c.yaml"}}
    base.update(extra)
    return cfgmod.parse(base)


# The configurations a sequence switches between: which ranges are advertised, which external peers
# (none: no /32 at all), an export filter that drops part of the /32s for one peer, communities, mesh.
CONFIGS = [
    make_cfg(peers=[TOR], advertise={"serviceLoadBalancerIPs": ["10.96.100.0/24"],
                                     "serviceExternalIPs": ["192.0.2.0/24"]}),
    make_cfg(peers=[TOR, dict(TOR2, export={"deny": ["10.96.100.0/26"]})],
             advertise={"serviceLoadBalancerIPs": ["10.96.100.0/24"], "communities": ["64512:100"]}),
    make_cfg(advertise={"serviceLoadBalancerIPs": ["10.96.100.0/24"]}),  # no external peer
    make_cfg(peers=[TOR], cluster={"mesh": False},
             advertise={"serviceExternalIPs": ["192.0.2.0/24", "10.96.100.0/25"],
                        "serviceClusterIPs": ["10.96.0.0/24"]}),
    make_cfg(peers=[TOR], node={"name": "a1", "address": "10.0.1.11/24", "routeReflectorClusterId": "10.0.0.1"},
             cluster={"mesh": False}, advertise={"serviceLoadBalancerIPs": ["10.96.100.0/24"]}),
]
# Service IPs shared between services (one /32, several holders), inside and outside the ranges.
IPS = ["10.96.100.1", "10.96.100.2", "10.96.100.70", "10.96.100.200", "192.0.2.7", "198.51.100.1"]
NODE_NAMES = ["a1", "a2", "b1", "c1"]
ADDRESSES = ["10.0.1.11", "10.0.1.12", "10.0.2.21", "10.0.2.22", "10.0.1.1"]  # tor's: it is skipped then
PREFIXES = [N("10.244.7.0/24"), N("10.244.8.0/24"), N("10.96.100.1/32"), N("10.244.1.0/24")]


def service(i: int, etp: str | None, ips: list[str]) -> dict:
    spec: dict[str, Any] = {"externalIPs": ips[1:]}
    if etp is not None:
        spec["externalTrafficPolicy"] = etp
    return {"metadata": {"name": f"s{i}", "namespace": "default"}, "spec": spec,
            "status": {"loadBalancer": {"ingress": [{"ip": ip} for ip in ips[:1]]}}}


def endpoint_slice(j: int, owner: int | None, endpoints: list[tuple[str, bool | None]]) -> dict:
    labels = {} if owner is None else {"kubernetes.io/service-name": f"s{owner}"}
    eps = []
    for node, ready in endpoints:
        ep: dict[str, Any] = {"addresses": ["10.244.9.9"], "nodeName": node}
        if ready is not None:
            ep["conditions"] = {"ready": ready}
        eps.append(ep)
    return {"metadata": {"name": f"e{j}", "namespace": "default", "labels": labels}, "endpoints": eps}


def node(name: str, address: str, pod: int, rr: str | None) -> NodeInfo:
    return NodeInfo(name=name, address=address, podCIDRs=[f"10.244.{pod}.0/24"], labels={RR_LABEL: rr} if rr else {})


STEPS = {
    "svc": st.tuples(st.just("svc"), st.integers(0, 2), st.sampled_from(["Local", "Local", "Local", "Cluster", None]),
                     st.lists(st.sampled_from(IPS), min_size=1, max_size=3, unique=True)),
    "slice": st.tuples(st.just("slice"), st.integers(0, 3), st.sampled_from([0, 1, 2, 2, None]),
                       st.lists(st.tuples(st.sampled_from(["a1", "a1", "a2"]),
                                          st.sampled_from([True, True, False, None])), max_size=2)),
    "svc-del": st.tuples(st.just("svc-del"), st.integers(0, 2)),
    "slice-del": st.tuples(st.just("slice-del"), st.integers(0, 3)),
    "node": st.tuples(st.just("node"), st.sampled_from(NODE_NAMES), st.sampled_from(ADDRESSES), st.integers(1, 3),
                      st.sampled_from([None, None, "10.0.0.1", "10.0.0.2"])),
    "node-del": st.tuples(st.just("node-del"), st.sampled_from(NODE_NAMES[1:])),
    "cfg": st.tuples(st.just("cfg"), st.integers(0, len(CONFIGS) - 1), st.booleans()),
    "bgp": st.tuples(st.just("bgp"), st.sampled_from(NODE_NAMES[1:]),
                     st.lists(st.sampled_from(PREFIXES), min_size=1, max_size=2, unique=True), st.booleans()),
    "resync": st.tuples(st.just("resync")),
}
# Service and EndpointSlice changes weighted up (the state keeps some /32s to move), the rest now and then.
steps = st.sampled_from(["svc"] * 4 + ["slice"] * 6 + ["svc-del", "slice-del", "slice-del"] + ["node", "node"]
                        + ["node-del", "cfg", "bgp", "bgp", "resync"]).flatmap(STEPS.__getitem__)


class FakeAgent:
    """What the stage reads of the agent: the config, the Store, the speaker, the RIB."""

    def __init__(self, cfg: cfgmod.AgentConfig) -> None:
        self.cfg = cfg
        self.store = Store(default_consumer=False)
        self.store.subscribe("bgp", BgpStage.kinds)
        self.speaker = FakeSpeaker(None, None)
        self.rib = Rib()
        self.desired_known = True
        self.neighbors: list = []

    def neighbors_changed(self, neighbors: list) -> None:
        self.neighbors = list(neighbors)


async def run(stage: BgpStage, agent: FakeAgent, full: bool = False) -> None:
    res = await stage.run(StageInput(agent.store.take("bgp"), full, 0.0, True), None)
    assert res.error is None


def full_recompute(stage: BgpStage, agent: FakeAgent) -> dict[N, Announcement]:
    """What the stage computed on every run before it worked per change: everything from the Store."""
    cfg, store = agent.cfg, agent.store
    nodes = store.snapshot("Node")
    neighbors = stage.neighbors
    assert neighbors == desired_neighbors(cfg, nodes, previous=[n.name for n in neighbors])[0]
    anns = desired_announcements(cfg, local_pod_cidrs(cfg, nodes.get(cfg.node.name)), neighbors)
    svc = service_announcements(cfg, store.snapshot("Service"), store.snapshot("EndpointSlice"), neighbors)
    assert stage._svc.anns == svc  # the ServiceAnnouncer equals the whole computation, reasons included
    anns.update(svc)
    desired = {p: Announcement(x.prefix, x.next_hop, x.communities, neighbors=x.neighbors) for p, x in anns.items()}
    rr = reflector(cfg, nodes, neighbors)
    if rr is not None:
        rib = agent.rib
        for p, r in reflect_all(rr, {p: rib.paths(p) for p in rib.prefixes()}).items():
            desired.setdefault(p, r)
    return desired


def apply(step: tuple, stage: BgpStage, agent: FakeAgent) -> bool:
    """One change to the Store / config / RIB; returns whether the run is a full one."""
    store, kind = agent.store, step[0]
    if kind == "svc":
        store.upsert("Service", f"default/s{step[1]}", service(step[1], step[2], step[3]))
    elif kind == "svc-del":
        store.delete("Service", f"default/s{step[1]}")
    elif kind == "slice":
        store.upsert("EndpointSlice", f"default/e{step[1]}", endpoint_slice(step[1], step[2], step[3]))
    elif kind == "slice-del":
        store.delete("EndpointSlice", f"default/e{step[1]}")
    elif kind == "node":
        store.upsert("Node", step[1], node(step[1], step[2], step[3], step[4]))
    elif kind == "node-del":
        store.delete("Node", step[1])
    elif kind == "cfg":
        agent.cfg = CONFIGS[step[1]]
        return step[2]  # the agent wakes a full run on a config change; the stage must not need it
    elif kind == "bgp":
        peer, prefixes, announce = step[1], tuple(step[2]), step[3]
        n = store.get("Node", peer)
        address = n.address if n is not None else A("10.0.9.9")
        if agent.rib.apply(PeerUp(peer, address, 60, address), 0.0):
            stage.mark_all()  # as the agent does when an event moves a peer's whole set
        agent.rib.apply(RoutesAnnounced(peer, address, prefixes) if announce else RoutesWithdrawn(peer, prefixes), 0.0)
        stage.mark_dirty(prefixes)
    elif kind == "resync":
        return True
    return False


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(CONFIGS) - 1), st.lists(steps, min_size=5, max_size=40))
def test_per_change_equals_a_full_recompute_after_every_step(first: int, sequence: list[tuple]) -> None:
    agent = FakeAgent(CONFIGS[first])
    agent.store.upsert("Node", "a1", node("a1", "10.0.1.11", 1, None))
    agent.store.upsert("Node", "a2", node("a2", "10.0.1.12", 2, None))
    for i, ips in enumerate([IPS[0:2], IPS[1:3], IPS[3:5]]):  # a start with /32s (two services share one)
        agent.store.upsert("Service", f"default/s{i}", service(i, "Local", ips))
        agent.store.upsert("EndpointSlice", f"default/e{i}", endpoint_slice(i, i, [("a1", True)]))
    stage = BgpStage(agent)

    async def main() -> None:
        await run(stage, agent, full=True)
        assert agent.speaker.announced == full_recompute(stage, agent)
        for step in sequence:
            full = apply(step, stage, agent)
            await run(stage, agent, full=full)
            assert agent.speaker.neighbors == stage.neighbors
            assert agent.speaker.announced == full_recompute(stage, agent), step

    asyncio.run(main())


def many_services(agent: FakeAgent, n: int) -> None:
    """n ETP=Local LoadBalancer services, half with a ready endpoint on this node."""
    for i in range(n):
        ip = f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"
        agent.store.upsert("Service", f"default/s{i}", {"metadata": {"name": f"s{i}", "namespace": "default"},
                                                       "spec": {"externalTrafficPolicy": "Local"},
                                                       "status": {"loadBalancer": {"ingress": [{"ip": ip}]}}})
        agent.store.upsert("EndpointSlice", f"default/e{i}", endpoint_slice(i, i, [("a1" if i % 2 else "a2", True)]))


def test_one_endpoint_change_hands_the_speaker_one_prefix_and_reads_no_snapshot() -> None:
    agent = FakeAgent(make_cfg(peers=[TOR], advertise={"serviceLoadBalancerIPs": ["10.96.0.0/12"]}))
    agent.store.upsert("Node", "a1", node("a1", "10.0.1.11", 1, None))
    many_services(agent, 1000)
    stage = BgpStage(agent)
    snapshots: list[str] = []
    real = agent.store.snapshot
    agent.store.snapshot = lambda kind: snapshots.append(kind) or real(kind)  # type: ignore[method-assign]

    async def main() -> None:
        sp = agent.speaker
        await run(stage, agent, full=True)
        assert sp.calls == [("set", 502)]  # 500 /32s, the pod CIDR, the advertised range
        snapshots.clear()
        # the endpoint of s2 (on a2) moves to this node: s2's /32 comes, nothing else is looked at
        agent.store.upsert("EndpointSlice", "default/e2", endpoint_slice(2, 2, [("a1", True)]))
        await run(stage, agent)
        assert sp.calls[-1] == ("update", 1) and N("10.96.0.2/32") in sp.announced
        # it goes not ready: withdrawn
        agent.store.upsert("EndpointSlice", "default/e2", endpoint_slice(2, 2, [("a1", False)]))
        await run(stage, agent)
        assert sp.calls[-1] == ("update", 1) and N("10.96.0.2/32") not in sp.announced
        # a change that moves no /32 (another endpoint of s1, already announced): nothing handed over
        agent.store.upsert("EndpointSlice", "default/e1", endpoint_slice(1, 1, [("a1", True), ("a2", True)]))
        await run(stage, agent)
        assert sp.calls[-1] == ("update", 0)
        # a slice that changes service (s3 -> s4): both services recomputed: s3 has no local endpoint
        # left (its /32 goes), s4 has one now (its /32 comes)
        agent.store.upsert("EndpointSlice", "default/e3", endpoint_slice(3, 4, [("a1", True)]))
        await run(stage, agent)
        assert sp.calls[-1] == ("update", 2)
        assert N("10.96.0.3/32") not in sp.announced and N("10.96.0.4/32") in sp.announced
        assert snapshots == []  # neither Services nor EndpointSlices (nor Nodes) were read in full
        assert sp.announced == full_recompute(stage, agent)

    asyncio.run(main())


def test_end_of_rib_waits_for_the_desired_state_on_a_per_change_run() -> None:
    agent = FakeAgent(make_cfg(peers=[TOR], advertise={"serviceLoadBalancerIPs": ["10.96.0.0/12"]}))
    agent.store.upsert("Node", "a1", node("a1", "10.0.1.11", 1, None))
    many_services(agent, 4)
    agent.desired_known = False
    stage = BgpStage(agent)

    async def main() -> None:
        sp = agent.speaker
        await run(stage, agent, full=True)
        agent.store.upsert("EndpointSlice", "default/e2", endpoint_slice(2, 2, [("a1", True)]))
        await run(stage, agent)
        assert sp.calls[-1][0] == "update" and not sp.final  # not known yet: no End-of-RIB
        agent.desired_known = True  # the config source completed: the agent wakes the stage, nothing changed
        await run(stage, agent)
        assert sp.calls[-1] == ("update", 0) and sp.final
        assert sp.final_with == full_recompute(stage, agent)

    asyncio.run(main())


def test_a_failed_run_is_followed_by_a_whole_one() -> None:
    """The speaker refusing a per-change update (the runner puts the Store changes back and calls restore):
    the next run recomputes everything and hands the speaker the whole set, so nothing stays behind."""
    agent = FakeAgent(make_cfg(peers=[TOR], advertise={"serviceLoadBalancerIPs": ["10.96.0.0/12"]}))
    agent.store.upsert("Node", "a1", node("a1", "10.0.1.11", 1, None))
    many_services(agent, 4)
    stage = BgpStage(agent)

    async def boom(changes: dict, *, final: bool = True) -> None:
        raise ConnectionError("speaker gone")

    async def main() -> None:
        sp = agent.speaker
        await run(stage, agent, full=True)
        agent.store.upsert("EndpointSlice", "default/e2", endpoint_slice(2, 2, [("a1", True)]))
        real, sp.update_announcements = sp.update_announcements, boom  # type: ignore[method-assign]
        inp = StageInput(agent.store.take("bgp"), False, 0.0, True)
        try:
            await stage.run(inp, None)
            raise AssertionError("the run should have failed")
        except ConnectionError:
            agent.store.restore(inp.changes, "bgp")
            stage.restore(inp, None)
        sp.update_announcements = real  # type: ignore[method-assign]
        assert N("10.96.0.2/32") not in sp.announced
        await run(stage, agent)
        assert sp.calls[-1][0] == "set" and N("10.96.0.2/32") in sp.announced
        assert sp.announced == full_recompute(stage, agent)

    asyncio.run(main())
