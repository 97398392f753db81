"""Route programming benchmark: 10,000 learned /24s into one netns, ours vs `ip -batch` vs pyroute2.

Run in a kernel with ipip (the lab kernel here):

    .venv/bin/fabric lab-kernel run -- .venv/bin/python bench/routes_bench.py [--routes 10000] [--sizes 100,1000,10000]

The outer process creates a throwaway namespace (node address 10.0.1.11/24 on a veth, default via
10.0.1.1, tunl0) and re-runs this file inside it with --inner; the namespace is removed at the end.
Learned routes come from four mesh peers: two in the node's subnet (direct via eth1) and two in
another subnet (CrossSubnet pool: IPIP via tunl0 onlink, mtu 1480), so every method writes the same
mix. Each method's result is checked equal to the others (`ip route show proto 80`).

Printed: bulk install and bulk removal for (a) our path = ipip.model desired_routes + diff_routes +
RouteKernel.apply (pipelined netlink), (b) `ip -batch`, (c) pyroute2 one route("replace") per route,
ratios vs `ip -batch`; then the cost of ONE route change with N routes present, split into the pure
part the agent runs per sync (import filter + desired_routes + diff_routes, all over every route) and
the kernel write. Absolute times in the lab kernel are 6-10x the host's: read the ratios.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROTO, TABLE, TUNNEL = 80, 254, "tunl0"
NODE_IP = "10.0.1.11"
# (peer name, next hop, same subnet?)
PEERS = [("a2", "10.0.1.12", True), ("a3", "10.0.1.13", True), ("b1", "10.0.2.21", False), ("b2", "10.0.2.22", False)]
POOL = "10.128.0.0/9"


def prefixes(n: int) -> list[ipaddress.IPv4Network]:
    base = int(ipaddress.IPv4Address("10.128.0.0"))
    return [ipaddress.IPv4Network((base + (i << 8), 24)) for i in range(n)]


# --------------------------------------------------------------------------------------------
# inner side: runs inside the namespace

def inner(args: argparse.Namespace) -> int:
    from pyroute2 import IPRoute

    from fabric.config import IPIPMode, Pool, parse
    from fabric.import_policy import ImportFilter
    from ipip.kernel import RouteKernel
    from bgp.events import RoutesAnnounced, RoutesWithdrawn
    from bgp.rib import Rib
    from fabric.route_state import RouteState, make_inputs
    from ipip.model import desired_routes
    from ipip.reconcile import RouteReconciler

    def diff_routes(desired: dict, actual: dict):
        """The reconciler's operations for a full desired set against what we own (by route key)."""
        rec = RouteReconciler()
        rec.set_dataplane({r.id: r for r in actual.values()}, {})
        rec.set_desired({r.id: r for r in desired.values()})
        return rec.plan(0.0)

    A = ipaddress.IPv4Address
    pools = [Pool(cidr=ipaddress.IPv4Network(POOL), ipip_mode=IPIPMode.CROSS_SUBNET)]
    cfg = parse({"node": {"name": "n1", "address": f"{NODE_IP}/24"}, "pools": [{"cidr": POOL}],
                 "source": {"kind": "file", "path": "cluster.yaml"}})
    kinds = {name: "mesh" for name, _, _ in PEERS}

    def learned_for(n: int, shift: int = 0) -> dict:
        return {p: {(PEERS[(i + shift) % 4][0], A(PEERS[(i + shift) % 4][1]))} for i, p in enumerate(prefixes(n))}

    rk = RouteKernel(proto=PROTO, table=TABLE, tunnel_device=TUNNEL)
    rk.create_tunnel()
    view = rk.read(A(NODE_IP))
    rk.set_link(view.tunnel.index, mtu=1480, up=True)
    ifindex = view.ifindex

    def shown() -> list[str]:
        out = subprocess.run(["ip", "route", "show", "proto", str(PROTO)], capture_output=True, text=True,
                             check=True).stdout
        return [line for line in out.splitlines() if not line.startswith("blackhole")]

    def our_sync(learned: dict) -> dict[str, float]:
        """What the agent does for one sync, timed per step (the kernel dump is the agent's full resync)."""
        t0 = time.perf_counter()
        v = rk.read(A(NODE_IP))
        t1 = time.perf_counter()
        acc, _ = ImportFilter(cfg).filter(learned, kinds, {}, [])
        t2 = time.perf_counter()
        plan = desired_routes(facts=v.facts, pools=pools, local_pod_cidrs=[], learned=acc, tunnel_device=TUNNEL)
        t3 = time.perf_counter()
        diff = diff_routes(plan.routes, {r.dst: r for r in v.owned.values()})
        t4 = time.perf_counter()
        errs = rk.apply(diff.ops(), ifindex)
        t5 = time.perf_counter()
        assert not errs, errs[:3]
        return {"dump": t1 - t0, "filter": t2 - t1, "model": t3 - t2, "diff": t4 - t3, "apply": t5 - t4,
                "pure": t4 - t1, "total": t5 - t1}

    n = args.routes
    learned = learned_for(n)
    res: dict[str, dict[str, float]] = {}

    # (a) ours
    add = our_sync(learned)
    ours_text = shown()
    assert len(ours_text) == n, len(ours_text)
    rm = our_sync({})
    assert shown() == []
    res["ours"] = {"add": add["total"], "del": rm["total"]}

    # (b) ip -batch of the same routes
    def via(i: int) -> tuple[str, str, bool]:
        return PEERS[i % 4][0], PEERS[i % 4][1], PEERS[i % 4][2]

    lines_add, lines_del = [], []
    for i, p in enumerate(prefixes(n)):
        _, nh, same = via(i)
        dev = "eth1" if same else f"{TUNNEL} onlink"
        mtu = "" if same else " mtu 1480"
        lines_add.append(f"route replace {p} via {nh} dev {dev} proto {PROTO}{mtu}\n")
        lines_del.append(f"route del {p} proto {PROTO}\n")

    def ip_batch(lines: list[str]) -> float:
        with tempfile.NamedTemporaryFile("w", suffix=".batch") as f:
            f.writelines(lines)
            f.flush()
            t = time.perf_counter()
            subprocess.run(["ip", "-batch", f.name], check=True)
            return time.perf_counter() - t

    res["ip -batch"] = {"add": ip_batch(lines_add)}
    assert shown() == ours_text, "ip -batch result differs from ours"
    res["ip -batch"]["del"] = ip_batch(lines_del)
    assert shown() == []

    # (c) pyroute2, one call per route, each waiting for its ack
    ipr = IPRoute()
    t = time.perf_counter()
    for i, p in enumerate(prefixes(n)):
        _, nh, same = via(i)
        if same:
            ipr.route("replace", dst=str(p), gateway=nh, oif=ifindex["eth1"], proto=PROTO, table=TABLE)
        else:
            ipr.route("replace", dst=str(p), gateway=nh, oif=ifindex[TUNNEL], proto=PROTO, table=TABLE,
                      flags=4, metrics={"mtu": 1480})
    res["pyroute2"] = {"add": time.perf_counter() - t}
    assert shown() == ours_text, "pyroute2 result differs from ours"
    t = time.perf_counter()
    for p in prefixes(n):
        ipr.route("del", dst=str(p), proto=PROTO, table=TABLE)
    res["pyroute2"]["del"] = time.perf_counter() - t
    ipr.close()
    assert shown() == []

    base = res["ip -batch"]
    print(f"{n} routes into one netns (seconds; ratio vs ip -batch)")
    for name, r in res.items():
        print(f"  {name:10s} install {r['add']:6.2f} ({r['add'] / base['add']:.2f}x)   "
              f"remove {r['del']:6.2f} ({r['del'] / base['del']:.2f}x)")
    print(f"  ours, install split: dump {add['dump']:.2f}  import filter {add['filter']:.2f}  model {add['model']:.2f}"
          f"  diff {add['diff']:.2f}  netlink apply {add['apply']:.2f}")

    # ONE route change with N present: one prefix moves to another peer (next hop changes)
    sizes = [int(s) for s in args.sizes.split(",")]
    meds: dict[int, dict[str, float]] = {}
    for size in sizes:
        cur = learned_for(size)
        our_sync(cur)
        owned = rk.read(A(NODE_IP))
        facts, actual = owned.facts, {r.dst: r for r in owned.owned.values()}
        steps: dict[str, list[float]] = {"filter": [], "model": [], "diff": [], "apply": [], "ip": [], "inc": []}
        # The agent's per-change path: a RIB + RouteState updated for the touched prefix only.
        rib = Rib()
        for peer_name, peer_nh, _ in PEERS:
            mine = tuple(q for q, hs in cur.items() if any(h[0] == peer_name for h in hs))
            if mine:
                rib.apply(RoutesAnnounced(peer_name, A(peer_nh), mine), 0.0)
        state = RouteState(ImportFilter(cfg))
        inputs = make_inputs(facts=facts, pools=pools, pod_cidrs=[], nodes={}, kinds=kinds, ibgp=[],
                             tunnel_device=TUNNEL, per_peer_limits=False)
        state.update(inputs, {}, dirty=None, all_routes=rib.routes, holders=rib.holders)
        rec = RouteReconciler()
        rec.set_dataplane({r.id: r for r in actual.values()}, {})
        rec.set_desired({r.id: r for r in state.routes.values()})
        for c in range(args.changes):
            i = (c * 7919) % size
            p = prefixes(size)[i]
            peer, nh = next(iter(cur[p]))
            k = next(j for j, (name, _, _) in enumerate(PEERS) if name == peer)
            new = PEERS[(k + 1) % 4]
            cur[p] = {(new[0], A(new[1]))}
            ti = time.perf_counter()
            rib.apply(RoutesAnnounced(new[0], A(new[1]), (p,)), 0.0)
            rib.apply(RoutesWithdrawn(peer, (p,)), 0.0)
            touched, _ = state.update(inputs, {}, dirty={p}, all_routes=rib.routes, holders=rib.holders)
            rec.update_desired({state.routes[q].id: state.routes[q] for q in touched if q in state.routes})
            inc_diff = rec.plan(0.0)
            steps["inc"].append(time.perf_counter() - ti)
            assert len(inc_diff.write) == 1 and inc_diff.write[0][1].nexthops[0].gateway == A(new[1]), inc_diff
            rec.record(inc_diff, [], 0.0)
            t0 = time.perf_counter()
            acc, _ = ImportFilter(cfg).filter(cur, kinds, {}, [])
            t1 = time.perf_counter()
            plan = desired_routes(facts=facts, pools=pools, local_pod_cidrs=[], learned=acc, tunnel_device=TUNNEL)
            t2 = time.perf_counter()
            diff = diff_routes(plan.routes, actual)
            t3 = time.perf_counter()
            errs = rk.apply(diff.ops(), ifindex)
            t4 = time.perf_counter()
            assert not errs and len(diff.write) == 1 and not diff.delete, (errs, diff)
            for _, r in diff.write:
                actual[r.dst] = r
            # the same one change through `ip route replace` (one process), for scale
            dev = "eth1" if new[2] else f"{TUNNEL} onlink"
            t5 = time.perf_counter()
            subprocess.run(f"ip route replace {p} via {new[1]} dev {dev} proto {PROTO}"
                           f"{'' if new[2] else ' mtu 1480'}", shell=True, check=True)
            t6 = time.perf_counter()
            for key, v in (("filter", t1 - t0), ("model", t2 - t1), ("diff", t3 - t2), ("apply", t4 - t3),
                           ("ip", t6 - t5)):
                steps[key].append(v)
        meds[size] = {k: statistics.median(v) for k, v in steps.items()}
        small = subprocess.run([sys.executable, os.path.abspath(__file__), "--one-write", str(size)],
                               capture_output=True, text=True, check=True).stdout
        meds[size]["small"] = float(small) / 1e3
        our_sync({})
    print(f"one route change with N routes present (median of {args.changes}, ms)")
    print(f"  {'N':>6s} {'filter':>8s} {'model':>8s} {'diff':>8s} {'pure sum':>9s} {'incremental':>12s} "
          f"{'netlink':>8s} {'netlink*':>9s} {'ip route':>9s}")
    for size, m in meds.items():
        pure = m["filter"] + m["model"] + m["diff"]
        print(f"  {size:6d} {m['filter'] * 1e3:8.2f} {m['model'] * 1e3:8.2f} {m['diff'] * 1e3:8.2f} {pure * 1e3:9.2f}"
              f" {m['inc'] * 1e3:12.3f}"
              f" {m['apply'] * 1e3:8.3f} {m['small'] * 1e3:9.3f} {m['ip'] * 1e3:9.2f}")
    first, last = meds[sizes[0]], meds[sizes[-1]]
    pf = first["filter"] + first["model"] + first["diff"]
    pl = last["filter"] + last["model"] + last["diff"]
    print("  (netlink* = the same RouteKernel write in a small separate process, 200 writes: no model heap;"
          " ip route = one `ip route replace` process)")
    print(f"  {sizes[-1]} vs {sizes[0]} routes: kernel write {last['apply'] / first['apply']:.2f}x "
          f"(small process {last['small'] / first['small']:.2f}x), "
          f"pure part {pl / pf:.1f}x (full recompute), {last['inc'] / first['inc']:.2f}x (incremental, "
          "what the agent runs per BGP update)")
    rk.close()
    return 0


def one_write(size: int, count: int = 200) -> int:
    """Median of `count` single-route writes in a small process (no model heap) with `size` routes present."""
    from ipip.kernel import RouteKernel
    from ipip.model import NextHop, Route

    ifindex = {"eth1": int(Path("/sys/class/net/eth1/ifindex").read_text())}
    w = RouteKernel(proto=PROTO, table=TABLE, tunnel_device=TUNNEL)
    times = []
    for c in range(count):
        r = Route(prefixes(size)[(c * 7919) % size], "unicast",
                  (NextHop(ipaddress.IPv4Address("10.0.1.13" if c % 2 else "10.0.1.12"), "eth1"),))
        t = time.perf_counter()
        errs = w.apply([("replace", r)], ifindex)
        times.append(time.perf_counter() - t)
        assert not errs, errs
    print(f"{statistics.median(times) * 1e3:.3f}")
    return 0


# --------------------------------------------------------------------------------------------
# outer side: the throwaway namespace

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--routes", type=int, default=10000)
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--changes", type=int, default=20)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--one-write", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_write:
        return one_write(args.one_write)
    if args.inner:
        return inner(args)
    ns = f"rtbench-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "sh", "-c",
                        "ip link set lo up; ip link add eth1 type veth peer name peer1; ip link set eth1 up;"
                        f"ip link set peer1 up; ip addr add {NODE_IP}/24 dev eth1; ip route add default via 10.0.1.1"],
                       check=True)
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "--inner",
                            "--routes", str(args.routes), "--sizes", args.sizes, "--changes", str(args.changes)])
        return r.returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    sys.exit(main())
