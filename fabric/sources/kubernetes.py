"""The Kubernetes source: list + watch Nodes, Services, EndpointSlices, the bgp-fabric.io CRDs, and for
NetworkPolicy Pods, Namespaces and networking.k8s.io/v1 NetworkPolicies into a Store.

Threads, not asyncio: the official `kubernetes` client is synchronous, so each kind gets one daemon
thread running a `Reflector` (fabric.sources.k8s_watch). Threads only record into the thread-safe
`fabric.tracker.Store`; the agent's sync runner reads it.

What is recorded (see fabric.tracker for kinds and keys):
- Node -> `fabric.inputs.NodeInfo`. A Node without an IPv4 InternalIP or with a bad podCIDR / ASN
  annotation is skipped with a logged reason; its last good version (if any) stays in the Store, so a
  bad edit never withdraws a working node's routes.
- Service, EndpointSlice -> dicts in API JSON shape (camelCase), normalised by k8s_convert.normalize.
- BGPConfiguration, BGPPeer, IPPool -> raw dicts; fabric.crds validates them.
- Pod -> `fabric.inputs.PodInfo`, Namespace -> `fabric.inputs.NamespaceInfo` (k8s_convert); NetworkPolicy
  -> normalised dicts (fabric.policy validates them and skips a bad one with a reason).

A relist (first start, 410 Gone) goes through `Store.replace`, so it records only real differences.
Errors (API server down, dropped watches, 5xx) never delete anything: the reflector keeps its
resourceVersion, retries with backoff and jitter, and resumes the watch (or relists on 410).

Also: `read_secret(name, key)` for BGP peer passwords (a Secret in the agent's namespace, readable
only through the namespaced Role in manifests/; values never logged), and `report_problem(obj, msg)`
which records a Warning Event about a bad object: in the object's own namespace, or in `default` for
a cluster-scoped object (the API server refuses an Event whose namespace differs from its object's;
for cluster-scoped objects it accepts only `default`).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from fabric.config import AgentConfig
from fabric.config import KubernetesSource as KubernetesSourceConfig
from fabric.crds import KINDS as CRD_KINDS
from fabric.crds import CrdConfig, Problem
from fabric.logs import register_secret
from fabric.sources.events import EventSender
from fabric.sources.k8s_convert import KIND_INFO, SkipObject, convert, key_of
from fabric.sources.k8s_watch import Backoff, Reflector
from fabric.tracker import KINDS, Store

log = logging.getLogger("fabric.sources.kubernetes")

GROUP, VERSION = "bgp-fabric.io", "v1"
CRD_PLURALS = {"BGPConfiguration": "bgpconfigurations", "BGPPeer": "bgppeers", "IPPool": "ippools"}
NAMESPACE_ENV = "POD_NAMESPACE"  # the agent's namespace, from the downward API
DEFAULT_NAMESPACE = "bgp-fabric"
CLUSTER_EVENTS_NAMESPACE = "default"  # where the API server accepts Events about cluster-scoped objects
COMPONENT = "bgp-fabric"


class SourceError(Exception):
    """The Kubernetes source can't start (no API credentials, no node name, ...)."""


class SecretError(Exception):
    """A peer password Secret can't be read; the message names the Secret and key, never the value."""


def node_name(cfg: KubernetesSourceConfig) -> str:
    """This node's name from the environment variable the config names (set by the downward API)."""
    name = os.environ.get(cfg.node_name_env, "").strip()
    if not name:
        raise SourceError(f"source.nodeNameEnv: environment variable {cfg.node_name_env} is not set "
                          "(the DaemonSet sets it from spec.nodeName)")
    return name


def default_api_client(cfg: KubernetesSourceConfig) -> k8s.ApiClient:
    """An ApiClient from the kubeconfig the config names, else the in-cluster service account.

    urllib3's own retries are off (`retries=False`): the reflectors retry with backoff and jitter,
    and a hidden retry loop would only delay noticing an outage and stopping.
    """
    from kubernetes import config as kconfig

    conf = k8s.Configuration()
    try:
        if cfg.kubeconfig:
            kconfig.load_kube_config(config_file=cfg.kubeconfig, client_configuration=conf)
        else:
            kconfig.load_incluster_config(client_configuration=conf)
    except (kconfig.ConfigException, OSError, TypeError, ValueError) as e:
        where = f"kubeconfig {cfg.kubeconfig}" if cfg.kubeconfig else "in-cluster service account"
        raise SourceError(f"source.kubeconfig: cannot load {where}: {e}") from None
    conf.retries = False
    return k8s.ApiClient(conf)


def event_namespace(obj: dict[str, Any]) -> str:
    """The namespace an Event about `obj` must live in for the API server to accept it: the object's
    own, or `default` for a cluster-scoped object (Node, IPPool, BGPPeer, BGPConfiguration)."""
    return (obj.get("metadata") or {}).get("namespace") or CLUSTER_EVENTS_NAMESPACE


def _typed(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    """A listed item has no kind/apiVersion (the list has): an Event's involvedObject needs them."""
    return {**obj, "kind": kind, "apiVersion": KIND_INFO[kind].api_version}


class KubernetesSource:
    """Feeds `store` from the API server. `start()` returns at once; `synced()` says every kind was listed."""

    def __init__(self, store: Store, cfg: KubernetesSourceConfig, api_client: k8s.ApiClient | None = None, *,
                 namespace: str | None = None, watch_timeout: tuple[int, int] = (300, 600),
                 backoff: tuple[float, float] = (0.5, 30.0), page_size: int = 500,
                 request_timeout: tuple[float, float] = (10.0, 30.0)) -> None:
        self.store = store
        self.cfg = cfg
        self.api_client = api_client if api_client is not None else default_api_client(cfg)
        self.node_name = os.environ.get(cfg.node_name_env) or None
        self.namespace = namespace or os.environ.get(NAMESPACE_ENV) or DEFAULT_NAMESPACE
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._reported: set[tuple[str, str, str, str]] = set()
        self._lock = threading.Lock()
        self._skipped: dict[tuple[str, str], str] = {}  # objects not recorded, and why
        self._crd_problems: list[str] = []
        self._crds = CrdConfig()
        self.events = EventSender(self.report_problem)  # Events off the reflector threads and the event loop
        self.on_change: Callable[[], None] | None = None  # problems or reachability changed (any thread)
        core = k8s.CoreV1Api(self.api_client)
        custom = k8s.CustomObjectsApi(self.api_client)
        lists: dict[str, Callable[..., Any]] = {
            "Node": core.list_node,
            "Service": core.list_service_for_all_namespaces,
            "EndpointSlice": k8s.DiscoveryV1Api(self.api_client).list_endpoint_slice_for_all_namespaces,
            "Pod": core.list_pod_for_all_namespaces,
            "Namespace": core.list_namespace,
            "NetworkPolicy": k8s.NetworkingV1Api(self.api_client).list_network_policy_for_all_namespaces,
        }
        for kind, plural in CRD_PLURALS.items():
            lists[kind] = (lambda plural: lambda **kw: custom.list_cluster_custom_object(
                GROUP, VERSION, plural, **kw))(plural)
        self.reflectors: dict[str, Reflector] = {
            kind: Reflector(kind, lists[kind], self._lister(kind), self._watcher(kind), self._stop,
                            page_size=page_size, watch_timeout=watch_timeout, backoff=Backoff(*backoff),
                            request_timeout=request_timeout,
                            on_missing=self._missing(kind) if kind in CRD_PLURALS else None,
                            on_state=self._changed)
            for kind in KINDS}

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        if self._threads:
            return
        self.events.start()
        for kind, r in self.reflectors.items():
            t = threading.Thread(target=r.run, name=f"k8s-{kind}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop every reflector; returns within `timeout` seconds even if a request is stuck.

        Open watches and backoff waits end at once. A request whose server accepted the connection
        but never answers ends at its request timeout; its daemon thread records nothing after stop.
        """
        self._stop.set()
        for r in self.reflectors.values():
            r.abort()
        deadline = time.monotonic() + timeout
        self.events.stop(0)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log.warning("kubernetes source: threads still ending: %s", ", ".join(alive))

    def synced(self) -> bool:
        return self.store.synced(KINDS)

    def _changed(self) -> None:
        cb = self.on_change
        if cb is not None:
            cb()

    def state(self) -> dict[str, Any]:
        """For status and metrics: per kind listed / lists / watches / errors / last error, and since when
        the API server has failed every kind (None: reachable)."""
        kinds = {}
        for kind, r in self.reflectors.items():
            kinds[kind] = {"synced": self.store.synced([kind]), "lists": r.lists, "watches": r.watches,
                           "errors": r.failures, "lastError": r.last_error, "failingSince": r.failing_since}
        since = [k["failingSince"] for k in kinds.values()]
        return {"kind": "kubernetes", "synced": self.synced(), "kinds": kinds,
                "unreachableSince": min(since) if since and all(x is not None for x in since) else None}

    # ---- recording --------------------------------------------------------------------------------
    def _lister(self, kind: str) -> Callable[[list[dict[str, Any]]], None]:
        def on_list(items: list[dict[str, Any]]) -> None:
            values: dict[str, Any] = {}
            skipped: dict[tuple[str, str], str] = {}
            for obj in items:
                try:
                    key, value = convert(kind, obj)
                except SkipObject as e:
                    log.warning("skipping %s", e)
                    try:
                        key = key_of(kind, obj)
                    except SkipObject:
                        continue
                    skipped[(kind, key)] = str(e)
                    self.events.submit(_typed(kind, obj), str(e))
                    value = self.store.last_good(kind, key)  # this run's last good version, or the previous run's
                    if value is None:
                        continue
                values[key] = value
            with self._lock:
                self._skipped = {k: v for k, v in self._skipped.items() if k[0] != kind} | skipped
            n = self.store.replace(kind, values)
            log.info("%s: listed %d, %d changed", kind, len(values), n)
        return on_list

    def _watcher(self, kind: str) -> Callable[[str, dict[str, Any]], None]:
        def on_event(typ: str, obj: dict[str, Any]) -> None:
            try:
                key = key_of(kind, obj)
                if typ == "DELETED":
                    with self._lock:
                        self._skipped.pop((kind, key), None)
                    self.store.delete(kind, key)
                    return
                key, value = convert(kind, obj)
            except SkipObject as e:
                log.warning("skipping %s", e)
                with self._lock:
                    try:
                        self._skipped[(kind, key_of(kind, obj))] = str(e)
                    except SkipObject:
                        return  # no name: nothing an Event could point at
                self.events.submit(_typed(kind, obj), str(e))
                return
            with self._lock:
                self._skipped.pop((kind, key), None)
            self.store.upsert(kind, key, value)
        return on_event

    def _missing(self, kind: str) -> Callable[[], None]:
        def on_missing() -> None:
            # 404: the CRD is not installed, so there are none of these objects and the kind counts as
            # synced. Objects already recorded stay: right after an API server restart, custom
            # resource paths can answer 404 for a moment, and that must not delete peers or pools.
            log.warning("%s: %s.%s is not served (CRD not installed?); keeping %d recorded object(s)",
                        kind, CRD_PLURALS[kind], GROUP, len(self.store.snapshot(kind)))
            self.store.mark_synced(kind)
        return on_missing

    @property
    def problems(self) -> list[str]:
        """Current problems: objects skipped (and why), and bad custom resources from effective_config()."""
        crashed = [f"{k}: watching failed unexpectedly, retrying: {r.last_crash}"
                   for k, r in self.reflectors.items() if r.last_crash]
        with self._lock:
            return sorted(set(self._skipped.values())) + list(self._crd_problems) + crashed

    # ---- custom resources -------------------------------------------------------------------------
    def effective_config(self, base: AgentConfig) -> tuple[AgentConfig, list[Problem]]:
        """`base` plus the BGPConfiguration/BGPPeer/IPPool objects now in the Store (fabric.crds).

        Blocking (reads peer password Secrets, records Events): call it from a worker thread when a
        CRD kind changed. Each bad object is logged and reported once as a Warning Event; the last
        good version of it stays in effect.
        """
        objects = {k: self.store.snapshot(k) for k in CRD_KINDS}
        cfg, problems = self._crds.effective(base, objects, self.read_secret)
        for p in problems:
            log.warning("%s", p)
            if p.obj:
                self.report_problem(dict(p.obj), str(p))
        with self._lock:
            self._crd_problems = [str(p) for p in problems]
        return cfg, problems

    # ---- secrets and events -----------------------------------------------------------------------
    def read_secret(self, name: str, key: str) -> str:
        """The value of `key` in Secret `name` of the agent's namespace. SecretError names what failed."""
        where = f"secret {self.namespace}/{name} key {key}"
        try:
            resp = k8s.CoreV1Api(self.api_client).read_namespaced_secret(
                name, self.namespace, _preload_content=False, _request_timeout=(10, 30))
            body = json.loads(resp.data)
        except ApiException as e:
            reason = {403: "forbidden (is it listed in the Role's resourceNames?)", 404: "not found"}
            raise SecretError(f"{where}: {reason.get(e.status, f'API error {e.status}')}") from None
        except Exception as e:  # noqa: BLE001 - connection errors of every kind; never echo the body
            raise SecretError(f"{where}: {type(e).__name__}") from None
        data = body.get("data") or {}
        if key in data:
            try:
                value = base64.b64decode(data[key], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise SecretError(f"{where}: value is not base64-encoded UTF-8") from None
            register_secret(value)  # never in a log line from here on
            return value
        if key in (body.get("stringData") or {}):
            register_secret(str(body["stringData"][key]))
            return str(body["stringData"][key])
        raise SecretError(f"{where}: no such key")

    def report_stored(self, kind: str, key: str, message: str) -> None:
        """A Store object a stage skipped for bad input (a Service the proxy can't program, a NetworkPolicy
        that doesn't parse): a Warning Event about it, sent off the caller's thread, once per message."""
        value = self.store.get(kind, key)
        md = value.get("metadata") if isinstance(value, dict) else None
        md = md if isinstance(md, dict) else {}
        ns, _, name = key.rpartition("/")
        meta = {"name": md.get("name") or name, **({"namespace": md.get("namespace") or ns} if ns else {}),
                **({"uid": md["uid"]} if isinstance(md.get("uid"), str) else {})}
        info = KIND_INFO.get(kind)
        self.events.submit({"apiVersion": info.api_version if info else "v1", "kind": kind, "metadata": meta}, message)

    def report_problem(self, obj: dict[str, Any], message: str) -> bool:
        """Record a Warning Event about `obj` (once per object and message). Returns True if one was created."""
        md = obj.get("metadata") or {}
        kind = obj.get("kind") or "?"
        ident = (kind, md.get("name") or "?", md.get("uid") or "", message)
        if ident in self._reported:
            return False
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        involved = {"apiVersion": obj.get("apiVersion") or KIND_INFO.get(kind, KIND_INFO["Node"]).api_version,
                    "kind": kind, "name": md.get("name")}
        if md.get("uid"):
            involved["uid"] = md["uid"]
        if md.get("namespace"):
            involved["namespace"] = md["namespace"]
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{md.get('name') or 'object'}.{uuid.uuid4().hex[:16]}",
                         "namespace": event_namespace(obj)},
            "involvedObject": involved,
            "reason": "InvalidResource", "type": "Warning", "message": message[:1024],
            "source": {"component": COMPONENT, **({"host": self.node_name} if self.node_name else {})},
            "reportingComponent": f"{GROUP}/agent", "reportingInstance": self.node_name or COMPONENT,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            k8s.CoreV1Api(self.api_client).create_namespaced_event(event["metadata"]["namespace"], event,
                                                                   _request_timeout=(10, 30))
        except Exception as e:  # noqa: BLE001 - an event is best effort; the problem is logged anyway
            log.warning("could not record event for %s/%s: %s", kind, md.get("name"), e)
            return False
        self._reported.add(ident)
        return True
