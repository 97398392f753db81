"""The policy concern with a fake nft: bad objects, failures and recovery, O(change) runs, and the policy
stage inside the agent loop (fakes for kernel, speaker, services; tests.unit.test_agent_loop's harness)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from fabric.policy.reconcile import NftError, PolicyTable
from fabric.policy.sync import PolicySync
from fabric.tracker import Changes, Store
from tests.policy_cases import STEPS, np
from tests.unit.test_agent_loop import NODES, Harness, cluster, run_agent, until


class FakeNft:
    """Records every transaction; `fail` > 0 makes that many runs fail, `hang` blocks runs until released;
    tracks whether our table exists."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.fail = 0
        self.exists = False
        self.hang = threading.Event()
        self.hang.set()

    def table_exists(self) -> bool:
        return self.exists

    def run(self, text: str) -> str:
        self.hang.wait(10)
        if self.fail:
            self.fail -= 1
            raise NftError("nft refused the transaction: injected")
        self.texts.append(text)
        if "delete table inet bgp-fabric-policy\n" in text:
            self.exists = "table inet bgp-fabric-policy {" in text
        return ""


def setup(step_index: int = 3) -> tuple[PolicySync, Store, FakeNft]:
    nft = FakeNft()
    sync = PolicySync("node-1", table=PolicyTable(nft, netlink=False))  # type: ignore[arg-type]
    store = Store()
    step = STEPS[step_index]
    store.replace("Namespace", step.namespaces())
    store.replace("Pod", step.pods())
    store.replace("NetworkPolicy", {f"x/{p['metadata']['name']}": p for p in step.policies})
    return sync, store, nft


def test_first_run_is_full_then_changes_are_deltas() -> None:
    sync, store, nft = setup()
    assert sync.run(store, store.take(), True).how == "full" and "delete table" in nft.texts[-1]
    assert sync.run(store, store.take(), False).how == "none" and len(nft.texts) == 1
    pod = store.get("Pod", "x/b")
    store.upsert("Pod", "x/b", type(pod)(**{**pod.__dict__, "labels": {"pod": "c"}}))  # x/b no longer allowed
    r = sync.run(store, store.take(), False)
    assert r.how == "delta" and nft.texts[-1].startswith("delete element inet bgp-fabric-policy sel-")
    assert "chain" not in nft.texts[-1]  # a pod change touches elements only


def test_bad_policy_is_reported_and_its_last_good_version_stays() -> None:
    sync, store, nft = setup()
    sync.run(store, store.take(), True)
    good = store.get("NetworkPolicy", "x/allow-b")
    bad: dict[str, Any] = {**good, "spec": {**good["spec"], "ingress": [{"from": [{"podSelector": {
        "matchExpressions": [{"key": "pod", "operator": "Near"}]}}]}]}}
    store.upsert("NetworkPolicy", "x/allow-b", bad)
    store.upsert("NetworkPolicy", "x/new-bad", np("new-bad", "x", {"podSelector": [], "policyTypes": ["Ingress"]}))
    store.upsert("NetworkPolicy", "x/deny-y", np("deny-y", "x", {"podSelector": {"matchLabels": {"pod": "c"}},
                                                              "policyTypes": ["Ingress"]}))
    sync.run(store, store.take(), False)
    problems = sync.problem_lines()
    assert any("x/allow-b: spec.ingress[0].from[0].podSelector.matchExpressions[0].operator" in p
               and "last good version stays in force" in p for p in problems), problems
    assert any("x/new-bad: spec.podSelector: must be a mapping (not enforced)" in p for p in problems), problems
    assert set(sync.state.policies) == {"x/allow-b", "x/deny-y"}
    assert sync.state.policies["x/allow-b"].ingress[0].peers is not None  # the last good version
    assert sync.status()["warnings"] == problems
    store.delete("NetworkPolicy", "x/new-bad")
    store.upsert("NetworkPolicy", "x/allow-b", good)
    sync.run(store, store.take(), False)
    assert sync.problem_lines() == []


def test_a_failed_apply_is_followed_by_a_full_replacement_carrying_every_change() -> None:
    sync, store, nft = setup()
    sync.run(store, store.take(), True)
    nft.fail = 1
    store.delete("Pod", "x/b")
    taken = store.take()
    with pytest.raises(NftError):
        sync.run(store, taken, False)
    store.restore(taken)  # what the runner does with a failed run's changes
    r = sync.run(store, store.take(), False)
    assert r.how == "full" and "10.244.1.11" not in nft.texts[-1]  # x/b's address went with it


def test_no_policy_writes_nothing_and_the_last_deletion_removes_the_table() -> None:
    sync, store, nft = setup(0)
    assert sync.run(store, store.take(), True).how == "none" and nft.texts == []
    store.upsert("NetworkPolicy", "x/deny", np("deny", "x", {"podSelector": {}, "policyTypes": ["Ingress"]}))
    assert sync.run(store, store.take(), False).how == "full" and nft.exists
    store.delete("NetworkPolicy", "x/deny")
    assert sync.run(store, store.take(), False).how == "removed" and not nft.exists


def _pod(name: str, ip: str, app: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
            "spec": {"nodeName": "a1", "containers": []}, "status": {"phase": "Running", "podIP": ip}}


def test_policy_stage_in_the_agent_loop_and_a_hung_nft_never_holds_up_routes(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    nft = FakeNft()
    sync = PolicySync("a1", table=PolicyTable(nft, netlink=False))  # type: ignore[arg-type]
    deny = np("deny", "default", {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"]})
    cluster(tmp_path / "cluster.yaml", pods=[_pod("db", "10.244.1.5", "db")], networkPolicies=[deny])
    agent = h.agent(policy_factory=lambda a: sync)

    async def body(agent: Any) -> None:
        await until("the policy table loaded", lambda: nft.exists)
        assert "10.244.1.5 : jump ns-in-default" in nft.texts[-1]
        from fabric import status as status_mod

        await until("the policy stage reported", lambda: "stage policy" in status_mod.render(agent.snapshot()))
        assert "1 policies, 1 pods isolated for ingress and 0 for egress on this node" in \
            status_mod.render(agent.snapshot())
        # nft hangs: the policy stage stalls alone; a new Node still reaches the routes stage meanwhile.
        nft.hang.clear()
        routes_runs = agent.runner.states["routes"].runs
        cluster(tmp_path / "cluster.yaml", pods=[_pod("db", "10.244.1.5", "db"), _pod("db2", "10.244.1.6", "db")],
                networkPolicies=[deny], nodes=[*NODES, {"name": "a3", "address": "10.0.1.13",
                                                        "podCIDRs": ["10.244.4.0/24"]}])
        await until("policy stage running", lambda: agent.runner.states["policy"].future is not None)
        await asyncio.sleep(0.6)  # past health.stageTimeout (0.5 s)
        assert agent.runner.status()["policy"]["stalled"]
        await until("routes ran while policy hung", lambda: agent.runner.states["routes"].runs > routes_runs)
        assert agent.runner.states["policy"].future is not None  # still hung
        nft.hang.set()
        await until("db2 isolated too", lambda: "10.244.1.6 : jump ns-in-default" in "".join(nft.texts))
        await until("the stall cleared", lambda: not agent.runner.status()["policy"]["stalled"])
        # nft refuses once: the run fails, is retried, and the retry replaces the table
        nft.fail = 1
        cluster(tmp_path / "cluster.yaml", pods=[_pod("db", "10.244.1.5", "db")], networkPolicies=[deny])
        await until("db2 gone after the retry", lambda: nft.fail == 0 and nft.texts
                    and "delete table" in nft.texts[-1] and "10.244.1.6" not in nft.texts[-1])

    run_agent(agent, body)
