"""`fabric explain SERVICE | VIP[:port]` (the service model's own decisions, per endpoint) and `explain
PREFIX` with one verdict per source of the prefix."""

from __future__ import annotations

import json
from ipaddress import IPv4Address as A, IPv4Network as N
from pathlib import Path

import pytest
import yaml

from fabric import cli, plan
from ipip.model import NextHop, Route
from loadbalancer.explain import endpoint_verdicts, explain_service, find
from loadbalancer.model import Endpoint
from loadbalancer.types import NodeContext

CTX = NodeContext("node-a1", ("10.0.1.11",), ("10.0.1.11",), "rr", False, ("10.244.0.0/16",))
WEB = {"metadata": {"name": "web", "namespace": "default",
                    "annotations": {"bgp-fabric.io/scheduler": "sh"}},
       "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "externalTrafficPolicy": "Local",
                "sessionAffinity": "ClientIP",
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]},
       "status": {"loadBalancer": {"ingress": [{"ip": "10.96.100.10"}]}}}


def ep(ip: str, node: str, ready: bool = True, terminating: bool = False, serving: bool | None = None) -> dict:
    cond = {"ready": ready, "terminating": terminating}
    if serving is not None:
        cond["serving"] = serving
    return {"addresses": [ip], "conditions": cond, "nodeName": node}


SLICE = {"metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
         "endpoints": [ep("10.244.1.10", "node-a1"), ep("10.244.3.10", "node-b1"),
                       ep("10.244.1.11", "node-a1", ready=False, terminating=True, serving=True),
                       ep("10.244.1.12", "node-a1", ready=False),
                       {"addresses": ["10.244.1.300"], "conditions": {"ready": True}, "nodeName": "node-a1"}]}


def test_a_service_every_virtual_server_and_every_endpoint_with_why() -> None:
    text = "\n".join(explain_service(WEB, [SLICE], CTX))
    assert "service default/web (type LoadBalancer)" in text
    assert "scheduler sh from annotation bgp-fabric.io/scheduler" in text
    assert "sessionAffinity ClientIP: persistence 10800s" in text
    cluster = text.split("virtual server TCP 10.96.0.10:80 (ClusterIP, spec.clusterIP) scheduler sh sh-fallback "
                         "persistent 10800")[1].split("virtual server")[0]
    assert "-> 10.244.1.10:8080 weight 1  ready (node node-a1)" in cluster
    assert "-> 10.244.3.10:8080 weight 1  ready (node node-b1)" in cluster  # ITP Cluster: both racks
    assert "-> 10.244.1.11:8080 weight 0  terminating (node node-a1): weight 0, open connections drain" in cluster
    assert "-> 10.244.1.12:8080 not used: not ready (node node-a1)" in cluster
    lb = text.split("virtual server TCP 10.96.100.10:80 (LoadBalancer, status.loadBalancer.ingress[0].ip)")[1] \
        .split("virtual server")[0]
    assert "externalTrafficPolicy Local" in lb
    assert "-> 10.244.1.10:8080 weight 1  ready (node node-a1)" in lb
    assert ("-> 10.244.3.10:8080 not used: on node node-b1; externalTrafficPolicy Local keeps this node's "
            "endpoints only") in lb
    assert "virtual server TCP 10.0.1.11:30080 (NodePort" in text
    assert "addresses on fabric-svc: 10.96.0.10, 10.96.100.10" in text
    assert "hairpin   10.244.1.10 . tcp . 8080 . 10.244.1.10" in text
    assert "cluster   10.96.0.10 . tcp . 80" in text
    # the malformed address is reported, not dropped silently
    assert "skipped: EndpointSlice default/web-1: endpoints[4].addresses[0]: '10.244.1.300' is not an IPv4 " \
           "address; the address skipped" in text


def test_serving_terminating_endpoints_are_used_when_none_is_ready() -> None:
    eps = {("10.0.0.1", 80): Endpoint("10.0.0.1", "n", False, True, True),
           ("10.0.0.2", 80): Endpoint("10.0.0.2", "n", False, False, False)}
    v = endpoint_verdicts(eps, False, "n", "internalTrafficPolicy")
    assert v[0][2] == 1 and "serving and terminating (node n): used because no endpoint is ready" in v[0][3]
    assert v[1][2] is None and "not ready" in v[1][3]


def test_find_by_name_vip_and_port() -> None:
    svcs = {"default/web": WEB}
    assert find("web", svcs, CTX) == (["default/web"], None)
    assert find("default/web", svcs, CTX) == (["default/web"], None)
    assert find("10.96.100.10:80", svcs, CTX) == (["default/web"], ("10.96.100.10", 80))
    assert find("10.96.100.10:81", svcs, CTX) == ([], ("10.96.100.10", 81))
    assert find("10.0.1.11:30080", svcs, CTX)[0] == ["default/web"]
    text = "\n".join(explain_service(WEB, [SLICE], CTX, only=("10.96.100.10", 80)))
    assert "10.96.100.10:80" in text and "10.96.0.10:80 (ClusterIP" not in text


def test_a_bad_service_says_why_it_is_skipped() -> None:
    bad = {**WEB, "spec": {**WEB["spec"], "sessionAffinity": "Cookie"}}
    assert explain_service(bad, [], CTX) == ["service default/web: SKIPPED, nothing programmed: "
                                             "spec.sessionAffinity: 'Cookie' is not None or ClientIP"]


def test_fabric_explain_service_from_the_cluster_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump({
        "nodes": [{"name": "node-a1", "address": "10.0.1.11", "podCIDRs": ["10.244.1.0/24"]}],
        "services": [WEB], "endpointSlices": [SLICE]}))
    (tmp_path / "node.yaml").write_text(yaml.safe_dump({
        "node": {"name": "node-a1", "address": "10.0.1.11/24"},
        "peers": [{"name": "tor", "address": "10.0.1.1", "asn": 65000, "password": "Sekr1t-md5"}],
        "source": {"kind": "file", "path": "cluster.yaml"}, "paths": {"runDir": "run"}}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "status.json").write_text(json.dumps({"services": {"failing": {"default/web": {
        "errors": ["add real 10.244.1.10:8080: No such device"], "attempts": 3, "retryIn": 4.0}}}}))
    assert cli.main(["explain", "-c", str(tmp_path / "node.yaml"), "default/web"]) == 0
    out = capsys.readouterr().out
    assert "virtual server TCP 10.96.100.10:80" in out and "weight 1  ready (node node-a1)" in out
    assert "the agent: FAILING (3 in a row, retry in 4.0s): add real 10.244.1.10:8080: No such device" in out
    assert cli.main(["explain", "-c", str(tmp_path / "node.yaml"), "10.96.100.10:80"]) == 0
    out = capsys.readouterr().out
    assert "10.96.100.10:80 (LoadBalancer" in out and "10.96.0.10:80 (ClusterIP" not in out
    assert cli.main(["explain", "-c", str(tmp_path / "node.yaml"), "default/nope"]) == 1
    assert "Sekr1t" not in out + capsys.readouterr().err


def test_explain_prefix_gives_each_source_its_own_verdict() -> None:
    p = N("10.0.9.0/24")
    r = {"routes": {p: Route(p, "unicast", (NextHop(A("10.0.1.1"), "eth1"),), metric=4096,
                             why="from tor-a via 10.0.1.1 -> direct on eth1")},
         "learned_raw": {p: {("tor-a", A("10.0.1.1")), ("tor-b", A("10.0.1.2")), ("tor-c", A("10.0.7.1"))}},
         "verdicts": {"tor-b": {p: ("filter-not-allowed", "not inside an allowed prefix")},
                      "tor-c": {p: ("next-hop-unusable", "next hop 10.0.7.1 is not on a connected network")}},
         "warnings": [], "announcements": {}}
    text = plan.render_explain(r, "10.0.9.7")
    assert "learned 10.0.9.0/24 from 3 source(s):" in text
    assert "  tor-a (next hop 10.0.1.1): accepted" in text
    assert "  tor-b (next hop 10.0.1.2): REJECTED by import policy (filter-not-allowed): not inside an allowed " \
           "prefix" in text
    assert "  tor-c (next hop 10.0.7.1): accepted by import policy, next hop unusable: next hop 10.0.7.1" in text
    assert "route 10.0.9.0/24: from tor-a via 10.0.1.1" in text
    assert plan.render_explain(r, "10.0.9.0/24") == text  # the prefix itself: the same
