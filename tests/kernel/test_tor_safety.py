"""A top-of-rack router (real FRR) offering what a node must never take on faith (findings 1, 9 and the
refused-route acceptance), with real traffic between pods throughout:

- 0.0.0.0/0 and the node's own subnet, with a permissive import filter (allow 0.0.0.0/0): the node's own
  default and connected routes are untouched before, during and after the announcement and its
  withdrawal; the default (opted in) sits behind the node's own at the external metric; the subnet is
  refused. A bridge-style CNI's connected route over the node's pod CIDR is not replaced by our blackhole.
- next hops: one off-subnet (single-hop eBGP: unusable, never resolved through the default route), one
  third-party on the subnet (used), one the kernel refuses (the subnet's broadcast address): retried
  alone with backoff, the agent idle meanwhile, status naming the route.
- our own routes coming back: the node's service range sent back by the ToR, and a route whose AS_PATH
  holds our ASN (the ToR prepends it: RFC 4271 9.1.2 loop detection, which ExaBGP does not do): neither
  is installed, both are reported with their reason.
- the kernel taking our routes: a link flap, `ip route del`, another owner's route replacing ours later
  (kernel_takes_our_routes_and_we_notice).
"""

from __future__ import annotations

import json
import os
import time

import pytest

from fabric.lab import frr as lab_frr
from fabric.lab.kinds import FrrSpec
from fabric.lab.procs import Processes
from tests.kernel.meshlab import MeshLab, Node, sh, wait_for
from tests.kernel.test_graceful_restart import Ping

pytestmark = pytest.mark.kernel

TOR_CONF = """frr defaults traditional
hostname tor
ip prefix-list OFFNET seq 5 permit 10.0.8.0/24
ip prefix-list THIRD seq 5 permit 10.0.6.0/24
ip prefix-list BCAST seq 5 permit 10.0.5.0/24
ip prefix-list LOOP seq 5 permit 10.0.4.0/24
route-map OUT permit 10
 match ip address prefix-list OFFNET
 set ip next-hop 10.0.7.1
route-map OUT permit 20
 match ip address prefix-list THIRD
 set ip next-hop 10.0.1.5
route-map OUT permit 30
 match ip address prefix-list BCAST
 set ip next-hop 10.0.1.255
route-map OUT permit 35
 match ip address prefix-list LOOP
 set as-path prepend 64512
route-map OUT permit 40
router bgp 65000
 bgp router-id 10.0.1.1
 no bgp ebgp-requires-policy
 no bgp network import-check
 neighbor 10.0.1.11 remote-as 64512
 neighbor 10.0.1.11 timers 3 9
 neighbor 10.0.1.11 timers connect 1
 address-family ipv4 unicast
  network 0.0.0.0/0
  network 10.0.1.0/24
  network 10.0.9.0/24
  network 10.0.8.0/24
  network 10.0.6.0/24
  network 10.0.5.0/24
  network 10.0.4.0/24
  network 10.96.0.0/24
  neighbor 10.0.1.11 route-map OUT out
 exit-address-family
"""


def overrides(n: Node) -> dict:
    if n.name != "a1":
        return {}
    return {"peers": [{"name": "tor", "address": "10.0.1.1", "asn": 65000,
                       "import": {"allow": ["0.0.0.0/0"], "allowDefaultRoute": True}}],
            "advertise": {"serviceClusterIPs": ["10.96.0.0/24"]},
            # no periodic full resync during the test: repairs must come from the kernel's events
            "timers": {"holdTime": 9, "gracefulRestartTime": 60, "resyncInterval": 3600}}


def node_routes(lab: MeshLab, n: Node) -> set[str]:
    """Every route of the main table that is not ours, as `ip route` prints it."""
    return {line.strip() for line in sh(f"ip -n {n.ns} route show").stdout.splitlines() if " proto 80" not in line}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def agent_pid(lab: MeshLab, n: Node) -> int:
    """The agent process itself (`ip netns exec` execs it, so it is the Popen's pid)."""
    assert n.proc is not None
    return n.proc.pid


def reads(lab: MeshLab, n: Node) -> int:
    return lab.status(n)["stages"]["routes"]["reads"]


def kernel_takes_our_routes_and_we_notice(lab: MeshLab, a1: Node, a2: Node) -> None:
    """The kernel (or someone) removing our routes is noticed from rtnetlink events and repaired per key at
    once — no kernel read, no full resync (none is due: timers.resyncInterval is an hour here):
    - eth1 down for 3 s, then up: the kernel drops every route through eth1 without an RTM_DELROUTE; the
      link event says which; they are written again as soon as eth1 is up, and pod traffic resumes;
    - `ip route del` of one of ours: back at once;
    - another owner's route replacing ours later: reported as a conflict, never written over (its key on
      backoff, no loop); when it goes, ours is back at once."""
    pod_route = f"{a2.pod_cidr} via 10.0.1.12 dev eth1 proto 80"
    tor_route = "10.0.9.0/24 via 10.0.1.1 dev eth1 proto 80 metric 4096"
    wait_for(lambda: pod_route in lab.routes(a1) and tor_route in lab.routes(a1), 10, "a1 converged")
    before = reads(lab, a1)
    sh(f"ip -n {a1.ns} link set eth1 down")
    time.sleep(0.5)
    assert pod_route not in lab.routes(a1) and tor_route not in lab.routes(a1)  # the kernel took them
    time.sleep(2.5)  # past the first backoff steps of the refused writes (1, 2 s)
    sh(f"ip -n {a1.ns} link set eth1 up")
    t_up = time.monotonic()
    took = wait_for(lambda: pod_route in lab.routes(a1) and tor_route in lab.routes(a1), 2.0,
                    "our routes through eth1 back once it is up", step=0.05)
    print(f"routes back {took:.2f}s after eth1 came up")
    sh(f"ip -n {a1.ns} route replace default via 10.0.1.1")  # the node's own default (networkd's job)
    assert lab.ping(a1, a2, count=3), "pod traffic across the flap"
    # someone deletes one of ours
    sh(f"ip -n {a1.ns} route del {a2.pod_cidr} proto 80")
    wait_for(lambda: pod_route in lab.routes(a1), 2.0, "our deleted route back", step=0.05)
    # another owner's route replaces ours, later
    sh(f"ip -n {a1.ns} route replace {a2.pod_cidr} via 10.0.1.1 proto static")
    wait_for(lambda: lab.status(a1)["stages"]["routes"]["problems"].get(a2.pod_cidr, {}).get("conflict"), 5,
             "the conflict in the status")
    time.sleep(4)
    p = lab.status(a1)["stages"]["routes"]["problems"][a2.pod_cidr]
    assert "another owner's route" in p["error"] and p["attempts"] <= 3, p  # backoff 1, 2 s: no loop
    assert f"{a2.pod_cidr} via 10.0.1.1 dev eth1 proto static" in sh(f"ip -n {a1.ns} route show").stdout
    sh(f"ip -n {a1.ns} route del {a2.pod_cidr} proto static")
    wait_for(lambda: pod_route in lab.routes(a1), 2.0, "ours back once the other route is gone", step=0.05)
    assert lab.ping(a1, a2, count=2)
    assert reads(lab, a1) == before, "a full kernel read (resync) instead of per-key repair"
    assert lab.status(a1)["stages"]["routes"]["repairs"] >= 4


def test_tor_cannot_take_over_the_nodes_routing_and_next_hops_are_checked() -> None:
    nodes = [Node("a1", "a", 1, "10.0.1.11"), Node("a2", "a", 2, "10.0.1.12")]
    lab = MeshLab(nodes, agent_overrides=overrides).build()
    procs = Processes()
    a1, a2 = nodes
    try:
        # a bridge CNI's route over a1's whole pod CIDR (the pod itself keeps its /32)
        sh(f"ip -n {a1.ns} link add cni0 type bridge; ip -n {a1.ns} link set cni0 up;"
           f"ip -n {a1.ns} route add {a1.pod_cidr} dev cni0 proto kernel scope link")
        own = node_routes(lab, a1)
        assert any(r.startswith("default via 10.0.1.1") for r in own) and \
            any(r.startswith("10.0.1.0/24 dev eth1 proto kernel") for r in own), own
        lab.start()
        wait_for(lambda: lab.converged() or a2.pod_cidr in lab.routes(a1), 90, "a1 to route a2's pods")
        wait_for(lambda: f"blackhole {a2.pod_cidr}" in lab.routes(a2) and a1.pod_cidr in lab.routes(a2), 60,
                 "a2 to route a1's pods")
        ping = Ping(lab, a1, a2)
        try:
            conf = lab.workdir / "tor.conf"
            conf.write_text(TOR_CONF)
            names = lab_frr.start(procs, "tor", lab.router, FrrSpec(config=conf, daemons=("bgpd",)), lab.workdir,
                                  None)
            lab_frr.wait_ready(lab.router, names, time.monotonic() + 30, lambda: True)
            lab_frr.load_config("tor", lab.router, conf, lab.workdir / "vtysh.log")
            wait_for(lambda: "tor" in lab.established(a1), 60, "a1's session to the ToR")
            wait_for(lambda: "10.0.9.0/24 via 10.0.1.1 dev eth1 proto 80 metric 4096" in lab.routes(a1), 30,
                     "the ToR's 10.0.9.0/24 behind the node's routes")
            routes = lab.routes(a1)
            assert "default via 10.0.1.1 dev eth1 proto 80 metric 4096" in routes  # opted in: behind the node's
            assert "10.0.6.0/24 via 10.0.1.5 dev eth1 proto 80 metric 4096" in routes  # third party, connected
            assert "10.0.8.0/24" not in routes  # off-subnet next hop of a single-hop eBGP peer: unusable
            assert "10.0.1.0/24 via" not in routes  # the node's subnet: refused
            # our own prefixes back: our service range, and a route with our ASN in its AS_PATH (a loop)
            wait_for(lambda: {"10.0.4.0/24", "10.96.0.0/24"} <= set(lab.status(a1).get("learned", {})), 10,
                     "a1 to learn 10.0.4.0/24 and 10.96.0.0/24 from the ToR")
            learned = lab.status(a1)["learned"]
            assert ["tor", "10.0.1.1", [65000, 64512]] in learned["10.0.4.0/24"], learned.get("10.0.4.0/24")
            assert ["tor", "10.0.1.1", [65000]] in learned["10.96.0.0/24"], learned.get("10.96.0.0/24")
            assert "10.0.4.0/24" not in routes and "10.96.0.0/24" not in routes, routes
            assert node_routes(lab, a1) == own, "the node's own routes changed"
            # the status file follows the stages within a second
            def reported() -> bool:
                st = lab.status(a1)
                text = "\n".join(st.get("warnings", []))
                codes = {c for _, c, _ in st.get("stages", {}).get("routes", {}).get("rejectedAll", {}).get("tor", [])}
                return ("inside the node's own subnet" in text and "10.0.8.0/24 from tor: next hop" in text
                        and {"as-path-loop", "own-prefix"} <= codes)

            wait_for(reported, 10, "the status to report every refusal (the routes stage's run follows the RIB)")
            st = lab.status(a1)
            warnings = "\n".join(st["warnings"])
            assert "10.0.1.0/24" in warnings and "inside the node's own subnet" in warnings, warnings
            assert "10.0.8.0/24 from tor: next hop 10.0.7.1 is not on a connected network" in warnings, warnings
            rejected = {p: (code, why) for p, code, why in st["stages"]["routes"]["rejectedAll"]["tor"]}
            assert rejected["10.0.4.0/24"][0] == "as-path-loop", rejected
            assert rejected["10.0.4.0/24"][1].startswith("AS_PATH 65000 64512 holds our AS 64512: a loop"), rejected
            assert rejected["10.96.0.0/24"][0] == "own-prefix", rejected
            problems = st["stages"]["routes"]["problems"]
            assert problems[a1.pod_cidr]["conflict"] is True, problems  # the CNI's route, not replaced
            # the route the kernel refuses (gateway = the subnet's broadcast address): named, retried alone
            wait_for(lambda: "10.0.5.0/24 metric 4096" in lab.status(a1)["stages"]["routes"]["problems"], 10,
                     "status to name the refused route")
            p = lab.status(a1)["stages"]["routes"]["problems"]["10.0.5.0/24 metric 4096"]
            assert not p["conflict"] and "Invalid argument" in p["error"], p
            t0, n0 = time.monotonic(), p["attempts"]
            cpu0 = cpu_seconds(agent_pid(lab, a1))
            time.sleep(12)
            cpu1 = cpu_seconds(agent_pid(lab, a1))
            n1 = lab.status(a1)["stages"]["routes"]["problems"]["10.0.5.0/24 metric 4096"]["attempts"]
            # backoff 1, 2, 4, 8, 16 s ...: 12 s later at most 3 more attempts (one per step), CPU idle
            assert n1 - n0 <= 3, (n0, n1)
            assert (cpu1 - cpu0) / (time.monotonic() - t0) < 0.05, (cpu1 - cpu0)
            # the ToR withdraws the default route and the subnet
            sh(f"vtysh -N {lab.router} -c 'conf t' -c 'router bgp 65000' -c 'address-family ipv4 unicast' "
               "-c 'no network 0.0.0.0/0' -c 'no network 10.0.1.0/24'")
            wait_for(lambda: "default via 10.0.1.1 dev eth1 proto 80" not in lab.routes(a1), 30,
                     "our copy of the ToR's default route to go")
            assert node_routes(lab, a1) == own, "the node's own routes changed after the withdrawal"
            assert "10.0.9.0/24 via 10.0.1.1" in lab.routes(a1)
        finally:
            sent, received = ping.stop()
        assert sent > 200 and sent == received, f"{sent - received} of {sent} lost between pods\n{lab.log_tail(a1)}"
        rib = json.loads(lab_frr.show_json(lab.router, "show bgp ipv4 unicast json"))["routes"]
        assert a1.pod_cidr in rib  # and the ToR has the node's pod CIDR
        kernel_takes_our_routes_and_we_notice(lab, a1, a2)
    finally:
        procs.stop_all()
        lab.close()
        lab_frr.cleanup(lab.router)
