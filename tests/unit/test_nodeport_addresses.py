"""services.nodePortAddresses as kube-proxy's --nodeport-addresses: NodePorts on every address of the
node's interfaces inside the CIDRs (not the service device's, the tunnel's or loopback), followed when
addresses come and go; empty: node.address only. The pure choice, the stage's reads (only on a full run
or an address event), a failed read retried, and the agent's monitor waking the stage."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fabric import agent as agent_mod
from fabric.config import parse
from fabric.node_addresses import nodeport_addresses
from fabric.stage import StageInput
from fabric.stages.services import ServicesStage
from fabric.tracker import Changes, Store
from ipip import netlink as nl
from ipip import rtnl

A = ipaddress.IPv4Address
N = ipaddress.IPv4Network
LOCAL = [("eth0", A("10.0.1.11")), ("eth1", A("192.168.5.11")), ("eth1", A("192.168.5.12")),
         ("fabric-svc", A("192.168.5.200")), ("tunl0", A("192.168.5.1")), ("lo", A("127.0.0.1")),
         ("eth2", A("172.16.0.1"))]


def test_the_choice_is_kube_proxys() -> None:
    own = ("fabric-svc", "tunl0")
    assert nodeport_addresses(A("10.0.1.11"), [], LOCAL, own) == ("10.0.1.11",)
    assert nodeport_addresses(A("10.0.1.11"), [N("192.168.5.0/24")], LOCAL, own) == ("192.168.5.11", "192.168.5.12")
    assert nodeport_addresses(A("10.0.1.11"), [N("0.0.0.0/0")], LOCAL, own) == (
        "10.0.1.11", "172.16.0.1", "192.168.5.11", "192.168.5.12")
    assert nodeport_addresses(A("10.0.1.11"), [N("127.0.0.0/8")], LOCAL, own) == ()  # no IPVS on loopback


class FakeSync:
    def __init__(self) -> None:
        self.addresses: list[tuple[str, ...]] = []
        self.runs = 0

    def set_node_addresses(self, a: tuple[str, ...]) -> None:
        self.addresses.append(a)

    def sync(self, store: Any, changes: Any, full: bool) -> None:
        self.runs += 1


def stage_with(cidrs: list[str]) -> tuple[ServicesStage, FakeSync, list[list[tuple[str, A]]], list[int]]:
    cfg = parse({"node": {"name": "a1", "address": "10.0.1.11/24"}, "source": {"kind": "file", "path": "c.yaml"},
                 "services": {"nodePortAddresses": cidrs}})
    sync = FakeSync()
    local: list[list[tuple[str, A]]] = [list(LOCAL)]
    reads = [0]
    fail = [0]

    def read() -> list[tuple[str, A]]:
        reads[0] += 1
        if fail[0]:
            fail[0] -= 1
            raise OSError("address dump: timed out")
        return local[0]

    st = ServicesStage(SimpleNamespace(cfg=cfg, store=Store()), lambda a: sync, read_addresses=read)
    st.fail = fail  # type: ignore[attr-defined]
    return st, sync, local, reads


def run(st: ServicesStage, full: bool = False):
    return st.run(StageInput(Changes({}, False), full, 0.0, True), None)


def test_the_stage_reads_on_full_runs_and_address_events_only() -> None:
    st, sync, local, reads = stage_with(["192.168.5.0/24"])
    run(st, full=True)
    assert sync.addresses == [("192.168.5.11", "192.168.5.12")] and reads == [1]
    run(st)
    run(st)
    assert reads == [1], "no event, no read"
    local[0] = [x for x in LOCAL if x[1] != A("192.168.5.12")] + [("eth3", A("192.168.5.99"))]
    st.addresses_changed()
    r = run(st)
    assert sync.addresses[-1] == ("192.168.5.11", "192.168.5.99") and reads == [2]
    assert r.status["nodePortAddresses"] == ["192.168.5.11", "192.168.5.99"]
    st.addresses_changed()
    run(st)
    assert len(sync.addresses) == 2, "the same addresses: the proxy is not told (no full plan)"


def test_a_failed_read_fails_the_run_and_its_retry_reads_again() -> None:
    st, sync, local, reads = stage_with(["192.168.5.0/24"])
    st.fail[0] = 1  # type: ignore[attr-defined]
    r = run(st, full=True)
    assert r.error and "timed out" in r.error and sync.runs == 0 and sync.addresses == []
    run(st)  # the runner's retry (not full): still reads
    assert sync.addresses == [("192.168.5.11", "192.168.5.12")] and reads == [2] and sync.runs == 1


def test_empty_means_the_node_address_and_no_read() -> None:
    st, sync, _, reads = stage_with([])
    run(st, full=True)
    st.addresses_changed()
    run(st)
    assert sync.addresses == [("10.0.1.11",)] and reads == [0]


@pytest.mark.parametrize("cidrs,woken", [(["192.168.5.0/24"], True), ([], False)])
def test_an_address_event_wakes_the_services_stage(monkeypatch: pytest.MonkeyPatch, cidrs: list[str],
                                                   woken: bool) -> None:
    st, _, _, _ = stage_with(cidrs)
    st._addresses_changed = False
    woke: list[str | None] = []
    fake = SimpleNamespace(
        cfg=st.agent.cfg, _monitor=None,
        routes_stage=SimpleNamespace(view=SimpleNamespace(facts=object(), tunnel=None), kernel_event=lambda *a: False,
                                     facts_changed=lambda: None),
        runner=SimpleNamespace(states={"services": SimpleNamespace(stage=st)}, wake=woke.append))
    body = rtnl.encode_addr("add", 7, A("192.168.5.99"), 32, 1, 0)[16:]
    monkeypatch.setattr(agent_mod.nl, "drain", lambda sock: [(rtnl.RTM_NEWADDR, 0, 0, body)])
    agent_mod.Agent._on_monitor(fake)  # type: ignore[arg-type]
    assert (woke == ["services"]) is woken and st._addresses_changed is woken
    assert nl.NLMSG_ERROR == 2


def test_config_field_documented() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "services.md").read_text()
    assert "kube-proxy's `--nodeport-addresses`" in text
