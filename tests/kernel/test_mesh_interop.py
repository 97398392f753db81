"""Interop: a mesh member is BIRD 2 or FRR, configured like a Calico node; routes flow both ways."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from fabric.lab import frr as lab_frr
from fabric.lab.kinds import FrrSpec
from fabric.lab.procs import Processes
from tests.kernel.meshlab import MeshLab, Node, sh, wait_for

pytestmark = pytest.mark.kernel

BIRD_CONF = """
router id 10.0.1.12;
protocol device {{ }}
protocol direct {{ ipv4; interface -"cali*", "*"; }}
protocol static static_pod {{ ipv4; route 10.244.2.0/24 blackhole; }}
protocol kernel {{
  ipv4 {{ import none; export filter {{ if proto = "static_pod" then reject; accept; }}; }};
  merge paths on;
  graceful restart;
}}
template bgp mesh {{
  local 10.0.1.12 as 64512;
  graceful restart;
  ipv4 {{ import all; export filter {{ if net ~ 10.244.0.0/16 then accept; reject; }}; next hop self; }};
}}
{neighbors}
"""

FRR_CONF = """frr defaults datacenter
hostname a2
ip route 10.244.2.0/24 blackhole
ip nht resolve-via-default
router bgp 64512
 bgp router-id 10.0.1.12
 no bgp ebgp-requires-policy
 bgp graceful-restart
{neighbors}
 address-family ipv4 unicast
  network 10.244.2.0/24
 exit-address-family
"""


def _lab() -> MeshLab:
    nodes = [Node("a1", "a", 1, "10.0.1.11"), Node("a2", "a", 2, "10.0.1.12", kind="other"),
             Node("b1", "b", 3, "10.0.2.21")]
    return MeshLab(nodes, hold_time=9, gr_time=60)


def _agents_route_to_a2(lab: MeshLab) -> bool:
    return ("10.244.2.0/24 via 10.0.1.12 dev eth1" in lab.routes(lab.node("a1"))
            and "10.244.2.0/24 via 10.0.1.12 dev tunl0" in lab.routes(lab.node("b1")))


def _check_common(lab: MeshLab, diag) -> None:
    a1, a2 = lab.node("a1"), lab.node("a2")
    wait_for(lambda: _agents_route_to_a2(lab), 60, "agents to install a2's pod CIDR")
    for n in (a1, lab.node("b1")):
        wait_for(lambda n=n: "a2" in lab.established(n), 30, f"{n.name} session to a2")
    # a2 put the agent's route into its own kernel (same subnet: direct)
    try:
        wait_for(lambda: re.search(r"^10\.244\.1\.0/24 (nhid \d+ )?via 10\.0\.1\.11 dev eth1",
                                   sh(f"ip -n {a2.ns} route").stdout, re.M) is not None, 30,
                 "a2's daemon to install a1's pod CIDR")
    except AssertionError as e:
        raise AssertionError(f"{e}\nkernel of a2:\n{sh(f'ip -n {a2.ns} route').stdout}\n{diag()}") from None
    assert lab.ping(a1, a2, count=2) and lab.ping(a2, a1, count=2)


def test_bird2_as_mesh_member() -> None:
    lab = _lab().build()
    bird = None
    try:
        a2 = lab.node("a2")
        neighbors = "\n".join(f"protocol bgp {n.name} from mesh {{ neighbor {n.address} as 64512; }}"
                              for n in lab.nodes if n.name != "a2")
        conf = lab.workdir / "bird.conf"
        conf.write_text(BIRD_CONF.format(neighbors=neighbors))
        sock = lab.workdir / "bird.ctl"
        bird = subprocess.Popen(["ip", "netns", "exec", a2.ns, "bird", "-f", "-c", str(conf), "-s", str(sock)],
                                stdout=subprocess.DEVNULL, stderr=open(lab.workdir / "bird.log", "wb"))
        lab.extra_procs.append(bird)
        lab.start()
        _check_common(lab, lambda: subprocess.run(["birdc", "-s", str(sock), "show", "route", "all"],
                                                  capture_output=True, text=True).stdout)

        def bird_has(prefix: str, proto: str) -> bool:
            out = subprocess.run(["birdc", "-s", str(sock), "show", "route", "for", prefix], capture_output=True,
                                 text=True).stdout
            return prefix in out and f"[{proto} " in out
        wait_for(lambda: bird_has("10.244.1.0/24", "a1") and bird_has("10.244.3.0/24", "b1"), 30,
                 "BIRD to learn both agents")
        protos = subprocess.run(["birdc", "-s", str(sock), "show", "protocols"], capture_output=True, text=True).stdout
        assert sum(1 for line in protos.splitlines() if " BGP " in line and "Established" in line) == 2, protos
    finally:
        lab.close()


def test_frr_as_mesh_member() -> None:
    lab = _lab().build()
    procs = Processes()
    a2 = lab.node("a2")
    try:
        neighbors = "\n".join(f" neighbor {n.address} remote-as 64512" for n in lab.nodes if n.name != "a2")
        conf = lab.workdir / "frr.conf"
        conf.write_text(FRR_CONF.format(neighbors=neighbors))
        spec = FrrSpec(config=conf, daemons=("bgpd", "staticd"), profile="datacenter")
        names = lab_frr.start(procs, "a2", a2.ns, spec, lab.workdir, None)
        lab_frr.wait_ready(a2.ns, names, time.monotonic() + 30, lambda: True)
        lab_frr.load_config("a2", a2.ns, conf, lab.workdir / "vtysh.log")
        lab.start()
        _check_common(lab, lambda: lab_frr.show_json(a2.ns, "show bgp ipv4 unicast") +
                      lab_frr.show_json(a2.ns, "show ip route"))
        summary = json.loads(lab_frr.show_json(a2.ns, "show bgp ipv4 unicast summary json"))
        peers = summary["peers"]
        assert {p: v["state"] for p, v in peers.items()} == {"10.0.1.11": "Established", "10.0.2.21": "Established"}
        rib = json.loads(lab_frr.show_json(a2.ns, "show bgp ipv4 unicast json"))["routes"]
        assert "10.244.1.0/24" in rib and "10.244.3.0/24" in rib
    finally:
        procs.stop_all()
        lab.close()
        lab_frr.cleanup(a2.ns)
