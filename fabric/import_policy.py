"""Applies bgp.policy to everything the RIB holds, per peer. Pure apart from remembering which
rejections were already logged (each is logged once).

Where pod routes may come from: a prefix inside an enabled pool is a pod route and is judged by the
mesh rules when it comes from a mesh node or from an iBGP peer in our ASN (a route reflector: it keeps
the original next hop). An eBGP peer offering a pool prefix is sending our own routes back (the AS-path
loop a router would drop; ExaBGP does no loop detection): rejected. Every other prefix from an
external peer goes through that peer's import filter and maxPrefixes.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping

from bgp.attributes import PathAttributes
from bgp.policy import MASK32, ExternalImportPolicy, MeshImportPolicy, Reason, Rejection, RejectionLog, spans
from fabric.config import AgentConfig
from fabric.inputs import NodeInfo

Learned = dict[ipaddress.IPv4Network, set[tuple[str, ipaddress.IPv4Address]]]
# (peer, prefixes) -> each prefix's path attributes as learned from that peer (bgp.rib.Rib.attrs)
AttrsOf = Callable[[str, Iterable[ipaddress.IPv4Network]], Mapping[ipaddress.IPv4Network, PathAttributes | None]]
EBGP_POD_CIDR = Reason("pod-cidr-from-ebgp", "pod CIDR from an eBGP peer (our own routes coming back; pod routes "
                                             "come from the cluster)")


class Fresh(str):
    """A rejection not reported before, as the line "peer P: prefix: reason"; `.peer`, `.rejection`."""

    peer: str
    rejection: Rejection

    def __new__(cls, peer: str, r: Rejection) -> "Fresh":
        s = super().__new__(cls, f"peer {peer}: {r.prefix}: {r.reason}")
        s.peer, s.rejection = peer, r
        return s


class ImportFilter:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self._log = RejectionLog()
        # (peer, prefix) -> why it is refused now. Replaced whole by each filter() (never mutated after),
        # so another thread may read the reference it got.
        self._active: dict[tuple[str, ipaddress.IPv4Network], Rejection] = {}

    def filter(self, routes: Mapping[ipaddress.IPv4Network, Iterable[tuple[str, ipaddress.IPv4Address]]],
               kinds: Mapping[str, str], nodes: Mapping[str, NodeInfo],
               own_pod_cidrs: Iterable[ipaddress.IPv4Network],
               ibgp: Iterable[str] = (), only: set[ipaddress.IPv4Network] | None = None,
               node_networks: Iterable[ipaddress.IPv4Network] = (), attrs: AttrsOf | None = None
               ) -> tuple[Learned, list[Fresh]]:
        """Accepted routes, and the rejections not logged before ("peer P: prefix: reason").
        `kinds`: neighbor name -> "mesh" | "external"; `ibgp`: external neighbors in our own ASN;
        `node_networks`: this node's own subnet(s), refused from external peers that did not opt in;
        `attrs`: the learned routes' path attributes (AS_PATH loop detection for external peers).
        `only`: `routes` holds just these prefixes (a per-change update): the active rejections of
        other prefixes are kept. Not for peers with maxPrefixes (that needs the peer's whole set)."""
        node_addrs = tuple(sorted({n.address for n in nodes.values()} | {self.cfg.node.address.ip}))
        mesh = MeshImportPolicy(tuple(self.cfg.pools), tuple(own_pod_cidrs), node_addrs)
        nets = tuple(node_networks)
        own_asn = self.cfg.node.asn or self.cfg.cluster.asn
        adv = self.cfg.advertise
        own = tuple(own_pod_cidrs) + tuple(adv.service_cluster_ips) + tuple(adv.service_external_ips) \
            + tuple(adv.service_load_balancer_ips)
        peers_cfg = {p.name: p for p in self.cfg.peers}
        by_peer: dict[str, dict[ipaddress.IPv4Network, ipaddress.IPv4Address]] = defaultdict(dict)
        for prefix, holders in routes.items():
            for peer, nh in holders:
                by_peer[peer][prefix] = nh
        ibgp_set = set(ibgp)
        in_pool = self._pool_test()
        out: Learned = defaultdict(set)
        fresh: list[Fresh] = []
        active: dict[tuple[str, ipaddress.IPv4Network], Rejection] = (
            {} if only is None else {k: v for k, v in self._active.items() if k[1] not in only})
        for peer, prefixes in sorted(by_peer.items()):
            kind = kinds.get(peer)
            if kind is None:
                continue  # no longer a neighbor: its routes are being forgotten
            if kind == "mesh":
                accepted, rejected = mesh.filter(prefixes)
            else:
                pods, other = [], []
                for p in prefixes:
                    (pods if in_pool(p) else other).append(p)
                if peer in ibgp_set:
                    accepted, rejected = mesh.filter(pods)
                else:
                    accepted, rejected = [], [Rejection(p, EBGP_POD_CIDR) for p in pods]
                pc = peers_cfg.get(peer)
                imp = pc.import_filter if pc else None
                policy = ExternalImportPolicy(imp, pc.max_prefixes if pc else None, node_addrs, nets,
                                              allow_default=bool(imp and imp.allow_default_route),
                                              allow_node_networks=bool(imp and imp.allow_node_networks),
                                              own_asn=own_asn, allow_own_asn=imp.allow_own_asn if imp else 0,
                                              own_prefixes=own)
                acc2, rej2 = policy.filter(other, attrs=attrs(peer, other) if attrs is not None and other else None)
                accepted, rejected = accepted + acc2, rejected + rej2
            for p in accepted:
                out[p].add((peer, prefixes[p]))
            for r in rejected:
                active[(peer, r.prefix)] = r
            fresh += [Fresh(peer, r) for r in self._log.new(peer, rejected)]
        self._active = active
        return dict(out), fresh

    def _in_pool(self, prefix: ipaddress.IPv4Network) -> bool:
        return self._pool_test()(prefix)

    def _pool_test(self) -> Callable[[ipaddress.IPv4Network], bool]:
        """Whether a prefix is inside an enabled pool, as integer comparisons (one call per prefix)."""
        pools = tuple((lo, hi) for lo, hi, _ in spans(p.cidr for p in self.cfg.pools if not p.disabled))

        def test(prefix: ipaddress.IPv4Network) -> bool:
            lo = int(prefix.network_address)
            hi = lo | (MASK32 >> prefix.prefixlen)
            for plo, phi in pools:
                if plo <= lo and hi <= phi:
                    return True
            return False
        return test

    def active(self) -> dict[tuple[str, ipaddress.IPv4Network], Rejection]:
        """(peer, prefix) -> the rejection in force (a reference to a dict no one mutates any more)."""
        return self._active

    def active_rejections(self) -> list[str]:
        a = self._active
        return [f"import from {k[0]} rejected {k[1]}: {a[k].reason}"
                for k in sorted(a, key=lambda k: (k[0], k[1].network_address, k[1].prefixlen))]
