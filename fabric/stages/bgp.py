"""The BGP stage: which neighbors this node has and what it announces, handed to the speaker.

On the event loop (the speaker is asyncio and every call is quick). Every node and peer is judged alone
(fabric.bgp_desired.desired_neighbors): two Nodes with one address, or a peer that can't be turned
into config, are skipped and reported; every other neighbor and announcement still changes. The
announced set is marked final (End-of-RIB may go to peers) only once the desired state is known from
a complete source: a restarted agent never makes a peer flush what it kept of ours.

A route reflector node (fabric.bgp_desired.reflector) also announces what bgp.reflect makes of the
routes its iBGP neighbors sent: recomputed for the prefixes BGP events touched (the agent marks them),
all of them when the neighbors, the cluster ID or the config change. Its own announcements win.

Work per run is what changed: neighbors, the node's own announcements and this node as a reflector are
recomputed only when a Node or the configuration changed (or on a full resync); a Service or
EndpointSlice change recomputes the ETP=Local /32s of the services it touches
(fabric.bgp_desired.ServiceAnnouncer) and hands the speaker only the prefixes whose announcement changed
(Speaker.update_announcements). The whole set goes to the speaker on the first run, a full resync, a
config or neighbor change, a reflector recomputing all it reflects, and after a failed run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from ipaddress import IPv4Network
from typing import Any

from bgp.announce import Announcement
from bgp.exabgp_config import Neighbor
from bgp.reflect import Reflector, reflect, reflect_all
from fabric.bgp_desired import (DesiredAnnouncement, ServiceAnnouncer, desired_announcements, desired_neighbors,
                                local_pod_cidrs, reflector)
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
        self._svc = ServiceAnnouncer()  # the ETP=Local /32s, per service
        self._svc_cfg: Any = None  # the config the ServiceAnnouncer was built for
        self._svc_neighbors: list[Neighbor] = []  # the neighbors its announcements target
        self._base_cfg: Any = None  # the config the neighbors and own announcements were computed for
        self._own: dict[IPv4Network, DesiredAnnouncement] = {}  # pod CIDRs, advertised ranges
        self._problems: list[str] = []
        self._rr_want: Reflector | None = None  # this node as a reflector, from the Nodes and the config
        self._desired: dict[IPv4Network, Announcement] = {}  # what the speaker was handed
        self._reported: set[str] = set()
        self._cfg: tuple | None = None  # (config, neighbors) of the last run
        self._rr: Reflector | None = None
        self._reflected: dict[IPv4Network, Announcement] = {}
        self._dirty: set[IPv4Network] = set()
        self._all = True
        self._stale = True  # recompute everything at the next run (the first; after a failed run)

    @property
    def reflecting(self) -> bool:
        return self._rr is not None

    def mark_dirty(self, prefixes: Iterable[IPv4Network]) -> None:
        """On the loop: BGP changed these prefixes (a reflector recomputes what it reflects for them)."""
        self._dirty.update(prefixes)

    def mark_all(self) -> None:
        self._all = True

    def restore(self, inp: StageInput, prepared: Any) -> None:
        # A failed run may have moved part of the state (the service /32s) and not handed it to the
        # speaker: the next run starts over from the Store, hands over the whole set and re-reflects.
        self._stale = True

    def _reflect(self, rr: Reflector | None, full: bool) -> set[IPv4Network] | None:
        """Bring what we reflect up to date. Returns the prefixes it may have changed (None: any)."""
        if rr != self._rr or full:
            self._rr, self._all = rr, True
        rib = self.agent.rib
        touched: set[IPv4Network] | None = set(self._dirty)
        if rr is None:
            touched = set(self._reflected)
            self._reflected = {}
        elif self._all:
            self._reflected = reflect_all(rr, {p: rib.paths(p) for p in rib.prefixes()})
            touched = None
        else:
            for prefix in self._dirty:
                a = reflect(rr, prefix, rib.paths(prefix))
                if a is None:
                    self._reflected.pop(prefix, None)
                else:
                    self._reflected[prefix] = a
        self._dirty.clear()
        self._all = False
        return touched

    def _base(self, cfg: Any) -> list[Neighbor]:
        """The neighbors, the node's own announcements and this node as a reflector: from the Nodes and
        the config (O(nodes)). Returns the neighbors wanted (the caller hands them to the speaker)."""
        nodes = self.agent.store.snapshot("Node")
        neighbors, problems = desired_neighbors(cfg, nodes, previous=[n.name for n in self.neighbors])
        for p in problems:
            if p not in self._reported:
                log.warning("%s", p)
        self._reported = set(problems)
        pods = local_pod_cidrs(cfg, nodes.get(cfg.node.name))
        enabled = [p.cidr for p in cfg.pools if not p.disabled]
        for c in pods:
            if enabled and not any(c.subnet_of(e) for e in enabled):
                problems.append(f"pod CIDR {c} of this node is outside every enabled pool: other nodes refuse it")
        self._problems = problems
        self._own = desired_announcements(cfg, pods, neighbors)
        self._rr_want = reflector(cfg, nodes, neighbors)
        self._base_cfg = cfg
        return neighbors

    def _announcement(self, p: IPv4Network) -> Announcement | None:
        """What is announced for one prefix: a service's /32 over a configured range of the same prefix,
        our own announcement over a reflection."""
        x = self._svc.anns.get(p) or self._own.get(p)
        if x is not None:
            return Announcement(x.prefix, x.next_hop, x.communities, neighbors=x.neighbors)
        return self._reflected.get(p)

    async def run(self, inp: StageInput, prepared: Any) -> StageResult:
        a = self.agent
        cfg = a.cfg
        full, self._stale = inp.full or self._stale, False
        # The agent wakes a full run on a config change; comparing it here too keeps that a convenience.
        cfg_changed = cfg is not self._base_cfg and cfg != self._base_cfg
        own_touched: set[IPv4Network] = set()
        if full or cfg_changed or inp.changes.of("Node"):
            own_before = self._own
            neighbors = self._base(cfg)
            if neighbors != self.neighbors:
                await a.speaker.set_neighbors(neighbors)
                self.neighbors = neighbors
                a.neighbors_changed(neighbors)
            own_touched = {p for p in own_before.keys() | self._own.keys() if own_before.get(p) != self._own.get(p)}
        neighbors = self.neighbors
        key = (cfg, tuple(neighbors))
        if full or cfg is not self._svc_cfg:
            # O(services): the first run, a resync, a config change (ranges, this node's name).
            self._svc.rebuild(cfg, a.store.snapshot("Service"), a.store.snapshot("EndpointSlice"), neighbors)
            self._svc_cfg, self._svc_neighbors = cfg, neighbors
            svc_touched: set[IPv4Network] = set()  # the whole set goes to the speaker below
        else:
            svc_touched = set()
            if neighbors != self._svc_neighbors:  # O(/32s): only the targets of each /32 change
                svc_touched = self._svc.retarget(cfg, neighbors)
                self._svc_neighbors = neighbors
            # O(the services touched): one endpoint change recomputes one service's /32s
            svc_touched |= self._svc.update(cfg, neighbors, a.store.get, inp.changes.of("Service"),
                                            inp.changes.of("EndpointSlice"))
        reflected = self._reflect(self._rr_want, full or key != self._cfg)
        whole = full or key != self._cfg or reflected is None
        self._cfg = key
        final = a.desired_known
        if whole:  # O(announcements): everything to the speaker (it sends only the difference)
            desired = {p: Announcement(x.prefix, x.next_hop, x.communities, neighbors=x.neighbors)
                       for p, x in {**self._own, **self._svc.anns}.items()}
            for p, r in self._reflected.items():
                desired.setdefault(p, r)  # our own announcement of a prefix wins over a reflection
            self._desired = desired
            await a.speaker.set_announcements(desired, final=final)
        else:  # only the prefixes whose announcement changed (also called with none: `final` may flip)
            changes: dict[IPv4Network, Announcement | None] = {}
            for p in own_touched | svc_touched | (reflected or set()):
                new = self._announcement(p)
                if self._desired.get(p) != new:
                    changes[p] = new
                    if new is None:
                        self._desired.pop(p, None)
                    else:
                        self._desired[p] = new
            await a.speaker.update_announcements(changes, final=final)
        announced = len(self._svc.anns) + sum(1 for p in self._own if p not in self._svc.anns)  # O(own), not O(/32s)
        status = {"neighbors": len(neighbors), "announced": announced,
                  "final": final, "warnings": list(self._problems)}
        if self._rr is not None:
            status["reflector"] = {"clusterId": str(self._rr.cluster_id), "clients": len(self._rr.clients),
                                   "nonClients": len(self._rr.non_clients), "reflected": len(self._reflected)}
        return StageResult(status=status)
