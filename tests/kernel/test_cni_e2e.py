"""Pods through the CNI path on real agents: `ctr run --cni` (containerd's real CNI client) on two racks.

Four agents (a1, a2 in rack A; b1, b2 in rack B behind a router) serve the bgp-fabric CNI plugin and
write their conflist to /etc/cni/net.d — each node's own, inside the test's CNI environment
(tests/kernel/cnienv.py: an overlay over /etc in a private mount namespace, so nothing reaches the
host's /etc or /opt). Pods are containers started by `ctr run --rm --cni` in the node's network
namespace, as the node's runtime would. Checks the plugin's contract too, driving it exactly as
libcni does where ctr has no verb (CHECK, GC) — see tests/cniclient.py.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests import cniclient
from tests.netprobe import Server, http_get, send_bulk
from tests.kernel.cnienv import CniEnv, Pod, have_tools
from tests.kernel.meshlab import MeshLab, Node, sh, wait_for

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(bool(have_tools()), reason=f"missing: {', '.join(have_tools())} (scripts/setup)")]

SMALL_CIDR = "10.244.4.0/29"  # b2's pod CIDR: 6 usable addresses, for exhaustion


class SmallNode(Node):
    @property
    def pod_cidr(self) -> str:
        return SMALL_CIDR


def nodes() -> list[Node]:
    return [Node("a1", "a", 1, "10.0.1.11"), Node("a2", "a", 2, "10.0.1.12"),
            Node("b1", "b", 3, "10.0.2.21"), SmallNode("b2", "b", 4, "10.0.2.22")]
SERVICE_IP = "10.96.0.10"


@pytest.fixture(scope="module")
def env():
    e = CniEnv().start()
    try:
        e.start_containerd()
        yield e
    finally:
        e.close()


def _overrides(n: Node) -> dict:
    return {"services": {"enabled": n.name == "b1", "clusterCidr": ["10.244.0.0/16"]}}


@pytest.fixture(scope="module")
def lab(env: CniEnv):
    m = MeshLab(nodes(), cni_env=env,
                agent_overrides=_overrides)
    try:
        m.build().start()
        try:
            wait_for(m.converged, 120, "every agent to route every other node's pod CIDR")
            wait_for(lambda: all(conflist(m, env, n) for n in m.nodes), 30, "every agent to write its conflist")
        except AssertionError:
            for n in m.nodes:
                print(f"--- {n.name}\n{m.routes(n)}\n{m.log_tail(n)}")
            raise
        yield m
    finally:
        m.close()


def conflist(lab: MeshLab, env: CniEnv, n: Node) -> dict | None:
    text = env.read(f"/etc/netns/{n.ns}/cni/net.d/10-bgp-fabric.conflist")
    return json.loads(text) if text else None


def pod_addr(pod_netns: str, ifname: str = "eth0") -> tuple[ipaddress.IPv4Interface, int]:
    r = sh(f"nsenter --net={pod_netns} ip -4 -o addr show dev {ifname}")
    addr = ipaddress.IPv4Interface(r.stdout.split()[3])
    link = sh(f"nsenter --net={pod_netns} ip -o link show dev {ifname}").stdout.split()
    mtu = int(link[link.index("mtu") + 1])
    return addr, mtu


def ping(pod_netns: str, dst: str, count: int = 2) -> bool:
    return sh(f"nsenter --net={pod_netns} ping -c {count} -W 2 -q {dst}", check=False).returncode == 0


def icmp_unreach_out(ns: str) -> int:
    out = sh(f"ip netns exec {ns} cat /proc/net/snmp").stdout.splitlines()
    heads, vals = [line.split() for line in out if line.startswith("Icmp:")][:2]
    return int(vals[heads.index("OutDestUnreachs")])


# ---------------------------------------------------------------------------------------------------

PODS: dict[str, Pod] = {}


def test_ctr_run_cni_pods_get_addresses_from_their_nodes_pod_cidr(lab: MeshLab, env: CniEnv) -> None:
    a1 = lab.node("a1")
    conf = conflist(lab, env, a1)
    assert conf is not None and conf["plugins"][0]["type"] == "bgp-fabric"
    assert conf["plugins"][0]["mtu"] == 1480  # underlay 1500 - 20: the pool uses IPIP (CrossSubnet)
    for name in ("a1", "a2", "b1"):
        n = lab.node(name)
        t0 = time.monotonic()
        PODS[name] = env.pod(f"p-{name}", n.ns)
        addr, mtu = pod_addr(PODS[name].netns)
        print(f"ctr run --cni on {name}: {time.monotonic() - t0:.2f}s, {addr}")
        assert addr.network.prefixlen == 32 and addr.ip in ipaddress.IPv4Network(n.pod_cidr), addr
        assert mtu == 1480
        routes = sh(f"nsenter --net={PODS[name].netns} ip -4 route").stdout
        assert "default via 169.254.1.1 dev eth0" in routes, routes
        host = sh(f"ip -n {n.ns} route show {addr.ip}/32").stdout
        assert "proto 81" in host and "dev fab" in host, host
        try:
            wait_for(lambda: any(p["address"] == str(addr.ip) and p["containerID"] == f"default-p-{name}"  # ctr: <namespace>-<id>
                                 for p in lab.status(n)["stages"]["cni"]["pods"]), 10, "the pod in the agent's status")
        except AssertionError:
            print(json.dumps(lab.status(n).get("stages"), indent=1), lab.log_tail(n))
            raise


def ips() -> dict[str, str]:
    return {k: str(pod_addr(p.netns)[0].ip) for k, p in PODS.items()}


def test_cni_pods_ping_and_tcp_in_rack_direct_and_across_racks_over_ipip(lab: MeshLab) -> None:
    addr = ips()
    for src, dst in (("a1", "a2"), ("a2", "a1"), ("a1", "b1"), ("b1", "a1"), ("a2", "b1")):
        s, d = lab.node(src), lab.node(dst)
        before = lab.tunnel_tx(s)
        assert ping(PODS[src].netns, addr[dst]), f"pod on {src} -> pod on {dst} ({addr[dst]})"
        if s.rack == d.rack:
            assert lab.tunnel_tx(s) == before, f"{src} -> {dst} (same rack) used the tunnel"
        else:
            assert lab.tunnel_tx(s) > before, f"{src} -> {dst} (across racks) did not use IPIP"
    servers = [Server(PODS[n].netns, 7000, f"pod-{n}") for n in ("a2", "b1")]
    try:
        assert http_get(PODS["a1"].netns, addr["a2"], 7000) == "pod-a2"  # TCP in rack
        assert http_get(PODS["a1"].netns, addr["b1"], 7000) == "pod-b1"  # TCP across racks
    finally:
        for s in servers:
            s.close()


def test_1mb_df_transfer_across_racks_needs_no_fragmentation(lab: MeshLab) -> None:
    addr = ips()
    a1, b1 = lab.node("a1"), lab.node("b1")
    watched = [a1.ns, b1.ns, lab.router]
    before = sum(icmp_unreach_out(ns) for ns in watched)
    server = Server(PODS["b1"].netns, 5001, "bulk")
    try:
        assert send_bulk(PODS["a1"].netns, addr["b1"], 5001, 1 << 20) == 1 << 20
    finally:
        server.close()
    # nobody had to send "fragmentation needed": the pod MTU (1480) fits the tunnel
    assert sum(icmp_unreach_out(ns) for ns in watched) == before


def write_cluster(lab: MeshLab, backends: list[str]) -> None:
    doc = lab.cluster_doc()
    doc["services"] = [{"metadata": {"name": "web", "namespace": "default"},
                        "spec": {"type": "ClusterIP", "clusterIP": SERVICE_IP, "clusterIPs": [SERVICE_IP],
                                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}]
    doc["endpointSlices"] = [{"metadata": {"name": "web-1", "namespace": "default",
                                           "labels": {"kubernetes.io/service-name": "web"}},
                              "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                              "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in backends]}]
    tmp = lab.workdir / ".cluster.yaml"
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(lab.workdir / "cluster.yaml")


def test_clusterip_service_reaches_cni_created_backends(lab: MeshLab) -> None:
    addr = ips()
    b1 = lab.node("b1")
    servers = [Server(PODS[n].netns, 8080, f"pod-{n}") for n in ("a1", "a2")]
    try:
        write_cluster(lab, [addr["a1"], addr["a2"]])
        wait_for(lambda: SERVICE_IP in sh(f"ip netns exec {b1.ns} ipvsadm -Ln").stdout, 30, "the ClusterIP in IPVS on b1")
        seen = {http_get(PODS["b1"].netns, SERVICE_IP, 80) for _ in range(6)}
        assert seen == {"pod-a1", "pod-a2"}, seen
    finally:
        for s in servers:
            s.close()
        lab.write_cluster()


# -- the plugin's contract, driven as libcni drives it (ctr has no CHECK or GC) ------------------------

class Libcni:
    """libcni for one node: the node's conflist, the plugin run in the node's network namespace."""

    def __init__(self, lab: MeshLab, env: CniEnv, node: Node) -> None:
        self.node = node
        self.conf = conflist(lab, env, node)
        assert self.conf is not None
        # The plugin's own network namespace does not matter (it talks to the agent over a unix
        # socket and opens CNI_NETNS itself), so it runs straight from here.
        self.cmd = [str(env.plugin)]
        self.results: dict[str, dict] = {}

    def add(self, cid: str, netns: str, **caps) -> tuple[int, dict | None]:
        rc, out = cniclient.invoke(self.cmd, "ADD", cniclient.plugin_config(self.conf, capability_args=caps),
                                   container_id=cid, netns=netns)
        if rc == 0 and out is not None:
            self.results[cid] = out
        return rc, out

    def check(self, cid: str, netns: str) -> tuple[int, dict | None]:
        return cniclient.invoke(self.cmd, "CHECK", cniclient.plugin_config(
            self.conf, prev_result=self.results[cid], version="1.1.0"), container_id=cid, netns=netns)

    def delete(self, cid: str, netns: str) -> tuple[int, dict | None]:
        return cniclient.invoke(self.cmd, "DEL", cniclient.plugin_config(self.conf, prev_result=self.results.pop(cid, None)),
                                container_id=cid, netns=netns)

    def gc(self, valid: list[tuple[str, str]]) -> tuple[int, dict | None]:
        return cniclient.invoke(self.cmd, "GC", cniclient.plugin_config(
            self.conf, version="1.1.0", valid_attachments=[{"containerID": c, "ifname": i} for c, i in valid]))

    def status(self) -> tuple[int, dict | None]:
        return cniclient.invoke(self.cmd, "STATUS", cniclient.plugin_config(self.conf, version="1.1.0"))


class Netns:
    """Pod namespaces made by the test (as a runtime makes them), removed at the end."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.names: list[str] = []

    def new(self, name: str) -> str:
        ns = f"{name}-{self.tag}"
        sh(f"ip netns add {ns}")
        self.names.append(ns)
        return f"/run/netns/{ns}"

    def close(self) -> None:
        for ns in self.names:
            sh(f"ip netns del {ns}", check=False)


@pytest.fixture
def netns(lab: MeshLab):
    n = Netns(lab.tag)
    yield n
    n.close()


def state(lab: MeshLab, n: Node) -> dict:
    """What the node holds of pods: IPAM records, host veths, proto-81 host routes."""
    ipam = Path(lab.cni_state_dir(n)) / "bgp-fabric"
    records = sorted(p.name for p in ipam.iterdir() if p.name[0].isdigit())
    links = sorted(line.split(":")[1].strip().split("@")[0] for line in
                   sh(f"ip -n {n.ns} -o link show").stdout.splitlines() if ": fab" in line)
    routes = sorted(line.split()[0] for line in sh(f"ip -n {n.ns} route show proto 81").stdout.splitlines())
    return {"records": records, "links": links, "routes": routes}


def test_status_add_check_del_contract(lab: MeshLab, env: CniEnv, netns: Netns) -> None:
    a1 = lab.node("a1")
    cni = Libcni(lab, env, a1)
    assert cni.status() == (0, None)
    before = state(lab, a1)
    ns = netns.new("chk")
    rc, res = cni.add("chk-1", ns)
    assert rc == 0, res
    assert res is not None and res["cniVersion"] == "1.0.0"  # the conflist's cniVersion
    ip = res["ips"][0]["address"].split("/")[0]
    # ADD twice (same container, same interface): the same result, nothing new
    rc, again = cni.add("chk-1", ns)
    assert rc == 0 and again == res
    assert len(state(lab, a1)["records"]) == len(before["records"]) + 1
    assert cni.check("chk-1", ns) == (0, None)
    # CHECK reports a removed host route
    sh(f"ip -n {a1.ns} route del {ip}/32 proto 81")
    rc, err = cni.check("chk-1", ns)
    assert rc == 1 and err is not None and err["code"] == 101 and f"host route {ip}/32" in err["msg"], err
    # DEL, DEL again, DEL of a container we never saw: all succeed; nothing is left
    assert cni.delete("chk-1", ns) == (0, None)
    assert cni.delete("chk-1", ns) == (0, None)
    assert cni.delete("never-added", ns) == (0, None)
    assert cni.delete("never-added", "") == (0, None)  # no namespace at all (e.g. after a reboot)
    assert state(lab, a1) == before
    assert "eth0" not in sh(f"nsenter --net={ns} ip -o link").stdout


def test_gc_frees_what_the_runtime_no_longer_lists(lab: MeshLab, env: CniEnv, netns: Netns) -> None:
    a1 = lab.node("a1")
    cni = Libcni(lab, env, a1)
    before = state(lab, a1)
    keep, drop = netns.new("gc-keep"), netns.new("gc-drop")
    assert cni.add("gc-keep", keep)[0] == 0 and cni.add("gc-drop", drop)[0] == 0
    live = [("default-p-a1", "eth0"), ("gc-keep", "eth0")]  # what the runtime still runs on a1
    assert cni.gc(live) == (0, None)
    after = state(lab, a1)
    assert len(after["records"]) == len(before["records"]) + 1 and len(after["links"]) == len(before["links"]) + 1
    assert "eth0" not in sh(f"nsenter --net={drop} ip -o link").stdout
    assert ping(PODS["a1"].netns, cni.results["gc-keep"]["ips"][0]["address"].split("/")[0])
    assert cni.delete("gc-keep", keep) == (0, None)
    assert state(lab, a1) == before


def test_address_exhaustion_is_a_clear_error(lab: MeshLab, env: CniEnv, netns: Netns) -> None:
    b2 = lab.node("b2")  # pod CIDR /29: 6 usable addresses
    cni = Libcni(lab, env, b2)
    spaces = [netns.new(f"ex{i}") for i in range(7)]
    for i in range(6):
        assert cni.add(f"ex-{i}", spaces[i])[0] == 0
    t0 = time.monotonic()
    rc, err = cni.add("ex-6", spaces[6])
    assert time.monotonic() - t0 < 10  # an answer, not a hang
    assert rc == 1 and err is not None and err["code"] == 100, err
    assert err["msg"] == "no free pod address on this node" and SMALL_CIDR in err.get("details", ""), err
    assert "eth0" not in sh(f"nsenter --net={spaces[6]} ip -o link").stdout
    for i in range(6):
        assert cni.delete(f"ex-{i}", spaces[i]) == (0, None)
    assert state(lab, b2) == {"records": [], "links": [], "routes": []}


# 1,000 cycles (with hostPorts, so nft elements too) run on this machine's kernel in
# test_cni_nat_hostkernel.py; here, among four agents in the lab kernel, 100 keep the suite's time.
CYCLES, WORKERS = 100, 10


def test_add_del_cycles_leave_nothing_behind(lab: MeshLab, env: CniEnv, netns: Netns) -> None:
    """ADD/DEL cycles, 10 pods at a time (as a runtime starts and stops pods concurrently)."""
    from concurrent.futures import ThreadPoolExecutor

    a1 = lab.node("a1")
    cni = Libcni(lab, env, a1)
    before = state(lab, a1)
    spaces = [netns.new(f"cyc{w}") for w in range(WORKERS)]
    seen: list[str] = []
    errors = lab.status(a1)["stages"]["cni"]["counters"]["errors"]

    def worker(w: int) -> None:
        for i in range(w, CYCLES, WORKERS):
            rc, res = cni.add(f"cycle-{i}", spaces[w])
            assert rc == 0, res
            seen.append(res["ips"][0]["address"])  # type: ignore[index]
            rc, res = cni.delete(f"cycle-{i}", spaces[w])
            assert rc == 0, res

    t0 = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        for f in [pool.submit(worker, w) for w in range(WORKERS)]:
            f.result()
    took = time.monotonic() - t0
    print(f"{CYCLES} ADD/DEL cycles, {WORKERS} at a time: {took:.1f}s ({took / CYCLES * 1000:.1f} ms per cycle), "
          f"{len(set(seen))} distinct addresses")
    assert len(seen) == CYCLES
    assert state(lab, a1) == before  # no IPAM record, host veth or host route left
    assert len(set(seen)) == CYCLES  # released addresses are not handed out again at once
    for ns in spaces:
        assert "eth0" not in sh(f"nsenter --net={ns} ip -o link").stdout
        assert "169.254.1.1" not in sh(f"nsenter --net={ns} ip neigh").stdout
    assert lab.status(a1)["stages"]["cni"]["counters"]["errors"] == errors


def test_agent_restart_in_the_middle_of_adds_changes_no_pods_address(lab: MeshLab, env: CniEnv, netns: Netns) -> None:
    a2 = lab.node("a2")
    cni = Libcni(lab, env, a2)
    before_addr = ips()["a2"]
    conf_before = env.read(f"/etc/netns/{a2.ns}/cni/net.d/10-bgp-fabric.conflist")
    spaces = [netns.new(f"rs{i}") for i in range(12)]
    results: dict[int, str] = {}
    retries = [0]

    def adds() -> None:
        for i, ns in enumerate(spaces):
            while True:  # as kubelet does: an ADD that failed "try again" is tried again
                rc, res = cni.add(f"restart-{i}", ns)
                if rc == 0:
                    results[i] = res["ips"][0]["address"]  # type: ignore[index]
                    break
                assert res is not None and res["code"] == 11, res
                retries[0] += 1
                time.sleep(0.2)

    t = threading.Thread(target=adds)
    t.start()
    wait_for(lambda: len(results) >= 4, 60, "a few ADDs before the restart")
    lab.kill_agent(a2)  # SIGKILL, mid-stream
    time.sleep(1)
    lab.start_agent(a2)
    t.join(180)
    assert not t.is_alive() and len(results) == len(spaces)
    assert retries[0] > 0, "no ADD hit the restart: the test did not test it"
    # no pod changed its address: the ctr pod and every ADD that had succeeded
    assert ips()["a2"] == before_addr and ping(PODS["a1"].netns, before_addr)
    assert len(set(results.values())) == len(spaces)
    for i, ns in enumerate(spaces):
        assert str(pod_addr(ns)[0]) == results[i]
    st = state(lab, a2)
    assert len(st["records"]) == len(st["links"]) == len(st["routes"]) == len(spaces) + 1, st
    assert env.read(f"/etc/netns/{a2.ns}/cni/net.d/10-bgp-fabric.conflist") == conf_before
    for i, ns in enumerate(spaces):
        assert cni.delete(f"restart-{i}", ns) == (0, None)


def test_del_while_the_agent_is_down_succeeds_and_the_address_is_freed_at_its_start(
        lab: MeshLab, env: CniEnv, netns: Netns) -> None:
    a1 = lab.node("a1")
    cni = Libcni(lab, env, a1)
    before = state(lab, a1)
    ns = netns.new("down")
    assert cni.add("down-1", ns)[0] == 0
    lab.kill_agent(a1)
    try:
        assert cni.delete("down-1", ns) == (0, None)  # the plugin removes the pod's interface itself
        assert "eth0" not in sh(f"nsenter --net={ns} ip -o link").stdout
        rc, err = cni.add("down-2", netns.new("down2"))
        assert rc == 1 and err is not None and err["code"] == 11, err  # try again later
        rc, err = cni.status()
        assert rc == 1 and err is not None and err["code"] == 50, err
    finally:
        lab.start_agent(a1)
    wait_for(lambda: cni.status() == (0, None), 60, "the agent to serve the plugin again")
    assert state(lab, a1) == before  # the start-up sweep released down-1's address
    assert ping(PODS["a2"].netns, ips()["a1"])  # the running pod kept its address and its network
    wait_for(lambda: lab.status(a1)["stages"]["cni"]["counters"]["releasedBySweep"] == 1, 10, "the sweep in the status")


def test_ctr_stopping_a_pod_releases_everything(lab: MeshLab, env: CniEnv) -> None:
    a2 = lab.node("a2")
    pod = PODS.pop("a2")
    rc = env.stop_pod(pod)  # ctr run --rm ends with the killed task's status after its CNI DEL
    assert rc == 137, env.pod_log(pod)
    assert state(lab, a2) == {"records": [], "links": [], "routes": []}
