"""`fabric explain SERVICE | VIP[:port]`: what this node programs for a service and why (pure).

From the same model the proxy runs (loadbalancer.model.build_service): every virtual server with the
field that asks for it (ClusterIP, ExternalIP, LoadBalancer ingress, NodePort), its scheduler and
affinity, every endpoint of the service's slices with its weight and why (ready; serving and
terminating, used because none is ready; terminating at weight 0 so connections drain; not ready; on
another node under a Local traffic policy), the addresses put on the service device and the nft
elements in `table inet bgp-fabric`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from loadbalancer.model import (_endpoints_by_port, _ports, build_service, ipv4_or_none, select_reals, service_key,
                                slice_service_key)
from loadbalancer.nft import TABLE, element_text
from loadbalancer.types import NodeContext, ServiceError


def endpoint_verdicts(eps: Mapping[tuple[str, int], Any], local_only: bool, node: str,
                      policy: str) -> list[tuple[str, int, int | None, str]]:
    """(address, port, weight or None when not used, why) for every endpoint, as select_reals decides."""
    chosen = {r.key: r.weight for r in select_reals(eps, local_only, node)}
    any_ready = any(e.ready and not e.terminating and (not local_only or e.node == node) for e in eps.values())
    out = []
    for (addr, port), e in sorted(eps.items()):
        where = f"node {e.node}" if e.node else "no node name"
        if local_only and e.node != node:
            out.append((addr, port, None, f"not used: on {where}; {policy} Local keeps this node's endpoints only"))
            continue
        w = chosen.get((addr, port))
        if w is None:
            out.append((addr, port, None, f"not used: not ready ({where})"))
        elif w == 0:
            out.append((addr, port, 0, f"terminating ({where}): weight 0, open connections drain, no new ones"))
        elif e.terminating:
            why = "no endpoint is ready" if not any_ready else "kube-proxy's fallback"
            out.append((addr, port, w, f"serving and terminating ({where}): used because {why}"))
        else:
            out.append((addr, port, w, f"ready ({where})"))
    return out


def _kinds(svc: Mapping[str, Any], ctx: NodeContext) -> dict[str, tuple[str, str]]:
    """VIP -> (kind, field): where each address of the service comes from."""
    spec = svc.get("spec") or {}
    out: dict[str, tuple[str, str]] = {}
    ips = spec.get("clusterIPs") or ([spec.get("clusterIP")] if spec.get("clusterIP") else [])
    for i, ip in enumerate(ips if isinstance(ips, list) else []):
        if ipv4_or_none(ip):
            out[ip] = ("ClusterIP", f"spec.clusterIPs[{i}]" if spec.get("clusterIPs") else "spec.clusterIP")
    for i, ip in enumerate(spec.get("externalIPs") or []):
        if ipv4_or_none(ip):
            out[ip] = ("ExternalIP", f"spec.externalIPs[{i}]")
    ingress = (((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or [])
    for i, ing in enumerate(ingress if isinstance(ingress, list) else []):
        ip = ing.get("ip") if isinstance(ing, dict) else None
        if ipv4_or_none(ip):
            out[ip] = ("LoadBalancer", f"status.loadBalancer.ingress[{i}].ip")
    for ip in ctx.node_port_addresses:
        out.setdefault(ip, ("NodePort", "spec.ports[].nodePort on this node's address"))
    return out


def explain_service(svc: dict[str, Any], slices: list[dict[str, Any]], ctx: NodeContext, *,
                    device: str = "fabric-svc", only: tuple[str, int | None] | None = None) -> list[str]:
    """Lines explaining one service; `only` = (vip, port or None) limits the virtual servers shown."""
    key = service_key(svc)
    st = build_service(svc, slices, ctx)
    if isinstance(st, ServiceError):
        return [f"service {key}: SKIPPED, nothing programmed: {st.reason}"]
    spec = svc.get("spec") or {}
    typ = spec.get("type") or "ClusterIP"
    out = [f"service {key} (type {typ})"]
    out += [f"  {w}" for w in st.why[1:] if not w.startswith("warning: ")]
    if typ == "ExternalName":
        return out
    itp = spec.get("internalTrafficPolicy") or "Cluster"
    etp = spec.get("externalTrafficPolicy") or "Cluster"
    by_port = _endpoints_by_port(slices, [])
    ports = {(p.proto, p.port): p for p in _ports(spec, typ)}
    node_ports = {(p.proto, p.node_port): p for p in ports.values() if p.node_port}
    kinds = _kinds(svc, ctx)
    shown = 0
    for v in st.virtual_servers:
        if only is not None and (v.addr != only[0] or (only[1] is not None and v.port != only[1])):
            continue
        shown += 1
        kind, field = kinds.get(v.addr, ("?", "?"))
        p = ports.get((v.proto, v.port)) if kind != "NodePort" else node_ports.get((v.proto, v.port))
        if p is None:  # a NodePort address that is also a service address, or the other way round
            p = ports.get((v.proto, v.port)) or node_ports.get((v.proto, v.port))
        internal = kind == "ClusterIP"
        policy = "internalTrafficPolicy" if internal else "externalTrafficPolicy"
        local = (itp if internal else etp) == "Local"
        out.append(f"  virtual server {v.proto} {v.addr}:{v.port} ({kind}, {field}) scheduler {v.options_text()}"
                   + (f", {policy} Local" if local else ""))
        eps = by_port.get((p.name, p.proto), {}) if p is not None else {}
        if not eps:
            out.append("    no endpoints: connections are refused")
        for addr, port, w, why in endpoint_verdicts(eps, local, ctx.node_name, policy):
            out.append(f"    -> {addr}:{port} " + (f"weight {w}  " if w is not None else "") + why)
    if only is not None and not shown:
        out.append(f"  no virtual server at {only[0]}" + (f":{only[1]}" if only[1] else ""))
    if st.addresses:
        out.append(f"  addresses on {device}: {', '.join(sorted(st.addresses))}")
    if st.health_check:
        out.append(f"  health check on port {st.health_check.port}: {st.health_check.local_endpoints} local endpoint(s)")
    if st.nft:
        out.append(f"  nft elements (table inet {TABLE}):")
        out += [f"    {name:<9} {element_text((name, vals))}" for name, vals in sorted(st.nft)]
    out += [f"  skipped: {w}" for w in st.warnings]
    return out


def find(target: str, services: Mapping[str, dict[str, Any]], ctx: NodeContext
         ) -> tuple[list[str], tuple[str, int | None] | None]:
    """The services a target names: `ns/name`, `name` (namespace default), or `VIP[:port]`."""
    ip, _, port = target.partition(":")
    if ipv4_or_none(ip) and (not port or port.isdigit()):
        hits = []
        for k, svc in sorted(services.items()):
            st = build_service(svc, [], ctx)
            if not isinstance(st, ServiceError) and any(v.addr == ip and (not port or v.port == int(port))
                                                        for v in st.virtual_servers):
                hits.append(k)
        return hits, (ip, int(port) if port else None)
    key = target if "/" in target else f"default/{target}"
    return ([key] if key in services else []), None


def slices_of(key: str, slices: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in slices if slice_service_key(s)[0] == key]

