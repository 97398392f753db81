"""CRD objects -> AgentConfig (fabric/crds.py), and the CRDs' own OpenAPI schemas (manifests/crds/)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pydantic import ValidationError

from fabric.config import AgentConfig, IPIPMode, Pool, parse
from fabric.crds import CrdConfig, Problem, parse_node_selector, secret_refs

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "manifests" / "crds"


# ---- the CRD schemas as the API server applies them ----------------------------------------------

def load_crds() -> dict[str, dict[str, Any]]:
    """kind -> CRD document."""
    out = {}
    for f in sorted(CRD_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            out[doc["spec"]["names"]["kind"]] = doc
    return out


def strict(schema: Any, path: tuple[str, ...] = ()) -> Any:
    """The schema as the API server enforces it with strict field validation (kubectl's default since
    1.27): unknown fields are errors. Structural CRD schemas may not say additionalProperties: false
    next to properties, so it is added here (except in metadata, which the API server checks itself)."""
    if isinstance(schema, dict):
        out = {k: strict(v, path + (k,)) for k, v in schema.items()}
        if "properties" in schema and path[-2:] != ("properties", "metadata"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v, path) for v in schema]
    return schema


def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = load_crds()[kind]
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def schema_errors(kind: str, obj: dict[str, Any]) -> dict[str, str]:
    """field path -> message, for each schema violation (missing and unknown fields named too)."""
    out = {}
    for e in crd_validator(kind).iter_errors(obj):
        where = ".".join(str(p) for p in e.absolute_path)
        if e.validator == "required":
            names = [p for p in e.validator_value if p not in e.instance]
        elif e.validator == "additionalProperties":
            names = sorted(set(e.instance) - set(e.schema.get("properties", {})))
        else:
            names = [""]
        for n in names:
            out[f"{where}.{n}" if n else where] = e.message
    return out


def structural_problems(schema: dict[str, Any], path: str = "") -> list[str]:
    """The rules of a structural schema that bite most often (apiextensions.k8s.io/v1)."""
    out = []
    if "type" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields") \
            and not schema.get("x-kubernetes-int-or-string"):
        out.append(f"{path or '.'}: no type")
    if "properties" in schema and "additionalProperties" in schema:
        out.append(f"{path}: properties and additionalProperties together")
    for bad in ("$ref", "definitions", "dependencies", "patternProperties", "uniqueItems", "id"):
        if bad in schema:
            out.append(f"{path}: {bad} is not allowed")
    for name, sub in (schema.get("properties") or {}).items():
        out += structural_problems(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        out += structural_problems(schema["items"], f"{path}[]")
    return out


def test_crds_are_structural_cluster_scoped_v1() -> None:
    crds = load_crds()
    assert set(crds) == {"BGPConfiguration", "BGPPeer", "IPPool"}
    for kind, crd in crds.items():
        assert crd["spec"]["group"] == "bgp-fabric.io" and crd["spec"]["scope"] == "Cluster"
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.bgp-fabric.io"
        (v1,) = crd["spec"]["versions"]
        assert v1["name"] == "v1" and v1["served"] and v1["storage"]
        assert structural_problems(v1["schema"]["openAPIV3Schema"]) == [], kind


# ---- objects ------------------------------------------------------------------------------------

def obj(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "bgp-fabric.io/v1", "kind": kind, "metadata": {"name": name, "uid": f"uid-{name}"},
            "spec": spec}


GOOD_PEER = {"peerIP": "10.0.1.1", "asNumber": 65000, "port": 1179, "nodeSelector": "rack == 'r1'",
             "password": {"secretKeyRef": {"name": "tor-pw", "key": "password"}}, "multihop": {"ttl": 3},
             "import": {"allow": ["0.0.0.0/0"], "deny": ["10.244.0.0/16"], "maxLength": 24},
             "export": {"allow": ["10.244.0.0/16"]}, "maxPrefixes": 1000, "routeReflectorClient": True,
             "passive": True, "sourceAddress": "10.0.1.11"}
GOOD_POOL = {"cidr": "10.244.0.0/16", "ipipMode": "Always", "natOutgoing": False, "disabled": False,
             "blockSize": 26}
GOOD_CONF = {"asNumber": 65010, "nodeToNodeMesh": False, "serviceClusterIPs": ["10.96.0.0/12"],
             "serviceExternalIPs": ["198.51.100.0/24"], "serviceLoadBalancerIPs": ["192.0.2.0/24"],
             "communities": ["65010:100", "65010:1:2"], "gracefulRestartTime": 300, "holdTime": 30,
             "keepaliveTime": 10}


def base() -> AgentConfig:
    return parse({"node": {"name": "n1", "address": "10.0.1.11/24"}, "source": {"kind": "kubernetes"}})


def secrets(name: str, key: str) -> str:
    if (name, key) == ("tor-pw", "password"):
        return "s3cr3t"
    raise LookupError(f"secret bgp-fabric/{name} key {key}: not found")


def effective(objects: dict[str, dict[str, dict[str, Any]]], crds: CrdConfig | None = None
              ) -> tuple[AgentConfig, list[Problem]]:
    return (crds or CrdConfig()).effective(base(), objects, secrets)


def test_good_objects_pass_the_schema_and_map_onto_the_config() -> None:
    objects = {"BGPPeer": {"tor": obj("BGPPeer", "tor", GOOD_PEER)},
               "IPPool": {"p": obj("IPPool", "p", GOOD_POOL)},
               "BGPConfiguration": {"default": obj("BGPConfiguration", "default", GOOD_CONF)}}
    for kind, objs in objects.items():
        for o in objs.values():
            assert schema_errors(kind, o) == {}
    cfg, problems = effective(objects)
    assert problems == []
    (peer,) = cfg.peers
    assert (peer.name, str(peer.address), peer.asn, peer.port, peer.password) == ("tor", "10.0.1.1", 65000, 1179,
                                                                                 "s3cr3t")
    assert peer.node_selector == {"rack": "r1"} and peer.multihop == 3 and peer.max_prefixes == 1000
    assert [str(c) for c in peer.import_filter.deny] == ["10.244.0.0/16"] and peer.import_filter.max_length == 24
    assert peer.passive and peer.route_reflector_client and str(peer.source_address) == "10.0.1.11"
    (pool,) = cfg.pools
    assert str(pool.cidr) == "10.244.0.0/16" and pool.ipip_mode is IPIPMode.ALWAYS and not pool.nat_outgoing
    assert (cfg.cluster.asn, cfg.cluster.mesh) == (65010, False)
    assert [str(c) for c in cfg.advertise.service_load_balancer_ips] == ["192.0.2.0/24"]
    assert cfg.advertise.communities == ["65010:100", "65010:1:2"]
    assert (cfg.timers.hold_time, cfg.timers.keepalive, cfg.timers.graceful_restart_time) == (30, 10, 300)
    assert secret_refs(objects["BGPPeer"]) == {("tor-pw", "password")}


def peer_with(**changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(GOOD_PEER)
    for k, v in changes.items():
        if v is None:
            spec.pop(k)
        else:
            spec[k] = v
    return spec


BAD_PEERS = [
    ("peer IP out of range", peer_with(peerIP="10.0.0.256"), "spec.peerIP"),
    ("peer IP is IPv6", peer_with(peerIP="fd00::1"), "spec.peerIP"),
    ("no peer IP", peer_with(peerIP=None), "spec.peerIP"),
    ("ASN zero", peer_with(asNumber=0), "spec.asNumber"),
    ("ASN too large", peer_with(asNumber=4294967295), "spec.asNumber"),
    ("no ASN", peer_with(asNumber=None), "spec.asNumber"),
    ("port too large", peer_with(port=70000), "spec.port"),
    ("multihop ttl zero", peer_with(multihop={"ttl": 0}), "spec.multihop.ttl"),
    ("multihop ttl too large", peer_with(multihop={"ttl": 256}), "spec.multihop.ttl"),
    ("import prefix /33", peer_with(**{"import": {"allow": ["10.0.0.0/33"]}}), "spec.import.allow.0"),
    ("export deny not a CIDR", peer_with(export={"deny": ["10.0.0.0/8/8"]}), "spec.export.deny.0"),
    ("maxLength 33", peer_with(**{"import": {"maxLength": 33}}), "spec.import.maxLength"),
    ("maxPrefixes zero", peer_with(maxPrefixes=0), "spec.maxPrefixes"),
    ("selector with !=", peer_with(nodeSelector="rack != 'r1'"), "spec.nodeSelector"),
    ("selector with ||", peer_with(nodeSelector="rack == 'a' || rack == 'b'"), "spec.nodeSelector"),
    ("secret ref without key", peer_with(password={"secretKeyRef": {"name": "tor-pw"}}),
     "spec.password.secretKeyRef.key"),
    ("source address bad", peer_with(sourceAddress="10.0.1"), "spec.sourceAddress"),
    ("unknown field", peer_with(peerAddress="10.0.0.1"), "spec.peerAddress"),
]

BAD_POOLS = [
    ("prefix /33", {"cidr": "10.244.0.0/33"}, "spec.cidr"),
    ("not a CIDR", {"cidr": "pods"}, "spec.cidr"),
    ("IPv6", {"cidr": "fd00:10::/64"}, "spec.cidr"),
    ("no cidr", {"ipipMode": "Always"}, "spec.cidr"),
    ("unknown ipipMode", {"cidr": "10.244.0.0/16", "ipipMode": "Sometimes"}, "spec.ipipMode"),
    ("blockSize too small", {"cidr": "10.244.0.0/16", "blockSize": 19}, "spec.blockSize"),
    ("blockSize too large", {"cidr": "10.244.0.0/16", "blockSize": 33}, "spec.blockSize"),
    ("natOutgoing not a bool", {"cidr": "10.244.0.0/16", "natOutgoing": [True]}, "spec.natOutgoing"),
    ("unknown field", {"cidr": "10.244.0.0/16", "vxlanMode": "Always"}, "spec.vxlanMode"),
]

BAD_CONFS = [
    ("graceful restart over 12 bits", {"gracefulRestartTime": 5000}, "spec.gracefulRestartTime"),
    ("hold time 2", {"holdTime": 2}, "spec.holdTime"),
    ("community text", {"communities": ["no-export"]}, "spec.communities"),
    ("cluster IPs not CIDRs", {"serviceClusterIPs": ["10.96.0.0/x"]}, "spec.serviceClusterIPs"),
    ("ASN zero", {"asNumber": 0}, "spec.asNumber"),
    ("unknown field", {"asn": 65000}, "spec.asn"),
]


@pytest.mark.parametrize("kind,spec,field", [("BGPPeer", s, f) for _, s, f in BAD_PEERS]
                         + [("IPPool", s, f) for _, s, f in BAD_POOLS]
                         + [("BGPConfiguration", s, f) for _, s, f in BAD_CONFS],
                         ids=[f"peer: {d}" for d, _, _ in BAD_PEERS] + [f"pool: {d}" for d, _, _ in BAD_POOLS]
                         + [f"config: {d}" for d, _, _ in BAD_CONFS])
def test_bad_objects_are_rejected_by_schema_and_model(kind: str, spec: dict[str, Any], field: str) -> None:
    name = "default" if kind == "BGPConfiguration" else "bad"
    o = obj(kind, name, spec)
    errors = schema_errors(kind, o)
    assert any(f == field or f.startswith(field + ".") for f in errors), errors
    cfg, problems = effective({kind: {name: o}})
    assert problems and all(p.kind == kind and p.name == name for p in problems)
    assert any(p.field == field or p.field.startswith(field + ".") for p in problems), [str(p) for p in problems]
    assert str(problems[0]).startswith(f"{kind}/{name}: spec")
    assert problems[0].obj is o  # for the Kubernetes Event
    assert cfg == base()  # nothing of a bad object is used


def test_model_catches_what_a_pattern_cannot() -> None:
    # Host bits set and keepalive > holdTime/3 pass the OpenAPI patterns (the CEL rule covers the
    # latter in the API server); the agent's validation still refuses them.
    pool = obj("IPPool", "p", {"cidr": "10.244.0.1/16"})
    assert schema_errors("IPPool", pool) == {}
    _, problems = effective({"IPPool": {"p": pool}})
    assert [p.field for p in problems] == ["spec.cidr"] and "host bits" in problems[0].reason
    conf = obj("BGPConfiguration", "default", {"holdTime": 30, "keepaliveTime": 20})
    _, problems = effective({"BGPConfiguration": {"default": conf}})
    assert [str(p) for p in problems] == ["BGPConfiguration/default: spec.keepaliveTime: keepalive 20 must be at "
                                          "most holdTime/3 (10)"]
    small = obj("IPPool", "s", {"cidr": "10.244.0.0/16", "blockSize": 20})  # /20 blocks in a /16: fine
    big = obj("IPPool", "b", {"cidr": "10.245.0.0/24", "blockSize": 20})   # /20 blocks in a /24: no
    cfg, problems = effective({"IPPool": {"s": small, "b": big}})
    assert [str(p) for p in problems] == ["IPPool/b: spec.blockSize: /20 blocks don't fit in 10.245.0.0/24"]
    assert [str(p.cidr) for p in cfg.pools] == ["10.244.0.0/16"]


def test_last_good_version_is_kept_and_forgotten_on_delete() -> None:
    crds = CrdConfig()
    good = obj("BGPPeer", "tor", GOOD_PEER)
    cfg, problems = effective({"BGPPeer": {"tor": good}}, crds)
    assert problems == [] and cfg.peers[0].asn == 65000
    bad = obj("BGPPeer", "tor", peer_with(asNumber=0, port=0))
    cfg, problems = effective({"BGPPeer": {"tor": bad}}, crds)
    assert {p.field for p in problems} == {"spec.asNumber", "spec.port"}
    assert all(p.reason.endswith("(keeping its last good version)") for p in problems)
    assert cfg.peers[0].asn == 65000 and cfg.peers[0].port == 1179
    fixed = obj("BGPPeer", "tor", peer_with(asNumber=65001))
    cfg, problems = effective({"BGPPeer": {"tor": fixed}}, crds)
    assert problems == [] and cfg.peers[0].asn == 65001
    cfg, _ = effective({}, crds)  # deleted: gone, and its last good version with it
    assert cfg.peers == []
    cfg, problems = effective({"BGPPeer": {"tor": bad}}, crds)
    assert cfg.peers == [] and not any("last good" in p.reason for p in problems)


def test_bad_configuration_keeps_last_good_and_falls_back_to_base() -> None:
    crds = CrdConfig()
    cfg, _ = effective({"BGPConfiguration": {"default": obj("BGPConfiguration", "default", GOOD_CONF)}}, crds)
    assert cfg.cluster.asn == 65010
    bad = obj("BGPConfiguration", "default", {**GOOD_CONF, "holdTime": 1})
    cfg, problems = effective({"BGPConfiguration": {"default": bad}}, crds)
    assert cfg.cluster.asn == 65010 and cfg.timers.hold_time == 30 and [p.field for p in problems] == ["spec.holdTime"]
    cfg, problems = effective({"BGPConfiguration": {"other": obj("BGPConfiguration", "other", GOOD_CONF)}}, crds)
    assert cfg.cluster == base().cluster and cfg.timers == base().timers
    assert [str(p) for p in problems] == ["BGPConfiguration/other: metadata.name: ignored: only the object named "
                                          "'default' is used"]


def test_conflicts_between_objects_reject_the_later_one() -> None:
    pools = {"a": obj("IPPool", "a", {"cidr": "10.244.0.0/16"}), "b": obj("IPPool", "b", {"cidr": "10.244.8.0/24"}),
             "c": obj("IPPool", "c", {"cidr": "10.250.0.0/16"})}
    peers = {"x": obj("BGPPeer", "x", {"peerIP": "10.0.1.1", "asNumber": 65000}),
             "y": obj("BGPPeer", "y", {"peerIP": "10.0.1.1", "asNumber": 65001})}
    cfg, problems = effective({"IPPool": pools, "BGPPeer": peers})
    assert [str(p.cidr) for p in cfg.pools] == ["10.244.0.0/16", "10.250.0.0/16"]
    assert [p.name for p in cfg.peers] == ["x"]
    assert sorted(str(p) for p in problems) == [
        "BGPPeer/y: spec.peerIP: same address and nodeSelector as peer 'x' (10.0.1.1); not used",
        "IPPool/b: spec.cidr: 10.244.8.0/24 overlaps pool 10.244.0.0/16; not used"]


def test_peers_add_to_the_config_file_and_ippools_replace_its_pools() -> None:
    file_cfg = parse({"node": {"name": "n1", "address": "10.0.1.11/24"}, "source": {"kind": "kubernetes"},
                      "pools": [{"cidr": "10.244.0.0/16", "ipipMode": "CrossSubnet"}],
                      "peers": [{"name": "rr", "address": "10.0.0.5", "asn": 64512}]})
    objects = {"IPPool": {"p": obj("IPPool", "p", {"cidr": "10.244.0.0/16", "ipipMode": "Always"})},
               "BGPPeer": {"tor": obj("BGPPeer", "tor", {"peerIP": "10.0.0.6", "asNumber": 65000})}}
    cfg, problems = CrdConfig().effective(file_cfg, objects)
    assert [p.name for p in cfg.peers] == ["rr", "tor"]
    assert [(str(p.cidr), p.ipip_mode.value) for p in cfg.pools] == [("10.244.0.0/16", "Always")]
    assert problems == []
    # no IPPool objects: the file's pools are the bootstrap default
    cfg, _ = CrdConfig().effective(file_cfg, {"BGPPeer": objects["BGPPeer"]})
    assert [(str(p.cidr), p.ipip_mode.value) for p in cfg.pools] == [("10.244.0.0/16", "CrossSubnet")]


def test_overlapping_ippools_the_later_is_refused() -> None:
    file_cfg = parse({"node": {"name": "n1", "address": "10.0.1.11/24"}, "source": {"kind": "kubernetes"}})
    objects = {"IPPool": {"a": obj("IPPool", "a", {"cidr": "10.244.0.0/16"}),
                          "b": obj("IPPool", "b", {"cidr": "10.244.0.0/24"})}}
    cfg, problems = CrdConfig().effective(file_cfg, objects)
    assert len(cfg.pools) == 1
    assert [str(p) for p in problems] == ["IPPool/b: spec.cidr: 10.244.0.0/24 overlaps pool 10.244.0.0/16; not used"]


def test_unreadable_secret_is_a_problem_without_the_value() -> None:
    spec = peer_with(password={"secretKeyRef": {"name": "missing", "key": "password"}})
    cfg, problems = effective({"BGPPeer": {"tor": obj("BGPPeer", "tor", spec)}})
    assert cfg.peers == []
    assert [str(p) for p in problems] == ["BGPPeer/tor: spec.password.secretKeyRef: secret bgp-fabric/missing key "
                                          "password: not found"]
    cfg, problems = CrdConfig().effective(base(), {"BGPPeer": {"tor": obj("BGPPeer", "tor", GOOD_PEER)}})
    assert [p.field for p in problems] == ["spec.password.secretKeyRef"]  # no reader given


@pytest.mark.parametrize("text,expected", [
    ("", {}), ("all()", {}), ("  all()  ", {}),
    ("rack == 'r1'", {"rack": "r1"}),
    ("rack == 'r1' && topology.kubernetes.io/zone == \"z-a\"", {"rack": "r1", "topology.kubernetes.io/zone": "z-a"}),
    ("rack=r1,zone=a", {"rack": "r1", "zone": "a"}),
    ("rack = r1 , zone = a", {"rack": "r1", "zone": "a"}),
    ("empty == ''", {"empty": ""}),
])
def test_node_selector_syntax(text: str, expected: dict[str, str]) -> None:
    assert parse_node_selector(text) == expected
    assert schema_errors("BGPPeer", obj("BGPPeer", "p", peer_with(nodeSelector=text))) == {}


@pytest.mark.parametrize("text", ["rack", "rack != 'a'", "has(rack)", "rack in {'a'}", "rack == a",
                                  "rack == 'a' || zone == 'b'", "rack=a,zone", "!rack", "rack == 'a b'"])
def test_node_selector_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="accepted: all()|label"):
        parse_node_selector(text)
    assert "spec.nodeSelector" in schema_errors("BGPPeer", obj("BGPPeer", "p", peer_with(nodeSelector=text)))


def test_block_size_is_carried_and_a_node_of_another_length_is_reported() -> None:
    from fabric.inputs import NodeInfo
    from fabric.stages.config import block_size_problems

    pool = _ip_pool_of({"cidr": "10.244.0.0/16", "blockSize": 24})
    assert pool.block_size == 24
    nodes = {"a": NodeInfo(name="a", address="10.0.1.1", podCIDRs=["10.244.1.0/24"]),
             "b": NodeInfo(name="b", address="10.0.1.2", podCIDRs=["10.244.2.0/26"]),
             "c": NodeInfo(name="c", address="10.0.1.3", podCIDRs=["10.99.0.0/26"])}  # in no such pool
    assert block_size_problems([pool], nodes) == [
        "node b: pod CIDR 10.244.2.0/26 is a /26, pool 10.244.0.0/16 says blockSize 24 (the cluster's node IPAM "
        "and the pool disagree; routing still works)"]
    assert block_size_problems([pool.model_copy(update={"block_size": None})], nodes) == []
    with pytest.raises(ValidationError, match="/20 blocks don't fit"):
        Pool.model_validate({"cidr": "10.0.0.0/24", "blockSize": 20})


def _ip_pool_of(spec: dict) -> Pool:
    from fabric.crds import _ip_pool

    return _ip_pool({"metadata": {"name": "p"}, "spec": spec})
