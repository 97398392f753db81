"""Property tests: the compiled datapath equals the spec, and incremental updates equal a fresh build.

Random clusters (3 namespaces, up to 9 pods on 2 nodes, named ports) and random NetworkPolicies in
Kubernetes shape (every selector operator, namespace/pod/both/ipBlock peers with except, numeric,
named and endPort ports, every policyTypes form) are:
1. compiled per node (fabric.policy.state) and every flow (pod/outside x pod/outside x 7 ports) is
   judged the way the nft table does (fabric.policy.datapath): it must equal the brute-force spec
   evaluator (fabric.policy.evaluate) cell by cell;
2. built incrementally through a random history (extra pods, label changes, policy edits, deletions,
   namespace relabels) and compared with a from-scratch build, including what the reconciler's
   per-key plans would have left in the kernel.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings, strategies as st

from fabric.inputs import NamespaceInfo, PodInfo
from fabric.policy import datapath
from fabric.policy.evaluate import World
from fabric.policy.model import parse_policy
from fabric.policy.reconcile import Applied, plan
from fabric.policy.state import PolicyState

NAMESPACES = ("x", "y", "z")
NODES = ("n1", "n2")
OUTSIDE = "192.168.7.7"
PORTS = [("TCP", 80), ("TCP", 81), ("TCP", 8080), ("UDP", 53), ("UDP", 80), ("SCTP", 80), ("TCP", 1000)]
NAMED = [("http", "TCP", 80), ("http", "UDP", 80), ("dns", "UDP", 53), ("alt", "TCP", 81), ("web", "TCP", 8080)]

label_keys = st.sampled_from(["pod", "app", "team"])
label_vals = st.sampled_from(["a", "b", "c"])
labels = st.dictionaries(label_keys, label_vals, max_size=3)


@st.composite
def selectors(draw) -> dict[str, Any]:
    sel: dict[str, Any] = {}
    if draw(st.booleans()):
        sel["matchLabels"] = draw(st.dictionaries(label_keys, label_vals, max_size=2))
    if draw(st.integers(0, 3)) == 0:
        exprs = []
        for _ in range(draw(st.integers(1, 2))):
            op = draw(st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]))
            e: dict[str, Any] = {"key": draw(label_keys), "operator": op}
            if op in ("In", "NotIn"):
                e["values"] = draw(st.lists(label_vals, min_size=1, max_size=2))
            exprs.append(e)
        sel["matchExpressions"] = exprs
    return sel


@st.composite
def peers(draw) -> dict[str, Any]:
    kind = draw(st.sampled_from(["pod", "ns", "both", "ip"]))
    if kind == "ip":
        cidr = draw(st.sampled_from(["10.0.0.0/16", "10.0.1.0/24", "10.0.0.0/8", "192.168.0.0/16", "0.0.0.0/0",
                                     "fd00::/64"]))
        block: dict[str, Any] = {"cidr": cidr}
        if cidr != "fd00::/64" and draw(st.booleans()):
            block["except"] = {"10.0.0.0/16": ["10.0.1.0/24"], "10.0.1.0/24": ["10.0.1.0/30", "10.0.1.4/31"],
                               "10.0.0.0/8": ["10.0.2.0/24"], "192.168.0.0/16": ["192.168.7.0/24"],
                               "0.0.0.0/0": ["10.0.0.0/16"]}[cidr]
        return {"ipBlock": block}
    out: dict[str, Any] = {}
    if kind in ("pod", "both"):
        out["podSelector"] = draw(selectors())
    if kind in ("ns", "both"):
        out["namespaceSelector"] = draw(selectors())
    return out


@st.composite
def ports(draw) -> dict[str, Any]:
    kind = draw(st.sampled_from(["num", "range", "named", "proto"]))
    p: dict[str, Any] = {}
    if draw(st.booleans()):
        p["protocol"] = draw(st.sampled_from(["TCP", "UDP", "SCTP"]))
    if kind == "num":
        p["port"] = draw(st.sampled_from([53, 80, 81, 8080]))
    elif kind == "range":
        p["port"] = draw(st.sampled_from([53, 80]))
        p["endPort"] = draw(st.sampled_from([80, 81, 1000]))
        if p["endPort"] < p["port"]:
            p["endPort"] = p["port"]
    elif kind == "named":
        p["port"] = draw(st.sampled_from(["http", "dns", "alt", "web", "nope"]))
    return p


@st.composite
def rules(draw, peer_key: str) -> dict[str, Any]:
    r: dict[str, Any] = {}
    if draw(st.integers(0, 3)):
        r[peer_key] = draw(st.lists(peers(), min_size=0, max_size=2))
    if draw(st.booleans()):
        r["ports"] = draw(st.lists(ports(), min_size=0, max_size=2))
    return r


@st.composite
def policies(draw, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"podSelector": draw(selectors())}
    types = draw(st.sampled_from([None, ["Ingress"], ["Egress"], ["Ingress", "Egress"]]))
    if types is not None:
        spec["policyTypes"] = types
    if draw(st.integers(0, 3)):
        spec["ingress"] = draw(st.lists(rules("from"), max_size=3))
    if draw(st.integers(0, 2)):
        spec["egress"] = draw(st.lists(rules("to"), max_size=3))
    return {"metadata": {"name": name, "namespace": draw(st.sampled_from(NAMESPACES))}, "spec": spec}


@st.composite
def pods(draw, i: int) -> PodInfo:
    named = draw(st.lists(st.sampled_from(NAMED), max_size=3, unique_by=lambda t: (t[0], t[1])))
    return PodInfo(draw(st.sampled_from(NAMESPACES)), f"p{i}", draw(labels), draw(st.sampled_from(NODES)),
                   (f"10.0.{i % 3}.{i + 1}",), "Running", False, tuple(sorted(set(named))))


@st.composite
def clusters(draw) -> tuple[list[PodInfo], dict[str, NamespaceInfo], list[dict[str, Any]]]:
    n = draw(st.integers(1, 9))
    pod_list = [draw(pods(i)) for i in range(n)]
    nss = {ns: NamespaceInfo(ns, {**draw(st.dictionaries(st.just("team"), label_vals, max_size=1)),
                                  "kubernetes.io/metadata.name": ns})
           for ns in NAMESPACES if draw(st.integers(0, 4))}  # some namespaces have no object: default labels
    pols = [draw(policies(f"np{i}")) for i in range(draw(st.integers(0, 5)))]
    return pod_list, nss, pols


def build(node: str | None, pod_list, nss, pols) -> PolicyState:
    s = PolicyState(node)
    for ns in nss.values():
        s.set_namespace(ns.name, ns)
    for p in pols:
        s.set_policy(f"{p['metadata']['namespace']}/{p['metadata']['name']}", parse_policy(p))
    for pod in pod_list:
        s.set_pod(pod.key, pod)
    return s


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_compiled_datapath_equals_the_spec(cluster) -> None:
    pod_list, nss, pols = cluster
    parsed = [parse_policy(p) for p in pols]
    world = World(pod_list, nss, parsed)
    states = {n: build(n, pod_list, nss, pols) for n in NODES}
    node_of = {pod.ips[0]: pod.node for pod in pod_list}
    ips = [pod.ips[0] for pod in pod_list] + [OUTSIDE]
    for src in ips:
        for dst in ips:
            for proto, port in PORTS:
                want = world.allowed(src, dst, proto, port)
                got, e, i = datapath.flow(states[node_of.get(src, "n1")], states[node_of.get(dst, "n1")],
                                          src, dst, proto, port)
                assert got == want, (src, dst, proto, port, e, i, pols)
    # The node's own address is let in to its own pods only (other nodes' addresses are judged).
    for pod in pod_list:
        assert world.allowed("10.9.9.9", pod.ips[0], "TCP", 80, src_node=pod.node)


def _snapshot(s: PolicyState) -> tuple:
    return ({k: frozenset(v) for k, v in s.sets.items()}, dict(s.chains), {d: dict(m) for d, m in s.maps.items()})


@st.composite
def histories(draw):
    """A final cluster plus a random history of other states that ends in it."""
    final = draw(clusters())
    pod_list, nss, pols = final
    steps: list[tuple[str, str, Any]] = []
    for _ in range(draw(st.integers(0, 12))):
        what = draw(st.sampled_from(["pod", "pod-del", "policy", "policy-del", "ns"]))
        if what == "pod":
            p = draw(pods(draw(st.integers(0, 11))))
            steps.append(("pod", p.key, p))
        elif what == "pod-del":
            steps.append(("pod", f"{draw(st.sampled_from(NAMESPACES))}/p{draw(st.integers(0, 11))}", None))
        elif what == "policy":
            p = draw(policies(f"np{draw(st.integers(0, 6))}"))
            steps.append(("policy", f"{p['metadata']['namespace']}/{p['metadata']['name']}", parse_policy(p)))
        elif what == "policy-del":
            steps.append(("policy", f"{draw(st.sampled_from(NAMESPACES))}/np{draw(st.integers(0, 6))}", None))
        else:
            ns = draw(st.sampled_from(NAMESPACES))
            steps.append(("ns", ns, draw(st.none() | st.builds(
                lambda t: NamespaceInfo(ns, {"team": t, "kubernetes.io/metadata.name": ns}), label_vals))))
    return final, steps


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories(), st.randoms(use_true_random=False))
def test_incremental_updates_equal_a_fresh_build(history, rnd) -> None:
    (pod_list, nss, pols), steps = history
    s = PolicyState("n1")
    applied = Applied.of(s)
    # Then converge to the final state: everything the history touched is set to its final value.
    final_pods = {p.key: p for p in pod_list}
    final_pols = {f"{p['metadata']['namespace']}/{p['metadata']['name']}": parse_policy(p) for p in pols}
    ops = list(steps)
    touched = {(k, key) for k, key, _ in steps}
    tail = [("pod", k, final_pods.get(k)) for kind, k in touched if kind == "pod"]
    tail += [("policy", k, final_pols.get(k)) for kind, k in touched if kind == "policy"]
    tail += [("ns", k, nss.get(k)) for kind, k in touched if kind == "ns"]
    tail += [("pod", k, p) for k, p in final_pods.items()] + [("policy", k, p) for k, p in final_pols.items()]
    tail += [("ns", k, n) for k, n in nss.items()]
    rnd.shuffle(tail)
    for i, (kind, key, value) in enumerate(ops + tail):
        {"pod": s.set_pod, "policy": s.set_policy, "ns": s.set_namespace}[kind](key, value)
        if i % 3 == 0:  # the reconciler runs every few changes; its per-key plans must track exactly
            applied.record(plan(s, applied, s.take_dirty()))
    applied.record(plan(s, applied, s.take_dirty()))
    fresh = build("n1", pod_list, nss, pols)
    assert _snapshot(s) == _snapshot(fresh)
    assert (applied.sets, applied.chains, applied.maps) == (Applied.of(fresh).sets, Applied.of(fresh).chains,
                                                            Applied.of(fresh).maps)
