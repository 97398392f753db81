"""Desired routes kept per prefix, so one BGP change costs O(change), not O(routes) (pure).

A full recompute (import filter + route model over every learned route) happens when a global input
changes: the kernel facts, pools, this node's pod CIDRs, the nodes, the neighbors, or on request
(resync, peer up/down, graceful-restart expiry). Otherwise only the prefixes that BGP updates touched
are filtered and recomputed, and only they are diffed against the kernel. The result equals a full
recompute (tests/unit/test_route_state.py checks that on random event sequences).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fabric.config import Pool
from fabric.import_policy import AttrsOf, ImportFilter
from fabric.inputs import NodeInfo
from ipip.model import NodeFacts, PeerRouting, Route, desired_routes

Prefix = ipaddress.IPv4Network
Holders = set[tuple[str, ipaddress.IPv4Address]]


@dataclass(frozen=True)
class RouteInputs:
    """Everything but the learned routes that decides a prefix's route (compared for equality)."""

    facts: NodeFacts
    pools: tuple[Pool, ...]
    pod_cidrs: tuple[Prefix, ...]
    nodes: tuple[tuple[str, ipaddress.IPv4Address], ...]
    kinds: tuple[tuple[str, str], ...]
    ibgp: tuple[str, ...]
    tunnel_device: str
    per_peer_limits: bool  # some external peer has maxPrefixes: its whole set decides, so always full
    external: tuple[tuple[str, PeerRouting], ...] = ()  # external peers: address and next-hop policy
    external_metric: int = 0


@dataclass
class RouteState:
    import_filter: ImportFilter
    inputs: RouteInputs | None = None
    routes: dict[Prefix, Route] = field(default_factory=dict)
    warnings: dict[Prefix, tuple[str, ...]] = field(default_factory=dict)
    unusable: dict[Prefix, tuple[tuple[str, str], ...]] = field(default_factory=dict)  # (peer, why) per prefix
    tunnel_needed: bool = False
    tunnel_mtu: int = 0

    def update(self, inputs: RouteInputs, nodes: Mapping[str, NodeInfo], *, dirty: set[Prefix] | None,
               all_routes: Callable[[], Mapping[Prefix, Holders]], holders: Callable[[Prefix], Holders],
               attrs: AttrsOf | None = None,
               holders_of: Callable[[Iterable[Prefix]], Mapping[Prefix, Holders]] | None = None
               ) -> tuple[set[Prefix] | None, list[Any]]:
        """Bring `routes` up to date. `dirty`: prefixes BGP changed since the last update (None: unknown,
        recompute everything). Returns (the prefixes to diff — None means all — and new rejections).
        `holders_of`: holders() of many prefixes in one call (a bulk change: one lock, not one each)."""
        full = dirty is None or inputs != self.inputs or inputs.per_peer_limits
        kinds = dict(inputs.kinds)
        nets = (inputs.facts.network,)
        model = dict(facts=inputs.facts, pools=list(inputs.pools), local_pod_cidrs=inputs.pod_cidrs,
                     tunnel_device=inputs.tunnel_device, external=dict(inputs.external),
                     external_metric=inputs.external_metric)
        if full:
            learned, fresh = self.import_filter.filter(all_routes(), kinds, nodes, inputs.pod_cidrs, inputs.ibgp,
                                                       node_networks=nets, attrs=attrs)
            plan = desired_routes(learned=learned, **model)
            self.inputs, self.routes, self.warnings = inputs, dict(plan.routes), dict(plan.prefix_warnings)
            self.unusable = dict(plan.unusable)
            self.tunnel_needed, self.tunnel_mtu = plan.tunnel_needed, plan.tunnel_mtu
            return None, fresh
        assert dirty is not None
        if not dirty:
            return set(), []
        raw = dict(holders_of(dirty)) if holders_of is not None else {p: h for p in dirty if (h := holders(p))}
        learned, fresh = self.import_filter.filter(raw, kinds, nodes, inputs.pod_cidrs, inputs.ibgp, only=dirty,
                                                   node_networks=nets, attrs=attrs)
        plan = desired_routes(learned=learned, **model)
        routes, new = self.routes, plan.routes
        for p in dirty:
            r = new.get(p)
            if r is not None:
                routes[p] = r
            else:
                routes.pop(p, None)
        for mine, theirs in ((self.warnings, plan.prefix_warnings), (self.unusable, plan.unusable)):
            if mine or theirs:  # usually both empty: no pass over the dirty set
                for p in dirty:
                    if p in theirs:
                        mine[p] = theirs[p]  # type: ignore[index]
                    else:
                        mine.pop(p, None)
        return dirty if isinstance(dirty, set) else set(dirty), fresh

    def warning_lines(self) -> list[str]:
        """The route model's warnings (unusable next hops are summarised apart: fabric.rejections)."""
        return [w for p in sorted(self.warnings) for w in self.warnings[p]]


def make_inputs(*, facts: NodeFacts, pools: Iterable[Pool], pod_cidrs: Iterable[Prefix],
                nodes: Mapping[str, NodeInfo], kinds: Mapping[str, str], ibgp: Iterable[str], tunnel_device: str,
                per_peer_limits: bool, external: Mapping[str, PeerRouting] | None = None,
                external_metric: int = 0) -> RouteInputs:
    return RouteInputs(facts, tuple(pools), tuple(sorted(pod_cidrs)),
                       tuple(sorted((n, i.address) for n, i in nodes.items())), tuple(sorted(kinds.items())),
                       tuple(sorted(ibgp)), tunnel_device, per_peer_limits, tuple(sorted((external or {}).items())),
                       external_metric)
