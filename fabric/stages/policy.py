"""The policy stage: Pods, Namespaces, NetworkPolicies -> this node's table `inet bgp-fabric-policy`.

On its own worker: `nft` (10 s timeout, under the stage timeout) or a refused transaction never delays
routes or services. Waits for the source's first complete list: with policies but not yet every pod,
an isolated pod's allowed peers would be missing (a wrongly denied connection); until then the table
of the previous run, if any, stays in force. A failed apply fails the run: the runner puts the
changes back and retries with backoff, and the retry replaces the table whole (fabric.policy.sync).
"""

from __future__ import annotations

from typing import Any

from fabric.policy.nftnl import NetlinkError
from fabric.policy.reconcile import NftError
from fabric.policy.sync import KINDS, PolicySync
from fabric.stage import Stage, StageInput, StageResult


class PolicyStage(Stage):
    name = "policy"
    kinds = frozenset(KINDS)
    on_worker = True
    needs_source = True

    def __init__(self, agent: Any, sync: PolicySync) -> None:
        self.agent = agent
        self.sync = sync

    def run(self, inp: StageInput, prepared: Any) -> StageResult:
        try:
            self.sync.run(self.agent.store, inp.changes, inp.full)
        except (NftError, NetlinkError, OSError) as e:
            return StageResult(error=f"policy table not updated: {e}", status=self.sync.status(),
                               bad_objects=self._bad())
        return StageResult(status=self.sync.status(), bad_objects=self._bad())

    def _bad(self) -> dict[tuple[str, str], str]:
        return {("NetworkPolicy", k): v for k, v in self.sync.bad_policies().items()}

    def close(self) -> None:
        self.sync.close()
