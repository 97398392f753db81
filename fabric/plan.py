"""`fabric plan` and `fabric explain`: the pure model over the same inputs the agent uses.

Inputs: the config, the cluster file (file source), the routes a running agent learned over BGP (its
status file), and the kernel's facts and our routes in this network namespace. Nothing is written.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from fabric import status as status_mod
from fabric.bgp_desired import desired_announcements, desired_neighbors, local_pod_cidrs
from fabric.config import AgentConfig
from fabric.import_policy import ImportFilter
from fabric.inputs import NodeInfo
from fabric.effective import EffectiveConfig
from fabric.sources.file import load_into, parse_cluster_file
from fabric.tracker import Store
from ipip.kernel import RouteKernel
from ipip.model import RouteDiff, RoutePlan, desired_routes, diff_routes, same_subnet_network


def _learned_from_status(run_dir: Path) -> tuple[dict, str]:
    try:
        s = status_mod.read(run_dir)
    except (OSError, ValueError):
        return {}, f"no running agent status in {run_dir}: learned BGP routes unknown (planning with none)"
    learned = {ipaddress.IPv4Network(p): {(peer, ipaddress.IPv4Address(nh)) for peer, nh in holders}
               for p, holders in s.get("learned", {}).items()}
    return learned, f"learned routes from the running agent's status ({len(learned)} prefixes)"


def compute(cfg: AgentConfig, config_path: Path) -> dict[str, Any]:
    base = config_path.resolve().parent
    nodes: dict[str, NodeInfo] = {}
    notes: list[str] = []
    if cfg.source.kind == "file":
        src = Path(cfg.source.path)
        state = parse_cluster_file(src if src.is_absolute() else base / src)
        nodes = {n.name: n for n in state.nodes}
        store = Store()
        load_into(store, state)
        cfg, problems = EffectiveConfig(cfg).from_store(store)  # the same overlay the agent applies
        notes += problems
    else:
        notes.append("source is kubernetes: nodes are taken from the running agent's learned routes only")
    run_dir = Path(cfg.paths.run_dir)
    run_dir = run_dir if run_dir.is_absolute() else base / run_dir
    learned_raw, note = _learned_from_status(run_dir)
    notes.append(note)
    me = nodes.get(cfg.node.name)
    pods = local_pod_cidrs(cfg, me)
    neighbors, problems = desired_neighbors(cfg, nodes)
    kinds = {n.name: n.kind for n in neighbors}
    ibgp = [n.name for n in neighbors if n.kind == "external" and n.peer_as == n.local_as]
    learned, _ = ImportFilter(cfg).filter(learned_raw, kinds, nodes, pods, ibgp)
    dp = cfg.dataplane
    rk = RouteKernel(proto=dp.route_protocol, table=dp.route_table, tunnel_device=dp.tunnel_device)
    try:
        view = rk.read(cfg.node.address.ip, dp.underlay_mtu, cfg.node.interface)
    finally:
        rk.close()
    net, warn = same_subnet_network(view.kernel_prefix, cfg.node.address)
    facts = type(view.facts)(view.facts.address, net, view.facts.device, view.facts.mtu, view.facts.routes)
    plan = desired_routes(facts=facts, pools=list(cfg.pools), local_pod_cidrs=pods, learned=learned,
                          tunnel_device=dp.tunnel_device)
    return {"plan": plan, "diff": diff_routes(plan.routes, view.owned), "neighbors": neighbors,
            "announcements": desired_announcements(cfg, pods, neighbors), "learned_raw": learned_raw,
            "learned": learned, "facts": facts, "notes": notes + ([warn] if warn else []) + problems}


def render_plan(r: dict[str, Any]) -> str:
    plan: RoutePlan = r["plan"]
    diff: RouteDiff = r["diff"]
    out = [f"# {n}" for n in r["notes"]]
    f = r["facts"]
    out.append(f"underlay: {f.address} on {f.device} in {f.network}, mtu {f.mtu}; tunnel "
               f"{'needed, mtu ' + str(plan.tunnel_mtu) if plan.tunnel_needed else 'not needed'}")
    out.append("neighbors:")
    out += [f"  {n.name:<16} {n.peer_address}  AS {n.peer_as}  {n.kind}" for n in r["neighbors"]] or ["  (none)"]
    out.append("announcements:")
    out += [f"  {a.prefix}  next-hop {a.next_hop}  to {'all' if a.neighbors is None else ','.join(sorted(a.neighbors)) or 'nobody'}"
            for a in r["announcements"].values()] or ["  (none)"]
    out.append(f"routes: {len(plan.routes)} desired; changes: {len(diff.delete)} delete, {len(diff.replace)} replace")
    for d in diff.delete:
        out.append(f"  - delete {d.dst}")
    for x in diff.replace:
        hops = ", ".join(f"via {h.gateway} dev {h.device}{' onlink' if h.onlink else ''}" for h in x.nexthops)
        out.append(f"  + {x.kind} {x.dst} {hops}{' mtu ' + str(x.mtu) if x.mtu else ''}")
    out += [f"WARNING: {w}" for w in plan.warnings]
    return "\n".join(out)


def render_explain(r: dict[str, Any], target: str) -> str:
    try:
        net = ipaddress.IPv4Network(target, strict=False)
    except ValueError:
        return f"explain: {target!r} is not an IPv4 address or prefix"
    plan: RoutePlan = r["plan"]
    matches = [d for d in plan.routes if net.subnet_of(d)]
    out = []
    raw = {p: s for p, s in r["learned_raw"].items() if net.subnet_of(p) or p.subnet_of(net)}
    for p, holders in sorted(raw.items()):
        acc = "accepted" if p in r["learned"] else "REJECTED by import policy"
        out.append(f"learned {p} from " + ", ".join(f"{peer} (next hop {nh})" for peer, nh in sorted(holders))
                   + f": {acc}")
    if not matches:
        out.append(f"no fabric route covers {net}")
    for d in sorted(matches, key=lambda d: -d.prefixlen):
        route = plan.routes[d]
        out.append(f"route {d}: {route.why}")
        break
    for a in r["announcements"].values():
        if net.subnet_of(a.prefix):
            out.append(f"announced {a.prefix}: {a.why}")
    return "\n".join(out)
