"""The service proxy for real: IPVS + nftables in a node namespace, real packets from pods and outside.

Topology (built once for this module, names unique, removed at the end):

    pod1 10.244.1.2 (node-a)  ─┐
    pod2 10.244.1.3 (node-a)  ─┤ veth, Calico-style /32 routes   node ns: ServiceProxy(netns=node)
    pod3 10.244.1.4 (node-a)  ─┤ (169.254.1.1 gateway on         fabric-svc dummy, IPVS, nft table
    client 10.244.1.9         ─┘  every node-side veth)
    ext 192.168.100.2 ── veth ── 192.168.100.1 (the node's address; NodePorts live here)

Pods run a TCP+UDP echo server that answers "<pod> <peer-ip>" so a test sees which backend answered
and which source address it saw. Traffic never leaves these namespaces.
Hairpin, loadBalancerSourceRanges and the UDP conntrack flush need IPv4 nftables NAT, which the UML
lab kernel lacks: they are in test_lb_nat.py (marked `nat`, run in the qemu lab VM).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from fabric.config import ServiceSettings
from fabric.tracker import Store
from loadbalancer import ipvs_kernel as k
from loadbalancer.proxy import ServiceProxy
from loadbalancer.types import SVC_F_SCHED_FALLBACK, VirtualServer

pytestmark = pytest.mark.kernel

ECHO = r'''
import socket, sys, threading
name = sys.argv[1]
def tcp_conn(c, peer):
    f = c.makefile("rwb", buffering=0)
    for line in f:
        f.write(f"{name} {peer[0]}\n".encode())
def tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 8080)); s.listen(64)
    while True:
        c, peer = s.accept()
        threading.Thread(target=tcp_conn, args=(c, peer), daemon=True).start()
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 5353))
    while True:
        data, peer = u.recvfrom(2048)
        u.sendto(f"{name} {peer[0]}\n".encode(), peer)
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
tcp()
'''

CLIENT = r'''
import json, socket, sys
proto, ip, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
out = []
for _ in range(n):
    try:
        if proto == "tcp":
            s = socket.create_connection((ip, port), timeout=3)
            s.sendall(b"hi\n"); out.append(s.makefile().readline().strip()); s.close()
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
            s.sendto(b"hi", (ip, port)); out.append(s.recv(2048).decode().strip()); s.close()
    except OSError as e:
        out.append(f"ERROR {e.__class__.__name__}")
print(json.dumps(out))
'''

# One new TCP connection from each given source address; "refused" / "ERROR ..." when it fails.
FROM_EACH = r'''
import json, socket, sys
ip, port, sources = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
out = []
for src in sources:
    s = socket.socket()
    s.settimeout(3)
    try:
        s.bind((src, 0)); s.connect((ip, port)); s.sendall(b"hi\n")
        out.append(s.makefile().readline().split()[0])
    except ConnectionRefusedError:
        out.append("refused")
    except OSError as e:
        out.append(f"ERROR {e.__class__.__name__}")
    finally:
        s.close()
print(json.dumps(out))
'''

# An open connection driven line by line through stdin/stdout (for the draining test).
HOLD = r'''
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
f = s.makefile("rwb", buffering=0)
for _ in sys.stdin:
    f.write(b"hi\n"); print(f.readline().decode().strip(), flush=True)
'''

PODS = {"pod1": "10.244.1.2", "pod2": "10.244.1.3", "pod3": "10.244.1.4", "client": "10.244.1.9"}
NODE_IP, EXT_IP = "192.168.100.1", "192.168.100.2"
LB_IP = "172.16.0.10"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


class Lab:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns = {n: f"lb{tag}-{n}" for n in ["node", "ext", *PODS]}
        self.dir = Path(tempfile.mkdtemp(prefix="lb-lab-"))
        (self.dir / "echo.py").write_text(ECHO)
        (self.dir / "client.py").write_text(CLIENT)
        (self.dir / "hold.py").write_text(HOLD)
        (self.dir / "from_each.py").write_text(FROM_EACH)
        self.procs: list[subprocess.Popen] = []

    def ex(self, ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.ns[ns], *cmd, check=check)

    def build(self) -> None:
        for n in self.ns.values():
            sh("ip", "netns", "add", n)
            sh("ip", "-n", n, "link", "set", "lo", "up")
        node = self.ns["node"]
        for i, (pod, ip) in enumerate(PODS.items()):
            host = f"vp{i}"
            sh("ip", "link", "add", host, "netns", node, "type", "veth", "peer", "eth0", "netns", self.ns[pod])
            sh("ip", "-n", node, "addr", "add", "169.254.1.1/32", "dev", host)
            sh("ip", "-n", node, "link", "set", host, "up")
            sh("ip", "-n", node, "route", "add", f"{ip}/32", "dev", host)
            p = self.ns[pod]
            sh("ip", "-n", p, "addr", "add", f"{ip}/32", "dev", "eth0")
            sh("ip", "-n", p, "link", "set", "eth0", "up")
            sh("ip", "-n", p, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
            sh("ip", "-n", p, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
        sh("ip", "link", "add", "vext", "netns", node, "type", "veth", "peer", "eth0", "netns", self.ns["ext"])
        sh("ip", "-n", node, "addr", "add", f"{NODE_IP}/24", "dev", "vext")
        sh("ip", "-n", node, "link", "set", "vext", "up")
        sh("ip", "-n", self.ns["ext"], "addr", "add", f"{EXT_IP}/24", "dev", "eth0")
        sh("ip", "-n", self.ns["ext"], "link", "set", "eth0", "up")
        for net in ("10.96.0.0/16", f"{LB_IP}/32"):
            sh("ip", "-n", self.ns["ext"], "route", "add", net, "via", NODE_IP)
        for pod in ("pod1", "pod2", "pod3"):
            p = subprocess.Popen(["ip", "netns", "exec", self.ns[pod], sys.executable, str(self.dir / "echo.py"), pod],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.procs.append(p)
        for p in self.procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"

    def request(self, src: str, proto: str, ip: str, port: int, n: int = 1) -> list[str]:
        r = self.ex(src, sys.executable, str(self.dir / "client.py"), proto, ip, str(port), str(n))
        return json.loads(r.stdout)

    def from_each(self, ns: str, ip: str, port: int, sources: list[str]) -> list[str]:
        r = self.ex(ns, sys.executable, str(self.dir / "from_each.py"), ip, str(port), *sources)
        return json.loads(r.stdout)

    def hold(self, src: str, ip: str, port: int) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[src], sys.executable, str(self.dir / "hold.py"), ip,
                              str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def teardown(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for n in self.ns.values():
            sh("ip", "netns", "del", n, check=False)
        for f in self.dir.iterdir():
            f.unlink()
        self.dir.rmdir()


def ask(p: subprocess.Popen) -> str:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write("x\n")
    p.stdin.flush()
    return p.stdout.readline().strip()


def svc(name: str, ip: str, ports: list[dict], typ: str = "ClusterIP", **spec: Any) -> dict:
    s = {"metadata": {"name": name, "namespace": "default"},
         "spec": {"type": typ, "clusterIP": ip, "clusterIPs": [ip], "ports": ports, **spec}}
    return s


def eps(name: str, pods: dict[str, dict], ports=(("tcp", 8080, "TCP"), ("dns", 5353, "UDP"))) -> dict:
    """pods: name -> conditions (+ optional "node")."""
    return {"metadata": {"name": f"{name}-abc", "namespace": "default", "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": n, "port": p, "protocol": pr} for n, p, pr in ports],
            "endpoints": [{"addresses": [PODS[p]], "nodeName": c.get("node", "node-a"),
                           "conditions": {k: v for k, v in c.items() if k != "node"}} for p, c in pods.items()]}


READY = {"ready": True, "serving": True, "terminating": False}
TCP_UDP = [{"name": "tcp", "port": 80, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}]


@pytest.fixture(scope="module")
def lab():
    lab = Lab()
    try:
        lab.build()
        yield lab
    finally:
        lab.teardown()


@pytest.fixture(scope="module")
def proxy(lab: Lab):
    settings = ServiceSettings(cluster_cidr=["10.244.0.0/16"])
    p = ServiceProxy(settings, "node-a", [NODE_IP], netns=lab.ns["node"], health_bind=NODE_IP)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def store() -> Store:
    return Store()


def sync(proxy: ServiceProxy, store: Store):
    plan = proxy.plan(store, store.take())
    res = proxy.apply(plan)
    assert res.ok, str(res)
    if plan.full and proxy.kernel.nft_available():
        assert res.warnings and "nftables unusable" in res.warnings[0]
    return plan


def set_service(store: Store, s: dict, sl: dict | None) -> None:
    key = f"default/{s['metadata']['name']}"
    store.upsert("Service", key, s)
    if sl is not None:
        store.upsert("EndpointSlice", f"default/{sl['metadata']['name']}", sl)


def kernel_matches(proxy: ServiceProxy) -> None:
    desired = proxy.desired()
    actual = {k: v for k, v in proxy.kernel.ipvs_dump().items() if k in desired or k[1] in proxy.kernel.addresses()}
    assert actual == desired
    # per-key reads (a failed service's repair) see what the dump sees; an absent key is left out
    assert proxy.kernel.ipvs_get([*desired, ("TCP", "10.96.255.255", 1)]) == desired


# ---------------------------------------------------------------------------------------------


def test_clusterip_tcp_udp_round_robin(lab: Lab, proxy: ServiceProxy, store: Store) -> None:
    set_service(store, svc("web", "10.96.0.10", TCP_UDP), eps("web", {"pod1": READY, "pod2": READY}))
    plan = sync(proxy, store)
    assert plan.full  # the first plan compares with the kernel
    got = lab.request("client", "tcp", "10.96.0.10", 80, 6)
    assert {g.split()[0] for g in got} == {"pod1", "pod2"}, got
    assert all(g.split()[1] == PODS["client"] for g in got)  # in-cluster client: no masquerade
    udp = lab.request("client", "udp", "10.96.0.10", 53, 4)
    assert {g.split()[0] for g in udp} == {"pod1", "pod2"}, udp
    kernel_matches(proxy)


def test_nodeport_from_outside_is_masqueraded(lab: Lab, proxy: ServiceProxy, store: Store) -> None:
    ports = [{"name": "tcp", "port": 80, "protocol": "TCP", "nodePort": 30080}]
    set_service(store, svc("np", "10.96.0.20", ports, "NodePort"), eps("np", {"pod2": READY}, ports=(("tcp", 8080, "TCP"),)))
    sync(proxy, store)
    got = lab.request("ext", "tcp", NODE_IP, 30080, 2)
    assert [g.split()[0] for g in got] == ["pod2", "pod2"], got
    if proxy.kernel.nft_available() is None:
        assert got[0].split()[1] != EXT_IP  # ETP Cluster: the backend sees the node, not the client


def test_etp_local_keeps_client_ip_and_health_check(lab: Lab, proxy: ServiceProxy, store: Store) -> None:
    ports = [{"name": "tcp", "port": 80, "protocol": "TCP", "nodePort": 30081}]
    s = svc("loc", "10.96.0.21", ports, "LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=31000)
    s["status"] = {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
    sl = eps("loc", {"pod1": {**READY, "node": "node-b"}, "pod3": READY}, ports=(("tcp", 8080, "TCP"),))
    set_service(store, s, sl)
    sync(proxy, store)
    for ip, port in ((NODE_IP, 30081), (LB_IP, 80)):
        got = lab.request("ext", "tcp", ip, port, 4)
        assert got == [f"pod3 {EXT_IP}"] * 4, got  # only the local endpoint; real client address
    code = lab.ex("ext", sys.executable, "-c", "import urllib.request as u\n"
                  f"r = u.urlopen('http://{NODE_IP}:31000/'); print(r.status, r.read().decode())")
    status, body = code.stdout.split(" ", 1)
    assert status == "200" and json.loads(body)["localEndpoints"] == 1
    # no local endpoint left -> 503
    sl2 = eps("loc", {"pod1": {**READY, "node": "node-b"}}, ports=(("tcp", 8080, "TCP"),))
    set_service(store, s, sl2)
    sync(proxy, store)
    r = lab.ex("ext", sys.executable, "-c", "import urllib.request as u, urllib.error as e\n"
               f"try: u.urlopen('http://{NODE_IP}:31000/')\nexcept e.HTTPError as x: print(x.code)")
    assert r.stdout.strip() == "503"


def test_session_affinity_sticks(lab: Lab, proxy: ServiceProxy, store: Store) -> None:
    s = svc("sticky", "10.96.0.30", TCP_UDP, sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    set_service(store, s, eps("sticky", {"pod1": READY, "pod2": READY, "pod3": READY}))
    sync(proxy, store)
    got = lab.request("client", "tcp", "10.96.0.30", 80, 6)
    assert len({g.split()[0] for g in got}) == 1, got
    assert proxy.kernel.ipvs_dump()[("TCP", "10.96.0.30", 80)].persistence == 60
    # options change in place (IPVS "set", not delete+add): scheduler from the annotation, no persistence
    s2 = svc("sticky", "10.96.0.30", TCP_UDP)
    s2["metadata"]["annotations"] = {"bgp-fabric.io/scheduler": "wrr"}
    set_service(store, s2, None)
    plan = sync(proxy, store)
    assert len(plan.vs_update) == 2 and not plan.vs_add and not plan.vs_delete
    v = proxy.kernel.ipvs_dump()[("TCP", "10.96.0.30", 80)]
    assert (v.scheduler, v.persistence, len(v.reals)) == ("wrr", 0, 3)


def test_scale_terminate_drain_and_resync(lab: Lab, proxy: ServiceProxy, store: Store) -> None:
    set_service(store, svc("scale", "10.96.0.40", TCP_UDP), eps("scale", {"pod1": READY}))
    sync(proxy, store)
    vs = ("TCP", "10.96.0.40", 80)
    assert [r.addr for r in proxy.kernel.ipvs_dump()[vs].reals] == [PODS["pod1"]]
    # scale up: the new endpoints are in IPVS after one incremental apply that touches only this service
    set_service(store, svc("scale", "10.96.0.40", TCP_UDP), eps("scale", {"pod1": READY, "pod2": READY}))
    plan = sync(proxy, store)
    assert not plan.full and set(plan.services) == {"default/scale"}
    assert [r.addr for r in proxy.kernel.ipvs_dump()[vs].reals] == [PODS["pod1"], PODS["pod2"]]

    conn = lab.hold("client", "10.96.0.40", 80)
    first = ask(conn).split()[0]
    other = "pod2" if first == "pod1" else "pod1"
    # the backend of the open connection starts terminating: weight 0, connection keeps working
    term = {"ready": False, "serving": True, "terminating": True}
    set_service(store, svc("scale", "10.96.0.40", TCP_UDP), eps("scale", {first: term, other: READY}))
    sync(proxy, store)
    weights = {r.addr: r.weight for r in proxy.kernel.ipvs_dump()[vs].reals}
    assert weights == {PODS[first]: 0, PODS[other]: 1}
    assert ask(conn).split()[0] == first
    assert {g.split()[0] for g in lab.request("client", "tcp", "10.96.0.40", 80, 4)} == {other}
    conn.kill()
    # scale down: gone from the slice -> gone from IPVS
    set_service(store, svc("scale", "10.96.0.40", TCP_UDP), eps("scale", {other: READY}))
    sync(proxy, store)
    assert [r.addr for r in proxy.kernel.ipvs_dump()[vs].reals] == [PODS[other]]
    kernel_matches(proxy)

    # an outsider deletes a destination and a virtual server; resync repairs both from one dump
    lab.ex("node", "ipvsadm", "-d", "-t", "10.96.0.10:80", "-r", f"{PODS['pod2']}:8080")
    lab.ex("node", "ipvsadm", "-D", "-u", "10.96.0.40:53")
    plan = proxy.resync()
    assert plan.full and plan.real_add and any(v.key == ("UDP", "10.96.0.40", 53) for v in plan.vs_add), str(plan)
    assert proxy.apply(plan).ok
    kernel_matches(proxy)
    assert not proxy.resync()  # nothing left to do


def test_sh_with_a_terminating_endpoint_refuses_no_client(lab: Lab, proxy: ServiceProxy, store: Store) -> None:
    """Finding 15: sh hashes each client address onto one destination; a terminating one stays at weight 0
    and, without IP_VS_SVC_F_SCHED_SH_FALLBACK, the clients hashed onto it are refused."""
    sources = [f"192.168.100.{i}" for i in range(100, 150)]
    subprocess.run(["ip", "-n", lab.ns["ext"], "-batch", "-"], check=True, text=True,
                   input="".join(f"addr add {a}/24 dev eth0\n" for a in sources))
    s = svc("shsvc", "10.96.0.60", [{"name": "tcp", "port": 80, "protocol": "TCP"}])
    s["metadata"]["annotations"] = {"bgp-fabric.io/scheduler": "sh"}
    term = {"ready": False, "serving": True, "terminating": True}
    set_service(store, s, eps("shsvc", {"pod1": READY, "pod2": term}, ports=(("tcp", 8080, "TCP"),)))
    sync(proxy, store)
    key = ("TCP", "10.96.0.60", 80)
    v = proxy.kernel.ipvs_dump()[key]
    assert {r.addr: r.weight for r in v.reals} == {PODS["pod1"]: 1, PODS["pod2"]: 0}
    assert v.flags == SVC_F_SCHED_FALLBACK and "sh-fallback" in str(v)
    assert lab.from_each("ext", "10.96.0.60", 80, sources) == ["pod1"] * 50  # 50 of 50 new connections

    # The same virtual server without the flag (as the proxy programmed it before): clients are refused.
    assert not proxy.kernel.ipvs_run([k.op_set_vs(VirtualServer(*key, "sh", flags=0))])
    without = lab.from_each("ext", "10.96.0.60", 80, sources)
    assert set(without) == {"pod1", "refused"} and without.count("refused") >= 5, without
    plan = proxy.resync()  # the flag is part of the compared options: drift is repaired
    assert [x.key for x in plan.vs_update] == [key] and proxy.apply(plan).ok
    assert lab.from_each("ext", "10.96.0.60", 80, sources) == ["pod1"] * 50


def test_delete_service_removes_everything(lab: Lab, proxy: ServiceProxy, store: Store) -> None:
    set_service(store, svc("gone", "10.96.0.50", TCP_UDP), eps("gone", {"pod1": READY}))
    sync(proxy, store)
    assert "10.96.0.50" in proxy.kernel.addresses()
    store.delete("Service", "default/gone")
    store.delete("EndpointSlice", "default/gone-abc")
    sync(proxy, store)
    assert "10.96.0.50" not in proxy.kernel.addresses()
    assert not [k for k in proxy.kernel.ipvs_dump() if k[1] == "10.96.0.50"]
    assert "10.96.0.50" not in proxy.kernel.nft_list()
    kernel_matches(proxy)


def test_objects_live_only_in_the_proxy_namespace(proxy: ServiceProxy) -> None:
    # The proxy's netlink sockets were opened inside its namespace: nothing leaked into ours.
    assert "10.96.0.10" in proxy.kernel.addresses()
    ours = subprocess.run(["ipvsadm", "-Ln"], capture_output=True, text=True).stdout
    assert "10.96.0.10" not in ours and ":0050" not in open("/proc/net/ip_vs").read()
    assert "fabric-svc" not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout


def test_fresh_namespace_with_lo_down_works() -> None:
    # IPVS refuses masquerade destinations while lo is down; the adapter brings lo up itself.
    ns = f"lbfresh-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", ns)
    p = ServiceProxy(ServiceSettings(), "node-a", ["192.168.200.1"], netns=ns)
    try:
        st = Store()
        set_service(st, svc("f", "10.96.7.7", TCP_UDP), eps("f", {"pod1": READY}))
        res = p.apply(p.plan(st, st.take()))
        assert res.ok, str(res)
        assert [r.addr for r in p.kernel.ipvs_dump()[("TCP", "10.96.7.7", 80)].reals] == [PODS["pod1"]]
    finally:
        p.close()
        sh("ip", "netns", "del", ns)
