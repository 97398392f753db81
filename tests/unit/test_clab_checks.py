"""The checks file (`<name>.checks.yml`), FRR/agent session parsing and the report's verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fabric.lab import checks, clab, kinds, report, sessions
from fabric.lab.clab import TopologyError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def topology(tmp_path: Path) -> clab.Topology:
    p = tmp_path / "t.clab.yml"
    p.write_text(yaml.safe_dump({"name": "t", "topology": {"nodes": {"a": {}, "b": {}}}}))
    return clab.load(p)


def test_checks_path_is_next_to_the_topology() -> None:
    assert checks.path_for(Path("/x/labs/two-racks.clab.yml")) == Path("/x/labs/two-racks.checks.yml")
    assert checks.path_for(Path("/x/lab.yaml")) == Path("/x/lab.checks.yml")


def test_default_lab_checks_load() -> None:
    t = clab.load(REPO / "labs" / "two-racks.clab.yml")
    c, path = checks.load_for(t)
    assert path == REPO / "labs" / "two-racks.checks.yml"
    assert c.sessions is not None and c.sessions.min == 20
    assert {(p.src, p.to) for p in c.pings} >= {("pod-a1", "pod-b1"), ("pod-b1", "pod-a1")}  # pods by name
    assert [(h.src, h.to, h.port, h.spread) for h in c.http] == [
        ("pod-b2", "10.96.0.10", 80, True), ("client", "10.96.100.10", 80, False), ("client", "10.0.1.11", 30080, True)]


def test_http_check_validation(topology: clab.Topology) -> None:
    names = [n.name for n in topology.nodes]
    a, b = names[0], names[1]
    c = checks.parse({"http": [{"from": a, "to": "10.96.0.10", "port": 80, "serve": [b]}]}, topology)
    assert c.http[0].requests == 6 and c.http[0].backend_port == 8080 and c.http[0].spread is True
    with pytest.raises(clab.TopologyError) as e:
        checks.parse({"http": [{"from": a, "to": "10.96.0.10", "port": 80, "serve": [b, "ghost"],
                                "expect": ["nobody"]}]}, topology)
    assert "http[0].serve[1]: node 'ghost' is not defined in the topology" in e.value.problems
    assert "http[0].expect[0]: 'nobody' is not one of serve" in e.value.problems


def test_no_checks_file_means_sessions_only(topology: clab.Topology) -> None:
    c, path = checks.load_for(topology)
    assert path is None and c.pings == [] and c.tcp == [] and c.sessions is None and c.timeout == 60


def test_checks_parse(topology: clab.Topology) -> None:
    c = checks.parse({"timeout": 30, "sessions": {"min": 2},
                      "pings": [{"from": "a", "to": "10.0.0.2", "count": 3, "timeout": 5}],
                      "tcp": [{"from": "a", "to": "10.0.0.2", "port": 80, "serve": "b"}]}, topology)
    assert c.timeout == 30 and c.sessions is not None and c.sessions.min == 2
    assert c.pings[0].label() == "ping a -> 10.0.0.2 x3" and c.pings[0].timeout == 5
    assert c.tcp[0].label() == "tcp a -> 10.0.0.2:80" and c.tcp[0].serve == "b"


@pytest.mark.parametrize("data, expected", [
    ({"pings": [{"from": "zz", "to": "10.0.0.1"}]}, "pings[0].from: node 'zz' is not defined in the topology"),
    ({"tcp": [{"from": "a", "to": "10.0.0.1", "port": 1, "serve": "q"}]}, "tcp[0].serve: node 'q' is not defined"),
    ({"pings": [{"from": "a", "to": "10.0.0.300"}]}, "pings.0.to: '10.0.0.300' is not a valid IPv4 address"),
    ({"pings": [{"from": "a", "to": "b"}]}, "pings[0].to: 'b' is neither an IPv4 address nor a pod node"),
    ({"pings": [{"from": "a"}]}, "pings.0.to: Field required"),
    ({"tcp": [{"from": "a", "to": "10.0.0.1", "port": 0}]}, "tcp.0.port: Input should be greater than or equal to 1"),
    ({"sessions": {"minimum": 3}}, "sessions.minimum: unknown key"),
    ({"pingz": []}, "pingz: unknown key"),
    ({"timeout": -1}, "timeout: Input should be greater than 0"),
    (["a"], "(top level): must be a mapping"),
])
def test_bad_checks(topology: clab.Topology, data: object, expected: str) -> None:
    with pytest.raises(TopologyError) as e:
        checks.parse(data, topology, "t.checks.yml")
    assert any(p.startswith(expected) for p in e.value.problems), e.value.problems


FRR_SUMMARY = {
    "ipv4Unicast": {"routerId": "10.0.1.1", "as": 64512, "peers": {
        "10.0.1.11": {"remoteAs": 64512, "state": "Established", "pfxRcd": 1, "desc": "node-a1"},
        "10.0.1.12": {"remoteAs": 64512, "state": "Active", "hostname": "n2"},
    }},
    "ipv6Unicast": {"peers": {"10.0.1.12": {"remoteAs": 64512, "state": "Established"}}},
}


def test_frr_summary_one_session_per_peer_over_families() -> None:
    ss = sessions.from_frr_summary("tor", json.dumps(FRR_SUMMARY))
    assert [(s.peer, s.state, s.name, s.remote_as, s.prefixes) for s in ss] == [
        ("10.0.1.11", "established", "node-a1", "64512", 1),
        ("10.0.1.12", "established", "n2", "64512", None),
    ]
    assert sessions.from_frr_summary("tor", "{}") == []


def test_frr_summary_garbage_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not JSON"):
        sessions.from_frr_summary("tor", "% Unknown command")


def test_agent_status() -> None:
    st = sessions.from_agent_status("n1", {"node": "n1", "ready": True, "warnings": ["w"], "peers": [
        {"name": "tor", "address": "10.0.1.1", "state": "established"},
        {"name": "n2", "address": "10.0.1.12", "state": "Connect"}]})
    assert st.ready and st.warnings == ("w",)
    assert [(s.peer, s.name, s.established) for s in st.sessions] == [("10.0.1.1", "tor", True),
                                                                       ("10.0.1.12", "n2", False)]
    with pytest.raises(ValueError):
        sessions.from_agent_status("n1", [])


def test_report_tables_and_verdict() -> None:
    t = clab.load(REPO / "labs" / "two-racks.clab.yml")
    plan = kinds.plan(t, "abcd")
    ss = {"tor": sessions.from_frr_summary("tor", json.dumps(FRR_SUMMARY))}
    ok = report.CheckResult("ping pod-a1 -> 10.244.3.10", True, 0.42, "1 received")
    bad = report.CheckResult("bgp node-a1: every session Established", False, 60.0, "10.0.1.1 active")
    text = report.render(plan, ss, [ok, bad])
    assert "two-racks-abcd-tor" in text and "2/2 established" in text
    assert "ping pod-a1 -> 10.244.3.10" in text and "FAIL" in text
    assert text.rstrip().endswith("verdict: FAIL (1/2 checks passed)")
    assert report.verdict([ok]) and not report.verdict([ok, bad]) and not report.verdict([])
    assert not report.verdict([ok], build_error="exec failed")


def test_route_reflector_lab_and_checks_load() -> None:
    """labs/route-reflectors: 2 reflectors + 6 clients + a tor; its checks file parses (the lab itself runs in
    tests/kernel/test_rr_agents.py)."""
    t = clab.load(REPO / "labs" / "route-reflectors.clab.yml")
    agents = {n.name for n in t.nodes if n.image.startswith("bgp-fabric")}
    assert agents == {"rr-a", "rr-b", *(f"node-{r}{i}" for r in "ab" for i in (1, 2, 3))}
    assert t.node("tor").image.startswith("quay.io/frrouting/frr")  # type: ignore[union-attr]
    c, _ = checks.load_for(t)
    assert c.sessions is not None and c.sessions.min == 42
    assert len(c.pings) == 8 * 7 + 2
    assert [(f.kill.node, f.kill.restart_after, f.probe.rate, f.max_loss) for f in c.faults if f.kill] == [
        ("rr-a", 8.0, 200, 0)]
    for a in agents:  # mesh off everywhere; the reflectors by their Node label
        cfg = yaml.safe_load((REPO / "labs" / "route-reflectors" / f"{a}.yaml").read_text())
        assert cfg["cluster"]["mesh"] is False
    cluster = yaml.safe_load((REPO / "labs" / "route-reflectors" / "cluster.yaml").read_text())
    assert {n["name"] for n in cluster["nodes"] if n.get("labels")} == {"rr-a", "rr-b"}
