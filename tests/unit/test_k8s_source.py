"""The Kubernetes source against the fake API server (real HTTP, real `kubernetes` client, unmodified)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client

from fabric.config import KubernetesSource as KubernetesSourceConfig
from fabric.inputs import NodeInfo
from fabric.sources.kubernetes import KubernetesSource, SecretError
from fabric.tracker import KINDS, Store
from tests.fakeapi import FakeApiServer


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.01)


def node(name: str, ip: str | None, cidr: str | None = None, **md: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {"name": name, **md}, "spec": {}, "status": {"addresses": []}}
    if ip:
        obj["status"]["addresses"] = [{"type": "Hostname", "address": name}, {"type": "InternalIP", "address": ip}]
    if cidr:
        obj["spec"] = {"podCIDR": cidr, "podCIDRs": [cidr]}
    return obj


def service(name: str, ip: str, ns: str = "default") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "type": "ClusterIP", "internalTrafficPolicy": "Cluster",
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}


def slice_(name: str, svc: str, ips: list[str], ns: str = "default") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "n1"} for ip in ips]}


def pool(name: str, cidr: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"cidr": cidr, "ipipMode": "CrossSubnet"}}


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as srv:
        yield srv


class Harness:
    def __init__(self, api: FakeApiServer) -> None:
        self.api = api
        self.store = Store()
        self.sources: list[KubernetesSource] = []

    def source(self, **kw: Any) -> KubernetesSource:
        conf = client.Configuration()
        conf.host = self.api.url
        conf.retries = False  # as default_api_client sets it: the source does its own retries
        kw.setdefault("backoff", (0.02, 0.2))
        src = KubernetesSource(self.store, KubernetesSourceConfig(), client.ApiClient(conf), **kw)
        self.sources.append(src)
        return src

    def started(self, **kw: Any) -> KubernetesSource:
        src = self.source(**kw)
        src.start()
        wait_until(src.synced, "initial sync")
        wait_until(lambda: all(self.api.watchers(k) == 1 for k in KINDS), "watches open")
        return src


@pytest.fixture
def h(api: FakeApiServer) -> Iterator[Harness]:
    harness = Harness(api)
    yield harness
    for s in harness.sources:
        s.stop()


def seed(api: FakeApiServer) -> None:
    api.apply("Node", node("n1", "10.0.1.11", "10.244.1.0/24", labels={"rack": "r1"},
                           annotations={"bgp-fabric.io/asn": "65011"}))
    api.apply("Node", node("n2", "10.0.1.12", "10.244.2.0/24"))
    api.apply("Service", service("web", "10.96.0.10"))
    api.apply("EndpointSlice", slice_("web-abc", "web", ["10.244.1.5"]))
    api.apply("IPPool", pool("default", "10.244.0.0/16"))
    api.apply("BGPPeer", {"metadata": {"name": "tor"}, "spec": {"peerIP": "10.0.1.1", "asNumber": 65000}})
    api.apply("BGPConfiguration", {"metadata": {"name": "default"}, "spec": {"asNumber": 64512}})


def test_initial_list_fills_the_store(api: FakeApiServer, h: Harness) -> None:
    seed(api)
    for i in range(3, 8):  # more nodes than one page holds: the list is paged with continue tokens
        api.apply("Node", node(f"n{i}", f"10.0.1.{10 + i}", f"10.244.{i}.0/24"))
    h.started(page_size=2)
    assert any(r["query"].get("continue") for r in api.requests_for("Node", watch=False))
    nodes = h.store.snapshot("Node")
    assert sorted(nodes) == [f"n{i}" for i in range(1, 8)]
    assert nodes["n1"] == NodeInfo(name="n1", address="10.0.1.11", podCIDRs=["10.244.1.0/24"], asn=65011,
                                   labels={"rack": "r1"})
    svc = h.store.get("Service", "default/web")
    # API JSON shape (camelCase), kind/apiVersion set even though list items come without them.
    assert svc["kind"] == "Service" and svc["apiVersion"] == "v1"
    assert svc["spec"]["clusterIP"] == "10.96.0.10" and svc["spec"]["ports"][0]["targetPort"] == 8080
    assert "resourceVersion" not in svc["metadata"]
    eps = h.store.get("EndpointSlice", "default/web-abc")
    assert eps["addressType"] == "IPv4" and eps["endpoints"][0]["addresses"] == ["10.244.1.5"]
    assert h.store.get("IPPool", "default")["spec"]["cidr"] == "10.244.0.0/16"
    assert h.store.get("BGPPeer", "tor")["spec"]["peerIP"] == "10.0.1.1"
    assert h.store.get("BGPConfiguration", "default")["apiVersion"] == "bgp-fabric.io/v1"
    ch = h.store.take()
    assert ch.of("Node") == {f"n{i}" for i in range(1, 8)} and ch.of("Service") == {"default/web"}


def test_watch_events_update_the_store(api: FakeApiServer, h: Harness) -> None:
    seed(api)
    h.started()
    h.store.take()
    api.apply("Node", node("n3", "10.0.1.13", "10.244.3.0/24"))
    api.apply("Service", service("web", "10.96.0.11"))
    api.delete("EndpointSlice", "web-abc", "default")
    api.apply("BGPPeer", {"metadata": {"name": "tor2"}, "spec": {"peerIP": "10.0.1.2", "asNumber": 65000}})
    # One watch per kind, each on its own thread: wait for every kind's event.
    wait_until(lambda: h.store.get("BGPPeer", "tor2") is not None and h.store.get("Node", "n3") is not None
               and h.store.get("EndpointSlice", "default/web-abc") is None
               and h.store.get("Service", "default/web")["spec"]["clusterIP"] == "10.96.0.11", "events applied")
    ch = h.store.take()
    assert ch.of("Node") == {"n3"} and ch.of("Service") == {"default/web"}
    assert ch.of("EndpointSlice") == {"default/web-abc"} and ch.of("BGPPeer") == {"tor2"}
    assert h.store.get("Service", "default/web")["spec"]["clusterIP"] == "10.96.0.11"
    assert h.store.get("EndpointSlice", "default/web-abc") is None
    # A write that changes only bookkeeping (managedFields, resourceVersion) records nothing.
    obj = service("web", "10.96.0.11")
    obj["metadata"]["managedFields"] = [{"manager": "kubectl", "operation": "Update"}]
    api.apply("Service", obj)
    api.apply("Service", service("marker", "10.96.0.99"))  # same watch stream: seen after the one above
    wait_until(lambda: h.store.get("Service", "default/marker") is not None, "marker event")
    assert h.store.take().keys == {"Service": {"default/marker"}}


def test_broken_watch_changes_nothing_then_resumes(api: FakeApiServer, h: Harness) -> None:
    seed(api)
    src = h.started()
    h.store.take()
    lists_before = len([r for k in KINDS for r in api.requests_for(k, watch=False)])
    failures = {k: r.failures for k, r in src.reflectors.items()}
    api.go_down()  # connections cut mid-stream, and reconnects refused for now
    wait_until(lambda: all(src.reflectors[k].failures >= failures[k] + 2 for k in KINDS), "reconnects failing")
    assert not h.store.take(), "a broken watch must not change the Store"
    api.apply("Node", node("n9", "10.0.1.19", "10.244.9.0/24"))  # happens while we are disconnected
    api.delete("Service", "web", "default")
    api.come_up()
    wait_until(lambda: h.store.get("Node", "n9") is not None and h.store.get("Service", "default/web") is None,
               "converged after reconnect")
    assert h.store.take().keys == {"Node": {"n9"}, "Service": {"default/web"}}
    # It resumed from its resourceVersion: no relist was needed.
    assert len([r for k in KINDS for r in api.requests_for(k, watch=False)]) == lists_before


def test_dropped_stream_resumes_without_loss(api: FakeApiServer, h: Harness) -> None:
    seed(api)
    src = h.started()
    h.store.take()
    failures = src.reflectors["Node"].failures
    api.drop_watches()
    wait_until(lambda: src.reflectors["Node"].failures > failures, "drop noticed")
    assert not h.store.take()
    api.apply("Node", node("n5", "10.0.1.15", "10.244.5.0/24"))
    wait_until(lambda: h.store.get("Node", "n5") is not None, "event after reconnect")
    assert h.store.take().keys == {"Node": {"n5"}}


def test_410_gone_relists_without_spurious_changes(api: FakeApiServer, h: Harness) -> None:
    seed(api)
    src = h.started()
    h.store.take()
    lists = {k: r.lists for k, r in src.reflectors.items()}
    api.expire_watches()  # every open watch gets an ERROR 410 event; history is compacted
    wait_until(lambda: all(src.reflectors[k].lists == lists[k] + 1 for k in KINDS), "relisted")
    assert not h.store.take(), "a relist that finds nothing new records no change"
    # A change made while the watch was expired is found by the relist / next watch.
    api.expire_watches()
    api.apply("IPPool", pool("extra", "10.250.0.0/16"))
    api.delete("Node", "n2")
    wait_until(lambda: h.store.get("IPPool", "extra") is not None and h.store.get("Node", "n2") is None, "converged")
    assert h.store.take().keys == {"IPPool": {"extra"}, "Node": {"n2"}}


def test_410_on_watch_request_after_compaction(api: FakeApiServer, h: Harness) -> None:
    seed(api)
    src = h.started()
    h.store.take()
    lists = src.reflectors["Service"].lists
    api.go_down()
    api.apply("Service", service("other", "10.96.0.20"))
    api.compact()  # the resourceVersion the source holds is now too old
    api.come_up()
    wait_until(lambda: src.reflectors["Service"].lists > lists, "relist after 410")
    wait_until(lambda: h.store.get("Service", "default/other") is not None, "converged")
    assert h.store.take().keys == {"Service": {"default/other"}}


def test_bookmarks_advance_resource_version(api: FakeApiServer, h: Harness) -> None:
    seed(api)
    src = h.started()
    h.store.take()
    before = src.reflectors["Node"].resource_version
    for _ in range(5):  # writes elsewhere move the cluster's resourceVersion on
        api.bump()
    rv = api.bookmark("Node")
    assert str(rv) != before
    wait_until(lambda: src.reflectors["Node"].resource_version == str(rv), "bookmark seen")
    for kind in KINDS:
        watches = api.requests_for(kind, watch=True)
        assert watches and all(r["query"].get("allowWatchBookmarks") == "true" for r in watches), kind
    # After a compaction at the bookmark's version, resuming from it needs no relist.
    api.compact()
    lists = src.reflectors["Node"].lists
    watches = len(api.requests_for("Node", watch=True))
    api.drop_watches()
    wait_until(lambda: len(api.requests_for("Node", watch=True)) > watches, "re-watch")
    assert api.requests_for("Node", watch=True)[-1]["query"]["resourceVersion"] == str(rv)
    api.apply("Node", node("n6", "10.0.1.16"))
    wait_until(lambda: h.store.get("Node", "n6") is not None, "event after resume")
    assert src.reflectors["Node"].lists == lists
    assert not h.store.take().of("Service")


def test_api_server_down_keeps_store_then_converges(api: FakeApiServer, h: Harness) -> None:
    seed(api)
    src = h.started()
    h.store.take()
    before = {k: h.store.snapshot(k) for k in KINDS}
    api.go_down()
    api.delete("Node", "n1")
    api.delete("IPPool", "default")
    api.apply("Node", node("n7", "10.0.1.17"))
    api.compact()
    wait_until(lambda: all(r.failures >= 3 for r in src.reflectors.values()), "several failed reconnects")
    assert not h.store.take()
    assert {k: h.store.snapshot(k) for k in KINDS} == before, "losing the API server deleted nothing"
    api.come_up()
    wait_until(lambda: h.store.get("Node", "n7") is not None and h.store.get("Node", "n1") is None
               and h.store.get("IPPool", "default") is None, "converged after the API server returned")
    assert h.store.take().keys == {"Node": {"n1", "n7"}, "IPPool": {"default"}}


def test_list_errors_are_retried(api: FakeApiServer, h: Harness) -> None:
    seed(api)
    api.fail_lists("Node", 500, times=3)
    src = h.source()
    src.start()
    wait_until(src.synced, "sync despite list errors")
    assert src.reflectors["Node"].failures >= 3
    assert "n1" in h.store.snapshot("Node")


def test_missing_crd_counts_as_empty(api: FakeApiServer, h: Harness) -> None:
    seed(api)
    api.set_missing("BGPPeer")
    src = h.source()
    src.start()
    wait_until(src.synced, "synced without the BGPPeer CRD")
    assert h.store.snapshot("BGPPeer") == {}
    api.set_missing("BGPPeer", False)
    wait_until(lambda: h.store.get("BGPPeer", "tor") is not None, "CRD installed later")
    h.store.take()
    # A 404 later (API server restarting, CRD handlers not ready yet) deletes nothing.
    failures = src.reflectors["BGPPeer"].failures
    api.set_missing("BGPPeer")
    api.drop_watches()
    wait_until(lambda: src.reflectors["BGPPeer"].failures >= failures + 3, "404s seen")
    assert h.store.get("BGPPeer", "tor") is not None and not h.store.take().of("BGPPeer")


def test_bad_node_is_skipped_and_last_good_kept(api: FakeApiServer, h: Harness,
                                                caplog: pytest.LogCaptureFixture) -> None:
    seed(api)
    api.apply("Node", node("noip", None, "10.244.8.0/24"))
    api.apply("Node", node("badcidr", "10.0.1.30", "10.244.8.1/24"))
    h.started()
    assert set(h.store.snapshot("Node")) == {"n1", "n2"}
    assert "Node/noip: status.addresses: no IPv4 InternalIP" in caplog.text
    assert "Node/badcidr: spec.podCIDRs.0: not a valid IPv4 CIDR" in caplog.text
    good = h.store.get("Node", "n2")
    h.store.take()
    api.apply("Node", node("n2", None, "10.244.2.0/24"))  # InternalIP lost: keep the last good version
    api.apply("Node", node("n3", "10.0.1.13"))
    wait_until(lambda: h.store.get("Node", "n3") is not None, "marker")
    assert h.store.get("Node", "n2") == good
    assert h.store.take().keys == {"Node": {"n3"}}
    api.expire_watches()  # a relist keeps it too
    wait_until(lambda: all(r.lists >= 2 for r in h.sources[0].reflectors.values()), "relist")
    assert h.store.get("Node", "n2") == good and not h.store.take()


def test_stop_is_prompt_while_watching_and_while_backing_off(api: FakeApiServer, h: Harness) -> None:
    seed(api)
    src = h.started(watch_timeout=(3000, 3600))  # watches that would stay open for an hour
    src.stop()
    assert not any(t.is_alive() for t in src._threads)
    # Now while every reflector waits out a long backoff against a server that is down.
    src2 = h.source(backoff=(60.0, 120.0))
    api.go_down()
    src2.start()
    wait_until(lambda: all(r.failures >= 1 for r in src2.reflectors.values()), "backing off")
    src2.stop()
    assert not any(t.is_alive() for t in src2._threads)


def test_stop_returns_while_a_request_hangs(h: Harness) -> None:
    """A server that accepts connections and never answers: stop() returns anyway; the threads end
    at their request timeout, not after a watch timeout or a backoff."""
    import socket

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        lsock.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(lsock.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        conf = client.Configuration()
        conf.host = f"http://127.0.0.1:{lsock.getsockname()[1]}"
        conf.retries = False
        store = Store()
        src = KubernetesSource(store, KubernetesSourceConfig(), client.ApiClient(conf), request_timeout=(1, 1),
                               backoff=(60.0, 120.0))
        src.start()
        wait_until(lambda: len(accepted) >= len(KINDS), "requests sent")
        stopper = threading.Thread(target=src.stop, kwargs={"timeout": 0.1})
        stopper.start()
        stopper.join(5)
        assert not stopper.is_alive(), "stop() did not return"
        wait_until(lambda: not any(th.is_alive() for th in src._threads), "threads ended", timeout=20)
        assert not store.take() and not src.synced()
    finally:
        stop.set()
        t.join()
        for c in accepted:
            c.close()
        lsock.close()


def test_read_secret(api: FakeApiServer, h: Harness) -> None:
    src = h.source(namespace="bgp-fabric")
    api.secrets[("bgp-fabric", "tor-password")] = {"kind": "Secret", "apiVersion": "v1",
                                                   "metadata": {"name": "tor-password"},
                                                   "data": {"password": "czNjcjN0IQ=="}}
    assert src.read_secret("tor-password", "password") == "s3cr3t!"
    with pytest.raises(SecretError, match="secret bgp-fabric/tor-password key nope: no such key"):
        src.read_secret("tor-password", "nope")
    with pytest.raises(SecretError, match="secret bgp-fabric/other key password: not found") as e:
        src.read_secret("other", "password")
    assert "s3cr3t" not in str(e.value)
    assert api.requests[-1]["path"] == "/api/v1/namespaces/bgp-fabric/secrets/other"


def test_report_problem_creates_one_event(api: FakeApiServer, h: Harness) -> None:
    src = h.source(namespace="bgp-fabric")
    src.node_name = "n1"
    obj = {"apiVersion": "bgp-fabric.io/v1", "kind": "BGPPeer", "metadata": {"name": "tor", "uid": "u-1"}}
    assert src.report_problem(obj, "BGPPeer/tor: spec.peerIP: not a valid IPv4 address")
    assert not src.report_problem(obj, "BGPPeer/tor: spec.peerIP: not a valid IPv4 address")  # once
    assert len(api.events) == 1
    ev = api.events[0]
    # A BGPPeer is cluster-scoped: the API server accepts its Events only in `default`.
    assert ev["metadata"]["namespace"] == "default" and ev["type"] == "Warning"
    assert ev["involvedObject"] == {"apiVersion": "bgp-fabric.io/v1", "kind": "BGPPeer", "name": "tor", "uid": "u-1"}
    assert ev["message"] == "BGPPeer/tor: spec.peerIP: not a valid IPv4 address"
    assert ev["source"] == {"component": "bgp-fabric", "host": "n1"}


def test_events_go_where_the_api_server_accepts_them(api: FakeApiServer, h: Harness) -> None:
    src = h.source(namespace="bgp-fabric")
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop", "uid": "u-2"}}
    assert src.report_problem(svc, "Service/shop/web: bad")
    assert [e["metadata"]["namespace"] for e in api.events] == ["shop"]
    # The fake refuses what the API server refuses (so the test above could fail): an Event about a
    # cluster-scoped object outside `default`, or about a namespaced object in another namespace.
    import json as _json
    import urllib.error
    import urllib.request
    for ns, involved in (("bgp-fabric", {"kind": "IPPool", "name": "p"}),
                         ("default", {"kind": "Service", "name": "web", "namespace": "shop"})):
        req = urllib.request.Request(f"{api.url}/api/v1/namespaces/{ns}/events", method="POST",
                                     data=_json.dumps({"metadata": {"name": "x"}, "involvedObject": involved}).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 422
    assert len(api.events) == 1


def test_effective_config_reads_secrets_and_reports_bad_objects(api: FakeApiServer, h: Harness) -> None:
    from fabric.config import parse

    api.secrets[("bgp-fabric", "tor-pw")] = {"data": {"password": "czNjcjN0IQ=="}}
    api.apply("BGPPeer", {"metadata": {"name": "tor"}, "spec": {
        "peerIP": "10.0.1.1", "asNumber": 65000, "password": {"secretKeyRef": {"name": "tor-pw", "key": "password"}}}})
    api.apply("IPPool", pool("good", "10.244.0.0/16"))
    api.apply("IPPool", {"metadata": {"name": "bad"}, "spec": {"cidr": "10.250.0.0/16", "ipipMode": "Sometimes"}})
    api.apply("Node", node("noip", None))
    src = h.started(namespace="bgp-fabric")
    base = parse({"node": {"name": "n1", "address": "10.0.1.11/24"}, "source": {"kind": "kubernetes"}})
    cfg, problems = src.effective_config(base)
    assert [(p.name, p.password) for p in cfg.peers] == [("tor", "s3cr3t!")]
    assert [str(p.cidr) for p in cfg.pools] == ["10.244.0.0/16"]
    assert [str(p) for p in problems] == ["IPPool/bad: spec.ipipMode: Input should be 'Always', 'CrossSubnet' or "
                                          "'Never'"]
    # the IPPool's Event from here; the Node the source skipped gets its own from the source's sender
    wait_until(lambda: len(api.events) == 2, "both Events")
    (ev,) = [e for e in api.events if e["involvedObject"]["kind"] == "IPPool"]
    assert ev["involvedObject"]["name"] == "bad"
    assert ev["involvedObject"]["uid"] == api._objects["IPPool"]["bad"]["metadata"]["uid"]
    (nev,) = [e for e in api.events if e["involvedObject"]["kind"] == "Node"]
    assert nev["involvedObject"]["name"] == "noip" and nev["metadata"]["namespace"] == "default"
    assert nev["message"] == "Node/noip: status.addresses: no IPv4 InternalIP"
    assert src.problems == ["Node/noip: status.addresses: no IPv4 InternalIP", str(problems[0])]
    src.effective_config(base)
    assert len(api.events) == 2  # reported once
    api.apply("Node", node("noip", "10.0.1.40"))  # fixed: no longer a problem
    wait_until(lambda: h.store.get("Node", "noip") is not None, "fixed node recorded")
    assert src.problems == [str(problems[0])]


def test_client_from_kubeconfig_and_clear_errors(api: FakeApiServer, tmp_path: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from fabric.sources.kubernetes import SourceError, default_api_client, node_name

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""
apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{api.url}"}}}}]
users: [{{name: agent, user: {{token: not-a-real-token}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: agent}}}}]
current-context: fake
""")
    api.apply("Node", node("n1", "10.0.1.11", "10.244.1.0/24"))
    store = Store()
    src = KubernetesSource(store, KubernetesSourceConfig(kubeconfig=str(kubeconfig)))
    assert src.api_client.configuration.retries is False
    src.start()
    try:
        wait_until(src.synced, "synced through the kubeconfig")
        assert "n1" in store.snapshot("Node")
    finally:
        src.stop()
    with pytest.raises(SourceError, match=r"^source.kubeconfig: cannot load kubeconfig /nonexistent"):
        default_api_client(KubernetesSourceConfig(kubeconfig="/nonexistent"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(SourceError, match="^source.kubeconfig: cannot load in-cluster service account"):
        default_api_client(KubernetesSourceConfig())
    monkeypatch.setenv("MY_NODE", "node-a1")
    assert node_name(KubernetesSourceConfig(nodeNameEnv="MY_NODE")) == "node-a1"
    monkeypatch.delenv("MY_NODE")
    with pytest.raises(SourceError, match="environment variable MY_NODE is not set"):
        node_name(KubernetesSourceConfig(nodeNameEnv="MY_NODE"))


def test_backoff_is_exponential_with_jitter_and_capped() -> None:
    import random

    from fabric.sources.k8s_watch import Backoff

    b = Backoff(0.5, 8.0, rng=random.Random(7))
    delays = [b.next() for _ in range(8)]
    ceilings = [0.5, 1, 2, 4, 8, 8, 8, 8]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings)), delays
    assert len({round(d, 6) for d in delays[4:]}) > 1  # jittered, not a fixed 8 s
    b.reset()
    assert 0.25 <= b.next() <= 0.5


def test_a_bad_node_at_start_keeps_the_previous_runs_last_good_version(api: FakeApiServer, h: Harness) -> None:
    """Last-good objects survive restarts (fabric.lastgood seeds Store.remember): a Node that is bad when
    a restarted agent first lists it is not dropped."""
    seed(api)
    good = NodeInfo(name="n2", address="10.0.1.12", podCIDRs=["10.244.2.0/24"])
    api.apply("Node", node("n2", None, "10.244.2.0/24"))  # bad now: no InternalIP
    h.store.remember("Node", {"n2": good})
    h.started()
    assert h.store.get("Node", "n2") == good
    assert any("Node/n2" in p for p in h.sources[0].problems)


def test_state_counts_relists_and_watch_restarts_and_says_since_when_the_api_is_unreachable(
        api: FakeApiServer, h: Harness) -> None:
    seed(api)
    src = h.started()
    changes: list[int] = []
    src.on_change = lambda: changes.append(1)
    wait_until(lambda: all(k["watches"] >= 1 for k in src.state()["kinds"].values()), "watches counted")
    st = src.state()
    assert st["synced"] and st["unreachableSince"] is None
    assert all(k["lists"] == 1 and k["lastError"] is None for k in st["kinds"].values())
    api.expire_watches()  # 410 on every watch: a relist each
    wait_until(lambda: all(k["lists"] == 2 for k in src.state()["kinds"].values()), "relisted")
    watches = src.state()["kinds"]["Node"]["watches"]
    api.drop_watches()  # a watch that ends is started again (no relist)
    wait_until(lambda: src.state()["kinds"]["Node"]["watches"] > watches, "watch restarted")
    assert src.state()["kinds"]["Node"]["lists"] == 2
    t0 = time.time()
    api.go_down()
    wait_until(lambda: src.state()["unreachableSince"] is not None, "every kind failing")
    down = src.state()
    assert t0 - 1 <= down["unreachableSince"] <= time.time()
    assert all(k["lastError"] and k["errors"] >= 1 for k in down["kinds"].values())
    assert changes, "the agent is told when the source starts failing (status is written at once)"
    n = len(changes)
    api.come_up()
    wait_until(lambda: src.state()["unreachableSince"] is None
               and all(k["lastError"] is None for k in src.state()["kinds"].values()), "reachable again")
    assert len(changes) > n
