"""The file source (labs, tests, clusters without Kubernetes): cluster state from one YAML file.

The file holds `nodes` (name, address, podCIDRs), `services` and `endpointSlices` (Kubernetes shapes),
the BGP custom resources, and for NetworkPolicy `pods`, `namespaces` and `networkPolicies` (Kubernetes
shapes too). It is re-read when it changes (inotify on its folder, so an atomic rename is seen too)
and on `reload()`.

What is refused, and how much:
- a file that can't be read or parsed, is empty or only comments, is not a mapping, or has an unknown
  top-level key (a typo such as `service:` would otherwise silently mean "no services"): the whole
  file is refused and the last good state stays. A real cluster always has at least this node's own
  Node, so an empty file is an error, never "delete everything".
- one bad entry (a node without an address, a pod with a bad IP, a service that is not a mapping, an
  object without a name): that entry alone is skipped and reported; its last good version stays in
  effect if there was one (this run's, or the previous run's: `Store.last_good`), every other entry
  is applied.
The source is complete (`synced()`) once a file was accepted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fabric.config import ConfigError, format_errors, load_yaml
from fabric.inputs import NodeInfo
from fabric.sources.inotify import DirWatch
from fabric.sources.k8s_convert import SkipObject, convert, key_of
from fabric.tracker import Store

log = logging.getLogger("fabric.source.file")

SECTIONS = {"nodes": "Node", "services": "Service", "endpointSlices": "EndpointSlice", "ipPools": "IPPool",
            "bgpPeers": "BGPPeer", "bgpConfigurations": "BGPConfiguration", "pods": "Pod",
            "namespaces": "Namespace", "networkPolicies": "NetworkPolicy"}
NAMESPACED = {"Service", "EndpointSlice", "NetworkPolicy"}
CONVERTED = {"Pod", "Namespace"}  # reduced to what their consumer reads (fabric.sources.k8s_convert)


class ClusterFile:
    """A parsed cluster file: kind -> key -> value, and the entries skipped (reasons)."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {k: {} for k in SECTIONS.values()}
        self.problems: list[str] = []

    @property
    def nodes(self) -> dict[str, NodeInfo]:
        return self.objects["Node"]


def _object_key(kind: str, obj: Any) -> str | None:
    md = obj.get("metadata") if isinstance(obj, dict) else None
    name = md.get("name") if isinstance(md, dict) else None
    if not isinstance(name, str) or not name:
        return None
    if kind in NAMESPACED:
        ns = md.get("namespace") or "default"
        return f"{ns}/{name}" if isinstance(ns, str) else None
    return name


def parse_cluster_file(path: Path) -> ClusterFile:
    """Raises ConfigError when the file as a whole can't be used; skips (and reports) bad entries."""
    data = load_yaml(path)
    if data is None:
        raise ConfigError(["(file): empty or only comments; a cluster always has at least this node's own "
                           "Node (refused: an empty file would remove every service and route)"], str(path))
    if not isinstance(data, dict):
        raise ConfigError([f"(top level): must be a mapping, got {type(data).__name__}"], str(path))
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError([f"{k}: unknown key (known: {', '.join(SECTIONS)})" for k in unknown], str(path))
    out = ClusterFile()
    for section, kind in SECTIONS.items():
        items = data.get(section)
        if items is None:
            continue
        if not isinstance(items, list):
            raise ConfigError([f"{section}: must be a list, got {type(items).__name__}"], str(path))
        for i, item in enumerate(items):
            if kind == "Node":
                try:
                    node = NodeInfo.model_validate(item)
                except ValidationError as e:
                    name = item.get("name") if isinstance(item, dict) else None
                    out.problems += [f"{section}[{i}]{f' ({name})' if name else ''}.{line}" for line in format_errors(e)]
                    if isinstance(name, str) and name:
                        out.objects[kind].setdefault(name, None)  # bad: its last good version, if any
                    continue
                key, value = node.name, node
            elif kind in CONVERTED:
                try:
                    key, value = convert(kind, item if isinstance(item, dict) else {})
                except SkipObject as e:
                    out.problems.append(f"{section}[{i}]: skipped {e}")
                    try:
                        out.objects[kind].setdefault(key_of(kind, item), None)
                    except (SkipObject, AttributeError):
                        pass
                    continue
            else:
                key = _object_key(kind, item)
                if key is None:
                    out.problems.append(f"{section}[{i}]: must be a mapping with metadata.name")
                    continue
                value = item
            if key in out.objects[kind] and out.objects[kind][key] is not None:
                out.problems.append(f"{section}[{i}]: {kind} {key} appears twice; the first one is used")
                continue
            out.objects[kind][key] = value
    return out


def load_into(store: Store, parsed: ClusterFile) -> int:
    """Record a parsed file as a relist: only real differences become changes. A bad entry (None)
    keeps its last good version when there is one, else it is absent."""
    n = 0
    for kind, objs in parsed.objects.items():
        values = {}
        for key, v in objs.items():
            if v is None:
                v = store.last_good(kind, key)
                if v is None:
                    continue
            values[key] = v
        n += store.replace(kind, values)
    return n


class FileSource:
    def __init__(self, store: Store, path: Path) -> None:
        self.store = store
        self.path = path
        self.problems: list[str] = []
        self.error: list[str] = []  # why the file as it is now is refused (the last good state stays)
        self.loaded_at: float | None = None  # wall clock of the last accepted read
        self.refused_at: float | None = None  # wall clock of the last refused read
        self.on_change: Callable[[], None] | None = None  # problems changed: the agent rewrites its status
        self._loaded = False
        self._skipped: list[str] = []  # entries skipped from the file in effect
        self._watch: DirWatch | None = None

    def synced(self) -> bool:
        return self._loaded

    def state(self) -> dict[str, Any]:
        return {"kind": "file", "path": str(self.path), "synced": self._loaded, "loadedAt": self.loaded_at,
                "refusedAt": self.refused_at if self.error else None, "error": list(self.error),
                "skipped": [p for p in self.problems if p not in self.error]}

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def reload(self) -> bool:
        try:
            parsed = parse_cluster_file(self.path)
        except ConfigError as e:
            problems = [f"{self.path}: {p}" for p in e.problems]
            if problems != self.error:
                for p in problems:
                    log.error("cluster file refused, keeping the last good state: %s", p)
            # The entries skipped from the last good file still stand; the refusal comes first.
            before = self.problems
            self.error, self.refused_at = problems, time.time()
            self.problems = problems + [p for p in self._skipped]
            if self.problems != before:
                self._changed()
            return False
        problems = [f"{self.path}: {p}" for p in parsed.problems]
        for p in problems:
            if p not in self.problems:
                log.error("cluster file entry skipped (its last good version, if any, stays): %s", p)
        if self.error:
            log.info("cluster file %s accepted again", self.path)
        changed_problems = problems != self.problems
        self.problems, self._skipped, self.error = problems, problems, []
        self.loaded_at = time.time()
        if changed_problems:
            self._changed()
        changed = load_into(self.store, parsed)
        self._loaded = True
        log.info("cluster file %s loaded: %d node(s), %d service(s), %d pod(s), %d network polic(ies), "
                 "%d change(s)%s", self.path, len(parsed.objects["Node"]), len(parsed.objects["Service"]),
                 len(parsed.objects["Pod"]), len(parsed.objects["NetworkPolicy"]), changed,
                 f", {len(problems)} entr{'y' if len(problems) == 1 else 'ies'} skipped" if problems else "")
        return True

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.reload()
        self._watch = DirWatch(str(self.path.parent))
        loop.add_reader(self._watch.fd, self._on_inotify)

    def _on_inotify(self) -> None:
        assert self._watch is not None
        if self.path.name in self._watch.read_names():
            self.reload()

    def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._watch is not None:
            loop.remove_reader(self._watch.fd)
            self._watch.close()
            self._watch = None
