"""The service proxy under failure injection (Felix's way): every case under every failure.

The fake kernel (tests/unit/lbfake.py) refuses an operation once, refuses it for a while, or stops
answering (a hung netlink socket, a hung nft / conntrack). Each case is a sequence of cluster changes;
a failure is armed before one step's sync and lifted after it. Then, syncing only at the deadlines
the proxy asks for (`next_deadline`), the kernel must equal what the store's services ask for within
a few syncs — with no full resync (one kernel dump: the first sync's), no change lost, and never a
deadline in the past (no busy retrying).
"""

from __future__ import annotations

import copy
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from fabric.config import ServiceSettings
from fabric.tracker import Store
from loadbalancer.failures import backoff
from loadbalancer.owned import OwnedVirtualServers
from loadbalancer.proxy import ServiceProxy
from tests.unit.lbfake import FakeKernel, divergence

READY = {"ready": True, "serving": True, "terminating": False}
TERM = {"ready": False, "serving": True, "terminating": True}


def recorded(path: Path) -> list[tuple]:
    """The keys an ownership record holds, as the next agent would read them."""
    o = OwnedVirtualServers(path)
    assert o.load(), o.problem
    return sorted(o.keys)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def svc(name: str, ip: str, ports: list[dict] | None = None, **spec) -> dict:
    return {"metadata": {"name": name, "namespace": "d"},
            "spec": {"clusterIP": ip, "ports": ports or [{"name": "tcp", "port": 80, "protocol": "TCP"}], **spec}}


def eps(name: str, *pods: tuple[str, dict], ports=(("tcp", 8080, "TCP"),), node: str = "node-a") -> dict:
    return {"metadata": {"name": f"{name}-1", "namespace": "d", "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": n, "port": p, "protocol": pr} for n, p, pr in ports],
            "endpoints": [{"addresses": [ip], "nodeName": node, "conditions": c} for ip, c in pods]}


TCP_UDP = [{"name": "tcp", "port": 80, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}]
BOTH = (("tcp", 8080, "TCP"), ("dns", 5353, "UDP"))


def base(store: Store) -> None:
    put(store, svc("web", "10.96.0.10", TCP_UDP), eps("web", ("10.244.1.2", READY), ("10.244.1.3", READY), ports=BOTH))
    put(store, svc("np", "10.96.0.20", [{"name": "tcp", "port": 80, "protocol": "TCP", "nodePort": 30080}],
                   type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=32000,
                   externalIPs=["203.0.113.20"]), eps("np", ("10.244.1.4", READY)))
    s = svc("lb", "10.96.0.30", type="LoadBalancer", loadBalancerSourceRanges=["10.10.0.0/16"])
    s["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.30"}]}}
    put(store, s, eps("lb", ("10.244.1.5", READY), ("10.244.2.5", READY), node="node-b"))


def put(store: Store, s: dict, sl: dict | None = None) -> None:
    store.upsert("Service", f"d/{s['metadata']['name']}", copy.deepcopy(s))
    if sl is not None:
        store.upsert("EndpointSlice", f"d/{sl['metadata']['name']}", copy.deepcopy(sl))


def churn(store: Store) -> None:
    """Scale up, one endpoint terminating, a UDP endpoint gone (conntrack flush)."""
    put(store, svc("web", "10.96.0.10", TCP_UDP),
        eps("web", ("10.244.1.2", TERM), ("10.244.1.6", READY), ("10.244.1.7", READY), ports=BOTH))


def reshape(store: Store) -> None:
    """Options change in place, a node port and a health check go, an external IP moves to another service."""
    s = svc("np", "10.96.0.20", sessionAffinity="ClientIP")
    s["metadata"]["annotations"] = {"bgp-fabric.io/scheduler": "sh"}
    put(store, s)
    put(store, svc("ext", "10.96.0.40", externalIPs=["203.0.113.20"]), eps("ext", ("10.244.1.8", READY)))


def delete(store: Store) -> None:
    store.delete("Service", "d/web")
    store.delete("EndpointSlice", "d/web-1")
    put(store, svc("new", "10.96.0.50", TCP_UDP), eps("new", ("10.244.1.9", READY), ports=BOTH))


CASES: dict[str, Callable[[Store], None]] = {"churn": churn, "reshape": reshape, "delete": delete}

# (fail_next, fail, hang): one-shot refusals, refusals while armed, surfaces that stop answering
SCENARIOS = {
    "none": ((), (), ()),
    **{f"refuse once {n}": ((n,), (), ()) for n in ["add vs", "set vs", "delete vs", "add real", "set real",
                                                     "delete real", "add address", "del address", "nft",
                                                     "conntrack", "health", "sysctl"]},
    "refuse real adds and the repair read": (("add real",), ("get",), ()),
    "refuse every IPVS write": ((), ("add ", "set ", "delete "), ()),
    **{f"hang {n}": ((), (), (n,)) for n in ["ipvs", "address", "nft", "conntrack"]},
    "hang ipvs and the repair read": ((), (), ("ipvs", "get")),
    "everything hangs": ((), (), ("ipvs", "address", "nft", "conntrack", "get")),
    **{f"raise in {n}": ((), (), (), (n,)) for n in ["ipvs", "address", "sysctl"]},
}


class World:
    def __init__(self, state_path: Path | None = None, fake: FakeKernel | None = None) -> None:
        self.clock = Clock()
        self.fake = fake or FakeKernel()
        self.store = Store()
        self.proxy = ServiceProxy(ServiceSettings(cluster_cidr=["10.244.0.0/16"]), "node-a", ["10.0.1.11"],
                                  clock=self.clock, kernel_factory=lambda: self.fake, state_path=state_path)
        self.syncs = 0

    def sync(self):
        self.syncs += 1
        res = self.proxy.sync(self.store, self.store.take())
        d = self.proxy.next_deadline(self.clock.t)
        assert d is None or d > self.clock.t, "a retry due now: the runner would spin"
        return res

    def wait_and_sync(self) -> bool:
        """Advance to the next deadline (if any) and sync; False when nothing was due."""
        d = self.proxy.next_deadline(self.clock.t)
        if d is None:
            return False
        self.clock.t = d
        self.sync()
        return True

    def converge(self, limit: int = 4) -> int:
        for n in range(limit + 1):
            if not divergence(self.proxy, self.fake, self.store) and self.proxy.next_deadline(self.clock.t) is None:
                return n
            if not self.wait_and_sync():
                break
        raise AssertionError(f"not converged after {limit} retries: {divergence(self.proxy, self.fake, self.store)}; "
                             f"failing: {self.proxy.failing(self.clock.t)}")


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_case_converges_under_every_failure(case: str, scenario: str) -> None:
    w = World()
    base(w.store)
    assert w.sync().ok and not divergence(w.proxy, w.fake, w.store)
    fail_next, fail, hang, boom = (*SCENARIOS[scenario], ())[:4]
    w.fake.fail_next, w.fake.fail, w.fake.hang, w.fake.boom = set(fail_next), set(fail), set(hang), set(boom)
    if boom == ("sysctl",):
        w.proxy.request_full()  # sysctls are written by full syncs
    CASES[case](w.store)
    w.sync()
    w.clock.t += 0.5
    w.sync()  # still failing, and not due: nothing retried
    w.fake.fail_next, w.fake.fail, w.fake.hang, w.fake.boom = set(), set(), set(), set()  # the kernel recovers
    n = w.converge()
    assert n <= 4
    assert w.fake.calls["dump"] == 1 + (boom == ("sysctl",)), "a failure escalated to a full resync"
    assert not w.proxy.failing(w.clock.t)
    # and the next change is applied at once, incrementally
    put(w.store, svc("late", "10.96.0.60"), eps("late", ("10.244.1.10", READY)))
    assert w.sync().ok and not divergence(w.proxy, w.fake, w.store)


def test_a_failing_service_is_retried_alone_with_exponential_backoff() -> None:
    w = World()
    base(w.store)
    w.sync()
    w.fake.fail = {"add real 10.244.1.6"}  # web's new endpoint is refused until further notice
    churn(w.store)
    put(w.store, svc("np", "10.96.0.20", [{"name": "tcp", "port": 80, "protocol": "TCP", "nodePort": 30080}],
                     type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=32000,
                     externalIPs=["203.0.113.20"]), eps("np", ("10.244.1.4", READY), ("10.244.1.11", READY)))
    res = w.sync()
    assert list(res.errors) == ["d/web"] and "add real 10.244.1.6:8080 to TCP 10.96.0.10:80" in res.errors["d/web"][0]
    assert {r.addr for r in w.fake._vs(("TCP", "10.96.0.20", 80)).reals} == {"10.244.1.4", "10.244.1.11"}
    times = []
    start = w.clock.t
    for _ in range(9):
        ops_before = len(w.fake.ops)
        assert w.wait_and_sync()
        times.append(w.clock.t - start)
        retried = w.fake.ops[ops_before:]
        assert retried and all("10.96.0.10" in op for op in retried), retried  # web alone
    assert times == [sum(backoff(i) for i in range(1, n + 1)) for n in range(1, 10)]  # 1, 3, 7, 15, 31, 63, 123, 183, 243
    status = w.proxy.failing(w.clock.t)
    assert status["d/web"]["attempts"] == 10 and status["d/web"]["retryIn"] == 60.0
    assert "Cannot allocate memory" in status["d/web"]["errors"][0]
    assert "failing (10 in a row, next try in 60.0s): add real 10.244.1.6:8080" in w.proxy.explain("d/web")
    # meanwhile another service's change goes through at once
    put(w.store, svc("lb", "10.96.0.30", type="LoadBalancer", loadBalancerSourceRanges=["10.10.0.0/16"]),
        eps("lb", ("10.244.2.6", READY), node="node-b"))
    res = w.sync()
    assert "d/lb" not in res.errors and {r.addr for r in w.fake._vs(("TCP", "10.96.0.30", 80)).reals} == {"10.244.2.6"}
    w.fake.fail = set()
    assert w.converge(1) <= 1 and w.fake.calls["dump"] == 1


def test_changes_are_kept_while_the_kernel_cannot_be_read() -> None:
    w = World()
    w.fake.hang = {"dump"}  # the very first (full) sync can't read IPVS
    base(w.store)
    res = w.sync()
    assert res.errors == {"(node)": ["dump: no answer from the kernel within 5 s"]} and not w.fake.vs
    assert w.proxy.failing(w.clock.t)["(kernel)"]["retryIn"] == 1.0
    churn(w.store)  # more changes arrive while it is down: taken, kept, not tried before the retry
    w.clock.t += 0.5
    assert w.sync().errors == {"(node)": ["dump: no answer from the kernel within 5 s"]}
    assert w.fake.calls["dump"] == 1
    w.fake.hang = set()
    assert w.converge(1) == 1


def test_missing_ipvs_is_one_line_and_retried_with_backoff(caplog) -> None:
    from fabric.config import parse
    from fabric.services import ServiceSync
    from loadbalancer.ipvs_kernel import KernelUnavailable

    def no_ipvs():
        raise KernelUnavailable("IPVS is not available in this kernel (generic netlink family 'IPVS': "
                                "No such file or directory); load the ip_vs module")

    clock = Clock()
    cfg = parse({"node": {"name": "node-a", "address": "10.0.1.11/24"}, "source": {"kind": "file", "path": "c"},
                 "paths": {"runDir": "/nonexistent/run"}})
    sync = ServiceSync(cfg, Path("/nonexistent/run"), clock=clock, kernel_factory=no_ipvs)
    store = Store()
    base(store)
    caplog.set_level(logging.INFO, "fabric.services")
    for _ in range(5):
        sync.sync(store, store.take())
        clock.t = sync.next_deadline(clock.t)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None and "\n" not in errors[0].getMessage()
    assert "IPVS is not available in this kernel" in errors[0].getMessage()
    assert sync.status()["failing"]["(kernel)"]["attempts"] == 5
    assert clock.t == 1000.0 + 1 + 2 + 4 + 8 + 16


def test_hung_nft_fails_the_nft_step_only_and_is_retried() -> None:
    w = World()
    w.fake.hang = {"nft"}
    base(w.store)
    res = w.sync()
    assert res.errors == {"(node)": ["nft: nft did not finish within 30 s (killed)"]}
    assert not divergence(w.proxy, w.fake) or all(d.startswith("nft") for d in divergence(w.proxy, w.fake))
    assert len(w.fake.vs) == 7 and w.fake.addrs  # IPVS and addresses are programmed
    churn(w.store)
    before = w.fake.calls.get("nft", 0) + w.fake.calls["nft_probe"]
    w.sync()  # in backoff: the nft step is not tried, IPVS follows the change
    assert w.fake.calls.get("nft", 0) + w.fake.calls["nft_probe"] == before
    assert all(d.startswith("nft") for d in divergence(w.proxy, w.fake, w.store))
    assert w.wait_and_sync() and w.proxy.failing(w.clock.t)["(nft)"]["attempts"] == 2
    w.fake.hang = set()
    assert w.converge(1) == 1  # the retry rewrites the whole table from what is wanted now


def test_conntrack_flush_retried_and_dropped_when_the_endpoint_returns() -> None:
    w = World()
    base(w.store)
    w.sync()
    w.fake.fail = {"conntrack"}
    churn(w.store)  # 10.244.1.3 leaves the UDP service
    res = w.sync()
    assert "conntrack -D udp 10.96.0.10:53 -> 10.244.1.3: Operation not permitted" in res.errors["(node)"]
    w.fake.fail = set()
    assert w.wait_and_sync() and w.fake.flushed == [("10.96.0.10", 53, "10.244.1.3")]
    # again, but the endpoint comes back before the retry: its flows are left alone
    w.fake.fail = {"conntrack"}
    put(w.store, svc("web", "10.96.0.10", TCP_UDP), eps("web", ("10.244.1.6", READY), ports=BOTH))
    w.sync()
    put(w.store, svc("web", "10.96.0.10", TCP_UDP), eps("web", ("10.244.1.6", READY), ("10.244.1.7", READY),
                                                          ports=BOTH))
    w.fake.fail = set()
    w.sync()
    assert w.converge() <= 1
    assert ("10.96.0.10", 53, "10.244.1.7") not in w.fake.flushed and ("10.96.0.10", 53, "10.244.1.2") in w.fake.flushed


# -- ownership (finding 13) ----------------------------------------------------------------------

NP_KEY = ("TCP", "10.0.1.11", 30080)


def test_a_foreign_virtual_server_on_a_node_address_is_never_touched(tmp_path: Path) -> None:
    w = World(tmp_path / "ipvs-owned")
    w.fake.add_foreign(NP_KEY, {("192.0.2.9", 80): 5})  # someone's ipvsadm -A -t 10.0.1.11:30080 + -a
    w.fake.add_foreign(("TCP", "10.0.1.11", 22))
    base(w.store)
    res = w.sync()
    assert list(res.errors) == ["d/np"] and "10.0.1.11:30080/TCP exists and was not made by this agent" in \
        res.errors["d/np"][0] and "ipvsadm -D -t 10.0.1.11:30080" in res.errors["d/np"][0]
    assert w.fake.vs[NP_KEY] == {"sched": "wlc", "timeout": 0, "flags": 0, "reals": {("192.0.2.9", 80): 5},
                                 "foreign": True}
    assert ("TCP", "203.0.113.20", 80) in w.fake.vs  # the service's other virtual servers are programmed
    owned = recorded(tmp_path / "ipvs-owned")
    assert NP_KEY not in owned and ("TCP", "10.96.0.20", 80) in owned
    # retried with backoff; untouched each time; taken once its owner removes it
    for _ in range(3):
        assert w.wait_and_sync()
        assert w.fake.vs[NP_KEY]["reals"] == {("192.0.2.9", 80): 5}
    del w.fake.vs[NP_KEY]
    assert w.converge(1) == 1 and w.fake._vs(NP_KEY).reals[0].addr == "10.244.1.4"
    # a full resync (the periodic one) leaves the other foreign one alone too
    w.proxy.request_full()
    assert w.sync().ok and w.fake.vs[("TCP", "10.0.1.11", 22)]["foreign"]


def test_a_new_service_never_takes_over_a_virtual_server_that_appeared_meanwhile(tmp_path: Path) -> None:
    w = World(tmp_path / "ipvs-owned")
    base(w.store)
    w.sync()
    w.fake.add_foreign(("TCP", "10.96.0.70", 80), {("192.0.2.1", 80): 1})  # made while we were running
    put(w.store, svc("taken", "10.96.0.70"), eps("taken", ("10.244.1.12", READY)))
    res = w.sync()
    assert "exists and was not made by this agent" in res.errors["d/taken"][0]
    assert w.fake.vs[("TCP", "10.96.0.70", 80)]["reals"] == {("192.0.2.1", 80): 1}  # no real added to it
    assert ("TCP", "10.96.0.70", 80) not in recorded(tmp_path / "ipvs-owned")


def test_ownership_survives_a_restart_and_the_record_is_private(tmp_path: Path) -> None:
    path = tmp_path / "run" / "ipvs-owned"
    w = World(path)
    base(w.store)
    w.sync()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary file left
    keys = set(recorded(path))
    assert keys == set(w.fake.vs) and NP_KEY in keys
    # restart: a new proxy with the same record and kernel; the cluster lost the NodePort service
    w2 = World(path, fake=w.fake)
    base(w2.store)
    w2.store.delete("Service", "d/np")
    w2.fake.add_foreign(("TCP", "10.0.1.11", 30090))  # and someone made one on the node address
    assert w2.sync().ok
    assert NP_KEY not in w2.fake.vs and ("TCP", "10.0.1.11", 30090) in w2.fake.vs
    assert "owning the 7 virtual server(s) listed in" in w2.proxy.ownership_note()


def test_first_start_without_a_record_adopts_only_the_service_device(tmp_path: Path) -> None:
    """Migration: a node where an older version ran (no record): what is on fabric-svc's addresses is
    adopted; a NodePort virtual server on the node address is not ours to judge (reported if wanted)."""
    old = World()
    base(old.store)
    old.sync()
    fake = old.fake
    fake.add_foreign(("TCP", "10.96.99.99", 80))  # on an address of our device, made by hand: adopted too
    fake.addrs.add("10.96.99.99")
    w = World(tmp_path / "ipvs-owned", fake=fake)
    base(w.store)
    res = w.sync()
    assert "adopted the 7 virtual server(s) on fabric-svc's addresses" in w.proxy.ownership_note()
    assert list(res.errors) == ["d/np"] and "10.0.1.11:30080/TCP exists" in res.errors["d/np"][0]
    assert ("TCP", "10.96.99.99", 80) not in fake.vs  # adopted, not wanted: removed with its address
    assert NP_KEY in fake.vs


def test_unwritable_run_dir_is_reported_and_services_still_programmed(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "ipvs-owned").mkdir()  # the record's path is a directory: every write fails
    w = World(ro / "ipvs-owned")
    base(w.store)
    res = w.sync()
    assert any("ipvs-owned: not written" in e for e in res.errors["(node)"])
    assert not divergence(w.proxy, w.fake, w.store)
    assert any("not written" in x for x in w.proxy.node_warnings())


def test_the_record_is_a_journal_compacted_atomically(tmp_path: Path) -> None:
    from loadbalancer.owned import HEADER, OwnedVirtualServers

    path = tmp_path / "ipvs-owned"
    o = OwnedVirtualServers(path)
    o.add([("TCP", f"10.96.0.{i}", 80) for i in range(100)])
    assert o.save() is None and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    size = path.stat().st_size
    o.add([("UDP", "10.96.1.1", 53)])
    o.save()
    assert path.stat().st_size - size == len("+ UDP 10.96.1.1 53\n")  # a change costs its own line
    o.discard([("TCP", "10.96.0.0", 80)])
    o.save()
    again = OwnedVirtualServers(path)
    assert again.load() and again.keys == o.keys and len(again.keys) == 100
    for i in range(300):  # churn: the journal is compacted, never more than ~2x the set
        o.add([("SCTP", "10.96.2.1", 1000 + i)])
        o.save()
        o.discard([("SCTP", "10.96.2.1", 1000 + i)])
        o.save()
    assert len(path.read_text().splitlines()) <= 2 * 100 + 64 + 2
    assert not [p for p in tmp_path.iterdir() if p != path]
    # a crash mid-append leaves a torn line: ignored, and the next save rewrites the file whole
    with open(path, "a") as f:
        f.write("+ TCP 10.9")
    torn = OwnedVirtualServers(path)
    assert torn.load() and torn.keys == o.keys
    torn.add([("TCP", "10.96.3.3", 80)])
    torn.save()
    final = OwnedVirtualServers(path)
    assert final.load() and final.keys == o.keys | {("TCP", "10.96.3.3", 80)}
    # garbage: reported, treated as no record (the migration rule), rewritten at the next save
    path.write_text(HEADER + "+ ICMP 1.2.3.4 0\n")
    bad = OwnedVirtualServers(path)
    assert not bad.load() and "unreadable" in (bad.problem or "")
    bad.add([("TCP", "10.96.0.1", 80)])
    assert bad.save() is None and bad.problem is None
    assert OwnedVirtualServers(path).load()


def test_the_agent_keeps_the_record_in_its_own_run_dir(tmp_path: Path) -> None:
    """A relative paths.runDir is relative to the config file (as the agent's status and ExaBGP files)."""
    from fabric.agent import Agent, _make_service_proxy
    from fabric.config import parse

    cfg = parse({"node": {"name": "n1", "address": "10.0.1.11/24"}, "source": {"kind": "file", "path": "c.yaml"},
                 "paths": {"runDir": "run-n1"}})
    agent = Agent(cfg, tmp_path / "conf" / "agent.yaml")
    sync = _make_service_proxy(agent)
    assert sync.proxy._owned.path == tmp_path / "conf" / "run-n1" / "ipvs-owned" == agent.run_dir / "ipvs-owned"


def test_a_malformed_endpoint_address_is_reported_not_dropped_silently(caplog) -> None:
    """Logged once (not at every sync), listed in status and in `fabric status`'s text, counted nowhere as
    a destination; the rest of the service is programmed."""
    from fabric import status as status_mod
    from fabric.config import parse
    from fabric.services import ServiceSync

    clock = Clock()
    cfg = parse({"node": {"name": "node-a", "address": "10.0.1.11/24"}, "source": {"kind": "file", "path": "c"},
                 "paths": {"runDir": "/nonexistent/run"}})
    fake = FakeKernel()
    sync = ServiceSync(cfg, Path("/nonexistent/run"), clock=clock, kernel_factory=lambda: fake)
    store = Store()
    sl = eps("web", ("10.244.1.5", READY), ("10.244.1.6", READY))
    sl["endpoints"].append({"addresses": ["10.244.1.999"], "conditions": READY, "nodeName": "node-a"})
    put(store, svc("web", "10.96.0.10"), sl)
    caplog.set_level(logging.INFO, "fabric.services")
    for _ in range(3):
        sync.sync(store, store.take(), full=True)
    lines = [r.getMessage() for r in caplog.records if "10.244.1.999" in r.getMessage()]
    assert lines == ["service d/web: EndpointSlice d/web-1: endpoints[2].addresses[0]: '10.244.1.999' is not an "
                     "IPv4 address; the address skipped"], lines
    st = sync.status()
    assert st["realServers"] == 2 and "d/web" in st["skippedSliceEntries"]
    text = status_mod.render({"node": "node-a", "address": "10.0.1.11/24", "asn": 64512, "ready": True,
                              "ipipModes": [], "peers": [], "routes": {}, "services": st})
    assert "TCP 10.96.0.10:80" in text and "d/web" in text and "2/2" in text
    assert "d/web: 1 slice entry skipped: EndpointSlice d/web-1: endpoints[2].addresses[0]" in text
    assert "services: 1 virtual server(s), 2 destination(s); 0 skipped, 0 failing" in text
