"""A two-rack cluster of real agents in network namespaces, for the mesh kernel tests.

router `r` holds two bridges: br-a (10.0.1.1/24, rack A) and br-b (10.0.2.1/24, rack B), and
routes between them (it knows nothing of pod CIDRs). Nodes a1, a2 sit in rack A, b1, b2 in rack B.
Each node has a pod namespace wired as Calico does (pod /32 on eth0, default via 169.254.1.1,
proxy ARP on the node's veth, a /32 route to the pod), pod MTU = tunnel MTU as a CNI sets it.
Every name carries a per-run tag so runs can't collide; `close()` removes all of it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

FABRIC = str(Path(sys.executable).parent / "fabric")


def sh(cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{cmd!r} failed: {r.stderr.strip()}")
    return r


def wait_for(cond: Callable[[], bool], timeout: float, what: str, step: float = 0.2) -> float:
    """Poll a test condition until it holds (tests only; the agent never polls). Returns seconds taken."""
    t0 = time.monotonic()
    while True:
        if cond():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


@dataclass
class Node:
    name: str
    rack: str
    index: int  # pod CIDR 10.244.<index>.0/24
    address: str
    kind: str = "agent"  # agent | bird | frr
    ns: str = ""
    pod_ns: str = ""
    proc: subprocess.Popen | None = None

    @property
    def pod_cidr(self) -> str:
        return f"10.244.{self.index}.0/24"

    @property
    def pod_ip(self) -> str:
        return f"10.244.{self.index}.10"


@dataclass
class MeshLab:
    nodes: list[Node]
    mode: str = "CrossSubnet"
    hold_time: int = 9
    gr_time: int = 60
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:4])
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fabric-mesh-")))
    pod_mtu: int = 1480
    namespaces: list[str] = field(default_factory=list)
    extra_procs: list[subprocess.Popen] = field(default_factory=list)
    agent_overrides: Callable[[Node], dict] | None = None  # merged over each agent's config
    # With a CNI environment (tests/kernel/cnienv.py) pods are not wired here: the agents serve the CNI
    # plugin and tests create pods through it. Agents then run inside that environment's mount namespace.
    cni_env: object | None = None

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    # -- building ----------------------------------------------------------------------------
    def build(self) -> "MeshLab":
        r = self.router = f"r-{self.tag}"
        self._ns(r)
        sh(f"ip -n {r} link add br-a type bridge; ip -n {r} link add br-b type bridge;"
           f"ip -n {r} link set br-a up; ip -n {r} link set br-b up;"
           f"ip -n {r} addr add 10.0.1.1/24 dev br-a; ip -n {r} addr add 10.0.2.1/24 dev br-b;"
           f"ip netns exec {r} sysctl -qw net.ipv4.ip_forward=1")
        for i, n in enumerate(self.nodes):
            n.ns, n.pod_ns = f"{n.name}-{self.tag}", f"p{n.name}-{self.tag}"
            self._ns(n.ns)
            self._ns(n.pod_ns)
            gw = "10.0.1.1" if n.rack == "a" else "10.0.2.1"
            port = f"{n.name}-{self.tag}"[:15]
            sh(f"ip link add eth1 netns {n.ns} type veth peer name {port} netns {r};"
               f"ip -n {r} link set {port} master br-{n.rack} up;"
               f"ip -n {n.ns} link set eth1 up; ip -n {n.ns} addr add {n.address}/24 dev eth1;"
               f"ip -n {n.ns} route add default via {gw};"
               f"ip netns exec {n.ns} sysctl -qw net.ipv4.ip_forward=1")
            if self.cni_env is not None:
                continue
            # Calico-style pod wiring (what the CNI plugin does)
            sh(f"ip link add eth0 netns {n.pod_ns} mtu {self.pod_mtu} type veth peer name cali{i} netns {n.ns} "
               f"mtu {self.pod_mtu};"
               f"ip -n {n.pod_ns} link set eth0 up; ip -n {n.pod_ns} addr add {n.pod_ip}/32 dev eth0;"
               f"ip -n {n.pod_ns} route add 169.254.1.1 dev eth0 scope link;"
               f"ip -n {n.pod_ns} route add default via 169.254.1.1 dev eth0;"
               f"ip -n {n.ns} link set cali{i} up;"
               f"ip netns exec {n.ns} sysctl -qw net.ipv4.conf.cali{i}.proxy_arp=1;"
               f"ip -n {n.ns} route add {n.pod_ip}/32 dev cali{i}")
        self.write_cluster()
        for n in self.nodes:
            if n.kind == "agent":
                self.write_agent_config(n)
        return self

    def _ns(self, name: str) -> None:
        sh(f"ip netns add {name}; ip -n {name} link set lo up")
        self.namespaces.append(name)

    def cluster_doc(self) -> dict:
        return {
            "nodes": [{"name": n.name, "address": n.address, "podCIDRs": [n.pod_cidr]} for n in self.nodes],
            "ipPools": [{"metadata": {"name": "default"},
                         "spec": {"cidr": "10.244.0.0/16", "ipipMode": self.mode}}],
        }

    def write_cluster(self) -> None:
        tmp = self.workdir / ".cluster.yaml"
        tmp.write_text(yaml.safe_dump(self.cluster_doc()))
        tmp.replace(self.workdir / "cluster.yaml")  # atomic, like a ConfigMap update

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        self.write_cluster()

    def config_path(self, n: Node) -> Path:
        return self.workdir / f"{n.name}.yaml"

    def run_dir(self, n: Node) -> Path:
        return self.workdir / f"run-{n.name}"

    def write_agent_config(self, n: Node) -> None:
        doc = {
            "node": {"name": n.name, "address": f"{n.address}/24", "podCIDRs": [n.pod_cidr]},
            "pools": [{"cidr": "10.244.0.0/16", "ipipMode": "CrossSubnet"}],
            "timers": {"holdTime": self.hold_time, "gracefulRestartTime": self.gr_time, "resyncInterval": 30},
            "services": {"enabled": False},
            "source": {"kind": "file", "path": "cluster.yaml"},
            "paths": {"runDir": f"run-{n.name}"},
        }
        if self.cni_env is not None:
            self.cni_env.node_conf_dir(n.ns)  # type: ignore[attr-defined]
            doc["cni"] = {"enabled": True, "stateDir": self.cni_state_dir(n), "socket": self.cni_socket(n)}
        if self.agent_overrides is not None:
            doc.update(self.agent_overrides(n))
        self.config_path(n).write_text(yaml.safe_dump(doc))

    def cni_socket(self, n: Node) -> str:
        # Under /run: a unix socket on the lab kernel's tmpfs (the workdir may be the host's file system).
        return f"/run/fabric-cni-{self.tag}/{n.name}.sock"

    def cni_state_dir(self, n: Node) -> str:
        # IPAM records on the lab kernel's tmpfs too: the host file system (hostfs) makes every fsync a
        # host disk flush. They survive agent restarts, which is what the tests restart.
        return f"/run/fabric-cni-{self.tag}/{n.name}-state"

    # -- agents ------------------------------------------------------------------------------
    def start_agent(self, n: Node, env: dict[str, str] | None = None) -> None:
        log = open(self.workdir / f"{n.name}.log", "ab")
        argv = [FABRIC, "agent", "-c", str(self.config_path(n))]
        cmd = (self.cni_env.cmd(argv, n.ns) if self.cni_env is not None  # type: ignore[attr-defined]
               else ["ip", "netns", "exec", n.ns, *argv])
        n.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
                                  env=None if env is None else {**os.environ, **env})
        log.close()

    def start(self) -> "MeshLab":
        for n in self.nodes:
            if n.kind == "agent":
                self.start_agent(n)
        return self

    def kill_agent(self, n: Node, sig: int = signal.SIGKILL) -> None:
        assert n.proc is not None
        os.kill(n.proc.pid, sig)  # the agent only, not its process group: ExaBGP must notice by itself
        n.proc.wait(timeout=30)

    def status(self, n: Node) -> dict:
        import json
        try:
            return json.loads((self.run_dir(n) / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def established(self, n: Node) -> set[str]:
        return {p["name"] for p in self.status(n).get("peers", []) if p.get("state") == "established"}

    def routes(self, n: Node) -> str:
        lines = sh(f"ip -n {n.ns} route show").stdout.splitlines()
        return "\n".join(line for line in lines if " proto 80" in line) + "\n"

    def converged(self) -> bool:
        agents = [n for n in self.nodes if n.kind == "agent"]
        for n in agents:
            text = self.routes(n)
            for m in self.nodes:
                if m is not n and m.pod_cidr not in text:
                    return False
        return True

    def ping(self, src: Node, dst: Node, count: int = 1, timeout: int = 2) -> bool:
        return sh(f"ip netns exec {src.pod_ns} ping -c {count} -W {timeout} -q {dst.pod_ip}", check=False).returncode == 0

    def tunnel_tx(self, n: Node) -> int:
        r = sh(f"ip netns exec {n.ns} cat /sys/class/net/tunl0/statistics/tx_packets", check=False)
        return int(r.stdout.strip() or 0) if r.returncode == 0 else 0

    def log_tail(self, n: Node, lines: int = 40) -> str:
        p = self.workdir / f"{n.name}.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) if p.exists() else ""

    def close(self) -> None:
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                n.proc.terminate()
                try:
                    n.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    n.proc.kill()
        for p in self.extra_procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for ns in reversed(self.namespaces):
            # kill anything left in the namespace (ExaBGP, daemons) before deleting it
            pids = sh(f"ip netns pids {ns}", check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh(f"ip netns del {ns}", check=False)
        sh(f"rm -rf {self.workdir} /run/fabric-cni-{self.tag}", check=False)


def two_racks(kinds: dict[str, str] | None = None, **kw) -> MeshLab:
    kinds = kinds or {}
    nodes = [Node("a1", "a", 1, "10.0.1.11", kinds.get("a1", "agent")),
             Node("a2", "a", 2, "10.0.1.12", kinds.get("a2", "agent")),
             Node("b1", "b", 3, "10.0.2.21", kinds.get("b1", "agent")),
             Node("b2", "b", 4, "10.0.2.22", kinds.get("b2", "agent"))]
    return MeshLab(nodes, **kw)
