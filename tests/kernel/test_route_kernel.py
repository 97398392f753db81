"""The route adapter and reconciler against a real kernel: apply, read back equal, idempotent, and
ownership: another owner's route at the same (dst, metric) key is never replaced or deleted."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid

import pytest

pytestmark = pytest.mark.kernel

SCRIPT = textwrap.dedent('''
    import json, ipaddress as ip
    from ipip.kernel import RouteKernel
    from ipip.model import NextHop, Route, desired_routes, NodeFacts
    from ipip.reconcile import RouteReconciler
    from fabric.config import Pool, IPIPMode
    N, A = ip.IPv4Network, ip.IPv4Address
    k = RouteKernel(proto=80, table=254, tunnel_device="tunl0")
    from ipip import netlink as nl, rtnl
    import subprocess, time
    mon = nl.open_monitor(0x40)  # IPv4 route events, without the echo of our own writes (a BPF filter)
    nl.ignore_sender(mon, k.portid)
    view = k.read(A("10.0.1.11"))
    out = {"facts": [str(view.facts.network), view.facts.device, view.facts.mtu, str(view.kernel_prefix)],
           "underlay": sorted(str(r.dst) for r in view.facts.routes),
           "connected": [[str(n), d] for n, d in view.facts.connected],
           "foreign": sorted(f"{d} {m}" for d, m in view.foreign)}
    plan = desired_routes(facts=view.facts, pools=[Pool(cidr=N("10.244.0.0/16"), ipip_mode=IPIPMode.CROSS_SUBNET)],
                          local_pod_cidrs=[N("10.244.1.0/24")],
                          learned={N("10.244.2.0/24"): {("a2", A("10.0.1.12"))},
                                   N("10.244.3.0/24"): {("b1", A("10.0.2.21"))},
                                   N("10.244.9.0/24"): {("a2", A("10.0.1.12")), ("b1", A("10.0.2.21"))}})
    k.create_tunnel()
    view = k.read(A("10.0.1.11"))
    k.set_link(view.tunnel.index, mtu=plan.tunnel_mtu, up=True)
    # desired also holds routes at keys where the node has its own: its connected subnet (metric 0), a
    # static route (metric 0) and a default route (metric 0); and an external default at metric 4096
    extra = [Route(N("10.0.1.0/24"), nexthops=(NextHop(A("10.0.1.1"), "eth1"),)),
             Route(N("192.168.77.0/24"), nexthops=(NextHop(A("10.0.1.1"), "eth1"),)),
             Route(N("0.0.0.0/0"), nexthops=(NextHop(A("10.0.1.1"), "eth1"),)),
             Route(N("0.0.0.0/0"), nexthops=(NextHop(A("10.0.1.1"), "eth1"),), metric=4096)]
    desired = {r.id: r for r in list(plan.routes.values()) + extra}
    rec = RouteReconciler()
    rec.set_dataplane(view.owned, view.foreign)
    rec.set_desired(desired)
    ops = rec.plan(0.0)
    errs = k.apply(ops.ops(), view.ifindex)
    rec.record(ops, [(e.op, e.route, e.errno) for e in errs], 0.0)
    out["errors"] = sorted(f"{e.op} {e.route.dst} {e.error}" for e in errs)
    subprocess.run(["ip", "route", "add", "192.168.88.0/24", "via", "10.0.1.1", "proto", "static"], check=True)
    time.sleep(0.2)
    out["monitor"] = sorted({(typ, pid == k.portid, str(rtnl.decode_route(b).dst)) for typ, fl, pid, b in nl.drain(mon)
                             if typ in (rtnl.RTM_NEWROUTE, rtnl.RTM_DELROUTE)})
    out["conflicts"] = sorted(f"{d} {m}" for (d, m), f in rec.failures.items.items() if f.conflict)
    view2 = k.read(A("10.0.1.11"))
    out["readback_equal"] = {str(d): view2.owned.get(r.id) is not None and view2.owned[r.id].key() == r.key()
                             for d, r in plan.routes.items()}
    rec.set_dataplane(view2.owned, view2.foreign)
    out["pending_after"] = sorted(f"{d} {m}" for d, m in rec.pending())
    out["tunnel"] = [view2.tunnel.up, view2.tunnel.mtu]
    # drop everything learned: only the blackhole stays; foreign routes are untouched
    rec.set_desired({r.id: r for r in plan.routes.values() if r.kind == "blackhole"})
    ops = rec.plan(100.0)
    errs = k.apply(ops.ops(), view2.ifindex)
    out["errors3"] = [e.error for e in errs]
    out["owned_after"] = sorted(str(d) for d, m in k.read(A("10.0.1.11")).owned)
    # tunnel address: ours carries our protocol, a foreign one is left alone
    t = view2.tunnel
    out["addr_errors"] = k.tunnel_address(t.index, [A("10.244.1.0")], [])
    t2 = k.read(A("10.0.1.11")).tunnel
    out["tunnel_addrs"] = [sorted(map(str, t2.owned)), sorted(map(str, t2.other))]
    print(json.dumps(out))
''')


@pytest.fixture
def ns():
    name = f"rk-{uuid.uuid4().hex[:6]}"
    sh = lambda c: subprocess.run(["ip", "netns", "exec", name, "sh", "-c", c], check=True)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        sh("ip link set lo up; ip link add eth1 type veth peer name peer1; ip link set eth1 up; ip link set peer1 up;"
           "ip link add eth2 type veth peer name peer2; ip link set eth2 up; ip link set peer2 up;"
           "ip addr add 10.0.1.11/24 dev eth1; ip addr add 192.168.5.1/24 dev eth2; ip route add default via 10.0.1.1;"
           "ip route add 192.168.77.0/24 via 10.0.1.1 proto static")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def test_apply_readback_idempotent_and_owned_only(ns: str) -> None:
    before = subprocess.run(["ip", "-n", ns, "route", "show"], capture_output=True, text=True).stdout
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["facts"] == ["10.0.1.0/24", "eth1", 1500, "10.0.1.11/24"]
    assert "0.0.0.0/0" in out["underlay"] and "192.168.77.0/24" in out["underlay"]
    assert ["192.168.5.0/24", "eth2"] in out["connected"]
    assert {"0.0.0.0/0 0", "10.0.1.0/24 0", "192.168.77.0/24 0"} <= set(out["foreign"])
    # the kernel refused every write at another owner's key (NLM_F_EXCL): nothing of theirs replaced
    assert out["errors"] == ["create 0.0.0.0/0 File exists", "create 10.0.1.0/24 File exists",
                             "create 192.168.77.0/24 File exists"]
    assert out["conflicts"] == ["0.0.0.0/0 0", "10.0.1.0/24 0", "192.168.77.0/24 0"]
    # the monitor saw someone else's route, and none of the notifications of our own writes
    assert out["monitor"] == [[24, False, "192.168.88.0/24"]], out["monitor"]
    assert out["readback_equal"] == {"10.244.1.0/24": True, "10.244.2.0/24": True, "10.244.3.0/24": True,
                                     "10.244.9.0/24": True}
    assert out["pending_after"] == ["0.0.0.0/0 0", "10.0.1.0/24 0", "192.168.77.0/24 0"]  # conflicts only
    assert out["tunnel"] == [True, 1480]
    assert out["errors3"] == []
    assert out["owned_after"] == ["10.244.1.0/24"]
    assert out["addr_errors"] == []
    assert out["tunnel_addrs"] == [["10.244.1.0"], []]
    shown = subprocess.run(["ip", "-n", ns, "route", "show"], capture_output=True, text=True).stdout
    for line in before.splitlines():  # every route of the node is still there, unchanged
        assert line in shown, (line, shown)
    assert "blackhole 10.244.1.0/24 proto 80" in shown
    assert "default via 10.0.1.1 dev eth1 proto 80 metric 4096" not in shown  # removed again with the rest
