"""cni.spec: what the plugin accepts and refuses, and the shape of its results per CNI version."""

from __future__ import annotations

import ipaddress
import json

import pytest

from cni import spec
from cni.spec import Attachment, CniError, PortMapping, parse_request
from tests.cniclient import check_error, check_result

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth0"}
CONF = {"cniVersion": "1.0.0", "name": "bgp-fabric", "type": "bgp-fabric", "socket": "/run/s.sock", "mtu": 1480}


def req(env: dict | None = None, **conf):
    c = {**CONF, **conf}
    return parse_request({**ENV, **(env or {})}, json.dumps({k: v for k, v in c.items() if v is not None}).encode())


def test_a_valid_add() -> None:
    r = req(env={"CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;FOO=bar"},
            runtimeConfig={"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "TCP"},
                                            {"hostPort": 53, "containerPort": 53, "protocol": "udp",
                                             "hostIP": "10.0.1.11"}]})
    assert (r.command, r.version, r.network, r.key, r.mtu, r.pod) == ("ADD", "1.0.0", "bgp-fabric", ("c1", "eth0"),
                                                                        1480, "shop/web-0")
    assert r.port_mappings == (PortMapping(8080, 80, "tcp"), PortMapping(53, 53, "udp", ipaddress.IPv4Address("10.0.1.11")))


@pytest.mark.parametrize("env,conf,code,text", [
    ({"CNI_COMMAND": "FROB"}, {}, spec.INVALID_ENV, "CNI_COMMAND"),
    ({}, {"cniVersion": "2.0.0"}, spec.INCOMPATIBLE_VERSION, "cniVersion"),
    ({}, {"cniVersion": None}, spec.INCOMPATIBLE_VERSION, "cniVersion"),
    ({"CNI_COMMAND": "GC"}, {"cni.dev/valid-attachments": []}, spec.INCOMPATIBLE_VERSION, "1.1.0"),
    ({"CNI_COMMAND": "CHECK"}, {"cniVersion": "0.3.1", "prevResult": {}}, spec.INCOMPATIBLE_VERSION, "0.4.0"),
    ({}, {"type": "ptp"}, spec.INVALID_CONFIG, "type"),
    ({}, {"bridge": "cni0"}, spec.UNSUPPORTED_FIELD, "bridge"),
    ({}, {"ipam": {"type": "host-local"}}, spec.UNSUPPORTED_FIELD, "ipam"),
    ({}, {"args": {"cni": {"ips": ["10.244.1.9"]}}}, spec.UNSUPPORTED_FIELD, "args"),
    ({}, {"name": ""}, spec.INVALID_CONFIG, "name"),
    ({}, {"mtu": 100}, spec.INVALID_CONFIG, "mtu"),
    ({}, {"mtu": True}, spec.INVALID_CONFIG, "mtu"),
    ({"CNI_CONTAINERID": ""}, {}, spec.INVALID_ENV, "CNI_CONTAINERID"),
    ({"CNI_CONTAINERID": "-x"}, {}, spec.INVALID_ENV, "CNI_CONTAINERID"),
    ({"CNI_IFNAME": "eth0/1"}, {}, spec.INVALID_ENV, "CNI_IFNAME"),
    ({"CNI_IFNAME": "a" * 16}, {}, spec.INVALID_ENV, "CNI_IFNAME"),
    ({"CNI_NETNS": ""}, {}, spec.INVALID_ENV, "CNI_NETNS"),
    ({"CNI_ARGS": "FOO=bar"}, {}, spec.INVALID_ENV, "FOO"),
    ({"CNI_ARGS": "novalue"}, {}, spec.INVALID_ENV, "KEY=VALUE"),
    ({}, {"runtimeConfig": {"bandwidth": {}}}, spec.UNSUPPORTED_FIELD, "bandwidth"),
    ({}, {"runtimeConfig": {"portMappings": [{"hostPort": 0, "containerPort": 80}]}}, spec.INVALID_CONFIG, "hostPort"),
    ({}, {"runtimeConfig": {"portMappings": [{"hostPort": 80, "containerPort": 80, "protocol": "icmp"}]}},
     spec.INVALID_CONFIG, "protocol"),
    ({}, {"runtimeConfig": {"portMappings": [{"hostPort": 80, "containerPort": 80, "hostIP": "fd00::1"}]}},
     spec.UNSUPPORTED_FIELD, "IPv4"),
    ({}, {"runtimeConfig": {"portMappings": [{"hostPort": 80, "containerPort": 80, "foo": 1}]}},
     spec.UNSUPPORTED_FIELD, "foo"),
    ({}, {"runtimeConfig": {"portMappings": [{"hostPort": 80, "containerPort": 80},
                                             {"hostPort": 80, "containerPort": 81, "protocol": "tcp"}]}},
     spec.INVALID_CONFIG, "repeats"),
    ({"CNI_COMMAND": "CHECK"}, {}, spec.INVALID_CONFIG, "prevResult"),
    ({"CNI_COMMAND": "GC"}, {"cniVersion": "1.1.0"}, spec.INVALID_CONFIG, "valid-attachments"),
    ({"CNI_COMMAND": "GC"}, {"cniVersion": "1.1.0", "cni.dev/valid-attachments": [{"containerID": "x"}]},
     spec.INVALID_CONFIG, "ifname"),
])
def test_refusals_name_the_field(env: dict, conf: dict, code: int, text: str) -> None:
    with pytest.raises(CniError) as e:
        req(env=env, **conf)
    assert e.value.code == code and text in e.value.msg, (e.value.code, e.value.msg)
    check_error(e.value.to_json("1.0.0"))


def test_undecodable_configuration() -> None:
    for raw in (b"{", b"[1]", b"\xff"):
        with pytest.raises(CniError) as e:
            parse_request(ENV, raw)
        assert e.value.code == spec.DECODE_FAILURE


def test_del_needs_no_netns_and_gc_reads_attachments() -> None:
    assert req(env={"CNI_COMMAND": "DEL", "CNI_NETNS": ""}).netns == ""
    r = parse_request({"CNI_COMMAND": "GC"}, json.dumps({**CONF, "cniVersion": "1.1.0", "cni.dev/valid-attachments": [
        {"containerID": "a", "ifname": "eth0"}]}).encode())
    assert r.valid_attachments == frozenset({("a", "eth0")})


A = Attachment(container_id="c1", ifname="eth0", address=ipaddress.IPv4Address("10.244.1.5"), host_ifname="fab0123456789ab",
               host_mac="ee:ee:ee:ee:ee:ee", pod_mac="02:00:00:00:00:01", netns="/run/netns/x", mtu=1480,
               gateway=ipaddress.IPv4Address("169.254.1.1"))


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0"])
def test_results_match_the_spec_schema(version: str) -> None:
    r = spec.result(version, A)
    check_result(r)
    assert r["ips"] == [{"address": "10.244.1.5/32", "gateway": "169.254.1.1", "interface": 1}]
    assert r["interfaces"][1]["sandbox"] == "/run/netns/x" and "sandbox" not in r["interfaces"][0]
    assert ("mtu" in r["interfaces"][1]) == (version == "1.1.0")  # interface mtu is new in 1.1


def test_older_results_carry_the_ip_version() -> None:
    assert spec.result("0.4.0", A)["ips"][0]["version"] == "4"
