"""The effective agent configuration: the config file overlaid with cluster objects.

IPPool, BGPPeer and BGPConfiguration objects (Kubernetes custom resources, or the same shapes in a
lab's cluster file) are merged onto the file's config by `fabric.crds` (pure): a bad object is
reported (`Kind/name: field: reason`) and its last good version is kept, so a typo in one object
never flushes working routes. Last good versions survive restarts (fabric.lastgood: `seed()`).
With the Kubernetes source, peer passwords come from Secrets (`secret`) and each bad object is
recorded as a Warning Event (`report`): both block, so the agent runs this on a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fabric.config import AgentConfig
from fabric.crds import KINDS as CRD_KINDS, CrdConfig, Problem, SecretReader
from fabric.tracker import Store


class EffectiveConfig:
    def __init__(self, base: AgentConfig, secret: SecretReader | None = None,
                 report: Callable[[dict[str, Any], str], Any] | None = None) -> None:
        self.base = base
        self._secret = secret
        self._report = report
        self._crds = CrdConfig()

    def seed(self, objects: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
        return self._crds.seed(self.base, {k: v for k, v in objects.items() if k in CRD_KINDS}, self._secret)

    def compute(self, objects: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> tuple[AgentConfig, list[Problem]]:
        cfg, problems = self._crds.effective(self.base, objects, self._secret)
        if self._report is not None:
            for p in problems:
                if p.obj:
                    self._report(dict(p.obj), str(p))
        return cfg, problems

    def from_store(self, store: Store) -> tuple[AgentConfig, list[str]]:
        """The overlay of the objects the Store holds now (no Secrets unless `secret` was given)."""
        cfg, problems = self.compute({k: store.snapshot(k) for k in CRD_KINDS})
        return cfg, [str(p) for p in problems]

    def good_objects(self) -> dict[str, dict[str, Mapping[str, Any]]]:
        return self._crds.good_objects()
