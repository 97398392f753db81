"""The file source (labs, tests, clusters without Kubernetes): cluster state from one YAML file.

The file holds `nodes` (name, address, podCIDRs), `services` and `endpointSlices` (Kubernetes
shapes), and for NetworkPolicy `pods`, `namespaces` and `networkPolicies` (Kubernetes shapes too; a
pod or namespace that can't be used is skipped and reported, the rest of the file applies). It is re-read when it changes (inotify on its folder, so an atomic rename is seen too)
and on `reload()`. A file that fails to parse changes nothing: the last good state stays and the
problem is reported — the agent never flushes working routes because of a bad file.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fabric.config import ConfigError, format_errors, load_yaml
from fabric.inputs import ClusterState
from fabric.sources.inotify import DirWatch
from fabric.sources.k8s_convert import SkipObject, convert
from fabric.tracker import Store

log = logging.getLogger("fabric.source.file")


def _key(obj: dict[str, Any]) -> str:
    md = obj.get("metadata") or {}
    return f"{md.get('namespace', 'default')}/{md.get('name', '?')}"


def parse_cluster_file(path: Path) -> ClusterState:
    data = load_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"(top level): must be a mapping, got {type(data).__name__}"], str(path))
    try:
        return ClusterState.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e), str(path)) from None


def _converted(kind: str, objs: list[Any], problems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for obj in objs:
        try:
            key, value = convert(kind, obj if isinstance(obj, dict) else {})
        except SkipObject as e:
            problems.append(f"skipped {e}")
            continue
        out[key] = value
    return out


def load_into(store: Store, state: ClusterState, problems: list[str] | None = None) -> int:
    """Record a full state as a relist: only real differences become changes.

    Pods and Namespaces that can't be used are left out, each with a line in `problems`."""
    skipped: list[str] = [] if problems is None else problems
    n = store.replace("Node", {node.name: node for node in state.nodes})
    n += store.replace("Service", {_key(s): s for s in state.services if isinstance(s, dict)})
    n += store.replace("EndpointSlice", {_key(s): s for s in state.endpoint_slices if isinstance(s, dict)})
    for kind, objs in (("IPPool", state.ip_pools), ("BGPPeer", state.bgp_peers),
                       ("BGPConfiguration", state.bgp_configurations)):
        n += store.replace(kind, {(o.get("metadata") or {}).get("name", "?"): o for o in objs if isinstance(o, dict)})
    n += store.replace("Namespace", _converted("Namespace", state.namespaces, skipped))
    n += store.replace("Pod", _converted("Pod", state.pods, skipped))
    n += store.replace("NetworkPolicy", {_key(o): o for o in state.network_policies if isinstance(o, dict)})
    return n


class FileSource:
    def __init__(self, store: Store, path: Path) -> None:
        self.store = store
        self.path = path
        self.problems: list[str] = []
        self._watch: DirWatch | None = None

    def reload(self) -> bool:
        try:
            state = parse_cluster_file(self.path)
        except ConfigError as e:
            self.problems = [f"{self.path}: {p}" for p in e.problems]
            for p in self.problems:
                log.error("cluster file rejected, keeping the last good state: %s", p)
            return False
        skipped: list[str] = []
        changed = load_into(self.store, state, skipped)
        for p in skipped:
            if p not in self.problems:
                log.warning("cluster file %s: %s", self.path, p)
        self.problems = skipped
        log.info("cluster file %s loaded: %d node(s), %d service(s), %d pod(s), %d network polic(ies), "
                 "%d change(s)", self.path, len(state.nodes), len(state.services), len(state.pods),
                 len(state.network_policies), changed)
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
