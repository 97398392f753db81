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
    md = svc.get("metadata") if isinstance(svc, dict) else None
    md = md if isinstance(md, dict) else {}
    return f"{md.get('namespace') or 'default'}/{md.get('name')}"


def slice_service_key(sl: Any) -> tuple[str | None, str | None]:
    """(the "ns/name" of the Service an EndpointSlice belongs to (its service-name label), None) or
    (None, why the slice can't belong to one). A slice without the label is nobody's: (None, None)."""
    if not isinstance(sl, dict):
        return None, "not a mapping"
    md = sl.get("metadata")
    if md is None:
        return None, None
    if not isinstance(md, dict):
        return None, f"metadata: must be a mapping, not {_desc(md)}"
    labels = md.get("labels")
    if labels is None:
        return None, None
    if not isinstance(labels, dict):
        return None, f"metadata.labels: must be a mapping, not {_desc(labels)}"
    name = labels.get(SERVICE_NAME_LABEL)
    if name is None:
        return None, None
    if not isinstance(name, str) or not name:
        return None, f"metadata.labels[{SERVICE_NAME_LABEL}]: {name!r} is not a service name"
    ns = md.get("namespace")
    if ns is not None and not isinstance(ns, str):
        return None, f"metadata.namespace: must be a string, not {_desc(ns)}"
    if not isinstance(md.get("name"), str) or not md.get("name"):
        return None, f"metadata.name: {md.get('name')!r} is not a name"
    return f"{ns or 'default'}/{name}", None


def _kind(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _desc(v: Any) -> str:
    """"a list", "a string 'x'": what a wrong value is, short enough for one status line."""
    return _kind(v) if isinstance(v, (dict, list)) else f"{_kind(v)} {v!r}"[:80]


def _typed(v: Any, typ: type, field: str, what: str) -> Any:
    """v, when it is of `typ` (null: None); else the error names the field and what it must be."""
    if v is None:
        return None
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise BadService(f"{field}: must be {what}, not {_desc(v)}")
    return v


def _map(d: dict, key: str, field: str) -> dict:
    return _typed(d.get(key), dict, field, "a mapping") or {}


def _list(d: dict, key: str, field: str) -> list:
    return _typed(d.get(key), list, field, "a list") or []


def _str(d: dict, key: str, field: str) -> str | None:
    return _typed(d.get(key), str, field, "a string")


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


def _is_v6(v: Any) -> bool:
    """An IPv6 address of a dual-stack service: this fabric is IPv4-only and leaves that family alone."""
    return isinstance(v, str) and ":" in v


def _port(v: Any, field: str, allow_zero: bool = False) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not ((0 if allow_zero else 1) <= v <= 65535):
        raise BadService(f"{field}: {v!r} is not a port (1-65535)")
    return v


def _ports(spec: dict[str, Any], typ: str) -> list[PortSpec]:
    raw = _list(spec, "ports", "spec.ports")
    out: list[PortSpec] = []
    seen: set[tuple[str, int]] = set()
    names: set[str] = set()
    for i, p in enumerate(raw):
        f = f"spec.ports[{i}]"
        if not isinstance(p, dict):
            raise BadService(f"{f}: must be a mapping")
        proto = p.get("protocol")
        if proto is None:
            proto = "TCP"
        if not isinstance(proto, str) or proto not in PROTOCOLS:
            raise BadService(f"{f}.protocol: unknown protocol {proto!r} (TCP, UDP or SCTP)")
        port = _port(p.get("port"), f"{f}.port")
        if (proto, port) in seen:
            raise BadService(f"{f}: duplicate port {port}/{proto}")
        seen.add((proto, port))
        name = _str(p, "name", f"{f}.name") or ""
        if len(raw) > 1 and not name:
            raise BadService(f"{f}.name: required when a service has several ports")
        if name in names and name:
            # the same name is allowed for TCP+UDP of one port number (DNS), not otherwise
            if not any(q.name == name and q.port == port for q in out):
                raise BadService(f"{f}.name: duplicate port name {name!r}")
        names.add(name)
        node_port = p.get("nodePort")
        node_port = 0 if node_port is None else _port(node_port, f"{f}.nodePort", allow_zero=True)
        out.append(PortSpec(name, proto, port, node_port if typ in ("NodePort", "LoadBalancer") else 0))
    return out


def _scheduler(md: dict[str, Any], default: str) -> tuple[str, str]:
    ann = _map(md, "annotations", "metadata.annotations")
    for a in SCHEDULER_ANNOTATIONS:
        if a in ann:
            v = ann[a]
            if not isinstance(v, str) or v not in SCHEDULERS:
                raise BadService(f"metadata.annotations[{a}]: unknown scheduler {v!r} "
                                 f"(one of {', '.join(sorted(SCHEDULERS))})")
            return v, f"scheduler {v} from annotation {a}"
    return default, f"scheduler {default} (default from config)"


def _affinity(spec: dict[str, Any]) -> int:
    aff = spec.get("sessionAffinity")
    if aff is None or aff == "None":
        _map(spec, "sessionAffinityConfig", "spec.sessionAffinityConfig")
        return 0
    if aff != "ClientIP":
        raise BadService(f"spec.sessionAffinity: {aff!r} is not None or ClientIP")
    cfg = _map(_map(spec, "sessionAffinityConfig", "spec.sessionAffinityConfig"), "clientIP",
               "spec.sessionAffinityConfig.clientIP")
    t = cfg.get("timeoutSeconds")
    t = DEFAULT_AFFINITY_TIMEOUT if t is None else t
    if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= 86400:
        raise BadService(f"spec.sessionAffinityConfig.clientIP.timeoutSeconds: {t!r} is not 1-86400")
    return t


def _policy(spec: dict[str, Any], field: str) -> str:
    v = spec.get(field)
    if v is None:
        return "Cluster"
    if v not in ("Cluster", "Local"):
        raise BadService(f"spec.{field}: {v!r} is not Cluster or Local")
    return v


def _slice_name(sl: dict[str, Any]) -> str:
    md = sl.get("metadata") if isinstance(sl.get("metadata"), dict) else {}
    return f"EndpointSlice {md.get('namespace') or 'default'}/{md.get('name')}"


def _endpoints_by_port(slices: list[dict[str, Any]], warnings: list[str]
                       ) -> dict[tuple[str, str], dict[tuple[str, int], Endpoint]]:
    """(port name, proto) -> {(ip, port): Endpoint} over all IPv4 slices. A malformed slice, slice port or
    endpoint is skipped (the rest used) with one warning naming the slice and the field."""
    out: dict[tuple[str, str], dict[tuple[str, int], Endpoint]] = {}
    for sl in sorted(slices, key=_slice_name):
        name = _slice_name(sl)

        def skip(field: str, why: str, what: str) -> None:
            warnings.append(f"{name}: {field}: {why}; {what} skipped")

        at = sl.get("addressType")
        if at in ("IPv6", "FQDN"):
            continue  # other families: not this fabric's
        if at != "IPv4":
            skip("addressType", "missing" if at is None else f"{at!r} is not IPv4, IPv6 or FQDN", "the slice")
            continue
        ports, eps = sl.get("ports"), sl.get("endpoints")
        if not isinstance(ports, (list, type(None))) or not isinstance(eps, (list, type(None))):
            bad = "ports" if not isinstance(ports, (list, type(None))) else "endpoints"
            skip(bad, f"must be a list, not {_desc(sl.get(bad))}", "the slice")
            continue
        good_eps: list[tuple[str, Endpoint]] = []
        for j, ep in enumerate(eps or []):
            f = f"endpoints[{j}]"
            if not isinstance(ep, dict):
                skip(f, f"must be a mapping, not {_desc(ep)}", "the endpoint")
                continue
            cond = ep.get("conditions")
            if not isinstance(cond, (dict, type(None))):
                skip(f"{f}.conditions", f"must be a mapping, not {_desc(cond)}", "the endpoint")
                continue
            cond = cond or {}
            flags = {c: cond.get(c) for c in ("ready", "serving", "terminating")}
            badc = next((c for c, v in flags.items() if v is not None and not isinstance(v, bool)), None)
            if badc:
                skip(f"{f}.conditions.{badc}", f"must be true or false, not {flags[badc]!r}", "the endpoint")
                continue
            node = ep.get("nodeName")
            if not isinstance(node, (str, type(None))):
                skip(f"{f}.nodeName", f"must be a string, not {_desc(node)}", "the endpoint")
                continue
            addrs = ep.get("addresses")
            if not isinstance(addrs, list) or not addrs:
                skip(f"{f}.addresses", "must be a list of addresses" if not isinstance(addrs, list)
                     else "is empty", "the endpoint")
                continue
            ready = flags["ready"] is not False  # nil means ready (API contract)
            serving = (ready if flags["serving"] is None else flags["serving"])
            terminating = flags["terminating"] is True
            for k, a in enumerate(addrs):
                ip = ipv4_or_none(a)
                if ip is None:
                    skip(f"{f}.addresses[{k}]", f"{a!r} is not an IPv4 address", "the address")
                    continue
                good_eps.append((ip, Endpoint(ip, node, ready, serving, terminating)))
        for i, p in enumerate(ports or []):
            f = f"ports[{i}]"
            if not isinstance(p, dict):
                skip(f, f"must be a mapping, not {_desc(p)}", "the port")
                continue
            port, pname, proto = p.get("port"), p.get("name"), p.get("protocol")
            proto = "TCP" if proto is None else proto
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                skip(f"{f}.port", f"{port!r} is not a port (1-65535)", "the port")
                continue
            if not isinstance(pname, (str, type(None))):
                skip(f"{f}.name", f"must be a string, not {_desc(pname)}", "the port")
                continue
            if not isinstance(proto, str) or proto not in PROTOCOLS:
                skip(f"{f}.protocol", f"unknown protocol {proto!r}", "the port")
                continue
            bucket = out.setdefault((pname or "", proto), {})
            for ip, e in good_eps:
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
    """Never raises for malformed input: the first problem found becomes the ServiceError's reason."""
    key = service_key(svc)
    try:
        if not isinstance(svc, dict):
            raise BadService(f"(object): must be a mapping, not {_desc(svc)}")
        return _build(key, svc, slices, ctx)
    except BadService as e:
        return ServiceError(key, str(e))


def _build(key: str, svc: dict[str, Any], slices: list[dict[str, Any]], ctx: NodeContext) -> ServiceState:
    md = _map(svc, "metadata", "metadata")
    if not isinstance(md.get("name"), str) or not md.get("name"):
        raise BadService("metadata.name: missing" if md.get("name") is None
                         else f"metadata.name: {md.get('name')!r} is not a name")
    _str(md, "namespace", "metadata.namespace")
    spec = svc.get("spec")
    if not isinstance(spec, dict):
        raise BadService("spec: missing" if spec is None else f"spec: must be a mapping, not {_desc(spec)}")
    typ = spec.get("type")
    typ = "ClusterIP" if typ is None else typ
    if not isinstance(typ, str) or typ not in SERVICE_TYPES:
        raise BadService(f"spec.type: unknown type {typ!r}")
    if typ == "ExternalName":
        return ServiceState(key, why=("type ExternalName: nothing to program",))
    ports = _ports(spec, typ)
    sched, sched_why = _scheduler(md, ctx.default_scheduler)
    persistence = _affinity(spec)
    itp = _policy(spec, "internalTrafficPolicy")
    etp = _policy(spec, "externalTrafficPolicy")

    # clusterIPs (dual-stack) wins; clusterIP, when set, must be its first entry (the API keeps them so)
    single = _str(spec, "clusterIP", "spec.clusterIP")
    raw_ips = _list(spec, "clusterIPs", "spec.clusterIPs")
    ip_field = "spec.clusterIPs" if raw_ips else "spec.clusterIP"
    cluster_ips: list[tuple[str, str]] = []
    headless = False
    for i, ip in enumerate(raw_ips or ([single] if single else [])):
        f = f"{ip_field}[{i}]" if raw_ips else ip_field
        if ip == "None":
            headless = True
        elif not _is_v6(ip):
            cluster_ips.append((_ipv4(ip, f), f))
    if raw_ips and single and raw_ips[0] != single:
        raise BadService(f"spec.clusterIP: {single!r} is not spec.clusterIPs[0] ({raw_ips[0]!r})")
    external_ips = [(_ipv4(ip, f"spec.externalIPs[{i}]"), f"spec.externalIPs[{i}]")
                    for i, ip in enumerate(_list(spec, "externalIPs", "spec.externalIPs")) if not _is_v6(ip)]
    lb_ips: list[tuple[str, str]] = []
    ingress = _list(_map(_map(svc, "status", "status"), "loadBalancer", "status.loadBalancer"), "ingress",
                    "status.loadBalancer.ingress")
    for i, ing in enumerate(ingress):
        f = f"status.loadBalancer.ingress[{i}]"
        ip = _str(_typed(ing, dict, f, "a mapping") or {}, "ip", f"{f}.ip")
        if typ == "LoadBalancer" and ip and not _is_v6(ip):
            lb_ips.append((_ipv4(ip, f"{f}.ip"), f"{f}.ip"))
    ranges: list[str] = []
    for i, c in enumerate(_list(spec, "loadBalancerSourceRanges", "spec.loadBalancerSourceRanges")):
        if _is_v6(c):
            continue
        try:
            if not isinstance(c, str):
                raise TypeError
            ranges.append(str(ipaddress.IPv4Network(c.strip(), strict=False)))
        except (ValueError, TypeError):
            raise BadService(f"spec.loadBalancerSourceRanges[{i}]: {c!r} is not an IPv4 CIDR") from None
    hc_port = spec.get("healthCheckNodePort")
    if hc_port is not None:
        hc_port = _port(hc_port, "spec.healthCheckNodePort", allow_zero=True)

    warnings: list[str] = []
    by_port = _endpoints_by_port(slices, warnings)
    vss: list[VirtualServer] = []
    origin: dict[tuple[str, str, int], str] = {}  # virtual server -> the field asking for it
    nft: set[NftElement] = set()
    udp: set[tuple[str, int]] = set()
    why = [f"service {key} type {typ}", sched_why]
    if persistence:
        why.append(f"sessionAffinity ClientIP: persistence {persistence}s")
    local_count = 0
    for i, p in enumerate(ports):
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

        def add(vip: str, port: int, reals: tuple[RealServer, ...], kind: str, field: str) -> None:
            vk = (p.proto, vip, port)
            if vk in origin:
                raise BadService(f"{field}: virtual server {vip}:{port}/{p.proto} is also asked for by {origin[vk]} "
                                 "(overlapping IPs/ports)")
            origin[vk] = field
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
            for ip, f in cluster_ips:
                add(ip, p.port, internal, "cluster", f)
        for ip, f in external_ips:
            add(ip, p.port, external, "external", f)
        for ip, f in lb_ips:
            add(ip, p.port, external, "lb", f)
        if p.node_port:
            for ip in ctx.node_port_addresses:
                add(ip, p.node_port, external, "nodeport", f"spec.ports[{i}].nodePort")
    addresses = frozenset(ip for ip, _ in ([] if headless else cluster_ips) + external_ips + lb_ips)
    if headless:
        why.append("headless (clusterIP None): no cluster virtual server")
    hc = None
    if etp == "Local" and typ == "LoadBalancer" and hc_port:
        hc = HealthCheck(hc_port, key, local_count)
        why.append(f"healthCheckNodePort {hc_port}: {local_count} local endpoint(s)")
    why += [f"warning: {w}" for w in warnings]
    return ServiceState(key, tuple(sorted(vss, key=lambda v: v.key)), addresses, frozenset(nft), hc,
                        frozenset(udp), tuple(why), tuple(warnings))
