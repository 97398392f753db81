"""The node agent: wires sources, the stage runner, the lifecycle, the BGP speaker and health.

    sources ──► Store ──► Runner ──► stages (config, bgp, routes, services, ...) ──► adapters
                             ▲            each on its own worker, own backoff, own status
    BGP events ──► RIB ──────┘ (wake the routes stage)
    Lifecycle: starting → holding → running → stopping

Event driven: nothing polls. The Store wakes the stages that read a changed kind, BGP events wake the
routes stage, address/link changes of the node (a netlink monitor) wake it too, and the runner sleeps
until the earliest stage deadline (a key's retry, a graceful-restart expiry, the periodic resync).
On SIGTERM the agent stops ExaBGP and leaves every route in the kernel: peers keep ours for the
graceful-restart time and our next start adopts them (fabric.lifecycle).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bgp.events import BgpEvent, EndOfRib, PeerDown, PeerUp, RoutesAnnounced, RoutesWithdrawn, SpeakerRestarted
from bgp.exabgp_config import Neighbor
from bgp.speaker import Speaker, SpeakerError
from fabric import lastgood, logs, stages as stages_mod, status as status_mod
from fabric.bgp_desired import desired_neighbors
from fabric.config import AgentConfig
from fabric.effective import EffectiveConfig
from fabric.health import HealthServer
from fabric.lifecycle import Lifecycle, Phase
from fabric.metrics import AgentMetrics, peer_cause
from fabric.runner import Runner
from fabric.shared_rib import SharedRib
from fabric.stages.bgp import BgpStage
from fabric.stages.config import ConfigStage
from fabric.stages.routes import RoutesStage
from fabric.tracker import Store
from ipip import netlink as nl
from ipip import rtnl
from ipip.reconcile import Backoff

log = logging.getLogger("fabric.agent")

STATUS_INTERVAL = 1.0  # seconds between status file writes at most
# ... and at least this many times the last write's duration: the document is O(routes) (10,000 routes:
# a few tenths of a second in the lab kernel), so status writing takes at most ~1/STATUS_SHARE of the
# agent's time while routes change, e.g. during a bulk import it would otherwise slow down
STATUS_SHARE = 10
# While the routes stage is writing (a run in progress or due), a status write waits for the gap between
# runs, up to this many seconds since the last write: routes reach the kernel first, the document after.
STATUS_DEFER_MAX = 5.0
STATUS_SETTLE = 0.25  # seconds a write waits after the change that asked for it (see _schedule_status)
WAITING_FOR_SOURCE = "waiting for the first complete list from the Kubernetes API; the dataplane is left as it is"
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x1, 0x10, 0x40
MONITOR_RCVBUF = 8 << 20  # a burst of other owners' route changes (a peer daemon's full table) fits


class StartError(Exception):
    """The agent can't start (e.g. no Kubernetes API credentials); the message names the config field."""


def _route_kernel(cfg: AgentConfig) -> Any:
    from ipip.kernel import RouteKernel

    dp = cfg.dataplane
    return RouteKernel(proto=dp.route_protocol, table=dp.route_table, tunnel_device=dp.tunnel_device)


def _make_service_proxy(agent: "Agent") -> Any:
    from fabric.services import make_service_proxy

    # The proxy keeps its IPVS ownership record in the run dir: the resolved one (a relative paths.runDir
    # is relative to the config file, not to the agent's working directory).
    return make_service_proxy(agent.cfg, agent.run_dir)


def _make_policy(agent: "Agent") -> Any:
    from fabric.policy.sync import PolicySync

    return PolicySync(agent.base_cfg.node.name)


class Agent:
    def __init__(self, cfg: AgentConfig, config_path: Path, *, speaker_factory: Callable | None = None,
                 service_proxy_factory: Callable | None = None, kernel_factory: Callable | None = None,
                 policy_factory: Callable | None = None,
                 source_factory: Callable | None = None, monitor: bool = True, sysctls: bool = True,
                 clock: Callable[[], float] = time.monotonic, stage_backoff: Backoff = Backoff(1.0, 30.0)) -> None:
        self.base_cfg = cfg
        self.cfg = cfg  # effective: base config overlaid with IPPool/BGPPeer/BGPConfiguration objects
        self.config_dir = config_path.resolve().parent
        self.run_dir = self._path(cfg.paths.run_dir)
        self.clock = clock
        self._stage_backoff = stage_backoff
        self.store = Store(default_consumer=False)
        self.rib = SharedRib()
        self.lifecycle = Lifecycle(cfg.timers.graceful_restart_time)
        self.neighbors: list[Neighbor] = []
        self.config_known = False  # the effective config was computed from a complete source
        self.kernel_factory = kernel_factory or _route_kernel
        self.services_factory = service_proxy_factory if service_proxy_factory is not None else (
            _make_service_proxy if cfg.services.enabled else None)
        self.policy_factory = policy_factory if policy_factory is not None else (
            _make_policy if cfg.network_policy.enabled else None)
        self.sysctls = sysctls
        self._speaker_factory = speaker_factory
        self._source_factory = source_factory
        self._monitor_enabled = monitor
        self.remembered: dict[str, dict[str, Any]] = {}
        self.effective = EffectiveConfig(cfg)
        self.speaker: Any = None
        self.source: Any = None
        self.health: HealthServer | None = None
        self.runner: Runner | None = None
        self.metrics = AgentMetrics(self)
        self.config_stage: ConfigStage | None = None
        self.routes_stage: RoutesStage | None = None
        self.bgp_stage: BgpStage | None = None
        self.cni_stage: Any = None  # fabric.stages.cni.CniStage when cni.enabled
        self.started = time.time()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._monitor: Any = None
        self._monitor_filtered = False
        self._status_at = 0.0
        self._status_cost = 0.0  # seconds the last status write took
        self._status_routes: dict[Any, tuple[Any, str, dict[str, Any]]] = {}  # prefix -> (route, its key, view)
        self._status_learned: dict[Any, tuple[Any, str, list[Any]]] = {}  # prefix -> (what it was from, key, rows)
        self._status_handle: asyncio.TimerHandle | None = None
        self._bad_objects: dict[str, dict[tuple[str, str], str]] = {}  # per stage, as last reported
        self._status_late: asyncio.TimerHandle | None = None  # a deferred write's latest time
        self._stall_handle: asyncio.TimerHandle | None = None
        self._hold_timer: asyncio.TimerHandle | None = None
        self._last_phase: Phase | None = None

    def _path(self, p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() else self.config_dir / path

    @property
    def desired_known(self) -> bool:
        """The desired state comes from a complete source: announcements are final (End-of-RIB may go)."""
        return self.config_known

    # ------------------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = self._loop = asyncio.get_running_loop()
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.run_dir.chmod(0o700)  # exabgp.conf (MD5 passwords) and last-good objects live here
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop)
        self.remembered = lastgood.load(self.run_dir)
        if self.remembered.get("Node"):
            self.store.remember("Node", self.remembered["Node"])
        try:
            self._start_source(loop)
        except StartError as e:
            log.error("%s", e)
            return 2  # as for a bad config file
        bad = self.effective.seed(self.remembered)
        for b in bad:
            log.warning("last-good object no longer usable: %s", b)

        # The config, then ExaBGP, before anything else: ExaBGP starts with its neighbors (no empty start +
        # reload), and its start (~0.75 s in the lab kernel) is what a starting node's sessions wait for, so
        # the other stages are built (their modules imported) while it runs. No BGP event reaches the agent
        # before the runner exists: ExaBGP connects to our socket only once its reactor runs.
        self.config_stage = ConfigStage(self, self.effective, self.remembered)
        complete = self._source_complete()
        self._set_config(await asyncio.to_thread(self.config_stage.compute, complete), complete)
        self._start_speaker()
        nodes = self.store.snapshot("Node")
        try:
            await self.speaker.set_neighbors(desired_neighbors(self.cfg, nodes)[0])
            await self.speaker.start()
        except SpeakerError as e:  # names paths.exabgp / paths.runDir; routes stay untouched
            log.error("%s", e)
            await self._shutdown(loop)
            return 2

        stages = stages_mod.build(self, self.config_stage)
        self.routes_stage = next(s for s in stages if isinstance(s, RoutesStage))
        self.bgp_stage = next((s for s in stages if isinstance(s, BgpStage)), None)
        self.cni_stage = next((s for s in stages if s.name == "cni"), None)
        t = self.cfg.timers
        self.runner = Runner(self.store, stages, complete=self._source_complete, min_interval=t.min_sync_interval,
                             resync_interval=t.resync_interval, stage_timeout=self.cfg.health.stage_timeout,
                             clock=self.clock, backoff=self._stage_backoff, on_result=self._on_result,
                             on_run=self.metrics.observe_run)
        self.store.set_on_change(self.runner.kind_changed)
        if self._monitor_enabled:
            self._start_monitor(loop)
        if self.cfg.health.listen:
            self.health = HealthServer(self.cfg.health.listen, self._health)
            await self.health.start()
        self._update_lifecycle()
        # Everything allocated so far lives as long as the agent (modules, clients, config): out of the
        # cyclic GC's reach, so its collections during a bulk route change don't scan it again and again.
        gc.freeze()
        try:
            await self.runner.run(self._stop)
        finally:
            await self._shutdown(loop)
        return 0

    def _request_stop(self) -> None:
        log.info("stopping: ExaBGP goes down, routes stay in the kernel (graceful restart)")
        self.lifecycle.stop()
        self._stop.set()

    async def _shutdown(self, loop: asyncio.AbstractEventLoop) -> None:
        self.lifecycle.stop()
        if self._monitor is not None:
            loop.remove_reader(self._monitor.fileno())
            self._monitor.close()
        if self.health is not None:
            await self.health.stop()
        if self.speaker is not None:
            await self.speaker.stop()
        if self.source is not None:
            self.source.stop(loop)
        if self.runner is not None:
            await self.runner.stop()
        self._write_status(force=True)

    # ------------------------------------------------------------------------------------------
    def _start_source(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._source_factory is not None:
            self.source = self._source_factory(self)
            self.source.start(loop)
            return
        src = self.cfg.source
        if src.kind == "file":
            from fabric.sources.file import FileSource

            self.source = FileSource(self.store, self._path(src.path))
            # a refused file (or a new skipped entry) shows in status at once, with the error of now
            self.source.on_change = self._source_changed
            self.source.start(loop)
        else:
            from fabric.sources.kubernetes import KubernetesSource, SourceError

            try:
                ks = KubernetesSource(self.store, src)
            except SourceError as e:  # names the config field (source.kubeconfig); no traceback
                raise StartError(str(e)) from None
            self.effective = EffectiveConfig(self.base_cfg, secret=ks.read_secret, report=ks.report_problem)
            ks.on_change = lambda: loop.call_soon_threadsafe(self._source_changed)
            ks.start()
            self.source = _ThreadSourceAdapter(ks)

    def _source_changed(self) -> None:
        """On the loop: the source's problems or reachability changed; status follows at once."""
        if self.runner is None:
            return  # still starting: the first status write comes with the first stage result
        self._status_at = 0.0
        if self._status_handle is not None:
            self._status_handle.cancel()
            self._status_handle = None
        self._schedule_status()

    def _source_complete(self) -> bool:
        synced = getattr(self.source, "synced", None)
        return bool(synced()) if synced is not None else True

    def _start_speaker(self) -> None:
        if self._speaker_factory is not None:
            self.speaker = self._speaker_factory(self.run_dir, self._on_bgp_event)
            return
        self.speaker = Speaker(self.run_dir, self._on_bgp_event, exabgp=self.cfg.paths.exabgp)

    def _start_monitor(self, loop: asyncio.AbstractEventLoop) -> None:
        """Address, link and IPv4 route changes of this namespace reach the routes stage: the node address
        coming or going, a device going down or up, a route of ours deleted or replaced by someone else.
        No polling for any of them."""
        try:
            self._monitor = nl.open_monitor(RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE, rcvbuf=MONITOR_RCVBUF)
        except OSError as e:
            log.warning("no address/link/route monitor (%s): the kernel is re-read at each resync only", e)
            return
        loop.add_reader(self._monitor.fileno(), self._on_monitor)

    def _on_monitor(self) -> None:
        try:
            msgs = nl.drain(self._monitor)
        except OSError:
            return
        rs = self.routes_stage
        assert rs is not None and self.runner is not None
        view = rs.view
        # Not read yet, or the node address missing: any change may be the one awaited; the read decides.
        facts = view is None or view.facts is None
        wake = False
        for typ, flags, pid, body in msgs:
            if facts:
                break
            if typ == nl.NLMSG_ERROR:  # the kernel dropped notifications: don't guess, read it all again
                facts = True
            elif typ in (rtnl.RTM_NEWADDR, rtnl.RTM_DELADDR):
                a = rtnl.decode_addr(body)
                facts = a is not None and (a.address == self.cfg.node.address.ip or a.prefixlen < 32
                                           or (view.tunnel is not None and a.index == view.tunnel.index))
            else:  # routes and links: per key, in the stage
                wake = rs.kernel_event(typ, flags, pid, body) or wake
        if facts and msgs:
            rs.facts_changed()
            wake = True
        if wake:
            self.runner.wake("routes")
        ss = self.runner.states.get("services")
        if ss is not None and self.cfg.services.node_port_addresses and \
                any(typ in (rtnl.RTM_NEWADDR, rtnl.RTM_DELADDR, nl.NLMSG_ERROR) for typ, *_ in msgs):
            ss.stage.addresses_changed()  # NodePorts follow the interface addresses inside nodePortAddresses
            self.runner.wake("services")

    def _filter_monitor(self) -> None:
        """Once the routes stage has its route socket: the kernel drops the echo of our own writes before
        it reaches the monitor (the stage also ignores them by port id)."""
        rs = self.routes_stage
        if self._monitor is None or self._monitor_filtered or rs is None or not rs.portid:
            return
        try:
            nl.ignore_sender(self._monitor, rs.portid)
        except OSError as e:
            log.warning("monitor: no kernel filter for our own writes (%s): they are dropped in the agent", e)
        self._monitor_filtered = True

    # ------------------------------------------------------------------------------------------
    def publish_config(self, cfg: AgentConfig, complete: bool) -> None:
        """From the config stage's worker: a new effective configuration."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._set_config, cfg, complete)

    def _set_config(self, cfg: AgentConfig, complete: bool) -> None:
        logs.register_secrets(p.password for p in cfg.peers)  # passwords from Secrets too: never logged
        if cfg != self.cfg:
            log.info("effective configuration changed (pools: %s)",
                     ", ".join(f"{p.cidr} {p.ipip_mode.value}" for p in cfg.pools) or "none")
            self.cfg = cfg
            self.lifecycle.hold_time = cfg.timers.graceful_restart_time
            if self.runner is not None:
                self.runner.wake("bgp", full=True)
                self.runner.wake("routes", full=True)
                for name in ("cni", "podnat"):  # pod MTU (pools' ipipMode), natOutgoing, service ranges
                    if name in self.runner.states:
                        self.runner.wake(name)
        if complete and not self.config_known:
            self.config_known = True
            if self.runner is not None:
                self.runner.wake("bgp")  # the announced set becomes final: End-of-RIB may go
        self._update_lifecycle()

    def neighbors_changed(self, neighbors: list[Neighbor]) -> None:
        """From the BGP stage (loop): the speaker now has this neighbor set."""
        self.neighbors = list(neighbors)
        current = {n.name for n in neighbors}
        rs = self.routes_stage
        for peer in list(self.rib.counts()):
            if peer not in current and self.rib.forget(peer):
                log.info("peer %s removed from config: its routes are withdrawn", peer)
                if rs is not None:
                    rs.mark_all()
        if self.runner is not None:
            self.runner.wake("routes")
        self._update_lifecycle()

    def _on_bgp_event(self, ev: BgpEvent) -> None:
        now = self.clock()
        if isinstance(ev, SpeakerRestarted):
            self.lifecycle.speaker_restarted()
        if isinstance(ev, EndOfRib):
            log.info("End-of-RIB from %s", ev.peer)
            self.lifecycle.end_of_rib(ev.peer)
        if isinstance(ev, PeerUp):
            log.info("peer %s (%s) established, graceful restart time %s", ev.peer, ev.address, ev.gr_time)
        if isinstance(ev, PeerDown):
            log.warning("peer %s (%s) down: %s (%s)", ev.peer, ev.address, ev.reason,
                        "graceful: its routes are kept for the restart time it advertised, if any"
                        if ev.graceful else "its routes are removed")
        changed = self.rib.apply(ev, now)
        rs = self.routes_stage
        if rs is not None:
            if isinstance(ev, (RoutesAnnounced, RoutesWithdrawn)):
                rs.mark_dirty(ev.prefixes)
            elif changed:
                rs.mark_all()  # a peer's whole set moved (down, up, End-of-RIB sweep, our restart)
        if self.runner is not None and (changed or isinstance(ev, (PeerUp, PeerDown, EndOfRib))):
            self.runner.wake("routes")
        bs = self.bgp_stage
        if bs is not None and bs.reflecting and changed:  # a route reflector passes the change on
            if isinstance(ev, (RoutesAnnounced, RoutesWithdrawn)):
                bs.mark_dirty(ev.prefixes)
            else:
                bs.mark_all()
            if self.runner is not None:
                self.runner.wake("bgp")
        if isinstance(ev, (EndOfRib, PeerUp, PeerDown, SpeakerRestarted)):
            self._update_lifecycle()
            self._schedule_status()

    def _on_result(self, stage: Any, res: Any) -> None:
        self._report_bad_objects(stage.name, getattr(res, "bad_objects", None) or {})
        rs = self.routes_stage
        if stage is rs and rs is not None and rs.adopted is not None:
            self.lifecycle.adopt(len(rs.adopted))
        if stage is rs:
            self._filter_monitor()
        cs = self.cni_stage
        if stage is rs and cs is not None and rs.view is not None and rs.view.facts is not None \
                and rs.view.facts.mtu != cs.mtu and self.runner is not None:
            self.runner.wake("cni")  # the pod MTU follows the underlay's
        self._update_lifecycle()
        self._schedule_status()

    def _report_bad_objects(self, stage: str, bad: dict[tuple[str, str], str]) -> None:
        """A Warning Event for each object a stage newly skipped (or skipped for a new reason), where the
        source can record one (Kubernetes); the source sends it off the loop."""
        report = getattr(self.source, "report_stored", None)
        before = self._bad_objects.get(stage, {})
        self._bad_objects[stage] = dict(bad)
        if report is None:
            return
        for (kind, key), why in bad.items():
            if before.get((kind, key)) != why:
                report(kind, key, why)

    def _facts_missing(self) -> str | None:
        rs = self.routes_stage
        view = rs.view if rs is not None else None
        if view is None:
            return None  # not read yet: the lifecycle waits for the first read anyway
        return view.facts_error

    def _update_lifecycle(self) -> None:
        lc = self.lifecycle
        if lc.phase is Phase.STOPPING:
            return
        changed = lc.update(self.clock(), source_complete=self._source_complete(), config_known=self.config_known,
                            facts=self._facts_missing(), neighbors={n.name for n in self.neighbors})
        if changed or lc.phase != self._last_phase:
            self._last_phase = lc.phase
            log.info("phase %s%s", lc.phase.value, f": waiting for {'; '.join(lc.waiting)}" if lc.waiting else "")
            if lc.phase is Phase.RUNNING:
                if lc.adopted:
                    log.info("startup hold over: adopted routes not learned again are removed")
                if self.runner is not None:
                    self.runner.wake("routes", full=True)
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        d = lc.deadline()
        if d is not None and self._loop is not None:
            self._hold_timer = self._loop.call_later(max(0.0, d - self.clock()), self._update_lifecycle)

    # ------------------------------------------------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        """Ready: the desired state is known and the routes stage applied it (adopted ones may be held)."""
        if not self._source_complete():
            return False, WAITING_FOR_SOURCE
        if not self.config_known:
            return False, "the effective configuration is not computed yet"
        missing = self._facts_missing()
        if missing:
            return False, missing
        rs = self.runner.states["routes"] if self.runner is not None else None
        if rs is None or self.routes_stage is None or not self.routes_stage.applied or rs.error:
            return False, f"routes not applied yet{': ' + rs.error if rs is not None and rs.error else ''}"
        return True, "ready"

    def _health(self, path: str) -> tuple[Any, ...]:
        if path == "/metrics":
            try:
                body, ctype = self.metrics.render()
            except Exception as e:  # noqa: BLE001 - a metrics bug must not take the probes down
                log.exception("metrics: cannot render")
                return 500, f"metrics failed: {type(e).__name__}\n"
            return 200, body, ctype
        if path == "/healthz":
            stalled = self.runner.stalled() if self.runner is not None else []
            return (503, "\n".join(stalled) + "\n") if stalled else (200, "ok\n")
        if path == "/readyz":
            ok, why = self.ready()
            return (200, "ready\n") if ok else (503, f"not ready: {why}\n")
        return 404, "not found\n"

    def _speaker_neighbors(self) -> dict[str, dict[str, Any]]:
        if self.speaker is None:
            return {}
        return dict(self.speaker.status().get("neighbors", {}))

    def snapshot(self) -> dict[str, Any]:
        speaker = self._speaker_neighbors()
        counts = self.rib.counts()
        stages = self.runner.status() if self.runner is not None else {}
        rejected = (stages.get("routes") or {}).get("rejected") or {}
        peers = []
        for n in self.neighbors:
            s = dict(speaker.get(n.name, {}))
            s.setdefault("state", "idle")
            c = counts.get(n.name, {})
            cause = peer_cause(s, n.peer_as) if s["state"] != "established" else None
            refused = rejected.get(n.name, {})
            peers.append({"name": n.name, "address": str(n.peer_address), "asn": n.peer_as, "kind": n.kind,
                          **{k: v for k, v in s.items() if k not in ("name", "address")},
                          "routes": c.get("routes", 0), "stale": c.get("stale", 0),
                          "accepted": max(0, c.get("routes", 0) - sum(g["count"] for g in refused.values())),
                          "rejected": refused,
                          "cause": {"code": cause.code, "text": cause.text} if cause else None})
        warnings: set[str] = set()
        errors: set[str] = set()
        for name, st in stages.items():
            warnings.update(st.get("warnings", []) or [])
            errors.update(st.get("errors", []) or [])
            if st.get("error"):
                errors.add(f"{name}: {st['error']}")
        if self.source is not None and getattr(self.source, "problems", None):
            warnings.update(self.source.problems)
        if not self._source_complete():
            warnings.add(WAITING_FOR_SOURCE)
        rs = self.routes_stage
        routes = rs.routes_snapshot() if rs is not None else {}
        ready, why = self.ready()
        lc = self.lifecycle
        return {
            "node": self.cfg.node.name,
            "address": str(self.cfg.node.address),
            "asn": self.cfg.node.asn or self.cfg.cluster.asn,
            "ready": ready,
            "notReadyBecause": None if ready else why,
            "phase": lc.phase.value,
            "waitingFor": list(lc.waiting),
            "started": self.started,
            "updated": time.time(),
            "ipipModes": sorted({p.ipip_mode.value for p in self.cfg.pools}),
            "tunnelNeeded": rs.tunnel_needed() if rs is not None else False,
            "peers": peers,
            "speaker": ({k: v for k, v in self.speaker.status().items() if k != "neighbors"}
                        if self.speaker is not None else None),
            "routes": self._routes_view(routes),
            "learned": self._learned_view(),
            "adoptedHold": lc.holding,
            "source": self.source.state() if self.source is not None and hasattr(self.source, "state") else None,
            "services": stages.get("services"),
            "stages": stages,
            "warnings": sorted(warnings),
            "errors": sorted(errors),
        }

    def _routes_view(self, routes: dict[Any, Any]) -> dict[str, dict[str, Any]]:
        """The status document's routes. A route's entry is rendered once and reused while the route
        object is the same (the routes stage replaces a prefix's Route only when it changes)."""
        old, cache, out = self._status_routes, {}, {}
        for d, r in routes.items():
            c = old.get(d)
            if c is None or c[0] is not r:
                c = (r, str(d), {"kind": r.kind, "nexthops": [[str(h.gateway), h.device, h.onlink] for h in r.nexthops],
                                 "mtu": r.mtu, "metric": r.metric, "why": r.why})
            cache[d] = c
            out[c[1]] = c[2]
        self._status_routes = cache
        return out

    def _learned_view(self) -> dict[str, list[list[Any]]]:
        """_learned(rib), each prefix's rows rendered once while its holders and AS_PATHs stay the same."""
        paths = self.rib.as_paths()
        old, cache, out = self._status_learned, {}, {}
        for p, holders in self.rib.routes().items():
            src = frozenset((peer, nh, paths.get((peer, p))) for peer, nh in holders)
            c = old.get(p)
            if c is None or c[0] != src:
                c = (src, str(p), _rows(p, holders, paths))
            cache[p] = c
            out[c[1]] = c[2]
        self._status_learned = cache
        return out

    def _schedule_status(self) -> None:
        """At most one write per STATUS_INTERVAL, and not sooner than STATUS_SHARE times the last write's
        duration after it (the document is O(routes)); a skipped write is done at its deadline, so the file
        is never more than that much behind. Never sooner than STATUS_SETTLE after the change: the write
        (~1-2.5 ms in the lab kernel with a few routes) stays out of the path of the event that caused it — on
        one CPU a node's write right after its route delays the nodes still installing theirs — and a
        burst is one write."""
        if self._status_handle is not None or self._loop is None:
            return
        gap = max(STATUS_INTERVAL, STATUS_SHARE * self._status_cost)
        delay = max(STATUS_SETTLE, self._status_at + gap - time.monotonic())
        self._status_handle = self._loop.call_later(delay, self._write_status)

    def _status_overdue(self) -> None:
        self._status_late = None
        self._write_status(force=True)

    def _routes_busy(self) -> bool:
        st = self.runner.states.get("routes") if self.runner is not None else None
        return st is not None and (st.future is not None or st.woken)

    def _write_status(self, force: bool = False) -> None:
        if self._status_handle is not None:
            self._status_handle.cancel()  # (this call's own handle, or one a forced write makes redundant)
            self._status_handle = None
        t0 = time.monotonic()
        if not force and not self._stop.is_set() and self._routes_busy() and self._loop is not None:
            wait = self._status_at + STATUS_DEFER_MAX - t0
            if wait > 0:
                # Routes being written: the routes result schedules the write again; at the latest in `wait`.
                if self._status_late is None:
                    self._status_late = self._loop.call_later(wait, self._status_overdue)
                return
        if self._status_late is not None:
            self._status_late.cancel()
            self._status_late = None
        self._status_at = t0
        try:
            status_mod.write(self.run_dir, self.snapshot())
        except OSError as e:
            log.error("cannot write status: %s", e)
        self._status_cost = time.monotonic() - t0
        # A run in progress produces no result to trigger a write: rewrite when it would count as stalled.
        if self.runner is not None and self._loop is not None and not self._stop.is_set():
            now = self.clock()
            due = [st.run_started + self.runner.stage_timeout for st in self.runner.states.values()
                   if st.future is not None and st.run_started is not None
                   and st.run_started + self.runner.stage_timeout > now]
            if self._stall_handle is not None:
                self._stall_handle.cancel()
            self._stall_handle = self._loop.call_later(min(due) - now + 0.05, self._schedule_status) if due else None


def _learned(rib: SharedRib) -> dict[str, list[list[Any]]]:
    """prefix -> [[peer, next hop], ...]; a route with an AS_PATH gets it as a third item (a list; an
    AS_SET as a list inside it), so `fabric plan` judges AS_PATH loops as the agent does."""
    paths = rib.as_paths()
    return {str(p): _rows(p, holders, paths) for p, holders in rib.routes().items()}


def _rows(p: Any, holders: Any, paths: dict[tuple[str, Any], tuple]) -> list[list[Any]]:
    rows = []
    for peer, nh in sorted(holders):
        path = paths.get((peer, p))
        rows.append([peer, str(nh)] + ([[list(x) if isinstance(x, tuple) else x for x in path]] if path else []))
    return rows


class _ThreadSourceAdapter:
    """Gives a thread-based source the start/stop(loop) shape of the file source."""

    def __init__(self, src: Any) -> None:
        self.src = src

    @property
    def problems(self) -> list[str]:
        return list(getattr(self.src, "problems", []) or [])

    def report_stored(self, kind: str, key: str, message: str) -> None:
        if hasattr(self.src, "report_stored"):
            self.src.report_stored(kind, key, message)

    def state(self) -> dict[str, Any]:
        return self.src.state() if hasattr(self.src, "state") else {}

    def synced(self) -> bool:
        return bool(self.src.synced())

    def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        self.src.stop()
