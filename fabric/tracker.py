"""Change tracking between sources and the sync runner (the idea of kube-proxy's change trackers).

Sources (the YAML file source, the Kubernetes watch) only record: `upsert`, `delete`, or `replace`
(a full relist). No-op changes are dropped here, so a relist after a lost watch that finds nothing
new causes no work. The sync runner calls `take()` to get exactly which keys changed since the last
sync, and reads current objects from `objects`. Nothing here touches the kernel.

Kinds and keys:
- "Node": key = node name, value = fabric.inputs.NodeInfo
- "Service": key = "namespace/name", value = the Service as a Kubernetes-shaped dict
- "EndpointSlice": key = "namespace/name" of the slice, value = Kubernetes-shaped dict
- "BGPConfiguration", "BGPPeer", "IPPool": key = name, value = the custom resource as a dict
- "Pod": key = "namespace/name", value = fabric.inputs.PodInfo
- "Namespace": key = name, value = fabric.inputs.NamespaceInfo
- "NetworkPolicy": key = "namespace/name", value = the networking.k8s.io/v1 object as a dict
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

KINDS = ("Node", "Service", "EndpointSlice", "BGPConfiguration", "BGPPeer", "IPPool", "Pod", "Namespace",
         "NetworkPolicy")


@dataclass
class Changes:
    """What changed since the previous take(): kind -> keys (added, updated or deleted)."""

    keys: dict[str, set[str]] = field(default_factory=dict)
    full: bool = False  # a full resync was requested: treat everything as changed

    def __bool__(self) -> bool:
        return self.full or any(self.keys.values())

    def of(self, kind: str) -> set[str]:
        return self.keys.get(kind, set())


class Store:
    """Current objects per kind plus the set of keys changed since the last `take()`. Thread-safe."""

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
        self._pending: dict[str, set[str]] = {k: set() for k in KINDS}
        self._synced: set[str] = set()
        self._full = False
        self._on_change = on_change

    def set_on_change(self, cb: Callable[[], None] | None) -> None:
        self._on_change = cb

    def _notify(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def upsert(self, kind: str, key: str, value: Any) -> bool:
        """Record an add/update. Returns False (and records nothing) when the value is unchanged."""
        with self._lock:
            objs = self._objects[kind]
            if key in objs and objs[key] == value:
                return False
            objs[key] = value
            self._pending[kind].add(key)
        self._notify()
        return True

    def delete(self, kind: str, key: str) -> bool:
        with self._lock:
            if self._objects[kind].pop(key, None) is None:
                return False
            self._pending[kind].add(key)
        self._notify()
        return True

    def replace(self, kind: str, values: Mapping[str, Any]) -> int:
        """Make `kind` hold exactly `values` (a relist). Records only real differences; returns their count."""
        with self._lock:
            objs = self._objects[kind]
            changed = {k for k in objs.keys() - values.keys()}
            changed |= {k for k, v in values.items() if objs.get(k) != v}
            for k in changed:
                if k in values:
                    objs[k] = values[k]
                else:
                    del objs[k]
            self._pending[kind] |= changed
            newly_synced = kind not in self._synced
            self._synced.add(kind)
        if changed or newly_synced:
            self._notify()
        return len(changed)

    def mark_synced(self, kind: str) -> None:
        with self._lock:
            new = kind not in self._synced
            self._synced.add(kind)
        if new:
            self._notify()

    def synced(self, kinds: Iterable[str]) -> bool:
        with self._lock:
            return all(k in self._synced for k in kinds)

    def request_full(self) -> None:
        with self._lock:
            self._full = True
        self._notify()

    def take(self) -> Changes:
        with self._lock:
            ch = Changes({k: v for k, v in self._pending.items() if v}, self._full)
            self._pending = {k: set() for k in KINDS}
            self._full = False
        return ch

    def get(self, kind: str, key: str) -> Any:
        with self._lock:
            return self._objects[kind].get(key)

    def snapshot(self, kind: str) -> dict[str, Any]:
        """A shallow copy of the current objects of one kind (safe to iterate while sources write)."""
        with self._lock:
            return dict(self._objects[kind])
