"""Checks-file route expectations, commands and faults: parsing, the route verdict on `ip -j` output,
the loss probe's arithmetic, the topology picture and the faults table (all pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric.lab import checks, clab, kinds, picture, report
from fabric.lab.checks import Route
from fabric.lab.faults import FaultResult
from fabric.lab.probe import summarize
from fabric.lab.routes import parse_link_kinds, parse_routes, verdict
from fabric.lab.sessions import Session

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_racks() -> clab.Topology:
    return clab.load(REPO / "labs" / "two-racks.clab.yml")


def test_default_lab_has_route_expectations_commands_and_three_faults(two_racks: clab.Topology) -> None:
    c, _ = checks.load_for(two_racks)
    assert len(c.routes) >= 5 and {r.kind for r in c.routes} >= {"direct", "ipip", "blackhole", "ecmp"}
    assert c.commands and all(cmd.expect for cmd in c.commands)
    assert [f.label() for f in c.faults] == ["kill -9 agent on node-b1", "link rack-a:eth3 down 2s",
                                             "restart tor (1s down)"]
    assert c.faults[0].max_loss == 0 and c.faults[0].kill is not None and c.faults[0].kill.restart_after == 1.0


def parse(two_racks: clab.Topology, data: dict) -> checks.Checks:
    return checks.parse(data, two_racks, "t.checks.yml")


def problems(two_racks: clab.Topology, data: dict) -> list[str]:
    with pytest.raises(clab.TopologyError) as e:
        parse(two_racks, data)
    return e.value.problems


def test_faults_are_validated_against_the_topology(two_racks: clab.Topology) -> None:
    probe = {"from": "pod-a1", "to": "10.244.3.10"}
    assert problems(two_racks, {"faults": [{"kill": {"node": "tor"}, "probe": probe}]}) == [
        "faults[0].kill.node: tor is a frr node; kill needs a bgp-fabric node"]
    assert problems(two_racks, {"faults": [{"restart": {"node": "client"}, "probe": probe}]}) == [
        "faults[0].restart.node: client is a host node; restart needs a bgp-fabric or FRR node"]
    assert problems(two_racks, {"faults": [{"link": {"node": "node-a1", "interface": "eth9"}, "probe": probe}]}) == [
        "faults[0].link.interface: node-a1 has no link on 'eth9'"]
    assert problems(two_racks, {"faults": [{"kill": {"node": "ghost"}, "probe": dict(probe, **{"from": "nope"})}]}) \
        == ["faults[0].kill.node: node 'ghost' is not defined in the topology",
            "faults[0].probe.from: node 'nope' is not defined in the topology"]
    two = problems(two_racks, {"faults": [{"kill": {"node": "node-a1"}, "restart": {"node": "tor"}, "probe": probe}]})
    assert two == ["faults.0: needs exactly one of kill, restart, link (got kill, restart)"]
    assert any("faults.0.probe" in p for p in problems(two_racks, {"faults": [{"kill": {"node": "node-a1"}}]}))
    assert any("rate" in p for p in problems(two_racks, {"faults": [{"kill": {"node": "node-a1"},
                                                                     "probe": dict(probe, rate=1000)}]}))
    f = parse(two_racks, {"faults": [{"kill": {"node": "node-a1", "process": "exabgp"}, "probe": probe,
                                      "name": "speaker dies"}]}).faults[0]
    assert f.label() == "speaker dies" and f.node == "node-a1" and f.probe.rate == 50 and f.max_loss is None


def test_routes_and_commands_are_validated(two_racks: clab.Topology) -> None:
    assert problems(two_racks, {"routes": [{"node": "x", "prefix": "10.0.0.0/8"}]}) == [
        "routes[0].node: node 'x' is not defined in the topology"]
    assert any("prefix" in p for p in problems(two_racks, {"routes": [{"node": "tor", "prefix": "10.0.0.1/8"}]}))
    assert any("absent" in p for p in problems(two_racks, {"routes": [{"node": "tor", "prefix": "10.0.0.0/8",
                                                                        "absent": True, "via": "10.0.0.1"}]}))
    assert any("kind" in p for p in problems(two_racks, {"routes": [{"node": "tor", "prefix": "10.0.0.0/8",
                                                                      "kind": "tunnel"}]}))
    assert any("regular expression" in p for p in problems(two_racks, {"commands": [{"node": "tor", "run": "true",
                                                                                      "expect": "(["}]}))
    c = parse(two_racks, {"commands": [{"node": "tor", "run": "true", "expect": "x"}]}).commands[0]
    assert c.expect == ["x"] and c.exit == 0


# `ip -j -d route show table main` / `ip -j -d link show`, as the lab kernel printed them
ROUTES = parse_routes([
    {"type": "unicast", "dst": "default", "gateway": "10.0.1.1", "dev": "eth1", "protocol": "boot", "flags": []},
    {"type": "unicast", "dst": "10.0.1.0/24", "dev": "eth1", "protocol": "kernel", "scope": "link", "flags": []},
    {"type": "unicast", "dst": "10.244.2.0/24", "gateway": "10.0.1.12", "dev": "eth1", "protocol": "80", "flags": []},
    {"type": "unicast", "dst": "10.244.3.0/24", "gateway": "10.0.2.11", "dev": "tunl0", "protocol": "80",
     "flags": ["onlink"]},
    {"type": "blackhole", "dst": "10.244.1.0/24", "protocol": "80", "flags": []},
    {"type": "unicast", "dst": "10.244.1.10", "dev": "eth2", "protocol": "boot", "scope": "link", "flags": []},
    {"type": "unicast", "dst": "10.96.100.10", "protocol": "bgp", "flags": [],
     "nexthops": [{"gateway": "10.0.1.11", "dev": "eth1", "weight": 1}, {"gateway": "10.0.2.11", "dev": "eth2"}]},
])
KINDS = parse_link_kinds([{"ifname": "lo", "link_type": "loopback"},
                          {"ifname": "eth1", "linkinfo": {"info_kind": "veth"}},
                          {"ifname": "tunl0", "link_type": "ipip", "linkinfo": {"info_kind": "ipip"}}])


@pytest.mark.parametrize("expect, ok", [
    ({"prefix": "10.244.2.0/24", "via": "10.0.1.12", "kind": "direct"}, True),
    ({"prefix": "10.244.2.0/24", "kind": "ipip"}, False),
    ({"prefix": "10.244.3.0/24", "via": "10.0.2.11", "dev": "tunl0", "kind": "ipip"}, True),
    ({"prefix": "10.244.3.0/24", "via": "10.0.2.12"}, False),
    ({"prefix": "10.244.1.0/24", "kind": "blackhole"}, True),
    ({"prefix": "10.244.1.0/24"}, True),
    ({"prefix": "10.244.1.10/32", "dev": "eth2", "kind": "direct"}, True),
    ({"prefix": "10.96.100.10/32", "kind": "ecmp", "via": "10.0.2.11"}, True),
    ({"prefix": "10.96.100.10/32", "kind": "direct"}, False),
    ({"prefix": "0.0.0.0/0", "via": "10.0.1.1"}, True),
    ({"prefix": "10.244.4.0/24"}, False),
    ({"prefix": "10.244.4.0/24", "absent": True}, True),
    ({"prefix": "10.244.2.0/24", "absent": True}, False),
    ({"prefix": "10.244.2.0/25"}, False),  # exact prefix only
])
def test_route_verdict(expect: dict, ok: bool) -> None:
    got, shown = verdict(Route(node="n", **expect), ROUTES, KINDS)
    assert got is ok, shown
    if expect["prefix"] == "10.244.3.0/24":
        assert shown == "10.244.3.0/24 via 10.0.2.11 dev tunl0 (ipip, proto 80)"
    if expect["prefix"] == "10.244.4.0/24":
        assert shown == "no route to 10.244.4.0/24"


def test_probe_arithmetic() -> None:
    t = 1000.0
    # 50/s, no loss: the last 0.5 s of packets (25) are in flight and not counted
    replies = {s: t + s * 0.02 for s in range(1, 101)}
    r = summarize(replies, 100, 50, fault_at=t + 0.5, started_at=t, stopped_at=t + 2.1)
    assert (r.sent, r.lost, r.back_after) == (75, 0, None) and r.describe() == "0/75 lost (0.0%) at 48/s"
    # seqs 40..59 lost: the outage is timed between replies 39 and 60; traffic back 0.4 s after the fault
    lossy = {s: v for s, v in replies.items() if not 40 <= s <= 59}
    r = summarize(lossy, 100, 50, fault_at=t + 0.8, started_at=t, stopped_at=t + 2.1)
    assert r.lost == 20 and r.outage == pytest.approx(0.42) and r.back_after == pytest.approx(0.4)
    assert r.describe() == "20/75 lost (26.7%) at 48/s, longest outage 420 ms"
    # two losses: back_after is the end of the last one, outage the longest
    two = {s: v for s, v in lossy.items() if not 70 <= s <= 72}
    r = summarize(two, 100, 50, fault_at=t + 0.8, started_at=t, stopped_at=t + 2.1)
    assert r.lost == 23 and r.outage == pytest.approx(0.42) and r.back_after == pytest.approx(0.66)
    # lost until the end: never back; the outage runs to the stop
    cut = {s: v for s, v in replies.items() if s < 50}
    r = summarize(cut, 100, 50, fault_at=t + 0.9, started_at=t, stopped_at=t + 2.1)
    assert r.back_after is None and r.outage == pytest.approx(2.1 - 0.98)
    assert summarize({}, 3, 50, t, t, t).sent == 0


def test_picture_sessions_coloured_by_state_and_styled_by_path(two_racks: clab.Topology) -> None:
    plan = kinds.plan(two_racks, "ab12")
    owner = {"10.0.1.11": "node-a1", "10.0.1.12": "node-a2", "10.0.2.11": "node-b1", "10.0.1.1": "tor"}
    sessions = {"node-a1": [Session("node-a1", "10.0.1.12", "established"), Session("node-a1", "10.0.2.11", "idle"),
                            Session("node-a1", "10.0.1.1", "established"), Session("node-a1", "10.9.9.9", "active")],
                "node-a2": [Session("node-a2", "10.0.1.11", "established")],
                "node-b1": [Session("node-b1", "10.0.1.11", "established")],
                "tor": [Session("tor", "10.0.1.11", "established")]}
    paths = {("node-a1", "node-a2"): "direct", ("node-b1", "node-a1"): "ipip"}
    ps = {(p.a, p.b): p for p in picture.pairs(plan, sessions, owner, paths)}
    assert set(ps) == {("node-a1", "node-a2"), ("node-a1", "node-b1"), ("node-a1", "tor")}  # unknown peer: no edge
    assert ps[("node-a1", "node-a2")].colour == picture.STATE_COLOURS["established"]
    assert ps[("node-a1", "node-b1")].colour == picture.STATE_COLOURS["partial"]  # idle on one end
    assert ps[("node-a1", "node-b1")].path == "ipip"
    src = picture.dot_source(plan, sessions, owner, paths, {"tor": ["10.0.1.1"]}, frozenset({"rack-a"}))
    edge = {ln.split(" [")[0].strip(): ln for ln in src.splitlines() if " -- " in ln}
    assert "style=solid" in edge['"node-a1" -- "node-a2"'] and "#2e9e44" in edge['"node-a1" -- "node-a2"']
    assert "style=dashed" in edge['"node-a1" -- "node-b1"'] and "#ff8c00" in edge['"node-a1" -- "node-b1"']
    assert "style=dotted" in edge['"node-a1" -- "tor"']
    assert 'taillabel="eth1" headlabel="eth1"' in edge['"tor" -- "rack-a"']  # links, with interface names
    pods = [n for n in plan.nodes if n.pod_of]
    assert len([e for e in edge if "constraint=false" not in edge[e]]) == len(two_racks.links) + len(pods)
    assert picture.CNI_COLOUR in edge['"node-a1" -- "pod-a1"'] and '"pod-a1" [label="pod-a1\\npod"' in src
    assert '"rack-a" [label="rack-a\\nswitch"' in src and '"tor" [label="tor\\nFRR\\n10.0.1.1"' in src
    assert '"rack-b" [label="rack-b" shape=ellipse' in src


def test_report_has_a_faults_table_and_the_picture(two_racks: clab.Topology) -> None:
    from fabric.lab.probe import ProbeResult

    plan = kinds.plan(two_racks, "ab12")
    faults = [FaultResult("kill -9 agent on node-b1", "pod-a1 -> 10.244.3.10 @ 50/s", True,
                          ProbeResult(400, 400, 0.0, None), 12.5, 1.0, 12.5),
              FaultResult("restart tor (1s down)", "client -> 10.244.1.10 @ 20/s", False,
                          ProbeResult(80, 30, 2.45, None), None, 3.0, None, "not converged in 90s")]
    text = report.render(plan, {}, [report.CheckResult("x", True, 1.0)], faults=faults, picture="/tmp/p.svg")
    lines = text.splitlines()
    assert any(ln.split() == ["kill", "-9", "agent", "on", "node-b1", "pod-a1", "->", "10.244.3.10", "@", "50/s",
                              "0/400", "0", "12.5s", "1.0s", "0.0s", "12.5s", "pass"] for ln in lines), text
    assert any("restart tor (1s down)" in ln and "50/80" in ln and "2450 ms" in ln and ln.endswith("FAIL")
               for ln in lines), text
    assert "picture: /tmp/p.svg" in text


def test_metric_checks_are_validated(two_racks: clab.Topology) -> None:
    m = parse(two_racks, {"metrics": [{"node": "node-a1", "metric": "bgp_fabric_bgp_peer_up",
                                       "labels": {"peer": "tor"}, "value": 1}]}).metrics[0]
    assert m.label() == "metric node-a1: bgp_fabric_bgp_peer_up{peer=tor} == 1"
    assert problems(two_racks, {"metrics": [{"node": "tor", "metric": "x", "min": 1}]}) == [
        "metrics[0].node: tor is not a bgp-fabric node (no /metrics)"]
    assert any("exactly one of value, min" in p
               for p in problems(two_racks, {"metrics": [{"node": "node-a1", "metric": "x"}]}))
    assert any("metric" in p for p in problems(two_racks, {"metrics": [{"node": "node-a1", "metric": "a b",
                                                                        "value": 1}]}))
    assert len(parse(two_racks, None).metrics) == 0
