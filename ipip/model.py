"""Desired kernel routes for pod networks (pure): direct, IPIP, recursive, blackhole, ECMP.

Inputs are plain values: this node's facts as read from the kernel (the underlay network = the prefix
of the kernel address holding the node IP, its device and MTU, the non-fabric routes of the main
table for recursive next-hop resolution), the pools, this node's pod CIDRs, and the learned routes
(prefix -> {(peer, next_hop)}) after import filtering. Output: `RoutePlan` = routes keyed by
destination, each saying why it exists, whether the IPIP tunnel is needed, and warnings.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from enum import Enum
from typing import Protocol


class IPIPMode(str, Enum):
    """When pod traffic to a peer is encapsulated (Calico's ipipMode)."""

    ALWAYS = "Always"
    CROSS_SUBNET = "CrossSubnet"
    NEVER = "Never"


class Pool(Protocol):
    """What the route model needs of an IP pool (fabric.config.Pool satisfies it)."""

    @property
    def cidr(self) -> ipaddress.IPv4Network: ...
    @property
    def ipip_mode(self) -> IPIPMode: ...
    @property
    def disabled(self) -> bool: ...

IPIP_OVERHEAD = 20  # outer IPv4 header


@dataclass(frozen=True, order=True)
class NextHop:
    gateway: ipaddress.IPv4Address
    device: str
    onlink: bool = False


@dataclass(frozen=True)
class Route:
    dst: ipaddress.IPv4Network
    kind: str = "unicast"  # "unicast" | "blackhole"
    nexthops: tuple[NextHop, ...] = ()  # sorted; >1 = ECMP
    mtu: int | None = None
    why: str = field(default="", compare=False)

    def key(self) -> tuple:
        """What must match in the kernel (the reason does not)."""
        return (self.dst, self.kind, self.nexthops, self.mtu)


@dataclass(frozen=True)
class UnderlayRoute:
    """A route of the main table that is not ours, as read from the kernel (for recursive resolution)."""

    dst: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address | None
    device: str


@dataclass(frozen=True)
class NodeFacts:
    """What the kernel says about this node's underlay (read by the adapter, decided on here)."""

    address: ipaddress.IPv4Address
    network: ipaddress.IPv4Network  # prefix of the kernel address holding `address`
    device: str
    mtu: int
    routes: tuple[UnderlayRoute, ...] = ()


@dataclass(frozen=True)
class RoutePlan:
    routes: dict[ipaddress.IPv4Network, Route]
    tunnel_needed: bool
    tunnel_mtu: int
    warnings: tuple[str, ...] = ()
    prefix_warnings: dict[ipaddress.IPv4Network, tuple[str, ...]] = field(default_factory=dict)


def same_subnet_network(kernel_prefix: ipaddress.IPv4Interface,
                        configured: ipaddress.IPv4Interface | None) -> tuple[ipaddress.IPv4Network, str | None]:
    """The network that decides "same subnet". Never a /32 (Calico #3003, #2375): a /32 kernel address
    says nothing about neighbours, so fall back to the configured prefix, else everyone is remote."""
    if kernel_prefix.network.prefixlen < 32:
        return kernel_prefix.network, None
    if configured is not None and configured.network.prefixlen < 32 and kernel_prefix.ip in configured.network:
        return configured.network, (f"node address {kernel_prefix} is a /32 in the kernel; using the configured "
                                    f"prefix {configured.network} to decide same-subnet peers")
    return kernel_prefix.network, (f"node address {kernel_prefix} is a /32 and no wider prefix is configured: "
                                   "every peer counts as cross-subnet")


def pool_for(prefix: ipaddress.IPv4Network, pools: Iterable[Pool]) -> Pool | None:
    best: Pool | None = None
    for p in pools:
        if not p.disabled and prefix.subnet_of(p.cidr):
            if best is None or p.cidr.prefixlen > best.cidr.prefixlen:
                best = p
    return best


def resolve_underlay(target: ipaddress.IPv4Address, facts: NodeFacts) -> NextHop | None:
    """How the underlay reaches `target`: directly on our subnet, else longest-prefix match over the
    kernel's non-fabric routes (BIRD's `gateway recursive`, as Calico uses). None = unreachable."""
    if target in facts.network:
        return NextHop(target, facts.device)
    best: UnderlayRoute | None = None
    for r in facts.routes:
        if target in r.dst and (best is None or r.dst.prefixlen > best.dst.prefixlen):
            best = r
    if best is None:
        return None
    return NextHop(best.gateway if best.gateway is not None else target, best.device)


def desired_routes(*, facts: NodeFacts, pools: list[Pool], local_pod_cidrs: Iterable[ipaddress.IPv4Network],
                   learned: Mapping[ipaddress.IPv4Network, Iterable[tuple[str, ipaddress.IPv4Address]]],
                   tunnel_device: str = "tunl0") -> RoutePlan:
    routes: dict[ipaddress.IPv4Network, Route] = {}
    warnings: dict[ipaddress.IPv4Network, list[str]] = {}
    tunnel_mtu = facts.mtu - IPIP_OVERHEAD
    tunnel_needed = any(p.ipip_mode is not IPIPMode.NEVER and not p.disabled for p in pools)

    local = set(local_pod_cidrs)
    for cidr in sorted(local):
        # As Calico: unused addresses of our own block must not follow the default route out.
        routes[cidr] = Route(cidr, "blackhole", why=f"local pod CIDR of this node ({cidr}): blackhole for unused "
                                                     "addresses; pods have their own /32 routes")

    for prefix in sorted(learned):
        if prefix in local:
            continue
        hops: set[NextHop] = set()
        reasons: list[str] = []
        uses_tunnel = False
        for peer, next_hop in sorted(learned[prefix], key=lambda t: (t[1], t[0])):
            pool = pool_for(prefix, pools)
            same = next_hop in facts.network
            mode = pool.ipip_mode if pool is not None else IPIPMode.NEVER
            where = "same subnet" if same else "another subnet"
            pool_txt = f"pool {pool.cidr} ipipMode {mode.value}" if pool else "no pool (external route)"
            if mode is IPIPMode.ALWAYS or (mode is IPIPMode.CROSS_SUBNET and not same):
                hops.add(NextHop(next_hop, tunnel_device, onlink=True))
                uses_tunnel = True
                reasons.append(f"from {peer} via {next_hop} ({where}, {pool_txt}) -> IPIP via {tunnel_device}")
                continue
            hop = resolve_underlay(next_hop, facts)
            if hop is None:
                warnings.setdefault(prefix, []).append(f"{prefix} from {peer}: next hop {next_hop} is in another subnet and not routed by "
                                f"the underlay ({pool_txt}): unreachable")
                continue
            hops.add(hop)
            if hop.gateway == next_hop:
                reasons.append(f"from {peer} via {next_hop} ({where}, {pool_txt}) -> direct on {hop.device}")
            else:
                reasons.append(f"from {peer} via {next_hop} ({where}, {pool_txt}) -> recursive via underlay "
                               f"gateway {hop.gateway} on {hop.device}")
                if pool is not None:
                    warnings.setdefault(prefix, []).append(f"{prefix} from {peer}: ipipMode Never and {next_hop} is in another subnet: "
                                    f"sent to underlay gateway {hop.gateway}, reachable only if it routes pod CIDRs")
        if not hops:
            continue
        routes[prefix] = Route(prefix, "unicast", tuple(sorted(hops)),
                               mtu=tunnel_mtu if uses_tunnel else None,
                               why="; ".join(reasons) + (" [ECMP]" if len(hops) > 1 else ""))
    return RoutePlan(routes, tunnel_needed, tunnel_mtu, tuple(w for p in sorted(warnings) for w in warnings[p]),
                     {p: tuple(ws) for p, ws in warnings.items()})


@dataclass(frozen=True)
class RouteDiff:
    """Deletions first, then replaces (create-or-replace is atomic in the kernel)."""

    delete: tuple[Route, ...]
    replace: tuple[Route, ...]

    def __bool__(self) -> bool:
        return bool(self.delete or self.replace)


def diff_routes(desired: Mapping[ipaddress.IPv4Network, Route],
                actual: Mapping[ipaddress.IPv4Network, Route]) -> RouteDiff:
    delete = tuple(actual[d] for d in sorted(actual.keys() - desired.keys()))
    replace = tuple(desired[d] for d in sorted(desired)
                    if d not in actual or actual[d].key() != desired[d].key())
    return RouteDiff(delete, replace)
