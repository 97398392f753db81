"""The policy table in a real kernel: every incremental path leaves exactly what a full load leaves.

Needs root and nf_tables with the inet family (this machine's kernel has it; the UML lab kernel does
not, so this is not marked `kernel`; the packet-level tests are in test_policy_enforcement.py, marked
`nat`). Runs in network namespaces it creates; no traffic is sent.

Walks the scenario of tests/policy_cases.py (policy adds, updates, deletes, pod and namespace relabels)
plus pod churn: after every step the table that per-key plans (nfnetlink element batches or `nft -f`
deltas) built must equal, object by object, a fresh full load of the same desired state.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric.inputs import PodInfo
from fabric.policy import nft
from fabric.policy.model import parse_policy
from fabric.policy.nftnl import NetlinkError
from fabric.policy.reconcile import NftError, NftRunner, PolicyTable
from fabric.policy.state import PolicyState
from loadbalancer.netns import NetnsThread
from tests.policy_cases import STEPS


def _inet_nft_works() -> bool:
    if os.geteuid() != 0:
        return False
    probe = "table inet p {\n  chain c { type filter hook forward priority 0; ct direction reply accept; }\n}\n"
    r = subprocess.run(["unshare", "-n", "nft", "-c", "-f", "-"], input=probe, capture_output=True, text=True)
    return r.returncode == 0


pytestmark = pytest.mark.skipif(not _inet_nft_works(), reason="needs root and nf_tables with the inet family")


class Ns:
    def __init__(self) -> None:
        self.name = f"polt-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.thread = NetnsThread(self.name)

    def nft(self, *args: str, text: str | None = None) -> str:
        r = subprocess.run(["ip", "netns", "exec", self.name, "nft", *args], input=text, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def close(self) -> None:
        self.thread.close()
        subprocess.run(["ip", "netns", "del", self.name], check=False)


@pytest.fixture
def ns() -> Iterator[Ns]:
    n = Ns()
    try:
        yield n
    finally:
        n.close()


def table_view(n: Ns) -> dict:
    """Our table as comparable data: sets and maps with sorted elements, chains with their rules
    ({} when the table does not exist)."""
    if f"table {nft.FAMILY} {nft.TABLE}\n" not in n.nft("list", "tables") + "\n":
        return {}
    data = json.loads(n.nft("-j", "list", "table", nft.FAMILY, nft.TABLE))["nftables"]
    view: dict = {"sets": {}, "chains": {}}
    for item in data:
        if "set" in item or "map" in item:
            s = item.get("set") or item["map"]
            view["sets"][s["name"]] = sorted(json.dumps(e, sort_keys=True) for e in s.get("elem", []))
        elif "chain" in item:
            view["chains"].setdefault(item["chain"]["name"], [])
        elif "rule" in item:
            r = item["rule"]
            view["chains"].setdefault(r["chain"], []).append(json.dumps(r["expr"], sort_keys=True))
    return view


def fresh_view(n: Ns, state: PolicyState) -> dict:
    """What a full load of `state` leaves; no policy at all means no table."""
    if not state.chains:
        n.nft("-f", "-", text=f"table {nft.FAMILY} {nft.TABLE}\ndelete table {nft.FAMILY} {nft.TABLE}\n")
    else:
        n.nft("-f", "-", text=nft.render_full(state))
    return table_view(n)


def test_incremental_paths_equal_a_full_load(ns: Ns) -> None:
    ref = Ns()
    try:
        table = PolicyTable()
        state = PolicyState("node-1")
        prev: dict[str, dict] = {}
        hows = set()
        ns.nft("add", "table", "ip", "someone-elses")  # never touched by us
        for i, step in enumerate(STEPS):
            for name, info in step.namespaces().items():
                state.set_namespace(name, info)
            for key, pod in step.pods().items():
                state.set_pod(key, pod)
            now = {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p for p in step.policies}
            for key in prev.keys() - now.keys():
                state.set_policy(key, None)
            for key, p in now.items():
                state.set_policy(key, parse_policy(p))
            prev = now
            result = ns.thread.call(table.apply, state, state.take_dirty())
            hows.add(result.how)
            assert table_view(ns) == fresh_view(ref, state), f"step {i}: {step.name} ({result})"
            # pod churn on top: a new pod, a relabel, a delete: element batches only
            extra = PodInfo("x", f"new{i}", {"pod": "a"}, "node-1", (f"10.244.1.{100 + i}",), "Running")
            state.set_pod(extra.key, extra)
            r1 = ns.thread.call(table.apply, state, state.take_dirty())
            state.set_pod(extra.key, PodInfo("x", f"new{i}", {"pod": "b", "role": "client"}, "node-1",
                                             extra.ips, "Running"))
            r2 = ns.thread.call(table.apply, state, state.take_dirty())
            assert table_view(ns) == fresh_view(ref, state), f"step {i}: after pod churn"
            state.set_pod(extra.key, None)
            r3 = ns.thread.call(table.apply, state, state.take_dirty())
            assert {r.how for r in (r1, r2, r3)} <= {"elements", "none"}, (r1, r2, r3)
            hows |= {r1.how, r2.how, r3.how}
        assert {"full", "delta", "elements", "removed"} <= hows and table_view(ns) == {}
        assert "someone-elses" in ns.nft("list", "tables")
    finally:
        ref.close()


def test_drift_and_failures_end_in_a_full_replacement(ns: Ns, tmp_path: Path) -> None:
    step = STEPS[5]
    state = PolicyState("node-1")
    for name, info in step.namespaces().items():
        state.set_namespace(name, info)
    for key, pod in step.pods().items():
        state.set_pod(key, pod)
    for p in step.policies:
        pol = parse_policy(p)
        state.set_policy(pol.key, pol)
    table = PolicyTable()
    ns.thread.call(table.apply, state, state.take_dirty())
    want = table_view(ns)
    # Someone deletes our table: the next element batch is refused, nothing half-applied ...
    ns.nft("delete", "table", nft.FAMILY, nft.TABLE)
    state.set_pod("y/new", PodInfo("y", "new", {"pod": "z"}, "node-1", ("10.244.1.99",), "Running"))
    assert "10.244.1.99" in {ip for s in state.sets.values() for ip in s}
    with pytest.raises(NetlinkError):
        ns.thread.call(table.apply, state, state.take_dirty())
    assert table.applied is None
    # ... and the next attempt replaces the whole table.
    assert ns.thread.call(table.apply, state, state.take_dirty()).how == "full"
    assert table_view(ns) != want and table_view(ns) == fresh_view(ns, state)
    # Drift that no incremental step notices (a flushed chain, a stray element): the periodic full
    # resync puts the table back as desired.
    chain = next(n for n in state.chains if n.startswith("pol-in-"))
    ns.nft("flush", "chain", nft.FAMILY, nft.TABLE, chain)
    ns.nft("add", "element", nft.FAMILY, nft.TABLE, next(iter(n for n in state.sets if n.startswith("sel-"))),
           "{ 10.9.9.9 }")
    assert ns.thread.call(table.apply, state, state.take_dirty()).how == "none"  # nothing changed for us
    drifted = table_view(ns)
    assert ns.thread.call(table.apply, state, state.take_dirty(), full=True).how == "full"
    assert table_view(ns) != drifted and table_view(ns) == fresh_view(ns, state)
    # A hung nft: killed at the timeout, reported, nothing applied; then a working nft repairs.
    hung = tmp_path / "nft"
    hung.write_text("#!/bin/sh\nexec sleep 30\n")
    hung.chmod(hung.stat().st_mode | stat.S_IEXEC)
    stuck = PolicyTable(NftRunner(str(hung), timeout=0.5))
    with pytest.raises(NftError, match="did not finish within 0.5s"):
        ns.thread.call(stuck.apply, state, state.take_dirty())
    missing = PolicyTable(NftRunner(str(tmp_path / "absent")))
    with pytest.raises(NftError, match="not found"):
        ns.thread.call(missing.apply, state, state.take_dirty())
    assert table_view(ns) == fresh_view(ns, state)
