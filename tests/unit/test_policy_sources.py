"""Pods, Namespaces and NetworkPolicies from both sources: what is recorded, what is skipped and why."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from fabric.inputs import NamespaceInfo, PodInfo
from fabric.sources.file import FileSource
from fabric.sources.k8s_convert import SkipObject, convert
from fabric.tracker import Store
from tests.fakeapi import FakeApiServer
from tests.unit.test_k8s_source import Harness, wait_until


def pod(name: str, ns: str = "default", ip: str | None = "10.244.1.5", node: str = "n1", labels: dict | None = None,
        phase: str = "Running", ports: list | None = None, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x", "ports": ports or []}]},
            "status": {"phase": phase, **({"podIP": ip, "podIPs": [{"ip": ip}]} if ip else {}), **status}}


def policy(name: str, ns: str = "default", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": {"podSelector": {}, **spec}}


def test_pod_keeps_only_what_policy_needs() -> None:
    obj = pod("web", "shop", labels={"app": "web"},
              ports=[{"name": "http", "containerPort": 8080}, {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                     {"containerPort": 9090}])
    obj["status"]["podIPs"] = [{"ip": "10.244.1.5"}, {"ip": "fd00::5"}]
    obj["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    key, info = convert("Pod", obj)
    assert key == "shop/web"
    assert info == PodInfo("shop", "web", {"app": "web"}, "n1", ("10.244.1.5",), "Running", False,
                           (("dns", "UDP", 53), ("http", "TCP", 8080)))
    assert info.enforceable
    # A status write that changes nothing policy reads converts to an equal value (a no-op in the Store).
    obj["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    assert convert("Pod", obj)[1] == info


@pytest.mark.parametrize("change,enforceable", [
    ({"status": {"phase": "Pending"}}, False),  # no IP yet
    ({"status": {"phase": "Succeeded", "podIP": "10.244.1.5"}}, False),  # finished: its IP may be reused
    ({"spec": {"hostNetwork": True, "nodeName": "n1"}}, False),
])
def test_pods_that_policies_do_not_apply_to(change: dict, enforceable: bool) -> None:
    obj = pod("p")
    obj.update(change)
    assert convert("Pod", obj)[1].enforceable is enforceable


@pytest.mark.parametrize("mutate,field", [
    (lambda o: o["metadata"].update(labels={"a": 1}), "metadata.labels"),
    (lambda o: o["status"].update(podIPs=[{"ip": "banana"}]), "status.podIPs"),
    (lambda o: o["spec"]["containers"][0].update(ports=[{"name": "x", "containerPort": 70000}]),
     "spec.containers[0].ports[0]"),
    (lambda o: o["spec"]["containers"][0].update(ports=[{"name": "x", "containerPort": 80, "protocol": "ICMP"}]),
     "spec.containers[0].ports[0]"),
    (lambda o: o.update(spec=["x"]), "spec/status"),
    (lambda o: o["spec"].update(containers={"a": 1}), "spec.containers"),
    (lambda o: o["status"].update(podIPs=7), "status.podIPs"),
])
def test_bad_pod_is_skipped_with_the_field(mutate, field: str) -> None:
    obj = pod("p")
    mutate(obj)
    with pytest.raises(SkipObject, match=rf"Pod/default/p: {field.replace('[', '.').replace(']', '.')}"):
        convert("Pod", obj)


JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=4)
                       | st.sampled_from(["10.244.1.7", "fd00::1", "TCP", "SCTP", "Running"]),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                       max_leaves=6)
PATHS = [("metadata",), ("metadata", "labels"), ("metadata", "name"), ("spec",), ("spec", "nodeName"),
         ("spec", "hostNetwork"), ("spec", "containers"), ("spec", "containers", 0), ("spec", "containers", 0, "ports"),
         ("spec", "containers", 0, "ports", 0), ("spec", "containers", 0, "ports", 0, "containerPort"),
         ("spec", "containers", 0, "ports", 0, "protocol"), ("status",), ("status", "phase"), ("status", "podIP"),
         ("status", "podIPs"), ("status", "podIPs", 0), ("status", "podIPs", 0, "ip")]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(PATHS), JSONISH)
def test_any_malformed_pod_field_is_skipped_never_raised(path: tuple, value: Any) -> None:
    obj = pod("p", ports=[{"name": "http", "containerPort": 80}])
    target = obj
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    try:
        _, info = convert("Pod", obj)
    except SkipObject:
        return
    assert isinstance(info, PodInfo)


def test_namespace_always_has_its_name_label() -> None:
    _, ns = convert("Namespace", {"metadata": {"name": "shop", "labels": {"team": "a"}}})
    assert ns == NamespaceInfo("shop", {"team": "a", "kubernetes.io/metadata.name": "shop"})


def test_file_source_records_pods_namespaces_policies_and_skips_bad_pods(tmp_path: Path) -> None:
    f = tmp_path / "cluster.yaml"
    bad = pod("bad")
    bad["status"]["podIP"] = bad["status"]["podIPs"][0]["ip"] = "nope"
    f.write_text(json.dumps({"pods": [pod("a", labels={"x": "1"}), bad], "namespaces": [{"metadata": {"name": "default"}}],
                             "networkPolicies": [policy("deny")]}))
    store = Store()
    src = FileSource(store, f)
    assert src.reload()
    assert set(store.snapshot("Pod")) == {"default/a"}
    assert store.get("Namespace", "default").labels == {"kubernetes.io/metadata.name": "default"}
    assert store.get("NetworkPolicy", "default/deny")["spec"] == {"podSelector": {}}
    assert [p for p in src.problems if "Pod/default/bad: status.podIPs" in p], src.problems
    store.take()
    # The bad pod fixed: it is recorded and the problem goes away; nothing else changes.
    f.write_text(json.dumps({"pods": [pod("a", labels={"x": "1"}), pod("bad", ip="10.244.1.9")],
                             "namespaces": [{"metadata": {"name": "default"}}], "networkPolicies": [policy("deny")]}))
    assert src.reload()
    assert store.take().keys == {"Pod": {"default/bad"}} and src.problems == []


def test_kubernetes_source_watches_pods_namespaces_policies(h: Harness, api: FakeApiServer) -> None:
    api.apply("Namespace", {"metadata": {"name": "shop", "labels": {"team": "a"}}})
    api.apply("Pod", pod("web", "shop", labels={"app": "web"}))
    h.started()
    assert h.store.get("Pod", "shop/web").ips == ("10.244.1.5",)
    assert h.store.get("Namespace", "shop").labels["team"] == "a"
    h.store.take()
    api.apply("NetworkPolicy", policy("deny", "shop"))
    obj = pod("web", "shop", labels={"app": "web"})
    obj["status"]["conditions"] = [{"type": "Ready", "status": "True"}]  # nothing policy reads
    api.apply("Pod", obj)
    api.apply("Pod", pod("db", "shop", ip="10.244.1.6", labels={"app": "db"}))
    wait_until(lambda: h.store.get("Pod", "shop/db") is not None and h.store.get("NetworkPolicy", "shop/deny"),
               "events recorded")
    assert h.store.take().keys == {"Pod": {"shop/db"}, "NetworkPolicy": {"shop/deny"}}
    api.delete("Pod", "web", "shop")
    wait_until(lambda: h.store.get("Pod", "shop/web") is None, "delete recorded")


@pytest.fixture
def api():
    with FakeApiServer() as srv:
        yield srv


@pytest.fixture
def h(api: FakeApiServer):
    harness = Harness(api)
    yield harness
    for s in harness.sources:
        s.stop()
