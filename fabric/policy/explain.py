"""`fabric explain --flow SRC DST PORT/PROTO`: would a new connection pass, and by which policy and rule.

Pure over the cluster objects: the same desired state the agents compile (with every pod counted as
local, since egress is judged on the source's node and ingress on the destination's), walked the way
the nft table walks it (fabric.policy.datapath), and checked against the spec evaluator
(fabric.policy.evaluate); a disagreement would be a bug and is printed as one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from fabric.inputs import NamespaceInfo, NodeInfo, PodInfo
from fabric.policy import datapath
from fabric.policy.evaluate import World
from fabric.policy.model import PROTOCOLS, Policy, PolicyError, parse_policy
from fabric.policy.state import PolicyState


class FlowError(ValueError):
    """SRC, DST or PORT/PROTO can't be understood; the message says which."""


@dataclass
class Explained:
    allowed: bool
    lines: list[str]

    def text(self) -> str:
        return "\n".join(self.lines)


def parse_port(text: str) -> tuple[int, str]:
    port, _, proto = text.partition("/")
    proto = (proto or "tcp").upper()
    if proto not in PROTOCOLS or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise FlowError(f"{text!r}: expected PORT/PROTO, e.g. 80/tcp, 53/udp or 3868/sctp")
    return int(port), proto


def _endpoint(what: str, pods: Mapping[str, PodInfo], nodes: Mapping[str, NodeInfo]) -> tuple[str, str]:
    """(address, description) for a pod `namespace/name`, a node name, or an IPv4 address."""
    if what in pods:
        p = pods[what]
        if not p.ips:
            raise FlowError(f"pod {what} has no IPv4 address yet")
        return p.ips[0], f"pod {what}"
    if what in nodes:
        return str(nodes[what].address), f"node {what}"
    try:
        ip = str(ipaddress.IPv4Address(what))
    except ValueError:
        raise FlowError(f"{what!r}: not a pod (namespace/name), a node name or an IPv4 address") from None
    owners = [k for k, p in pods.items() if ip in p.ips]
    node = [n for n, info in nodes.items() if str(info.address) == ip]
    return ip, (f"pod {owners[0]}" if owners else f"node {node[0]}" if node else "an address outside the cluster's pods")


def explain_flow(pods: Mapping[str, PodInfo], namespaces: Mapping[str, NamespaceInfo], policy_objs: Mapping[str, dict],
                 nodes: Mapping[str, NodeInfo], src: str, dst: str, port_proto: str) -> Explained:
    port, proto = parse_port(port_proto)
    src_ip, src_desc = _endpoint(src, pods, nodes)
    dst_ip, dst_desc = _endpoint(dst, pods, nodes)
    state = PolicyState(None)
    for name, ns in namespaces.items():
        state.set_namespace(name, ns)
    lines: list[str] = []
    parsed: list[Policy] = []
    for key, obj in sorted(policy_objs.items()):
        try:
            p = parse_policy(obj)
        except PolicyError as e:
            lines.append(f"  note: {e} (not enforced)")
            continue
        parsed.append(p)
        state.set_policy(key, p)
    for key, pod in pods.items():
        state.set_pod(key, pod)
    src_node = next((n for n, info in nodes.items() if str(info.address) == src_ip), None)
    dst_pod = World(pods.values(), namespaces, []).pod_at(dst_ip)
    from_own_node = src_node is not None and dst_pod is not None and dst_pod.node == src_node
    allowed, e, i = datapath.flow(state, state, src_ip, dst_ip, proto, port, from_dst_node=from_own_node)
    head = f"{src_ip} ({src_desc}) -> {dst_ip} ({dst_desc}) {port}/{proto}: {'ALLOWED' if allowed else 'DENIED'}"
    out = [head, f"  egress:  {_describe(e, 'egress', src_desc)}", f"  ingress: {_describe(i, 'ingress', dst_desc)}"]
    spec = World(pods.values(), namespaces, parsed).allowed(src_ip, dst_ip, proto, port, src_node=src_node)
    if spec != allowed:
        out.append(f"  BUG: the NetworkPolicy spec says {'allowed' if spec else 'denied'}; please report this flow")
    out.append("  (replies of an allowed connection always pass; a connection a later change denies stops)")
    return Explained(allowed, out + lines)


def _describe(v: datapath.Verdict, direction: str, who: str) -> str:
    if v.why == "from the pod's own node":
        return "allowed: from the pod's own node (kubelet probes)"
    if not v.isolated_by and v.allowed:
        return f"allowed: no policy selects {who} for {direction}"
    if v.allowed and v.matched is not None:
        pol, rule = v.matched
        return f"allowed by {pol} {direction}[{rule}] (isolated by {', '.join(v.isolated_by)})"
    return f"DENIED by default: {who} is isolated for {direction} by {', '.join(v.isolated_by)} and no rule allows it"


def load_cluster(cfg, config_path, timeout: float = 30.0) -> dict[str, dict]:
    """The objects explain needs, from the agent's configured source: kind -> {key: value}."""
    from pathlib import Path

    from fabric.tracker import Store

    store = Store()
    if cfg.source.kind == "file":
        from fabric.sources.file import load_into, parse_cluster_file

        path = Path(cfg.source.path)
        load_into(store, parse_cluster_file(path if path.is_absolute() else Path(config_path).resolve().parent / path))
    else:
        import time

        from fabric.sources.kubernetes import KubernetesSource

        src = KubernetesSource(store, cfg.source)
        src.start()
        deadline = time.monotonic() + timeout
        try:
            while not src.synced():
                if time.monotonic() > deadline:
                    raise FlowError(f"the Kubernetes API did not list every kind within {timeout:g}s")
                time.sleep(0.1)
        finally:
            src.stop()
    return {k: store.snapshot(k) for k in ("Pod", "Namespace", "NetworkPolicy", "Node")}
