"""Change tracking between sources and the sync runner (the idea of kube-proxy's change trackers).

Sources (the YAML file source, the Kubernetes watch) only record: `upsert`, `delete`, or `replace`
(a full relist). No-op changes are dropped here, so a relist after a lost watch that finds nothing
new causes no work. Nothing here touches the kernel.

Consumers: every stage of the agent's sync runner subscribes under its own name to the kinds it
reads, and `take(consumer)` returns exactly which keys of those kinds changed since its last take.
A stage whose run fails puts what it took back with `restore(changes, consumer)` (kube-proxy's change
trackers), so a failed sync never loses a change. The default consumer "" sees every kind (tools,
tests); an agent creates its Store without it. `on_change(kind)` tells the runner which kind moved.

`remember(kind, values)` seeds last-good versions (persisted by the agent across restarts):
`last_good(kind, key)` returns the current object or, failing that, the remembered one, so a source
that meets a bad object can keep its last good version even right after a restart.

Kinds and keys:
- "Node": key = node name, value = fabric.inputs.NodeInfo
- "Service": key = "namespace/name", value = the Service as a Kubernetes-shaped dict
- "EndpointSlice": key = "namespace/name" of the slice, value = Kubernetes-shaped dict
- "BGPConfiguration", "BGPPeer", "IPPool": key = name, value = the custom resource as a dict
- "Pod": key = "namespace/name", value = fabric.inputs.PodInfo
- "Namespace": key = name, value = fabric.inputs.NamespaceInfo
- "NetworkPolicy": key = "namespace/name", value = the networking.k8s.io/v1 object as a dict
New kinds are added to KINDS (and recorded by the sources); consumers subscribe to them by name.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

KINDS = ("Node", "Service", "EndpointSlice", "BGPConfiguration", "BGPPeer", "IPPool", "Pod", "Namespace",
         "NetworkPolicy")


def same(a: Any, b: Any) -> bool:
    """`a == b` with types: dicts, lists and tuples compared item by item, every leaf of the same type.
    (Dict keys of one mapping are compared by `==`: they are strings in every object we record.)"""
    return a == b and _same(a, b)


def _same(a: Any, b: Any) -> bool:
    # Only called on values that are already equal: what is left to check is the leaves' types.
    if a is b:
        return True
    t = type(a)
    if t is not type(b):
        return False
    if t is dict:
        for k, v in a.items():
            w = b[k]
            if v is not w and (type(v) is not type(w) or (type(v) in _NESTED and not _same(v, w))):
                return False
        return True
    if t is list or t is tuple:
        for v, w in zip(a, b):
            if v is not w and (type(v) is not type(w) or (type(v) in _NESTED and not _same(v, w))):
                return False
        return True
    return True  # equal leaves of one type (dataclass values compare their typed fields themselves)


_NESTED = (dict, list, tuple)


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
    """Current objects per kind plus, per consumer, the keys changed since its last `take()`. Thread-safe."""

    DEFAULT = ""

    def __init__(self, on_change: Callable[[str], None] | None = None, *, default_consumer: bool = True) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
        self._remembered: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
        self._consumers: dict[str, frozenset[str]] = {}
        self._pending: dict[str, dict[str, set[str]]] = {}
        self._full: dict[str, bool] = {}
        self._synced: set[str] = set()
        self._on_change = on_change
        if default_consumer:
            self.subscribe(self.DEFAULT, KINDS)

    def set_on_change(self, cb: Callable[[str], None] | None) -> None:
        self._on_change = cb

    def subscribe(self, consumer: str, kinds: Iterable[str]) -> None:
        """Track changes of `kinds` for `consumer` from now on."""
        kinds = frozenset(kinds)
        unknown = kinds - set(KINDS)
        if unknown:
            raise KeyError(f"unknown kinds {sorted(unknown)}")
        with self._lock:
            self._consumers[consumer] = kinds
            self._pending[consumer] = {k: set() for k in kinds}
            self._full[consumer] = False

    def _notify(self, kind: str) -> None:
        if self._on_change is not None:
            self._on_change(kind)

    def _record(self, kind: str, keys: Iterable[str]) -> None:
        keys = set(keys)
        if not keys:
            return
        for c, kinds in self._consumers.items():
            if kind in kinds:
                self._pending[c][kind] |= keys

    def upsert(self, kind: str, key: str, value: Any) -> bool:
        """Record an add/update. Returns False (and records nothing) when the value is unchanged."""
        with self._lock:
            objs = self._objects[kind]
            if key in objs and same(objs[key], value):
                return False
            objs[key] = value
            self._record(kind, (key,))
        self._notify(kind)
        return True

    def delete(self, kind: str, key: str) -> bool:
        with self._lock:
            if self._objects[kind].pop(key, None) is None:
                return False
            self._record(kind, (key,))
        self._notify(kind)
        return True

    def replace(self, kind: str, values: Mapping[str, Any]) -> int:
        """Make `kind` hold exactly `values` (a relist). Records only real differences; returns their count."""
        with self._lock:
            objs = self._objects[kind]
            changed = {k for k in objs.keys() - values.keys()}
            changed |= {k for k, v in values.items() if k not in objs or not same(objs[k], v)}
            for k in changed:
                if k in values:
                    objs[k] = values[k]
                else:
                    del objs[k]
            self._record(kind, changed)
            newly_synced = kind not in self._synced
            self._synced.add(kind)
        if changed or newly_synced:
            self._notify(kind)
        return len(changed)

    def mark_synced(self, kind: str) -> None:
        with self._lock:
            new = kind not in self._synced
            self._synced.add(kind)
        if new:
            self._notify(kind)

    def synced(self, kinds: Iterable[str]) -> bool:
        with self._lock:
            return all(k in self._synced for k in kinds)

    def request_full(self, consumer: str | None = None) -> None:
        """The next take() of `consumer` (None: of every consumer) says `full`."""
        with self._lock:
            for c in ([consumer] if consumer is not None else list(self._consumers)):
                self._full[c] = True
        self._notify("")

    def take(self, consumer: str = DEFAULT) -> Changes:
        with self._lock:
            pend = self._pending[consumer]
            ch = Changes({k: v for k, v in pend.items() if v}, self._full[consumer])
            self._pending[consumer] = {k: set() for k in pend}
            self._full[consumer] = False
        return ch

    def restore(self, changes: Changes, consumer: str = DEFAULT) -> None:
        """Put changes taken by `consumer` back (its run failed): its next take() includes them again."""
        with self._lock:
            pend = self._pending[consumer]
            for kind, keys in changes.keys.items():
                if kind in pend:
                    pend[kind] |= keys
            if changes.full:
                self._full[consumer] = True

    def pending(self, consumer: str = DEFAULT) -> bool:
        with self._lock:
            return self._full[consumer] or any(self._pending[consumer].values())

    def get(self, kind: str, key: str) -> Any:
        with self._lock:
            return self._objects[kind].get(key)

    def snapshot(self, kind: str) -> dict[str, Any]:
        """A shallow copy of the current objects of one kind (safe to iterate while sources write)."""
        with self._lock:
            return dict(self._objects[kind])

    def remember(self, kind: str, values: Mapping[str, Any]) -> None:
        """Seed last-good versions (from a previous run) for `last_good()`; not objects of the Store."""
        with self._lock:
            self._remembered[kind] = dict(values)

    def last_good(self, kind: str, key: str) -> Any:
        """The current object, else a remembered last-good one, else None."""
        with self._lock:
            v = self._objects[kind].get(key)
            return v if v is not None else self._remembered[kind].get(key)
