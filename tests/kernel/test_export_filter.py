"""Export filters proven on a real ToR's RIB (FRR): what a peer's `export` filter denies is never announced
to it — not once (FRR logs every UPDATE it receives) — while an unfiltered node announces the same kind of
prefixes to the same ToR, and a filter changed at runtime (a BGPPeer object) withdraws and announces
without resetting the session."""

from __future__ import annotations

import json
import re
import time

import pytest
import yaml

from fabric.lab import frr as lab_frr
from fabric.lab.kinds import FrrSpec
from fabric.lab.procs import Processes
from tests.kernel.meshlab import MeshLab, Node, sh, wait_for

pytestmark = pytest.mark.kernel

TOR_CONF = """hostname tor
debug bgp updates in
router bgp 65000
 bgp router-id 10.0.1.1
 no bgp ebgp-requires-policy
 neighbor 10.0.1.11 remote-as 64512
 neighbor 10.0.1.12 remote-as 64512
 neighbor 10.0.1.11 timers 3 9
 neighbor 10.0.1.12 timers 3 9
 neighbor 10.0.1.11 timers connect 1
 neighbor 10.0.1.12 timers connect 1
 neighbor 10.0.1.12 update-source 10.0.1.2
"""

A1, A2 = "10.0.1.11", "10.0.1.12"
SERVICES = ["10.96.0.0/24", "10.96.1.0/24"]


class ExportLab(MeshLab):
    """a1 peers with the ToR through BGPPeer `tor-f` (an export filter), a2 through `tor-o` (none). The
    ToR has a second address for a2's session: two BGPPeer objects may not share a peerIP."""

    export: dict = {"allow": ["10.96.0.0/16"], "deny": ["10.96.1.0/24"]}

    def cluster_doc(self) -> dict:
        doc = super().cluster_doc()
        for n in doc["nodes"]:
            n["labels"] = {"export": "filtered" if n["name"] == "a1" else "open"}
        doc["bgpPeers"] = [
            {"metadata": {"name": "tor-f"}, "spec": {"peerIP": "10.0.1.1", "asNumber": 65000,
                                                      "nodeSelector": "export == 'filtered'", "export": self.export}},
            {"metadata": {"name": "tor-o"}, "spec": {"peerIP": "10.0.1.2", "asNumber": 65000,
                                                      "nodeSelector": "export == 'open'"}},
        ]
        return doc


def tor_rib(lab: MeshLab) -> dict[str, set[str]]:
    """Prefixes in the ToR's BGP table, by the peer that sent them."""
    routes = json.loads(lab_frr.show_json(lab.router, "show bgp ipv4 unicast json")).get("routes", {})
    out: dict[str, set[str]] = {}
    for prefix, paths in routes.items():
        for p in paths:
            out.setdefault(p.get("peerId", "?"), set()).add(prefix)
    return out


def established_count(lab: MeshLab, peer: str) -> int:
    data = json.loads(lab_frr.show_json(lab.router, f"show bgp neighbors {peer} json"))
    return int(data[peer].get("connectionsEstablished", 0))


def received_from(log_text: str, peer: str) -> set[str]:
    """Every prefix FRR logged as received from `peer` (`debug bgp updates in`), over the whole run."""
    return set(re.findall(rf"{re.escape(peer)}\S* rcvd (\d+\.\d+\.\d+\.\d+/\d+)", log_text))


def test_export_filter_denied_prefixes_never_reach_the_tor() -> None:
    nodes = [Node("a1", "a", 1, A1), Node("a2", "a", 2, A2)]
    lab = ExportLab(nodes, agent_overrides=lambda n: {"advertise": {"serviceClusterIPs": SERVICES}}).build()
    sh(f"ip -n {lab.router} addr add 10.0.1.2/24 dev br-a")
    procs = Processes()
    try:
        conf = lab.workdir / "tor.conf"
        conf.write_text(TOR_CONF)
        names = lab_frr.start(procs, "tor", lab.router, FrrSpec(config=conf, daemons=("bgpd", "staticd")),
                              lab.workdir, None)
        lab_frr.wait_ready(lab.router, names, time.monotonic() + 30, lambda: True)
        lab_frr.load_config("tor", lab.router, conf, lab.workdir / "vtysh.log")
        lab.start()
        a1, a2 = nodes
        # the unfiltered node announces its pod CIDR and both service ranges: the ToR takes them all
        open_set = {"10.244.2.0/24", *SERVICES}
        try:
            wait_for(lambda: tor_rib(lab).get(A2, set()) == open_set and A1 in tor_rib(lab), 90,
                     f"the ToR's RIB to hold {open_set} from a2 and a route from a1")
        except AssertionError as e:
            summary = lab_frr.show_json(lab.router, "show bgp summary json")
            raise AssertionError(f"{e}\nrib: {tor_rib(lab)}\n{summary}\na1: {lab.status(a1)}\n{lab.log_tail(a1)}"
                                 f"\na2: {lab.status(a2)}") from None
        time.sleep(3)  # a1's session is up and announced: give a wrongly sent prefix time to show
        assert tor_rib(lab)[A1] == {"10.96.0.0/24"}, tor_rib(lab)
        # the mesh is not filtered: a2 still routes to a1's pods
        assert "10.244.1.0/24 via 10.0.1.11" in lab.routes(a2)
        log = lab.workdir / "tor.bgpd.log"
        assert received_from(log.read_text(errors="replace"), A2) >= open_set  # the log sees what arrives
        assert received_from(log.read_text(errors="replace"), A1) == {"10.96.0.0/24"}
        sessions = established_count(lab, A1)

        # runtime change: a1's filter now passes pod CIDRs only — 10.96.0.0/24 is withdrawn, the pod CIDR sent
        lab.export = {"allow": ["10.244.0.0/16"]}
        lab.write_cluster()
        wait_for(lambda: tor_rib(lab).get(A1) == {"10.244.1.0/24"}, 30, "a1's announcements to follow the new filter")
        assert established_count(lab, A1) == sessions, "a filter change must not reset the session"
        assert received_from(log.read_text(errors="replace"), A1) == {"10.96.0.0/24", "10.244.1.0/24"}
        assert not [w for w in lab.status(a1).get("warnings", []) if "export" in w]  # a filter is not a problem
        assert tor_rib(lab)[A2] == open_set
    finally:
        procs.stop_all()
        lab.close()
        lab_frr.cleanup(lab.router)
