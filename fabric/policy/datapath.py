"""What our nftables table does with a new connection, computed from the desired state. Pure.

This follows the rendered table rule by rule (fabric.policy.nft): the `egress-pods` map sends an
isolated source pod to its namespace chain, which jumps to each policy chain whose target set holds
the pod; a matching rule accepts, the end of the namespace chain drops. Ingress likewise on the
destination. It is the model's side of the probe matrix (what the kernel must show, cell by cell),
property-tested against the spec evaluator (fabric.policy.evaluate), and the engine of `explain`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from fabric.policy.state import JumpRule, PeerRule, PolicyState


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    isolated_by: tuple[str, ...] = ()  # policies that select the pod in this direction
    matched: tuple[str, int] | None = None  # (policy key, rule index) that allowed it
    why: str = ""


def rule_matches(state: PolicyState, r: PeerRule, direction: str, src: str, dst: str, proto: str, port: int) -> bool:
    peer = src if direction == "ingress" else dst
    if r.peer_set is not None and peer not in state.sets.get(r.peer_set, ()):
        return False
    if r.cidr is not None:
        ip = ipaddress.IPv4Address(peer)
        if ip not in r.cidr or any(ip in e for e in r.excepts):
            return False
    if r.protocol is not None and proto != r.protocol:
        return False
    if r.ranges and not any(lo <= port <= hi for lo, hi in r.ranges):
        return False
    if r.named is not None and (dst, proto, port) not in state.sets.get(r.named, ()):
        return False
    return True


def side(state: PolicyState, direction: str, src: str, dst: str, proto: str, port: int) -> Verdict:
    """The verdict of one direction's base chain (egress on the source, ingress on the destination)."""
    pod_ip = dst if direction == "ingress" else src
    chain = state.maps[direction].get(pod_ip)
    if chain is None:
        return Verdict(True, why=f"{pod_ip} is not isolated for {direction} on this node")
    isolated: list[str] = []
    for jump in state.chains.get(chain, ()):
        assert isinstance(jump, JumpRule)
        if pod_ip not in state.sets.get(jump.target_set, ()):
            continue
        isolated.append(jump.policy)
        for r in state.chains.get(jump.chain, ()):
            assert isinstance(r, PeerRule)
            if rule_matches(state, r, direction, src, dst, proto, port):
                return Verdict(True, tuple(isolated), (r.origin[0], r.origin[2]),
                               f"allowed by {r.origin[0]} {direction}[{r.origin[2]}]")
    return Verdict(False, tuple(isolated), None,
                   f"denied: {direction} of {pod_ip} is isolated by {', '.join(isolated) or '?'} and no rule matches")


def flow(src_state: PolicyState, dst_state: PolicyState, src: str, dst: str, proto: str, port: int, *,
         from_dst_node: bool = False) -> tuple[bool, Verdict, Verdict]:
    """A new connection: egress judged on the source's node, ingress on the destination's node.
    `from_dst_node`: the source is the destination node's own address (always let in). A pod talking
    to itself stays inside the pod (loopback): no hook of ours sees it."""
    if src == dst:
        loop = Verdict(True, why="a pod's traffic to itself never leaves it")
        return True, loop, loop
    e = side(src_state, "egress", src, dst, proto, port)
    i = Verdict(True, why="from the pod's own node") if from_dst_node else side(dst_state, "ingress", src, dst, proto, port)
    return e.allowed and i.allowed, e, i
