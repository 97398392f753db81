"""Real agents fed by a Kubernetes API server (the fake one, as a process): issue 5 acceptance.

Topology (tests.kernel.meshlab): router `r` with rack A (10.0.1.0/24) and rack B (10.0.2.0/24);
agents on a1, a2 (rack A) and b1 (rack B), each with `source: {kind: kubernetes, kubeconfig: ...}`
and NODE_NAME set, and no pod CIDRs in their config files: pod CIDRs come from the Nodes'
`spec.podCIDRs`, pools from IPPool objects. The API server listens on the router's 10.0.1.1:6443
(reachable from both racks); the test drives it through its control socket.

The router also runs a top-of-rack BGP speaker (real FRR, graceful restart) that rack A's agents peer
with (a peer of their config files, so known before any list): it is where the pod CIDRs are announced.

The tests run in file order on one lab: a node joins, a service appears, watches break and expire,
the API server goes away and comes back (also while an agent restarts: the ToR must not flush that
node's pod CIDR, finding 5), `fabric plan` on the Kubernetes source finds nothing to change, bad custom
resources are refused, then everything is deleted again.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from fabric.lab import frr as lab_frr
from fabric.lab.kinds import FrrSpec
from fabric.lab.procs import Processes
from tests.fakeapi.control import FakeApiControl
from tests.kernel.meshlab import FABRIC, MeshLab, Node, sh, wait_for

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
API_ADDR = "10.0.1.1:6443"
CLUSTER_IP = "10.96.0.10"
CONVERGE = 90  # seconds: BGP sessions of Python speakers sharing the lab kernel's one CPU
TOR_CONF = """frr defaults traditional
hostname tor
router bgp 65000
 bgp router-id 10.0.1.1
 no bgp ebgp-requires-policy
 bgp graceful-restart
 bgp graceful-restart stalepath-time 300
 neighbor 10.0.1.11 remote-as 64512
 neighbor 10.0.1.11 timers 3 9
 neighbor 10.0.1.11 timers connect 1
 neighbor 10.0.1.12 remote-as 64512
 neighbor 10.0.1.12 timers 3 9
 neighbor 10.0.1.12 timers connect 1
"""


def k8s_node(n: Node) -> dict[str, Any]:
    return {"metadata": {"name": n.name, "labels": {"rack": n.rack}},
            "spec": {"podCIDR": n.pod_cidr, "podCIDRs": [n.pod_cidr]},
            "status": {"addresses": [{"type": "Hostname", "address": n.name},
                                     {"type": "InternalIP", "address": n.address}]}}


def ip_pool(mode: str) -> dict[str, Any]:
    return {"metadata": {"name": "default"}, "spec": {"cidr": "10.244.0.0/16", "ipipMode": mode}}


def service() -> dict[str, Any]:
    return {"metadata": {"name": "web", "namespace": "default"},
            "spec": {"type": "ClusterIP", "clusterIP": CLUSTER_IP, "clusterIPs": [CLUSTER_IP],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}


def endpoint_slice(nodes: list[Node]) -> dict[str, Any]:
    return {"metadata": {"name": "web-abc", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [n.pod_ip], "nodeName": n.name,
                           "conditions": {"ready": True, "serving": True, "terminating": False}}
                          for n in nodes]}


# A pod's web server: answers every connection with its node's name.
POD_SERVER = textwrap.dedent('''
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], 8080)); s.listen(16); print("ready", flush=True)
    while True:
        c, _ = s.accept(); c.sendall(sys.argv[2].encode() + b"\\n"); c.close()
''')
CLIENT = textwrap.dedent('''
    import socket, sys
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    print(c.recv(100).decode().strip())
''')


class K8sLab(MeshLab):
    """MeshLab whose agents read the cluster from the fake API server instead of a file."""

    api: subprocess.Popen | None = None

    @property
    def control(self) -> FakeApiControl:
        return FakeApiControl(str(self.workdir / "api.sock"))

    def write_agent_config(self, n: Node) -> None:
        doc = {
            "node": {"name": n.name, "address": f"{n.address}/24"},  # pod CIDRs: from the Node object
            "pools": [{"cidr": "10.244.0.0/16", "ipipMode": "CrossSubnet"}],
            "timers": {"holdTime": self.hold_time, "gracefulRestartTime": self.gr_time, "resyncInterval": 30},
            "services": {"enabled": True, "clusterCidr": ["10.244.0.0/16"]},
            "source": {"kind": "kubernetes", "kubeconfig": str(self.workdir / "kubeconfig")},
            "paths": {"runDir": f"run-{n.name}"},
            "health": {"listen": None},
        }
        if n.rack == "a":
            doc["peers"] = [{"name": "rack-tor", "address": "10.0.1.1", "asn": 65000}]
        self.config_path(n).write_text(yaml.safe_dump(doc))

    def start_api(self) -> None:
        log = open(self.workdir / "api.log", "ab")
        self.api = subprocess.Popen(
            ["ip", "netns", "exec", self.router, sys.executable, "-m", "tests.fakeapi", "--listen", API_ADDR,
             "--control", str(self.workdir / "api.sock"), "--state", str(self.workdir / "api-state.json"),
             "--kubeconfig", str(self.workdir / "kubeconfig")],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True)
        log.close()
        assert self.api.stdout is not None
        line = self.api.stdout.readline()
        assert line.startswith("ready "), f"fake API server did not start: {line!r} {self.api_log()}"

    def stop_api(self) -> None:
        if self.api is not None and self.api.poll() is None:
            self.api.terminate()
            self.api.wait(timeout=20)
        self.api = None

    def api_log(self) -> str:
        p = self.workdir / "api.log"
        return p.read_text(errors="replace")[-2000:] if p.exists() else ""

    def start_agent(self, n: Node) -> None:
        log = open(self.workdir / f"{n.name}.log", "ab")
        env = dict(os.environ, NODE_NAME=n.name, POD_NAMESPACE="bgp-fabric")
        n.proc = subprocess.Popen(["ip", "netns", "exec", n.ns, FABRIC, "agent", "-c", str(self.config_path(n))],
                                  stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
                                  env=env)
        log.close()

    def close(self) -> None:
        try:
            super().close()  # agents first: they must not see the API server vanish and do anything
        finally:
            if self.api is not None and self.api.poll() is None:
                self.api.kill()
                self.api.wait()

    # -- what the dataplane holds ---------------------------------------------------------------
    def ipvs(self, n: Node) -> str:
        """`ipvsadm -Ln` without the connection counters (they move as old connections expire)."""
        lines = []
        for line in sh(f"ip netns exec {n.ns} ipvsadm -Ln").stdout.splitlines():
            lines.append(" ".join(line.split()[:4]) if line.strip().startswith("->") else line.strip())
        return "\n".join(lines) + "\n"

    def dataplane(self) -> dict[str, tuple[str, str, str]]:
        """Per node: our routes, the tunnel device, IPVS. Equal snapshots = nothing was touched."""
        out = {}
        for n in self.nodes:
            tunnel = sh(f"ip -n {n.ns} -d addr show dev tunl0", check=False).stdout
            out[n.name] = (sh(f"ip -n {n.ns} route show proto 80").stdout, tunnel, self.ipvs(n))
        return out

    def warnings(self, n: Node) -> list[str]:
        return list(self.status(n).get("warnings", []))


def mesh_established(lab: K8sLab, n: Node) -> set[str]:
    return {p["name"] for p in lab.status(n).get("peers", []) if p.get("state") == "established" and p["kind"] == "mesh"}


def tor_routes(lab: K8sLab) -> str:
    return sh(f"ip -n {lab.router} route show proto bgp").stdout


def routed(lab: K8sLab, n: Node, to: Node) -> bool:
    return f"{to.pod_cidr} via {to.address} dev {'eth1' if n.rack == to.rack else 'tunl0'}" in lab.routes(n)


def diagnose(lab: K8sLab) -> str:
    parts = [f"--- api\n{lab.api_log()}"]
    for n in lab.nodes:
        parts.append(f"--- {n.name}\n{lab.routes(n)}{lab.ipvs(n)}\n{lab.log_tail(n, 30)}")
    return "\n".join(parts)


class RouteMonitor:
    """`ip monitor route` in every node namespace: what changed in the kernel while it ran."""

    def __init__(self, lab: K8sLab) -> None:
        self.files = {n.name: lab.workdir / f"monitor-{n.name}.txt" for n in lab.nodes}
        self.procs = []
        for n in lab.nodes:
            with open(self.files[n.name], "wb") as f:
                p = subprocess.Popen(["ip", "-n", n.ns, "monitor", "route"], stdout=f, stderr=subprocess.STDOUT)
            self.procs.append(p)
            lab.extra_procs.append(p)
        # Subscribed yet? A route that is not ours (proto 81, a blackhole: no traffic) must show up.
        def probe() -> bool:
            for n in lab.nodes:
                if "192.0.2.1" not in self.files[n.name].read_text():
                    sh(f"ip -n {n.ns} route add blackhole 192.0.2.1/32 proto 81; "
                       f"ip -n {n.ns} route del blackhole 192.0.2.1/32 proto 81")
            return all("192.0.2.1" in f.read_text() for f in self.files.values())
        wait_for(probe, 10, "every route monitor to be listening", step=0.3)

    def stop(self) -> dict[str, list[str]]:
        """Lines about our routes (proto 80) seen per node."""
        for p in self.procs:
            p.terminate()
            p.wait(timeout=10)
        return {name: [line for line in f.read_text().splitlines() if "proto 80" in line]
                for name, f in self.files.items()}


@pytest.fixture(scope="module")
def lab() -> Iterator[K8sLab]:
    nodes = [Node("a1", "a", 1, "10.0.1.11"), Node("a2", "a", 2, "10.0.1.12"), Node("b1", "b", 3, "10.0.2.21")]
    m = K8sLab(nodes, hold_time=9, gr_time=60)
    procs = Processes()
    try:
        m.build()
        conf = m.workdir / "tor.conf"
        conf.write_text(TOR_CONF)
        names = lab_frr.start(procs, "tor", m.router, FrrSpec(config=conf, daemons=("bgpd",)), m.workdir, None)
        lab_frr.wait_ready(m.router, names, time.monotonic() + 30, lambda: True)
        lab_frr.load_config("tor", m.router, conf, m.workdir / "vtysh.log")
        m.start_api()
        api = m.control
        api.apply("IPPool", ip_pool("CrossSubnet"))
        for n in (m.node("a1"), m.node("b1")):  # a2 joins in the first test
            api.apply("Node", k8s_node(n))
        m.start()
        a1, b1 = m.node("a1"), m.node("b1")
        try:
            wait_for(lambda: routed(m, a1, b1) and routed(m, b1, a1), CONVERGE, "a1 and b1 to route each other")
        except AssertionError:
            print(diagnose(m))
            raise
        yield m
    finally:
        procs.stop_all()
        m.close()
        lab_frr.cleanup(m.router)


@contextlib.contextmanager
def diagnosed(lab: K8sLab) -> Iterator[None]:
    """Print what the agents and the API server said when the block fails."""
    try:
        yield
    except BaseException:
        print(diagnose(lab))
        raise


def with_diagnosis(fn):  # type: ignore[no-untyped-def]
    @functools.wraps(fn)
    def wrapper(lab: K8sLab) -> None:
        with diagnosed(lab):
            fn(lab)
    return wrapper


def all_watching(api: FakeApiControl, watches: dict[str, int]) -> bool:
    """Every agent (3) re-opened a watch on every kind since `watches` was read, and watches now."""
    st = api.stats()
    return all(st["watches"][k] >= watches[k] + 3 and st["watchers"][k] == 3 for k in watches)


# ---------------------------------------------------------------------------------------------------

@with_diagnosis
def test_node_object_makes_every_agent_peer_and_route(lab: K8sLab) -> None:
    a1, a2, b1 = lab.node("a1"), lab.node("a2"), lab.node("b1")
    assert a2.pod_cidr not in lab.routes(a1) + lab.routes(b1)
    assert "a2" not in lab.established(a1)
    monitor = RouteMonitor(lab)  # proves the monitor sees our route changes (later tests expect none)
    try:
        lab.control.apply("Node", k8s_node(a2))
        wait_for(lambda: all(routed(lab, n, m) for n in lab.nodes for m in lab.nodes if m is not n), CONVERGE,
                 "every agent to route every node's pod CIDR (a2 included)")
    finally:
        seen = monitor.stop()
    assert any(line.startswith(f"{a2.pod_cidr} via {a2.address} dev eth1") for line in seen["a1"]), seen
    wait_for(lambda: all(mesh_established(lab, n) == {m.name for m in lab.nodes if m is not n} for n in lab.nodes),
             30, "every agent's status to show its sessions to the two others established")
    wait_for(lambda: all(n.pod_cidr in tor_routes(lab) for n in (a1, a2)), 30, "the ToR to route rack A's pods")
    # a2's own pod CIDR came from its Node object: it blackholes the unused part of it
    assert f"blackhole {a2.pod_cidr} proto 80" in lab.routes(a2)
    assert lab.ping(a2, b1) and lab.ping(b1, a2) and lab.ping(a1, a2)


@with_diagnosis
def test_service_and_endpoint_slice_program_ipvs_on_every_node(lab: K8sLab) -> None:
    a1, a2, b1 = lab.node("a1"), lab.node("a2"), lab.node("b1")
    server = subprocess.Popen(["ip", "netns", "exec", b1.pod_ns, sys.executable, "-c", POD_SERVER, b1.pod_ip, "b1"],
                              stdout=subprocess.PIPE, text=True)
    lab.extra_procs.append(server)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    lab.control.apply("Service", service())
    lab.control.apply("EndpointSlice", endpoint_slice([b1]))
    virtual = f"TCP  {CLUSTER_IP}:80 rr"
    wait_for(lambda: all(virtual in lab.ipvs(n) and f"-> {b1.pod_ip}:8080" in lab.ipvs(n) for n in lab.nodes),
             30, "the ClusterIP in IPVS on every node")
    for n in lab.nodes:
        assert f"-> {b1.pod_ip}:8080 Masq 1" in lab.ipvs(n), lab.ipvs(n)
    # real packets: a pod on a1 (other rack) and one on a2 reach b1's pod through the ClusterIP
    for src in (a1, a2):
        r = sh(f"ip netns exec {src.pod_ns} {sys.executable} -c '{CLIENT}' {CLUSTER_IP} 80", check=False)
        assert r.stdout.strip() == "b1", f"{src.name} -> {CLUSTER_IP}: {r.stdout!r} {r.stderr!r}"


@with_diagnosis
def test_broken_watch_and_410_change_nothing_then_converge(lab: K8sLab) -> None:
    a1, a2, b1 = lab.node("a1"), lab.node("a2"), lab.node("b1")
    api = lab.control
    before = lab.dataplane()
    monitor = RouteMonitor(lab)
    try:
        st = api.stats()
        api.drop_watches()
        wait_for(lambda: all_watching(api, st["watches"]), 30, "every agent to watch again after the drop")
        assert api.stats()["lists"] == st["lists"], "a dropped watch must resume, not relist"
        assert lab.dataplane() == before
        st = api.stats()
        api.expire_watches()
        wait_for(lambda: all(api.stats()["lists"][k] >= st["lists"][k] + 3 for k in st["lists"]), 30,
                 "every agent to relist every kind after 410")
        wait_for(lambda: all_watching(api, st["watches"]), 30, "every agent to watch again after 410")
        assert lab.dataplane() == before
    finally:
        seen = monitor.stop()
    assert seen == {n.name: [] for n in lab.nodes}, f"our routes changed during the break: {seen}"
    # converged afterwards: a change made now reaches every node's IPVS
    lab.control.apply("EndpointSlice", endpoint_slice([b1, a2]))
    wait_for(lambda: all(f"-> {a2.pod_ip}:8080" in lab.ipvs(n) for n in lab.nodes), 30, "a2's pod in IPVS everywhere")
    assert all(routed(lab, n, m) for n in lab.nodes for m in lab.nodes if m is not n)
    assert lab.ping(a1, b1)


@with_diagnosis
def test_api_server_outage_keeps_dataplane_and_relists_without_flush(lab: K8sLab) -> None:
    a1, b1 = lab.node("a1"), lab.node("b1")
    before = lab.dataplane()
    monitor = RouteMonitor(lab)
    try:
        lab.stop_api()
        # The outage: agents retry with backoff. Long enough for several failed attempts each.
        subprocess.run(["sleep", "8"], check=True)
        assert lab.dataplane() == before, "the dataplane changed while the API server was down"
        assert all(n.proc is not None and n.proc.poll() is None for n in lab.nodes)
        lab.start_api()  # same objects (state file); a restarted server has no watch history: 410, relist
        api = lab.control
        wait_for(lambda: all(v >= 3 for v in api.stats()["lists"].values()), 60, "every agent to relist every kind")
        wait_for(lambda: all_watching(api, {k: 0 for k in api.stats()["watches"]}), 30, "every agent to watch again")
        assert lab.dataplane() == before
    finally:
        seen = monitor.stop()
        if lab.api is None:
            lab.start_api()
    assert seen == {n.name: [] for n in lab.nodes}, f"routes deleted/re-added across the outage: {seen}"
    for n in lab.nodes:
        assert not [w for w in lab.warnings(n) if "Node/" in w or "IPPool" in w], lab.warnings(n)
    # and the agents follow the restarted server: a change now reaches them
    lab.control.apply("EndpointSlice", endpoint_slice([b1]))
    wait_for(lambda: all(f"-> {lab.node('a2').pod_ip}:8080" not in lab.ipvs(n) for n in lab.nodes), 30,
             "a2's pod out of IPVS everywhere")
    assert lab.ping(a1, b1)


@with_diagnosis
def test_agent_restarted_while_api_server_is_down_touches_nothing(lab: K8sLab) -> None:
    """Until its first complete list, an agent's empty Store means "unknown", not "no objects"."""
    a1, b1 = lab.node("a1"), lab.node("b1")
    before = lab.dataplane()
    monitor = RouteMonitor(lab)
    assert a1.pod_cidr in tor_routes(lab)
    tor_mon = subprocess.Popen(["ip", "-n", lab.router, "monitor", "route"], stdout=subprocess.PIPE, text=True)
    lab.extra_procs.append(tor_mon)
    # the ToR's own traffic to a1's pod, through the route it learned from a1 (finding 5)
    ping = subprocess.Popen(["ip", "netns", "exec", lab.router, "ping", "-i", "0.005", "-W", "1", "-q", a1.pod_ip],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lab.extra_procs.append(ping)
    try:
        time.sleep(1)
        lab.stop_api()
        started = lab.status(a1)["started"]
        lab.kill_agent(a1, signal.SIGTERM)  # routes and IPVS stay in the kernel (graceful restart)
        lab.start_agent(a1)
        wait_for(lambda: lab.status(a1).get("started", started) > started, 30, "the new a1 agent's first status")
        # it peers with the ToR (a peer of its config file) but sends no End-of-RIB: nothing is known yet
        wait_for(lambda: "rack-tor" in lab.established(a1), CONVERGE, "the new a1 agent's session to the ToR")
        time.sleep(3)
        assert a1.pod_cidr in tor_routes(lab), "the ToR flushed a1's pod CIDR"
        st = lab.status(a1)
        assert st["speaker"]["endOfRib"].startswith("withheld"), st["speaker"]
        assert lab.dataplane() == before, "a restarted agent acted on an empty Store"
        assert not st["ready"] and any("Kubernetes API" in w for w in st["warnings"]), st["warnings"]
        lab.start_api()
        wait_for(lambda: lab.status(a1).get("ready") and mesh_established(lab, a1) == {"a2", "b1"}, CONVERGE,
                 "the new a1 agent to list and peer again")
        wait_for(lambda: not lab.status(a1).get("adoptedHold"), CONVERGE, "a1's startup hold to end")
        wait_for(lambda: lab.status(a1)["speaker"]["endOfRib"] == "sent", 30, "a1's End-of-RIB")
        time.sleep(1)
        assert lab.dataplane() == before
    finally:
        seen = monitor.stop()
        if lab.api is None:
            lab.start_api()
        ping.send_signal(signal.SIGINT)
        out = ping.communicate(timeout=20)[0]
        tor_mon.terminate()
        tor_seen = tor_mon.communicate(timeout=10)[0]
    assert seen == {n.name: [] for n in lab.nodes}, f"routes deleted/re-added across the restart: {seen}"
    assert not [ln for ln in tor_seen.splitlines() if ln.startswith("Deleted") and a1.pod_cidr in ln], tor_seen
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m and int(m.group(1)) > 1000 and m.group(1) == m.group(2), out
    assert lab.ping(a1, b1)


@with_diagnosis
def test_plan_on_the_kubernetes_source_finds_nothing_to_change(lab: K8sLab) -> None:
    """`fabric plan` runs the agent's routes stage on one complete list from the API server."""
    a1 = lab.node("a1")
    r = subprocess.run(["ip", "netns", "exec", a1.ns, FABRIC, "plan", "-c", str(lab.config_path(a1))],
                       capture_output=True, text=True, env=dict(os.environ, NODE_NAME="a1"), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "changes: 0 delete, 0 replace" in r.stdout, r.stdout
    assert "a2" in r.stdout and "b1" in r.stdout and "rack-tor" in r.stdout


@with_diagnosis
def test_invalid_ippool_and_bgppeer_keep_last_good_config_and_are_reported(lab: K8sLab) -> None:
    a1, a2 = lab.node("a1"), lab.node("a2")
    api = lab.control
    before = lab.dataplane()
    api.apply("IPPool", ip_pool("Sometimes"))
    api.apply("BGPPeer", {"metadata": {"name": "tor"}, "spec": {"peerIP": "10.0.1.300", "asNumber": 65000}})
    wait_for(lambda: all(any(w.startswith("IPPool/default: spec.ipipMode") for w in lab.warnings(n)) and
                         any(w.startswith("BGPPeer/tor: spec.peerIP") for w in lab.warnings(n)) for n in lab.nodes),
             30, "every agent to report both bad objects in its status")
    for kind, name in (("IPPool", "default"), ("BGPPeer", "tor")):
        wait_for(lambda: {e.get("source", {}).get("host") for e in api.events()
                          if e["involvedObject"]["kind"] == kind and e["involvedObject"]["name"] == name}
                 == {n.name for n in lab.nodes}, 30, f"a Warning Event about {kind}/{name} from every agent")
    for e in api.events():
        assert e["type"] == "Warning" and e["reason"] == "InvalidResource"
        assert e["metadata"]["namespace"] == "default"  # IPPool and BGPPeer are cluster-scoped
    assert lab.dataplane() == before, "a bad object changed the dataplane"
    assert not any("tor" == p["name"] for p in lab.status(a1)["peers"])

    # the IPPool is really in effect: a good edit moves a1 -> a2 (same rack) onto IPIP ...
    api.apply("IPPool", ip_pool("Always"))
    wait_for(lambda: f"{a2.pod_cidr} via {a2.address} dev tunl0" in lab.routes(a1), 30, "Always: same rack on IPIP")
    # the status file is at most a second behind the stages
    wait_for(lambda: not any(w.startswith("IPPool/") for w in lab.warnings(a1)), 5, "the IPPool warning to clear")
    # ... and back
    api.apply("IPPool", ip_pool("CrossSubnet"))
    api.delete("BGPPeer", "tor")
    wait_for(lambda: all(routed(lab, n, m) for n in lab.nodes for m in lab.nodes if m is not n), 30,
             "CrossSubnet routes again")
    wait_for(lambda: not any(w.startswith(("IPPool/", "BGPPeer/")) for n in lab.nodes for w in lab.warnings(n)),
             30, "the warnings to clear")


@with_diagnosis
def test_deleting_objects_cleans_up(lab: K8sLab) -> None:
    a1, a2, b1 = lab.node("a1"), lab.node("a2"), lab.node("b1")
    api = lab.control
    api.delete("EndpointSlice", "web-abc", "default")
    api.delete("Service", "web", "default")
    wait_for(lambda: all(CLUSTER_IP not in lab.ipvs(n) for n in lab.nodes), 30, "the ClusterIP out of IPVS everywhere")
    for n in lab.nodes:
        assert CLUSTER_IP not in sh(f"ip -n {n.ns} addr show").stdout
    api.delete("Node", "a2")
    wait_for(lambda: a2.pod_cidr not in lab.routes(a1) + lab.routes(b1), 30, "routes to a2's pods gone")
    wait_for(lambda: "a2" not in {p["name"] for p in lab.status(a1)["peers"] + lab.status(b1)["peers"]}, 30,
             "a2 no longer a peer")
    assert routed(lab, a1, b1) and routed(lab, b1, a1)
