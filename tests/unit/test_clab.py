"""containerlab topology parsing: the happy path, merging, and one clear error per kind of bad file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fabric.lab import clab
from fabric.lab.clab import Endpoint, TopologyError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, data: object, name: str = "lab.clab.yml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def minimal(**topology: object) -> dict:
    t = {"nodes": {"a": {}, "b": {}}, "links": [{"endpoints": ["a:eth1", "b:eth1"]}]}
    t.update(topology)
    return {"name": "t", "topology": t}


def problems(tmp_path: Path, data: object) -> list[str]:
    with pytest.raises(TopologyError) as e:
        clab.load(write(tmp_path, data))
    return e.value.problems


def test_default_lab_parses() -> None:
    t = clab.load(REPO / "labs" / "two-racks.clab.yml")
    assert t.name == "two-racks"
    assert {n.name for n in t.nodes} == {"tor", "rack-a", "rack-b", "node-a1", "node-a2", "node-b1", "node-b2",
                                         "pod-a1", "pod-a2", "pod-b1", "pod-b2", "client"}
    tor = t.node("tor")
    assert tor is not None and tor.image.startswith("quay.io/frrouting/frr")
    assert tor.bind_for("/etc/frr/frr.conf") == REPO / "labs" / "two-racks" / "tor" / "frr.conf"
    # kinds.linux gives the default image to nodes that name none
    assert t.node("pod-a1").image == "nicolaka/netshoot:v0.13"  # type: ignore[union-attr]
    assert (Endpoint("tor", "eth1"), Endpoint("rack-a", "eth1")) in t.links_of("tor")
    assert len(t.links) == 7  # pods have no links: their veth comes from the CNI plugin
    assert t.node("pod-a1").labels == {"bgp-fabric.io/node": "node-a1"}  # type: ignore[union-attr]
    a1 = t.node("node-a1")
    assert a1 is not None and a1.image.startswith("bgp-fabric")
    assert a1.bind_for("/etc/bgp-fabric/config.yaml") == REPO / "labs" / "two-racks" / "node-a1.yaml"


def test_happy_path_fields_and_relative_binds(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "frr.conf").write_text("hostname r\n")
    data = {
        "name": "small",
        "topology": {
            "defaults": {"env": {"A": "1", "B": "default"}, "labels": {"l": "d"}},
            "kinds": {"linux": {"image": "alpine:3", "env": {"B": "kind"}}},
            "nodes": {
                "r": {"kind": "linux", "image": "quay.io/frrouting/frr:10.2.1", "binds": ["cfg:/etc/frr:ro"],
                      "exec": ["ip addr add 10.0.0.1/24 dev eth1"], "env": {"C": 3, "D": True},
                      "sysctls": {"net.ipv4.ip_forward": 1}},
                "h": {"mgmt-ipv4": "172.20.0.2"},
            },
            "links": [{"endpoints": ["r:eth1", "h:eth1"]},
                      {"type": "veth", "mtu": 1400,
                       "endpoints": [{"node": "r", "interface": "eth2"}, {"node": "h", "interface": "e2"}]}],
        },
    }
    t = clab.load(write(tmp_path, data))
    r, h = t.node("r"), t.node("h")
    assert r is not None and h is not None
    assert r.env == {"A": "1", "B": "kind", "C": "3", "D": "true"}
    assert r.labels == {"l": "d"}
    assert r.sysctls == {"net.ipv4.ip_forward": "1"}
    assert r.exec == ("ip addr add 10.0.0.1/24 dev eth1",)
    # a bound folder answers for files inside it; paths are relative to the topology's folder
    assert r.bind_for("/etc/frr/frr.conf") == tmp_path / "cfg" / "frr.conf"
    assert r.binds[0].options == "ro"
    assert h.image == "alpine:3" and h.kind == "linux"
    assert t.links[1].mtu == 1400 and t.links[1].b == Endpoint("h", "e2")
    assert any("mgmt-ipv4" in n for n in t.notes)


def test_node_binds_replace_kind_binds_at_the_same_target(tmp_path: Path) -> None:
    (tmp_path / "k.conf").write_text("")
    (tmp_path / "n.conf").write_text("")
    data = {"name": "t", "topology": {
        "kinds": {"linux": {"binds": ["k.conf:/etc/x.conf"]}},
        "nodes": {"a": {"binds": ["n.conf:/etc/x.conf"]}, "b": {}}}}
    t = clab.load(write(tmp_path, data))
    assert t.node("a").bind_for("/etc/x.conf") == tmp_path / "n.conf"  # type: ignore[union-attr]
    assert t.node("b").bind_for("/etc/x.conf") == tmp_path / "k.conf"  # type: ignore[union-attr]


@pytest.mark.parametrize("data, expected", [
    ({"topology": {"nodes": {"a": {}}}}, "name: required"),
    ({"name": "bad name!", "topology": {"nodes": {"a": {}}}}, "name: 'bad name!' must be"),
    ({"name": "t"}, "topology: required"),
    ({"name": "t", "topology": {"nodes": {}}}, "topology.nodes: required"),
    ({"name": "t", "topology": {"nodes": {"a": {}}, "colour": 1}}, "topology.colour: unknown key"),
    ({"name": "t", "topology": {"nodes": {"a": {"imgae": "x"}}}}, "topology.nodes.a.imgae: unknown key"),
    ({"name": "t", "topology": {"nodes": {"a": {"exec": "ok", "env": ["X=1"]}}}}, "topology.nodes.a.env: must be a mapping"),
    ({"name": "t", "topology": {"nodes": {"a": {"exec": [""]}}}}, "topology.nodes.a.exec[0]: must be a non-empty"),
    ({"name": "t", "topology": {"nodes": {"a": {"binds": ["nope.conf:/etc/x"]}}}}, "topology.nodes.a.binds[0]: 'nope.conf' does not exist"),
    ({"name": "t", "topology": {"nodes": {"a": {"binds": ["justone"]}}}}, "topology.nodes.a.binds[0]: must be"),
    ({"name": "t", "topology": {"nodes": {"a": {"sysctls": {"bad key": 1}}}}}, "topology.nodes.a.sysctls.bad key: not a sysctl"),
    ({"name": "t", "topology": {"nodes": {"a": "x"}}}, "topology.nodes.a: must be a mapping"),
    ({"name": "t", "topology": {"nodes": {"a/b": {}}}}, "topology.nodes.a/b: node name must be"),
    ({"name": "t", "topology": {"defaults": [], "nodes": {"a": {}}}}, "topology.defaults: must be a mapping"),
])
def test_bad_topology_fields(tmp_path: Path, data: dict, expected: str) -> None:
    assert any(p.startswith(expected) for p in problems(tmp_path, data)), problems(tmp_path, data)


@pytest.mark.parametrize("links, expected", [
    ([{"endpoints": ["a:eth1", "b:eth1"]}, {"endpoints": ["a:eth2", "b:eth2"]}, {"endpoints": ["a:eth3", "x:eth1"]}],
     "topology.links[2].endpoints[1]: node 'x' is not defined"),
    ([{"endpoints": ["a:eth1"]}], "topology.links[0].endpoints: must be a list of exactly two"),
    ([{"endpoints": ["a-eth1", "b:eth1"]}], "topology.links[0].endpoints[0]: 'a-eth1' must be 'node:interface'"),
    ([{"endpoints": ["a:eth1", "b:eth1"]}, {"endpoints": ["a:eth1", "b:eth2"]}],
     "topology.links[1].endpoints[0]: interface a:eth1 is already used by topology.links[0]"),
    ([{"endpoints": ["a:averyveryverylongname", "b:eth1"]}], "topology.links[0].endpoints[0]: interface 'averyveryverylongname'"),
    ([{"endpoints": ["a:lo", "b:eth1"]}], "topology.links[0].endpoints[0]: interface 'lo'"),
    ([{"endpoints": ["host:veth9", "b:eth1"]}], "topology.links[0].endpoints[0]: 'host:' endpoints"),
    ([{"endpoints": ["a:eth1", "b:eth1"], "type": "macvlan"}], "topology.links[0].type: 'macvlan'"),
    ([{"endpoints": ["a:eth1", "b:eth1"], "mtu": "big"}], "topology.links[0].mtu: must be an integer"),
    ([{"endpoints": ["a:eth1", "b:eth1"], "speed": 1}], "topology.links[0].speed: unknown key"),
    ("ab", "topology.links: must be a list"),
    (["a:eth1"], "topology.links[0]: must be a mapping"),
])
def test_bad_links(tmp_path: Path, links: object, expected: str) -> None:
    got = problems(tmp_path, minimal(links=links))
    assert any(p.startswith(expected) for p in got), got


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    got = problems(tmp_path, {"name": "t", "topology": {"nodes": {"a": {"imgae": "x"}},
                                                        "links": [{"endpoints": ["a:eth1", "zz:eth1"]}]}})
    assert len(got) == 2


def test_yaml_errors_and_missing_file_are_clear(tmp_path: Path) -> None:
    with pytest.raises(TopologyError) as e:
        clab.load(write(tmp_path, "name: [unclosed\n"))
    assert e.value.problems[0].startswith("(yaml line ")
    with pytest.raises(TopologyError) as e:
        clab.load(tmp_path / "missing.yml")
    assert "cannot read the file" in e.value.problems[0]
    with pytest.raises(TopologyError) as e:
        clab.load(write(tmp_path, "- a\n- b\n"))
    assert e.value.problems == ["(top level): must be a mapping, got list"]


def test_cli_reports_a_bad_topology_without_a_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = write(tmp_path, minimal(links=[{"endpoints": ["a:eth1", "x:eth1"]}]))
    r = subprocess.run([sys.executable, "-m", "fabric.cli", "lab", "run", str(bad)], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 2
    assert f"{bad}: topology.links[0].endpoints[1]: node 'x' is not defined" in r.stderr
    assert "Traceback" not in r.stderr
