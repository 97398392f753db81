"""The NetworkPolicy spec, evaluated by brute force: one flow, every policy, no indexes. Pure.

This is the reference the compiled datapath (fabric.policy.state + fabric.policy.datapath) is tested
against: it reads the API's words directly and is too slow for anything but tests and `explain`.

A flow is allowed when the source pod's egress allows it AND the destination pod's ingress allows it.
A side that no policy isolates allows everything. Traffic from the destination pod's own node is
allowed in (kubelet probes). A pod's traffic to itself never leaves the pod (loopback), so no node can
judge it: it is allowed, as the upstream e2e suite expects (`AllowLoopback`). Replies of allowed connections are the datapath's business (conntrack),
not a question this module answers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from fabric.inputs import NAMESPACE_NAME_LABEL, NamespaceInfo, PodInfo
from fabric.policy.model import IPBlock, Policy, PodPeer, PortMatch, Rule

Labels = Mapping[str, str]


def namespace_labels(namespaces: Mapping[str, NamespaceInfo], name: str) -> Labels:
    ns = namespaces.get(name)
    return ns.labels if ns is not None else {NAMESPACE_NAME_LABEL: name}


class World:
    """Pods (enforceable ones), namespaces and policies, looked up the slow way."""

    def __init__(self, pods: Iterable[PodInfo], namespaces: Mapping[str, NamespaceInfo],
                 policies: Iterable[Policy]) -> None:
        self.pods = [p for p in pods if p.enforceable]
        self.namespaces = dict(namespaces)
        self.policies = list(policies)

    def pod_at(self, ip: str) -> PodInfo | None:
        found = sorted((p for p in self.pods if ip in p.ips), key=lambda p: p.key)
        return found[0] if found else None

    def peer_matches(self, peer: PodPeer | IPBlock, ip: str, pod: PodInfo | None) -> bool:
        if isinstance(peer, IPBlock):
            return peer.contains(ipaddress.IPv4Address(ip))
        if pod is None:
            return False
        if peer.namespaces is None:
            if pod.namespace != peer.namespace:
                return False
        elif not peer.namespaces.matches(namespace_labels(self.namespaces, pod.namespace)):
            return False
        return peer.pods.matches(pod.labels)

    @staticmethod
    def port_matches(ports: tuple[PortMatch, ...], dst: PodInfo | None, proto: str, port: int) -> bool:
        if not ports:
            return True
        for pm in ports:
            if pm.protocol != proto:
                continue
            if pm.port is None:
                return True
            if isinstance(pm.port, int):
                if pm.port <= port <= (pm.end_port or pm.port):
                    return True
            elif dst is not None and (pm.port, proto, port) in dst.ports:
                return True
        return False

    def selecting(self, pod: PodInfo, direction: str) -> list[Policy]:
        return [p for p in self.policies if p.namespace == pod.namespace and p.rules(direction) is not None
                and p.pod_selector.matches(pod.labels)]

    def rule_allows(self, rule: Rule, direction: str, src: str, dst: str, proto: str, port: int) -> bool:
        peer_ip = src if direction == "ingress" else dst
        peer_pod = self.pod_at(peer_ip)
        if rule.peers is not None and not any(self.peer_matches(p, peer_ip, peer_pod) for p in rule.peers):
            return False
        return self.port_matches(rule.ports, self.pod_at(dst), proto, port)

    def side_allows(self, direction: str, src: str, dst: str, proto: str, port: int) -> bool:
        pod = self.pod_at(dst if direction == "ingress" else src)
        if pod is None:
            return True
        policies = self.selecting(pod, direction)
        if not policies:
            return True
        return any(self.rule_allows(r, direction, src, dst, proto, port)
                   for p in policies for r in p.rules(direction) or ())

    def allowed(self, src: str, dst: str, proto: str, port: int, *, src_node: str | None = None) -> bool:
        """Is a new connection src -> dst:port/proto allowed? `src_node`: the node name when the source
        is a node's own address (then the destination pod's own node is always let in)."""
        if src == dst:
            return True  # loopback inside the pod
        egress = src_node is not None or self.side_allows("egress", src, dst, proto, port)
        dst_pod = self.pod_at(dst)
        if src_node is not None and dst_pod is not None and dst_pod.node == src_node:
            return egress
        return egress and self.side_allows("ingress", src, dst, proto, port)
