"""Golden tests: Service + EndpointSlices -> exact IPVS virtual servers, addresses, nft elements."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from fabric.config import ServiceSettings
from loadbalancer.model import build_service, select_reals, Endpoint
from loadbalancer.nft import render_delta, render_full
from loadbalancer.proxy import node_context
from loadbalancer.types import HealthCheck, NodeContext, RealServer as R, ServiceError, ServiceState, VirtualServer as VS

CTX = NodeContext("node-a", ("10.0.1.11", "192.168.5.11"), ("10.0.1.11", "192.168.5.11"), "rr", False,
                  ("10.244.0.0/16",))

READY = {"ready": True, "serving": True, "terminating": False}
TERM = {"ready": False, "serving": True, "terminating": True}
GONE = {"ready": False, "serving": False, "terminating": True}  # terminating and no longer serving
NOT_READY = {"ready": False, "serving": False, "terminating": False}


def service(typ: str = "ClusterIP", ports: list[dict] | None = None, ann: dict | None = None, status: Any = None,
            **spec: Any) -> dict:
    s: dict[str, Any] = {"metadata": {"name": "web", "namespace": "shop", "annotations": ann or {}},
                         "spec": {"type": typ, "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                                  "ports": ports if ports is not None else
                                  [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}], **spec}}
    if status is not None:
        s["status"] = status
    return s


def endpoint_slice(eps: list[tuple[str, str, dict]], ports=(("http", 8080, "TCP"),), name: str = "web-x",
                   address_type: str = "IPv4") -> dict:
    return {"metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": address_type,
            "ports": [{"name": n, "port": p, "protocol": pr} for n, p, pr in ports],
            "endpoints": [{"addresses": [ip], "nodeName": node, "conditions": cond} for ip, node, cond in eps]}


TWO = endpoint_slice([("10.244.1.5", "node-a", READY), ("10.244.2.5", "node-b", READY)])
BOTH = (R("10.244.1.5", 8080, 1), R("10.244.2.5", 8080, 1))
LOCAL = (R("10.244.1.5", 8080, 1),)


def hairpins(*reals: R, proto: str = "TCP") -> set:
    return {("hairpin", (r.addr, proto, r.port, r.addr)) for r in reals if r.weight}


def vs(addr: str, port: int, reals, proto: str = "TCP", sched: str = "rr", pers: int = 0) -> VS:
    return VS(proto, addr, port, sched, pers, tuple(reals))


CASES = [
    ("clusterip", service(), [TWO],
     [vs("10.96.0.10", 80, BOTH)], {"10.96.0.10"},
     {("cluster", ("10.96.0.10", "TCP", 80))} | hairpins(*BOTH), None),
    ("nodeport", service("NodePort", [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]), [TWO],
     [vs("10.0.1.11", 30080, BOTH), vs("10.96.0.10", 80, BOTH), vs("192.168.5.11", 30080, BOTH)], {"10.96.0.10"},
     {("cluster", ("10.96.0.10", "TCP", 80)), ("masq", ("10.0.1.11", "TCP", 30080)),
      ("masq", ("192.168.5.11", "TCP", 30080))} | hairpins(*BOTH), None),
    ("externalips udp", service(ports=[{"name": "dns", "port": 53, "protocol": "UDP"}], externalIPs=["203.0.113.7"]),
     [endpoint_slice([("10.244.1.5", "node-a", READY)], ports=(("dns", 5353, "UDP"),))],
     [vs("10.96.0.10", 53, [R("10.244.1.5", 5353)], "UDP"), vs("203.0.113.7", 53, [R("10.244.1.5", 5353)], "UDP")],
     {"10.96.0.10", "203.0.113.7"},
     {("cluster", ("10.96.0.10", "UDP", 53)), ("masq", ("203.0.113.7", "UDP", 53)),
      ("hairpin", ("10.244.1.5", "UDP", 5353, "10.244.1.5"))}, None),
    ("loadbalancer with source ranges",
     service("LoadBalancer", [{"name": "http", "port": 443, "protocol": "TCP", "nodePort": 30443}],
             loadBalancerSourceRanges=["10.10.0.0/16", " 192.168.0.0/24"],
             status={"loadBalancer": {"ingress": [{"ip": "198.51.100.9"}, {"hostname": "lb.example"}]}}),
     [endpoint_slice([("10.244.1.5", "node-a", READY)], ports=(("http", 8443, "TCP"),))],
     [vs("10.0.1.11", 30443, [R("10.244.1.5", 8443)]), vs("10.96.0.10", 443, [R("10.244.1.5", 8443)]),
      vs("192.168.5.11", 30443, [R("10.244.1.5", 8443)]), vs("198.51.100.9", 443, [R("10.244.1.5", 8443)])],
     {"10.96.0.10", "198.51.100.9"},
     {("cluster", ("10.96.0.10", "TCP", 443)), ("masq", ("10.0.1.11", "TCP", 30443)),
      ("masq", ("192.168.5.11", "TCP", 30443)), ("masq", ("198.51.100.9", "TCP", 443)),
      ("lbranges", ("198.51.100.9", "TCP", 443)), ("lballow", ("198.51.100.9", "TCP", 443, "10.10.0.0/16")),
      ("lballow", ("198.51.100.9", "TCP", 443, "192.168.0.0/24")),
      ("hairpin", ("10.244.1.5", "TCP", 8443, "10.244.1.5"))}, None),
    ("affinity default timeout", service(sessionAffinity="ClientIP"), [TWO],
     [vs("10.96.0.10", 80, BOTH, pers=10800)], {"10.96.0.10"},
     {("cluster", ("10.96.0.10", "TCP", 80))} | hairpins(*BOTH), None),
    ("affinity timeout + scheduler annotation",
     service(ann={"bgp-fabric.io/scheduler": "sh"}, sessionAffinity="ClientIP",
             sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}), [TWO],
     [vs("10.96.0.10", 80, BOTH, sched="sh", pers=60)], {"10.96.0.10"},
     {("cluster", ("10.96.0.10", "TCP", 80))} | hairpins(*BOTH), None),
    ("internalTrafficPolicy Local", service(internalTrafficPolicy="Local", externalIPs=["203.0.113.7"]), [TWO],
     [vs("10.96.0.10", 80, LOCAL), vs("203.0.113.7", 80, BOTH)], {"10.96.0.10", "203.0.113.7"},
     {("cluster", ("10.96.0.10", "TCP", 80)), ("masq", ("203.0.113.7", "TCP", 80))} | hairpins(*BOTH), None),
    ("externalTrafficPolicy Local + health check",
     service("LoadBalancer", [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}],
             externalTrafficPolicy="Local", healthCheckNodePort=32000,
             status={"loadBalancer": {"ingress": [{"ip": "198.51.100.9"}]}}), [TWO],
     [vs("10.0.1.11", 30080, LOCAL), vs("10.96.0.10", 80, BOTH), vs("192.168.5.11", 30080, LOCAL),
      vs("198.51.100.9", 80, LOCAL)], {"10.96.0.10", "198.51.100.9"},
     {("cluster", ("10.96.0.10", "TCP", 80))} | hairpins(*BOTH), HealthCheck(32000, "shop/web", 1)),
    ("ETP Local with no local endpoint: empty vs, health 0",
     service("LoadBalancer", [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}],
             externalTrafficPolicy="Local", healthCheckNodePort=32000, clusterIP="None", clusterIPs=["None"]),
     [endpoint_slice([("10.244.2.5", "node-b", READY)])],
     [vs("10.0.1.11", 30080, []), vs("192.168.5.11", 30080, [])], set(),
     {("hairpin", ("10.244.2.5", "TCP", 8080, "10.244.2.5"))}, HealthCheck(32000, "shop/web", 0)),
    ("ready + terminating: terminating drains with weight 0, non-serving terminating too", service(),
     [endpoint_slice([("10.244.1.5", "node-a", READY), ("10.244.2.5", "node-b", TERM),
                      ("10.244.3.5", "node-c", GONE), ("10.244.4.5", "node-d", NOT_READY)])],
     [vs("10.96.0.10", 80, [R("10.244.1.5", 8080, 1), R("10.244.2.5", 8080, 0), R("10.244.3.5", 8080, 0)])],
     {"10.96.0.10"}, {("cluster", ("10.96.0.10", "TCP", 80))} | hairpins(R("10.244.1.5", 8080)), None),
    ("none ready: serving+terminating ones are used", service(),
     [endpoint_slice([("10.244.2.5", "node-b", TERM), ("10.244.3.5", "node-c", GONE)])],
     [vs("10.96.0.10", 80, [R("10.244.2.5", 8080, 1), R("10.244.3.5", 8080, 0)])],
     {"10.96.0.10"}, {("cluster", ("10.96.0.10", "TCP", 80))} | hairpins(R("10.244.2.5", 8080)), None),
    ("named ports across two slices, duplicate endpoint, IPv6 slice ignored, nil conditions = ready",
     service(ports=[{"name": "http", "port": 80}, {"name": "metrics", "port": 9090}]),
     [endpoint_slice([("10.244.1.5", "node-a", {})], ports=(("http", 8080, "TCP"), ("metrics", 9100, "TCP")), name="a"),
      endpoint_slice([("10.244.1.5", "node-a", NOT_READY), ("10.244.2.5", "node-b", READY)],
                     ports=(("http", 8080, "TCP"),), name="b"),
      endpoint_slice([("fd00::5", "node-a", READY)], address_type="IPv6", name="c")],
     [vs("10.96.0.10", 80, BOTH), vs("10.96.0.10", 9090, [R("10.244.1.5", 9100)])], {"10.96.0.10"},
     {("cluster", ("10.96.0.10", "TCP", 80)), ("cluster", ("10.96.0.10", "TCP", 9090)),
      ("hairpin", ("10.244.1.5", "TCP", 9100, "10.244.1.5"))} | hairpins(*BOTH), None),
    ("headless: nothing", service(clusterIP="None", clusterIPs=["None"]), [TWO], [], set(), hairpins(*BOTH), None),
    ("sctp, no endpoints", service(ports=[{"name": "s", "port": 3868, "protocol": "SCTP"}]), [],
     [vs("10.96.0.10", 3868, [], "SCTP")], {"10.96.0.10"}, {("cluster", ("10.96.0.10", "SCTP", 3868))}, None),
]


@pytest.mark.parametrize("name, svc, slices, vss, addrs, nft, hc", CASES, ids=[c[0] for c in CASES])
def test_golden(name, svc, slices, vss, addrs, nft, hc) -> None:
    st = build_service(svc, slices, CTX)
    assert isinstance(st, ServiceState), st
    assert list(st.virtual_servers) == sorted(vss, key=lambda v: v.key)
    assert st.addresses == addrs
    assert st.nft == nft
    assert st.health_check == hc


def test_external_name_programs_nothing() -> None:
    st = build_service({"metadata": {"name": "x", "namespace": "a"}, "spec": {"type": "ExternalName",
                                                                             "externalName": "example.com"}}, [], CTX)
    assert st == ServiceState("a/x", why=("type ExternalName: nothing to program",))


def _bad(mutate) -> dict:
    s = service()
    mutate(s)
    return s


BAD = [
    ("port 0", lambda s: s["spec"]["ports"][0].update(port=0), "spec.ports[0].port: 0 is not a port (1-65535)"),
    ("port too big", lambda s: s["spec"]["ports"][0].update(port=70000), "spec.ports[0].port: 70000 is not a port"),
    ("unknown protocol", lambda s: s["spec"]["ports"][0].update(protocol="ICMP"),
     "spec.ports[0].protocol: unknown protocol 'ICMP'"),
    ("malformed cluster IP", lambda s: s["spec"].update(clusterIPs=["10.96.0.300"]),
     "spec.clusterIPs[0]: '10.96.0.300' is not an IPv4 address"),
    ("malformed external IP", lambda s: s["spec"].update(externalIPs=["nope"]),
     "spec.externalIPs[0]: 'nope' is not an IPv4 address"),
    ("duplicate ports", lambda s: s["spec"]["ports"].append({"name": "again", "port": 80, "protocol": "TCP"}),
     "spec.ports[1]: duplicate port 80/TCP"),
    ("unknown scheduler", lambda s: s["metadata"]["annotations"].update({"bgp-fabric.io/scheduler": "fastest"}),
     "metadata.annotations[bgp-fabric.io/scheduler]: unknown scheduler 'fastest'"),
    ("bad affinity", lambda s: s["spec"].update(sessionAffinity="Cookie"), "spec.sessionAffinity: 'Cookie'"),
    ("bad affinity timeout", lambda s: s["spec"].update(sessionAffinity="ClientIP", sessionAffinityConfig={
        "clientIP": {"timeoutSeconds": 0}}), "spec.sessionAffinityConfig.clientIP.timeoutSeconds: 0 is not 1-86400"),
    ("bad type", lambda s: s["spec"].update(type="Magic"), "spec.type: unknown type 'Magic'"),
    ("bad policy", lambda s: s["spec"].update(externalTrafficPolicy="Nearby"), "spec.externalTrafficPolicy: 'Nearby'"),
    ("bad source range", lambda s: s["spec"].update(loadBalancerSourceRanges=["10.0.0.0/33"]),
     "spec.loadBalancerSourceRanges[0]: '10.0.0.0/33' is not an IPv4 CIDR"),
    ("unnamed port among several", lambda s: s["spec"]["ports"].append({"port": 81}),
     "spec.ports[1].name: required when a service has several ports"),
    ("no spec", lambda s: s.pop("spec"), "spec: missing"),
    ("external IP equals cluster IP", lambda s: s["spec"].update(externalIPs=["10.96.0.10"]),
     "spec.externalIPs[0]: virtual server 10.96.0.10:80/TCP is also asked for by spec.clusterIPs[0]"),
    ("ports not a list", lambda s: s["spec"].update(ports={"port": 80}), "spec.ports: must be a list, not a mapping"),
    ("port as a string", lambda s: s["spec"]["ports"][0].update(port="80"), "spec.ports[0].port: '80' is not a port"),
    ("clusterIP not clusterIPs[0]", lambda s: s["spec"].update(clusterIP="10.96.0.11"),
     "spec.clusterIP: '10.96.0.11' is not spec.clusterIPs[0] ('10.96.0.10')"),
    ("annotations a list", lambda s: s["metadata"].update(annotations=["x"]),
     "metadata.annotations: must be a mapping, not a list"),
    ("ingress entry a string", lambda s: s.update(status={"loadBalancer": {"ingress": ["1.2.3.4"]}}),
     "status.loadBalancer.ingress[0]: must be a mapping, not a string '1.2.3.4'"),
]


@pytest.mark.parametrize("name, mutate, reason", BAD, ids=[b[0] for b in BAD])
def test_bad_service_is_one_error(name, mutate, reason) -> None:
    r = build_service(_bad(mutate), [TWO], CTX)
    assert isinstance(r, ServiceError) and r.key == "shop/web"
    assert r.reason.startswith(reason), r.reason


def test_bad_slice_entries_are_skipped_not_fatal() -> None:
    sl = endpoint_slice([("10.244.1.5", "node-a", READY)])
    sl["endpoints"] += [{"addresses": ["not-an-ip"]}, "junk", {"addresses": ["10.244.9.9"], "conditions": READY}]
    sl["ports"].append({"name": "http", "port": 0})
    sl["endpoints"].append({"addresses": ["10.244.9.8"], "conditions": {"ready": "false"}})  # a string is no boolean
    other = endpoint_slice([("10.244.7.7", "node-a", READY)], name="web-y")
    other["endpoints"] = {"addresses": ["10.244.7.7"]}
    st = build_service(service(), [sl, other], CTX)
    assert isinstance(st, ServiceState)
    assert st.virtual_servers[0].reals == (R("10.244.1.5", 8080), R("10.244.9.9", 8080))
    assert st.warnings == (
        "EndpointSlice shop/web-x: endpoints[1].addresses[0]: 'not-an-ip' is not an IPv4 address; the address skipped",
        "EndpointSlice shop/web-x: endpoints[2]: must be a mapping, not a string 'junk'; the endpoint skipped",
        "EndpointSlice shop/web-x: endpoints[4].conditions.ready: must be true or false, not 'false'; the endpoint skipped",
        "EndpointSlice shop/web-x: ports[1].port: 0 is not a port (1-65535); the port skipped",
        "EndpointSlice shop/web-y: endpoints: must be a list, not a mapping; the slice skipped")


def test_model_does_not_mutate_inputs() -> None:
    svc, sl = service("NodePort", [{"name": "http", "port": 80, "nodePort": 30080}]), copy.deepcopy(TWO)
    before = (copy.deepcopy(svc), copy.deepcopy(sl))
    build_service(svc, [sl], CTX)
    assert (svc, sl) == before


def test_node_port_addresses_filter() -> None:
    ctx = node_context(ServiceSettings(node_port_addresses=["192.168.5.0/24"]), "n", ["10.0.1.11/24", "192.168.5.11"])
    assert ctx.node_port_addresses == ("192.168.5.11",)
    assert node_context(ServiceSettings(), "n", ["10.0.1.11"]).node_port_addresses == ("10.0.1.11",)


def test_select_reals_local_fallback_is_per_node() -> None:
    eps = {("10.0.0.1", 80): Endpoint("10.0.0.1", "a", False, True, True),
           ("10.0.0.2", 80): Endpoint("10.0.0.2", "b", True, True, False)}
    # locally only a terminating one: it serves (kube-proxy falls back per traffic policy)
    assert select_reals(eps, True, "a") == (R("10.0.0.1", 80, 1),)
    assert select_reals(eps, False, "a") == (R("10.0.0.1", 80, 0), R("10.0.0.2", 80, 1))


def test_nft_render_full_and_delta() -> None:
    els = {("masq", ("10.0.1.11", "TCP", 30080)), ("cluster", ("10.96.0.10", "UDP", 53)),
           ("lballow", ("198.51.100.9", "TCP", 443, "10.10.0.0/16"))}
    text = render_full(els, cluster_cidrs=["10.244.0.0/16"], node_addresses=["10.0.1.11"])
    assert text.startswith("table inet bgp-fabric\ndelete table inet bgp-fabric\n")  # atomic replace
    assert "elements = { 10.0.1.11 . tcp . 30080 }" in text
    assert "elements = { 198.51.100.9 . tcp . 443 . 10.10.0.0/16 }" in text
    assert "@cluster ip saddr != @clustercidrs meta mark set meta mark | 0x4000" in text
    assert "masquerade" in text and "iptables" not in text
    assert render_delta({("masq", ("1.2.3.4", "SCTP", 1))}, {("cluster", ("10.96.0.10", "UDP", 53))}) == (
        "delete element inet bgp-fabric cluster { 10.96.0.10 . udp . 53 }\n"
        "add element inet bgp-fabric masq { 1.2.3.4 . sctp . 1 }\n")
    assert render_delta(set(), set()) == ""
    all_masq = render_full(els, masquerade_all=True)
    assert "@cluster meta mark set" in all_masq and "clustercidrs meta mark" not in all_masq
