"""The BGP stage: which neighbors this node has and what it announces, handed to the speaker.

On the event loop (the speaker is asyncio and every call is quick). Every node and peer is judged alone
(fabric.bgp_desired.desired_neighbors): two Nodes with one address, or a peer that can't be turned
into config, are skipped and reported; every other neighbor and announcement still changes. The
announced set is marked final (End-of-RIB may go to peers) only once the desired state is known from
a complete source: a restarted agent never makes a peer flush what it kept of ours.

A route reflector node (fabric.bgp_desired.reflector) also announces what bgp.reflect makes of the
routes its iBGP neighbors sent: recomputed for the prefixes BGP events touched (the agent marks them),
all of them when the neighbors, the cluster ID or the config change. Its own announcements win.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from ipaddress import IPv4Network
from typing import Any

from bgp.announce import Announcement
from bgp.exabgp_config import Neighbor
from bgp.reflect import Reflector, reflect, reflect_all
from fabric.bgp_desired import (desired_announcements, desired_neighbors, local_pod_cidrs, reflector,
                                service_announcements)
from fabric.stage import Stage, StageInput, StageResult

log = logging.getLogger("fabric.bgp")


class BgpStage(Stage):
    name = "bgp"
    kinds = frozenset({"Node", "Service", "EndpointSlice"})
    on_worker = False
    needs_source = False  # neighbors as far as known: sessions come up early; End-of-RIB waits (final)

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.neighbors: list[Neighbor] = []
        self._svc: dict = {}
        self._svc_for: tuple | None = None
        self._cfg: Any = None
        self._reported: set[str] = set()
        self._rr: Reflector | None = None
        self._reflected: dict[IPv4Network, Announcement] = {}
        self._dirty: set[IPv4Network] = set()
        self._all = True

    @property
    def reflecting(self) -> bool:
        return self._rr is not None

    def mark_dirty(self, prefixes: Iterable[IPv4Network]) -> None:
        """On the loop: BGP changed these prefixes (a reflector recomputes what it reflects for them)."""
        self._dirty.update(prefixes)

    def mark_all(self) -> None:
        self._all = True

    def _reflect(self, rr: Reflector | None, full: bool) -> None:
        if rr != self._rr or full:
            self._rr, self._all = rr, True
        rib = self.agent.rib
        if rr is None:
            self._reflected = {}
        elif self._all:
            self._reflected = reflect_all(rr, {p: rib.paths(p) for p in rib.prefixes()})
        else:
            for prefix in self._dirty:
                a = reflect(rr, prefix, rib.paths(prefix))
                if a is None:
                    self._reflected.pop(prefix, None)
                else:
                    self._reflected[prefix] = a
        self._dirty.clear()
        self._all = False

    async def run(self, inp: StageInput, prepared: Any) -> StageResult:
        a = self.agent
        cfg = a.cfg
        nodes = a.store.snapshot("Node")
        neighbors, problems = desired_neighbors(cfg, nodes, previous=[n.name for n in self.neighbors])
        for p in problems:
            if p not in self._reported:
                log.warning("%s", p)
        self._reported = set(problems)
        if neighbors != self.neighbors:
            await a.speaker.set_neighbors(neighbors)
            self.neighbors = neighbors
            a.neighbors_changed(neighbors)
        pods = local_pod_cidrs(cfg, nodes.get(cfg.node.name))
        enabled = [p.cidr for p in cfg.pools if not p.disabled]
        for c in pods:
            if enabled and not any(c.subnet_of(e) for e in enabled):
                problems.append(f"pod CIDR {c} of this node is outside every enabled pool: other nodes refuse it")
        anns = desired_announcements(cfg, pods, neighbors)
        key = (cfg, tuple(neighbors))
        if inp.full or inp.changes.of("Service") or inp.changes.of("EndpointSlice") or key != self._svc_for:
            # O(services): only when services, endpoints, neighbors or the config changed.
            self._svc = service_announcements(cfg, a.store.snapshot("Service"), a.store.snapshot("EndpointSlice"),
                                              neighbors)
            self._svc_for = key
        anns.update(self._svc)
        self._reflect(reflector(cfg, nodes, neighbors), inp.full or key != self._cfg)
        self._cfg = key
        desired = {p: Announcement(x.prefix, x.next_hop, x.communities, neighbors=x.neighbors) for p, x in anns.items()}
        for p, r in self._reflected.items():
            desired.setdefault(p, r)  # our own announcement of a prefix wins over a reflection
        final = a.desired_known
        await a.speaker.set_announcements(desired, final=final)
        status = {"neighbors": len(neighbors), "announced": len(anns), "final": final, "warnings": problems}
        if self._rr is not None:
            status["reflector"] = {"clusterId": str(self._rr.cluster_id), "clients": len(self._rr.clients),
                                   "nonClients": len(self._rr.non_clients), "reflected": len(self._reflected)}
        return StageResult(status=status)
