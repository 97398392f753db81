"""ServiceProxy against a fake kernel that is IPVS's data model (decoded from the real request bytes).

Checks: incremental plans touch only the changed service; a slice change maps to its service; bad
and conflicting services don't block others; failures are blamed on their service and repaired by
the next plan; resync repairs drift. Also: our request bytes mean what pyroute2's encoder means.
"""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from fabric.config import ServiceSettings
from fabric.tracker import Store
from loadbalancer import ipvs_kernel as k
from loadbalancer.proxy import ServiceProxy
from loadbalancer.types import RealServer, VirtualServer
from tests.unit.lbfake import FakeKernel

READY = {"ready": True}


def svc(name: str, ip: str, port: int = 80, **spec) -> dict:
    return {"metadata": {"name": name, "namespace": "d"},
            "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": port, "protocol": "TCP"}], **spec}}


def eps(name: str, *ips: str, cond=READY, proto: str = "TCP") -> dict:
    return {"metadata": {"name": f"{name}-1", "namespace": "d", "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "p", "port": 8080, "protocol": proto}],
            "endpoints": [{"addresses": [ip], "conditions": cond, "nodeName": "n1"} for ip in ips]}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def setup():
    store = Store()
    fake = FakeKernel()
    proxy = ServiceProxy(ServiceSettings(), "n1", ["10.0.1.11"], clock=Clock(), kernel_factory=lambda: fake)
    return store, proxy, fake


def sync(proxy: ServiceProxy, store: Store):
    plan = proxy.plan(store, store.take())
    return plan, proxy.apply(plan)


def put(store: Store, s: dict, sl: dict | None = None) -> None:
    store.upsert("Service", f"d/{s['metadata']['name']}", s)
    if sl:
        store.upsert("EndpointSlice", f"d/{sl['metadata']['name']}", sl)


def test_incremental_touches_only_the_changed_service(setup) -> None:
    store, proxy, fake = setup
    for i in range(50):
        put(store, svc(f"s{i}", f"10.96.1.{i}"), eps(f"s{i}", f"10.244.0.{i}"))
    plan, res = sync(proxy, store)
    assert plan.full and res.ok and len(fake.vs) == 50 and len(fake.addrs) == 50
    assert proxy.kernel.ipvs_dump() == proxy.desired()
    fake.ops.clear()
    put(store, svc("s7", "10.96.1.7"), eps("s7", "10.244.0.7", "10.244.9.7"))  # one endpoint more
    plan, res = sync(proxy, store)
    assert not plan.full and set(plan.services) == {"d/s7"} and res.ok
    assert fake.ops == ["add real 10.244.9.7:8080 to TCP 10.96.1.7:80"]
    assert plan.nft_add == {("hairpin", ("10.244.9.7", "TCP", 8080, "10.244.9.7"))} and not plan.nft_delete
    assert "add element inet bgp-fabric hairpin { 10.244.9.7 . tcp . 8080 . 10.244.9.7 }" in fake.nft_scripts[-1]
    assert proxy.kernel.ipvs_dump() == proxy.desired()
    # nothing changed -> empty plan
    plan, _ = sync(proxy, store)
    assert not plan and plan.kernel_ops() == 0


def test_slice_moves_and_deletes_follow_the_index(setup) -> None:
    store, proxy, fake = setup
    put(store, svc("a", "10.96.0.1"), eps("a", "10.244.0.1"))
    put(store, svc("b", "10.96.0.2"))
    sync(proxy, store)
    moved = eps("b", "10.244.0.1")
    moved["metadata"]["name"] = "a-1"  # the same slice now labels service b
    store.upsert("EndpointSlice", "d/a-1", moved)
    plan, res = sync(proxy, store)
    assert set(plan.services) == {"d/a", "d/b"} and res.ok
    assert fake.vs[("TCP", "10.96.0.1", 80)]["reals"] == {}
    assert fake.vs[("TCP", "10.96.0.2", 80)]["reals"] == {("10.244.0.1", 8080): 1}
    store.delete("EndpointSlice", "d/a-1")
    plan, _ = sync(proxy, store)
    assert set(plan.services) == {"d/b"} and fake.vs[("TCP", "10.96.0.2", 80)]["reals"] == {}
    store.delete("Service", "d/b")
    sync(proxy, store)
    assert ("TCP", "10.96.0.2", 80) not in fake.vs and "10.96.0.2" not in fake.addrs


def test_bad_and_conflicting_services_are_skipped_others_programmed(setup) -> None:
    store, proxy, fake = setup
    put(store, svc("good", "10.96.0.1", externalIPs=["203.0.113.1"]), eps("good", "10.244.0.1"))
    put(store, svc("bad", "10.96.0.2", port=0))
    put(store, svc("zclash", "10.96.0.3", externalIPs=["203.0.113.1"]))  # same external VIP:port as "good"
    plan, res = sync(proxy, store)
    assert res.errors == {"d/bad": ["spec.ports[0].port: 0 is not a port (1-65535)"],
                          "d/zclash": ["virtual server 203.0.113.1:80/TCP already belongs to service d/good"]}
    assert set(fake.vs) == {("TCP", "10.96.0.1", 80), ("TCP", "203.0.113.1", 80)}
    # a full resync keeps the current owner (even if a service sorting first claims the same VS later)
    put(store, svc("aclash", "10.96.0.4", externalIPs=["203.0.113.1"]))
    store.request_full()
    plan, res = sync(proxy, store)
    assert "already belongs to service d/good" in res.errors["d/aclash"][0]
    store.delete("Service", "d/aclash")
    assert "skipped" in proxy.explain("d/bad")
    # the owner goes away -> the waiting service gets its virtual servers on the next incremental plan
    store.delete("Service", "d/good")
    plan, res = sync(proxy, store)
    assert not res.errors  # "bad" did not change, so it is not re-reported; proxy.errors() still has it
    assert set(fake.vs) == {("TCP", "10.96.0.3", 80), ("TCP", "203.0.113.1", 80)}
    assert proxy.errors() == {"d/bad": "spec.ports[0].port: 0 is not a port (1-65535)"}


def test_failures_are_blamed_and_repaired_by_the_next_plan(setup) -> None:
    store, proxy, fake = setup
    put(store, svc("a", "10.96.0.1"), eps("a", "10.244.0.1"))
    put(store, svc("b", "10.96.0.2"), eps("b", "10.244.0.2"))
    sync(proxy, store)
    put(store, svc("a", "10.96.0.1"), eps("a", "10.244.0.1", "10.244.0.9"))
    put(store, svc("b", "10.96.0.2"), eps("b", "10.244.0.2", "10.244.0.8"))
    fake.fail_next = {"add real 10.244.0.9"}
    plan, res = sync(proxy, store)
    assert list(res.errors) == ["d/a"] and "Cannot allocate memory" in res.errors["d/a"][0]
    assert fake.vs[("TCP", "10.96.0.2", 80)]["reals"] == {("10.244.0.2", 8080): 1, ("10.244.0.8", 8080): 1}
    assert proxy.next_deadline(proxy._clock()) == proxy._clock() + 1.0  # the first backoff step
    plan, res = sync(proxy, store)  # not due yet: nothing to do, and no full resync either
    assert not plan and not plan.full and fake.calls.get("dump") == 1
    proxy._clock.t += 1.0  # type: ignore[attr-defined]
    plan, res = sync(proxy, store)  # d/a alone: its virtual server re-read, exactly the missing real added
    assert not plan.full and set(plan.services) == {"d/a"} and res.ok and fake.calls["get"] == 1
    assert [str(r) for _, r in plan.real_add] == ["RealServer(addr='10.244.0.9', port=8080, weight=1)"]
    assert proxy.kernel.ipvs_dump() == proxy.desired() and proxy.next_deadline(proxy._clock()) is None


def test_resync_repairs_drift_and_udp_removal_flushes_conntrack(setup) -> None:
    store, proxy, fake = setup
    put(store, svc("dns", "10.96.0.10", port=53, ports=[{"name": "p", "port": 53, "protocol": "UDP"}]),
        eps("dns", "10.244.0.1", "10.244.0.2", proto="UDP"))
    sync(proxy, store)
    key = ("UDP", "10.96.0.10", 53)
    del fake.vs[key]["reals"][("10.244.0.2", 8080)]  # someone ran ipvsadm -d
    fake.vs[key]["sched"] = "wlc"
    fake.vs[("TCP", "10.0.1.11", 31999)] = {"sched": "rr", "timeout": 0, "reals": {}}  # stale NodePort VS of ours
    proxy._owned.add([("TCP", "10.0.1.11", 31999)])  # (we made it earlier: it is in our record)
    fake.add_foreign(("TCP", "10.0.1.11", 31998))  # on the node address too, made by someone else
    fake.add_foreign(("TCP", "8.8.8.8", 53))  # not ours: left alone
    fake.addrs.add("10.96.9.9")  # stale address on our device
    plan = proxy.resync()
    assert [v.key for v in plan.vs_update] == [key] and plan.real_add[0][1].addr == "10.244.0.2"
    assert plan.vs_delete == [("TCP", "10.0.1.11", 31999)] and plan.addr_delete == ["10.96.9.9"]
    assert proxy.apply(plan).ok and not proxy.resync()
    assert ("TCP", "8.8.8.8", 53) in fake.vs and ("TCP", "10.0.1.11", 31998) in fake.vs
    put(store, svc("dns", "10.96.0.10", port=53, ports=[{"name": "p", "port": 53, "protocol": "UDP"}]),
        eps("dns", "10.244.0.1", proto="UDP"))
    plan, _ = sync(proxy, store)
    assert plan.conntrack_flush == [("10.96.0.10", 53, "10.244.0.2")] and fake.flushed == plan.conntrack_flush


def test_node_address_change_moves_node_ports(setup) -> None:
    store, proxy, fake = setup
    put(store, svc("np", "10.96.0.7", type="NodePort", ports=[{"name": "p", "port": 80, "nodePort": 30007}]),
        eps("np", "10.244.0.1"))
    sync(proxy, store)
    assert ("TCP", "10.0.1.11", 30007) in fake.vs
    proxy.set_node_addresses(["10.0.1.12"])
    plan, res = sync(proxy, store)
    assert plan.full and res.ok
    assert ("TCP", "10.0.1.12", 30007) in fake.vs and ("TCP", "10.0.1.11", 30007) not in fake.vs


def test_plan_prints_and_explain(setup) -> None:
    store, proxy, _ = setup
    put(store, svc("web", "10.96.0.5", type="NodePort", sessionAffinity="ClientIP",
                   ports=[{"name": "p", "port": 80, "nodePort": 30080}]), eps("web", "10.244.0.1"))
    plan, _ = sync(proxy, store)
    text = str(plan)
    assert "+ vs   TCP 10.96.0.5:80 rr persistent 10800" in text and "+ addr 10.96.0.5/32" in text
    assert "+ real TCP 10.0.1.11:30080 -> 10.244.0.1:8080 weight 1" in text
    assert "NodePort of service d/web" in proxy.explain("10.0.1.11:30080")
    assert "sessionAffinity ClientIP" in proxy.explain("d/web")
    assert "no virtual server" in proxy.explain("10.1.1.1")


def test_request_bytes_match_pyroute2() -> None:
    """Our hand-built attributes decode to the same values as pyroute2's IPVSService/IPVSDest encoding."""
    from pyroute2 import IPVSDest, IPVSService
    from pyroute2.netlink.generic import ipvs

    def pr_attrs(nested_name: str, obj) -> dict:
        m = ipvs.ipvsmsg()
        m["cmd"], m["version"] = 1, 1
        m["attrs"] = [(nested_name, obj.dump_nla())]
        m["header"]["type"], m["header"]["flags"], m["header"]["sequence_number"] = 30, 5, 1
        m.encode()
        top = dict(k._attrs(bytes(m.data[20:])))
        return {t: v for t, v in k._attrs(next(iter(top.values())))}

    v = VirtualServer("UDP", "10.96.0.10", 53, "sh", 60)
    ours = dict(k._attrs(dict(k._attrs(k.op_add_vs(v).payload))[k.ATTR_SERVICE]))
    theirs = pr_attrs("IPVS_CMD_ATTR_SERVICE", IPVSService(addr="10.96.0.10", port=53, protocol=17, sched_name="sh",
                                                           timeout=60, flags={"flags": 1 | 8, "mask": 0xFFFFFFFF}))
    # persistent | IP_VS_SVC_F_SCHED_SH_FALLBACK: sh skips a weight-0 destination instead of refusing
    assert ours == theirs
    d = dict(k._attrs(dict(k._attrs(k.op_add_real(v.key, RealServer("10.244.0.1", 5353, 0)).payload))[k.ATTR_DEST]))
    theirs_d = pr_attrs("IPVS_CMD_ATTR_DEST", IPVSDest(addr="10.244.0.1", port=5353, fwd_method=0, weight=0))
    assert {t: d[t] for t in d} == {t: theirs_d[t] for t in d}
    msg = k.encode(k.op_del_vs(v.key), family=33, seq=7)
    assert struct.unpack_from("=IHHII", msg) == (len(msg), 33, k.NLM_F_REQUEST | k.NLM_F_ACK, 7, 0)


def test_parse_proc_ip_vs() -> None:
    text = """IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
TCP  0A600001:01BB rr persistent 6000
  -> 0AF40105:1F90      Masq    1      0          0
  -> 0AF40205:1F90      Route   1      0          0
UDP  0A60000A:0035 sh
FWM  00000001 wlc
  -> 0AF40305:1F90      Masq    1      0          0
"""
    got = k.parse_proc_ip_vs(text)
    assert got == {
        ("TCP", "10.96.0.1", 443): VirtualServer("TCP", "10.96.0.1", 443, "rr", 6000,
                                                 (RealServer("10.244.1.5", 8080, 1), RealServer("10.244.2.5", 8080, -1))),
        ("UDP", "10.96.0.10", 53): VirtualServer("UDP", "10.96.0.10", 53, "sh", 0, ()),
    }


def test_sysctls_follow_kernel_version() -> None:
    assert ("net/ipv4/vs/conn_reuse_mode", "0") in k.sysctls("fabric-svc", "5.4.0-150-generic")
    new = dict(k.sysctls("fabric-svc", "6.1.0-18-amd64"))
    assert "net/ipv4/vs/conn_reuse_mode" not in new
    assert new["net/ipv4/vs/conntrack"] == "1" and new["net/ipv4/conf/fabric-svc/arp_ignore"] == "1"
