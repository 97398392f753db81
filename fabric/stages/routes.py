"""The routes stage: learned routes + cluster + kernel facts -> desired routes -> per-key reconcile.

On its own worker thread. A full run (first, periodic, facts changed, configuration changed) reads
the kernel (links, addresses, every route of our table) and recomputes every route; otherwise only the
prefixes BGP touched are recomputed and only their keys reconciled (fabric.route_state). Writes go
through ipip.reconcile.RouteReconciler: never where another owner's route sits, failed keys retried
alone with backoff. The first read adopts every route we own; while the lifecycle holds, adopted
routes are added to the desired set (kept, never removed). Before the source's first complete list,
or while the node address is on no interface, nothing is written at all.

Between reads the kernel's own events keep the dataplane side true (`kernel_event`, fed by the
agent's rtnetlink monitor): a route of ours deleted or changed by someone else, another owner's route
appearing at or leaving one of our keys, a device going down (the kernel then drops every route
through it without an RTM_DELROUTE) or up. Each is repaired per key in the next run — no kernel read,
no recompute — and a key held back by the device or the other route is retried at once when that goes.
Only what changes the node's facts (the node or tunnel device renamed, re-created, its MTU; a lost
notification) makes the next run read the kernel again.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from fabric import rejections as rej
from fabric.bgp_desired import local_pod_cidrs, peer_routing
from fabric.config import AgentConfig
from fabric.import_policy import ImportFilter
from fabric.route_state import RouteState, make_inputs
from fabric.stage import Gauge, Stage, StageInput, StageResult
from ipip import netlink as nl
from ipip import rtnl
from ipip.kernel import KernelView, OpError, set_sysctl
from ipip.model import Route, RouteKey, same_subnet_network, tunnel_address
from ipip.reconcile import Failures, RouteReconciler

log = logging.getLogger("fabric.routes")

Prefix = ipaddress.IPv4Network


class RouteKernelLike(Protocol):
    """What the stage needs of the kernel (ipip.kernel.RouteKernel, or a fake in tests)."""

    def read(self, node_ip: ipaddress.IPv4Address, underlay_mtu: int | None = None,
             device: str | None = None) -> KernelView: ...
    def apply(self, ops: Iterable[tuple[str, Route]], ifindex: dict[str, int]) -> list[OpError]: ...
    def create_tunnel(self) -> int: ...
    def set_link(self, index: int, *, mtu: int | None = None, up: bool | None = None) -> None: ...
    def tunnel_address(self, index: int, add: Iterable[ipaddress.IPv4Address],
                       delete: Iterable[ipaddress.IPv4Address]) -> list[tuple[str, ipaddress.IPv4Address, int]]: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Computed:
    pods: list[Prefix]  # this node's pod CIDRs
    inputs: Any  # fabric.route_state.RouteInputs the desired routes came from


@dataclass(frozen=True)
class RoutesPrep:
    cfg: AgentConfig
    neighbors: tuple[Any, ...]
    holding: bool
    dirty: frozenset[Prefix] | None  # None: recompute every prefix
    facts_changed: bool
    events: tuple[tuple, ...] = ()  # the kernel's route/link events since the last run (kernel_event)


class RoutesStage(Stage):
    name = "routes"
    kinds = frozenset({"Node"})
    on_worker = True
    needs_source = False  # its first run adopts what the kernel holds, whatever else is known

    def __init__(self, agent: Any, kernel_factory: Callable[[AgentConfig], RouteKernelLike],
                 sysctls: bool = True) -> None:
        self.agent = agent
        self._kernel_factory = kernel_factory
        self._sysctls = sysctls
        self._k: RouteKernelLike | None = None
        self.rec = RouteReconciler()
        self._cfg: AgentConfig | None = None
        self.state: RouteState | None = None
        self.view: KernelView | None = None
        self.adopted: dict[RouteKey, Route] | None = None
        self._key_of: dict[Prefix, RouteKey] = {}
        self._lock = threading.Lock()  # state.routes / warnings, read by the status snapshot on the loop
        self.tunnel_failures: Failures[str] = Failures()
        self.facts_warning: str | None = None
        self.errors: list[str] = []
        self._reported: dict[tuple[str, str], int] = {}
        self._problem_text: dict[RouteKey, str] = {}  # the refusal / conflict last logged per route key  # (peer, reason code) logged -> its count then
        self._forward_set = False
        self.applied = False  # a run got as far as writing (the desired state was known)
        self.reads = 0  # kernel reads (dumps): the first, resyncs, facts changes; not per-key repairs
        self.repairs = 0  # keys the kernel's events made pending again (deleted / replaced / device down)
        self.portid: int | None = None  # our route socket's netlink port id (its writes' notifications)
        # loop side
        self._dirty: set[Prefix] = set()
        self._dirty_all = True
        self._facts_changed = True
        self._events: list[tuple] = []

    # -- event-loop side ---------------------------------------------------------------------------
    def mark_dirty(self, prefixes: Iterable[Prefix]) -> None:
        self._dirty.update(prefixes)

    def mark_all(self) -> None:
        self._dirty_all = True

    def facts_changed(self) -> None:
        self._facts_changed = True

    def kernel_event(self, typ: int, flags: int, pid: int, body: bytes) -> bool:
        """On the loop: one rtnetlink route or link notification. Queues what may concern our routes and
        returns whether the stage should run for it. O(1): our writes' own echoes (our port id) and other
        owners' routes at keys we neither want nor hold are dropped here."""
        if pid and pid == self.portid:
            return False
        cfg = self.agent.cfg
        if typ in (rtnl.RTM_NEWROUTE, rtnl.RTM_DELROUTE):
            r = rtnl.decode_route(body)
            if r is None or r.table != cfg.dataplane.route_table or r.tos:
                return False
            if r.proto != cfg.dataplane.route_protocol:
                k, rec = (r.dst, r.metric), self.rec
                if k not in rec.desired and k not in rec.dataplane and k not in rec.failures:
                    return False
            self._events.append(("route", typ, flags, r))
            return True
        if typ in (rtnl.RTM_NEWLINK, rtnl.RTM_DELLINK):
            ln = rtnl.decode_link(body)
            view = self.view
            old = view.links.get(ln.index) if view is not None else None
            if old is None:
                # A device the last read did not see (a pod's veth coming or going): none of our routes can
                # use it before a read that sees it; only the node's or the tunnel device re-created matters.
                facts_dev = view.facts.device if view is not None and view.facts is not None else None
                if ln.name not in (facts_dev, cfg.dataplane.tunnel_device):
                    return False
            elif typ == rtnl.RTM_NEWLINK and (old.name, old.up, old.mtu) == (ln.name, ln.up, ln.mtu):
                return False  # nothing we keep changed (a carrier or statistics change)
            self._events.append(("link", typ, flags, ln))
            return True
        return False

    def next_deadline(self, now: float) -> float | None:
        return self.agent.rib.next_deadline()  # a peer's graceful-restart window ends

    def prepare(self, inp: StageInput) -> RoutesPrep:
        if self.agent.rib.expire(inp.now):
            self._dirty_all = True
        dirty = None if (self._dirty_all or inp.full) else frozenset(self._dirty)
        p = RoutesPrep(self.agent.cfg, tuple(self.agent.neighbors), self.agent.lifecycle.holding, dirty,
                       self._facts_changed, tuple(self._events))
        self._dirty, self._dirty_all, self._facts_changed, self._events = set(), False, False, []
        return p

    def restore(self, inp: StageInput, p: RoutesPrep) -> None:
        if p is None or p.dirty is None:
            self._dirty_all = True
        else:
            self._dirty |= p.dirty
        if p is None or p.facts_changed or p.events:
            self._facts_changed = True  # events half applied by a failed run: the next run reads the kernel

    # -- worker side -------------------------------------------------------------------------------
    def _kernel(self, cfg: AgentConfig) -> RouteKernelLike:
        if self._k is None:
            self._k = self._kernel_factory(cfg)
            self.portid = getattr(self._k, "portid", None)
        return self._k

    def close(self) -> None:
        if self._k is not None:
            self._k.close()

    def _read(self, k: RouteKernelLike, cfg: AgentConfig) -> KernelView:
        dp = cfg.dataplane
        view = k.read(cfg.node.address.ip, dp.underlay_mtu, cfg.node.interface)
        warn = None
        if view.facts is not None and view.kernel_prefix is not None:
            net, warn = same_subnet_network(view.kernel_prefix, cfg.node.address)
            if net != view.facts.network:
                view = dataclasses.replace(view, facts=dataclasses.replace(view.facts, network=net))
        if warn and warn != self.facts_warning:
            log.warning("%s", warn)
        self.facts_warning = warn
        if view.facts_error and (self.view is None or self.view.facts_error != view.facts_error):
            log.error("%s: nothing is written until it is (the routes we own stay as they are)", view.facts_error)
        return view

    def run(self, inp: StageInput, p: RoutesPrep) -> StageResult:
        now, t0 = inp.now, time.monotonic()
        k = self._kernel(p.cfg)
        out = self.reconcile(inp, p)
        if isinstance(out, str):
            return self._result(now, waiting=out)
        if self._sysctls and not self._forward_set:
            # Only now: a node whose address is not (yet) there is not touched at all.
            err = set_sysctl("net.ipv4.ip_forward", "1")
            self.errors = [err] if err else []
            self._forward_set = err is None
        self._tunnel(k, now, out.pods)
        ops = self.rec.plan(now)
        todo = ops.ops()
        t2 = time.monotonic()
        refused = k.apply(todo, self.view.ifindex) if todo else []  # type: ignore[union-attr]
        t3 = time.monotonic()
        self.rec.record(ops, [(e.op, e.route, e.errno) for e in refused], now)
        # Each problem is logged when it starts or changes, not at every retry (status keeps the count).
        fails = self.rec.failures.items
        for e in refused:
            if self._new_problem(e.route.id, fails):
                log.error("route %s %s refused: %s (retried alone with backoff)", e.op, e.route.text(), e.error)
        for key, why in ops.conflicts.items():
            if self._new_problem(key, fails):
                log.error("route %s: %s", key[0], why)
        if len(refused) < len(todo) or (ops.conflicts and not all(fails[k].attempts > 1 for k in ops.conflicts)):
            conflicts = len(ops.conflicts) + sum(1 for e in refused if e.op == "create" and e.errno == errno.EEXIST)
            log.info("routes: %d deleted, %d written, %d refused, %d conflict(s) in %.3f s (desired state %.3f s, "
                     "kernel %.3f s)", len(ops.delete), len(ops.write), len(refused), conflicts, time.monotonic() - t0,
                     t2 - t0, t3 - t2)
        self.applied = True
        return self._result(now)

    def reconcile(self, inp: StageInput, p: RoutesPrep) -> "Computed | str":
        """Read the kernel when needed and bring the desired side up to date; writes nothing. Returns
        what is missing (a reason) when nothing may be written yet. `fabric plan` calls this too."""
        cfg, now = p.cfg, inp.now
        k = self._kernel(cfg)
        dirty: frozenset[Prefix] | None = p.dirty
        if cfg is not self._cfg:
            with self._lock:
                self.state = RouteState(ImportFilter(cfg))
            self._cfg, dirty = cfg, None
        assert self.state is not None
        read = inp.full or self.view is None or p.facts_changed or self.view.facts is None
        if p.events and not read:
            read = self._kernel_events(p.events, cfg, now)
        if read:
            self.reads += 1
            self.view = self._read(k, cfg)
            self.rec.set_dataplane(self.view.owned, self.view.foreign)
            dirty = None
            if self.adopted is None:
                self.adopted = dict(self.view.owned)
                if self.adopted:
                    log.info("adopted %d route(s) from a previous run: kept until the desired state is known and "
                             "every peer sent End-of-RIB (or the graceful-restart time)", len(self.adopted))
        view = self.view
        if not inp.complete:
            return "the source's first complete list"
        if view.facts is None:
            return view.facts_error or "the node's facts"
        nodes = self.agent.store.snapshot("Node")
        pods = local_pod_cidrs(cfg, nodes.get(cfg.node.name))
        neighbors = p.neighbors
        ibgp = [n.name for n in neighbors if n.kind == "external" and n.peer_as == n.local_as]
        inputs = make_inputs(facts=view.facts, pools=cfg.pools, pod_cidrs=pods, nodes=nodes,
                             kinds={n.name: n.kind for n in neighbors}, ibgp=ibgp,
                             tunnel_device=cfg.dataplane.tunnel_device,
                             per_peer_limits=any(pc.max_prefixes for pc in cfg.peers),
                             external=peer_routing(cfg, neighbors), external_metric=cfg.dataplane.external_route_metric)
        rib = self.agent.rib
        with self._lock:
            touched, rejections = self.state.update(inputs, nodes, dirty=None if dirty is None else set(dirty),
                                                    all_routes=rib.routes, holders=rib.holders, attrs=rib.attrs,
                                                    holders_of=getattr(rib, "holders_of", None))
            routes = self.state.routes
            adopted = self.adopted if p.holding else {}
            if touched is None:
                desired = {r.id: r for r in routes.values()}
                self._key_of = {d: r.id for d, r in routes.items()}
                for key, r in (adopted or {}).items():
                    desired.setdefault(key, r)
                self.rec.set_desired(desired)
            else:
                changes: dict[RouteKey, Route | None] = {}
                for pfx in touched:
                    old, new = self._key_of.get(pfx), routes.get(pfx)
                    if old is not None and (new is None or new.id != old):
                        changes[old] = (adopted or {}).get(old)
                    if new is not None:
                        changes[new.id] = new
                        self._key_of[pfx] = new.id
                    else:
                        self._key_of.pop(pfx, None)
                self.rec.update_desired(changes)
        return Computed(pods, inputs)

    def _kernel_events(self, events: Iterable[tuple], cfg: AgentConfig, now: float) -> bool:
        """Fold the kernel's events into the dataplane side, per key. Returns True when they change the
        node's facts instead (the next step then reads the kernel: the dump is the truth)."""
        view = self.view
        assert view is not None and view.facts is not None
        dp = cfg.dataplane
        links, ifname, ifindex = dict(view.links), dict(view.ifname), dict(view.ifindex)
        rec = self.rec
        for kind, typ, flags, x in events:
            if kind == "link":
                ln: rtnl.Link = x
                old = links.get(ln.index)
                if ln.name == dp.tunnel_device:
                    t = view.tunnel
                    if typ == rtnl.RTM_DELLINK or t is None or t.index != ln.index or (t.up, t.mtu) != (ln.up, ln.mtu):
                        return True  # the tunnel stage step keeps it up with its MTU: it needs the truth
                    continue
                if typ == rtnl.RTM_DELLINK or (old is None and ln.name in ifindex) or \
                        (old is not None and old.name != ln.name) or \
                        (ln.name == view.facts.device and dp.underlay_mtu is None and old is not None and
                         old.mtu != ln.mtu):
                    return True  # a device gone, re-created or renamed, the underlay MTU: facts
                if old is not None and old.up and not ln.up:
                    gone = rec.device_down(ln.name)
                    if gone:
                        self.repairs += len(gone)
                        log.warning("%s went down: the kernel dropped %d of our route(s) through it (%s); written "
                                    "again as soon as it takes them", ln.name, len(gone),
                                    ", ".join(r.text() for r in gone[:3]) + (" ..." if len(gone) > 3 else ""))
                elif ln.up and (old is None or not old.up):
                    n = rec.device_up(ln.name, now)
                    if n:
                        log.info("%s is up: %d route(s) through it written now", ln.name, n)
                links[ln.index], ifname[ln.index], ifindex[ln.name] = ln, ln.name, ln.index
                continue
            r: rtnl.KernelRoute = x
            key, deleted = (r.dst, r.metric), typ == rtnl.RTM_DELROUTE
            if r.proto == dp.route_protocol:
                route = r.to_route(ifname)
                if rec.kernel_route(route, deleted):
                    self.repairs += 1
                    what = "deleted" if deleted else f"changed to {route.text()}"
                    log.warning("route %s%s %s outside the agent: %s", r.dst, f" metric {r.metric}" if r.metric else "",
                                what, "repaired" if key in rec.desired else "removed (not wanted)")
            else:
                text = None if deleted else r.text(ifname)
                replaced = bool(flags & nl.NLM_F_REPLACE)
                if rec.kernel_foreign(key, text, replaced=replaced, now=now):
                    if text is None:
                        log.info("the other owner's route at %s is gone%s", r.dst,
                                 ": ours is written now" if rec.is_pending(key) else "")
                    else:
                        self.repairs += 1
                        log.error("route %s: another owner's route %s %s: reported, never written over",
                                  r.dst, "replaced ours with" if replaced else "appeared next to ours:", text)
        self.view = dataclasses.replace(view, links=links, ifname=ifname, ifindex=ifindex)
        return False

    def _tunnel(self, k: RouteKernelLike, now: float, pods: list[Prefix]) -> None:
        """tunl0 up with the tunnel MTU and our tunnel address (when any enabled pool uses IPIP)."""
        assert self.state is not None and self.view is not None
        if not self.state.tunnel_needed or self.tunnel_failures.waiting("tunnel", now):
            return
        mtu = self.state.tunnel_mtu
        want = {a for a in [tunnel_address(pods)] if a is not None}
        t = self.view.tunnel
        try:
            if t is None:
                k.create_tunnel()
                self.view = self._read(k, self._cfg)  # type: ignore[arg-type]
                t = self.view.tunnel
                if t is None:
                    raise OSError("the tunnel device vanished right after it was created")
            if not t.up or t.mtu != mtu:
                k.set_link(t.index, mtu=mtu, up=True)
            add, delete = want - t.owned - t.other, t.owned - want
            errs = k.tunnel_address(t.index, add, delete) if add or delete else []
            if errs:
                dev = self._cfg.dataplane.tunnel_device if self._cfg else "tunnel"
                raise OSError("; ".join(f"{op} {a}/32 on {dev}: {os.strerror(e)}" for op, a, e in errs))
            self.view = dataclasses.replace(self.view, tunnel=dataclasses.replace(
                t, up=True, mtu=mtu, owned=frozenset(want)))
            if "tunnel" in self.tunnel_failures:
                log.info("tunnel device ready again")
            self.tunnel_failures.clear("tunnel")
        except OSError as e:
            f = self.tunnel_failures.fail("tunnel", f"tunnel device: {e}", now)
            if f.attempts == 1:
                log.error("%s (retrying with backoff)", f.error)

    def _result(self, now: float, waiting: str | None = None) -> StageResult:
        problems = self.rec.problems()
        failures = {k: v["error"] for k, v in problems.items() if v["attempts"]}  # retried alone (not `shared`)
        for f in self.tunnel_failures.items.values():
            failures["tunnel"] = f.error
        deadlines = [d for d in (self.rec.next_deadline(), self.tunnel_failures.next_deadline()) if d is not None]
        warnings = [w for w in [self.facts_warning] if w]
        by_peer: dict[str, dict[Prefix, tuple[str, str]]] = {}
        with self._lock:
            if self.state is not None and waiting is None:
                warnings += self.state.warning_lines()
                by_peer = rej.verdicts(self.state.import_filter.active(), self.state.unusable)
            desired = len(self.state.routes) if self.state is not None else 0
        summary = rej.summarise(by_peer)
        warnings += rej.lines(summary)
        self._log_rejections(summary)
        status: dict[str, Any] = {
            "desired": desired, "owned": len(self.rec.dataplane), "pending": len(self.rec.pending()),
            "conflicts": sum(1 for v in problems.values() if v["conflict"]),
            "reads": self.reads, "repairs": self.repairs,
            "problems": problems, "warnings": warnings,
            "programmed": dict(self.rec.programmed),
            "rejected": summary, "rejectedAll": rej.full(by_peer),
            "errors": list(self.errors) + ([waiting] if waiting and self.view is not None
                                            and waiting == self.view.facts_error else []),
        }
        if waiting:
            status["waiting"] = waiting
        return StageResult(failures=failures, next_deadline=min(deadlines) if deadlines else None, status=status,
                           metrics=self._metrics(status, summary))

    def _metrics(self, status: dict[str, Any], summary: dict[str, dict[str, dict[str, Any]]]) -> list[Gauge]:
        out = [Gauge("routes_programmed", "Routes in the kernel as the agent wants them, by kind", status["programmed"][k],
                     (("kind", k),)) for k in sorted(status["programmed"])]
        out += [Gauge("routes_desired", "Routes the agent wants in the kernel", status["desired"]),
                Gauge("routes_pending", "Desired routes not (yet) in the kernel as wanted", status["pending"]),
                Gauge("routes_conflicts", "Routes not written: another owner's route holds the key", status["conflicts"]),
                Gauge("routes_failed", "Routes the kernel refused, retried alone with backoff",
                      sum(1 for f in self.rec.failures.items.values() if not f.conflict))]
        counts = self.agent.rib.counts()
        for peer in sorted(set(counts) | set(summary)):
            refused = 0
            for code, g in sorted(summary.get(peer, {}).items()):
                refused += g["count"]
                out.append(Gauge("bgp_prefixes_rejected", "Prefixes from the peer not used, by reason (import "
                                 "policy or an unusable next hop)", g["count"], (("peer", peer), ("reason", code))))
            out.append(Gauge("bgp_prefixes_accepted", "Prefixes from the peer that are used (received - rejected)",
                             max(0, counts.get(peer, {}).get("routes", 0) - refused), (("peer", peer),)))
        return out

    def _new_problem(self, key: RouteKey, fails: dict) -> bool:
        f = fails.get(key)
        text = f.error if f is not None else ""
        new = self._problem_text.get(key) != text
        self._problem_text[key] = text
        if len(self._problem_text) > 4 * (len(fails) + 64):  # keep it bounded: forget keys that recovered
            self._problem_text = {k: v for k, v in self._problem_text.items() if k in fails}
        return new

    def _log_rejections(self, summary: dict[str, dict[str, dict[str, Any]]]) -> None:
        """One line when a peer's routes start being refused for a reason, one when that ends: never one
        per prefix (a peer sending 10,000 bad prefixes is two lines), never again on a resync."""
        now = {(peer, code): g for peer, groups in summary.items() for code, g in groups.items()}
        for (peer, code), g in sorted(now.items()):
            if (peer, code) not in self._reported:
                more = f" and {g['count'] - len(g['examples'])} more" if g["count"] > len(g["examples"]) else ""
                log.warning("peer %s: %d prefix(es) not used (%s): %s, e.g. %s%s", peer, g["count"], code, g["reason"],
                            ", ".join(g["examples"]), more)
        for peer, code in sorted(self._reported.keys() - now.keys()):
            log.info("peer %s: no prefix refused for %s any more", peer, code)
        self._reported = {k: g["count"] for k, g in now.items()}

    # -- for the status snapshot (event loop) --------------------------------------------------------
    def routes_snapshot(self) -> dict[Prefix, Route]:
        with self._lock:
            return dict(self.state.routes) if self.state is not None else {}

    def tunnel_needed(self) -> bool:
        with self._lock:
            return bool(self.state and self.state.tunnel_needed)
