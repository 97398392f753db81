"""The agent's pod stages: CNI (conflist, facts for the plugin) and podnat (`ip bgp-fabric-pods`), with a
fake agent and a fake `nft`; the rendered table is also checked by a real `nft -c`."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cni import conflist, podnft
from cni.spec import PortMapping
from fabric.config import parse
from fabric.stage import StageInput
from fabric.stages.cni import CniStage, pod_mtu
from fabric.stages.podnat import PodNatStage
from fabric.tracker import Changes, Store

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address


def cfg(**over: Any):
    doc: dict[str, Any] = {
        "node": {"name": "n1", "address": "10.0.1.11/24"}, "source": {"kind": "file", "path": "c.yaml"},
        "pools": [{"cidr": "10.244.0.0/16", "ipipMode": "CrossSubnet", "natOutgoing": True},
                  {"cidr": "10.250.0.0/16", "ipipMode": "Never", "natOutgoing": False}],
        "advertise": {"serviceClusterIPs": ["10.96.0.0/16"], "serviceLoadBalancerIPs": ["10.97.0.0/24"]}}
    doc.update(over)
    return parse(doc)


def inp(full: bool = False, now: float = 0.0) -> StageInput:
    return StageInput(Changes({}, False), full, now, True)


class FakeNft:
    def __init__(self) -> None:
        self.scripts: list[str] = []
        self.fail: list[str | None] = []

    def __call__(self, script: str) -> str | None:
        self.scripts.append(script)
        return self.fail.pop(0) if self.fail else None


class FakeCni:
    def __init__(self) -> None:
        self.ports: list = []

    def hostports(self) -> list:
        return list(self.ports)


def podnat(c=None):
    agent = SimpleNamespace(cfg=c or cfg(), cni_stage=FakeCni())
    nft = FakeNft()
    return agent, PodNatStage(agent, nft=nft), nft


def run(stage, agent, **kw):
    i = inp(**kw)
    return stage.run(i, stage.prepare(i))


def test_pod_mtu_follows_the_tunnel_rule() -> None:
    assert pod_mtu(cfg(), 1500) == 1480
    assert pod_mtu(cfg(pools=[{"cidr": "10.244.0.0/16", "ipipMode": "Never"}]), 9000) == 9000
    assert pod_mtu(cfg(pools=[{"cidr": "10.244.0.0/16", "ipipMode": "Always", "disabled": True},
                              {"cidr": "10.245.0.0/16", "ipipMode": "Never"}]), 1500) == 1500


def test_nat_table_full_then_nothing_then_full_on_a_pool_change() -> None:
    agent, st, nft = podnat()
    res = run(st, agent)
    assert res.error is None and res.status["programmed"] is True and res.status["natSources"] == ["10.244.0.0/16"]
    (first,) = nft.scripts
    assert first.startswith("table ip bgp-fabric-pods\ndelete table ip bgp-fabric-pods\n")
    assert "set natsrc { type ipv4_addr; flags interval; elements = { 10.244.0.0/16 }; }" in first
    assert "elements = { 10.96.0.0/16, 10.97.0.0/24, 10.244.0.0/16, 10.250.0.0/16 }" in first  # natskip
    run(st, agent)
    assert len(nft.scripts) == 1  # nothing changed: no nft run
    agent.cfg = cfg(pools=[{"cidr": "10.244.0.0/16", "natOutgoing": False}])
    run(st, agent)
    assert len(nft.scripts) == 2 and "set natsrc { type ipv4_addr; flags interval; }" in nft.scripts[-1]
    run(st, agent, full=True)  # the periodic full resync rewrites the table
    assert len(nft.scripts) == 3 and nft.scripts[-1].startswith("table ip")


def test_hostports_are_element_deltas_and_conflicts_are_reported() -> None:
    agent, st, nft = podnat()
    agent.cni_stage.ports = [(A("10.244.1.5"), PortMapping(8080, 80, "tcp"))]
    run(st, agent)
    assert "tcp . 8080 : 10.244.1.5 . 80" in nft.scripts[-1]
    agent.cni_stage.ports += [(A("10.244.1.6"), PortMapping(8080, 81, "tcp")),  # same host port: a conflict
                              (A("10.244.1.6"), PortMapping(9090, 90, "udp", A("10.0.1.11")))]
    res = run(st, agent)
    assert nft.scripts[-1] == ("add element ip bgp-fabric-pods hairpin { 10.244.1.6 . 10.244.1.6 }\n"
                               "add element ip bgp-fabric-pods hostport { 10.0.1.11 . udp . 9090 : 10.244.1.6 . 90 }\n")
    assert res.status["warnings"] == ["hostPort conflict: hostPort *:8080/tcp of pod 10.244.1.6 is already taken "
                                      "by pod 10.244.1.5"]
    assert res.status["hostPorts"] == 2
    agent.cni_stage.ports = []
    nft.fail = ["Error: No such file or directory"]  # someone deleted our table: delta fails, whole is rewritten
    res = run(st, agent)
    assert nft.scripts[-2].startswith("delete element") and nft.scripts[-1].startswith("table ip bgp-fabric-pods")
    assert res.error is None and res.status["hostPorts"] == 0


def test_a_failed_nft_fails_the_run_and_the_next_run_rewrites_the_table() -> None:
    agent, st, nft = podnat()
    nft.fail = ["Error: Could not process rule: Device or resource busy"]
    res = run(st, agent)
    assert res.error == "nft table ip bgp-fabric-pods: Error: Could not process rule: Device or resource busy"
    assert res.status["programmed"] is False
    res = run(st, agent)  # the runner's retry
    assert res.error is None and len(nft.scripts) == 2 and nft.scripts[-1].startswith("table ip")


def test_a_kernel_without_ipv4_nat_is_a_warning_not_an_error() -> None:
    agent, st, nft = podnat()
    nft.fail = ["/dev/stdin:1:1-25: Error: Could not process rule: Operation not supported"]
    res = run(st, agent)
    assert res.error is None and "this kernel has no IPv4 nftables NAT" in res.status["warnings"][0]
    agent.cni_stage.ports = [(A("10.244.1.5"), PortMapping(8080, 80, "tcp"))]
    run(st, agent)
    assert len(nft.scripts) == 1  # not tried again until the next full resync
    run(st, agent, full=True)
    assert len(nft.scripts) == 2


def test_the_rendered_table_loads_in_a_real_nft() -> None:
    d, _ = podnft.desired([N("10.244.0.0/16")], [N("10.244.0.0/16"), N("10.245.0.0/16")], [N("10.96.0.0/12")],
                          [podnft.HostPort(A("10.244.1.2"), PortMapping(80, 8080, "tcp")),
                           podnft.HostPort(A("10.244.1.3"), PortMapping(53, 53, "udp", A("10.0.1.11")))])
    script = podnft.render_full(d) + podnft.render_delta([("hairpin", "10.244.1.9 . 10.244.1.9")],
                                                          [("hostport_any", "tcp . 80 : 10.244.1.2 . 8080")])
    r = subprocess.run(["unshare", "-n", "nft", "-c", "-f", "-"], input=script, capture_output=True, text=True)
    if r.returncode != 0 and "Operation not supported" in r.stderr:
        pytest.skip("this kernel has no nft IPv4 NAT")
    assert r.returncode == 0, r.stderr


def test_conflist_is_written_once_and_atomically(tmp_path: Path) -> None:
    conf = conflist.render(network="bgp-fabric", socket_path="/run/x.sock", mtu=1480)
    assert conf["cniVersion"] == "1.0.0" and conf["cniVersions"] == ["1.0.0", "1.1.0"]
    assert conf["plugins"] == [{"type": "bgp-fabric", "socket": "/run/x.sock", "mtu": 1480,
                                "capabilities": {"portMappings": True}}]
    path = tmp_path / "net.d" / "10-bgp-fabric.conflist"
    assert conflist.write(path, conf) is True
    assert conflist.write(path, conf) is False  # unchanged: not touched
    assert json.loads(path.read_text()) == conf and oct(path.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in path.parent.iterdir()] == ["10-bgp-fabric.conflist"]


def cni_agent(tmp_path: Path, mtu: int | None, pod_cidrs: list[str] | None = None):
    c = cfg(cni={"enabled": True, "confDir": str(tmp_path / "net.d"), "stateDir": str(tmp_path / "state"),
                 "socket": str(tmp_path / "cni.sock")})
    store = Store()
    if pod_cidrs:
        store.remember("Node", {"n1": SimpleNamespace(pod_cidrs=[N(p) for p in pod_cidrs])})  # a last-good Node
    view = SimpleNamespace(facts=SimpleNamespace(mtu=mtu)) if mtu else None
    woken: list[str] = []
    runner = SimpleNamespace(states={"cni": 1, "podnat": 1}, wake_threadsafe=woken.append)
    return SimpleNamespace(cfg=c, store=store, routes_stage=SimpleNamespace(view=view), runner=runner,
                           _path=Path), woken


def test_cni_stage_writes_the_conflist_once_pod_cidrs_and_mtu_are_known(tmp_path: Path, monkeypatch) -> None:
    from cni.service import CniService
    monkeypatch.setattr(CniService, "sweep", lambda self: [])  # it reads links: not in this host's namespace
    agent, woken = cni_agent(tmp_path, None)
    st = CniStage(agent)
    try:
        res = run(st, agent)
        assert (tmp_path / "cni.sock").exists() and not (tmp_path / "net.d").exists()
        assert any("pod CIDRs (or its underlay MTU) are not known" in w for w in res.status["warnings"])
        assert st.service is not None and st.service.node is None
        agent2, woken = cni_agent(tmp_path, 1500, ["10.244.1.0/24"])
        st.agent = agent2  # the Node arrived (here: remembered) and the routes stage read the facts
        res = run(st, agent2)
        conf = json.loads((tmp_path / "net.d" / "10-bgp-fabric.conflist").read_text())
        assert conf["plugins"][0]["mtu"] == 1480 and conf["plugins"][0]["socket"] == str(tmp_path / "cni.sock")
        assert res.status["podCIDRs"] == ["10.244.1.0/24"] and res.status["mtu"] == 1480 and "warnings" not in res.status
        st._changed(True)
        assert woken == ["cni", "podnat"]
    finally:
        st.close()
    assert not (tmp_path / "cni.sock").exists()
    assert (tmp_path / "net.d" / "10-bgp-fabric.conflist").exists()  # left for the running pods
