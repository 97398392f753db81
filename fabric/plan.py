"""`fabric plan` and `fabric explain`: the agent's own routes stage, run once without writing.

Inputs are the agent's: the config, the cluster objects from the configured source (the cluster file,
or one complete list from the Kubernetes API), the last-good objects the running agent persisted, the
routes the running agent learned over BGP (its status file), and the kernel of this network namespace.
The desired routes and the operations come from the same code the agent runs (fabric.stages.routes:
RouteState + ipip.reconcile.RouteReconciler), so on a converged node the plan is empty. Nothing is written.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bgp.attributes import PathAttributes
from bgp.events import RoutesAnnounced
from fabric import lastgood, rejections as rej, status as status_mod
from fabric.bgp_desired import desired_announcements, desired_neighbors, local_pod_cidrs
from fabric.config import AgentConfig, ConfigError
from fabric.effective import EffectiveConfig
from fabric.import_policy import ImportFilter
from fabric.lifecycle import Lifecycle, Phase
from fabric.shared_rib import SharedRib
from fabric.stage import StageInput
from fabric.stages.routes import RoutesStage
from fabric.tracker import Changes, Store
from ipip.kernel import FactsError, RouteKernel
from ipip.reconcile import RouteOps

SOURCE_TIMEOUT = 30.0  # seconds to wait for one complete list from the Kubernetes API


def _learned_from_status(run_dir: Path) -> tuple[dict, str]:
    try:
        s = status_mod.read(run_dir)
    except (OSError, ValueError):
        return {}, f"no running agent status in {run_dir}: learned BGP routes unknown (planning with none)"
    learned: dict = {}
    for p, holders in s.get("learned", {}).items():
        for h in holders:
            peer, nh = h[0], ipaddress.IPv4Address(h[1])
            path = tuple(tuple(x) if isinstance(x, list) else int(x) for x in h[2]) if len(h) > 2 else ()
            learned.setdefault(ipaddress.IPv4Network(p), {})[(peer, nh)] = PathAttributes(as_path=path)
    n = len(learned)
    return learned, f"learned routes from the running agent's status ({n} prefixes)"


def _load_source(cfg: AgentConfig, base: Path, store: Store) -> tuple[list[str], Any]:
    """Fill `store` from the configured source once. Returns (notes, kubernetes source or None)."""
    if cfg.source.kind == "file":
        from fabric.sources.file import FileSource

        src_path = Path(cfg.source.path)
        fs = FileSource(store, src_path if src_path.is_absolute() else base / src_path)
        if not fs.reload():
            raise ConfigError([p.split(": ", 1)[-1] for p in fs.problems], str(fs.path))
        return list(fs.problems), None
    from fabric.sources.kubernetes import KubernetesSource

    changed = threading.Event()
    store.set_on_change(lambda kind: changed.set())
    ks = KubernetesSource(store, cfg.source)
    ks.start()
    deadline = time.monotonic() + SOURCE_TIMEOUT
    try:
        while not ks.synced():
            left = deadline - time.monotonic()
            if left <= 0:
                raise FactsError(f"no complete list from the Kubernetes API within {SOURCE_TIMEOUT:g}s")
            changed.wait(left)
            changed.clear()
    finally:
        ks.stop()
    return list(ks.problems), ks


@dataclass
class _Shim:
    """The slice of the agent the routes stage reads."""

    cfg: AgentConfig
    store: Store
    rib: SharedRib
    neighbors: list = field(default_factory=list)
    lifecycle: Lifecycle = field(default_factory=lambda: Lifecycle(0, Phase.RUNNING))


def compute(cfg: AgentConfig, config_path: Path) -> dict[str, Any]:
    base = config_path.resolve().parent
    run_dir = Path(cfg.paths.run_dir)
    run_dir = run_dir if run_dir.is_absolute() else base / run_dir
    store = Store(default_consumer=False)
    notes, ks = _load_source(cfg, base, store)
    remembered = lastgood.load(run_dir)
    if remembered.get("Node"):
        store.remember("Node", remembered["Node"])
    effective = EffectiveConfig(cfg, secret=ks.read_secret if ks is not None else None)
    effective.seed(remembered)
    cfg, problems = effective.from_store(store)  # the same overlay the agent applies
    notes += problems
    learned_raw, note = _learned_from_status(run_dir)
    notes.append(note)
    rib = SharedRib()
    for prefix, holders in learned_raw.items():
        for (peer, nh), attrs in holders.items():
            rib.apply(RoutesAnnounced(peer, nh, (prefix,), attrs), 0.0)
    learned_raw = {p: set(h) for p, h in learned_raw.items()}
    nodes = store.snapshot("Node")
    neighbors, nprob = desired_neighbors(cfg, nodes)
    shim = _Shim(cfg, store, rib, neighbors)
    dp = cfg.dataplane
    stage = RoutesStage(shim, lambda c: RouteKernel(proto=dp.route_protocol, table=dp.route_table,
                                                    tunnel_device=dp.tunnel_device), sysctls=False)
    inp = StageInput(Changes(), True, time.monotonic(), True)
    try:
        out = stage.reconcile(inp, stage.prepare(inp))
    finally:
        stage.close()
    if isinstance(out, str):
        raise FactsError(out)
    ops: RouteOps = stage.rec.plan(inp.now)
    routes = stage.routes_snapshot()
    view = stage.view
    assert view is not None and view.facts is not None
    pods = local_pod_cidrs(cfg, nodes.get(cfg.node.name))
    kinds = {n.name: n.kind for n in neighbors}
    ibgp = [n.name for n in neighbors if n.kind == "external" and n.peer_as == n.local_as]
    learned, _ = ImportFilter(cfg).filter(learned_raw, kinds, nodes, pods, ibgp, node_networks=(view.facts.network,),
                                          attrs=rib.attrs)
    assert stage.state is not None
    verdicts = rej.verdicts(stage.state.import_filter.active(), stage.state.unusable)
    return {"ops": ops, "routes": routes, "verdicts": verdicts, "foreign": dict(stage.rec.foreign),
            "tunnel_needed": stage.state.tunnel_needed,
            "tunnel_mtu": stage.state.tunnel_mtu, "warnings": stage._result(inp.now).status["warnings"],
            "neighbors": neighbors, "announcements": desired_announcements(cfg, pods, neighbors),
            "learned_raw": learned_raw, "learned": learned, "facts": view.facts,
            "notes": notes + ([stage.facts_warning] if stage.facts_warning else []) + nprob}


def render_plan(r: dict[str, Any]) -> str:
    ops: RouteOps = r["ops"]
    out = [f"# {n}" for n in r["notes"]]
    f = r["facts"]
    out.append(f"underlay: {f.address} on {f.device} in {f.network}, mtu {f.mtu}; tunnel "
               f"{'needed, mtu ' + str(r['tunnel_mtu']) if r['tunnel_needed'] else 'not needed'}")
    out.append("neighbors:")
    out += [f"  {n.name:<16} {n.peer_address}  AS {n.peer_as}  {n.kind}" for n in r["neighbors"]] or ["  (none)"]
    out.append("announcements:")
    out += [f"  {a.prefix}  next-hop {a.next_hop}  to {'all' if a.neighbors is None else ','.join(sorted(a.neighbors)) or 'nobody'}"
            for a in r["announcements"].values()] or ["  (none)"]
    writes = len(ops.write)
    out.append(f"routes: {len(r['routes'])} desired; changes: {len(ops.delete)} delete, {writes} replace"
               + (f", {len(ops.conflicts)} conflict" if ops.conflicts else ""))
    for d in ops.delete:
        out.append(f"  - delete {d.text()}")
    for op, x in ops.write:
        other = r.get("foreign", {}).get(x.id)
        out.append(f"  ! {x.text()}: not written, another owner's route holds the key ({other})" if other
                   else f"  + {op} {x.text()}")
    for key, why in ops.conflicts.items():
        out.append(f"  ! {key[0]}: {why}")
    out += [f"WARNING: {w}" for w in r["warnings"]]
    return "\n".join(out)


def render_explain(r: dict[str, Any], target: str) -> str:
    try:
        net = ipaddress.IPv4Network(target, strict=False)
    except ValueError:
        return f"explain: {target!r} is not an IPv4 address or prefix"
    routes = r["routes"]
    matches = [d for d in routes if net.subnet_of(d)]
    out = []
    raw = {p: s for p, s in r["learned_raw"].items() if net.subnet_of(p) or p.subnet_of(net)}
    verdicts = r.get("verdicts") or {}
    for p, holders in sorted(raw.items()):
        # every source of the prefix with its own verdict: one rejected source never hides another's route
        out.append(f"learned {p} from {len(holders)} source(s):")
        for peer, nh in sorted(holders):
            v = verdicts.get(peer, {}).get(p)
            if v is None:
                used = p in routes and any(h.gateway == nh for h in routes[p].nexthops)
                verdict = "accepted" + ("" if used else " (not in the route: see below)")
            elif v[0] == rej.NEXT_HOP:
                verdict = f"accepted by import policy, next hop unusable: {v[1]}"
            else:
                verdict = f"REJECTED by import policy ({v[0]}): {v[1]}"
            out.append(f"  {peer} (next hop {nh}): {verdict}")
    if not matches:
        out.append(f"no fabric route covers {net}")
    for d in sorted(matches, key=lambda d: -d.prefixlen):
        out.append(f"route {d}: {routes[d].why}")
        break
    for w in r["warnings"]:
        if any(str(p) in w for p in raw):
            out.append(f"warning: {w}")
    for a in r["announcements"].values():
        if net.subnet_of(a.prefix):
            out.append(f"announced {a.prefix}: {a.why}")
    return "\n".join(out)


def explain_services(cfg: AgentConfig, config_path: Path, target: str) -> str | None:
    """Lines for the services `target` names (`ns/name`, `name`, `VIP[:port]`), from the configured source
    and the running agent's status (failing, skipped); None when it names no service."""
    from loadbalancer import explain as lbx
    from loadbalancer.proxy import node_context

    base = config_path.resolve().parent
    store = Store(default_consumer=False)
    notes, _ = _load_source(cfg, base, store)
    ctx = node_context(cfg.services, cfg.node.name, [str(cfg.node.address.ip)])
    services = store.snapshot("Service")
    keys, only = lbx.find(target, services, ctx)
    if not keys:
        return None
    slices = list(store.snapshot("EndpointSlice").values())
    run_dir = Path(cfg.paths.run_dir)
    run_dir = run_dir if run_dir.is_absolute() else base / run_dir
    try:
        svc_status = status_mod.read(run_dir).get("services") or {}
        agent_note = None
    except (OSError, ValueError):
        svc_status, agent_note = {}, f"(no running agent status in {run_dir}: whether it is programmed is not known)"
    out: list[str] = []
    for k in keys:
        out += lbx.explain_service(services[k], lbx.slices_of(k, slices), ctx, device=cfg.services.device, only=only)
        f = (svc_status.get("failing") or {}).get(k)
        if f:
            out.append(f"  the agent: FAILING ({f.get('attempts')} in a row, retry in {f.get('retryIn')}s): "
                       + "; ".join(f.get("errors", [])))
        elif k in (svc_status.get("skipped") or {}):
            out.append(f"  the agent: skipped: {svc_status['skipped'][k]}")
        elif svc_status:
            out.append("  the agent: programmed (no failure reported)")
    if agent_note:
        out.append(agent_note)
    return "\n".join(out)
