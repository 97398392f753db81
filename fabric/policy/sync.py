"""NetworkPolicy for one node: Store changes -> PolicyState -> PolicyTable (the policy stage's work).

`run(store, changes, full)` folds the changed Pods, Namespaces and NetworkPolicies into the desired
state and applies the difference in one transaction (all of them on a full run). A NetworkPolicy that
can't be parsed is reported (`problems`, logged once) and its last good version stays enforced, as
every other policy does; a new bad one is skipped. A failed apply raises after forgetting what the
kernel holds, so the next attempt (the runner retries with backoff, putting the changes back) replaces
the table whole: a refused transaction left the kernel as it was, but the refusal itself says the table
is not what we believe (someone deleted an element or the table), and a killed `nft` may or may not
have committed. While no policy exists and our table is absent, nothing is written at all (nodes
without inet nftables, such as the UML lab kernel, then run without errors).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from fabric.policy.model import PolicyError, parse_policy
from fabric.policy.reconcile import NftRunner, PolicyTable, Result
from fabric.policy.state import MAPS, PolicyState
from fabric.tracker import Changes

log = logging.getLogger("fabric.policy")

KINDS = ("Namespace", "NetworkPolicy", "Pod")


class PolicySync:
    def __init__(self, node: str, *, table: PolicyTable | None = None, nft_timeout: float = 10.0) -> None:
        self.state = PolicyState(node)
        self.table = table or PolicyTable(NftRunner(timeout=nft_timeout))
        self._lock = threading.Lock()
        self.problems: dict[str, str] = {}  # policy key -> why it is not (or only in its last good version) in force
        self.last: Result | None = None
        self.runs = 0

    def run(self, store: Any, changes: Changes, full: bool) -> Result:
        """Fold the changes in and apply them. Raises NftError/NetlinkError/OSError when the kernel
        refused or did not answer (the next call then replaces the table)."""
        st = self.state
        if full or changes.full:
            pending = {k: set(store.snapshot(k)) | self._known(k) for k in KINDS}
        else:
            pending = {k: changes.of(k) for k in KINDS}
        for name in pending["Namespace"]:
            st.set_namespace(name, store.get("Namespace", name))
        for key in sorted(pending["NetworkPolicy"]):
            self._policy(key, store.get("NetworkPolicy", key))
        for key in pending["Pod"]:
            st.set_pod(key, store.get("Pod", key))
        result = self.table.apply(st, st.take_dirty(), full=full or changes.full)
        self.last, self.runs = result, self.runs + 1
        if result.how != "none":
            log.info("policy: %s", result)
        return result

    def _known(self, kind: str) -> set[str]:
        st = self.state
        return set({"Pod": st.pods, "Namespace": st.namespaces, "NetworkPolicy": st.policies}[kind])

    def bad_policies(self) -> dict[str, str]:
        """NetworkPolicy key -> why it was skipped (or its last good version kept)."""
        with self._lock:
            return dict(self.problems)

    def problem_lines(self) -> list[str]:
        with self._lock:
            return sorted(self.problems.values())

    def _policy(self, key: str, obj: Any) -> None:
        if obj is None:
            with self._lock:
                self.problems.pop(key, None)
            self.state.set_policy(key, None)
            return
        try:
            pol = parse_policy(obj)
        except PolicyError as e:
            kept = "its last good version stays in force" if key in self.state.policies else "not enforced"
            msg = f"{e} ({kept})"
            if self.problems.get(key) != msg:
                log.error("%s", msg)
            with self._lock:
                self.problems[key] = msg
            return
        with self._lock:
            self.problems.pop(key, None)
        self.state.set_policy(key, pol)

    def close(self) -> None:
        self.table.close()

    def status(self) -> dict[str, Any]:
        st = self.state
        iso = {d: len(st.maps[d]) for d in MAPS}
        summary = (f"{len(st.policies)} policies, {iso['ingress']} pods isolated for ingress and {iso['egress']} for "
                   f"egress on this node, {len(st.sets)} sets, {len(st.chains)} chains; last: {self.last or 'none'}")
        return {"summary": summary, "policies": len(st.policies), "pods": len(st.pods),
                "isolated": {d: len(st.maps[d]) for d in MAPS}, "sets": len(st.sets), "chains": len(st.chains),
                "last": str(self.last) if self.last else None, "warnings": self.problem_lines()}
