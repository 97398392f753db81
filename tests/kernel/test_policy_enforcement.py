"""NetworkPolicy enforced by the kernel: the observed probe matrix equals the model's, cell by cell.

Needs IPv4 nftables (and IPVS for the service case): marked `nat`, so it runs in the qemu lab VM unless
this host's kernel has both. Topology (namespaces this module creates and removes):

    node-1 192.168.0.1 ── veth ── 192.168.0.2 node-2        each node: a PolicySync (the agent's policy
      │ 169.254.1.1 on each pod veth, /32 routes             concern) with its own Store, fed the
      x/a x/b y/a z/a z/c (10.244.1.x)                       scenario's objects, and node-1 also an
                                      x/c y/b y/c z/b (10.244.2.x)   IPVS ServiceProxy

Pods serve TCP and UDP on 80 and 81 (and a TCP echo on 8080) from this process: listening sockets
created inside each pod's namespace, served by one selector thread. Probes come from ONE in-process
prober: sockets created per source namespace (setns on a thread per namespace), then every TCP
connect and UDP exchange of a round runs non-blocking in parallel under one deadline. A cell the model
allows but that did not answer is probed again with a longer deadline (the emulated VM can be slow);
a cell the model denies that answered is a failure at once.

Sources are the 9 pods and both nodes' own addresses (the node's own pods let it in: kubelet probes).
"""

from __future__ import annotations

import errno
import selectors
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from fabric.config import ServiceSettings
from fabric.policy import datapath
from fabric.policy.sync import PolicySync
from fabric.tracker import Store
from loadbalancer.netns import NetnsThread
from loadbalancer.proxy import ServiceProxy
from tests.policy_cases import IPS, NODES, PODS, PORTS, STEPS, Step, node_of, np, sel

pytestmark = pytest.mark.nat

NODE_IPS = {"node-1": "192.168.0.1", "node-2": "192.168.0.2"}
ECHO_PORT = 8080
ROUND_TIMEOUT, RETRY_TIMEOUT = 1.0, 4.0

Cell = tuple[str, str, str, int]  # (source name, destination pod name, protocol, port)


def pod_name(p: tuple[str, str]) -> str:
    return f"{p[0]}/{p[1]}"


class Servers:
    """Every pod's listeners, served by one selector thread: TCP 80/81 accept and close, UDP 80/81 echo,
    TCP 8080 echoes lines (for long-lived connections)."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._stop = False
        self._wake_r, self._wake_w = socket.socketpair()
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def listen(self, t: NetnsThread) -> None:
        def make() -> list[tuple[str, socket.socket]]:
            out = []
            for port in (80, 81, ECHO_PORT):
                s = socket.create_server(("0.0.0.0", port), backlog=256)
                s.setblocking(False)
                out.append(("accept-echo" if port == ECHO_PORT else "accept", s))
            for port in (80, 81):
                u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                u.bind(("0.0.0.0", port))
                u.setblocking(False)
                out.append(("udp", u))
            return out

        for kind, s in t.call(make):
            with self._lock:
                self.sel.register(s, selectors.EVENT_READ, (kind, None))

    def _loop(self) -> None:
        while not self._stop:
            for key, _ in self.sel.select(1.0):
                kind, _ = key.data
                s: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    if kind == "wake":
                        s.recv(64)
                    elif kind == "accept":
                        c, _ = s.accept()
                        c.close()
                    elif kind == "accept-echo":
                        c, _ = s.accept()
                        c.setblocking(False)
                        self.sel.register(c, selectors.EVENT_READ, ("echo", None))
                    elif kind == "echo":
                        data = s.recv(4096)
                        if data:
                            s.sendall(data)
                        else:
                            self.sel.unregister(s)
                            s.close()
                    elif kind == "udp":
                        data, peer = s.recvfrom(2048)
                        s.sendto(data, peer)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    if kind == "echo":
                        self.sel.unregister(s)
                        s.close()

    def close(self) -> None:
        self._stop = True
        self._wake_w.send(b"x")
        self.thread.join(5)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._wake_w.close()


class PolicyLab:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:5]
        self.ns = {"node-1": f"pl{tag}-n1", "node-2": f"pl{tag}-n2"}
        self.ns.update({pod_name(p): f"pl{tag}-{p[0]}{p[1]}" for p in PODS})
        self.threads: dict[str, NetnsThread] = {}
        self.servers = Servers()
        self.stores = {n: Store() for n in NODES}
        self.syncs = {n: PolicySync(n, nft_timeout=60) for n in NODES}
        self.step_times: list[tuple[str, float, float]] = []

    def batch(self, ns: str | None, lines: list[str]) -> None:
        cmd = ["ip", *(["-n", ns] if ns else []), "-batch", "-"]
        r = subprocess.run(cmd, input="\n".join(lines) + "\n", capture_output=True, text=True)
        assert r.returncode == 0, f"ip -batch {ns}: {r.stderr.strip()}"

    def build(self) -> None:
        self.batch(None, [f"netns add {n}" for n in self.ns.values()])
        n1, n2 = self.ns["node-1"], self.ns["node-2"]
        root = [f"link add eth1 netns {n1} type veth peer eth1 netns {n2}"]
        node_cmds: dict[str, list[str]] = {n1: ["link set lo up", f"addr add {NODE_IPS['node-1']}/24 dev eth1",
                                                "link set eth1 up", "route add 10.244.2.0/24 via 192.168.0.2"],
                                           n2: ["link set lo up", f"addr add {NODE_IPS['node-2']}/24 dev eth1",
                                                "link set eth1 up", "route add 10.244.1.0/24 via 192.168.0.1"]}
        for i, p in enumerate(PODS):
            node, pod = self.ns[node_of(p)], self.ns[pod_name(p)]
            root.append(f"link add vp{i} netns {node} type veth peer eth0 netns {pod}")
            node_cmds[node] += [f"addr add 169.254.1.1/32 dev vp{i}", f"link set vp{i} up",
                                f"route add {IPS[p]}/32 dev vp{i}"]
        self.batch(None, root)
        for ns, cmds in node_cmds.items():
            self.batch(ns, cmds)
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
        for p in PODS:
            self.batch(self.ns[pod_name(p)], ["link set lo up", f"addr add {IPS[p]}/32 dev eth0", "link set eth0 up",
                                              "route add 169.254.1.1 dev eth0 scope link",
                                              "route add default via 169.254.1.1 dev eth0"])
        for name, ns in self.ns.items():
            self.threads[name] = NetnsThread(ns)
        for p in PODS:
            self.servers.listen(self.threads[pod_name(p)])
        self.servers.thread.start()

    def teardown(self) -> None:
        self.servers.close()
        for n, s in self.syncs.items():
            self.threads[n].call(s.close) if n in self.threads else s.close()
        for t in self.threads.values():
            t.close()
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    # ---- policy ----------------------------------------------------------------------------------
    def apply(self, step: Step) -> None:
        """Give both nodes the step's objects (a relist: only differences are changes) and sync."""
        for node, store in self.stores.items():
            store.replace("Namespace", step.namespaces())
            store.replace("Pod", step.pods())
            store.replace("NetworkPolicy", {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p
                                            for p in step.policies})
            sync = self.syncs[node]
            self.threads[node].call(sync.run, store, store.take(), False)  # raises if the kernel refused
            assert not sync.problem_lines(), sync.problem_lines()

    def model(self, cell: Cell) -> bool:
        src, dst, proto, port = cell
        d = tuple(dst.split("/"))
        dst_ip, dst_state = IPS[d], self.syncs[node_of(d)].state  # type: ignore[index]
        if src in NODES:
            return datapath.flow(self.syncs[src].state, dst_state, NODE_IPS[src], dst_ip, proto, port,
                                 from_dst_node=node_of(d) == src)[0]  # type: ignore[arg-type]
        s = tuple(src.split("/"))
        return datapath.flow(self.syncs[node_of(s)].state, dst_state, IPS[s], dst_ip, proto, port)[0]  # type: ignore[index]

    # ---- the prober ------------------------------------------------------------------------------
    def probe(self, cells: list[Cell], timeout: float) -> dict[Cell, bool]:
        """Every cell at once: TCP connects and UDP exchanges in parallel, one deadline for all."""
        by_src: dict[str, list[Cell]] = {}
        for c in cells:
            by_src.setdefault(c[0], []).append(c)

        def make(cs: list[Cell]) -> list[tuple[Cell, socket.socket]]:
            out = []
            for c in cs:
                kind = socket.SOCK_STREAM if c[2] == "TCP" else socket.SOCK_DGRAM
                s = socket.socket(socket.AF_INET, kind)
                s.setblocking(False)
                out.append((c, s))
            return out

        socks = [cs for src, group in by_src.items() for cs in self.threads[src].call(make, group)]
        sel = selectors.DefaultSelector()
        result: dict[Cell, bool] = {}
        for c, s in socks:
            dst_ip = IPS[tuple(c[1].split("/"))]  # type: ignore[index]
            if c[2] == "TCP":
                rc = s.connect_ex((dst_ip, c[3]))
                if rc not in (0, errno.EINPROGRESS):
                    result[c] = False
                    continue
                sel.register(s, selectors.EVENT_WRITE, c)
            else:
                s.connect((dst_ip, c[3]))
                s.send(b"probe")
                sel.register(s, selectors.EVENT_READ, c)
        deadline = time.monotonic() + timeout
        while len(result) < len(socks) and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                c, s = key.data, key.fileobj
                sel.unregister(s)
                if c[2] == "TCP":
                    result[c] = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0  # type: ignore[union-attr]
                else:
                    try:
                        result[c] = s.recv(64) == b"probe"  # type: ignore[union-attr]
                    except OSError:
                        result[c] = False
        for c, s in socks:
            result.setdefault(c, False)
            s.close()
        sel.close()
        return result

    def matrix(self) -> tuple[dict[Cell, bool], dict[Cell, bool]]:
        """(observed, model) over every source x pod x port."""
        sources = [pod_name(p) for p in PODS] + list(NODES)
        cells = [(s, pod_name(d), proto, port) for s in sources for d in PODS for proto, port in PORTS]
        model = {c: self.model(c) for c in cells}
        seen = self.probe(cells, ROUND_TIMEOUT)
        slow = [c for c in cells if model[c] and not seen[c]]
        if slow:
            seen.update(self.probe(slow, RETRY_TIMEOUT))
        return seen, model


@pytest.fixture(scope="module")
def lab() -> Iterator[PolicyLab]:
    lab = PolicyLab()
    try:
        lab.build()
        yield lab
    finally:
        lab.teardown()


def _diff(seen: dict[Cell, bool], model: dict[Cell, bool]) -> list[str]:
    return [f"{c[0]} -> {c[1]} {c[2]}/{c[3]}: observed {'allowed' if seen[c] else 'denied'}, "
            f"model {'allowed' if model[c] else 'denied'}" for c in sorted(model) if seen[c] != model[c]]


def test_probe_matrix_equals_the_model_after_every_policy_change(lab: PolicyLab, capsys: pytest.CaptureFixture) -> None:
    """The upstream e2e cases (tests/policy_cases.py), applied one after the other as changes."""
    report = []
    for i, step in enumerate(STEPS):
        t0 = time.monotonic()
        lab.apply(step)
        t1 = time.monotonic()
        seen, model = lab.matrix()
        report.append(f"step {i:2d} {t1 - t0:5.2f}s apply {time.monotonic() - t1:5.2f}s probe "
                      f"{sum(model.values()):3d}/{len(model)} allowed  {step.name}")
        wrong = _diff(seen, model)
        assert not wrong, f"step {i}: {step.name}\n" + "\n".join(wrong[:40])
        # the model is the hand-written truth table too (for the pod-to-pod cells)
        for (src, dst, proto, port), allowed in model.items():
            if src not in NODES:
                s, d = tuple(src.split("/")), tuple(dst.split("/"))
                assert allowed == step.allowed(s, d, proto, port), (step.name, src, dst, proto, port)  # type: ignore[arg-type]
    with capsys.disabled():  # the time each step costs (in the VM: what this test adds), in the run's output
        print("\n" + "\n".join(report), flush=True)


class Conn:
    """A long-lived TCP connection to a pod's echo port, driven from this process."""

    def __init__(self, lab: PolicyLab, src: str, dst: tuple[str, str]) -> None:
        self.sock = lab.threads[src].call(socket.socket)
        self.sock.settimeout(5)
        self.sock.connect((IPS[dst], ECHO_PORT))

    def works(self, timeout: float = 2.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(b"ping\n")
            got = b""
            while not got.endswith(b"\n"):
                chunk = self.sock.recv(64)
                if not chunk:
                    return False
                got += chunk
            return got == b"ping\n"
        except OSError:
            return False


def test_established_connections_follow_policy_changes(lab: PolicyLab) -> None:
    base = STEPS[0]
    lab.apply(base)
    xb = ("x", "b")
    keep, cut = Conn(lab, "y/a", xb), Conn(lab, "z/a", xb)
    assert keep.works() and cut.works()
    only_y = np("only-y", "x", {"podSelector": sel(pod="b"), "ingress": [{"from": [{"namespaceSelector": sel(ns="y")}]}]})
    lab.apply(Step("x/b only from y", [only_y], base.expect))
    assert keep.works(), "an allowed connection must survive a policy change"
    assert not cut.works(), "a connection the new policy denies must stop"
    # Unrelated changes: another policy, a relabelled pod, a namespace label. The allowed one carries on.
    other = np("deny-zc", "z", {"podSelector": sel(pod="c"), "policyTypes": ["Ingress"]})
    lab.apply(Step("+ unrelated policy", [only_y, other], base.expect))
    assert keep.works()
    lab.apply(Step("+ relabels", [only_y, other], base.expect, pod_labels={("y", "c"): {"role": "x"}},
                   ns_labels={"z": {"team": "b"}}))
    assert keep.works()
    # A full resync (periodic, or after a failure) replaces the table atomically: still no interruption.
    for node, store in lab.stores.items():
        assert lab.threads[node].call(lab.syncs[node].run, store, store.take(), True).how == "full"
    assert keep.works()
    keep.sock.close()
    cut.sock.close()


def test_service_traffic_is_judged_on_the_backend_after_ipvs(lab: PolicyLab) -> None:
    """ClusterIPs on node-1 (IPVS NAT): svc-a -> x/a (node-1), svc-c -> x/c (node-2). IPVS sends the
    rewritten packet through LOCAL_OUT; the policy sees the backend, on whichever node it is."""
    proxy = ServiceProxy(ServiceSettings(cluster_cidr=["10.244.0.0/16"]), "node-1", [NODE_IPS["node-1"]],
                         netns=lab.ns["node-1"], health_bind=NODE_IPS["node-1"])
    try:
        store = Store()
        vips = {"svc-a": ("10.96.0.10", ("x", "a")), "svc-c": ("10.96.0.11", ("x", "c"))}
        for name, (vip, backend) in vips.items():
            store.upsert("Service", f"default/{name}", {"metadata": {"name": name, "namespace": "default"}, "spec": {
                "type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip],
                "ports": [{"name": "tcp", "port": 80, "targetPort": 81, "protocol": "TCP"}]}})
            store.upsert("EndpointSlice", f"default/{name}-1", {
                "metadata": {"name": f"{name}-1", "namespace": "default", "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4", "ports": [{"name": "tcp", "port": 81, "protocol": "TCP"}],
                "endpoints": [{"addresses": [IPS[backend]], "nodeName": node_of(backend),
                               "conditions": {"ready": True, "serving": True, "terminating": False}}]})
        res = proxy.apply(proxy.plan(store, store.take()))
        assert res.ok, str(res)

        def reach(src: str, vip: str) -> bool:
            def connect() -> bool:
                with socket.socket() as s:
                    s.settimeout(ROUND_TIMEOUT * 2)
                    return s.connect_ex((vip, 80)) == 0
            return lab.threads[src].call(connect)

        clients = ["y/a", "z/a"]  # both on node-1, where the virtual servers are
        cases = [
            Step("x takes only from y", [np("from-y", "x", {"podSelector": {}, "ingress": [
                {"from": [{"namespaceSelector": sel(ns="y")}]}]})], STEPS[0].expect),
            Step("y/a may send only to x/c", [np("to-xc", "y", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"],
                                                               "egress": [{"to": [{"namespaceSelector": sel(ns="x"),
                                                                                   "podSelector": sel(pod="c")}]}]})],
                 STEPS[0].expect),
        ]
        outcomes = set()
        for step in cases:
            lab.apply(step)
            for src in clients:
                for name, (vip, backend) in vips.items():
                    want = lab.model((src, pod_name(backend), "TCP", 81))
                    assert reach(src, vip) == want, (step.name, src, name, want)
                    outcomes.add((step.name, want))
        assert {w for _, w in outcomes} == {True, False}  # each case allowed some and denied some
    finally:
        proxy.close()
        lab.apply(STEPS[0])
