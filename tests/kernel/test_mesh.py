"""The node mesh on real agents: pod reachability, direct vs IPIP, ipipMode switching, MTU."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from itertools import permutations

import pytest

from tests.kernel.meshlab import MeshLab, sh, two_racks, wait_for

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def lab():
    m = two_racks(hold_time=9, gr_time=60).build().start()
    try:
        try:
            wait_for(m.converged, 90, "every agent to route every other node's pod CIDR")
        except AssertionError:
            for n in m.nodes:
                print(f"--- {n.name}\n{m.routes(n)}\n{m.log_tail(n)}")
            raise
        yield m
    finally:
        m.close()


def same_rack(a, b) -> bool:
    return a.rack == b.rack


def test_every_pod_reaches_every_pod_direct_in_rack_ipip_across(lab: MeshLab) -> None:
    for src, dst in permutations(lab.nodes, 2):
        before = {n.name: lab.tunnel_tx(n) for n in (src, dst)}
        assert lab.ping(src, dst, count=2), f"pod {src.name} -> pod {dst.name} failed\n{lab.routes(src)}"
        after = {n.name: lab.tunnel_tx(n) for n in (src, dst)}
        route = sh(f"ip -n {src.ns} route get {dst.pod_ip}").stdout
        if same_rack(src, dst):
            assert "dev eth1" in route and f"via {dst.address}" in route, route
            assert after == before, f"{src.name}->{dst.name} used the tunnel: {before} -> {after}"
        else:
            assert "dev tunl0" in route and f"via {dst.address}" in route, route
            assert after[src.name] > before[src.name] and after[dst.name] > before[dst.name]


def test_routes_carry_owner_mark_and_tunnel_mtu(lab: MeshLab) -> None:
    a1 = lab.node("a1")
    text = lab.routes(a1)
    assert "blackhole 10.244.1.0/24 proto 80" in text
    assert "10.244.2.0/24 via 10.0.1.12 dev eth1 proto 80" in text
    assert "10.244.3.0/24 via 10.0.2.21 dev tunl0 proto 80 onlink mtu 1480" in text
    link = sh(f"ip -n {a1.ns} link show tunl0").stdout
    assert "mtu 1480" in link and ",UP" in link


BULK = textwrap.dedent('''
    import socket, sys
    IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2
    role, host = sys.argv[1], sys.argv[2]
    if role == "server":
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 5001)); s.listen(1); print("ready", flush=True)
        c, _ = s.accept(); n = 0
        while True:
            b = c.recv(65536)
            if not b: break
            n += len(b)
        c.sendall(str(n).encode()); c.close()
    else:
        c = socket.create_connection((host, 5001), timeout=30)
        c.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)  # DF on every segment
        c.sendall(b"x" * 1048576); c.shutdown(socket.SHUT_WR)
        print(c.recv(100).decode())
''')


def icmp_unreach_out(ns: str) -> int:
    out = sh(f"ip netns exec {ns} cat /proc/net/snmp").stdout.splitlines()
    heads, vals = [l.split() for l in out if l.startswith("Icmp:")][:2]
    return int(vals[heads.index("OutDestUnreachs")])


def test_1mb_tcp_with_df_across_racks(lab: MeshLab) -> None:
    a1, b2 = lab.node("a1"), lab.node("b2")
    before = icmp_unreach_out(a1.ns) + icmp_unreach_out(b2.ns)
    server = subprocess.Popen(["ip", "netns", "exec", b2.pod_ns, sys.executable, "-c", BULK, "server", b2.pod_ip],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        r = subprocess.run(["ip", "netns", "exec", a1.pod_ns, sys.executable, "-c", BULK, "client", b2.pod_ip],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "1048576"
    finally:
        server.kill()
        server.wait()
    # no "fragmentation needed" had to be sent: the pod MTU fits the tunnel
    assert icmp_unreach_out(a1.ns) + icmp_unreach_out(b2.ns) == before


def test_mode_switch_always_then_never_then_back(lab: MeshLab) -> None:
    a1, a2, b1 = lab.node("a1"), lab.node("a2"), lab.node("b1")
    try:
        lab.set_mode("Always")
        wait_for(lambda: all("10.244.2.0/24 via 10.0.1.12 dev tunl0" in lab.routes(n) or n is a2
                             for n in lab.nodes if n.rack == "a"), 20, "same-rack routes moved to IPIP")
        wait_for(lambda: all(
            all(f"{m.pod_cidr} via {m.address} dev tunl0" in lab.routes(n) for m in lab.nodes if m is not n)
            for n in lab.nodes), 20, "every route on IPIP (Always)")
        before = lab.tunnel_tx(a1)
        assert lab.ping(a1, a2)
        assert lab.tunnel_tx(a1) > before, "same-rack traffic should use IPIP in Always"

        lab.set_mode("Never")
        wait_for(lambda: "tunl0" not in lab.routes(a1), 20, "no IPIP route left (Never)")
        assert "10.244.2.0/24 via 10.0.1.12 dev eth1" in lab.routes(a1)
        assert lab.ping(a1, a2)
        assert not lab.ping(a1, b1), "cross-rack pods must be unreachable with Never (the router has no pod routes)"
        wait_for(lambda: any("ipipMode Never" in w for w in lab.status(a1).get("warnings", [])), 10,
                 "a status warning about cross-subnet peers under Never")
    finally:
        lab.set_mode("CrossSubnet")
        wait_for(lab.converged, 30, "convergence back on CrossSubnet")
        wait_for(lambda: "10.244.3.0/24 via 10.0.2.21 dev tunl0" in lab.routes(a1), 20, "IPIP back across racks")
    assert lab.ping(a1, b1)


def test_plan_and_explain_on_a_converged_node(lab: MeshLab) -> None:
    a1 = lab.node("a1")
    fabric = f"{sys.executable.rsplit('/', 1)[0]}/fabric"
    plan = subprocess.run(["ip", "netns", "exec", a1.ns, fabric, "plan", "-c", str(lab.config_path(a1))],
                          capture_output=True, text=True)
    assert plan.returncode == 0, plan.stderr
    assert "changes: 0 delete, 0 replace" in plan.stdout, plan.stdout  # the agent already did it all
    assert "a2" in plan.stdout and "10.244.1.0/24  next-hop 10.0.1.11" in plan.stdout
    ex = subprocess.run(["ip", "netns", "exec", a1.ns, fabric, "explain", "-c", str(lab.config_path(a1)),
                         "10.244.3.10"], capture_output=True, text=True)
    assert ex.returncode == 0, ex.stderr
    assert "learned 10.244.3.0/24 from 1 source(s):\n  b1 (next hop 10.0.2.21): accepted\n" in ex.stdout, ex.stdout
    assert "another subnet" in ex.stdout and "IPIP via tunl0" in ex.stdout


def test_node_joining_and_leaving_does_not_reset_other_sessions(lab: MeshLab) -> None:
    a1 = lab.node("a1")

    def sessions() -> dict[str, tuple]:
        return {p["name"]: (p["state"], p.get("established_count"), p.get("since"))
                for p in lab.status(a1).get("peers", [])}

    before = sessions()
    assert all(v[0] == "established" for v in before.values()) and len(before) == 3
    doc = lab.cluster_doc()
    doc["nodes"].append({"name": "c9", "address": "10.0.1.99", "podCIDRs": ["10.244.99.0/24"]})
    import yaml
    (lab.workdir / ".cluster.yaml").write_text(yaml.safe_dump(doc))
    (lab.workdir / ".cluster.yaml").replace(lab.workdir / "cluster.yaml")
    wait_for(lambda: "c9" in sessions(), 20, "a1 to configure a neighbor for the new node")
    after_join = sessions()
    assert {k: v for k, v in after_join.items() if k != "c9"} == before, (before, after_join)
    lab.write_cluster()  # c9 leaves again
    wait_for(lambda: "c9" not in sessions(), 20, "a1 to drop the neighbor of the removed node")
    assert sessions() == before
    assert lab.ping(a1, lab.node("b2"))
