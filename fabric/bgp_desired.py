"""Desired BGP state (pure): which neighbors this node has and what it announces to whom.

Mesh neighbors are every other node (Calico's node-to-node mesh) in the cluster ASN (or a node's
own ASN); external peers (ToRs, route reflectors) come from config, selected by node labels.
Route reflection (Calico's routeReflectorClusterID): a node is a reflector when its Node carries the
label RR_LABEL=<cluster ID> (this node: `node.routeReflectorClusterId` in its config wins). With the
mesh off, reflectors peer with every other node (the nodes that are no reflectors are their clients,
other reflectors are not) and every other node peers with the reflectors only.
Announcements: this node's pod CIDRs to everyone; configured service ranges to external peers only
(mesh members route services themselves through IPVS). An external peer's `export` filter removes
that peer from the targets of every prefix it does not pass: what it denies is never announced to it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from bgp.exabgp_config import Neighbor
from bgp.policy import filter_verdict
from bgp.reflect import Reflector
from fabric.config import AgentConfig, Peer
from fabric.inputs import NodeInfo
from ipip.model import PeerRouting
from loadbalancer.model import slice_service_key


@dataclass(frozen=True)
class DesiredAnnouncement:
    prefix: ipaddress.IPv4Network
    next_hop: ipaddress.IPv4Address
    communities: tuple[str, ...] = ()
    neighbors: frozenset[str] | None = None  # None: every neighbor
    why: str = ""


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """A peer's nodeSelector: every key=value must match the node's labels; empty selects all nodes."""
    return all(labels.get(k) == v for k, v in selector.items())


def local_pod_cidrs(cfg: AgentConfig, me: NodeInfo | None) -> list[ipaddress.IPv4Network]:
    """Configured pod CIDRs win; else what the cluster says (Kubernetes `spec.podCIDRs`)."""
    if cfg.node.pod_cidrs:
        return list(cfg.node.pod_cidrs)
    return list(me.pod_cidrs) if me is not None else []


RR_LABEL = "bgp-fabric.io/route-reflector-cluster-id"


def reflector_clusters(cfg: AgentConfig, nodes: dict[str, NodeInfo]
                       ) -> tuple[dict[str, ipaddress.IPv4Address], list[str]]:
    """Route reflector nodes with their cluster ID, and the problems found (a bad label is reported and
    that node is not a reflector)."""
    out: dict[str, ipaddress.IPv4Address] = {}
    problems: list[str] = []
    for name, n in nodes.items():
        v = n.labels.get(RR_LABEL)
        if v is None:
            continue
        try:
            out[name] = ipaddress.IPv4Address(v)
        except ValueError:
            problems.append(f"Node/{name}: label {RR_LABEL}={v!r} is not an IPv4 address; not a route reflector")
    if cfg.node.route_reflector_cluster_id is not None:
        out[cfg.node.name] = cfg.node.route_reflector_cluster_id
    return out, problems


def reflector(cfg: AgentConfig, nodes: dict[str, NodeInfo], neighbors: Iterable[Neighbor]) -> Reflector | None:
    """This node as a route reflector (None: it is not one): its clients are the iBGP neighbors marked
    route_reflector_client, every other iBGP neighbor is a non-client."""
    cluster_id = reflector_clusters(cfg, nodes)[0].get(cfg.node.name)
    if cluster_id is None:
        return None
    ibgp = [n for n in neighbors if n.peer_as == n.local_as]
    clients = frozenset(n.name for n in ibgp if n.route_reflector_client)
    return Reflector(cluster_id, cfg.node.address.ip, clients, frozenset(n.name for n in ibgp) - clients)


def desired_neighbors(cfg: AgentConfig, nodes: dict[str, NodeInfo], previous: Iterable[str] = ()
                      ) -> tuple[list[Neighbor], list[str]]:
    """Neighbors for this node and the problems found. Every item is judged alone: a bad node or peer
    is skipped with a reason, the rest is used. Two nodes with one address: the one already a neighbor
    (`previous`) keeps it, else the first by name; the other is skipped. Peers with one address are
    judged per node: only those whose nodeSelector selects this node can clash (one address for disjoint
    node sets is a per-rack anycast ToR); of two that do, the one already a neighbor keeps it, else the
    first in config order."""
    me_addr = cfg.node.address.ip
    local_as = cfg.node.asn or cfg.cluster.asn
    t = cfg.timers
    out: list[Neighbor] = []
    problems: list[str] = []
    mesh_addrs: set[ipaddress.IPv4Address] = set()
    prev = set(previous)
    rr, rr_problems = reflector_clusters(cfg, nodes)
    problems += rr_problems
    my_cluster = rr.get(cfg.node.name)
    if cfg.cluster.mesh or rr:
        owner: dict[ipaddress.IPv4Address, str] = {}
        for name in sorted(nodes, key=lambda n: (n not in prev, n)):
            owner.setdefault(nodes[name].address, name)
        for name in sorted(nodes):
            n = nodes[name]
            if name == cfg.node.name or n.address == me_addr:
                if name != cfg.node.name:
                    problems.append(f"Node/{name}: address {n.address} is this node's own; skipped")
                continue
            if not cfg.cluster.mesh and my_cluster is None and name not in rr:
                continue  # mesh off: a node that is no reflector peers with the reflectors only
            if owner[n.address] != name:
                problems.append(f"Node/{name}: address {n.address} is also node {owner[n.address]}'s; skipped "
                                "(one of them is wrong)")
                continue
            mesh_addrs.add(n.address)
            out.append(Neighbor(name=name, peer_address=n.address, peer_as=n.asn or cfg.cluster.asn,
                                local_as=local_as, local_address=me_addr, router_id=me_addr,
                                hold_time=t.hold_time, graceful_restart_time=t.graceful_restart_time, kind="mesh",
                                keepalive=t.keepalive, connect_retry=t.connect_retry,
                                route_reflector_client=not cfg.cluster.mesh and my_cluster is not None
                                and name not in rr, cluster_id=my_cluster))
    me = nodes.get(cfg.node.name)
    labels = me.labels if me is not None else {}
    taken = {n.name for n in out}
    mine = [p for p in cfg.peers if selects(p.node_selector, labels)]
    # Peers that share an address are fine for disjoint node sets (per-rack anycast); two selecting this
    # node clash: the one already a neighbor keeps the address, else the first in config order.
    peer_at: dict[ipaddress.IPv4Address, str] = {}
    for p in sorted(mine, key=lambda p: p.name not in prev):
        peer_at.setdefault(p.address, p.name)
    for p in mine:
        if peer_at[p.address] != p.name:
            problems.append(f"peer {p.name}: {p.address} is also peer {peer_at[p.address]}'s and both select this "
                            "node; skipped")
            continue
        if p.address in mesh_addrs:
            problems.append(f"peer {p.name}: {p.address} is a mesh node already; skipped")
            continue
        if p.address == me_addr:
            problems.append(f"peer {p.name}: {p.address} is this node's own address; skipped")
            continue
        if p.name in taken:
            problems.append(f"peer {p.name}: name clashes with a node name; skipped")
            continue
        out.append(_external(p, cfg, local_as, me_addr, my_cluster))
    good: list[Neighbor] = []
    for nb in out:
        bad = nb.problems()
        if bad:
            problems += [f"{b}; skipped" for b in bad]
        else:
            good.append(nb)
    return good, problems


def peer_routing(cfg: AgentConfig, neighbors: Iterable[Neighbor]) -> dict[str, PeerRouting]:
    """How each external neighbor's routes are installed (its address and next-hop policy)."""
    local_as = cfg.node.asn or cfg.cluster.asn
    peers = {p.name: p for p in cfg.peers}
    out = {}
    for n in neighbors:
        if n.kind != "external":
            continue
        p = peers.get(n.name)
        out[n.name] = PeerRouting(n.peer_address, p.next_hop_policy(local_as) if p else "any")
    return out


def _external(p: Peer, cfg: AgentConfig, local_as: int, me_addr: ipaddress.IPv4Address,
              cluster_id: ipaddress.IPv4Address | None) -> Neighbor:
    return Neighbor(name=p.name, peer_address=p.address, peer_as=p.asn, local_as=local_as,
                    local_address=p.source_address or me_addr, router_id=me_addr, hold_time=cfg.timers.hold_time,
                    port=p.port, md5_password=p.password, passive=p.passive, multihop=p.multihop,
                    graceful_restart_time=cfg.timers.graceful_restart_time, kind="external",
                    route_reflector_client=p.route_reflector_client,
                    cluster_id=cluster_id, keepalive=cfg.timers.keepalive,
                    connect_retry=cfg.timers.connect_retry)


def desired_announcements(cfg: AgentConfig, pod_cidrs: list[ipaddress.IPv4Network],
                          neighbors: list[Neighbor]) -> dict[ipaddress.IPv4Network, DesiredAnnouncement]:
    me = cfg.node.address.ip
    comm = tuple(cfg.advertise.communities)
    out: dict[ipaddress.IPv4Network, DesiredAnnouncement] = {}
    if cfg.advertise.pod_cidrs:
        for c in pod_cidrs:
            out[c] = DesiredAnnouncement(c, me, comm, None, f"pod CIDR of node {cfg.node.name}")
    externals = frozenset(n.name for n in neighbors if n.kind == "external")
    if externals:
        adv = cfg.advertise
        for label, cidrs in (("serviceClusterIPs", adv.service_cluster_ips),
                             ("serviceExternalIPs", adv.service_external_ips),
                             ("serviceLoadBalancerIPs", adv.service_load_balancer_ips)):
            for c in cidrs:
                if c not in out:
                    out[c] = DesiredAnnouncement(c, me, comm, externals, f"advertise.{label} (external peers only)")
    return apply_export_filters(cfg, out, neighbors)


def apply_export_filters(cfg: AgentConfig, anns: dict[ipaddress.IPv4Network, DesiredAnnouncement],
                         neighbors: list[Neighbor]) -> dict[ipaddress.IPv4Network, DesiredAnnouncement]:
    """Drop each external neighbor whose `export` filter denies a prefix from that prefix's targets.
    An announcement left with no target stays in the map (with an empty set) so explain can say why."""
    filters = {p.name: p.export_filter for p in cfg.peers if p.export_filter is not None}
    filtered = [n.name for n in neighbors if n.kind == "external" and n.name in filters]
    if not filtered:
        return anns
    every = frozenset(n.name for n in neighbors)
    out: dict[ipaddress.IPv4Network, DesiredAnnouncement] = {}
    for prefix, a in anns.items():
        targets = every if a.neighbors is None else a.neighbors
        denied = {name: why for name in filtered if name in targets
                  and (why := filter_verdict(filters[name], prefix)) is not None}
        if denied:
            note = "; ".join(f"not to {name}: export filter, {why}" for name, why in sorted(denied.items()))
            a = DesiredAnnouncement(a.prefix, a.next_hop, a.communities, targets - denied.keys(), f"{a.why}; {note}")
        out[prefix] = a
    return out


def _m(v: object) -> dict:
    return v if isinstance(v, dict) else {}  # malformed fields read as absent: the service proxy reports them


def _l(v: object) -> list:
    return v if isinstance(v, list) else []


def _service_ips(svc: dict) -> list[ipaddress.IPv4Address]:
    spec, status = _m(svc.get("spec")), _m(svc.get("status"))
    raw = _l(spec.get("externalIPs")) + [_m(i).get("ip") for i in _l(_m(status.get("loadBalancer")).get("ingress"))]
    out = []
    for r in raw:
        try:
            if isinstance(r, str):  # IPv4Address(5) would be 0.0.0.5
                out.append(ipaddress.IPv4Address(r))
        except ValueError:
            continue  # the service proxy reports malformed addresses
    return out


def _has_local_ready_endpoint(slices: list[dict], node: str) -> bool:
    for sl in slices:
        for ep in _l(sl.get("endpoints")):
            cond = _m(_m(ep).get("conditions"))
            if _m(ep).get("nodeName") == node and cond.get("ready") in (None, True):  # nil means ready
                return True
    return False


def service_announcements(cfg: AgentConfig, services: dict[str, dict], slices: dict[str, dict],
                          neighbors: list[Neighbor]) -> dict[ipaddress.IPv4Network, DesiredAnnouncement]:
    """Calico's rule for externalTrafficPolicy: Local: each external/LoadBalancer IP inside an advertised
    range is announced as a /32 only by nodes with a ready local endpoint, so upstream routers send
    clients only where they are answered locally (no SNAT, client IP kept). Cluster-policy services are
    covered by the advertised ranges themselves. The whole set at once, O(services): the reference the
    BGP stage's ServiceAnnouncer (the same, kept per service) is tested against."""
    externals = frozenset(n.name for n in neighbors if n.kind == "external")
    if not externals:
        return {}
    by_service: dict[str, list[dict]] = {}
    for sl in slices.values():
        svc_key, _ = slice_service_key(sl)  # None for a malformed slice (the service proxy reports it)
        if svc_key:
            by_service.setdefault(svc_key, []).append(sl)
    me, comm = cfg.node.address.ip, tuple(cfg.advertise.communities)
    out: dict[ipaddress.IPv4Network, DesiredAnnouncement] = {}
    for key, svc in sorted(services.items()):
        for net in service_slash32s(cfg, svc, by_service.get(key, [])):
            out[net] = DesiredAnnouncement(net, me, comm, externals, f"service {key} (externalTrafficPolicy Local) "
                                           "has a ready endpoint on this node")
    return apply_export_filters(cfg, out, neighbors)


def service_slash32s(cfg: AgentConfig, svc: Any, slices: Iterable[dict]) -> frozenset[ipaddress.IPv4Network]:
    """The /32s one service makes this node announce: its external / LoadBalancer IPs inside an advertised
    range when it is externalTrafficPolicy Local and has a ready endpoint on this node."""
    if not isinstance(svc, dict) or _m(svc.get("spec")).get("externalTrafficPolicy") != "Local":
        return frozenset()
    if not _has_local_ready_endpoint(list(slices), cfg.node.name):
        return frozenset()
    ranges = list(cfg.advertise.service_external_ips) + list(cfg.advertise.service_load_balancer_ips)
    return frozenset(ipaddress.IPv4Network((ip, 32)) for ip in _service_ips(svc) if any(ip in r for r in ranges))


class ServiceAnnouncer:
    """The ETP=Local /32s per service, kept per change: a Service or EndpointSlice change recomputes the
    services it touches (a slice's service before and after the change), not every service. `anns` equals
    service_announcements() over the same objects (tests/unit/test_bgp_stage.py checks it on random
    sequences); it depends on the config (ranges, this node) through `rebuild` and on the neighbors only
    through the announcements' targets (`retarget`)."""

    def __init__(self) -> None:
        self.by_service: dict[str, frozenset[ipaddress.IPv4Network]] = {}
        self.holders: dict[ipaddress.IPv4Network, set[str]] = {}  # /32 -> the services that want it
        self.slice_owner: dict[str, str] = {}  # slice key -> its service ("ns/name")
        self.slices_of: dict[str, set[str]] = {}
        self.anns: dict[ipaddress.IPv4Network, DesiredAnnouncement] = {}

    def rebuild(self, cfg: AgentConfig, services: dict[str, dict], slices: dict[str, dict],
                neighbors: list[Neighbor]) -> set[ipaddress.IPv4Network]:
        """Everything from scratch (first run, config change, resync). Returns every prefix before or after."""
        before = set(self.anns)
        self.by_service, self.holders, self.slice_owner, self.slices_of = {}, {}, {}, {}
        for key, sl in slices.items():
            self._own_slice(key, sl)
        for key in services:
            self._set(key, service_slash32s(cfg, services[key], (slices[k] for k in self.slices_of.get(key, ()))))
        self.anns = {}
        self.retarget(cfg, neighbors)
        return before | set(self.anns)

    def update(self, cfg: AgentConfig, neighbors: list[Neighbor], get: Callable[[str, str], Any],
               services: Iterable[str], slices: Iterable[str]) -> set[ipaddress.IPv4Network]:
        """Changed Service and EndpointSlice keys; `get(kind, key)` reads the Store. Returns the /32s whose
        announcement changed (O(the services touched))."""
        touched = set(services)
        for key in slices:
            old = self.slice_owner.get(key)
            new = self._own_slice(key, get("EndpointSlice", key))
            touched |= {s for s in (old, new) if s}
        changed: set[ipaddress.IPv4Network] = set()
        for svc in touched:
            sls = [sl for k in self.slices_of.get(svc, ()) if (sl := get("EndpointSlice", k)) is not None]
            changed |= self._set(svc, service_slash32s(cfg, get("Service", svc), sls))
        self._announce(cfg, neighbors, changed)
        return changed

    def retarget(self, cfg: AgentConfig, neighbors: list[Neighbor]) -> set[ipaddress.IPv4Network]:
        """The neighbors (or communities) changed: every /32's announcement again (O(/32s))."""
        before = dict(self.anns)
        self.anns = {}
        self._announce(cfg, neighbors, set(self.holders))
        return {p for p in before.keys() | self.anns.keys() if before.get(p) != self.anns.get(p)}

    def _own_slice(self, key: str, sl: Any) -> str | None:
        old = self.slice_owner.pop(key, None)
        if old is not None:
            self.slices_of[old].discard(key)
            if not self.slices_of[old]:
                del self.slices_of[old]
        svc = slice_service_key(sl)[0] if sl is not None else None  # None: malformed (the proxy says why)
        if svc:
            self.slice_owner[key] = svc
            self.slices_of.setdefault(svc, set()).add(key)
        return svc

    def _set(self, svc: str, nets: frozenset[ipaddress.IPv4Network]) -> set[ipaddress.IPv4Network]:
        old = self.by_service.pop(svc, frozenset())
        if nets:
            self.by_service[svc] = nets
        for p in old - nets:
            h = self.holders[p]
            h.discard(svc)
            if not h:
                del self.holders[p]
        for p in nets - old:
            self.holders.setdefault(p, set()).add(svc)
        return set(old ^ nets)  # a /32 in both keeps its holders (and its announcement): not a change

    def _announce(self, cfg: AgentConfig, neighbors: list[Neighbor], prefixes: Iterable[ipaddress.IPv4Network]) -> None:
        externals = frozenset(n.name for n in neighbors if n.kind == "external")
        me, comm = cfg.node.address.ip, tuple(cfg.advertise.communities)
        new: dict[ipaddress.IPv4Network, DesiredAnnouncement] = {}
        for p in prefixes:
            self.anns.pop(p, None)
            h = self.holders.get(p)
            if h and externals:
                new[p] = DesiredAnnouncement(p, me, comm, externals, f"service {max(h)} (externalTrafficPolicy Local) "
                                             "has a ready endpoint on this node")
        self.anns.update(apply_export_filters(cfg, new, neighbors))
