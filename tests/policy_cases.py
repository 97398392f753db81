"""The NetworkPolicy scenario shared by the truth-table unit tests and the kernel probe matrix.

The cluster of the upstream NetworkPolicy e2e suite and Cyclonus: namespaces x, y, z (label ns=<name>),
pods a, b, c in each (label pod=<name>), serving TCP and UDP on ports 80 and 81 with the container port
names the upstream suite uses (serve-80-tcp, ...). The pods sit on two nodes.

`STEPS` is a sequence: each step gives the whole set of policies in force (and label changes); the
harness applies only the difference to the previous step, so updates, deletions and relabels are
exercised as the agent sees them. `expect` is the hand-written truth table of the step: (src, dst,
proto, port) -> allowed, written from the upstream test's intent, never from our code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fabric.inputs import NAMESPACE_NAME_LABEL, NamespaceInfo, PodInfo

NAMESPACES = ("x", "y", "z")
POD_NAMES = ("a", "b", "c")
PORTS = (("TCP", 80), ("TCP", 81), ("UDP", 80), ("UDP", 81))
NAMED_PORTS = tuple((f"serve-{port}-{proto.lower()}", proto, port) for proto, port in PORTS)
NODES = {"node-1": "10.244.1.0/24", "node-2": "10.244.2.0/24"}
IPS = {("x", "a"): "10.244.1.10", ("x", "b"): "10.244.1.11", ("x", "c"): "10.244.2.10",
       ("y", "a"): "10.244.1.20", ("y", "b"): "10.244.2.20", ("y", "c"): "10.244.2.21",
       ("z", "a"): "10.244.1.30", ("z", "b"): "10.244.2.30", ("z", "c"): "10.244.1.31"}
PODS = tuple(IPS)

Pod = tuple[str, str]
Expect = Callable[[Pod, Pod, str, int], bool]


def node_of(p: Pod) -> str:
    return "node-1" if IPS[p].startswith("10.244.1.") else "node-2"


def pod_info(p: Pod, labels: dict[str, str] | None = None) -> PodInfo:
    return PodInfo(p[0], p[1], {"pod": p[1], **(labels or {})}, node_of(p), (IPS[p],), "Running", False,
                   tuple(sorted(NAMED_PORTS)))


def ns_info(name: str, labels: dict[str, str] | None = None) -> NamespaceInfo:
    return NamespaceInfo(name, {"ns": name, NAMESPACE_NAME_LABEL: name, **(labels or {})})


def np(name: str, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def sel(**labels: str) -> dict[str, Any]:
    return {"matchLabels": labels}


@dataclass
class Step:
    name: str
    policies: list[dict[str, Any]]
    expect: Expect
    pod_labels: dict[Pod, dict[str, str]] = field(default_factory=dict)  # extra labels in force
    ns_labels: dict[str, dict[str, str]] = field(default_factory=dict)

    def allowed(self, s: Pod, d: Pod, proto: str, port: int) -> bool:
        """The truth table: a pod's traffic to itself stays inside it (upstream: AllowLoopback)."""
        return s == d or self.expect(s, d, proto, port)

    def pods(self) -> dict[str, PodInfo]:
        return {f"{p[0]}/{p[1]}": pod_info(p, self.pod_labels.get(p)) for p in PODS}

    def namespaces(self) -> dict[str, NamespaceInfo]:
        return {ns: ns_info(ns, self.ns_labels.get(ns)) for ns in NAMESPACES}


def everything(s: Pod, d: Pod, proto: str, port: int) -> bool:
    return True


def to_xa_only_from(pred: Callable[[Pod, str, int], bool]) -> Expect:
    """x/a is the one isolated pod for ingress; pred(src, proto, port) says what reaches it."""
    return lambda s, d, proto, port: d != ("x", "a") or pred(s, proto, port)


XA = ("x", "a")
ING = ["Ingress"]
EG = ["Egress"]
ALL_PORTS_80_81 = [{"port": 80, "protocol": "TCP"}, {"port": 81, "protocol": "TCP"}]

STEPS: list[Step] = [
    Step("no policies: everything is allowed", [], everything),
    Step("default-deny-ingress in x", [np("deny-ingress", "x", {"podSelector": {}, "policyTypes": ING})],
         lambda s, d, proto, port: d[0] != "x"),
    Step("default-deny-all in x (ingress and egress)",
         [np("deny-all", "x", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})],
         lambda s, d, proto, port: d[0] != "x" and s[0] != "x"),
    Step("allow x/a from pods in x with pod=b (PodSelector)",
         [np("allow-b", "x", {"podSelector": sel(pod="a"), "ingress": [{"from": [{"podSelector": sel(pod="b")}]}]})],
         to_xa_only_from(lambda s, proto, port: s == ("x", "b"))),
    Step("allow x/a from every namespace (empty NamespaceSelector)",
         [np("allow-all-ns", "x", {"podSelector": sel(pod="a"), "ingress": [{"from": [{"namespaceSelector": {}}]}]})],
         everything),
    Step("allow x/a only from namespace y (NamespaceSelector)",
         [np("allow-y", "x", {"podSelector": sel(pod="a"), "ingress": [{"from": [{"namespaceSelector": sel(ns="y")}]}]})],
         to_xa_only_from(lambda s, proto, port: s[0] == "y")),
    Step("allow x/a from pod In (b) (PodSelector matchExpressions)",
         [np("allow-expr", "x", {"podSelector": sel(pod="a"), "ingress": [{"from": [{"podSelector": {
             "matchExpressions": [{"key": "pod", "operator": "In", "values": ["b"]}]}}]}]})],
         to_xa_only_from(lambda s, proto, port: s == ("x", "b"))),
    Step("allow x/a from namespaces ns In (y) using the default kubernetes.io/metadata.name label",
         [np("allow-ns-expr", "x", {"podSelector": sel(pod="a"), "ingress": [{"from": [{"namespaceSelector": {
             "matchExpressions": [{"key": NAMESPACE_NAME_LABEL, "operator": "In", "values": ["y"]}]}}]}]})],
         to_xa_only_from(lambda s, proto, port: s[0] == "y")),
    Step("PodSelector OR NamespaceSelector (two peers)",
         [np("or", "x", {"podSelector": sel(pod="a"), "ingress": [{"from": [
             {"namespaceSelector": sel(ns="y")}, {"podSelector": sel(pod="b")}]}]})],
         to_xa_only_from(lambda s, proto, port: s[0] == "y" or s == ("x", "b"))),
    Step("PodSelector AND NamespaceSelector (one peer): pod=b in namespaces y or z",
         [np("and", "x", {"podSelector": sel(pod="a"), "ingress": [{"from": [
             {"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]},
              "podSelector": sel(pod="b")}]}]})],
         to_xa_only_from(lambda s, proto, port: s in (("y", "b"), ("z", "b")))),
    Step("only port 81 to x/a (Ports)",
         [np("port-81", "x", {"podSelector": sel(pod="a"), "ingress": [{"ports": [{"port": 81, "protocol": "TCP"}]}]})],
         to_xa_only_from(lambda s, proto, port: (proto, port) == ("TCP", 81))),
    Step("stacked policies with overlapping podSelectors: the union (80 from y, 81 from z)",
         [np("80-from-y", "x", {"podSelector": sel(pod="a"), "ingress": [
             {"from": [{"namespaceSelector": sel(ns="y")}], "ports": [{"port": 80}]}]}),
          np("81-from-z", "x", {"podSelector": {}, "ingress": [
              {"from": [{"namespaceSelector": sel(ns="z")}], "ports": [{"port": 81}]}]})],
         lambda s, d, proto, port: d[0] != "x" or (proto == "TCP" and (
             (port == 81 and s[0] == "z") or (port == 80 and s[0] == "y" and d == XA)))),
    Step("ingress on one named port (serve-81-tcp)",
         [np("named-81", "x", {"podSelector": sel(pod="a"), "ingress": [{"ports": [{"port": "serve-81-tcp"}]}]})],
         to_xa_only_from(lambda s, proto, port: (proto, port) == ("TCP", 81))),
    Step("ingress from namespace y on one named UDP port (serve-80-udp)",
         [np("named-udp", "x", {"podSelector": sel(pod="a"), "ingress": [{
             "from": [{"namespaceSelector": sel(ns="y")}], "ports": [{"port": "serve-80-udp", "protocol": "UDP"}]}]})],
         to_xa_only_from(lambda s, proto, port: s[0] == "y" and (proto, port) == ("UDP", 80))),
    Step("endPort range 80-81 on TCP from z; UDP denied",
         [np("range", "x", {"podSelector": sel(pod="a"), "ingress": [{
             "from": [{"namespaceSelector": sel(ns="z")}], "ports": [{"port": 80, "endPort": 81, "protocol": "TCP"}]}]})],
         to_xa_only_from(lambda s, proto, port: s[0] == "z" and proto == "TCP")),
    Step("any port of one protocol (UDP), no TCP: a policy naming only UDP must not let TCP in",
         [np("udp-only", "x", {"podSelector": sel(pod="a"), "ingress": [{"ports": [{"protocol": "UDP"}]}]})],
         to_xa_only_from(lambda s, proto, port: proto == "UDP")),
    Step("SCTP only: TCP and UDP to x/a are denied (not mistaken for TCP)",
         [np("sctp", "x", {"podSelector": sel(pod="a"), "ingress": [{"ports": [{"protocol": "SCTP", "port": 80}]}]})],
         to_xa_only_from(lambda s, proto, port: False)),
    Step("deny ingress from other namespaces (from podSelector {} in x)",
         [np("same-ns", "x", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]})],
         lambda s, d, proto, port: d[0] != "x" or s[0] == "x"),
    Step("updated policy: same name, now from z only",
         [np("same-ns", "x", {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": sel(ns="z")}]}]})],
         lambda s, d, proto, port: d[0] != "x" or s[0] == "z"),
    Step("allow from namespace with label team=b: namespace y relabelled (updated namespace)",
         [np("team-b", "x", {"podSelector": sel(pod="a"), "ingress": [{"from": [{"namespaceSelector": sel(team="b")}]}]})],
         to_xa_only_from(lambda s, proto, port: s[0] == "y"), ns_labels={"y": {"team": "b"}}),
    Step("allow from pods with role=client: pod z/b relabelled (updated pod)",
         [np("role-client", "x", {"podSelector": sel(pod="a"), "ingress": [{"from": [
             {"namespaceSelector": {}, "podSelector": sel(role="client")}]}]})],
         to_xa_only_from(lambda s, proto, port: s == ("z", "b")), pod_labels={("z", "b"): {"role": "client"}}),
    Step("deny ingress to updated pod: x/c takes label pod-role=protected",
         [np("protected", "x", {"podSelector": sel(**{"pod-role": "protected"}), "policyTypes": ING})],
         lambda s, d, proto, port: d != ("x", "c"), pod_labels={("x", "c"): {"pod-role": "protected"}}),
    Step("deny egress from x/a (egress PodSelector, no rules)",
         [np("deny-egress-a", "x", {"podSelector": sel(pod="a"), "policyTypes": EG})],
         lambda s, d, proto, port: s != XA),
    Step("egress from x/a on one named port to y (serve-80-tcp)",
         [np("egress-named", "x", {"podSelector": sel(pod="a"), "policyTypes": EG, "egress": [
             {"to": [{"namespaceSelector": sel(ns="y")}], "ports": [{"port": "serve-80-tcp"}]}]})],
         lambda s, d, proto, port: s != XA or (d[0] == "y" and (proto, port) == ("TCP", 80))),
    Step("egress to one port only (81/TCP) from every pod of z",
         [np("egress-81", "z", {"podSelector": {}, "policyTypes": EG,
                                "egress": [{"ports": [{"port": 81, "protocol": "TCP"}]}]})],
         lambda s, d, proto, port: s[0] != "z" or (proto, port) == ("TCP", 81)),
    Step("no policyTypes but egress rules: the policy isolates ingress too (API defaulting)",
         [np("egress-81", "z", {"podSelector": {}, "egress": [{"ports": [{"port": 81, "protocol": "TCP"}]}]})],
         lambda s, d, proto, port: d[0] != "z" and (s[0] != "z" or (proto, port) == ("TCP", 81))),
    Step("egress ipBlock with except: x/a may reach node-2's pods except y/b",
         [np("egress-cidr", "x", {"podSelector": sel(pod="a"), "policyTypes": EG, "egress": [{"to": [
             {"ipBlock": {"cidr": "10.244.2.0/24", "except": ["10.244.2.20/32"]}}]}]})],
         lambda s, d, proto, port: s != XA or (node_of(d) == "node-2" and d != ("y", "b"))),
    Step("ingress ipBlock: x/a only from 10.244.1.0/24 except 10.244.1.30/31 (z/a, z/c)",
         [np("ingress-cidr", "x", {"podSelector": sel(pod="a"), "ingress": [{"from": [
             {"ipBlock": {"cidr": "10.244.1.0/24", "except": ["10.244.1.30/31"]}}]}]})],
         to_xa_only_from(lambda s, proto, port: node_of(s) == "node-1" and s[0] != "z")),
    Step("an address in both cidr and except is allowed by a second policy (union with ipBlock)",
         [np("ingress-cidr", "x", {"podSelector": sel(pod="a"), "ingress": [{"from": [
             {"ipBlock": {"cidr": "10.244.1.0/24", "except": ["10.244.1.30/31"]}}]}]}),
          np("ingress-za", "x", {"podSelector": sel(pod="a"), "ingress": [{"from": [
              {"ipBlock": {"cidr": "10.244.1.30/32"}}]}]})],
         to_xa_only_from(lambda s, proto, port: node_of(s) == "node-1" and s != ("z", "c"))),
    Step("ingress and egress together: x/a takes only from y and sends only to z",
         [np("both", "x", {"podSelector": sel(pod="a"), "policyTypes": ["Ingress", "Egress"],
                           "ingress": [{"from": [{"namespaceSelector": sel(ns="y")}]}],
                           "egress": [{"to": [{"namespaceSelector": sel(ns="z")}]}]})],
         lambda s, d, proto, port: (d != XA or s[0] == "y") and (s != XA or d[0] == "z")),
    Step("client-side egress deny wins over a server's allow-all",
         [np("client-deny", "y", {"podSelector": sel(pod="b"), "policyTypes": EG}),
          np("server-allow", "x", {"podSelector": {}, "ingress": [{}]})],
         lambda s, d, proto, port: s != ("y", "b")),
    Step("egress to a server in another namespace by PodSelector AND NamespaceSelector, plus allow-all ingress",
         [np("egress-and", "x", {"podSelector": sel(pod="a"), "policyTypes": EG, "egress": [{"to": [
             {"namespaceSelector": sel(ns="y"), "podSelector": sel(pod="b")}]}]}),
          np("allow-all-ingress", "x", {"podSelector": {}, "ingress": [{}]})],
         lambda s, d, proto, port: s != XA or d == ("y", "b")),
    Step("multiple egress policies: allow-all egress takes precedence",
         [np("deny-egress", "x", {"podSelector": {}, "policyTypes": EG}),
          np("allow-egress", "x", {"podSelector": {}, "policyTypes": EG, "egress": [{}]})],
         everything),
    Step("policies deleted: enforcement stops", [], everything),
]
