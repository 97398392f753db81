"""The BGP stage: which neighbors this node has and what it announces, handed to the speaker.

On the event loop (the speaker is asyncio and every call is quick). Every node and peer is judged alone
(fabric.bgp_desired.desired_neighbors): two Nodes with one address, or a peer that can't be turned
into config, are skipped and reported; every other neighbor and announcement still changes. The
announced set is marked final (End-of-RIB may go to peers) only once the desired state is known from
a complete source: a restarted agent never makes a peer flush what it kept of ours.
"""

from __future__ import annotations

import logging
from typing import Any

from bgp.announce import Announcement
from bgp.exabgp_config import Neighbor
from fabric.bgp_desired import desired_announcements, desired_neighbors, local_pod_cidrs, service_announcements
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
        final = a.desired_known
        await a.speaker.set_announcements(
            {p: Announcement(x.prefix, x.next_hop, x.communities, neighbors=x.neighbors) for p, x in anns.items()},
            final=final)
        return StageResult(status={"neighbors": len(neighbors), "announced": len(anns),
                                   "final": final, "warnings": problems})
