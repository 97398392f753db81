"""Real agents enforce NetworkPolicy from the Kubernetes API, and never block their own traffic.

Needs root and nf_tables' inet family, nothing else (services off, both nodes in one subnet: no IPVS,
no IPIP), so it runs on this machine's own kernel, in namespaces it creates and removes — not in the
qemu VM, where starting two agents and their ExaBGP costs minutes of emulated Python imports (47 s for
`import fabric.agent` alone, measured). Skipped without root or inet nftables.

Topology (tests.kernel.meshlab): agents on a1 (10.0.1.11) and a2 (10.0.1.12), one subnet behind the
router, peering over BGP; pods 10.244.1.10 and 10.244.2.10; the fake API server on the router
(10.0.1.1:6443); health on each node's address. A deny-all policy (ingress and egress of every pod of `default`) is in force from
the first sync: BGP, the API watches and health must work all the same, while pods are cut off except
from their own node. Then the policy set changes through the API, a bad policy arrives, and an agent
restarts: an allowed connection carries on through all of it and denied traffic stays denied while the
agent is down (the table stays).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from loadbalancer.netns import NetnsThread
from tests.kernel.meshlab import Node, wait_for
from tests.kernel.test_k8s_e2e import CONVERGE, K8sLab, ip_pool, k8s_node, routed
from tests.kernel.test_policy_enforcement import ECHO_PORT, Servers


def _inet_nft_works() -> bool:
    if os.geteuid() != 0:
        return False
    probe = "table inet p {\n  chain c { type filter hook forward priority 0; ct direction reply accept; }\n}\n"
    return subprocess.run(["unshare", "-n", "nft", "-c", "-f", "-"], input=probe, capture_output=True,
                          text=True).returncode == 0


pytestmark = pytest.mark.skipif(not _inet_nft_works(), reason="needs root and nf_tables with the inet family")

HEALTH_PORT = 9099


def pod(n: Node, labels: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": f"pod-{n.name}", "namespace": "default", "labels": labels},
            "spec": {"nodeName": n.name, "containers": [{"name": "c", "image": "x",
                                                         "ports": [{"name": "echo", "containerPort": ECHO_PORT}]}]},
            "status": {"phase": "Running", "podIP": n.pod_ip, "podIPs": [{"ip": n.pod_ip}]}}


def policy(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default"}, "spec": spec}


DENY_ALL = policy("deny-all", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})
A_TO_B = [policy("b-from-a", {"podSelector": {"matchLabels": {"app": "b"}},
                              "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}],
                                           "ports": [{"port": "echo"}]}]}),
          policy("a-to-b", {"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"],
                            "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]})]


class PolicyAgentLab(K8sLab):
    threads: dict[str, NetnsThread]
    servers: Servers

    def write_agent_config(self, n: Node) -> None:
        super().write_agent_config(n)
        doc = yaml.safe_load(self.config_path(n).read_text())
        doc["health"] = {"listen": f"{n.address}:{HEALTH_PORT}"}
        doc["services"] = {"enabled": False}
        doc["pools"] = [{"cidr": "10.244.0.0/16", "ipipMode": "Never"}]  # one subnet: no tunnel (no ipip here)
        self.config_path(n).write_text(yaml.safe_dump(doc))

    def thread(self, ns: str) -> NetnsThread:
        if ns not in self.threads:
            self.threads[ns] = NetnsThread(ns)
        return self.threads[ns]

    def connects(self, ns: str, ip: str, timeout: float = 2.0) -> bool:
        def go() -> bool:
            with socket.socket() as s:
                s.settimeout(timeout)
                return s.connect_ex((ip, ECHO_PORT)) == 0
        return self.thread(ns).call(go)

    def health(self, ns: str, addr: str) -> int:
        def go() -> int:
            c = http.client.HTTPConnection(addr, HEALTH_PORT, timeout=10)
            try:
                c.request("GET", "/healthz")
                return c.getresponse().status
            finally:
                c.close()
        return self.thread(ns).call(go)

    def isolated(self, n: Node) -> dict[str, int]:
        return dict(self.policy(n).get("isolated") or {})

    def policy(self, n: Node) -> dict[str, Any]:
        """The policy stage's status (stages.policy in status.json)."""
        return dict((self.status(n).get("stages") or {}).get("policy") or {})

    def diagnose(self) -> str:
        import json

        parts = [f"--- api\n{self.api_log()}"]
        for n in self.nodes:
            st = self.status(n)
            parts.append(f"--- {n.name}\n{self.routes(n)}policy: {json.dumps(self.policy(n))}\n"
                         f"warnings: {st.get('warnings')}\nerrors: {st.get('errors')}\n{self.log_tail(n, 30)}")
        return "\n".join(parts)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.servers.close()
            for t in self.threads.values():
                t.close()


@pytest.fixture(scope="module")
def lab() -> Iterator[PolicyAgentLab]:
    nodes = [Node("a1", "a", 1, "10.0.1.11"), Node("a2", "a", 2, "10.0.1.12")]
    m = PolicyAgentLab(nodes, hold_time=9, gr_time=60)
    m.threads, m.servers = {}, Servers()
    try:
        m.build()
        for n in nodes:
            m.servers.listen(m.thread(n.pod_ns))
        m.servers.thread.start()
        m.start_api()
        api = m.control
        api.apply("IPPool", ip_pool("Never"))
        api.apply("Namespace", {"metadata": {"name": "default"}})
        a1, a2 = nodes
        for n, app in ((a1, "a"), (a2, "b")):
            api.apply("Node", k8s_node(n))
            api.apply("Pod", pod(n, {"app": app}))
        api.apply("NetworkPolicy", DENY_ALL)  # in force before any agent starts
        m.start()
        try:
            wait_for(lambda: routed(m, a1, a2) and routed(m, a2, a1), CONVERGE, "a1 and a2 to route each other")
            wait_for(lambda: all(m.isolated(n) == {"ingress": 1, "egress": 1} for n in nodes), CONVERGE,
                     "each agent isolating its pod")
        except AssertionError:
            print(m.diagnose())
            raise
        yield m
    finally:
        m.close()


def test_deny_all_blocks_pods_but_never_the_agents_own_traffic(lab: PolicyAgentLab) -> None:
    a1, a2 = lab.node("a1"), lab.node("a2")
    # BGP came up and routes were exchanged under deny-all (fixture); the sessions stay established.
    wait_for(lambda: lab.established(a1) == {"a2"} and lab.established(a2) == {"a1"}, CONVERGE,
             "both sessions established in the agents' status")
    # Health from the other node and from the node itself; the API watches work (nothing waiting).
    assert lab.health(a2.ns, a1.address) == 200 and lab.health(a1.ns, a1.address) == 200
    assert not any("waiting for the first complete list" in w for w in lab.warnings(a1))
    # Pods are cut off both ways, except from their own node (kubelet probes).
    assert not lab.connects(a1.pod_ns, a2.pod_ip)
    assert lab.connects(a1.ns, a1.pod_ip) and lab.connects(a2.ns, a2.pod_ip)
    assert not lab.connects(a2.ns, a1.pod_ip)
    assert lab.policy(a1)["error"] is None and lab.policy(a1)["last"].startswith("full")


def test_policy_changes_through_the_api_and_a_bad_policy_is_skipped(lab: PolicyAgentLab) -> None:
    a1, a2 = lab.node("a1"), lab.node("a2")
    api = lab.control
    for p in A_TO_B:
        api.apply("NetworkPolicy", p)
    wait_for(lambda: lab.connects(a1.pod_ns, a2.pod_ip), CONVERGE, "a1's pod to reach a2's pod")
    assert not lab.connects(a2.pod_ns, a1.pod_ip)  # the other way stays denied
    api.apply("NetworkPolicy", policy("broken", {"podSelector": {"matchExpressions": [
        {"key": "app", "operator": "Near"}]}, "policyTypes": ["Ingress"]}))
    wait_for(lambda: any("default/broken" in w for w in lab.warnings(a1)), CONVERGE, "the bad policy reported")
    assert any("spec.podSelector.matchExpressions[0].operator" in w for w in lab.warnings(a1))
    assert lab.connects(a1.pod_ns, a2.pod_ip) and not lab.connects(a2.pod_ns, a1.pod_ip)


def test_agent_restart_keeps_enforcement_and_connections(lab: PolicyAgentLab) -> None:
    a1, a2 = lab.node("a1"), lab.node("a2")
    conn = lab.thread(a1.pod_ns).call(socket.create_connection, (a2.pod_ip, ECHO_PORT), 5)

    def echo() -> bool:
        try:
            conn.settimeout(3)
            conn.sendall(b"x\n")
            return conn.recv(16) == b"x\n"
        except OSError:
            return False

    assert echo()
    started = lab.status(a1)["started"]
    lab.kill_agent(a1, signal.SIGTERM)
    assert echo(), "the allowed connection must survive the agent going down"
    assert not lab.connects(a2.pod_ns, a1.pod_ip), "denied traffic must stay denied while the agent is down"
    lab.start_agent(a1)
    def synced_again() -> bool:
        st = lab.status(a1)
        return st.get("started", 0) > started and bool(st.get("ready")) and bool(lab.policy(a1).get("last"))

    wait_for(synced_again, CONVERGE, "a1 back and its policy table synced")
    assert echo(), "the allowed connection must survive the restarted agent's full table replacement"
    assert not lab.connects(a2.pod_ns, a1.pod_ip)
    assert lab.isolated(a1) == {"ingress": 1, "egress": 1}
    conn.close()
