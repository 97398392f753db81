"""Peering with a top-of-rack route reflector instead of the node mesh: iBGP to an FRR RR, next hops
kept by the RR (so cross-rack routes still go through IPIP), and an import filter on the ToR session."""

from __future__ import annotations

import json
import time

import pytest

from fabric.lab import frr as lab_frr
from fabric.lab.kinds import FrrSpec
from fabric.lab.procs import Processes
from tests.kernel.meshlab import MeshLab, Node, wait_for

pytestmark = pytest.mark.kernel

RR_CONF = """frr defaults traditional
hostname rr
ip route 10.0.9.0/24 blackhole
ip route 10.99.0.0/24 blackhole
router bgp 64512
 bgp router-id 10.0.1.1
 bgp cluster-id 10.0.1.1
 neighbor nodes peer-group
 neighbor nodes remote-as internal
 neighbor nodes timers 3 9
 neighbor nodes timers connect 1
 neighbor 10.0.1.11 peer-group nodes
 neighbor 10.0.1.12 peer-group nodes
 neighbor 10.0.2.21 peer-group nodes
 address-family ipv4 unicast
  network 10.0.9.0/24
  network 10.99.0.0/24
  neighbor nodes route-reflector-client
 exit-address-family
"""


def overrides(n: Node) -> dict:
    rr = "10.0.1.1" if n.rack == "a" else "10.0.2.1"
    return {"cluster": {"mesh": False},
            "peers": [{"name": "rr", "address": rr, "asn": 64512, "import": {"allow": ["10.0.9.0/24"]}}]}


def test_route_reflector_keeps_next_hops_and_import_filter_applies() -> None:
    nodes = [Node("a1", "a", 1, "10.0.1.11"), Node("a2", "a", 2, "10.0.1.12"), Node("b1", "b", 3, "10.0.2.21")]
    lab = MeshLab(nodes, agent_overrides=overrides).build()
    procs = Processes()
    try:
        conf = lab.workdir / "rr.conf"
        conf.write_text(RR_CONF)
        names = lab_frr.start(procs, "rr", lab.router, FrrSpec(config=conf, daemons=("bgpd", "staticd")),
                              lab.workdir, None)
        lab_frr.wait_ready(lab.router, names, time.monotonic() + 30, lambda: True)
        lab_frr.load_config("rr", lab.router, conf, lab.workdir / "vtysh.log")
        lab.start()
        a1, a2, b1 = nodes
        wait_for(lab.converged, 90, "routes reflected to every agent")
        # only the RR is a neighbor: the mesh is off
        assert {p["name"] for p in lab.status(a1)["peers"]} == {"rr"}
        # the RR keeps the original next hop: same rack direct, other rack through IPIP
        assert "10.244.2.0/24 via 10.0.1.12 dev eth1" in lab.routes(a1)
        assert "10.244.3.0/24 via 10.0.2.21 dev tunl0" in lab.routes(a1)
        assert lab.ping(a1, b1) and lab.ping(b1, a2)
        # import filter on the ToR session: 10.0.9.0/24 allowed, 10.99.0.0/24 rejected and reported
        wait_for(lambda: "10.0.9.0/24 via 10.0.1.1 dev eth1" in lab.routes(a1), 20, "the allowed ToR prefix")
        assert "10.99.0.0/24" not in lab.routes(a1)
        wait_for(lambda: any("10.99.0.0/24" in w and "not inside an allowed prefix" in w  # status: <= 1 s behind
                             for w in lab.status(a1).get("warnings", [])), 5, "the rejection in the status")
        # the RR sees every node's pod CIDR (FRR's JSON)
        rib = json.loads(lab_frr.show_json(lab.router, "show bgp ipv4 unicast json"))["routes"]
        assert {"10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24"} <= set(rib)
    finally:
        procs.stop_all()
        lab.close()
        lab_frr.cleanup(lab.router)
