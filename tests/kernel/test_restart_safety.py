"""Real agents in the lab kernel, restarted into trouble (findings 3, 4, 6, 10), with real traffic:

- host traffic into the tunnel leaves with the tunnel address, not with whatever address comes first
  on the underlay device (an address of another subnet is listed first on a1's eth1);
- a restart while the node address is missing: the adopted routes stay, nothing is deleted when the
  address comes back, 0 packets lost at 200 pps through those routes;
- a restart with an invalid IPPool (host bits, which the CRD schema admits): the last good pool (persisted)
  stays in effect, 0 pod routes removed, 0 packets lost at 200 pps;
- a hung `nft` (a stand-in that sleeps): /healthz fails within health.stageTimeout while routes keep
  converging (an ipipMode change still moves routes).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
import yaml

from tests.kernel.meshlab import MeshLab, Node, sh, wait_for
from tests.kernel.test_graceful_restart import Ping

pytestmark = pytest.mark.kernel

SPARE = "172.31.0.5/24"  # on a1's eth1 before the node address; not routed by the underlay


@pytest.fixture(scope="module")
def lab() -> Iterator[MeshLab]:
    nodes = [Node("a1", "a", 1, "10.0.1.11"), Node("a2", "a", 2, "10.0.1.12"), Node("b1", "b", 3, "10.0.2.21")]
    m = MeshLab(nodes, hold_time=9, gr_time=60).build()
    try:
        a1 = m.node("a1")
        sh(f"ip -n {a1.ns} addr flush dev eth1; ip -n {a1.ns} addr add {SPARE} dev eth1;"
           f"ip -n {a1.ns} addr add {a1.address}/24 dev eth1; ip -n {a1.ns} route add default via 10.0.1.1")
        m.start()
        wait_for(m.converged, 90, "mesh convergence")
        for n in m.nodes:
            wait_for(lambda n=n: len(m.established(n)) == 2 and not m.status(n).get("adoptedHold", True), 60,
                     f"{n.name} running with its sessions")
        yield m
    finally:
        m.close()


class RouteMonitor:
    """`ip monitor route` in one node: our routes deleted meanwhile."""

    def __init__(self, lab: MeshLab, n: Node) -> None:
        self.file = lab.workdir / f"monitor-{n.name}-{time.monotonic_ns()}.txt"
        with open(self.file, "wb") as f:
            self.p = subprocess.Popen(["ip", "-n", n.ns, "monitor", "route"], stdout=f, stderr=subprocess.STDOUT)
        lab.extra_procs.append(self.p)

        def probe() -> bool:
            if "192.0.2.1" not in self.file.read_text():
                sh(f"ip -n {n.ns} route add blackhole 192.0.2.1/32 proto 81; "
                   f"ip -n {n.ns} route del blackhole 192.0.2.1/32 proto 81")
            return "192.0.2.1" in self.file.read_text()
        wait_for(probe, 10, "the route monitor to listen", step=0.3)

    def deleted(self) -> list[str]:
        self.p.terminate()
        self.p.wait(timeout=10)
        return [ln for ln in self.file.read_text().splitlines() if ln.startswith("Deleted") and "proto 80" in ln]


UDP = textwrap.dedent('''
    import socket, sys, time
    if sys.argv[1] == "recv":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[2], 5005)); s.settimeout(3)
        # 8 MiB: the lab kernel has one CPU, and a restarting agent with its ExaBGP (nice -5) can keep this
        # probe off it for over a second; a full default buffer (~200 datagrams) would count as network loss
        s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE (root)
        got = set(); print("ready", flush=True)
        while True:
            try:
                d, _ = s.recvfrom(64)
            except socket.timeout:
                break
            got.add(int(d))
        top = max(got) if got else -1
        print(len(got), top, *sorted(set(range(top + 1)) - got)[:20], flush=True)
    else:
        import signal
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        seq, t = 0, time.monotonic()
        while not stop:
            s.sendto(str(seq).encode(), (sys.argv[2], 5005)); seq += 1
            t += 0.005  # 200 pps
            time.sleep(max(0.0, t - time.monotonic()))
        print(seq, flush=True)
''')


def udp_errors(n: Node) -> str:
    """The receiving pod's UDP counters: a full socket buffer (RcvbufErrors) is the probe's loss, not the network's."""
    lines = [ln.split() for ln in sh(f"ip netns exec {n.pod_ns} cat /proc/net/snmp").stdout.splitlines()
             if ln.startswith("Udp:")]
    return " ".join(f"{k}={v}" for k, v in zip(lines[0][1:], lines[1][1:]) if k in ("InErrors", "RcvbufErrors"))


def phase_of(lab: MeshLab, n: Node, since: float) -> str:
    s = lab.status(n)
    return s.get("phase", "") if s.get("started", 0) >= since else "old"


def test_host_traffic_through_the_tunnel_has_a_source_that_comes_back(lab: MeshLab) -> None:
    """Finding 10: kubelet probes / hostNetwork traffic from a1 to a pod across subnets."""
    a1, b1 = lab.node("a1"), lab.node("b1")
    first = sh(f"ip -n {a1.ns} -4 -o addr show dev eth1").stdout.splitlines()[0]
    assert SPARE in first, first  # the address that comes first is not the node's
    route = sh(f"ip -n {a1.ns} route get {b1.pod_ip}").stdout
    assert "dev tunl0" in route and "src 10.244.1.0" in route, route
    assert "10.244.1.0/32" in sh(f"ip -n {a1.ns} addr show dev tunl0").stdout
    r = sh(f"ip netns exec {a1.ns} ping -c 3 -W 2 -q {b1.pod_ip}", check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_restart_while_the_node_address_is_missing_removes_nothing(lab: MeshLab) -> None:
    """Finding 3 + acceptance: 0 pod routes removed, 0 packets lost (a1's pod -> b1's pod, 200 pps)."""
    a1, b1 = lab.node("a1"), lab.node("b1")
    mon = RouteMonitor(lab, a1)
    recv = subprocess.Popen(["ip", "netns", "exec", b1.pod_ns, sys.executable, "-c", UDP, "recv", b1.pod_ip],
                            stdout=subprocess.PIPE, text=True)
    lab.extra_procs.append(recv)
    assert recv.stdout is not None and recv.stdout.readline().strip() == "ready"
    send = subprocess.Popen(["ip", "netns", "exec", a1.pod_ns, sys.executable, "-c", UDP, "send", b1.pod_ip],
                            stdout=subprocess.PIPE, text=True)
    lab.extra_procs.append(send)
    started = time.time()
    try:
        time.sleep(1)
        killed = time.time()
        lab.kill_agent(a1, signal.SIGKILL)
        sh(f"ip -n {a1.ns} addr del {a1.address}/24 dev eth1")
        lab.start_agent(a1)
        wait_for(lambda: phase_of(lab, a1, killed) == "holding", 30, "the new agent holding its routes")
        st = lab.status(a1)
        assert any("no interface holds the node address" in w for w in st["waitingFor"]), st["waitingFor"]
        time.sleep(3)
        sh(f"ip -n {a1.ns} addr add {a1.address}/24 dev eth1")
        wait_for(lambda: phase_of(lab, a1, killed) == "running" and len(lab.established(a1)) == 2, 60,
                 "a1 running again with its sessions")
        time.sleep(1)
    finally:
        send.terminate()
        sent = int(send.communicate(timeout=30)[0].strip() or 0)
        out = recv.communicate(timeout=30)[0].split()
        deleted = mon.deleted()
    got = int(out[0])
    assert sent > 1000 and got == sent, f"{sent - got} of {sent} lost (missing: {out[2:]}; " \
        f"killed at seq ~{int((killed - started) * 200)}; {udp_errors(b1)})\n{lab.log_tail(a1)}"
    assert not [ln for ln in deleted if "10.244." in ln], deleted
    assert lab.converged()


def test_restart_with_an_invalid_ippool_keeps_the_last_good_pool(lab: MeshLab) -> None:
    """Finding 4 + acceptance: 0 pod routes removed, 0 packets lost (ping 200 pps a1 <-> b1 pods)."""
    a1, b1 = lab.node("a1"), lab.node("b1")
    mon = RouteMonitor(lab, a1)
    ping = Ping(lab, a1, b1)
    pinging = time.monotonic()
    try:
        time.sleep(1)
        killed = time.time()
        lab.kill_agent(a1, signal.SIGKILL)
        doc = lab.cluster_doc()
        doc["ipPools"][0]["spec"]["cidr"] = "10.244.0.1/16"  # host bits: invalid, as the CRD schema admits
        tmp = lab.workdir / ".cluster.yaml"
        tmp.write_text(yaml.safe_dump(doc))
        tmp.replace(lab.workdir / "cluster.yaml")
        lab.start_agent(a1)
        wait_for(lambda: phase_of(lab, a1, killed) == "running" and len(lab.established(a1)) == 2, 60,
                 "a1 running again with its sessions")
        time.sleep(2)  # past the hold: nothing goes afterwards either
        warnings = lab.status(a1)["warnings"]
        assert any(w.startswith("IPPool/default: spec.cidr") and "keeping its last good version" in w
                   for w in warnings), warnings
    finally:
        time.sleep(max(0.0, 10.0 - (time.monotonic() - pinging)))  # a restart can be over in a few seconds
        sent, received = ping.stop()
        deleted = mon.deleted()
        lab.write_cluster()
    assert sent > 1000 and sent == received, f"{sent - received} of {sent} lost\n{lab.log_tail(a1)}"
    assert not deleted, deleted
    assert lab.converged()


NFT_STUB = "#!/bin/sh\nexec sleep 3600\n"


def healthz(lab: MeshLab, n: Node) -> tuple[int, str]:
    code = ("import urllib.request, urllib.error\n"
            "try:\n r = urllib.request.urlopen('http://127.0.0.1:9099/healthz', timeout=3); print(r.status, r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n print(e.code, e.read().decode())\n"
            "except Exception as e:\n print(0, e)\n")
    out = sh(f"ip netns exec {n.ns} {sys.executable} -c \"{code}\"", check=False).stdout
    code_s, _, body = out.partition(" ")
    return int(code_s or 0), body


def test_a_hung_nft_fails_healthz_while_routes_keep_converging(lab: MeshLab) -> None:
    """Finding 6 + acceptance: the service stage hangs on its own worker; /healthz says so within
    health.stageTimeout; the routes stage still follows an ipipMode change."""
    a1, a2 = lab.node("a1"), lab.node("a2")
    stub = lab.workdir / "stub-bin"
    stub.mkdir(exist_ok=True)
    (stub / "nft").write_text(NFT_STUB)
    (stub / "nft").chmod(0o755)
    doc = yaml.safe_load(lab.config_path(a1).read_text())
    normal = dict(doc)
    doc.update(services={"enabled": True}, health={"listen": "127.0.0.1:9099", "stageTimeout": 3})
    lab.kill_agent(a1, signal.SIGTERM)
    lab.config_path(a1).write_text(yaml.safe_dump(doc))
    started = time.time()
    try:
        lab.start_agent(a1, env={"PATH": f"{stub}:/usr/sbin:/usr/bin:/sbin:/bin"})
        wait_for(lambda: healthz(lab, a1)[0] == 503, 30, "/healthz to fail")
        code, body = healthz(lab, a1)
        assert "stage services" in body and "stageTimeout 3s" in body, body
        # the status file is written at most once a second: it may trail /healthz a little
        wait_for(lambda: lab.status(a1).get("stages", {}).get("services", {}).get("stalled") is True, 10,
                 "the stalled stage in the status")
        # routes keep converging meanwhile: a pool's ipipMode change moves a1's route to a2 onto IPIP
        lab.set_mode("Always")
        wait_for(lambda: f"{a2.pod_cidr} via {a2.address} dev tunl0" in lab.routes(a1), 30,
                 "a1's route to a2 on IPIP while the service stage hangs")
        assert healthz(lab, a1)[0] == 503
        assert time.time() - started < 60
    finally:
        # The last test of the module: the lab goes with everything in it (the stand-in's sleep too).
        lab.config_path(a1).write_text(yaml.safe_dump(normal))
