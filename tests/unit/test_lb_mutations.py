"""Finding 7 (proxy side): one malformed Service or EndpointSlice field never raises out of a plan.

Valid Services and EndpointSlices covering every feature the proxy reads are mutated one field at a
time (wrong types, out-of-range and huge numbers, bad addresses, unknown protocols, removed keys,
duplicated list entries). For each mutation the proxy plans and applies against the fake kernel:
- nothing raises;
- the mutated object's problem is reported with a reason naming the field (a skipped Service, a
  skipped slice, or a warning about a skipped slice entry);
- every other service stays programmed exactly as before;
- a field the proxy reads, given a value of another type, is never silently taken as valid.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import pytest

from fabric.config import ServiceSettings
from fabric.tracker import Store, same
from loadbalancer.model import build_service
from loadbalancer.proxy import ServiceProxy, node_context
from tests.unit.lbfake import FakeKernel

READY = {"ready": True, "serving": True, "terminating": False}
TERM = {"ready": False, "serving": True, "terminating": True}


def _svc(name: str, spec: dict, **extra: Any) -> dict:
    return {"metadata": {"name": name, "namespace": "shop", "uid": f"u-{name}"}, "spec": spec, **extra}


def _slice(name: str, svc: str, ports: list[dict], endpoints: list[dict], **extra: Any) -> dict:
    return {"metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "ports": ports, "endpoints": endpoints, **extra}


def _ep(ip: str, node: str, cond: dict, **extra: Any) -> dict:
    return {"addresses": [ip], "nodeName": node, "conditions": dict(cond), **extra}


SERVICES = {
    "web": _svc("web", {
        "type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
                  {"name": "dns", "port": 53, "protocol": "UDP"}],
        "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
        "internalTrafficPolicy": "Cluster"}),
    "np": _svc("np", {
        "type": "NodePort", "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00::20"],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}],
        "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local"}),
    "lb": _svc("lb", {
        "type": "LoadBalancer", "clusterIP": "10.96.0.30", "externalIPs": ["203.0.113.30"],
        "ports": [{"name": "https", "port": 443, "protocol": "TCP", "nodePort": 30443}],
        "loadBalancerSourceRanges": ["10.10.0.0/16", "192.168.0.0/24"], "externalTrafficPolicy": "Local",
        "healthCheckNodePort": 32000},
        status={"loadBalancer": {"ingress": [{"ip": "198.51.100.30"}, {"hostname": "lb.example"}]}}),
    "sticky": {**_svc("sticky", {
        "clusterIP": "10.96.0.40", "ports": [{"name": "sctp", "port": 9000, "protocol": "SCTP"}],
        "trafficDistribution": "PreferClose"}),
        "metadata": {"name": "sticky", "namespace": "shop", "annotations": {"bgp-fabric.io/scheduler": "sh"}}},
    "headless": _svc("headless", {"clusterIP": "None", "ports": [{"port": 5432}]}),
    "ext": _svc("ext", {"type": "ExternalName", "externalName": "db.example"}),
}

SLICES = {
    "web-a": _slice("web-a", "web", [{"name": "http", "port": 8080, "protocol": "TCP"},
                                     {"name": "dns", "port": 5353, "protocol": "UDP"}],
                    [_ep("10.244.1.5", "node-a", READY, zone="z1", hints={"forZones": [{"name": "z1"}]}),
                     _ep("10.244.2.5", "node-b", TERM)]),
    "web-b": _slice("web-b", "web", [{"name": "http", "port": 8080, "protocol": "TCP"}],
                    [_ep("10.244.3.5", "node-c", {"ready": True}), _ep("10.244.1.5", "node-a", {"ready": False})]),
    "np-a": _slice("np-a", "np", [{"name": "http", "port": 8080, "protocol": "TCP"}],
                   [_ep("10.244.1.6", "node-a", READY), _ep("10.244.2.6", "node-b", READY)]),
    "lb-a": _slice("lb-a", "lb", [{"name": "https", "port": 8443, "protocol": "TCP"}],
                   [_ep("10.244.1.7", "node-a", READY), _ep("10.244.2.7", "node-b", TERM)]),
    "sticky-a": _slice("sticky-a", "sticky", [{"name": "sctp", "port": 9000, "protocol": "SCTP"}],
                       [_ep("10.244.1.8", "node-a", READY), _ep("10.244.2.8", "node-b", TERM)]),
    "np-v6": {**_slice("np-v6", "np", [{"name": "http", "port": 8080, "protocol": "TCP"}],
                       [_ep("fd00::6", "node-a", READY)]), "addressType": "IPv6"},
}

BAD_VALUES: list[Any] = [None, True, False, 0, -1, 65536, 2**64, 1.5, "", "x", "80", "999.1.1.1", "fd00::1",
                         "10.0.0.0/33", "TCPX", [], ["x"], [None], {}, {"x": 1}]


def _seg(key: Any) -> str:
    return f".{key}" if isinstance(key, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else f"[{key}]"


def _paths(obj: Any, path: str = "") -> Iterator[tuple[str, tuple]]:
    """(printable path, key tuple) for every node below obj."""
    if isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, list):
        items = list(enumerate(obj))
    else:
        return
    for key, val in items:
        p = (path + _seg(key)).lstrip(".")
        yield p, (key,)
        for sub, keys in _paths(val, p):
            yield sub, (key, *keys)


def _get(obj: Any, keys: tuple) -> Any:
    for k in keys:
        obj = obj[k]
    return obj


def mutations(obj: dict) -> Iterator[tuple[str, str, dict]]:
    """(path, description, mutated copy): each bad value in place of each node, each key removed,
    each list with its first entry duplicated."""
    for path, keys in _paths(obj):
        parent_keys, last = keys[:-1], keys[-1]
        for bad in BAD_VALUES:
            m = copy.deepcopy(obj)
            _get(m, parent_keys)[last] = copy.deepcopy(bad)
            yield path, f"{path} = {bad!r}", m
        if isinstance(last, str):
            m = copy.deepcopy(obj)
            del _get(m, parent_keys)[last]
            yield path, f"del {path}", m
        val = _get(obj, keys)
        if isinstance(val, list) and val:
            m = copy.deepcopy(obj)
            _get(m, keys).append(copy.deepcopy(val[0]))
            yield path, f"{path} += {path}[0]", m


# Fields the proxy reads, with the JSON type a valid value has. A mutation giving one of them a value
# of another type (None and removal mean "unset" and may be valid) must be reported, never taken.
SERVICE_READS = {
    r"metadata": dict, r"metadata\.name": str, r"metadata\.namespace": str, r"metadata\.annotations": dict,
    r"metadata\.annotations\[bgp-fabric\.io/scheduler\]": str, r"spec": dict, r"spec\.type": str,
    r"spec\.clusterIPs?": (str, list), r"spec\.clusterIPs\[\d+\]": str, r"spec\.externalIPs": list,
    r"spec\.externalIPs\[\d+\]": str, r"spec\.ports": list, r"spec\.ports\[\d+\]": dict,
    r"spec\.ports\[\d+\]\.(name|protocol)": str, r"spec\.ports\[\d+\]\.(port|nodePort)": int,
    r"spec\.sessionAffinity": str, r"spec\.sessionAffinityConfig": dict,
    r"spec\.sessionAffinityConfig\.clientIP": dict, r"spec\.sessionAffinityConfig\.clientIP\.timeoutSeconds": int,
    r"spec\.(internal|external)TrafficPolicy": str, r"spec\.loadBalancerSourceRanges": list,
    r"spec\.loadBalancerSourceRanges\[\d+\]": str, r"spec\.healthCheckNodePort": int, r"status": dict,
    r"status\.loadBalancer": dict, r"status\.loadBalancer\.ingress": list, r"status\.loadBalancer\.ingress\[\d+\]": dict,
    r"status\.loadBalancer\.ingress\[\d+\]\.ip": str,
}
SLICE_READS = {
    r"metadata": dict, r"metadata\.name": str, r"metadata\.namespace": str, r"metadata\.labels": dict,
    r"metadata\.labels\[kubernetes\.io/service-name\]": str, r"addressType": str, r"ports": list,
    r"ports\[\d+\]": dict, r"ports\[\d+\]\.(name|protocol)": str, r"ports\[\d+\]\.port": int, r"endpoints": list,
    r"endpoints\[\d+\]": dict, r"endpoints\[\d+\]\.addresses": list, r"endpoints\[\d+\]\.addresses\[\d+\]": str,
    r"endpoints\[\d+\]\.nodeName": str, r"endpoints\[\d+\]\.conditions": dict,
    r"endpoints\[\d+\]\.conditions\.(ready|serving|terminating)": bool,
}


def _json_type(v: Any) -> type:
    return bool if isinstance(v, bool) else int if isinstance(v, int) else type(v)


def must_report(reads: dict, path: str, bad: Any, orig: Any) -> bool:
    """A read field got a value of a type that no valid value of it has."""
    if bad is None:
        return False
    for pattern, types in reads.items():
        if re.fullmatch(pattern, path):
            types = types if isinstance(types, tuple) else (types,)
            return _json_type(bad) not in types and _json_type(orig) in types
    return False


def names_field(text: str, path: str) -> bool:
    """`text` names the mutated path, a field inside it, or the field holding it (not a bare top level)."""
    if re.search(re.escape(path) + r"($|[.\[: ])", text):
        return True
    parts = re.findall(r"[^.\[\]]+|\[[^\]]*\]", path)
    for n in range(len(parts) - 1, 1, -1):
        anc = "".join(p if p.startswith("[") else "." + p for p in parts[:n]).lstrip(".")
        if re.search(re.escape(anc) + r"($|[.\[: ])", text):
            return True
    return False


@pytest.fixture(scope="module")
def world():
    store = Store()
    for name, s in SERVICES.items():
        store.upsert("Service", f"shop/{name}", copy.deepcopy(s))
    for name, sl in SLICES.items():
        store.upsert("EndpointSlice", f"shop/{name}", copy.deepcopy(sl))
    proxy = ServiceProxy(ServiceSettings(), "node-a", ["10.0.1.11"])
    fake = FakeKernel()
    proxy._kernel = fake  # type: ignore[assignment]
    res = proxy.apply(proxy.plan(store, store.take()))
    assert res.ok and not proxy.errors() and not proxy.warnings(), (str(res), proxy.errors(), proxy.warnings())
    assert len(proxy.desired()) == 9
    return store, proxy, fake


def _report(proxy: ServiceProxy, svc_key: str | None) -> str:
    parts = [proxy.errors().get(svc_key, "")] if svc_key else []
    for ws in proxy.warnings().values():
        parts += ws
    parts += proxy.slice_errors().values()
    return "\n".join(parts)


def _run(world, kind: str, key: str, obj: dict, base_kernel: dict, cases: list) -> list[str]:
    store, proxy, fake = world
    reads = SERVICE_READS if kind == "Service" else SLICE_READS
    if kind == "EndpointSlice" and obj.get("addressType") != "IPv4":
        reads = {p: t for p, t in reads.items() if p.startswith(("metadata", "addressType"))}  # the rest is unread
    mine = _slice_service(key) if kind == "EndpointSlice" else key
    others = {vk: v["kernel"] for vk, v in base_kernel.items() if v["svc"] != mine}
    problems: list[str] = []
    for i, (path, what, m) in enumerate(mutations(obj)):
        if same(m, obj):
            continue  # no change at all (the tracker compares with types: 0 -> False is a change)
        cases.append(what)
        try:
            store.upsert(kind, key, m)
            if i % 40 == 0:  # now and then through the full (kernel dump) path as well
                store.request_full()
            proxy.apply(proxy.plan(store, store.take()))
        except Exception as e:  # noqa: BLE001 - the property under test
            problems.append(f"{kind} {key}: {what}: raised {e.__class__.__name__}: {e}")
        else:
            if {vk: fake.vs.get(vk) for vk in others} != others:
                problems.append(f"{kind} {key}: {what}: another service's virtual servers changed")
            text = _report(proxy, key if kind == "Service" else None)
            if text and not names_field(text, path):
                problems.append(f"{kind} {key}: {what}: reported without naming {path}: {text!r}")
            changed = not what.startswith("del ") and "+=" not in what
            if not text and changed and must_report(reads, path, _get(m, _keys_of(obj, path)),
                                                    _get(obj, _keys_of(obj, path))):
                problems.append(f"{kind} {key}: {what}: a wrong type was taken silently")
        store.upsert(kind, key, copy.deepcopy(obj))
        proxy.apply(proxy.plan(store, store.take()))
    return problems


def _keys_of(obj: dict, path: str) -> tuple:
    for p, keys in _paths(obj):
        if p == path:
            return keys
    raise KeyError(path)


def _slice_service(key: str) -> str:
    return f"shop/{SLICES[key.split('/')[1]]['metadata']['labels']['kubernetes.io/service-name']}"


def _kernel_by_service(proxy: ServiceProxy, fake: FakeKernel) -> dict:
    return {vk: {"svc": proxy._vs_owner[vk], "kernel": copy.deepcopy(v)} for vk, v in fake.vs.items()}


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_mutations_never_raise_and_name_the_field(world, name: str) -> None:
    store, proxy, fake = world
    base = _kernel_by_service(proxy, fake)
    cases: list[str] = []
    problems = _run(world, "Service", f"shop/{name}", SERVICES[name], base, cases)
    assert not problems, f"{len(problems)} of {len(cases)} mutations:\n" + "\n".join(problems[:40])
    assert len(cases) > 50
    assert {vk: v["kernel"] for vk, v in _kernel_by_service(proxy, fake).items()} == \
        {vk: v["kernel"] for vk, v in base.items()}  # everything restored


@pytest.mark.parametrize("name", sorted(SLICES))
def test_slice_mutations_never_raise_and_name_the_field(world, name: str) -> None:
    store, proxy, fake = world
    base = _kernel_by_service(proxy, fake)
    cases: list[str] = []
    problems = _run(world, "EndpointSlice", f"shop/{name}", SLICES[name], base, cases)
    assert not problems, f"{len(problems)} of {len(cases)} mutations:\n" + "\n".join(problems[:40])
    assert len(cases) > 50


def test_model_alone_never_raises() -> None:
    """The pure model: every mutation of every service, with all slices, returns a state or an error."""
    ctx = node_context(ServiceSettings(), "node-a", ["10.0.1.11"])
    slices = list(SLICES.values())
    n = 0
    for s in SERVICES.values():
        for _path, what, m in mutations(s):
            build_service(m, slices, ctx)
            n += 1
        for sl in slices:
            for _path, what, m in mutations(sl):
                build_service(s, [m], ctx)
                n += 1
    assert n > 3000


def test_service_announcements_never_raise() -> None:
    """fabric.bgp_desired reads Services and slices too (ETP Local /32s to external peers): a malformed
    field is read as absent there (the proxy reports it); the other services' announcements stay."""
    from fabric import config as cfgmod
    from fabric.bgp_desired import desired_neighbors, service_announcements

    cfg = cfgmod.parse({"node": {"name": "node-a", "address": "10.0.1.11/24", "podCIDRs": ["10.244.1.0/24"]},
                        "pools": [{"cidr": "10.244.0.0/16"}], "source": {"kind": "file", "path": "c.yaml"},
                        "peers": [{"name": "tor", "address": "10.0.1.1", "asn": 65000}],
                        "advertise": {"serviceExternalIPs": ["203.0.113.0/24"],
                                      "serviceLoadBalancerIPs": ["198.51.100.0/24"]}})
    neighbors, _ = desired_neighbors(cfg, {})
    services = {f"shop/{n}": s for n, s in SERVICES.items()}
    slices = {f"shop/{n}": s for n, s in SLICES.items()}
    base = service_announcements(cfg, services, slices, neighbors)
    assert sorted(map(str, base)) == ["198.51.100.30/32", "203.0.113.30/32"]  # lb: ETP Local, a local endpoint
    n = 0
    for name, obj in [*SERVICES.items(), *SLICES.items()]:
        kind = "svc" if name in SERVICES else "slice"
        for _path, what, m in mutations(obj):
            got = service_announcements(cfg, {**services, f"shop/{name}": m} if kind == "svc" else services,
                                        {**slices, f"shop/{name}": m} if kind == "slice" else slices, neighbors)
            n += 1
            if name not in ("lb", "lb-a"):
                assert got == base, what
    assert n > 5000
