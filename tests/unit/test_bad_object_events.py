"""Bad objects leave the operator a Warning Event on the object, as the CRDs' do: a Node or Pod the source
skips, a NetworkPolicy the policy stage can't parse, a Service the proxy skips. Once per object and
reason, in the namespace the API server accepts, and never on the agent's event loop: an API server
that hangs on Events delays no stage."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from fabric.agent import Agent
from fabric.policy.reconcile import PolicyTable
from fabric.policy.sync import PolicySync
from fabric.sources.events import EventSender
from tests.fakeapi import FakeApiServer
from tests.fakeapi.__main__ import KUBECONFIG
from tests.unit.test_agent_loop import Harness, run_agent, until
from tests.unit.test_policy_sync import FakeNft

NODE = {"metadata": {"name": "a1"}, "spec": {"podCIDRs": ["10.244.1.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.0.1.11"}]}}
BAD_NODE = {"metadata": {"name": "b9"}, "spec": {"podCIDRs": ["10.244.9.0/24"]}, "status": {"addresses": []}}
NS = {"metadata": {"name": "shop", "labels": {"team": "shop"}}}
BAD_POLICY = {"metadata": {"name": "bad", "namespace": "shop"},
              "spec": {"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP", "port": 1}]}]}}
GOOD_POLICY = {"metadata": {"name": "ok", "namespace": "shop"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
SVC = {"metadata": {"name": "web", "namespace": "shop"}, "spec": {"clusterIP": "10.96.0.10",
                                                                   "ports": [{"port": 80, "protocol": "TCP"}]}}


class SkippingServices:
    """The services concern's contract as the stage reads it: skipped() names services not programmed."""

    def __init__(self) -> None:
        self.skip: dict[str, str] = {}
        self.runs = 0

    def sync(self, store: Any, changes: Any, full: bool) -> None:
        self.runs += 1

    def skipped(self) -> dict[str, str]:
        return dict(self.skip)

    def status(self) -> dict:
        return {"skipped": dict(self.skip)}

    def close(self) -> None:
        pass


def events(api: FakeApiServer) -> list[tuple[str, str, str, str, str]]:
    return sorted((e["metadata"]["namespace"], e["involvedObject"]["kind"], e["involvedObject"]["name"],
                   e["involvedObject"].get("uid", ""), e["message"]) for e in list(api.events))


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with FakeApiServer() as api:
        (tmp_path / "kubeconfig").write_text(KUBECONFIG.format(url=api.url))
        for kind, obj in (("Node", NODE), ("Node", BAD_NODE), ("Namespace", NS), ("Service", SVC),
                          ("NetworkPolicy", GOOD_POLICY), ("NetworkPolicy", BAD_POLICY)):
            api.apply(kind, obj)
        monkeypatch.setenv("NODE_NAME", "a1")
        monkeypatch.setenv("POD_NAMESPACE", "bgp-fabric")
        h = Harness(tmp_path, source={"kind": "kubernetes", "kubeconfig": str(tmp_path / "kubeconfig")})
        svc = SkippingServices()
        svc.skip = {"shop/web": "spec.ports[0].port: 80 is used twice"}
        agent = Agent(h.cfg, tmp_path / "agent.yaml", speaker_factory=h.speaker_factory,
                      service_proxy_factory=lambda a: svc, kernel_factory=lambda cfg: h.kernel, monitor=False,
                      sysctls=False, policy_factory=lambda a: PolicySync("a1", table=PolicyTable(FakeNft(), netlink=False)))
        yield api, agent, svc


def test_each_bad_object_gets_one_warning_event_in_its_namespace(setup) -> None:
    api, agent, svc = setup

    async def body(a: Agent) -> None:
        await until("three events", lambda: len(api.events) >= 3, timeout=10)
        got = events(api)
        assert [(ns, k, n) for ns, k, n, _, _ in got] == [
            ("default", "Node", "b9", ), ("shop", "NetworkPolicy", "bad"), ("shop", "Service", "web")], got
        assert all(u for _, _, _, u, _ in got), "every Event names its object's uid"
        msgs = {k: m for _, k, _, _, m in got}
        assert "b9" in msgs["Node"] and "InternalIP" in msgs["Node"]
        assert "ICMP" in msgs["NetworkPolicy"] and msgs["Service"] == "spec.ports[0].port: 80 is used twice"
        # more runs of every stage (a full resync) and a relist: still one Event each
        runs = svc.runs
        a.runner.wake(full=True)
        await until("another services run", lambda: svc.runs > runs, timeout=10)
        time.sleep(0.3)
        assert len(api.events) == 3
        # the same Service skipped for another reason: one more Event
        svc.skip = {"shop/web": "spec.ports[1].port: -1 is not a port"}
        a.runner.wake(full=True)
        await until("the new reason's event", lambda: len(api.events) == 4, timeout=10)
        assert [e for e in events(api) if e[1] == "Service"][-1][4] == "spec.ports[1].port: -1 is not a port"

    run_agent(agent, body)


def test_an_api_server_hanging_on_events_delays_no_stage(setup) -> None:
    api, agent, svc = setup
    api.hang_events.set()

    async def body(a: Agent) -> None:
        try:
            await until("the stages to run with Events hanging", lambda: svc.runs >= 1 and
                        (a.runner.status().get("policy") or {}).get("runs", 0) >= 1, timeout=10)
            # the event loop is free: the speaker got its neighbors and announcement meanwhile
            await until("announced", lambda: a.runner.status()["bgp"].get("runs", 0) >= 1, timeout=5)
            assert api.events == []
        finally:
            api.hang_events.clear()
        await until("the Events once the API answers", lambda: len(api.events) == 3, timeout=10)

    t0 = time.monotonic()
    run_agent(agent, body)
    assert time.monotonic() - t0 < 20


def test_the_sender_never_blocks_and_drops_when_full() -> None:
    sent: list[str] = []
    gate = __import__("threading").Event()

    def send(obj: dict, msg: str) -> bool:
        gate.wait(5)
        sent.append(msg)
        return True

    s = EventSender(send, size=2)
    s.start()
    t0 = time.monotonic()
    results = [s.submit({}, str(i)) for i in range(10)]  # the first is taken by the thread, two queue
    assert time.monotonic() - t0 < 0.5
    assert results.count(False) >= 7 and s.dropped == results.count(False)
    gate.set()
    s.stop(2)
    assert sent[0] == "0" and len(sent) == results.count(True)
