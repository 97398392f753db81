"""Our nftables table with real packets, on a kernel that has nf_tables' inet family and IPv4 NAT.

The lab kernel (UML) has IPVS but its nf_tables lacks the ip/inet families and it has no IPv4 NAT at
all, so the masquerade/hairpin/source-range rules can't run there. This machine's own kernel has
them (and lacks IPVS), so this test runs here, NOT marked `kernel`: IPVS's destination rewrite is
stood in for by an nft `dnat` in prerouting (both happen before postrouting, where our masquerade
decisions apply; IPVS rewrites at LOCAL_IN, which is why the source-range filter sits in `input`
and is tested against a listener on the node itself). Skipped without root or without nft inet NAT.
The same table is loaded by `ServiceProxy` in `test_lb_dataplane.py` on kernels that have both.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loadbalancer.ipvs_kernel import flush_udp_commands
from loadbalancer.model import build_service
from loadbalancer.nft import render_delta, render_full
from loadbalancer.types import NodeContext
from tests.kernel.test_lb_dataplane import EXT_IP, LB_IP, NODE_IP, PODS, Lab

PROBE = "table inet p {\n  chain c { type nat hook postrouting priority srcnat; masquerade; }\n}\n"


def _nft_nat_works() -> bool:
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["unshare", "-n", "nft", "-c", "-f", "-"], input=PROBE, capture_output=True, text=True)
    return r.returncode == 0


pytestmark = pytest.mark.skipif(not _nft_nat_works(), reason="needs root and a kernel with nft inet NAT")

CTX = NodeContext("node-a", (NODE_IP,), (NODE_IP,), "rr", False, ("10.244.0.0/16",))
SIM = f"""table ip ipvs-sim {{
  chain pre {{ type nat hook prerouting priority dstnat; policy accept;
    ip daddr 10.96.0.11 tcp dport 80 dnat to {PODS['pod1']}:8080
    ip daddr {NODE_IP} tcp dport 30080 dnat to {PODS['pod2']}:8080
    ip daddr {NODE_IP} tcp dport 30081 dnat to {PODS['pod3']}:8080
    ip daddr 10.96.0.13 tcp dport 80 dnat to {PODS['pod2']}:8080
    ip daddr 10.96.0.12 udp dport 53 dnat to numgen inc mod 2 map {{ 0 : {PODS['pod2']}, 1 : {PODS['pod3']} }} : 5353
  }}
}}
"""


def _svc(name: str, typ: str, ports: list, **spec) -> dict:
    return {"metadata": {"name": name, "namespace": "d"},
            "spec": {"type": typ, "clusterIP": spec.pop("ip", "None"), "ports": ports, **spec}}


def _eps(name: str, pod: str, port: int = 8080) -> dict:
    return {"metadata": {"name": name, "namespace": "d", "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [PODS[pod] if pod in PODS else pod], "nodeName": "node-a"}]}


def test_masquerade_hairpin_local_and_source_ranges() -> None:
    services = [
        (_svc("self", "ClusterIP", [{"port": 80}], ip="10.96.0.11"), _eps("self", "pod1")),
        (_svc("cip", "ClusterIP", [{"port": 80}], ip="10.96.0.13"), _eps("cip", "pod2")),
        (_svc("np", "NodePort", [{"port": 80, "nodePort": 30080}]), _eps("np", "pod2")),
        (_svc("loc", "NodePort", [{"port": 80, "nodePort": 30081}], externalTrafficPolicy="Local"), _eps("loc", "pod3")),
        (_svc("lb", "LoadBalancer", [{"port": 8080, "nodePort": 30443}], loadBalancerSourceRanges=["10.10.0.0/16"],
              status={"loadBalancer": {"ingress": [{"ip": LB_IP}]}}), _eps("lb", NODE_IP)),
    ]
    elements = set()
    for s, sl in services:
        if "status" in s["spec"]:
            s["status"] = s["spec"].pop("status")
        st = build_service(s, [sl], CTX)
        elements |= st.nft  # type: ignore[union-attr]
    lab = Lab()
    try:
        lab.build()
        lab.ex("node", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        lab.ex("node", "ip", "addr", "add", f"{LB_IP}/32", "dev", "lo")
        node_echo = subprocess.Popen(["ip", "netns", "exec", lab.ns["node"], sys.executable, str(lab.dir / "echo.py"),
                                      "node"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        lab.procs.append(node_echo)
        assert node_echo.stdout is not None and node_echo.stdout.readline().strip() == "ready"
        nft = lambda text: subprocess.run(["ip", "netns", "exec", lab.ns["node"], "nft", "-f", "-"], input=text,
                                          capture_output=True, text=True)
        assert nft(SIM).returncode == 0
        r = nft(render_full(elements, cluster_cidrs=CTX.cluster_cidrs, node_addresses=CTX.node_addresses))
        assert r.returncode == 0, r.stderr

        # hairpin: pod1 -> its own service -> itself works because it is masqueraded
        got = lab.request("pod1", "tcp", "10.96.0.11", 80)
        assert got[0].split()[0] == "pod1" and got[0].split()[1] != PODS["pod1"], got
        # ClusterIP: a pod keeps its address; a client outside clusterCIDR is masqueraded
        assert lab.request("client", "tcp", "10.96.0.13", 80) == [f"pod2 {PODS['client']}"]
        got = lab.request("ext", "tcp", "10.96.0.13", 80)
        assert got[0].split()[0] == "pod2" and got[0].split()[1] != EXT_IP, got
        # ETP Cluster NodePort: masqueraded; ETP Local: the backend sees the real client
        got = lab.request("ext", "tcp", NODE_IP, 30080)
        assert got[0].split()[0] == "pod2" and got[0].split()[1] != EXT_IP, got
        assert lab.request("ext", "tcp", NODE_IP, 30081) == [f"pod3 {EXT_IP}"]
        # loadBalancerSourceRanges: outside the ranges -> dropped; inside -> answered
        assert lab.request("ext", "tcp", LB_IP, 8080)[0].startswith("ERROR")
        allow = ("lballow", (LB_IP, "TCP", 8080, "192.168.100.0/24"))
        assert nft(render_delta({allow}, set())).returncode == 0
        assert lab.request("ext", "tcp", LB_IP, 8080) == [f"node {EXT_IP}"]

        # removed UDP endpoint: our conntrack command deletes exactly its flows
        assert {g.split()[0] for g in lab.request("client", "udp", "10.96.0.12", 53, 4)} == {"pod2", "pod3"}
        ct = lambda: lab.ex("node", "conntrack", "-L", "-p", "udp", "--orig-dst", "10.96.0.12", check=False).stdout
        assert f"src={PODS['pod2']}" in ct() and f"src={PODS['pod3']}" in ct()
        for cmd in flush_udp_commands([("10.96.0.12", 53, PODS["pod2"])]):
            lab.ex("node", *cmd)
        assert f"src={PODS['pod2']}" not in ct() and f"src={PODS['pod3']}" in ct()

        # the rules are what makes it work: without the hairpin element the pod can't reach itself
        hp = ("hairpin", (PODS["pod1"], "TCP", 8080, PODS["pod1"]))
        assert nft(render_delta(set(), {hp})).returncode == 0
        subprocess.run(["ip", "netns", "exec", lab.ns["node"], "conntrack", "-F"], capture_output=True)
        assert lab.request("pod1", "tcp", "10.96.0.11", 80)[0].startswith("ERROR")
    finally:
        lab.teardown()
