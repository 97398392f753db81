"""The node agent: sources -> tracker -> one sync runner -> pure desired state -> reconcilers.

Event driven: the loop sleeps until a source records a change, a BGP event arrives, or the next
deadline (graceful-restart expiry, startup hold end, periodic resync) — no polling. Kernel work runs
on one dedicated thread (pyroute2's sync API refuses a thread with a running loop) so kernel calls
are serialized. On SIGTERM the agent stops ExaBGP and leaves every route in the kernel: peers keep
ours for the graceful-restart time and our next start adopts them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import signal
import time
from pathlib import Path
from typing import Any

from bgp.announce import Announcement
from bgp.events import BgpEvent, EndOfRib, PeerDown, PeerUp, RoutesAnnounced, RoutesWithdrawn, SpeakerRestarted
from bgp.exabgp_config import Neighbor, NeighborError
from bgp.speaker import Speaker, SpeakerError
from bgp.rib import Rib
from fabric import status as status_mod
from fabric.bgp_desired import (desired_announcements, desired_neighbors, local_pod_cidrs,
                                service_announcements)
from fabric.config import AgentConfig
from fabric.effective import EffectiveConfig
from fabric.health import HealthServer
from fabric.import_policy import ImportFilter
from fabric.inputs import NodeInfo
from fabric.tracker import Store
from ipip.kernel import FactsError, KernelView, RouteKernel, set_sysctl
from fabric.route_state import RouteState, make_inputs
from ipip.model import Route, diff_routes, same_subnet_network

log = logging.getLogger("fabric.agent")

STATUS_INTERVAL = 1.0  # seconds between status file writes at most
WAITING_FOR_SOURCE = "waiting for the first complete list from the Kubernetes API; the dataplane is left as it is"


class StartError(Exception):
    """The agent can't start (e.g. no Kubernetes API credentials); the message names the config field."""


class Agent:
    def __init__(self, cfg: AgentConfig, config_path: Path, *, speaker_factory=None, service_proxy_factory=None):
        self.base_cfg = cfg
        self.cfg = cfg  # effective: base config overlaid with IPPool/BGPPeer/BGPConfiguration objects
        self._cfg_problems: list[str] = []
        self._effective = EffectiveConfig(cfg)
        self.config_dir = config_path.resolve().parent
        self.run_dir = self._path(cfg.paths.run_dir)
        self.store = Store()
        self.rib = Rib()
        self.import_filter = ImportFilter(cfg)
        self._speaker_factory = speaker_factory
        self._service_proxy_factory = service_proxy_factory
        self._wake = asyncio.Event()
        self._stopping = False
        self._kernel_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernel")
        self._rk: RouteKernel | None = None
        self._owned: dict[ipaddress.IPv4Network, Route] | None = None  # what we believe the kernel holds
        self._view: KernelView | None = None
        self._adopted: dict[ipaddress.IPv4Network, Route] = {}
        self._hold_until: float | None = None
        self._eor_seen: set[str] = set()
        self._next_resync = 0.0
        self._neighbors: list[Neighbor] = []
        self._svc_anns: dict = {}
        self._svc_anns_stale = True
        self._svc_anns_for: list[Neighbor] | None = None
        self._routes = RouteState(self.import_filter)  # desired routes, updated per change
        self._dirty: set[ipaddress.IPv4Network] = set()  # prefixes BGP changed since the last sync
        self._dirty_all = True  # something global changed: recompute every route
        self._status_at = 0.0
        self._status_due: float | None = None
        self._warnings: list[str] = []
        self._errors: list[str] = []
        self._service_error: str | None = None
        self._facts_warning: str | None = None
        self._ready = False
        self._synced_once = False
        self.speaker: Any = None
        self.services: Any = None
        self.source: Any = None
        self.health: HealthServer | None = None
        self.started = time.time()

    def _path(self, p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() else self.config_dir / path

    # ------------------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.store.set_on_change(lambda: loop.call_soon_threadsafe(self._wake.set))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop)
        try:
            self._start_source(loop)
        except StartError as e:
            log.error("%s", e)
            return 2  # as for a bad config file
        await self._kernel(self._kernel_init)
        self._start_speaker()
        if self.speaker is not None:
            # ExaBGP starts with the neighbors already in its config (no empty start + reload).
            nodes = self.store.snapshot("Node")
            await self._sync_bgp(nodes, local_pod_cidrs(self.cfg, nodes.get(self.cfg.node.name)))
            try:
                await self.speaker.start()
            except SpeakerError as e:  # names paths.exabgp / paths.runDir; routes stay untouched
                log.error("%s", e)
                await self._shutdown(loop)
                return 2
        if self.cfg.health.listen:
            self.health = HealthServer(self.cfg.health.listen, self._health)
            await self.health.start()
        try:
            while not self._stopping:
                await self._sync()
                timeout = self._next_deadline() - time.monotonic()
                if timeout > 0 and not self._wake.is_set():
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout)
                    except asyncio.TimeoutError:
                        pass
                self._wake.clear()
        finally:
            await self._shutdown(loop)
        return 0

    def _request_stop(self) -> None:
        log.info("stopping: ExaBGP goes down, routes stay in the kernel (graceful restart)")
        self._stopping = True
        self._wake.set()

    async def _shutdown(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.health is not None:
            await self.health.stop()
        if self.speaker is not None:
            await self.speaker.stop()
        if self.source is not None:
            self.source.stop(loop)
        if self.services is not None and hasattr(self.services, "close"):
            await self._kernel(self.services.close)
        if self._rk is not None:
            await self._kernel(self._rk.close)
        self._kernel_pool.shutdown(wait=True)
        self._write_status(force=True)

    # ------------------------------------------------------------------------------------------
    def _start_source(self, loop: asyncio.AbstractEventLoop) -> None:
        src = self.cfg.source
        if src.kind == "file":
            from fabric.sources.file import FileSource

            self.source = FileSource(self.store, self._path(src.path))
            self.source.start(loop)
        else:
            from fabric.sources.kubernetes import KubernetesSource, SourceError

            try:
                ks = KubernetesSource(self.store, src)
            except SourceError as e:  # names the config field (source.kubeconfig); no traceback
                raise StartError(str(e)) from None
            ks.start()
            self.source = _ThreadSourceAdapter(ks)

    def _start_speaker(self) -> None:
        if self._speaker_factory is not None:
            self.speaker = self._speaker_factory(self.run_dir, self._on_bgp_event)
            return
        exabgp = self.cfg.paths.exabgp
        self.speaker = Speaker(self.run_dir, self._on_bgp_event, exabgp=exabgp)

    def _on_bgp_event(self, ev: BgpEvent) -> None:
        now = time.monotonic()
        if isinstance(ev, SpeakerRestarted):
            self._eor_seen.clear()
        if isinstance(ev, EndOfRib):
            self._eor_seen.add(ev.peer)
        if isinstance(ev, PeerUp):
            log.info("peer %s (%s) established, graceful restart time %s", ev.peer, ev.address, ev.gr_time)
        if isinstance(ev, PeerDown):
            log.warning("peer %s (%s) down: %s (%s)", ev.peer, ev.address, ev.reason,
                        "graceful: its routes are kept for the restart time it advertised, if any"
                        if ev.graceful else "its routes are removed")
        changed = self.rib.apply(ev, now)
        if isinstance(ev, (RoutesAnnounced, RoutesWithdrawn)):
            self._dirty.update(ev.prefixes)
        elif changed:
            self._dirty_all = True  # a peer's whole set moved (down, up, End-of-RIB sweep, our restart)
        if changed or isinstance(ev, (PeerUp, PeerDown, EndOfRib)):
            self._wake.set()

    async def _kernel(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._kernel_pool, fn, *args)

    # ------------------------------------------------------------------------------------------
    def _kernel_init(self) -> None:
        dp = self.cfg.dataplane
        for name, value in (("net.ipv4.ip_forward", "1"),):
            err = set_sysctl(name, value)
            if err:
                self._errors.append(err)
        self._rk = RouteKernel(proto=dp.route_protocol, table=dp.route_table, tunnel_device=dp.tunnel_device)
        if self._service_proxy_factory is not None:
            self.services = self._service_proxy_factory(self)
        elif self.cfg.services.enabled:
            self.services = _make_service_proxy(self)
        try:
            view = self._rk.read(self.cfg.node.address.ip, dp.underlay_mtu, self.cfg.node.interface)
        except FactsError as e:
            self._errors.append(str(e))
            log.error("%s; will retry at each sync", e)
            return
        self._set_view(view)
        self._adopted = dict(view.owned)
        if self._adopted:
            # A previous life left routes: keep them until every peer sent End-of-RIB or our
            # restart time ends, so a restart loses no packet (RFC 4724 receiving-speaker side).
            self._hold_until = time.monotonic() + max(1, self.cfg.timers.graceful_restart_time)
            log.info("adopted %d route(s) from a previous run; stale ones go after peers' End-of-RIB "
                     "or %ss", len(self._adopted), self.cfg.timers.graceful_restart_time)

    def _set_view(self, view: KernelView) -> None:
        net, warn = same_subnet_network(view.kernel_prefix, self.cfg.node.address)
        if warn and warn != self._facts_warning:
            log.warning("%s", warn)
        self._facts_warning = warn
        facts = view.facts if net == view.facts.network else type(view.facts)(
            view.facts.address, net, view.facts.device, view.facts.mtu, view.facts.routes)
        self._view = KernelView(facts, view.kernel_prefix, view.owned, view.ifindex, view.ifname, view.tunnel)
        self._owned = dict(view.owned)

    def _source_synced(self) -> bool:
        synced = getattr(self.source, "synced", None)  # the file source loads before the first sync
        return bool(synced()) if synced is not None else True

    def _next_deadline(self) -> float:
        now = time.monotonic()
        if not self._source_synced():
            return now + self.cfg.timers.resync_interval  # the Store wakes us when the lists complete
        deadlines = [self._next_resync]
        if self._view is None:
            # Start-up only: the node address is not on any interface yet (e.g. containerlab runs the
            # agent before its `exec` lines); look again soon instead of at the next resync.
            deadlines.append(now + 1.0)
        d = self.rib.next_deadline()
        if d is not None:
            deadlines.append(d)
        if self._hold_until is not None:
            deadlines.append(self._hold_until)
        if self._status_due is not None:
            deadlines.append(self._status_due)
        if self.services is not None and hasattr(self.services, "next_deadline"):
            sd = self.services.next_deadline(now)
            if sd is not None:
                deadlines.append(sd)
        return min(deadlines)

    # ------------------------------------------------------------------------------------------
    async def _sync(self) -> None:
        now = time.monotonic()
        if not self._source_synced():
            # Until every kind was listed once, an empty Store means "not known yet", not "no objects":
            # acting on it would remove every service (and, after the hold, every route) of an agent
            # restarted while the API server is down. Adopted routes stay held for a full
            # graceful-restart time counted from the first complete list.
            if self._adopted:
                self._hold_until = now + max(1, self.cfg.timers.graceful_restart_time)
            self._ready = False
            self._warnings = [WAITING_FOR_SOURCE]
            self._write_status()
            return
        full = now >= self._next_resync
        if full:
            self._next_resync = now + self.cfg.timers.resync_interval
            self.store.request_full()
        changes = self.store.take()
        if changes.full or changes.of("IPPool") or changes.of("BGPPeer") or changes.of("BGPConfiguration"):
            await self._refresh_config()
        if self.rib.expire(now):
            self._dirty_all = True
        self._warnings = list(self._cfg_problems) + ([self._facts_warning] if self._facts_warning else [])
        if self.source is not None and getattr(self.source, "problems", None):
            self._warnings += list(self.source.problems)

        nodes: dict[str, NodeInfo] = self.store.snapshot("Node")
        me = nodes.get(self.cfg.node.name)
        pod_cidrs = local_pod_cidrs(self.cfg, me)

        if changes.full or changes.of("Service") or changes.of("EndpointSlice"):
            self._svc_anns_stale = True
        neighbors = await self._sync_bgp(nodes, pod_cidrs)
        await self._sync_routes(full, pod_cidrs, nodes, neighbors)
        if self.services is not None:
            try:
                await self._kernel(self.services.sync, self.store, changes, full)
                self._service_error = None
            except Exception as e:  # a failing service proxy must not stop routing
                if self._service_error != str(e):
                    log.exception("service sync failed")
                self._service_error = str(e)
        self._synced_once = True
        self._ready = self._view is not None
        self._write_status()

    async def _refresh_config(self) -> None:
        if isinstance(self.source, _ThreadSourceAdapter):
            # The Kubernetes source reads peer Secrets and records Events: blocking, so off the loop.
            cfg, probs = await asyncio.get_running_loop().run_in_executor(
                None, self.source.src.effective_config, self.base_cfg)
            problems = [str(p) for p in probs]
        else:
            cfg, problems = self._effective.from_store(self.store)
        for p in problems:
            if p not in self._cfg_problems:
                log.error("cluster object rejected, keeping its last good version: %s", p)
        self._cfg_problems = problems
        if cfg != self.cfg:
            log.info("effective configuration changed (pools: %s)",
                     ", ".join(f"{p.cidr} {p.ipip_mode.value}" for p in cfg.pools) or "none")
            self.cfg = cfg
            self.import_filter = ImportFilter(cfg)
            self._routes = RouteState(self.import_filter)
            self._dirty_all = True
            self._svc_anns_stale = True

    async def _sync_bgp(self, nodes: dict[str, NodeInfo], pod_cidrs: list[ipaddress.IPv4Network]) -> list[Neighbor]:
        neighbors, problems = desired_neighbors(self.cfg, nodes)
        self._warnings += problems
        if self.speaker is None:
            return neighbors
        if neighbors != self._neighbors:
            try:
                await self.speaker.set_neighbors(neighbors)
            except NeighborError as e:  # names the neighbor and field; keep the last good set
                self._warnings.append(str(e))
                return self._neighbors
            self._neighbors = neighbors
            current = {n.name for n in neighbors}
            for peer in list(self.rib.counts()):
                if peer not in current and self.rib.forget(peer):
                    self._dirty_all = True
                    log.info("peer %s removed from config: its routes are withdrawn", peer)
        anns = desired_announcements(self.cfg, pod_cidrs, neighbors)
        if self._svc_anns_stale or neighbors != self._svc_anns_for:
            # O(services): only when services, endpoints or neighbors changed, not every sync.
            self._svc_anns = service_announcements(self.cfg, self.store.snapshot("Service"),
                                                   self.store.snapshot("EndpointSlice"), neighbors)
            self._svc_anns_stale, self._svc_anns_for = False, neighbors
        anns.update(self._svc_anns)
        await self.speaker.set_announcements(
            {p: Announcement(a.prefix, a.next_hop, a.communities, neighbors=a.neighbors) for p, a in anns.items()})
        return neighbors

    async def _sync_routes(self, full: bool, pod_cidrs, nodes: dict[str, NodeInfo], neighbors: list[Neighbor]) -> None:
        if self._rk is None:
            return
        dp = self.cfg.dataplane
        if full or self._view is None:
            try:
                view = await self._kernel(self._rk.read, self.cfg.node.address.ip, dp.underlay_mtu,
                                          self.cfg.node.interface)
            except FactsError as e:
                self._errors = [str(e)]
                return
            self._set_view(view)
            self._errors = [e for e in self._errors if "no interface holds" not in e]
            self._dirty_all = True  # our belief of the kernel was just re-read: diff everything
        assert self._view is not None and self._owned is not None
        kinds = {n.name: n.kind for n in neighbors}
        ibgp = [n.name for n in neighbors if n.kind == "external" and n.peer_as == n.local_as]
        inputs = make_inputs(facts=self._view.facts, pools=self.cfg.pools, pod_cidrs=pod_cidrs, nodes=nodes,
                             kinds=kinds, ibgp=ibgp, tunnel_device=dp.tunnel_device,
                             per_peer_limits=any(p.max_prefixes for p in self.cfg.peers))
        held = self._hold_until is not None
        self._maybe_end_hold(neighbors)
        if held and self._hold_until is None:
            self._dirty_all = True  # adopted routes that were not learned again must go: a full diff
        dirty = None if self._dirty_all else self._dirty
        self._dirty, self._dirty_all = set(), False
        touched, rejections = self._routes.update(inputs, nodes, dirty=dirty, all_routes=self.rib.routes,
                                                  holders=self.rib.holders)
        for r in rejections:
            log.warning("import rejected: %s", r)
        self._warnings += self._routes.warning_lines()
        self._warnings += self.import_filter.active_rejections()
        routes = self._routes.routes
        if touched is None:
            desired, owned = dict(routes), self._owned
            scope = self._adopted.keys() if self._hold_until is not None else ()
        else:
            desired = {p: routes[p] for p in touched if p in routes}
            owned = {p: self._owned[p] for p in touched if p in self._owned}
            scope = [p for p in touched if p in self._adopted] if self._hold_until is not None else ()
        for dst in scope:
            desired.setdefault(dst, self._adopted[dst])
        if self._routes.tunnel_needed:
            tunnel = self._view.tunnel
            if not tunnel or not tunnel["up"] or tunnel["mtu"] != self._routes.tunnel_mtu:
                self._view = await self._kernel(self._rk.ensure_tunnel, self._routes.tunnel_mtu, self._view)
        diff = diff_routes(desired, owned)
        if diff:
            errors = await self._kernel(self._rk.apply, diff, self._view.ifindex)
            for d in diff.delete:
                self._owned.pop(d.dst, None)
            for r in diff.replace:
                self._owned[r.dst] = r
            failed = {e.route.dst for e in errors}
            for e in errors:
                log.error("route %s %s failed: %s", e.op, e.route.dst, e.error)
            if failed:
                # Our belief is wrong for those: re-read the kernel at the next sync.
                self._next_resync = 0.0
                self._wake.set()
            log.info("routes: %d deleted, %d replaced, %d failed", len(diff.delete), len(diff.replace), len(failed))

    def _maybe_end_hold(self, neighbors: list[Neighbor]) -> None:
        if self._hold_until is None:
            return
        mesh = {n.name for n in neighbors}
        established = {p for p, s in self._speaker_neighbors().items() if s.get("state") == "established"}
        if time.monotonic() >= self._hold_until or (mesh and mesh <= self._eor_seen) or \
                (established and established <= self._eor_seen and established == mesh):
            log.info("startup hold over: routes not re-learned are removed")
            self._hold_until = None
            self._adopted = {}

    # ------------------------------------------------------------------------------------------
    def _health(self, path: str) -> tuple[int, str]:
        if path == "/healthz":
            return 200, "ok\n"
        if path == "/readyz":
            return (200, "ready\n") if self._ready else (503, "not ready\n")
        return 404, "not found\n"

    def _speaker_neighbors(self) -> dict[str, dict[str, Any]]:
        if self.speaker is None:
            return {}
        return dict(self.speaker.status().get("neighbors", {}))

    def snapshot(self) -> dict[str, Any]:
        speaker = self._speaker_neighbors()
        peers = []
        for n in self._neighbors:
            s = dict(speaker.get(n.name, {}))
            s.setdefault("state", "idle")
            counts = self.rib.counts().get(n.name, {})
            peers.append({"name": n.name, "address": str(n.peer_address), "asn": n.peer_as, "kind": n.kind,
                          **{k: v for k, v in s.items() if k not in ("name", "address")},
                          "routes": counts.get("routes", 0), "stale": counts.get("stale", 0)})
        modes = sorted({p.ipip_mode.value for p in self.cfg.pools})
        svc = self.services.status() if self.services is not None and hasattr(self.services, "status") else None
        return {
            "node": self.cfg.node.name,
            "address": str(self.cfg.node.address),
            "asn": self.cfg.node.asn or self.cfg.cluster.asn,
            "ready": self._ready,
            "started": self.started,
            "updated": time.time(),
            "ipipModes": modes,
            "tunnelNeeded": self._routes.tunnel_needed,
            "peers": peers,
            "speaker": ({k: v for k, v in self.speaker.status().items() if k != "neighbors"}
                        if self.speaker is not None else None),
            "routes": {str(d): {"kind": r.kind, "nexthops": [[str(h.gateway), h.device, h.onlink] for h in r.nexthops],
                                "mtu": r.mtu, "why": r.why} for d, r in self._routes.routes.items()},
            "learned": {str(p): sorted([peer, str(nh)] for peer, nh in s) for p, s in self.rib.routes().items()},
            "adoptedHold": self._hold_until is not None,
            "services": svc,
            "warnings": sorted(set(self._warnings)),
            "errors": sorted(set(self._errors) | ({f"services: {self._service_error}"} if self._service_error else set())),
        }

    def _write_status(self, force: bool = False) -> None:
        """At most one write per STATUS_INTERVAL (the document is O(routes)); a skipped write is done
        at its deadline, so the file is never more than that much behind."""
        now = time.monotonic()
        if not force and now - self._status_at < STATUS_INTERVAL:
            self._status_due = self._status_at + STATUS_INTERVAL
            return
        self._status_at, self._status_due = now, None
        try:
            status_mod.write(self.run_dir, self.snapshot())
        except OSError as e:
            log.error("cannot write status: %s", e)


class _ThreadSourceAdapter:
    """Gives a thread-based source the start/stop(loop) shape of the file source."""

    def __init__(self, src: Any) -> None:
        self.src = src

    @property
    def problems(self) -> list[str]:
        return list(getattr(self.src, "problems", []) or [])

    def synced(self) -> bool:
        return bool(self.src.synced())

    def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        self.src.stop()


def _make_service_proxy(agent: Agent):
    from fabric.services import make_service_proxy

    return make_service_proxy(agent.cfg)
