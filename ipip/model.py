"""Desired kernel routes (pure): direct, IPIP, recursive, blackhole, ECMP; next hops validated.

Inputs are plain values: this node's facts as read from the kernel (the underlay network = the prefix
of the kernel address holding the node IP, its device and MTU, the connected networks, the non-fabric
routes of the main table for recursive next-hop resolution), the pools, this node's pod CIDRs, the
learned routes (prefix -> {(peer, next_hop)}) after import filtering, and how each external peer's next
hops are taken. Output: `RoutePlan` = routes keyed by destination, each saying why it exists, whether
the IPIP tunnel is needed, and warnings.

Pod routes (inside a pool) follow the pool's ipipMode. Routes from external peers outside every pool
carry `external_metric`, so a route of the node's own (its default, its connected subnet, a static
route: metric 0 or whatever the node uses) is always preferred and never replaced. Their next hops are
checked as FRR does: `connected` (single-hop eBGP: the next hop must be on a connected network, else
the route is unusable), `peer` (only the peer's own address), `any` (resolved recursively through the
underlay's routes: iBGP and multihop eBGP). A next hop that is this node's own address is never used.
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


ROUTE_KINDS = ("direct", "ipip", "recursive", "blackhole", "ecmp")
RouteKey = tuple[ipaddress.IPv4Network, int]  # (dst, metric): with table and tos what the kernel keys on


@dataclass(frozen=True)
class Route:
    dst: ipaddress.IPv4Network
    kind: str = "unicast"  # "unicast" | "blackhole"
    nexthops: tuple[NextHop, ...] = ()  # sorted; >1 = ECMP
    mtu: int | None = None
    metric: int = 0  # RTA_PRIORITY
    why: str = field(default="", compare=False)
    # direct | ipip | recursive | blackhole | ecmp: how the route model built it (metrics); "" when
    # read from the kernel (then guessed from the route itself, see kind_name)
    shape: str = field(default="", compare=False)

    def kind_name(self) -> str:
        """One of ROUTE_KINDS: the model's shape, or for a route read from the kernel a guess from its
        hops (onlink hops are how this agent writes IPIP; recursion can't be seen in a kernel route)."""
        if self.shape:
            return self.shape
        if self.kind == "blackhole":
            return "blackhole"
        if len(self.nexthops) > 1:
            return "ecmp"
        return "ipip" if any(h.onlink for h in self.nexthops) else "direct"

    def key(self) -> tuple:
        """What must match in the kernel (the reason does not)."""
        return (self.dst, self.kind, self.nexthops, self.mtu, self.metric)

    @property
    def id(self) -> RouteKey:
        """The kernel's identity of the route in its table (tos is always 0 here)."""
        return (self.dst, self.metric)

    def text(self) -> str:
        """`ip route`-like, for logs and status."""
        if self.kind == "blackhole":
            out = f"blackhole {self.dst}"
        else:
            hops = " ".join(f"via {h.gateway} dev {h.device}{' onlink' if h.onlink else ''}" for h in self.nexthops)
            out = f"{self.dst} {hops}".rstrip()
        return out + (f" metric {self.metric}" if self.metric else "") + (f" mtu {self.mtu}" if self.mtu else "")


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
    connected: tuple[tuple[ipaddress.IPv4Network, str], ...] = ()  # (network, device) of every address but ours


NEXT_HOP_POLICIES = ("connected", "peer", "any")


@dataclass(frozen=True)
class PeerRouting:
    """How the routes of one external peer are installed: its address and which next hops are taken."""

    address: ipaddress.IPv4Address
    next_hop: str = "any"  # one of NEXT_HOP_POLICIES


@dataclass(frozen=True)
class RoutePlan:
    routes: dict[ipaddress.IPv4Network, Route]
    tunnel_needed: bool
    tunnel_mtu: int
    warnings: tuple[str, ...] = ()
    prefix_warnings: dict[ipaddress.IPv4Network, tuple[str, ...]] = field(default_factory=dict)
    # (peer, why) per prefix whose next hop from that peer can't be used (nothing installed for it;
    # not in `warnings`: the caller summarises them per peer, see unusable_lines)
    unusable: dict[ipaddress.IPv4Network, tuple[tuple[str, str], ...]] = field(default_factory=dict)


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


def resolve_connected(target: ipaddress.IPv4Address, facts: NodeFacts) -> NextHop | None:
    """`target` directly on a connected network (the node subnet or another interface's), else None."""
    if target in facts.network:
        return NextHop(target, facts.device)
    for net, dev in facts.connected:
        if net.prefixlen < 32 and target in net:
            return NextHop(target, dev)
    return None


def _external_hop(peer: str, next_hop: ipaddress.IPv4Address, routing: PeerRouting | None,
                  facts: NodeFacts) -> tuple[NextHop | None, str]:
    """(the hop to install, why) for a route outside every pool; hop None = unusable, `why` says why."""
    if next_hop == facts.address:
        return None, f"next hop {next_hop} is this node's own address"
    policy = routing.next_hop if routing is not None else "any"
    if policy == "peer" and routing is not None and next_hop != routing.address:
        return None, (f"third-party next hop {next_hop} (peer {routing.address}; nextHop: peer takes only the "
                      "peer's own)")
    if policy in ("peer", "connected"):
        hop = resolve_connected(next_hop, facts)
        if hop is None:
            return None, (f"next hop {next_hop} is not on a connected network (nextHop: {policy}; a single-hop eBGP "
                          "peer's next hop must be directly reachable: set nextHop: any or multihop to resolve it "
                          "through the underlay)")
        return hop, f"direct on {hop.device} (connected, nextHop: {policy})"
    hop = resolve_underlay(next_hop, facts)
    if hop is None:
        return None, f"next hop {next_hop} is not routed by the underlay: unreachable"
    if hop.gateway == next_hop:
        return hop, f"direct on {hop.device}"
    return hop, f"recursive via underlay gateway {hop.gateway} on {hop.device}"


def tunnel_address(local_pod_cidrs: Iterable[ipaddress.IPv4Network]) -> ipaddress.IPv4Address | None:
    """The tunnel device's own address: the network address of this node's first pod CIDR (as flannel
    does; no IPAM hands it to a pod). Host-originated traffic through the tunnel takes it as its source,
    and other nodes route it back through our pod CIDR, whatever address is first on the underlay device."""
    cidrs = sorted(local_pod_cidrs)
    return cidrs[0].network_address if cidrs else None


def desired_routes(*, facts: NodeFacts, pools: list[Pool], local_pod_cidrs: Iterable[ipaddress.IPv4Network],
                   learned: Mapping[ipaddress.IPv4Network, Iterable[tuple[str, ipaddress.IPv4Address]]],
                   tunnel_device: str = "tunl0", external: Mapping[str, PeerRouting] | None = None,
                   external_metric: int = 0) -> RoutePlan:
    routes: dict[ipaddress.IPv4Network, Route] = {}
    warnings: dict[ipaddress.IPv4Network, list[str]] = {}
    unusable: dict[ipaddress.IPv4Network, list[tuple[str, str]]] = {}
    tunnel_mtu = facts.mtu - IPIP_OVERHEAD
    tunnel_needed = any(p.ipip_mode is not IPIPMode.NEVER and not p.disabled for p in pools)

    local = set(local_pod_cidrs)
    for cidr in sorted(local):
        # As Calico: unused addresses of our own block must not follow the default route out.
        routes[cidr] = Route(cidr, "blackhole", why=f"local pod CIDR of this node ({cidr}): blackhole for unused "
                                                     "addresses; pods have their own /32 routes", shape="blackhole")

    # What one (peer, next hop) gives doesn't depend on the prefix, only on its pool: worked out once per
    # (pool, peer, next hop) and reused for every prefix (10,000 prefixes from one peer share one).
    hop_of: dict[tuple[int, str, ipaddress.IPv4Address], _Hop] = {}  # by (id(pool), peer, next hop)
    pool_of = _PoolLookup(pools)
    ext = external or {}

    def one_hop(pool: Pool | None, peer: str, next_hop: ipaddress.IPv4Address) -> _Hop:
        if pool is None:
            hop, why = _external_hop(peer, next_hop, ext.get(peer), facts)
            if hop is None:
                return _Hop(None, why, "", False, False)
            return _Hop(hop, f"from {peer} via {next_hop} (no pool: external route, metric {external_metric}) -> {why}",
                        "recursive" if hop.gateway != next_hop else "direct", False, False)
        same = next_hop in facts.network
        mode = pool.ipip_mode
        where = "same subnet" if same else "another subnet"
        pool_txt = f"pool {pool.cidr} ipipMode {mode.value}"
        if mode is IPIPMode.ALWAYS or (mode is IPIPMode.CROSS_SUBNET and not same):
            return _Hop(NextHop(next_hop, tunnel_device, onlink=True),
                        f"from {peer} via {next_hop} ({where}, {pool_txt}) -> IPIP via {tunnel_device}", "ipip", True,
                        False)
        hop = resolve_underlay(next_hop, facts)
        if hop is None:
            return _Hop(None, f"next hop {next_hop} is in another subnet and not routed by the underlay ({pool_txt}): "
                              "unreachable", "", False, False)
        if hop.gateway == next_hop:
            return _Hop(hop, f"from {peer} via {next_hop} ({where}, {pool_txt}) -> direct on {hop.device}", "direct",
                        False, False)
        return _Hop(hop, f"from {peer} via {next_hop} ({where}, {pool_txt}) -> recursive via underlay gateway "
                         f"{hop.gateway} on {hop.device}", "recursive", False, True)

    for prefix in sorted(learned, key=_addr_key):
        if prefix in local:
            continue
        pool = pool_of(prefix)
        holders = learned[prefix]
        if len(holders) == 1:  # the common case, without the sets and lists ECMP needs
            ((peer, next_hop),) = holders
            k = (id(pool), peer, next_hop)
            h = hop_of.get(k)
            if h is None:
                h = hop_of[k] = one_hop(pool, peer, next_hop)
            if h.hop is None:
                unusable[prefix] = [(peer, h.why)]
                continue
            if h.warn:
                warnings[prefix] = [f"{prefix} from {peer}: ipipMode Never and {next_hop} is in another subnet: sent to "
                                    f"underlay gateway {h.hop.gateway}, reachable only if it routes pod CIDRs"]
            routes[prefix] = Route(prefix, "unicast", (h.hop,), mtu=tunnel_mtu if h.tunnel else None,
                                   metric=external_metric if pool is None else 0, why=h.why, shape=h.shape)
            continue
        holders = sorted(holders, key=lambda t: (t[1], t[0]))
        hops: set[NextHop] = set()
        reasons: list[str] = []
        uses_tunnel = False
        shapes: set[str] = set()
        for peer, next_hop in holders:
            k = (id(pool), peer, next_hop)
            h = hop_of.get(k)
            if h is None:
                h = hop_of[k] = one_hop(pool, peer, next_hop)
            if h.hop is None:
                unusable.setdefault(prefix, []).append((peer, h.why))
                continue
            hops.add(h.hop)
            shapes.add(h.shape)
            reasons.append(h.why)
            uses_tunnel |= h.tunnel
            if h.warn:
                assert pool is not None
                warnings.setdefault(prefix, []).append(
                    f"{prefix} from {peer}: ipipMode Never and {next_hop} is in another subnet: sent to underlay "
                    f"gateway {h.hop.gateway}, reachable only if it routes pod CIDRs")
        if not hops:
            continue
        why = reasons[0] if len(reasons) == 1 else "; ".join(reasons) + (" [ECMP]" if len(hops) > 1 else "")
        if pool is None:
            routes[prefix] = Route(prefix, "unicast", tuple(sorted(hops)), metric=external_metric, why=why,
                                   shape=_shape(hops, shapes))
        else:
            routes[prefix] = Route(prefix, "unicast", tuple(sorted(hops)), mtu=tunnel_mtu if uses_tunnel else None,
                                   why=why, shape=_shape(hops, shapes))
    return RoutePlan(routes, tunnel_needed, tunnel_mtu, tuple(w for p in sorted(warnings) for w in warnings[p]),
                     {p: tuple(ws) for p, ws in warnings.items()}, {p: tuple(u) for p, u in unusable.items()})


@dataclass(frozen=True)
class _Hop:
    """What one (pool, peer, next hop) gives a prefix: its hop (None: unusable, `why` says why), the
    reason text, the route shape, whether it goes through the tunnel, whether it warns (ipipMode Never
    through an underlay gateway)."""

    hop: NextHop | None
    why: str
    shape: str
    tunnel: bool
    warn: bool


def _addr_key(p: ipaddress.IPv4Network) -> tuple[int, int]:
    return int(p.network_address), p.prefixlen


class _PoolLookup:
    """pool_for as integer comparisons over the enabled pools, most specific first."""

    def __init__(self, pools: Iterable[Pool]) -> None:
        enabled = sorted((p for p in pools if not p.disabled), key=lambda p: -p.cidr.prefixlen)
        self._spans = [(int(p.cidr.network_address), int(p.cidr.broadcast_address), p) for p in enabled]

    def __call__(self, prefix: ipaddress.IPv4Network) -> Pool | None:
        lo = int(prefix.network_address)
        hi = lo | (0xFFFFFFFF >> prefix.prefixlen)
        for plo, phi, p in self._spans:
            if plo <= lo and hi <= phi:
                return p
        return None


def unusable_lines(unusable: Mapping[ipaddress.IPv4Network, Iterable[tuple[str, str]]]) -> list[str]:
    """One warning per unusable (prefix, peer), as `fabric plan` and explain print them."""
    return [f"{p} from {peer}: {why}: not installed" for p in sorted(unusable) for peer, why in unusable[p]]


def _shape(hops: set[NextHop], shapes: set[str]) -> str:
    """ecmp for several next hops, else how its one hop is reached."""
    if len(hops) > 1:
        return "ecmp"
    return next(iter(shapes)) if len(shapes) == 1 else "direct"
