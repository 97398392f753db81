"""natOutgoing and hostPorts with real packets: the real agent, the real plugin, our `ip bgp-fabric-pods`.

Needs IPv4 nftables NAT, which the user-mode-Linux lab kernel lacks. This machine's own kernel has it
(and netns/veth, all a pod needs; it lacks only ipip/IPVS, which this test does not use: the pool is
`ipipMode: Never` and services are off), so it runs here, NOT marked `kernel`, like
test_lb_nft_hostkernel.py: the agent runs in a network namespace made by the test (never in the
host's own), pods are namespaces the test makes and the plugin wires (driven as libcni does), and
all traffic stays between those namespaces. Skipped without root, nft IPv4 NAT or a C compiler.

    ext (10.0.1.100) ----- eth1 [node 10.0.1.11, agent] fab... ---- eth0 [pod 10.244.1.x]
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests import cniclient
from tests.netprobe import Server, http_get, in_netns

PROBE = "table ip p {\n  chain c { type nat hook postrouting priority srcnat; masquerade; }\n}\n"
NODE_IP, EXT_IP = "10.0.1.11", "10.0.1.100"
FABRIC = str(Path(sys.executable).parent / "fabric")


def _usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        return "needs a C compiler for the plugin (gcc, libc6-dev)"
    r = subprocess.run(["unshare", "-n", "nft", "-c", "-f", "-"], input=PROBE, capture_output=True, text=True)
    return None if r.returncode == 0 else "needs a kernel with nft IPv4 NAT"


pytestmark = pytest.mark.skipif(_usable() is not None, reason=_usable() or "")


def sh(cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{cmd!r}: {r.stderr.strip()}")
    return r


SLOW = 5 if os.environ.get("FABRIC_IN_LABVM") == "1" else 1  # the VM emulates its CPUs (TCG)


def wait_for(cond, timeout: float, what: str) -> None:
    timeout *= SLOW
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)  # test only


class Node:
    def __init__(self) -> None:
        from cni.build import plugin
        tag = uuid.uuid4().hex[:4]
        self.node, self.ext = f"cninat-node-{tag}", f"cninat-ext-{tag}"
        self.spaces: list[str] = []
        # In a lab kernel /tmp is the host's file system (9p in the VM): keep the agent's files, its
        # unix sockets among them, on the lab kernel's own tmpfs.
        from fabric.lab.kernel import in_lab_kernel
        self.dir = Path(tempfile.mkdtemp(prefix="fabric-cninat-", dir="/run" if in_lab_kernel() else None))
        self.plugin = [str(plugin())]
        self.proc: subprocess.Popen | None = None
        for ns in (self.node, self.ext):
            self.netns(ns)
        sh(f"ip link add eth1 netns {self.node} type veth peer name eth1 netns {self.ext};"
           f"ip -n {self.node} link set eth1 up; ip -n {self.node} addr add {NODE_IP}/24 dev eth1;"
           f"ip -n {self.ext} link set eth1 up; ip -n {self.ext} addr add {EXT_IP}/24 dev eth1;"
           f"ip netns exec {self.node} sysctl -qw net.ipv4.ip_forward=1")
        self.write_cluster(nat=True)
        (self.dir / "node.yaml").write_text(yaml.safe_dump({
            "node": {"name": "n1", "address": f"{NODE_IP}/24", "podCIDRs": ["10.244.1.0/24"]},
            "pools": [{"cidr": "10.244.0.0/16", "ipipMode": "Never"}],
            "services": {"enabled": False},
            "advertise": {"serviceClusterIPs": ["10.96.0.0/24"]},
            "source": {"kind": "file", "path": "cluster.yaml"},
            "paths": {"runDir": "run"},
            "health": {"listen": None},
            "cni": {"enabled": True, "confDir": str(self.dir / "net.d"), "stateDir": str(self.dir / "state"),
                    "socket": str(self.dir / "cni.sock")},
        }))

    def netns(self, name: str) -> str:
        sh(f"ip netns add {name}; ip -n {name} link set lo up")
        self.spaces.append(name)
        return name

    def write_cluster(self, nat: bool) -> None:
        tmp = self.dir / ".cluster.yaml"
        tmp.write_text(yaml.safe_dump({
            "nodes": [{"name": "n1", "address": NODE_IP, "podCIDRs": ["10.244.1.0/24"]}],
            "ipPools": [{"metadata": {"name": "default"},
                         "spec": {"cidr": "10.244.0.0/16", "ipipMode": "Never", "natOutgoing": nat}}]}))
        tmp.replace(self.dir / "cluster.yaml")

    def start(self) -> None:
        log = open(self.dir / "agent.log", "ab")
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.node, FABRIC, "agent", "-c", str(self.dir / "node.yaml")],
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        # A Python start is ~10 s under the VM's emulation (docs/lab-kernel.md): give the agent time.
        wait_for(lambda: (self.dir / "net.d" / "10-bgp-fabric.conflist").exists() or self.proc.poll() is not None,
                 60, "the agent's conflist")
        assert self.proc.poll() is None, f"the agent exited {self.proc.returncode}:\n{self.log()}"
        self.conf = json.loads((self.dir / "net.d" / "10-bgp-fabric.conflist").read_text())

    def nft(self, what: str) -> str:
        return sh(f"ip netns exec {self.node} nft list {what}", check=False).stdout

    def status(self) -> dict:
        try:
            return json.loads((self.dir / "run" / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def add(self, cid: str, ns: str, ports: list[dict]) -> dict:
        rc, res = cniclient.invoke(self.plugin, "ADD", cniclient.plugin_config(
            self.conf, capability_args={"portMappings": ports}), container_id=cid, netns=f"/run/netns/{ns}")
        assert rc == 0, res
        assert res is not None
        return res

    def delete(self, cid: str, ns: str) -> None:
        assert cniclient.invoke(self.plugin, "DEL", cniclient.plugin_config(self.conf), container_id=cid,
                                netns=f"/run/netns/{ns}") == (0, None)

    def log(self) -> str:
        try:
            return (self.dir / "agent.log").read_text(errors="replace")[-3000:]
        except OSError as e:
            return f"(no agent log: {e})"

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        for ns in reversed(self.spaces):
            for pid in sh(f"ip netns pids {ns}", check=False).stdout.split():
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            sh(f"ip netns del {ns}", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def node():
    n = Node()
    try:
        n.start()
        yield n
    except BaseException:
        print(n.log())
        raise
    finally:
        n.close()


def connect_from(ns: str, ip: str, port: int) -> str:
    """Peer address the server at ip:port saw (it answers HTTP with its name; Server records peers)."""
    return http_get(f"/run/netns/{ns}", ip, port)


def test_hostport_from_outside_hairpin_and_from_the_node(node: Node) -> None:
    pod = node.netns(f"cninat-pod-{uuid.uuid4().hex[:4]}")
    res = node.add("hp-1", pod, [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                                 {"hostPort": 8081, "containerPort": 81, "protocol": "tcp", "hostIP": NODE_IP}])
    pod_ip = res["ips"][0]["address"].split("/")[0]
    wait_for(lambda: "tcp . 8080 : " + pod_ip + " . 80" in node.nft("map ip bgp-fabric-pods hostport_any"), 20,
             "the hostPort in our table")
    servers = [Server(f"/run/netns/{pod}", 80, "pod-80"), Server(f"/run/netns/{pod}", 81, "pod-81")]
    try:
        assert connect_from(node.ext, NODE_IP, 8080) == "pod-80"  # from outside the node
        assert connect_from(node.ext, NODE_IP, 8081) == "pod-81"  # hostIP-specific mapping
        assert servers[0].peers[-1] == EXT_IP  # a hostPort is DNAT only: the pod sees the client
        assert connect_from(pod, NODE_IP, 8080) == "pod-80"  # hairpin: the pod through its own hostPort
        assert servers[0].peers[-1] != pod_ip  # ... masqueraded, or the reply would never leave the pod
        assert connect_from(node.node, NODE_IP, 8080) == "pod-80"  # the node itself (output chain)
        node.delete("hp-1", pod)
        wait_for(lambda: pod_ip not in node.nft("table ip bgp-fabric-pods"), 20, "the hostPort gone from our table")
        with pytest.raises(OSError):
            connect_from(node.ext, NODE_IP, 8080)
    finally:
        for s in servers:
            s.close()


def test_nat_outgoing_masquerades_to_the_node_and_can_be_turned_off(node: Node) -> None:
    pod = node.netns(f"cninat-pod-{uuid.uuid4().hex[:4]}")
    res = node.add("nat-1", pod, [])
    pod_ip = res["ips"][0]["address"].split("/")[0]
    sh(f"ip -n {node.ext} route replace 10.244.0.0/16 via {NODE_IP}")  # so replies to a pod address can return
    server = Server(f"/run/netns/{node.ext}", 9000, "ext")
    try:
        wait_for(lambda: "10.244.0.0/16" in node.nft("set ip bgp-fabric-pods natsrc"), 20, "the nat pool in our table")
        assert connect_from(pod, EXT_IP, 9000) == "ext"
        assert server.peers[-1] == NODE_IP, "an address outside every pool sees the node, not the pod"
        node.write_cluster(nat=False)  # IPPool natOutgoing: false
        wait_for(lambda: "10.244.0.0/16" not in node.nft("set ip bgp-fabric-pods natsrc"), 20, "natOutgoing off")
        assert connect_from(pod, EXT_IP, 9000) == "ext"
        assert server.peers[-1] == pod_ip, "without natOutgoing the pod's own address goes out"
    finally:
        server.close()
        node.write_cluster(nat=True)
        node.delete("nat-1", pod)


CYCLES, WORKERS = 1000, 10


def test_1000_add_del_cycles_with_hostports_leave_no_nft_element(node: Node) -> None:
    from concurrent.futures import ThreadPoolExecutor

    spaces = [node.netns(f"cninat-c{w}-{uuid.uuid4().hex[:4]}") for w in range(WORKERS)]
    state = node.dir / "state" / "bgp-fabric"

    def worker(w: int) -> None:
        for i in range(w, CYCLES, WORKERS):
            node.add(f"cyc-{i}", spaces[w], [{"hostPort": 20000 + w, "containerPort": 80, "protocol": "tcp"},
                                             {"hostPort": 20000 + w, "containerPort": 53, "protocol": "udp"}])
            node.delete(f"cyc-{i}", spaces[w])

    t0 = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        for f in [pool.submit(worker, w) for w in range(WORKERS)]:
            f.result()
    print(f"{CYCLES} ADD/DEL cycles with hostPorts: {time.monotonic() - t0:.1f}s")
    wait_for(lambda: node.status().get("stages", {}).get("podnat", {}).get("hostPorts") == 0, 20, "no hostPort in the status")
    for what in ("map ip bgp-fabric-pods hostport_any", "map ip bgp-fabric-pods hostport",
                 "set ip bgp-fabric-pods hairpin"):
        listing = node.nft(what)
        assert "type" in listing and "elements" not in listing, listing
    assert [p.name for p in state.iterdir() if p.name[0].isdigit()] == []
    assert ": fab" not in sh(f"ip -n {node.node} -o link").stdout
    assert sh(f"ip -n {node.node} route show proto 81").stdout == ""
    assert node.status()["stages"]["cni"]["counters"]["errors"] == 0
