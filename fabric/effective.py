"""The effective agent configuration: the config file overlaid with cluster objects.

IPPool, BGPPeer and BGPConfiguration objects (Kubernetes custom resources, or the same shapes in a
lab's cluster file) are merged onto the file's config by `fabric.crds` (pure): a bad object is
reported (`Kind/name: field: reason`) and its last good version is kept, so a typo in one object
never flushes working routes. With the Kubernetes source, the source does it (it reads peer
password Secrets and records Events), so it runs on a worker thread.
"""

from __future__ import annotations

from typing import Any

from fabric.config import AgentConfig
from fabric.crds import KINDS as CRD_KINDS, CrdConfig
from fabric.tracker import Store


class EffectiveConfig:
    def __init__(self, base: AgentConfig) -> None:
        self.base = base
        self._crds = CrdConfig()

    def from_store(self, store: Store) -> tuple[AgentConfig, list[str]]:
        """For the file source: no Secrets (a secretKeyRef is reported as a problem for that peer)."""
        objects: dict[str, Any] = {k: store.snapshot(k) for k in CRD_KINDS}
        cfg, problems = self._crds.effective(self.base, objects, None)
        return cfg, [str(p) for p in problems]
