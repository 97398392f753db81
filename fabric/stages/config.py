"""The config stage: the effective configuration (config file + IPPool/BGPPeer/BGPConfiguration objects)
and the last-good objects persisted in the run dir.

On its own worker (with the Kubernetes source it reads peer Secrets and records Events: blocking).
Until the source has listed every kind once, the effective configuration comes from the persisted
last-good objects, not from a half-filled Store; afterwards from the Store, each bad object replaced
by its last good version. A new configuration is published to the agent, which re-runs the stages
that depend on it in full.
"""

from __future__ import annotations

import logging
from typing import Any

from fabric import lastgood
from fabric.config import AgentConfig
from fabric.crds import KINDS as CRD_KINDS
from fabric.effective import EffectiveConfig
from fabric.stage import Stage, StageInput, StageResult

log = logging.getLogger("fabric.config")


def block_size_problems(pools: Any, nodes: dict[str, Any]) -> list[str]:
    """Nodes whose pod CIDR in a pool with a blockSize has another prefix length (O(nodes x pools))."""
    out = []
    for name, n in sorted(nodes.items()):
        for c in getattr(n, "pod_cidrs", None) or []:
            for p in pools:
                if p.block_size is not None and c.subnet_of(p.cidr) and c.prefixlen != p.block_size:
                    out.append(f"node {name}: pod CIDR {c} is a /{c.prefixlen}, pool {p.cidr} says blockSize "
                               f"{p.block_size} (the cluster's node IPAM and the pool disagree; routing still works)")
    return out


class ConfigStage(Stage):
    name = "config"
    kinds = frozenset({"Node", *CRD_KINDS})
    on_worker = True
    needs_source = False

    def __init__(self, agent: Any, effective: EffectiveConfig, remembered: dict[str, dict[str, Any]]) -> None:
        self.agent = agent
        self.effective = effective
        self.remembered = remembered  # last-good objects of the previous run (fabric.lastgood)
        self.problems: list[str] = []
        self.from_complete = False
        self._saved: dict[str, Any] | None = None
        self.persist_error: str | None = None
        self.block_problems: list[str] = []

    def compute(self, complete: bool) -> AgentConfig:
        """The effective config from the Store (complete source) or from the persisted objects."""
        store = self.agent.store
        if complete:
            objects = {k: store.snapshot(k) for k in CRD_KINDS}
        else:
            objects = {k: dict(self.remembered.get(k, {})) for k in CRD_KINDS}
        cfg, problems = self.effective.compute(objects)
        new = [str(p) for p in problems]
        for p in new:
            if p not in self.problems:
                log.error("cluster object rejected, keeping its last good version: %s", p)
        self.problems = new
        self.from_complete = complete
        return cfg

    def run(self, inp: StageInput, prepared: Any) -> StageResult:
        crd = inp.full or any(inp.changes.of(k) for k in CRD_KINDS) or (inp.complete and not self.from_complete)
        if crd:
            self.agent.publish_config(self.compute(inp.complete), inp.complete)
        if inp.complete and (crd or inp.changes.of("Node")):
            self._persist()
        if crd or inp.changes.of("Node"):
            blocks = block_size_problems(self.agent.cfg.pools, self.agent.store.snapshot("Node"))
            for b in blocks:
                if b not in self.block_problems:
                    log.warning("%s", b)
            self.block_problems = blocks
        status: dict[str, Any] = {"fromCompleteSource": self.from_complete,
                                  "warnings": list(self.problems) + self.block_problems}
        if self.persist_error:
            status["errors"] = [self.persist_error]
        return StageResult(status=status)

    def _persist(self) -> None:
        objects: dict[str, dict[str, Any]] = {"Node": self.agent.store.snapshot("Node")}
        objects.update({k: dict(v) for k, v in self.effective.good_objects().items()})
        data = lastgood.dump(objects)
        if data == self._saved:
            return
        try:
            lastgood.save(self.agent.run_dir, objects)
            self._saved, self.persist_error = data, None
        except OSError as e:
            self.persist_error = f"cannot persist last-good objects in {self.agent.run_dir}: {e.strerror or e}"
            log.error("%s", self.persist_error)
