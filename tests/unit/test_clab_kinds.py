"""Node kinds → local roles (FRR, agent, bridge, host), namespace names, FRR daemons, agent run dirs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fabric.lab import clab, kinds
from fabric.lab.clab import Node, TopologyError
from fabric.lab.kinds import Role


@pytest.mark.parametrize("image, kind, role", [
    ("quay.io/frrouting/frr:10.2.1", "linux", Role.FRR),
    ("frrouting/frr:v8.4.0", "linux", Role.FRR),
    ("ghcr.io/example/bgp-fabric:latest", "linux", Role.AGENT),
    ("bgp-fabric", "linux", Role.AGENT),
    ("alpine:3.20", "linux", Role.HOST),
    ("busybox", "linux", Role.HOST),
    ("nicolaka/netshoot", "linux", Role.HOST),
    ("", "linux", Role.HOST),
    ("", "bridge", Role.BRIDGE),
])
def test_role_by_image_and_kind(image: str, kind: str, role: Role) -> None:
    assert kinds.role_of(Node(name="n", kind=kind, image=image)) is role


def topo(tmp_path: Path, nodes: dict, files: dict[str, str] | None = None) -> clab.Topology:
    for name, text in (files or {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    p = tmp_path / "lab.clab.yml"
    p.write_text(yaml.safe_dump({"name": "lab", "topology": {"nodes": nodes}}))
    return clab.load(p)


def test_plan_names_namespaces_per_run_and_maps_frr(tmp_path: Path) -> None:
    t = topo(tmp_path, {
        "r": {"image": "quay.io/frrouting/frr:10.2.1",
              "binds": ["r/frr.conf:/etc/frr/frr.conf", "r/daemons:/etc/frr/daemons"]},
        "h": {"image": "alpine"},
    }, {"r/frr.conf": "frr defaults datacenter\nrouter bgp 65000\n",
        "r/daemons": "zebra=yes\nbgpd=yes\nospfd=no\nbfdd=\"yes\"\nstaticd=no\n"})
    p1, p2 = kinds.plan(t, "aaaa"), kinds.plan(t, "bbbb")
    assert p1.netns("r") == "lab-aaaa-r" and p2.netns("r") == "lab-bbbb-r"
    r = p1.by_name("r")
    assert r.role is Role.FRR and r.frr is not None
    assert r.frr.config == tmp_path / "r" / "frr.conf"
    assert r.frr.daemons == ("bgpd", "bfdd", "staticd")  # staticd always: it carries `ip route` lines
    assert r.frr.profile == "datacenter" and r.frr.bgp and r.speaks_bgp
    assert p1.by_name("h").role is Role.HOST and not p1.by_name("h").speaks_bgp


def test_frr_without_router_bgp_is_not_a_bgp_node(tmp_path: Path) -> None:
    t = topo(tmp_path, {"r": {"image": "frr", "binds": ["frr.conf:/etc/frr/frr.conf"]}},
             {"frr.conf": "ip route 10.0.0.0/8 blackhole\n"})
    r = kinds.plan(t, "x").by_name("r")
    assert r.frr is not None and r.frr.daemons == kinds.DEFAULT_FRR_DAEMONS and r.frr.profile is None
    assert not r.speaks_bgp


def test_frr_node_without_config_is_an_error(tmp_path: Path) -> None:
    t = topo(tmp_path, {"r": {"image": "quay.io/frrouting/frr:10.2.1"}})
    with pytest.raises(TopologyError) as e:
        kinds.plan(t, "x")
    assert e.value.problems == ["topology.nodes.r.binds: an FRR node needs a bind of its frr.conf to /etc/frr/frr.conf"]


def test_unknown_frr_daemon_is_an_error(tmp_path: Path) -> None:
    t = topo(tmp_path, {"r": {"image": "frr", "binds": ["f:/etc/frr/frr.conf", "d:/etc/frr/daemons"]}},
             {"f": "", "d": "bgpd=yes\nfoobard=yes\n"})
    with pytest.raises(TopologyError) as e:
        kinds.plan(t, "x")
    assert "unknown FRR daemon 'foobard'" in e.value.problems[0]


def test_agent_node_config_and_run_dir(tmp_path: Path) -> None:
    t = topo(tmp_path, {
        "n1": {"image": "bgp-fabric:dev", "binds": ["n1/config.yaml:/etc/bgp-fabric/config.yaml"]},
        "n2": {"image": "bgp-fabric:dev", "binds": ["n2:/etc/bgp-fabric"]},
    }, {"n1/config.yaml": "paths: {runDir: run}\n", "n2/config.yaml": "paths: {runDir: /run/fabric-n2}\n"})
    p = kinds.plan(t, "r1")
    a1, a2 = p.by_name("n1").agent, p.by_name("n2").agent
    assert a1 is not None and a2 is not None
    assert a1.config == tmp_path / "n1" / "config.yaml"
    assert a1.run_dir == tmp_path / "n1" / "run"  # relative to the config file
    assert a1.status == tmp_path / "n1" / "run" / "status.json"
    assert a2.run_dir == Path("/run/fabric-n2")
    assert p.by_name("n1").speaks_bgp


def test_agents_sharing_a_run_dir_are_an_error(tmp_path: Path) -> None:
    t = topo(tmp_path, {
        "n1": {"image": "bgp-fabric", "binds": ["a.yaml:/etc/bgp-fabric/config.yaml"]},
        "n2": {"image": "bgp-fabric", "binds": ["b.yaml:/etc/bgp-fabric/config.yaml"]},
    }, {"a.yaml": "node: {name: n1}\n", "b.yaml": "node: {name: n2}\n"})
    with pytest.raises(TopologyError) as e:
        kinds.plan(t, "x")
    assert e.value.problems[0].startswith("topology.nodes.n2.binds: agent paths.runDir /run/bgp-fabric is also used")


def test_agent_without_config_is_an_error(tmp_path: Path) -> None:
    t = topo(tmp_path, {"n1": {"image": "bgp-fabric"}})
    with pytest.raises(TopologyError) as e:
        kinds.plan(t, "x")
    assert "needs a bind of its config to /etc/bgp-fabric/config.yaml" in e.value.problems[0]


def test_parse_daemons_ignores_zebra_and_off_daemons() -> None:
    text = "# comment\nzebra=yes\nbgpd=yes\nospfd=no\nvtysh_enable=yes\nbgpd_options=\"-A 127.0.0.1\"\n"
    assert kinds.parse_daemons(text) == ("bgpd", "staticd")


def test_pods_are_nodes_labelled_with_their_agent_node(tmp_path: Path) -> None:
    cfg = "node: {name: n1, address: 10.0.1.11/24}\nsource: {kind: file, path: c.yaml}\n"
    t = topo(tmp_path, {
        "n1": {"image": "bgp-fabric", "binds": ["n1.yaml:/etc/bgp-fabric/config.yaml"]},
        "p1": {"image": "alpine", "labels": {"bgp-fabric.io/node": "n1"}},
    }, {"n1.yaml": cfg + "cni: {enabled: true, confDir: net.d}\n"})
    plan = kinds.plan(t, "aaaa")
    p1, n1 = plan.by_name("p1"), plan.by_name("n1")
    assert p1.role is Role.POD and p1.pod_of == "n1" and not p1.speaks_bgp
    assert n1.agent is not None and n1.agent.conflist == tmp_path / "net.d" / "10-bgp-fabric.conflist"


@pytest.mark.parametrize("nodes, files, problem", [
    ({"p1": {"labels": {"bgp-fabric.io/node": "ghost"}}}, {},
     "topology.nodes.p1.labels.bgp-fabric.io/node: 'ghost' is not a bgp-fabric node of this topology"),
    ({"h": {"image": "alpine"}, "p1": {"labels": {"bgp-fabric.io/node": "h"}}}, {},
     "topology.nodes.p1.labels.bgp-fabric.io/node: 'h' is not a bgp-fabric node of this topology"),
    ({"n1": {"image": "bgp-fabric", "binds": ["n1.yaml:/etc/bgp-fabric/config.yaml"]},
      "p1": {"labels": {"bgp-fabric.io/node": "n1"}}},
     {"n1.yaml": "node: {name: n1, address: 10.0.1.11/24}\nsource: {kind: file, path: c.yaml}\n"},
     "topology.nodes.p1.labels.bgp-fabric.io/node: the agent of 'n1' does not serve pods "
     "(set cni.enabled: true in its config)"),
])
def test_a_pod_needs_an_agent_node_that_serves_pods(tmp_path: Path, nodes: dict, files: dict, problem: str) -> None:
    with pytest.raises(TopologyError) as e:
        kinds.plan(topo(tmp_path, nodes, files), "aaaa")
    assert problem in e.value.problems
