"""The proxy's nftables half with real IPVS: NodePort SNAT, hairpin, source ranges, UDP conntrack flush.

Needs IPVS *and* IPv4 nftables NAT (marked `nat`): the UML lab kernel has no IPv4 NAT, so these run
in the qemu lab VM (fabric.lab.vm, Debian's kernel) unless this host's kernel can do both.

Topology: test_lb_dataplane's Lab (node-a with pods, `ext` on 192.168.100.0/24) plus a second node
whose pod replies would bypass node-a:

    ext 192.168.100.2 (+ .3) ── node-a 192.168.100.1 (IPVS director, ServiceProxy)
      │ 192.168.101.2                │ 192.168.102.1
      │                              │
      └── 192.168.101.1 node-b 192.168.102.2 ── podb 10.244.2.2

node-b routes 192.168.100.0/24 straight to ext, so without SNAT podb's reply to a NodePort client
goes node-b -> ext with podb's address and the client never sees it. Client sockets are opened
from this process inside the namespaces (NetnsThread), not as one process per request: process
start-up is what costs most in an emulated VM.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from fabric.config import ServiceSettings
from fabric.tracker import Store
from loadbalancer.netns import NetnsThread
from loadbalancer.proxy import ServiceProxy
from tests.kernel.test_lb_dataplane import (EXT_IP, LB_IP, NODE_IP, PODS, READY, TCP_UDP, Lab, eps, set_service, sh,
                                            svc, sync)

pytestmark = pytest.mark.nat

PODB_IP = "10.244.2.2"
EXT_IP2 = "192.168.100.3"  # a second client address on ext, for source ranges
NODE_A_TO_B, NODE_B_TO_A = "192.168.102.1", "192.168.102.2"
NODE_B_EXT, EXT_TO_B = "192.168.101.1", "192.168.101.2"


class NatLab(Lab):
    """Lab plus node-b (its own pod, a direct path to ext) and in-process clients/servers."""

    def __init__(self) -> None:
        super().__init__()
        tag = self.ns["node"].split("-")[0]
        self.ns.update({"nodeb": f"{tag}-nodeb", "podb": f"{tag}-podb"})
        self.threads: dict[str, NetnsThread] = {}
        self.servers: list[socket.socket] = []

    def build(self) -> None:
        super().build()
        node, nodeb, podb, ext = (self.ns[n] for n in ("node", "nodeb", "podb", "ext"))
        self._batch(None, [f"link add vnb netns {node} type veth peer eth0 netns {nodeb}",
                           f"link add vpb netns {nodeb} type veth peer eth0 netns {podb}",
                           f"link add vext netns {nodeb} type veth peer eth1 netns {ext}"])
        self._batch(nodeb, [f"addr add {NODE_B_TO_A}/24 dev eth0", "link set eth0 up",
                            "addr add 169.254.1.1/32 dev vpb", "link set vpb up", f"route add {PODB_IP}/32 dev vpb",
                            f"addr add {NODE_B_EXT}/24 dev vext", "link set vext up",
                            f"route add 192.168.100.0/24 via {EXT_TO_B}"])  # replies to clients skip node-a
        self._batch(podb, [f"addr add {PODB_IP}/32 dev eth0", "link set eth0 up",
                           "route add 169.254.1.1 dev eth0 scope link", "route add default via 169.254.1.1 dev eth0"])
        self._batch(node, [f"addr add {NODE_A_TO_B}/24 dev vnb", "link set vnb up",
                           f"route add 10.244.2.0/24 via {NODE_B_TO_A}"])
        self._batch(ext, [f"addr add {EXT_TO_B}/24 dev eth1", "link set eth1 up",
                          f"addr add {EXT_IP2}/24 dev eth0"])
        sh("ip", "netns", "exec", nodeb, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self._serve("podb")

    def _batch(self, ns: str | None, lines: list[str]) -> None:
        """One `ip -batch` per namespace: far fewer process starts than one `ip` per change."""
        cmd = ["ip", *(["-n", ns] if ns else []), "-batch", "-"]
        r = subprocess.run(cmd, input="\n".join(lines) + "\n", capture_output=True, text=True)
        if r.returncode != 0:
            raise AssertionError(f"ip -batch in {ns or 'root ns'}: {r.stderr.strip()}")

    def _thread(self, where: str) -> NetnsThread:
        if where not in self.threads:
            self.threads[where] = NetnsThread(self.ns[where])
        return self.threads[where]

    def _serve(self, pod: str) -> None:
        """TCP 8080 echo answering "<pod> <peer-ip>" (as Lab's echo.py), listening inside the pod's netns."""
        lsock = self._thread(pod).call(socket.create_server, ("0.0.0.0", 8080), backlog=64, reuse_port=False)
        self.servers.append(lsock)

        def conn(c: socket.socket, peer: tuple[str, int]) -> None:
            with c, c.makefile("rwb", buffering=0) as f:
                for _ in f:
                    f.write(f"{pod} {peer[0]}\n".encode())

        def accept() -> None:
            while True:
                try:
                    c, peer = lsock.accept()
                except OSError:
                    return  # closed at teardown
                threading.Thread(target=conn, args=(c, peer), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

    def ask(self, src: str, proto: str, ip: str, port: int, *, bind: str | None = None, timeout: float = 15) -> str:
        """One request from namespace `src`: the answer line, or "ERROR <exception>"."""
        def go() -> str:
            kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
            with socket.socket(socket.AF_INET, kind) as s:
                s.settimeout(timeout)
                if bind:
                    s.bind((bind, 0))
                if proto == "tcp":
                    s.connect((ip, port))
                    s.sendall(b"hi\n")
                    return s.makefile().readline().strip()
                s.sendto(b"hi", (ip, port))
                return s.recv(2048).decode().strip()

        try:
            return self._thread(src).call(go)
        except OSError as e:
            return f"ERROR {e.__class__.__name__}"

    def teardown(self) -> None:
        for s in self.servers:
            s.close()
        for t in self.threads.values():
            t.close()
        super().teardown()


@pytest.fixture(scope="module")
def lab() -> Iterator[NatLab]:
    lab = NatLab()
    try:
        lab.build()
        yield lab
    finally:
        lab.teardown()


@pytest.fixture(scope="module")
def proxy(lab: NatLab) -> Iterator[ServiceProxy]:
    settings = ServiceSettings(cluster_cidr=["10.244.0.0/16"])
    p = ServiceProxy(settings, "node-a", [NODE_IP], netns=lab.ns["node"], health_bind=NODE_IP)
    try:
        assert p.kernel.nft_available() is None, "this kernel can't load our nft table"
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def store() -> Store:
    return Store()


def test_nodeport_snat_brings_replies_back(lab: NatLab, proxy: ServiceProxy, store: Store) -> None:
    ports = [{"name": "tcp", "port": 80, "protocol": "TCP", "nodePort": 30090}]
    sl = eps("npb", {}, ports=(("tcp", 8080, "TCP"),))
    sl["endpoints"] = [{"addresses": [PODB_IP], "nodeName": "node-b", "conditions": READY}]
    set_service(store, svc("npb", "10.96.0.90", ports, "NodePort"), sl)
    sync(proxy, store)
    # ETP Cluster: podb on node-b sees node-a's address towards it, so its reply returns through IPVS
    assert lab.ask("ext", "tcp", NODE_IP, 30090) == f"podb {NODE_A_TO_B}"
    # Control: without our masquerade rule the reply leaves node-b straight for ext and the connection fails.
    lab.ex("node", "nft", "flush", "chain", "inet", "bgp-fabric", "postrouting")
    assert lab.ask("ext", "tcp", NODE_IP, 30090, timeout=3).startswith("ERROR")
    # A resync rewrites the whole table; SNAT (and the NodePort) work again.
    res = proxy.apply(proxy.resync())
    assert res.ok, str(res)
    assert lab.ask("ext", "tcp", NODE_IP, 30090) == f"podb {NODE_A_TO_B}"


def test_hairpin(lab: NatLab, proxy: ServiceProxy, store: Store) -> None:
    # pod1 reaches a service whose only endpoint is pod1 itself
    set_service(store, svc("self", "10.96.0.11", TCP_UDP), eps("self", {"pod1": READY}))
    sync(proxy, store)
    got = [lab.ask("pod1", "tcp", "10.96.0.11", 80) for _ in range(2)]
    assert [g.split()[0] for g in got] == ["pod1", "pod1"], got
    assert got[0].split()[1] != PODS["pod1"]  # masqueraded, so the reply went back through IPVS


def test_load_balancer_source_ranges(lab: NatLab, proxy: ServiceProxy, store: Store) -> None:
    ports = [{"name": "tcp", "port": 8443, "protocol": "TCP", "nodePort": 30443}]

    def lb(ranges: list[str]) -> dict:  # a new object each time: the store keeps the one it was given
        s = svc("lbr", "10.96.0.22", ports, "LoadBalancer", loadBalancerSourceRanges=ranges)
        s["status"] = {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
        return s

    set_service(store, lb(["10.10.0.0/16", f"{EXT_IP}/32"]), eps("lbr", {"pod2": READY}, ports=(("tcp", 8080, "TCP"),)))
    sync(proxy, store)
    assert lab.ask("ext", "tcp", LB_IP, 8443, bind=EXT_IP).split()[0] == "pod2"  # inside a range
    assert lab.ask("ext", "tcp", LB_IP, 8443, bind=EXT_IP2, timeout=3).startswith("ERROR")  # outside: dropped
    # widening the ranges is an element change; the other client gets in
    set_service(store, lb(["10.10.0.0/16", "192.168.100.0/24"]), None)
    plan = sync(proxy, store)
    assert not plan.full and plan.nft_add and plan.nft_delete
    assert lab.ask("ext", "tcp", LB_IP, 8443, bind=EXT_IP2).split()[0] == "pod2"


def test_removed_udp_endpoint_conntrack_is_flushed(lab: NatLab, proxy: ServiceProxy, store: Store) -> None:
    set_service(store, svc("udp", "10.96.0.60", TCP_UDP), eps("udp", {"pod1": READY, "pod2": READY}))
    sync(proxy, store)
    got = {lab.ask("client", "udp", "10.96.0.60", 53).split()[0] for _ in range(4)}
    assert got == {"pod1", "pod2"}, got

    def entries() -> str:
        return lab.ex("node", "conntrack", "-L", "-p", "udp", "--orig-dst", "10.96.0.60", check=False).stdout

    tracked = entries()
    assert f"src={PODS['pod1']}" in tracked and f"src={PODS['pod2']}" in tracked  # reply side = endpoint
    set_service(store, svc("udp", "10.96.0.60", TCP_UDP), eps("udp", {"pod1": READY}))
    plan = sync(proxy, store)
    assert plan.conntrack_flush == [("10.96.0.60", 53, PODS["pod2"])]
    after = entries()
    assert f"src={PODS['pod2']}" not in after and f"src={PODS['pod1']}" in after
