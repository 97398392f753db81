"""Agents as route reflectors (mesh off): 2 reflector nodes of one cluster and 4 clients in two racks.

Every client peers with the two reflectors only; every pod reaches every other pod (direct in a rack,
IPIP across, next hops kept: the reflectors are not in the data path); killing one reflector (agent and
its ExaBGP, kill -9) loses no packet at 200 pps between two clients: the other reflector has the routes
too, and the killed one's are kept by graceful restart meanwhile.
"""

from __future__ import annotations

import signal
import time
from itertools import permutations

import pytest

from fabric.bgp_desired import RR_LABEL
from tests.kernel.meshlab import MeshLab, Node, sh, wait_for
from tests.kernel.test_graceful_restart import Ping

pytestmark = pytest.mark.kernel

CLUSTER = "10.0.0.100"
REFLECTORS = ("a1", "b1")


class RrLab(MeshLab):
    def cluster_doc(self) -> dict:
        doc = super().cluster_doc()
        for n in doc["nodes"]:
            if n["name"] in REFLECTORS:
                n["labels"] = {RR_LABEL: CLUSTER}
        return doc


@pytest.fixture(scope="module")
def lab():
    nodes = [Node("a1", "a", 1, "10.0.1.11"), Node("a2", "a", 2, "10.0.1.12"), Node("a3", "a", 3, "10.0.1.13"),
             Node("b1", "b", 4, "10.0.2.21"), Node("b2", "b", 5, "10.0.2.22"), Node("b3", "b", 6, "10.0.2.23")]
    m = RrLab(nodes, hold_time=9, gr_time=60, agent_overrides=lambda n: {"cluster": {"mesh": False}}).build().start()
    try:
        try:
            wait_for(m.converged, 120, "every agent to route every other node's pod CIDR")
        except AssertionError:
            for n in m.nodes:
                print(f"--- {n.name}\n{m.routes(n)}\n{m.log_tail(n)}")
            raise
        yield m
    finally:
        m.close()


def test_clients_peer_with_the_reflectors_only_and_every_pod_reaches_every_pod(lab: MeshLab) -> None:
    for n in lab.nodes:
        want = {m.name for m in lab.nodes if m is not n} if n.name in REFLECTORS else set(REFLECTORS)
        wait_for(lambda n=n, want=want: lab.established(n) == want, 30, f"{n.name}'s sessions")
        assert {p["name"] for p in lab.status(n)["peers"]} == want
    a2, b3 = lab.node("a2"), lab.node("b3")
    routes = lab.routes(a2)
    # next hops kept: a2 routes to b3's pods via b3 itself (IPIP across racks), to a3's directly
    assert f"{b3.pod_cidr} via {b3.address} dev tunl0" in routes, routes
    assert f"{lab.node('a3').pod_cidr} via {lab.node('a3').address} dev eth1" in routes, routes
    st = lab.status(lab.node("a1"))
    assert st["stages"]["bgp"]["reflector"] == {"clusterId": CLUSTER, "clients": 4, "nonClients": 1,
                                                 "reflected": 5}  # the four clients' CIDRs and b1's own
    # the two reflectors are one cluster: what one reflects to the other comes back with our cluster ID
    wait_for(lambda: lab.status(lab.node("a1")).get("peers") and
             next(p for p in lab.status(lab.node("a1"))["peers"] if p["name"] == "b1").get("looped", 0) >= 4, 30,
             "the other reflector's reflections dropped as loops")
    failed = [(s.name, d.name) for s, d in permutations(lab.nodes, 2) if not lab.ping(s, d)]
    assert failed == []


def test_killing_one_reflector_loses_no_packet(lab: MeshLab) -> None:
    a2, b3, a1 = lab.node("a2"), lab.node("b3"), lab.node("a1")
    ping = Ping(lab, a2, b3)
    started = time.monotonic()
    try:
        time.sleep(1)
        for pid in sh(f"ip netns pids {a1.ns}", check=False).stdout.split():  # its agent and its ExaBGP
            sh(f"kill -9 {pid}", check=False)
        a1.proc.wait(10)
        wait_for(lambda: "a1" not in lab.established(a2) and "a1" not in lab.established(b3), 30,
                 "the clients to see a1 gone")
        time.sleep(max(0.0, 10.0 - (time.monotonic() - started)))
    finally:
        sent, received = ping.stop()
    assert sent > 500 and sent == received, f"{sent - received} of {sent} lost"
    assert b3.pod_cidr in lab.routes(a2) and a2.pod_cidr in lab.routes(b3)
    lab.start_agent(a1)  # and it comes back as a reflector
    wait_for(lambda: lab.established(a1) == {n.name for n in lab.nodes if n is not a1}, 60, "a1's sessions back")
