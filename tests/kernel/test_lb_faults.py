"""The service proxy's failure paths with real IPVS (lab kernel): ownership of virtual servers
(finding 13), a hung `nft` (finding 6), a virtual server someone else made in the way.

Each test makes its own network namespace; the proxy's clock is injected so retries happen when the
test says (the waits inside — a killed nft, netlink — are real).
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric.config import ServiceSettings
from fabric.tracker import Store
from loadbalancer.owned import OwnedVirtualServers
from loadbalancer.proxy import ServiceProxy
from tests.kernel.test_lb_dataplane import READY, eps, set_service, svc

pytestmark = pytest.mark.kernel

NODE = "192.168.201.1"
NP = [{"name": "tcp", "port": 80, "protocol": "TCP", "nodePort": 30080}]


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


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"lbfault-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)  # IPVS masquerade needs lo up
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def ipvsadm(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "ipvsadm", *args], check=True, capture_output=True,
                          text=True).stdout


def listing(ns: str, vs: str) -> list[str]:
    """`ipvsadm -Ln -t VS` without its header: the virtual server line and its real servers."""
    lines = [line for line in ipvsadm(ns, "-Ln", "-t", vs).splitlines()
             if line.split()[:1] in (["TCP"], ["->"]) and "RemoteAddress" not in line]
    return [" ".join(line.split()[:4]) for line in lines]


def test_a_virtual_server_the_agent_did_not_make_is_never_touched(ns: str, tmp_path: Path) -> None:
    ipvsadm(ns, "-A", "-t", f"{NODE}:30080", "-s", "wlc")
    ipvsadm(ns, "-a", "-t", f"{NODE}:30080", "-r", "192.0.2.9:80", "-m", "-w", "5")
    foreign = listing(ns, f"{NODE}:30080")
    assert foreign == ["TCP 192.168.201.1:30080 wlc", "-> 192.0.2.9:80 Masq 5"]
    clock, state = Clock(), tmp_path / "run" / "ipvs-owned"
    p = ServiceProxy(ServiceSettings(), "node-a", [NODE], netns=ns, state_path=state, clock=clock)
    try:
        st = Store()
        set_service(st, svc("np", "10.96.8.1", NP, "NodePort"), eps("np", {"pod1": READY}, ports=(("tcp", 8080, "TCP"),)))
        res = p.sync(st, st.take())
        assert list(res.errors) == ["default/np"], str(res)
        assert f"{NODE}:30080/TCP exists and was not made by this agent" in res.errors["default/np"][0]
        assert listing(ns, f"{NODE}:30080") == foreign  # not a byte changed
        assert listing(ns, "10.96.8.1:80") == ["TCP 10.96.8.1:80 rr", "-> 10.244.1.2:8080 Masq 1"]
        assert stat.S_IMODE(state.stat().st_mode) == 0o600
        assert recorded(state) == [("TCP", "10.96.8.1", 80)]
        # retried with backoff, still untouched; taken once its owner removes it
        clock.t = p.next_deadline(clock.t)
        assert "not made by this agent" in p.sync(st, st.take()).errors["default/np"][0]
        assert listing(ns, f"{NODE}:30080") == foreign
        ipvsadm(ns, "-D", "-t", f"{NODE}:30080")
        clock.t = p.next_deadline(clock.t)
        assert p.sync(st, st.take()).ok and p.next_deadline(clock.t) is None
        assert listing(ns, f"{NODE}:30080") == ["TCP 192.168.201.1:30080 rr", "-> 10.244.1.2:8080 Masq 1"]
    finally:
        p.close()
    # restart with the record; meanwhile someone made another one on the node address; the cluster
    # no longer has the service: ours go, theirs stays
    ipvsadm(ns, "-A", "-t", f"{NODE}:30099", "-s", "rr")
    p2 = ServiceProxy(ServiceSettings(), "node-a", [NODE], netns=ns, state_path=state, clock=clock)
    try:
        st2 = Store()
        assert p2.sync(st2, st2.take()).ok
        assert "owning the 2 virtual server(s) listed in" in (p2.ownership_note() or "")
        out = ipvsadm(ns, "-Ln")
        assert f"{NODE}:30099" in out and "10.96.8.1:80" not in out and f"{NODE}:30080" not in out
        assert recorded(state) == []
    finally:
        p2.close()


def test_a_hung_nft_is_killed_and_retried_while_ipvs_is_programmed(ns: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    bindir, pids = tmp_path / "bin", tmp_path / "pids"
    bindir.mkdir()
    (bindir / "nft").write_text(f"#!/bin/sh\nsleep 300 &\necho $! >> {pids}\necho $$ >> {pids}\nexec sleep 300\n")
    (bindir / "nft").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    clock = Clock()
    p = ServiceProxy(ServiceSettings(command_timeout=1), "node-a", [NODE], netns=ns, clock=clock)
    try:
        st = Store()
        set_service(st, svc("web", "10.96.9.1", [{"name": "tcp", "port": 80, "protocol": "TCP"}]),
                    eps("web", {"pod1": READY}, ports=(("tcp", 8080, "TCP"),)))
        t0 = time.monotonic()
        res = p.sync(st, st.take())
        took = time.monotonic() - t0
        assert res.errors == {"(node)": ["nft: nft did not finish within 1 s (killed)"]} and 1 <= took < 5, (res, took)
        assert listing(ns, "10.96.9.1:80") == ["TCP 10.96.9.1:80 rr", "-> 10.244.1.2:8080 Masq 1"]  # IPVS done
        left = [int(x) for x in pids.read_text().split()]
        assert len(left) == 2 and not [x for x in left if Path(f"/proc/{x}").exists()
                                       and Path(f"/proc/{x}/stat").read_text().split()[2] != "Z"]
        failing = p.failing(clock.t)["(nft)"]
        assert failing["attempts"] == 1 and failing["retryIn"] == 1.0
        # a change before the retry is due: IPVS follows at once, nft is not run
        set_service(st, svc("web", "10.96.9.1", [{"name": "tcp", "port": 80, "protocol": "TCP"}]),
                    eps("web", {"pod1": READY, "pod2": READY}, ports=(("tcp", 8080, "TCP"),)))
        t0 = time.monotonic()
        assert p.sync(st, st.take()).ok and time.monotonic() - t0 < 0.9
        assert len(listing(ns, "10.96.9.1:80")) == 3
        # at its deadline: tried (and killed) again, the next step twice as far
        clock.t = p.next_deadline(clock.t)
        assert "nft did not finish" in p.sync(st, st.take()).errors["(node)"][0]
        assert p.failing(clock.t)["(nft)"]["attempts"] == 2 and p.failing(clock.t)["(nft)"]["retryIn"] == 2.0
        # nft works again: the retry probes the real one (this kernel has no inet nft: one warning, settled)
        monkeypatch.setenv("PATH", os.environ["PATH"].split(":", 1)[1])
        clock.t = p.next_deadline(clock.t)
        res = p.sync(st, st.take())
        assert res.ok and p.next_deadline(clock.t) is None and not p.failing(clock.t)
    finally:
        p.close()


def test_nodeports_follow_the_interface_addresses_inside_nodePortAddresses(ns: str, tmp_path: Path) -> None:
    """services.nodePortAddresses as kube-proxy's --nodeport-addresses, through the services stage with the
    real address dump and IPVS: NodePorts on every address of the node's interfaces inside the CIDRs (not
    the node address outside them, not the service device's), following an address added and removed."""
    from types import SimpleNamespace

    from fabric.config import parse
    from fabric.node_addresses import read_local_addresses
    from fabric.services import ServiceSync
    from fabric.stage import StageInput
    from fabric.stages.services import ServicesStage
    from tests.netprobe import in_netns

    def ip(*args: str) -> None:
        subprocess.run(["ip", "-n", ns, *args], check=True)

    for dev, addr in (("eth0", f"{NODE}/24"), ("eth1", "192.168.5.11/24"), ("fabric-svc", "192.168.5.200/32")):
        ip("link", "add", dev, "type", "dummy")
        ip("link", "set", dev, "up")
        ip("addr", "add", addr, "dev", dev)
    cfg = parse({"node": {"name": "node-a", "address": f"{NODE}/24"}, "source": {"kind": "file", "path": "c.yaml"},
                 "services": {"nodePortAddresses": ["192.168.5.0/24"]}})
    st = Store()
    set_service(st, svc("np", "10.96.8.1", NP, "NodePort"), eps("np", {"pod1": READY}, ports=(("tcp", 8080, "TCP"),)))
    sync = ServiceSync(cfg, tmp_path, netns=ns)
    stage = ServicesStage(SimpleNamespace(cfg=cfg, store=st), lambda a: sync,
                          read_addresses=lambda: in_netns(f"/run/netns/{ns}", read_local_addresses))

    def run(full: bool = False) -> set[str]:
        res = stage.run(StageInput(st.take(), full, time.monotonic(), True), None)
        assert res.error is None and not res.failures, res
        return {line.split()[1] for line in ipvsadm(ns, "-Ln").splitlines() if line.startswith("TCP")}

    try:
        assert run(True) == {"10.96.8.1:80", "192.168.5.11:30080"}  # not on NODE (outside), not on fabric-svc
        ip("addr", "add", "192.168.5.12/24", "dev", "eth1")
        assert run() == {"10.96.8.1:80", "192.168.5.11:30080"}, "no address event, no re-read"
        stage.addresses_changed()  # what the agent's monitor does on RTM_NEWADDR
        assert run() == {"10.96.8.1:80", "192.168.5.11:30080", "192.168.5.12:30080"}
        ip("addr", "del", "192.168.5.11/24", "dev", "eth1")  # the primary: the kernel drops .12 too
        stage.addresses_changed()
        assert run() == {"10.96.8.1:80"}
        assert stage.node_port_addresses == ()
    finally:
        sync.close()
