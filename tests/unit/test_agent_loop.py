"""The agent loop itself, with fakes for the kernel, the speaker and the service proxy and the real file
source, under injected failures: a service proxy that raises or hangs, an invalid IPPool at restart,
a source that is not complete yet, two Nodes with one address, an empty or partly bad cluster file."""

from __future__ import annotations

import asyncio
import json
import time
from ipaddress import IPv4Address as A, IPv4Network as N
from pathlib import Path
from typing import Any

import yaml

from bgp.events import EndOfRib, PeerUp, RoutesAnnounced
from fabric import config as cfgmod
from fabric.agent import Agent
from ipip.model import NextHop, Route
from ipip.reconcile import Backoff
from tests.unit.fakes import FakeKernel, FakeServices, FakeSpeaker

NODES = [{"name": "a1", "address": "10.0.1.11", "podCIDRs": ["10.244.1.0/24"]},
         {"name": "a2", "address": "10.0.1.12", "podCIDRs": ["10.244.2.0/24"]},
         {"name": "b1", "address": "10.0.2.21", "podCIDRs": ["10.244.3.0/24"]}]
POOL = {"metadata": {"name": "default"}, "spec": {"cidr": "10.244.0.0/16", "ipipMode": "CrossSubnet"}}
SVC = {"metadata": {"name": "web", "namespace": "default"}, "spec": {"clusterIP": "10.96.0.10"}}


def cluster(path: Path, **extra: Any) -> None:
    doc = {"nodes": NODES, "ipPools": [POOL], "services": [SVC]}
    doc.update(extra)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(path)


class Harness:
    def __init__(self, tmp: Path, kernel: FakeKernel | None = None, **cfg_extra: Any) -> None:
        self.tmp = tmp
        self.kernel = kernel or FakeKernel()
        self.services = FakeServices()
        self.speaker: FakeSpeaker | None = None
        doc = {"node": {"name": "a1", "address": "10.0.1.11/24"},
               "timers": {"gracefulRestartTime": 30, "resyncInterval": 60},
               "source": {"kind": "file", "path": "cluster.yaml"}, "paths": {"runDir": "run"},
               "health": {"listen": None, "stageTimeout": 0.5},
               "networkPolicy": {"enabled": False}}  # real nft in this host's namespace: never (tests pass a fake)
        doc.update(cfg_extra)
        (tmp / "agent.yaml").write_text(yaml.safe_dump(doc))
        self.cfg = cfgmod.load(tmp / "agent.yaml")

    def speaker_factory(self, run_dir: Path, on_event: Any) -> FakeSpeaker:
        self.speaker = FakeSpeaker(run_dir, on_event)
        return self.speaker

    def agent(self, **kw: Any) -> Agent:
        return Agent(self.cfg, self.tmp / "agent.yaml", speaker_factory=self.speaker_factory,
                     service_proxy_factory=lambda agent: self.services, kernel_factory=lambda cfg: self.kernel,
                     monitor=False, sysctls=False, stage_backoff=Backoff(0.05, 0.5), **kw)

    def ours(self) -> set[str]:
        return {str(d) for d, m in self.kernel.ours()}


async def until(what: str, fn, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout}s")
        await asyncio.sleep(0.01)


def run_agent(agent: Agent, body) -> None:
    async def main() -> None:
        task = asyncio.ensure_future(agent.run())
        try:
            await body(agent)
        finally:
            agent._request_stop()
            assert await asyncio.wait_for(task, 10) == 0

    asyncio.run(main())


def learn(agent: Agent, peer: str, nh: str, prefix: str, eor: bool = True) -> None:
    agent._on_bgp_event(PeerUp(peer, A(nh), 30))
    agent._on_bgp_event(RoutesAnnounced(peer, A(nh), (N(prefix),)))
    if eor:
        agent._on_bgp_event(EndOfRib(peer))


def test_converges_and_a_raising_service_stage_loses_no_change(tmp_path: Path) -> None:
    cluster(tmp_path / "cluster.yaml")
    h = Harness(tmp_path)
    h.services.raise_next = 1

    async def body(agent: Agent) -> None:
        learn(agent, "a2", "10.0.1.12", "10.244.2.0/24")
        learn(agent, "b1", "10.0.2.21", "10.244.3.0/24")
        await until("routes", lambda: h.ours() == {"10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24"})
        await until("full service sync after the failure", lambda: h.services.calls, timeout=5)
        assert h.services.calls[0][1] is True  # the failed first (full) run was retried as a full run
        h.services.raise_next = 2
        cluster(tmp_path / "cluster.yaml", services=[SVC, {**SVC, "metadata": {"name": "api", "namespace": "x"}}])
        agent.source.reload()
        await until("change kept across two failures", lambda: "x/api" in h.services.seen("Service"), timeout=8)
        assert agent.runner.status()["services"]["failedRuns"] == 3
        await until("running", lambda: agent.lifecycle.phase.value == "running")
        assert h.speaker.final and {str(p) for p in h.speaker.announced} == {"10.244.1.0/24"}
        assert {n.name for n in h.speaker.neighbors} == {"a2", "b1"}
        assert agent._health("/readyz")[0] == 200 and agent._health("/healthz")[0] == 200

    run_agent(h.agent(), body)
    assert h.kernel.closed and h.services.closed
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "run" / "last-good.json").stat().st_mode & 0o777 == 0o600


def test_a_hung_service_stage_fails_healthz_while_routes_keep_converging(tmp_path: Path) -> None:
    cluster(tmp_path / "cluster.yaml")
    h = Harness(tmp_path)

    async def body(agent: Agent) -> None:
        await until("services ran", lambda: h.services.calls)
        h.services.hang.set()  # the next service sync blocks (a stand-in for a hung nft)
        cluster(tmp_path / "cluster.yaml", services=[SVC, {**SVC, "metadata": {"name": "api", "namespace": "x"}}],
                nodes=NODES + [{"name": "c1", "address": "10.0.1.13", "podCIDRs": ["10.244.4.0/24"]}])
        agent.source.reload()
        t0 = time.monotonic()
        await until("healthz fails", lambda: agent._health("/healthz")[0] == 503, timeout=3)
        took = time.monotonic() - t0
        assert 0.4 < took < 1.5, took  # the documented bound: health.stageTimeout (0.5 s here)
        assert "stage services: a run has been going for" in agent._health("/healthz")[1]
        status_file = tmp_path / "run" / "status.json"
        await until("status.json says stalled", lambda: json.loads(status_file.read_text())["stages"]["services"]
                    ["stalled"], timeout=3)
        # routes and BGP meanwhile: a new node peers, its route is installed
        await until("c1 neighbor", lambda: "c1" in {n.name for n in h.speaker.neighbors})
        learn(agent, "c1", "10.0.1.13", "10.244.4.0/24")
        await until("c1 route", lambda: "10.244.4.0/24" in h.ours())
        h.services.hang.clear()
        await until("healthz recovers", lambda: agent._health("/healthz")[0] == 200, timeout=3)
        await until("change kept", lambda: "x/api" in h.services.seen("Service"))

    run_agent(h.agent(), body)


def test_restart_with_an_invalid_ippool_removes_no_route(tmp_path: Path) -> None:
    """Finding 4: the last good IPPool is persisted; a restarted agent meeting a bad one keeps it."""
    cluster(tmp_path / "cluster.yaml", ipPools=[{**POOL, "spec": {"cidr": "10.244.0.0/16", "ipipMode": "Always"}}])
    h = Harness(tmp_path)

    async def first(agent: Agent) -> None:
        learn(agent, "a2", "10.0.1.12", "10.244.2.0/24")
        await until("routes", lambda: "10.244.2.0/24" in h.ours())
        await until("persisted", lambda: (tmp_path / "run" / "last-good.json").exists())

    run_agent(h.agent(), first)
    before = dict(h.kernel.routes)
    assert before[(N("10.244.2.0/24"), 0)][0].nexthops == (NextHop(A("10.0.1.12"), "tunl0", True),)
    # the pool is edited while the agent is down: host bits (the CRD schema admits them)
    cluster(tmp_path / "cluster.yaml", ipPools=[{**POOL, "spec": {"cidr": "10.244.0.1/16", "ipipMode": "Never"}}])
    writes = h.kernel.writes

    async def second(agent: Agent) -> None:
        await until("running", lambda: agent.lifecycle.phase.value == "holding")
        learn(agent, "a2", "10.0.1.12", "10.244.2.0/24")  # a2 is back and sends its route again
        learn(agent, "b1", "10.0.2.21", "10.244.3.0/24")
        await until("running", lambda: agent.lifecycle.phase.value == "running")
        await asyncio.sleep(0.2)
        snap = agent.snapshot()
        assert any(w.startswith("IPPool/default: spec.cidr") and "keeping its last good version" in w
                   for w in snap["warnings"]), snap["warnings"]
        assert agent.cfg.pools[0].ipip_mode.value == "Always"

    run_agent(h.agent(), second)
    assert h.kernel.routes[(N("10.244.2.0/24"), 0)] == before[(N("10.244.2.0/24"), 0)]
    assert not [k for k in before if k not in h.kernel.routes]  # 0 routes removed
    assert h.kernel.writes - writes == 1  # only b1's new route


def test_end_of_rib_waits_until_the_source_is_complete(tmp_path: Path) -> None:
    """Finding 5: nothing final (no End-of-RIB) before the desired state is known."""
    h = Harness(tmp_path)

    class SlowSource:
        def __init__(self, agent: Agent) -> None:
            self.agent, self.complete, self.problems = agent, False, []

        def start(self, loop: Any) -> None:
            self.agent.store.replace("Node", {})  # a partial list: nothing known yet

        def synced(self) -> bool:
            return self.complete

        def stop(self, loop: Any) -> None:
            pass

    src: list[SlowSource] = []

    async def body(agent: Agent) -> None:
        await until("speaker started", lambda: h.speaker is not None and h.speaker.started)
        await asyncio.sleep(0.3)
        assert not h.speaker.final and agent.lifecycle.phase.value in ("starting", "holding")
        from fabric.sources.file import load_into, parse_cluster_file
        cluster(tmp_path / "cluster.yaml")
        load_into(agent.store, parse_cluster_file(tmp_path / "cluster.yaml"))
        src[0].complete = True
        agent.store.mark_synced("Service")  # wakes the runner
        await until("final", lambda: h.speaker.final)
        assert {str(p) for p in h.speaker.final_with} == {"10.244.1.0/24"}  # the pod CIDR from the Node object

    def factory(agent: Agent) -> SlowSource:
        src.append(SlowSource(agent))
        return src[0]

    run_agent(h.agent(source_factory=factory), body)


def test_two_nodes_with_one_address_skip_one_node_not_every_change(tmp_path: Path) -> None:
    """Finding 8."""
    cluster(tmp_path / "cluster.yaml")
    h = Harness(tmp_path)

    async def body(agent: Agent) -> None:
        await until("neighbors", lambda: h.speaker and {n.name for n in h.speaker.neighbors} == {"a2", "b1"})
        dup = {"name": "a2-clone", "address": "10.0.1.12", "podCIDRs": ["10.244.9.0/24"]}
        new = {"name": "c1", "address": "10.0.1.13", "podCIDRs": ["10.244.4.0/24"]}
        cluster(tmp_path / "cluster.yaml", nodes=NODES + [dup, new])
        agent.source.reload()
        await until("c1 added", lambda: {n.name for n in h.speaker.neighbors} == {"a2", "b1", "c1"})
        await asyncio.sleep(0.1)
        assert any("Node/a2-clone: address 10.0.1.12 is also node a2's" in w for w in agent.snapshot()["warnings"])

    run_agent(h.agent(), body)


def test_empty_cluster_file_is_refused_and_a_bad_entry_skips_only_itself(tmp_path: Path) -> None:
    """Finding 7 (file source): nothing is deleted by an empty file; one bad node is skipped alone."""
    cluster(tmp_path / "cluster.yaml")
    h = Harness(tmp_path)

    async def body(agent: Agent) -> None:
        learn(agent, "a2", "10.0.1.12", "10.244.2.0/24")
        learn(agent, "b1", "10.0.2.21", "10.244.3.0/24")
        await until("routes", lambda: "10.244.3.0/24" in h.ours())
        (tmp_path / "cluster.yaml").write_text("# nothing here\n")
        agent.source.reload()
        await asyncio.sleep(0.3)
        assert "10.244.3.0/24" in h.ours() and {n.name for n in h.speaker.neighbors} == {"a2", "b1"}
        assert any("empty or only comments" in w for w in agent.snapshot()["warnings"])
        bad_b1 = {"name": "b1", "address": "10.0.2.300", "podCIDRs": ["10.244.3.0/24"]}
        new = {"name": "c1", "address": "10.0.1.13", "podCIDRs": ["10.244.4.0/24"]}
        cluster(tmp_path / "cluster.yaml", nodes=[NODES[0], NODES[1], bad_b1, new])
        agent.source.reload()
        await until("c1 added", lambda: {n.name for n in h.speaker.neighbors} == {"a2", "b1", "c1"})
        assert str(agent.store.get("Node", "b1").address) == "10.0.2.21"  # its last good version
        assert any("nodes[2] (b1).address" in w for w in agent.snapshot()["warnings"])

    run_agent(h.agent(), body)


def test_fabric_status_names_the_phase_the_stages_and_a_conflict(tmp_path: Path) -> None:
    from fabric import status as status_mod

    cluster(tmp_path / "cluster.yaml")
    k = FakeKernel()
    k.add_foreign(Route(N("10.244.1.0/24")), proto=2)  # a bridge CNI's route over our pod CIDR
    h = Harness(tmp_path, kernel=k)

    async def body(agent: Agent) -> None:
        await until("running", lambda: agent.lifecycle.phase.value == "running")
        await until("conflict", lambda: "10.244.1.0/24" in agent.snapshot()["stages"]["routes"]["problems"])
        text = status_mod.render(agent.snapshot())
        assert "phase=running" in text and "stage routes" in text and "stage services" in text
        assert "CONFLICT 10.244.1.0/24: not written: another owner's route holds 10.244.1.0/24" in text, text

    run_agent(h.agent(), body)
    assert k.routes[(N("10.244.1.0/24"), 0)][1] == 2  # never replaced


def test_a_route_reflector_node_reflects_and_withdraws_per_change(tmp_path: Path) -> None:
    """a1 is the reflector (label), the mesh is off: a2's and b1's routes are reflected to each other with
    ORIGINATOR_ID and our cluster ID, next hop kept; a withdrawal is passed on; our own CIDR is ours."""
    from bgp.attributes import PathAttributes
    from bgp.events import RoutesWithdrawn
    from fabric.bgp_desired import RR_LABEL

    nodes = [dict(n) for n in NODES]
    nodes[0]["labels"] = {RR_LABEL: "10.0.0.100"}
    cluster(tmp_path / "cluster.yaml", nodes=nodes)
    h = Harness(tmp_path, cluster={"mesh": False})

    async def body(agent: Agent) -> None:
        await until("neighbors", lambda: h.speaker is not None and len(h.speaker.neighbors) == 2)
        assert all(n.route_reflector_client for n in h.speaker.neighbors)
        agent._on_bgp_event(PeerUp("a2", A("10.0.1.12"), 30, A("10.0.1.12")))
        agent._on_bgp_event(PeerUp("b1", A("10.0.2.21"), 30, A("10.0.2.21")))
        agent._on_bgp_event(RoutesAnnounced("a2", A("10.0.1.12"), (N("10.244.2.0/24"),),
                                            PathAttributes(local_pref=100)))
        await until("reflected", lambda: N("10.244.2.0/24") in h.speaker.announced)
        a = h.speaker.announced[N("10.244.2.0/24")]
        assert a.next_hop == A("10.0.1.12") and a.neighbors == frozenset({"b1"})
        assert a.path == PathAttributes(local_pref=100, originator_id=A("10.0.1.12"), cluster_list=(A("10.0.0.100"),))
        assert h.speaker.announced[N("10.244.1.0/24")].path is None  # our own, not a reflection
        await until("routed", lambda: "10.244.2.0/24" in h.ours())  # the reflector routes to it itself (routes stage)
        await until("status", lambda: (agent.runner.status()["bgp"].get("reflector") or {}).get("reflected") == 1)
        agent._on_bgp_event(RoutesWithdrawn("a2", (N("10.244.2.0/24"),)))
        await until("withdrawn", lambda: N("10.244.2.0/24") not in h.speaker.announced)

    run_agent(h.agent(), body)


def test_status_waits_while_routes_are_written_up_to_its_bound(tmp_path: Path, monkeypatch: Any) -> None:
    """The status document is O(routes): while the routes stage writes, a due status write waits for the
    gap between runs, but never longer than STATUS_DEFER_MAX after the last write."""
    import threading

    from fabric import agent as agent_mod

    monkeypatch.setattr(agent_mod, "STATUS_DEFER_MAX", 3.0)
    cluster(tmp_path / "cluster.yaml")
    h = Harness(tmp_path)
    status_file = tmp_path / "run" / "status.json"

    def updated() -> float | None:
        try:
            return json.loads(status_file.read_text())["updated"]
        except (OSError, ValueError):
            return None

    async def body(agent: Agent) -> None:
        await until("routes applied and status written",
                    lambda: agent.routes_stage is not None and agent.routes_stage.applied and updated(), timeout=5)
        h.kernel.hang = threading.Event()
        h.kernel.hang.set()
        learn(agent, "a2", "10.0.1.12", "10.244.2.0/24")  # the routes run that takes it blocks in the kernel
        await until("routes run in progress", lambda: agent.runner.states["routes"].future is not None)
        await asyncio.sleep(0.2)
        u0 = updated()
        agent._schedule_status()  # a write due within STATUS_INTERVAL (as a stage result would ask)
        await asyncio.sleep(1.5)
        assert updated() == u0  # deferred while the routes run goes on
        await until("written at the latest STATUS_DEFER_MAX after the last write", lambda: updated() != u0, timeout=4)
        h.kernel.hang.clear()
        await until("route", lambda: "10.244.2.0/24" in h.ours())

    run_agent(h.agent(), body)
