"""Service (+ its EndpointSlices) -> what this node programs for it. Pure: no I/O, no clock.

`build_service` takes one Kubernetes-shaped Service dict, the EndpointSlice dicts labelled with its
name, and the node context; it returns a `ServiceState` or a `ServiceError` with one reason. A bad
service never affects another one. Endpoint selection follows kube-proxy (pkg/proxy/topology.go):
ready endpoints; if none is ready, the serving+terminating ones; Local traffic policies keep only
endpoints on this node. Terminating endpoints that are not used get weight 0 so their open
connections drain instead of being cut.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from loadbalancer.types import (PROTOCOLS, HealthCheck, NftElement, NodeContext, RealServer, ServiceError,
                                ServiceState, VirtualServer)

SCHEDULERS = frozenset({"rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh"})
SCHEDULER_ANNOTATIONS = ("bgp-fabric.io/scheduler",)
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
DEFAULT_AFFINITY_TIMEOUT = 10800  # Kubernetes' default for sessionAffinityConfig.clientIP.timeoutSeconds
SERVICE_TYPES = {"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"}


class BadService(ValueError):
    """Raised inside the model for the first problem found; becomes a ServiceError."""


@dataclass(frozen=True)
class Endpoint:
    addr: str
    node: str | None
    ready: bool
    serving: bool
    terminating: bool


@dataclass(frozen=True)
class PortSpec:
    name: str
    proto: str
    port: int
    node_port: int


def service_key(svc: dict[str, Any]) -> str:
    md = svc.get("metadata") or {}
    return f"{md.get('namespace') or 'default'}/{md.get('name')}"


def slice_service_key(sl: dict[str, Any]) -> str | None:
    """The "ns/name" of the Service an EndpointSlice belongs to (its service-name label), or None."""
    md = sl.get("metadata") or {}
    name = (md.get("labels") or {}).get(SERVICE_NAME_LABEL)
    if not isinstance(name, str) or not name:
        return None
    return f"{md.get('namespace') or 'default'}/{name}"


def ipv4_or_none(v: Any) -> str | None:
    """v when it is a dotted-quad IPv4 address in canonical form, else None (inet_pton: fast, strict)."""
    if not isinstance(v, str):
        return None
    try:
        return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, v))
    except OSError:
        return None


def _ipv4(v: Any, field: str) -> str:
    ip = ipv4_or_none(v)
    if ip is None:
        raise BadService(f"{field}: {v!r} is not an IPv4 address")
    return ip


def _port(v: Any, field: str, allow_zero: bool = False) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not ((0 if allow_zero else 1) <= v <= 65535):
        raise BadService(f"{field}: {v!r} is not a port (1-65535)")
    return v


def _ports(spec: dict[str, Any], typ: str) -> list[PortSpec]:
    raw = spec.get("ports") or []
    if not isinstance(raw, list):
        raise BadService("spec.ports: must be a list")
    out: list[PortSpec] = []
    seen: set[tuple[str, int]] = set()
    names: set[str] = set()
    for i, p in enumerate(raw):
        f = f"spec.ports[{i}]"
        if not isinstance(p, dict):
            raise BadService(f"{f}: must be a mapping")
        proto = p.get("protocol", "TCP")
        if proto not in PROTOCOLS:
            raise BadService(f"{f}.protocol: unknown protocol {proto!r} (TCP, UDP or SCTP)")
        port = _port(p.get("port"), f"{f}.port")
        if (proto, port) in seen:
            raise BadService(f"{f}: duplicate port {port}/{proto}")
        seen.add((proto, port))
        name = p.get("name") or ""
        if not isinstance(name, str):
            raise BadService(f"{f}.name: must be a string")
        if len(raw) > 1 and not name:
            raise BadService(f"{f}.name: required when a service has several ports")
        if name in names and name:
            # the same name is allowed for TCP+UDP of one port number (DNS), not otherwise
            if not any(q.name == name and q.port == port for q in out):
                raise BadService(f"{f}.name: duplicate port name {name!r}")
        names.add(name)
        node_port = 0
        if typ in ("NodePort", "LoadBalancer") and p.get("nodePort") not in (None, 0):
            node_port = _port(p.get("nodePort"), f"{f}.nodePort")
        out.append(PortSpec(name, proto, port, node_port))
    return out


def _scheduler(md: dict[str, Any], default: str) -> tuple[str, str]:
    ann = md.get("annotations") or {}
    for a in SCHEDULER_ANNOTATIONS:
        if a in ann:
            v = ann[a]
            if v not in SCHEDULERS:
                raise BadService(f"metadata.annotations[{a}]: unknown scheduler {v!r} "
                                 f"(one of {', '.join(sorted(SCHEDULERS))})")
            return v, f"scheduler {v} from annotation {a}"
    return default, f"scheduler {default} (default from config)"


def _affinity(spec: dict[str, Any]) -> int:
    aff = spec.get("sessionAffinity") or "None"
    if aff == "None":
        return 0
    if aff != "ClientIP":
        raise BadService(f"spec.sessionAffinity: {aff!r} is not None or ClientIP")
    cfg = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
    t = cfg.get("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT)
    if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= 86400:
        raise BadService(f"spec.sessionAffinityConfig.clientIP.timeoutSeconds: {t!r} is not 1-86400")
    return t


def _policy(spec: dict[str, Any], field: str) -> str:
    v = spec.get(field) or "Cluster"
    if v not in ("Cluster", "Local"):
        raise BadService(f"spec.{field}: {v!r} is not Cluster or Local")
    return v


def _endpoints_by_port(slices: list[dict[str, Any]]) -> dict[tuple[str, str], dict[tuple[str, int], Endpoint]]:
    """(port name, proto) -> {(ip, port): Endpoint} over all IPv4 slices; a bad slice entry is skipped."""
    out: dict[tuple[str, str], dict[tuple[str, int], Endpoint]] = {}
    for sl in sorted(slices, key=lambda s: str((s.get("metadata") or {}).get("name"))):
        if sl.get("addressType", "IPv4") != "IPv4":
            continue
        ports = sl.get("ports") or []
        eps = sl.get("endpoints") or []
        if not isinstance(ports, list) or not isinstance(eps, list):
            continue
        for p in ports:
            if not isinstance(p, dict):
                continue
            port = p.get("port")
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                continue
            bucket = out.setdefault((p.get("name") or "", p.get("protocol", "TCP")), {})
            for ep in eps:
                if not isinstance(ep, dict):
                    continue
                cond = ep.get("conditions") or {}
                ready = cond.get("ready") is not False  # nil means ready (API contract)
                serving = cond.get("serving", ready) is not False
                terminating = cond.get("terminating") is True
                for a in ep.get("addresses") or []:
                    ip = ipv4_or_none(a)
                    if ip is None:
                        continue
                    e = Endpoint(ip, ep.get("nodeName"), ready, serving, terminating)
                    prev = bucket.get((ip, port))
                    if prev is None or (e.ready and not prev.ready):  # duplicates across slices: prefer ready
                        bucket[(ip, port)] = e
    return out


def select_reals(eps: dict[tuple[str, int], Endpoint], local_only: bool, node: str) -> tuple[RealServer, ...]:
    """kube-proxy's choice: ready endpoints (weight 1); none ready -> serving+terminating (weight 1).

    Terminating endpoints not chosen stay with weight 0 so open connections keep working.
    """
    cand = {k: e for k, e in eps.items() if not local_only or e.node == node}
    ready = {k for k, e in cand.items() if e.ready and not e.terminating}
    if not ready:
        ready = {k for k, e in cand.items() if e.serving and e.terminating} or {k for k, e in cand.items() if e.ready}
    reals = []
    for k, e in cand.items():
        if k in ready:
            reals.append(RealServer(k[0], k[1], 1))
        elif e.terminating:
            reals.append(RealServer(k[0], k[1], 0))
    return tuple(sorted(reals))


def build_service(svc: dict[str, Any], slices: list[dict[str, Any]], ctx: NodeContext) -> ServiceState | ServiceError:
    key = service_key(svc)
    try:
        return _build(key, svc, slices, ctx)
    except BadService as e:
        return ServiceError(key, str(e))


def _build(key: str, svc: dict[str, Any], slices: list[dict[str, Any]], ctx: NodeContext) -> ServiceState:
    md = svc.get("metadata") or {}
    if not isinstance(md.get("name"), str) or not md.get("name"):
        raise BadService("metadata.name: missing")
    spec = svc.get("spec")
    if not isinstance(spec, dict):
        raise BadService("spec: missing")
    typ = spec.get("type") or "ClusterIP"
    if typ not in SERVICE_TYPES:
        raise BadService(f"spec.type: unknown type {typ!r}")
    if typ == "ExternalName":
        return ServiceState(key, why=("type ExternalName: nothing to program",))
    ports = _ports(spec, typ)
    sched, sched_why = _scheduler(md, ctx.default_scheduler)
    persistence = _affinity(spec)
    itp = _policy(spec, "internalTrafficPolicy")
    etp = _policy(spec, "externalTrafficPolicy")

    cluster_ips: list[str] = []
    raw_ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    if not isinstance(raw_ips, list):
        raise BadService("spec.clusterIPs: must be a list")
    headless = False
    for i, ip in enumerate(raw_ips):
        if ip == "None":
            headless = True
            continue
        if isinstance(ip, str) and ":" in ip:
            continue  # IPv6 family of a dual-stack service: this fabric is IPv4-only
        cluster_ips.append(_ipv4(ip, f"spec.clusterIPs[{i}]"))
    external_ips = [_ipv4(ip, f"spec.externalIPs[{i}]") for i, ip in enumerate(spec.get("externalIPs") or [])]
    lb_ips: list[str] = []
    if typ == "LoadBalancer":
        for i, ing in enumerate(((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []):
            ip = (ing or {}).get("ip")
            if ip and ":" not in ip:
                lb_ips.append(_ipv4(ip, f"status.loadBalancer.ingress[{i}].ip"))
    ranges: list[str] = []
    for i, c in enumerate(spec.get("loadBalancerSourceRanges") or []):
        try:
            ranges.append(str(ipaddress.IPv4Network(c.strip() if isinstance(c, str) else c, strict=False)))
        except (ValueError, TypeError, AttributeError):
            if isinstance(c, str) and ":" in c:
                continue
            raise BadService(f"spec.loadBalancerSourceRanges[{i}]: {c!r} is not an IPv4 CIDR") from None
    hc_port = spec.get("healthCheckNodePort")
    if hc_port is not None:
        hc_port = _port(hc_port, "spec.healthCheckNodePort")

    by_port = _endpoints_by_port(slices)
    vss: list[VirtualServer] = []
    nft: set[NftElement] = set()
    udp: set[tuple[str, int]] = set()
    why = [f"service {key} type {typ}", sched_why]
    if persistence:
        why.append(f"sessionAffinity ClientIP: persistence {persistence}s")
    local_count = 0
    for p in ports:
        eps = by_port.get((p.name, p.proto), {})
        internal = select_reals(eps, itp == "Local", ctx.node_name)
        external = select_reals(eps, etp == "Local", ctx.node_name)
        local_count += sum(1 for r in external if r.weight > 0)
        why.append(f"port {p.name or '(unnamed)'} {p.port}/{p.proto}: {len(eps)} endpoint(s) in slices, "
                   f"{sum(r.weight > 0 for r in internal)} used internally (ITP {itp}), "
                   f"{sum(r.weight > 0 for r in external)} externally (ETP {etp})")
        for r in {*internal, *external}:
            if r.weight > 0:
                nft.add(("hairpin", (r.addr, p.proto, r.port, r.addr)))

        def add(vip: str, port: int, reals: tuple[RealServer, ...], kind: str) -> None:
            vss.append(VirtualServer(p.proto, vip, port, sched, persistence, reals))
            if p.proto == "UDP":
                udp.add((vip, port))
            if kind == "cluster":
                nft.add(("cluster", (vip, p.proto, port)))
            elif etp == "Cluster":
                nft.add(("masq", (vip, p.proto, port)))
            if kind == "lb" and ranges:
                nft.add(("lbranges", (vip, p.proto, port)))
                for c in ranges:
                    nft.add(("lballow", (vip, p.proto, port, c)))

        if not headless:
            for ip in cluster_ips:
                add(ip, p.port, internal, "cluster")
        for ip in external_ips:
            add(ip, p.port, external, "external")
        for ip in lb_ips:
            add(ip, p.port, external, "lb")
        if p.node_port:
            for ip in ctx.node_port_addresses:
                add(ip, p.node_port, external, "nodeport")
    keys = [v.key for v in vss]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        proto, ip, port = sorted(dup)[0]
        raise BadService(f"spec: virtual server {ip}:{port}/{proto} asked for twice (overlapping IPs/ports)")
    addresses = frozenset(([] if headless else cluster_ips) + external_ips + lb_ips)
    if headless:
        why.append("headless (clusterIP None): no cluster virtual server")
    hc = None
    if etp == "Local" and typ == "LoadBalancer" and hc_port:
        hc = HealthCheck(hc_port, key, local_count)
        why.append(f"healthCheckNodePort {hc_port}: {local_count} local endpoint(s)")
    return ServiceState(key, tuple(sorted(vss, key=lambda v: v.key)), addresses, frozenset(nft), hc,
                        frozenset(udp), tuple(why))
