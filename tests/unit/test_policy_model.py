"""The policy model: parsing (every bad field named), truth tables of the upstream e2e cases, explain."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from fabric.policy import datapath
from fabric.policy.evaluate import World
from fabric.policy.model import IPBlock, PodPeer, PolicyError, PortMatch, Selector, parse_policy
from fabric.policy.state import PolicyState
from tests.policy_cases import IPS, NODES, PODS, PORTS, STEPS, Step, node_of, np


def parse(spec: dict[str, Any], ns: str = "x") -> Any:
    return parse_policy(np("p", ns, spec))


def test_policy_types_default_as_the_api_does() -> None:
    p = parse({"podSelector": {}})
    assert p.ingress == () and p.egress is None  # Ingress only, no rules: deny all ingress
    p = parse({"podSelector": {}, "egress": [{}]})
    assert p.ingress == () and p.egress is not None and p.egress[0].peers is None
    p = parse({"podSelector": {}, "egress": []})  # an empty egress list does not imply Egress
    assert p.egress is None
    p = parse({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]})
    assert p.ingress is None and p.egress == ()


def test_peers_and_ports() -> None:
    p = parse({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{
        "from": [{"podSelector": {"matchLabels": {"r": "c"}}},
                 {"namespaceSelector": {"matchExpressions": [{"key": "t", "operator": "Exists"}]}},
                 {"namespaceSelector": {}, "podSelector": {"matchLabels": {"r": "c"}}},
                 {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
                 {"ipBlock": {"cidr": "fd00::/64"}}],
        "ports": [{"port": 80}, {"port": "http", "protocol": "UDP"}, {"port": 8000, "endPort": 9000},
                  {"protocol": "SCTP"}, {"port": "443"}]}]})
    rule = p.ingress[0]
    rc = Selector((("r", "c"),))
    assert rule.peers == (PodPeer("x", None, rc), PodPeer(None, Selector((), (_req("t", "Exists"),)), Selector()),
                          PodPeer(None, Selector(), rc),
                          IPBlock(ipaddress.IPv4Network("10.0.0.0/8"), (ipaddress.IPv4Network("10.1.0.0/16"),)),
                          IPBlock(None))
    assert rule.ports == (PortMatch("TCP", 80), PortMatch("UDP", "http"), PortMatch("TCP", 8000, 9000),
                          PortMatch("SCTP"), PortMatch("TCP", 443))


def _req(key: str, op: str, *values: str):
    from fabric.policy.model import Requirement

    return Requirement(key, op, tuple(values))


@pytest.mark.parametrize("spec,field", [
    ({}, "spec.podSelector"),
    ({"podSelector": {"matchLabels": {"a": 1}}}, "spec.podSelector.matchLabels"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}, "spec.podSelector.matchExpressions[0].operator"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In", "values": []}]}},
     "spec.podSelector.matchExpressions[0].values"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}},
     "spec.podSelector.matchExpressions[0].values"),
    ({"podSelector": {}, "policyTypes": ["Sideways"]}, "spec.policyTypes"),
    ({"podSelector": {}, "ingress": [{"from": [{}]}]}, "spec.ingress[0].from[0]"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]},
     "spec.ingress[0].from[0]"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}, "spec.ingress[0].from[0].ipBlock.cidr"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}]}]},
     "spec.ingress[0].from[0].ipBlock.except[0]"),
    ({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.0.0/16"]}}]}]},
     "spec.egress[0].to[0].ipBlock.except[0]"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]}, "spec.ingress[0].ports[0].port"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "protocol": "ICMP"}]}]}, "spec.ingress[0].ports[0].protocol"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}, "spec.ingress[0].ports[0].endPort"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "endPort": 80}]}]}, "spec.ingress[0].ports[0].endPort"),
    ({"podSelector": {}, "ingress": [{"ports": [{"endPort": 80}]}]}, "spec.ingress[0].ports[0].endPort"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "Not_A_Name"}]}]}, "spec.ingress[0].ports[0].port"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": True}]}]}, "spec.ingress[0].ports[0]"),
    ({"podSelector": {}, "ingress": [{"fromm": []}]}, "spec.ingress[0].fromm"),
    ({"podSelector": {}, "ingres": []}, "spec.ingres"),
    ({"podSelector": {}, "egress": "all"}, "spec.egress"),
])
def test_bad_policies_are_rejected_with_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(PolicyError) as e:
        parse(spec)
    assert e.value.key == "x/p"
    assert any(p.startswith(f"{field}: ") for p in e.value.problems), e.value.problems


def _states(step: Step, parsed) -> dict[str, PolicyState]:
    states = {}
    for node in NODES:
        s = PolicyState(node)
        for name, ns in step.namespaces().items():
            s.set_namespace(name, ns)
        for key, pod in step.pods().items():
            s.set_pod(key, pod)
        for p in parsed:
            s.set_policy(p.key, p)
        states[node] = s
    return states


@pytest.mark.parametrize("step", STEPS, ids=[s.name for s in STEPS])
def test_truth_table(step: Step) -> None:
    """The upstream e2e cases as pods x pods x ports matrices: hand-written expectation == compiled
    datapath == spec evaluator, cell by cell."""
    parsed = [parse_policy(p) for p in step.policies]
    states = _states(step, parsed)
    world = World(step.pods().values(), step.namespaces(), parsed)
    wrong = []
    for s in PODS:
        for d in PODS:
            for proto, port in PORTS:
                want = step.allowed(s, d, proto, port)
                got, _, _ = datapath.flow(states[node_of(s)], states[node_of(d)], IPS[s], IPS[d], proto, port)
                spec = world.allowed(IPS[s], IPS[d], proto, port)
                if not want == got == spec:
                    wrong.append(f"{s}->{d} {proto}/{port}: expected {want}, datapath {got}, spec {spec}")
    assert not wrong, "\n".join(wrong)


def test_the_scenario_covers_what_the_issue_lists() -> None:
    assert len(PODS) >= 8 and len({p[0] for p in PODS}) >= 3
    assert sum(len(s.policies) for s in STEPS) >= 20
    text = repr([s.policies for s in STEPS])
    for needle in ("'policyTypes': ['Ingress']", "'Egress'", "namespaceSelector", "ipBlock", "except",
                   "serve-81-tcp", "endPort", "SCTP", "'UDP'"):
        assert needle in text, needle
    denied = sum(not s.allowed(a, b, proto, port) for s in STEPS for a in PODS for b in PODS for proto, port in PORTS)
    assert denied > 500  # the matrices are not all "allowed"


def _cluster_file(tmp_path, step: Step) -> Any:
    import json

    pods = [{"metadata": {"name": p.name, "namespace": p.namespace, "labels": dict(p.labels)},
             "spec": {"nodeName": p.node, "containers": [{"name": "c", "ports": [
                 {"name": n, "protocol": proto, "containerPort": port} for n, proto, port in p.ports]}]},
             "status": {"phase": "Running", "podIP": p.ips[0]}} for p in step.pods().values()]
    nss = [{"metadata": {"name": n.name, "labels": dict(n.labels)}} for n in step.namespaces().values()]
    cluster = {"nodes": [{"name": "node-1", "address": "192.168.0.1", "podCIDRs": ["10.244.1.0/24"]},
                         {"name": "node-2", "address": "192.168.0.2", "podCIDRs": ["10.244.2.0/24"]}],
               "pods": pods, "namespaces": nss,
               "networkPolicies": step.policies + [np("broken", "y", {"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]})]}
    (tmp_path / "cluster.json").write_text(json.dumps(cluster))
    cfg = tmp_path / "node.yaml"
    cfg.write_text("node: {name: node-1, address: 192.168.0.1/24}\nsource: {kind: file, path: cluster.json}\n")
    return cfg


def test_explain_flow_names_the_policy_and_rule(tmp_path, capsys) -> None:
    from fabric.cli import main

    step = next(s for s in STEPS if s.name.startswith("PodSelector OR NamespaceSelector"))
    cfg = str(_cluster_file(tmp_path, step))
    assert main(["explain", "-c", cfg, "--flow", "y/c", "x/a", "81/tcp"]) == 0
    out = capsys.readouterr().out
    assert "10.244.2.21 (pod y/c) -> 10.244.1.10 (pod x/a) 81/TCP: ALLOWED" in out
    assert "ingress: allowed by x/or ingress[0] (isolated by x/or)" in out
    assert "egress:  allowed: no policy selects pod y/c for egress" in out
    assert "y/broken: spec.ingress[0].ports[0].port: 0 must be 1-65535" in out and "BUG" not in out
    assert main(["explain", "-c", cfg, "--flow", "z/a", "10.244.1.10", "80/udp"]) == 1
    out = capsys.readouterr().out
    assert "DENIED by default: pod x/a is isolated for ingress by x/or and no rule allows it" in out
    # From the pod's own node (kubelet probes) it is let in; from the other node it is not.
    assert main(["explain", "-c", cfg, "--flow", "node-1", "x/a", "80/tcp"]) == 0
    assert "from the pod's own node" in capsys.readouterr().out
    assert main(["explain", "-c", cfg, "--flow", "192.168.0.2", "x/a", "80/tcp"]) == 1
    assert "(node node-2)" in capsys.readouterr().out
    assert main(["explain", "-c", cfg, "--flow", "y/c", "x/a", "80/icmp"]) == 2
    assert "expected PORT/PROTO" in capsys.readouterr().err
    assert main(["explain", "-c", cfg, "--flow", "nope/pod", "x/a", "80"]) == 2


def test_explain_flow_from_the_kubernetes_source(tmp_path, capsys, monkeypatch) -> None:
    from fabric.cli import main
    from tests.fakeapi import FakeApiServer
    from tests.fakeapi.__main__ import KUBECONFIG

    step = next(s for s in STEPS if s.name.startswith("allow x/a only from namespace y"))
    with FakeApiServer() as api:
        for ns in step.namespaces().values():
            api.apply("Namespace", {"metadata": {"name": ns.name, "labels": dict(ns.labels)}})
        for p in step.pods().values():
            api.apply("Pod", {"metadata": {"name": p.name, "namespace": p.namespace, "labels": dict(p.labels)},
                              "spec": {"nodeName": p.node, "containers": []},
                              "status": {"phase": "Running", "podIP": p.ips[0]}})
        for pol in step.policies:
            api.apply("NetworkPolicy", pol)
        (tmp_path / "kubeconfig").write_text(KUBECONFIG.format(url=api.url))
        cfg = tmp_path / "node.yaml"
        cfg.write_text(f"node: {{name: node-1, address: 192.168.0.1/24}}\n"
                       f"source: {{kind: kubernetes, kubeconfig: {tmp_path / 'kubeconfig'}}}\n")
        monkeypatch.setenv("NODE_NAME", "node-1")
        assert main(["explain", "-c", str(cfg), "--flow", "z/a", "x/a", "80/tcp"]) == 1
        assert "DENIED by default: pod x/a is isolated for ingress by x/allow-y" in capsys.readouterr().out
        assert main(["explain", "-c", str(cfg), "--flow", "y/b", "x/a", "80/tcp"]) == 0
        assert "allowed by x/allow-y ingress[0]" in capsys.readouterr().out
